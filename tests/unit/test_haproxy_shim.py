"""The one-hop path's HAProxy shim: Ray's own rendered config comes out with every frontend on the
API's host and a 503 with Retry-After as HAProxy's error page, and the real HAProxy (the binary
Ray bundles) accepts what the shim hands it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from jinja2 import Environment
from ray.serve._private.haproxy import HAProxyConfig, _haproxy_fmt_literal
from ray.serve._private.haproxy_templates import HAPROXY_CONFIG_TEMPLATE
from ray.serve.config import HTTPOptions

from zeroserve.haproxy_shim import ERROR_PAGE, real_haproxy, rewrite


def _rays_config(tmp_path: Path, host: str) -> str:
    """The config Ray 2.60 renders for HAProxy (no backends yet), as HAProxyApi does."""
    cfg = HAProxyConfig(
        http_options=HTTPOptions(host=host, port=18000),
        socket_path=str(tmp_path / "admin.sock"),
        error_file_path=str(tmp_path / "500.http"),
    )
    env = Environment()
    env.filters["haproxy_fmt"] = _haproxy_fmt_literal
    context = {
        "config": cfg,
        "backends": [],
        "grpc_backends": [],
        "backends_with_health_config": [],
        "grpc_backends_with_health_config": [],
        "healthz_rules": "",
        "grpc_healthz_rules": "",
        "route_info": None,
        "has_ingress_request_router": False,
    }
    return env.from_string(HAPROXY_CONFIG_TEMPLATE).render(context)


def _binds(config: str) -> list[str]:
    return [line.split()[1] for line in config.splitlines() if line.strip().startswith("bind ")]


def test_rays_config_comes_out_on_the_api_host_with_our_error_page(tmp_path: Path) -> None:
    original = _rays_config(tmp_path, "127.0.0.1")
    assert any(b.startswith(("*:", ":")) for b in _binds(original))  # what Ray 2.60 ships
    out = rewrite(original, "/x/zeroserve-503.http")
    assert _binds(out) and all(b.startswith("127.0.0.1:") for b in _binds(out)), _binds(out)
    errorfiles = [line.split() for line in out.splitlines() if line.strip().startswith("errorfile")]
    assert sorted(e[1] for e in errorfiles) == ["502", "503", "504"]
    assert all(e[2] == "/x/zeroserve-503.http" for e in errorfiles)
    # A dead replica's connection is never a reused one, which HAProxy would close on the client silently.
    assert "http-reuse never" in rewrite(
        "frontend http_frontend\n  bind 127.0.0.1:1\nbackend b\n    http-reuse always\n", "e"
    )


def test_an_api_on_every_interface_takes_the_others_with_it(tmp_path: Path) -> None:
    out = rewrite(_rays_config(tmp_path, "0.0.0.0"), "/x/e.http")
    assert all(b.startswith(":") or b.startswith("0.0.0.0:") for b in _binds(out)), _binds(out)


def test_a_config_without_the_api_frontend_is_refused() -> None:
    with pytest.raises(ValueError, match="http_frontend"):
        rewrite("global\n    daemon\nlisten stats\n  bind *:8404\n", "/x/e.http")


def test_haproxy_accepts_what_the_shim_hands_it(tmp_path: Path) -> None:
    """The shim as Ray runs it (``-f <config>``), with ``-c``: HAProxy checks the rewritten config
    and the error page, and exits."""
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        "defaults\n  mode http\n  timeout connect 5s\n  timeout client 5s\n  timeout server 5s\n"
        "  errorfile 502 /nowhere/500.http\n  errorfile 503 /nowhere/500.http\n  errorfile 504 /nowhere/500.http\n"
        "frontend prometheus\n  bind :19101\n"
        "frontend http_frontend\n  bind 127.0.0.1:18000\n  default_backend b\n"
        "backend b\n  server s 127.0.0.1:1\n"
        "listen stats\n  bind *:18404\n  stats enable\n"
    )
    shim = Path(sys.executable).with_name("zeroserve-haproxy")
    # As Ray runs it: the variable that names the binary names the shim itself.
    env = {**os.environ, "RAY_SERVE_HAPROXY_BINARY_PATH": str(shim)}
    run = subprocess.run([str(shim), "-c", "-f", str(config)], capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    checked = (tmp_path / "haproxy.cfg.zeroserve").read_text()
    assert all(b.startswith("127.0.0.1:") for b in _binds(checked)), _binds(checked)
    assert (tmp_path / "zeroserve-503.http").read_bytes() == ERROR_PAGE.encode()
    assert not list(tmp_path.glob("*.zeroserve.zeroserve"))  # the real HAProxy ran, not the shim again
    assert Path(real_haproxy()).is_file()

"""The request id, the per-request log line and the last-resort 500, as one plain ASGI middleware.

Plain ASGI: Starlette's ``BaseHTTPMiddleware`` would copy every body chunk of a stream
through an extra queue.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse
from starlette.requests import Request

from zeroserve.errors import error_body
from zeroserve.gateway.telemetry import NullObserver

__all__ = ["INTERNAL_ERROR", "RequestIdMiddleware", "RequestLog", "request_log"]

logger = logging.getLogger("zeroserve.gateway")

# Matched with fullmatch: "^...$" lets a trailing newline through into the echoed header.
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# What a client sees of an unexpected failure (the traceback goes to the log only).
INTERNAL_ERROR = error_body("The server had an error while processing your request.", "internal_error")
_STATE_KEY = "zeroserve_log"


@dataclass
class RequestLog:
    """What one request's log line and metrics report; filled in by whoever learns it."""

    request_id: str
    start: float
    route: str = "other"
    model: str = "_none"
    tier: str = "-"
    prompt_tokens: int | None = None
    completion_tokens: int = 0
    gpu_s: float | None = None
    # How the request's model woke for it (RoomQueue.enter): "" (it was awake), "free", "evicted",
    # "joined" or "queued".
    wake: str = ""

    def tokens(self, prompt: int, completion: int) -> None:
        self.prompt_tokens, self.completion_tokens = prompt, completion

    def line(self, method: str | None, path: str | None, status: int, seconds: float) -> tuple[Any, ...]:
        tokens = "-" if self.prompt_tokens is None else f"{self.prompt_tokens}+{self.completion_tokens}"
        gpu_s = "-" if self.gpu_s is None else f"{self.gpu_s:.6f}"
        wake = self.wake or "-"
        return (self.request_id, method, path, self.model, self.tier, status, seconds * 1000, tokens, gpu_s, wake)


def request_log(request: Request) -> RequestLog:
    """The request's log record (set by :class:`RequestIdMiddleware`)."""
    return request.scope["state"][_STATE_KEY]  # type: ignore[no-any-return]


class RequestIdMiddleware:
    """Give every request an id (the client's ``X-Request-Id`` if well-formed), return it in the
    response headers, log one line per request, and answer 500 for an error nobody answered.

    Args:
        app: the ASGI app.
        observer: receives each request's route, status and latency.
        echo: return ``X-Request-Id`` (off behind Serve's proxy, which adds it).
        routes: path to metric label; any other path is "other".
    """

    def __init__(self, app: Any, observer: Any = None, echo: bool = True, routes: dict[str, str] | None = None) -> None:
        self.app = app
        self.observer = observer or NullObserver()
        self.echo = echo
        self.routes = routes or {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = ""
        for key, value in scope.get("headers", []):
            if key == b"x-request-id":
                given = value.decode("latin-1")
        request_id = given if _REQUEST_ID_RE.fullmatch(given) else uuid.uuid4().hex
        start = time.perf_counter()
        log = RequestLog(request_id, start, route=self.routes.get(scope.get("path", ""), "other"))
        scope.setdefault("state", {})[_STATE_KEY] = log
        status = 500
        started = False

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                headers = [*message.get("headers", [])]
                if self.echo:
                    headers.append((b"x-request-id", request_id.encode()))
                if log.wake:
                    headers.append((b"x-zeroserve-wake", log.wake.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:  # noqa: BLE001 - Starlette re-raises after its 500: already answered and logged
            if not started:
                logger.exception("[%s] unhandled error", request_id)
                await JSONResponse(INTERNAL_ERROR, status_code=500)(scope, receive, send_with_id)  # type: ignore[arg-type]
        finally:
            seconds = time.perf_counter() - start
            self.observer.request(log.model, log.route, status, seconds)
            logger.info(
                "[%s] %s %s model=%s tier=%s -> %d in %.1f ms tokens=%s gpu_s=%s wake=%s",
                *log.line(scope.get("method"), scope.get("path"), status, seconds),
            )

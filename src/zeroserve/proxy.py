"""An ASGI middleware for Ray Serve's HTTP proxy: no request ends without a clear answer.

When the gateway replica serving a request dies (SIGKILL, node loss, ``ray.kill``),
Ray's proxy gets an actor error. Before the response started it sends nothing, and
uvicorn answers a bare ``500 Internal Server Error``; after an SSE stream started it
just closes the connection, so the client sees a truncated stream. Neither tells the
client what to do. This middleware, installed in every proxy through Ray's
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=zeroserve.proxy:middlewares``, turns them
into what the gateway itself sends for a lost replica:

- nothing sent yet: a 503 with ``Retry-After`` and an OpenAI error body;
- an event stream cut short: an SSE ``error`` event, then ``data: [DONE]``;
- any 503 without ``Retry-After`` (Serve's own "no replica" answer): the header added.

It is plain ASGI (no Ray import) so it is unit-tested with a fake app.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["ProxyFailsafe", "middlewares"]

logger = logging.getLogger("zeroserve.proxy")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

RETRY_AFTER_S = 1
_MESSAGE = "the gateway replica handling this request stopped before it answered; retry"


def _error(code: str) -> dict[str, Any]:
    return {"error": {"message": _MESSAGE, "type": "service_unavailable", "param": None, "code": code}}


class ProxyFailsafe:
    """Wraps Serve's proxy app; see the module docstring."""

    def __init__(self, app: ASGIApp, retry_after_s: int = RETRY_AFTER_S) -> None:
        self.app = app
        self.retry_after = str(retry_after_s).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        started = finished = sse = False
        disconnected = False

        async def watch_receive() -> Message:
            nonlocal disconnected
            message = await receive()
            if message.get("type") == "http.disconnect":
                disconnected = True
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started, finished, sse
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                names = {bytes(k).lower() for k, _ in headers}
                if message["status"] == 503 and b"retry-after" not in names:
                    headers.append((b"retry-after", self.retry_after))
                    message = {**message, "headers": headers}
                sse = any(bytes(k).lower() == b"content-type" and b"text/event-stream" in bytes(v) for k, v in headers)
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        try:
            await self.app(scope, watch_receive, guarded_send)
        finally:
            if not finished and not disconnected:
                await self._finish(send, started, sse, scope)

    async def _finish(self, send: Send, started: bool, sse: bool, scope: Scope) -> None:
        path = scope.get("path", "")
        try:
            if not started:
                logger.warning("no answer from the gateway for %s: sending 503", path)
                body = json.dumps(_error("gateway_replica_died")).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 503,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"retry-after", self.retry_after),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body, "more_body": False})
            elif sse:
                logger.warning("stream for %s cut short: closing it with an error event", path)
                tail = f"data: {json.dumps(_error('gateway_replica_died'))}\n\ndata: [DONE]\n\n".encode()
                await send({"type": "http.response.body", "body": tail, "more_body": False})
        except Exception:  # noqa: BLE001 - the client is gone; nothing more to tell it
            logger.debug("could not finish the response for %s", path, exc_info=True)


def middlewares() -> list[Any]:
    """What Ray's ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` calls in each proxy."""
    from starlette.middleware import Middleware

    return [Middleware(ProxyFailsafe)]

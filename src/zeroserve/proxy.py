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
- Serve's own plain-text 503s ("no replica", back-pressure): the OpenAI error shape with
  ``Retry-After``, and any other 503 without ``Retry-After``: the header added.

It is plain ASGI (no Ray import) so it is unit-tested with a fake app.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from zeroserve.errors import ModelUnavailableError

__all__ = ["ProxyFailsafe", "middlewares"]

logger = logging.getLogger("zeroserve.proxy")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

RETRY_AFTER_S = 1
_MESSAGE = "the gateway replica handling this request stopped before it answered; retry"


def _request_id(scope: Scope) -> bytes | None:
    """The id Serve's RequestIdMiddleware (inside this one) put into the request's headers."""
    return next((bytes(v) for k, v in scope.get("headers") or [] if bytes(k).lower() == b"x-request-id"), None)


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

        plain_503: bytearray | None = None  # the text of one of Serve's own 503s, being rewritten

        async def guarded_send(message: Message) -> None:
            nonlocal started, finished, sse, plain_503
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                content_type = next((bytes(v) for k, v in headers if bytes(k).lower() == b"content-type"), b"")
                sse = b"text/event-stream" in content_type
                started = True
                if message["status"] == 503:
                    if b"application/json" not in content_type:
                        plain_503 = bytearray()  # Serve's text: the client gets the OpenAI shape instead
                        return
                    if all(bytes(k).lower() != b"retry-after" for k, _ in headers):
                        message = {**message, "headers": [*headers, (b"retry-after", self.retry_after)]}
            elif plain_503 is not None:
                plain_503 += message.get("body", b"")
                if not message.get("more_body", False):
                    finished = True
                    await self._unavailable(send, scope, "unavailable", plain_503.decode(errors="replace")[:500])
                return
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
        request_id = _request_id(scope)
        try:
            if not started:
                logger.warning("[%s] no answer from the gateway for %s: sending 503", request_id, path)
                await self._unavailable(send, scope, "gateway_replica_died", _MESSAGE)
            elif sse:
                logger.warning("[%s] stream for %s cut short: closing it with an error event", request_id, path)
                event = ModelUnavailableError(_MESSAGE, code="gateway_replica_died").body()
                tail = f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode()
                await send({"type": "http.response.body", "body": tail, "more_body": False})
        except Exception:  # noqa: BLE001 - the client is gone; nothing more to tell it
            logger.debug("could not finish the response for %s", path, exc_info=True)

    async def _unavailable(self, send: Send, scope: Scope, code: str, message: str) -> None:
        """A whole 503 in the OpenAI error shape, with Retry-After and the request's id."""
        body = json.dumps(ModelUnavailableError(message, code=code).body()).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", self.retry_after),
        ]
        if (request_id := _request_id(scope)) is not None:
            headers.append((b"x-request-id", request_id))
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def middlewares() -> list[Any]:
    """What Ray's ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` calls in each proxy."""
    from starlette.middleware import Middleware

    return [Middleware(ProxyFailsafe)]

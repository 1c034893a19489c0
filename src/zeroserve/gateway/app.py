"""The OpenAI-compatible HTTP app: wiring only.

A request goes: :mod:`middleware` (request id, log line) → a route of :mod:`routes` → its
serving object in :mod:`serving` (auth, body, model lookup, :mod:`lease` admission,
:mod:`waits` bounds, one backend call) → JSON or :mod:`sse`. Every failure becomes the
OpenAI error body here, through :class:`~zeroserve.errors.ZeroserveError`.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from zeroserve.config import GatewaySpec
from zeroserve.errors import ZeroserveError, error_body
from zeroserve.gateway.backend import Backend
from zeroserve.gateway.lease import Admission
from zeroserve.gateway.middleware import INTERNAL_ERROR, RequestIdMiddleware, request_log
from zeroserve.gateway.routes import Services, add_routes, metric_labels
from zeroserve.gateway.serving import EncodeServing, GenerateServing, PassthroughServing, PoolServing
from zeroserve.gateway.state import GatewayState
from zeroserve.gateway.telemetry import Observer
from zeroserve.quota import Ledger

__all__ = ["Admission", "create_app"]

logger = logging.getLogger("zeroserve.gateway")


def create_app(
    spec: GatewaySpec,
    backend: Backend,
    observer: Observer | None = None,
    echo_request_id: bool = True,
    ledger: Ledger | None = None,
) -> FastAPI:
    """Build the gateway's FastAPI app around a backend.

    Args:
        spec: the gateway's limits and timeouts.
        backend: how models are listed and called (Ray Serve handles in production).
        observer: receives every request's figures (Prometheus metrics in production).
        echo_request_id: return ``X-Request-Id``; off behind Ray Serve's proxy, which
            already gives every request one (the client's, or a new one) and returns it.
        ledger: API keys and charges (needed when ``spec.auth.enabled``).

    Raises:
        ValueError: auth is enabled but no ledger was given.
    """
    state = GatewayState.create(spec, backend, observer, ledger)
    passthrough = PassthroughServing(state)
    app = FastAPI(title="zeroserve", version="0.1.0", docs_url="/docs", redoc_url=None)
    app.state.gateway = state
    app.state.services = Services(PoolServing(state), EncodeServing(passthrough), GenerateServing(passthrough))
    _add_error_handlers(app)
    app.add_middleware(RequestIdMiddleware, observer=state.obs, echo=echo_request_id, routes=metric_labels())
    add_routes(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ZeroserveError)
    async def _zeroserve_error(request: Request, err: ZeroserveError) -> JSONResponse:
        # No X-Request-Id here: RequestIdMiddleware (or Serve's proxy) adds it, once.
        return JSONResponse(err.body(), status_code=err.status_code, headers=err.headers())

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(str(err.detail), kind), status_code=err.status_code, headers=getattr(err, "headers", None)
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        logger.exception("[%s] unexpected error", request_log(request).request_id)
        return JSONResponse(INTERNAL_ERROR, status_code=500)

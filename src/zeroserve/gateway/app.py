"""The OpenAI-compatible HTTP app: validation, admission, bounded waits, errors.

Handlers are thin: parse and validate a typed request, admit it, make one backend
call under a deadline, shape the OpenAI response (JSON or SSE). Every failure goes
through :func:`_error_response`, so a client always gets the OpenAI error body.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import struct
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from zeroserve.config import GatewaySpec
from zeroserve.engines.base import Delta, collect
from zeroserve.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    ModelUnavailableError,
    OverloadedError,
    PayloadTooLargeError,
    RequestTimeoutError,
    WrongTaskError,
    ZeroserveError,
    error_body,
)
from zeroserve.gateway.backend import Backend, Prompt
from zeroserve.gateway.fair import Dispatcher, FairShare, Grant, QueueFull
from zeroserve.gateway.registry import ModelEntry, ModelState, gpus_in_use
from zeroserve.gateway.telemetry import FanOut, NullObserver, Observer, RollingStats, WakeTracker
from zeroserve.protocol import (
    ChatCompletionRequest,
    ClassifyRequest,
    CompletionRequest,
    EmbeddingRequest,
    GenerateParams,
    PassthroughRequest,
    new_id,
    now,
)
from zeroserve.quota import Ledger

__all__ = ["create_app", "Admission"]

logger = logging.getLogger("zeroserve.gateway")

# Matched with fullmatch: "^...$" lets a trailing newline through into the echoed header.
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# Only a \u escape can put a UTF-16 surrogate into a body decoded as strict UTF-8.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
# Deeper JSON is refused: a forwarded body is pickled on its way to a replica, and pickling a
# few hundred levels exhausts the recursion limit there. OpenAI bodies (tool schemas included)
# need far fewer.
_MAX_JSON_DEPTH = 64
_T = TypeVar("_T", bound=BaseModel)

# How often a request waiting for a cold model checks that the model has not failed to start.
_FAILURE_POLL_S = 1.0
# What a client sees of an unexpected failure (the traceback goes to the log only).
_INTERNAL_ERROR = error_body("The server had an error while processing your request.", "internal_error")


class Admission:
    """Counts requests in flight and sheds load beyond the limits (503 + Retry-After).

    Queuing without bound only turns overload into timeouts; refusing early lets a
    client back off and keeps the admitted requests fast.
    """

    def __init__(
        self, total: int, per_model: int, retry_after_s: int, on_change: Callable[[str, int], None] | None = None
    ) -> None:
        self.on_change = on_change or (lambda model, count: None)
        self.total_limit = total
        self.per_model_limit = per_model
        self.retry_after_s = retry_after_s
        self.total = 0
        self.per_model: Counter[str] = Counter()

    def acquire(self, model: str) -> None:
        """Take a slot for ``model`` or raise :class:`OverloadedError`."""
        if self.total >= self.total_limit:
            raise OverloadedError(
                f"the server has {self.total} requests in flight (limit {self.total_limit}); retry later",
                code="overloaded",
                retry_after_s=self.retry_after_s,
            )
        if self.per_model[model] >= self.per_model_limit:
            raise OverloadedError(
                f"model '{model}' has {self.per_model[model]} requests in flight "
                f"(limit {self.per_model_limit}); retry later",
                code="overloaded",
                retry_after_s=self.retry_after_s,
            )
        self.total += 1
        self.per_model[model] += 1
        self.on_change(model, self.per_model[model])

    def release(self, model: str) -> None:
        self.total -= 1
        self.per_model[model] -= 1
        self.on_change(model, self.per_model[model])


_ROUTES = {
    "/v1/embeddings": "embeddings",
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/classify": "classify",
    "/classify": "classify",
    "/v1/models": "models",
    "/health": "health",
    "/v1/zeroserve/status": "status",
}


class _GuardedStream(StreamingResponse):
    """A StreamingResponse that runs ``on_close`` however the response ends.

    Starlette may cancel a response whose client went away before its body iterator ever
    started; a ``finally`` inside that iterator would then never run.
    """

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            self._on_close()


class _RequestIdMiddleware:
    """Give every request an id (the client's ``X-Request-Id`` if well-formed), return it
    in the response headers, and log one line per request.

    A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` would copy every body chunk
    of a stream through an extra queue.
    """

    def __init__(self, app: Any, observer: Any = None, echo: bool = True) -> None:
        self.app = app
        self.observer = observer or NullObserver()
        self.echo = echo

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = ""
        for key, value in scope.get("headers", []):
            if key == b"x-request-id":
                given = value.decode("latin-1")
        request_id = given if _REQUEST_ID_RE.fullmatch(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        start = time.perf_counter()
        state["start"] = start
        status = 500
        started = False

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                if self.echo:
                    message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:  # noqa: BLE001 - Starlette re-raises after its 500: already answered and logged
            if not started:
                logger.exception("[%s] unhandled error", request_id)
                response = JSONResponse(
                    _INTERNAL_ERROR,
                    status_code=500,
                )
                await response(scope, receive, send_with_id)  # type: ignore[arg-type]
        finally:
            seconds = time.perf_counter() - start
            route = _ROUTES.get(scope.get("path", ""), "other")
            model = state.get("model", "_none")
            self.observer.request(model, route, status, seconds)
            grant = state.get("grant")
            tier = grant.key.tier if grant is not None and grant.key is not None else "-"
            gpu_s = state.get("gpu_s")
            logger.info(
                "[%s] %s %s model=%s tier=%s -> %d in %.1f ms tokens=%s gpu_s=%s",
                request_id,
                scope.get("method"),
                scope.get("path"),
                model,
                tier,
                status,
                seconds * 1000,
                state.get("tokens", "-"),
                "-" if gpu_s is None else f"{gpu_s:.6f}",
            )


def _error_response(err: ZeroserveError) -> JSONResponse:
    # No X-Request-Id here: _RequestIdMiddleware (or Serve's proxy) adds it, once.
    return JSONResponse(err.body(), status_code=err.status_code, headers=err.headers())


def _json_body(model_cls: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI request body of a route that reads its body itself, as ``model_cls`` validates it.

    The handlers parse the body themselves (size limit, OpenAI-shaped 400s) instead of taking a
    FastAPI body parameter, so the schema is given here; its ``$defs`` are inlined because an
    OpenAPI document resolves ``$ref`` from its own root.
    """
    schema = model_cls.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, list):
            return [inline(item) for item in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            node = {**defs[ref.removeprefix("#/$defs/")], **{k: v for k, v in node.items() if k != "$ref"}}
        return {key: inline(value) for key, value in node.items()}

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


def _nests_deeper(data: Any, limit: int) -> bool:
    """Whether parsed JSON nests deeper than ``limit`` levels (a loop: no recursion to exhaust)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _pydantic_error(err: ValidationError) -> InvalidRequestError:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    param = loc[0] if loc else None
    msg = first["msg"].removeprefix("Value error, ")
    where = ".".join(loc)
    return InvalidRequestError(f"{where}: {msg}" if where else msg, param=param)


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
    """
    if spec.auth.enabled and ledger is None:
        raise ValueError("auth is enabled but no ledger was given")
    fair = FairShare(spec.auth, ledger)
    dispatcher = Dispatcher(spec.auth.aging_s)
    stats = RollingStats()
    obs: Any = FanOut(stats, observer) if observer is not None else stats
    wakes = WakeTracker()
    app = FastAPI(title="zeroserve", version="0.1.0", docs_url="/docs", redoc_url=None)
    admission = Admission(spec.max_inflight_requests, spec.max_inflight_per_model, spec.retry_after_s, obs.inflight)
    app.state.admission = admission

    # -- errors ------------------------------------------------------------------
    @app.exception_handler(ZeroserveError)
    async def _zeroserve_error(request: Request, err: ZeroserveError) -> JSONResponse:
        return _error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(str(err.detail), kind),
            status_code=err.status_code,
            headers=getattr(err, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        request_id = getattr(request.state, "request_id", None)
        logger.exception("[%s] unexpected error", request_id)
        return JSONResponse(
            _INTERNAL_ERROR,
            status_code=500,
        )

    app.add_middleware(_RequestIdMiddleware, observer=obs, echo=echo_request_id)

    # -- helpers -----------------------------------------------------------------
    async def read_json(request: Request) -> dict[str, Any]:
        length = request.headers.get("content-length")
        # isascii: headers are decoded as latin-1, where "\xb2" (superscript two) passes isdigit but not int().
        if length and length.isascii() and length.isdigit() and int(length) > spec.max_body_bytes:
            raise PayloadTooLargeError(f"request body over {spec.max_body_bytes} bytes")
        body = bytearray()
        try:
            # A client that sends its body slowly, or never ends it, must not hold a handler forever.
            async with asyncio.timeout(spec.request_timeout_s):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > spec.max_body_bytes:
                        raise PayloadTooLargeError(f"request body over {spec.max_body_bytes} bytes")
        except TimeoutError:
            raise RequestTimeoutError(
                f"the request body did not arrive within {spec.request_timeout_s:.0f} s", code="body_timeout"
            ) from None
        except ClientDisconnect:
            # Nobody will read this answer; it keeps a client that hung up from counting as a server error.
            raise InvalidRequestError("the client closed the connection before the body was complete") from None
        try:
            # Strict UTF-8 (RFC 8259): json.loads(bytes) would also take UTF-16 and -32, and let
            # encoded surrogates through ("surrogatepass").
            data = json.loads(bytes(body).decode("utf-8"))
            if _SURROGATE_ESCAPE.search(body):
                # Engines cannot encode a lone surrogate (a tokenizer raises); pairs such as emoji pass.
                json.dumps(data, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise InvalidRequestError("the body holds a lone UTF-16 surrogate escape (\\ud800 to \\udfff)") from None
        except (UnicodeDecodeError, ValueError) as err:
            raise InvalidRequestError(f"the body is not valid JSON: {err}") from None
        except RecursionError:
            raise InvalidRequestError("the body is nested too deeply") from None
        if not isinstance(data, dict):
            raise InvalidRequestError("the body must be a JSON object")
        # Counting brackets is cheap, and spares almost every body the walk.
        if body.count(b"[") + body.count(b"{") > _MAX_JSON_DEPTH and _nests_deeper(data, _MAX_JSON_DEPTH):
            raise InvalidRequestError(f"the body nests deeper than {_MAX_JSON_DEPTH} levels")
        return data

    def validate(data: dict[str, Any], model_cls: type[_T]) -> _T:
        try:
            return model_cls.model_validate(data)
        except ValidationError as err:
            raise _pydantic_error(err) from None
        except RecursionError:
            raise InvalidRequestError("the body is nested too deeply") from None

    async def lookup(request: Request, name: str, task: str, wanted: str) -> ModelEntry:
        models = await backend.models()
        entry = models.get(name)
        if entry is None:
            # A model deployed a moment ago: look once more before saying 404. A view under 1 s
            # old will do, so that a flood of made-up names costs no controller call each.
            entry = (await backend.models(max_age_s=1.0)).get(name)
        if entry is None:
            raise ModelNotFoundError(name)
        request.state.model = entry.name
        if entry.state is not ModelState.READY:
            # Not ready in a cached view: look at the live state (timeouts and cold-start counts use it).
            entry = (await backend.models(refresh=True)).get(name) or entry
        if entry.spec is None or entry.state is ModelState.FAILED:
            raise failed_to_start(name, entry.message)
        if entry.spec.task != task:
            raise WrongTaskError(name, entry.spec.task, wanted)
        return entry

    async def resolve(
        request: Request, task: str, wanted: str
    ) -> tuple[dict[str, Any], PassthroughRequest, ModelEntry]:
        """Authenticate, read the body, check its routing fields, find the model (401, 400, 404, 403)."""
        request.state.grant = await fair.authenticate(request.headers.get("authorization"))
        data = await read_json(request)
        head = validate(data, PassthroughRequest)
        return data, head, await lookup(request, head.model, task, wanted)

    async def enter(request: Request, entry: ModelEntry, max_tokens: int | None) -> Grant:
        """Limits, load shedding, then a turn by priority once the model's capacity is in use."""
        assert entry.spec is not None
        grant: Grant = request.state.grant
        await fair.check(grant, entry.name, max_tokens)
        try:
            admission.acquire(entry.name)
        except BaseException:
            fair.release(grant)
            raise
        replicas = max(1, entry.replicas, entry.target_replicas)
        capacity = entry.spec.max_ongoing_requests * replicas
        grant.extra["capacity"] = capacity
        grant.extra["charge_id"] = uuid.uuid4().hex
        # The model's own queue bound (max_queued_requests per replica) holds here, where requests
        # wait: beyond it a request is shed at once instead of waiting out its timeout.
        max_waiting = entry.spec.max_queued_requests * replicas
        try:
            await asyncio.wait_for(
                dispatcher.acquire(entry.name, capacity, grant.priority, grant.predicted_s, max_waiting),
                spec.request_timeout_s,
            )
        except BaseException as err:
            admission.release(entry.name)
            fair.release(grant)
            if isinstance(err, QueueFull | TimeoutError):
                why = f": {err.waiting} requests already wait for it" if isinstance(err, QueueFull) else ""
                raise OverloadedError(
                    f"model '{entry.name}' is saturated{why}; retry later",
                    code="overloaded",
                    retry_after_s=spec.retry_after_s,
                ) from None
            raise
        grant.extra["entered"] = True
        grant.extra["entered_at"] = time.monotonic()
        return grant

    def leave(entry: ModelEntry, grant: Grant) -> None:
        """Give back every slot ``enter`` took; safe to call more than once."""
        if grant.extra.pop("entered", False):
            dispatcher.release(entry.name, grant.extra.get("capacity", 1))
            admission.release(entry.name)
            fair.release(grant)

    async def settle(request: Request, entry: ModelEntry, grant: Grant, gpu_s: float, completion: int = 0) -> None:
        """Charge a request once, under an id the server made (a client's X-Request-Id may repeat)."""
        if grant.extra.get("settled"):
            return
        grant.extra["settled"] = True
        request.state.gpu_s = gpu_s
        try:
            await fair.charge(grant, entry.name, gpu_s, grant.extra["charge_id"], completion)
        except Exception:  # noqa: BLE001 - the answer is out; the ledger must not turn it into an error
            logger.exception("[%s] could not record a charge of %.6f GPU-s", request.state.request_id, gpu_s)

    def stream_response(
        request: Request, entry: ModelEntry, grant: Grant, events: AsyncIterator[str]
    ) -> StreamingResponse:
        """An SSE response that always gives its slots back and charges the request, even when
        the client goes away before the end (then: the wall time so far times the fraction)."""

        def closed() -> None:
            leave(entry, grant)
            if not grant.extra.get("settled"):
                assert entry.spec is not None
                estimate = (time.monotonic() - grant.extra["entered_at"]) * entry.spec.gpu_fraction
                asyncio.get_running_loop().create_task(settle(request, entry, grant, estimate))

        return _GuardedStream(events, closed, media_type="text/event-stream", headers=sse_headers(grant))

    def uses_engine_openai(entry: ModelEntry) -> bool:
        """vLLM models are served by vLLM's own OpenAI layer; the gateway forwards to it."""
        return entry.spec is not None and entry.spec.engine == "vllm"

    def wake_error(entry: ModelEntry, waited: float) -> ModelUnavailableError:
        return ModelUnavailableError(
            f"model '{entry.name}' did not answer within {waited:.0f} s "
            f"(state was {entry.state.value}); it may be waking or may not fit on the "
            "cluster's GPUs right now. Retry later.",
            code="model_not_ready",
            retry_after_s=spec.retry_after_s,
        )

    def failed_to_start(name: str, reason: str) -> ModelUnavailableError:
        return ModelUnavailableError(
            f"model '{name}' failed to start: {reason or 'see serve status'}",
            code="model_failed",
            retry_after_s=spec.retry_after_s * 6,
        )

    async def unless_failed(entry: ModelEntry, answer: asyncio.Future[Any]) -> Any:
        """Await a waking model's answer, but give up as soon as Serve says the model failed.

        A request waiting for a replica is not told when Serve gives up starting one (its
        constructor failed its bounded number of times): without this it would wait out the
        whole cold-start bound for a model that will not come.
        """
        while True:
            done, _ = await asyncio.wait({answer}, timeout=_FAILURE_POLL_S)
            if not done:
                current = (await backend.models(max_age_s=_FAILURE_POLL_S)).get(entry.name)
            if done or answer.done():  # an answer that came during the look is kept
                return answer.result()
            if current is None:
                raise failed_to_start(entry.name, "it was removed from the pool")
            if current.state is ModelState.FAILED:
                raise failed_to_start(entry.name, current.message)

    async def bounded(entry: ModelEntry, coro: Any) -> Any:
        # A cold model's first answer includes its wake-up; a ready one's does not.
        assert entry.spec is not None
        budget = spec.request_timeout_s
        cold = entry.state is not ModelState.READY
        answer: asyncio.Future[Any] | None = None
        if cold:
            budget = entry.spec.cold_start_timeout_s or spec.cold_start_timeout_s
            wakes.begin(entry.name)
            answer = asyncio.ensure_future(coro)  # started here, so it is cancelled here on any exit
        try:
            result = await asyncio.wait_for(coro if answer is None else unless_failed(entry, answer), budget)
        except BaseException as err:
            wakes.abandon(entry.name)
            if isinstance(err, TimeoutError):
                raise wake_error(entry, budget) from None
            raise
        finally:
            if answer is not None and not answer.done():
                answer.cancel()  # its clean-up (the handle call's cancel) runs before the error goes out
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await answer
        if cold and (woke := wakes.end(entry.name)) is not None:
            obs.cold_start(entry.name, woke)
        return result

    def check_caps(req: ChatCompletionRequest | CompletionRequest | PassthroughRequest, entry: ModelEntry) -> None:
        assert entry.spec is not None
        max_tokens = req.requested_max_tokens()
        if max_tokens is not None and max_tokens > entry.spec.max_tokens_cap:
            raise InvalidRequestError(
                f"max_tokens = {max_tokens} is above this model's cap of {entry.spec.max_tokens_cap}",
                param="max_tokens",
            )
        if (req.n or 1) > entry.spec.max_n:
            raise InvalidRequestError(f"n = {req.n} is above this model's cap of {entry.spec.max_n}", param="n")

    def generate_params(req: ChatCompletionRequest | CompletionRequest, entry: ModelEntry) -> GenerateParams:
        assert entry.spec is not None
        check_caps(req, entry)
        max_tokens = req.requested_max_tokens()
        n = req.n or 1
        return GenerateParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            n=n,
            stop=req.stop_list(),
            seed=req.seed,
        )

    def sse_headers(grant: Grant) -> dict[str, str]:
        # The charge is known only at the end of a stream: the headers carry what was left before it.
        return {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **grant.headers(None)}

    def sequences(body: dict[str, Any]) -> int:
        """How many sequences a request generates (n per prompt), for its predicted cost."""
        n = body.get("n") if isinstance(body.get("n"), int) else 1
        prompt = body.get("prompt")
        prompts = len(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], str) else 1
        return max(1, n or 1) * prompts

    def waking_comment(entry: ModelEntry) -> str:
        return f": waiting for model '{entry.name}' to wake\n\n"

    async def passthrough(
        request: Request, entry: ModelEntry, endpoint: str, body: dict[str, Any], head: PassthroughRequest
    ) -> Response:
        """Forward to the engine's own OpenAI layer; keep admission, deadlines, errors, metrics."""
        request_id: str = request.state.request_id
        started: float = request.state.start
        wants_usage = True
        streaming = head.stream
        if streaming:
            # Ask for the usage chunk for metering and metrics; drop it if the client did not.
            raw_options = body.get("stream_options") or {}
            if not isinstance(raw_options, dict):
                raise InvalidRequestError("stream_options must be an object", param="stream_options")
            options = dict(raw_options)
            wants_usage = bool(options.get("include_usage"))
            body = {**body, "stream_options": {**options, "include_usage": True}}
        grant = await enter(request, entry, sequences(body) * (head.requested_max_tokens() or 0) or None)
        stream = backend.openai(entry, endpoint, body)

        async def accepted() -> tuple[str, Any]:
            try:
                return await bounded(entry, anext(stream))  # type: ignore[no-any-return]
            except StopAsyncIteration:
                raise ModelUnavailableError(f"model '{entry.name}' returned nothing", retry_after_s=1) from None

        waking = streaming and entry.state is not ModelState.READY
        if not waking:
            try:
                kind, payload = await accepted()
                if kind == "json":
                    meter = await anext(stream, ("meter", 0.0))
            except BaseException:
                leave(entry, grant)
                raise
            if kind == "json":
                leave(entry, grant)
                usage = payload.get("usage") or {}
                record_tokens(request, entry, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
                await settle(request, entry, grant, float(meter[1]), usage.get("completion_tokens", 0))
                return JSONResponse(payload, headers=grant.headers(float(meter[1])))

        async def events() -> AsyncIterator[str]:
            first_at: float | None = None
            usage: dict[str, int] = {}
            gpu_s = 0.0
            try:
                if waking:
                    async for item in _keepalive(accepted(), spec.keepalive_s, waking_comment(entry)):
                        if isinstance(item, str):
                            yield item
                deadline = asyncio.get_running_loop().time() + spec.request_timeout_s
                while True:
                    # One deadline for the whole stream; asyncio.timeout adds no task per item.
                    async with asyncio.timeout_at(deadline):
                        try:
                            item = await anext(stream)
                        except StopAsyncIteration:
                            break
                    if isinstance(item, tuple):  # the replica's meter reading, last
                        gpu_s = float(item[1])
                        continue
                    if first_at is None:
                        first_at = time.perf_counter()
                        obs.first_token(entry.name, first_at - started)
                    if '"choices":[],' in item and '"usage":' in item:
                        item, usage = _take_usage(item, keep=wants_usage)
                    if item:
                        yield item
                await settle(request, entry, grant, gpu_s, usage.get("completion_tokens", 0))
                if usage:
                    record_tokens(request, entry, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
                    if first_at is not None and usage.get("completion_tokens", 0) > 1:
                        per_token = (time.perf_counter() - first_at) / (usage["completion_tokens"] - 1)
                        obs.per_output_token(entry.name, per_token)
            except Exception as err:  # noqa: BLE001 - in-band: the headers are sent
                yield _stream_error(err, request_id)
                yield "data: [DONE]\n\n"

        return stream_response(request, entry, grant, events())

    def record_tokens(request: Request, entry: ModelEntry, prompt: int, completion: int) -> None:
        request.state.tokens = f"{prompt}+{completion}"
        obs.tokens(entry.name, prompt, completion)

    # -- routes ------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        try:
            models = await asyncio.wait_for(backend.models(), 10)
        except Exception as err:  # noqa: BLE001 - not ready is the answer
            logger.warning("health: model directory unavailable: %s", err)
            return JSONResponse(
                error_body("the gateway cannot reach the Serve controller", "service_unavailable"),
                status_code=503,
                headers={"Retry-After": str(spec.retry_after_s)},
            )
        try:
            capacity = await asyncio.wait_for(backend.gpus(), 10)
        except Exception:  # noqa: BLE001 - placeability unknown, the gateway still serves
            capacity = {}
        return JSONResponse({"status": "ok", "models": placeability(models, capacity)})

    def placeability(models: dict[str, ModelEntry], capacity: dict[str, float]) -> dict[str, dict[str, Any]]:
        """Whether each model could get a replica now: ready, or a node has its fraction free."""
        used = gpus_in_use(models)
        free = max((capacity[n] - used.get(n, 0.0) for n in capacity), default=None)
        out = {}
        for name, e in sorted(models.items()):
            if e.state is ModelState.READY:
                placeable: bool | None = True
            elif e.state is ModelState.FAILED or e.spec is None:
                placeable = False
            else:
                placeable = None if free is None else free + 1e-9 >= e.spec.gpu_fraction
            out[name] = {"state": e.state.value, "placeable": placeable}
        return out

    def model_card(entry: ModelEntry) -> dict[str, Any]:
        s = entry.spec
        return {
            "id": entry.name,
            "object": "model",
            "created": 0,
            "owned_by": "zeroserve",
            "zeroserve": {
                "task": s.task if s else None,
                "engine": s.engine if s else None,
                "state": entry.state.value,
                "replicas": entry.replicas,
                "target_replicas": entry.target_replicas,
                "gpu_fraction": s.gpu_fraction if s else None,
                "max_model_len": s.max_model_len if s else None,
                "max_tokens_cap": s.max_tokens_cap if s else None,
                "nodes": list(entry.nodes),
                "message": entry.message,
            },
        }

    @app.get("/v1/zeroserve/status")
    async def pool_status() -> dict[str, Any]:
        """Models with their state and recent figures, and the pool's GPU occupancy per node."""
        models = await backend.models(refresh=True)
        try:
            capacity = await backend.gpus()
        except Exception as err:  # noqa: BLE001 - occupancy without capacities is still useful
            logger.warning("status: node capacities unavailable: %s", err)
            capacity = {}
        used = gpus_in_use(models)
        rows = []
        for name, entry in sorted(models.items()):
            # In flight and waiting in this gateway replica (one of possibly several).
            load = {"in_flight": admission.per_model[name], "queued": len(dispatcher.waiting.get(name, []))}
            rows.append({**model_card(entry)["zeroserve"], "id": name, **stats.summary(name), **load})
        pool = [
            {
                "node": node,
                "gpus": capacity.get(node),
                "gpus_used": round(used.get(node, 0.0), 4),
                "occupancy": round(used.get(node, 0.0) / capacity[node], 4) if capacity.get(node) else None,
            }
            for node in sorted(set(capacity) | set(used))
        ]
        return {"models": rows, "pool": pool, "time": time.time()}

    @app.get("/v1/usage")
    async def usage(request: Request) -> dict[str, Any]:
        """The calling key's GPU-seconds today by model, what is left, and when it resets."""
        if not fair.enabled:
            raise StarletteHTTPException(404, "usage is kept per API key, and API keys are off on this gateway")
        grant = await fair.authenticate(request.headers.get("authorization"))
        return await fair.usage(grant)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        models = await backend.models(refresh=True)
        return {"object": "list", "data": [model_card(e) for _, e in sorted(models.items())]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        entry = (await backend.models(refresh=True)).get(model)
        if entry is None:
            raise ModelNotFoundError(model)
        return model_card(entry)

    @app.post("/v1/embeddings", openapi_extra=_json_body(EmbeddingRequest))
    async def embeddings(request: Request) -> Any:
        data, head, entry = await resolve(request, "embed", "embeddings")
        if uses_engine_openai(entry):
            return await passthrough(request, entry, "embeddings", data, head)
        req = validate(data, EmbeddingRequest)
        texts = req.texts()
        grant = await enter(request, entry, None)
        try:
            result = await bounded(entry, backend.embed(entry, texts, req.dimensions))
        finally:
            leave(entry, grant)
        items = []
        for i, emb in enumerate(result):
            vector: Any = emb.vector
            if req.encoding_format == "base64":
                vector = base64.b64encode(struct.pack(f"<{len(emb.vector)}f", *emb.vector)).decode()
            items.append({"object": "embedding", "index": i, "embedding": vector})
        tokens = sum(e.num_tokens for e in result)
        record_tokens(request, entry, tokens, 0)
        gpu_s = sum(e.gpu_s for e in result)
        await settle(request, entry, grant, gpu_s)
        body = {
            "object": "list",
            "data": items,
            "model": entry.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return JSONResponse(body, headers=grant.headers(gpu_s))

    async def classify(request: Request) -> Any:
        data, head, entry = await resolve(request, "classify", "classification")
        if uses_engine_openai(entry):
            return await passthrough(request, entry, "classify", data, head)
        req = validate(data, ClassifyRequest)
        grant = await enter(request, entry, None)
        try:
            result = await bounded(entry, backend.classify(entry, req.texts()))
        finally:
            leave(entry, grant)
        tokens = sum(c.num_tokens for c in result)
        record_tokens(request, entry, tokens, 0)
        gpu_s = sum(c.gpu_s for c in result)
        await settle(request, entry, grant, gpu_s)
        body = {
            "id": new_id("classify"),
            "object": "list",
            "created": now(),
            "model": entry.name,
            "data": [
                {"index": i, "label": c.label, "probs": c.probs, "num_classes": len(c.probs)}
                for i, c in enumerate(result)
            ],
            "usage": {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens},
        }
        return JSONResponse(body, headers=grant.headers(gpu_s))

    app.add_api_route("/v1/classify", classify, methods=["POST"], openapi_extra=_json_body(ClassifyRequest))
    app.add_api_route("/classify", classify, methods=["POST"], openapi_extra=_json_body(ClassifyRequest))

    async def first_delta(entry: ModelEntry, stream: AsyncIterator[Delta]) -> Delta:
        """Wait (bounded) until the model accepted the prompt: errors are still HTTP errors."""
        try:
            return await bounded(entry, stream.__anext__())
        except StopAsyncIteration:
            raise ModelUnavailableError(
                f"model '{entry.name}' ended the stream without output", retry_after_s=1
            ) from None

    async def run_generation(
        request: Request,
        req: ChatCompletionRequest | CompletionRequest,
        entry: ModelEntry,
        chat: bool,
    ) -> Response:
        params = generate_params(req, entry)
        if isinstance(req, ChatCompletionRequest):
            prompts: list[Prompt] = [[{"role": m.role, "content": m.text()} for m in req.messages]]
        else:
            prompts = list(req.prompts())
        request_id: str = request.state.request_id
        ident = new_id("chatcmpl" if chat else "cmpl")
        created = now()
        obj = "chat.completion" if chat else "text_completion"
        n = params.n
        grant = await enter(request, entry, (params.max_tokens or 0) * params.n * len(prompts) or None)
        streams = [backend.stream(entry, p, params) for p in prompts]
        waking = req.stream and entry.state is not ModelState.READY
        firsts: list[Delta] = []
        if not waking:
            try:
                firsts = list(await asyncio.gather(*(first_delta(entry, s) for s in streams)))
            except BaseException:
                leave(entry, grant)
                raise
        started: float = request.state.start

        if not req.stream:
            try:
                outputs = await asyncio.wait_for(
                    asyncio.gather(*(collect(s, n) for s in streams)), spec.request_timeout_s
                )
            except TimeoutError:
                raise ModelUnavailableError(
                    f"model '{entry.name}' did not finish within {spec.request_timeout_s:.0f} s",
                    code="timeout",
                    retry_after_s=spec.retry_after_s,
                ) from None
            finally:
                leave(entry, grant)
            prompt_tokens = sum(d.prompt_tokens for d in firsts)
            choices = []
            completion_tokens = 0
            gpu_s = sum(o.gpu_s for o in outputs)
            for p_idx, out in enumerate(outputs):
                texts, reasons, counts = out.texts, out.finish_reasons, out.completion_tokens
                for i in range(n):
                    index = p_idx * n + i
                    completion_tokens += counts[i]
                    if chat:
                        choices.append(
                            {
                                "index": index,
                                "message": {"role": "assistant", "content": texts[i]},
                                "logprobs": None,
                                "finish_reason": reasons[i],
                            }
                        )
                    else:
                        choices.append(
                            {
                                "index": index,
                                "text": texts[i],
                                "logprobs": None,
                                "finish_reason": reasons[i],
                            }
                        )
            record_tokens(request, entry, prompt_tokens, completion_tokens)
            await settle(request, entry, grant, gpu_s, completion_tokens)
            return JSONResponse(
                {
                    "id": ident,
                    "object": obj,
                    "created": created,
                    "model": entry.name,
                    "choices": choices,
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens,
                    },
                },
                headers=grant.headers(gpu_s),
            )

        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
            body: dict[str, Any] = {
                "id": ident,
                "object": chunk_obj,
                "created": created,
                "model": entry.name,
                "choices": choices,
            }
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        def choice(index: int, text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}

        async def events() -> AsyncIterator[str]:
            completion_tokens: Counter[int] = Counter()
            first_at: float | None = None
            gpu_s = 0.0
            nonlocal firsts
            try:
                if waking:
                    gathered = asyncio.gather(*(first_delta(entry, s) for s in streams))
                    async for item in _keepalive(gathered, spec.keepalive_s, waking_comment(entry)):
                        if isinstance(item, str):
                            yield item
                        else:
                            firsts = list(item.value)
                prompt_tokens = sum(d.prompt_tokens for d in firsts)
                if chat:
                    for p_idx in range(len(streams)):
                        for i in range(n):
                            yield chunk([choice(p_idx * n + i, "", None, role=True)])
                merged = _merge(streams)
                deadline = asyncio.get_running_loop().time() + spec.request_timeout_s
                while True:
                    async with asyncio.timeout_at(deadline):
                        try:
                            p_idx, delta = await anext(merged)
                        except StopAsyncIteration:
                            break
                    if delta.index == -2:  # the replica's meter reading, last
                        gpu_s += delta.gpu_s
                        continue
                    index = p_idx * n + delta.index
                    completion_tokens[index] = max(completion_tokens[index], delta.completion_tokens)
                    if delta.text or delta.finish_reason:
                        if first_at is None:
                            first_at = time.perf_counter()
                            obs.first_token(entry.name, first_at - started)
                        yield chunk([choice(index, delta.text, delta.finish_reason)])
                if req.include_usage:
                    total_completion = sum(completion_tokens.values())
                    yield chunk(
                        [],
                        {
                            "prompt_tokens": prompt_tokens,
                            "completion_tokens": total_completion,
                            "total_tokens": prompt_tokens + total_completion,
                        },
                    )
                yield "data: [DONE]\n\n"
                total = sum(completion_tokens.values())
                record_tokens(request, entry, prompt_tokens, total)
                await settle(request, entry, grant, gpu_s, total)
                if first_at is not None and total > 1:
                    obs.per_output_token(entry.name, (time.perf_counter() - first_at) / (total - 1))
            except Exception as err:  # noqa: BLE001 - reported in-band: headers are gone
                yield _stream_error(err, request_id)
                yield "data: [DONE]\n\n"

        return stream_response(request, entry, grant, events())

    async def generation_route(request: Request, chat: bool) -> Response:
        data, head, entry = await resolve(request, "generate", "chat completions" if chat else "completions")
        if uses_engine_openai(entry):
            check_caps(head, entry)
            endpoint = "chat/completions" if chat else "completions"
            return await passthrough(request, entry, endpoint, data, head)
        req: ChatCompletionRequest | CompletionRequest = (
            validate(data, ChatCompletionRequest) if chat else validate(data, CompletionRequest)
        )
        return await run_generation(request, req, entry, chat=chat)

    @app.post("/v1/chat/completions", openapi_extra=_json_body(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        return await generation_route(request, chat=True)

    @app.post("/v1/completions", openapi_extra=_json_body(CompletionRequest))
    async def completions(request: Request) -> Response:
        return await generation_route(request, chat=False)

    return app


@dataclass
class _Result:
    value: Any


async def _keepalive(aw: Any, interval_s: float, comment: str) -> AsyncIterator[Any]:
    """Await ``aw``, yielding an SSE comment every ``interval_s`` meanwhile, then its result.

    A stream to a cold model sends its headers at once and these comments while the model
    wakes, so clients and proxies with idle timeouts do not give up on it.
    """
    task = asyncio.ensure_future(aw)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=interval_s)
            if done:
                yield _Result(task.result())
                return
            yield comment
    finally:
        if not task.done():
            task.cancel()


def _take_usage(item: str, keep: bool) -> tuple[str, dict[str, int]]:
    """Find vLLM's usage chunk among the SSE lines of ``item``; drop it unless ``keep``."""
    usage: dict[str, int] = {}
    kept = []
    for line in item.split("\n\n"):
        if line.startswith("data: {") and '"choices":[],' in line and '"usage":' in line:
            usage = json.loads(line[6:]).get("usage") or {}
            if not keep:
                continue
        if line:
            kept.append(line + "\n\n")
    return "".join(kept), usage


def _stream_error(err: Exception, request_id: str) -> str:
    """An SSE error event for a stream whose headers are already sent."""
    if isinstance(err, ZeroserveError):
        body = err.body()
    elif isinstance(err, TimeoutError):
        body = error_body("the model did not finish in time", "timeout", code="timeout")
    else:
        logger.exception("[%s] stream failed", request_id, exc_info=err)
        body = error_body("the model failed while streaming", "internal_error")
    return f"data: {json.dumps(body)}\n\n"


async def _merge(streams: list[AsyncIterator[Delta]]) -> AsyncIterator[tuple[int, Delta]]:
    """Interleave several streams as their items arrive, tagged with the stream's index."""
    if len(streams) == 1:
        async for d in streams[0]:
            yield 0, d
        return
    queue: asyncio.Queue[tuple[int, Delta] | tuple[int, BaseException] | tuple[int, None]] = asyncio.Queue()

    async def pump(i: int, s: AsyncIterator[Delta]) -> None:
        try:
            async for d in s:
                await queue.put((i, d))
            await queue.put((i, None))
        except BaseException as exc:  # noqa: BLE001 - forwarded
            await queue.put((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    live = len(streams)
    try:
        while live:
            i, item = await queue.get()
            if item is None:
                live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()

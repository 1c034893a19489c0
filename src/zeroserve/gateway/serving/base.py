"""What every model-calling endpoint does first: who calls, what they sent, which model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from zeroserve.errors import InvalidRequestError, ModelNotFoundError, WrongTaskError, model_failed
from zeroserve.gateway.body import read_json, validate
from zeroserve.gateway.lease import Lease
from zeroserve.gateway.middleware import RequestLog, request_log
from zeroserve.gateway.registry import ModelEntry, ModelState
from zeroserve.gateway.sse import GuardedStream, StreamSource, relay
from zeroserve.gateway.state import GatewayState
from zeroserve.gateway.waits import replica_lost
from zeroserve.protocol import PassthroughRequest

__all__ = ["Resolved", "Serving", "check_caps"]


@dataclass
class Resolved:
    """A request that passed authentication, body checks and the model lookup."""

    log: RequestLog
    data: dict[str, Any]
    head: PassthroughRequest
    entry: ModelEntry
    grant: Any  # fair.Grant


class Serving:
    """The shared steps of the model endpoints, over the gateway's state."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state

    async def resolve(self, request: Request, task: str, wanted: str) -> Resolved:
        """Authenticate, read the body, check its routing fields, find the model (401, 400, 404, 400).

        The key is checked before the body is read, and the model looked up before the body
        is validated in full: an unknown model is a 404 whatever else is wrong.
        """
        log = request_log(request)
        grant = await self.state.fair.authenticate(request.headers.get("authorization"))
        if grant.key is not None:
            log.tier = grant.key.tier
        spec = self.state.spec
        data = await read_json(
            request.headers.get("content-length"),
            request.stream(),
            spec.max_body_bytes,
            spec.body_timeout_s,
            self.state.slow,
        )
        head = validate(data, PassthroughRequest)
        entry = await self.lookup(log, head.model, task, wanted)
        return Resolved(log, data, head, entry, grant)

    async def lookup(self, log: RequestLog, name: str, task: str, wanted: str) -> ModelEntry:
        """The model named ``name``, serving ``task``, not failed (404, 400 wrong task, 503)."""
        backend = self.state.backend
        entry = (await backend.models()).get(name)
        if entry is None:
            # A model deployed a moment ago: look once more before saying 404. A view under 1 s
            # old will do, so that a flood of made-up names costs no controller call each.
            entry = (await backend.models(max_age_s=1.0)).get(name)
        if entry is None:
            raise ModelNotFoundError(name)
        log.model = entry.name
        if entry.state is not ModelState.READY:
            # Not ready in a cached view: look at the live state (timeouts and cold-start counts use it).
            entry = (await backend.models(refresh=True)).get(name) or entry
        if entry.spec is None or entry.state is ModelState.FAILED:
            raise model_failed(name, entry.message, self.state.spec.retry_after_s)
        if entry.spec.task != task:
            raise WrongTaskError(name, entry.spec.task, wanted)
        return entry

    def record_tokens(self, log: RequestLog, entry: ModelEntry, prompt: int, completion: int) -> None:
        log.tokens(prompt, completion)
        self.state.obs.tokens(entry.name, prompt, completion)

    def stream_response(self, lease: Lease, source: StreamSource) -> StreamingResponse:
        """``source`` relayed as SSE, in a response that gives its slots back and charges the request
        however it ends, also when the client goes away first (then: the wall time so far x the fraction)."""
        log, spec = lease.log, self.state.spec
        events = relay(
            source,
            model=lease.entry.name,
            started=log.start,
            timeout_s=spec.request_timeout_s,
            obs=self.state.obs,
            request_id=log.request_id,
            lost=lambda: replica_lost(self.state, lease.entry),
        )
        # The charge is known only at the end of a stream: the headers carry what was left before it.
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **lease.headers(None)}
        return GuardedStream(events, lease.close, media_type="text/event-stream", headers=headers)


def check_caps(max_tokens: int | None, n: int | None, entry: ModelEntry) -> None:
    """The model's own caps on output tokens and choices (400 naming the field)."""
    assert entry.spec is not None
    if max_tokens is not None and max_tokens > entry.spec.max_tokens_cap:
        raise InvalidRequestError(
            f"max_tokens = {max_tokens} is above this model's cap of {entry.spec.max_tokens_cap}", param="max_tokens"
        )
    if (n or 1) > entry.spec.max_n:
        raise InvalidRequestError(f"n = {n} is above this model's cap of {entry.spec.max_n}", param="n")

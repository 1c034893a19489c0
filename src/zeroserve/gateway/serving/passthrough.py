"""Requests served by an engine's own OpenAI layer (vLLM): validated here with the same limits
as the native path, forwarded whole, answered as the engine shapes them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, Response

from zeroserve.errors import ModelUnavailableError
from zeroserve.gateway.body import validate
from zeroserve.gateway.lease import Lease, admit
from zeroserve.gateway.registry import ModelState
from zeroserve.gateway.serving.base import Resolved, Serving, check_caps
from zeroserve.gateway.sse import Result, keepalive, waking_comment
from zeroserve.gateway.waits import bounded
from zeroserve.protocol import PASSTHROUGH_REQUESTS, PassthroughChatRequest, PassthroughCompletionRequest
from zeroserve.wire import Meter, OpenAIJson, OpenAIStream, Usage, decode, split_usage

__all__ = ["PassthroughServing"]


class PassthroughServing(Serving):
    """Forward to the engine's own OpenAI layer; keep admission, deadlines, errors and metering."""

    async def forward(self, resolved: Resolved, endpoint: str) -> Response:
        """Validate ``resolved``'s body for ``endpoint``, admit it, and answer with the engine's answer.

        Args:
            resolved: the request, its model and caller.
            endpoint: the OpenAI path under /v1 ("chat/completions", "embeddings", ...).
        """
        entry, head, body = resolved.entry, resolved.head, resolved.data
        req: Any = validate(body, PASSTHROUGH_REQUESTS[endpoint])
        generates = isinstance(req, PassthroughChatRequest | PassthroughCompletionRequest)
        max_tokens = req.requested_max_tokens() if generates else None
        if generates:
            check_caps(max_tokens, req.n, entry)
        wants_usage = True
        # Only generation streams: an embedding answer is one JSON body whatever "stream" says.
        streaming = head.stream and generates
        if streaming:
            # Ask for the usage chunk for metering and metrics; drop it if the client did not.
            options = dict(req.stream_options or {})
            wants_usage = bool(options.get("include_usage"))
            body = {**body, "stream_options": {**options, "include_usage": True}}
        predicted = None
        if generates:  # the output tokens that the budget check prices: max_tokens x n x prompts
            prompts = req.prompt_count() if isinstance(req, PassthroughCompletionRequest) else 1
            predicted = (max_tokens or 0) * (req.n or 1) * prompts or None
        lease = await admit(self.state, resolved.log, resolved.grant, entry, predicted)
        stream = self.state.backend.openai(entry, endpoint, body)
        if streaming and entry.state is not ModelState.READY:
            source = _Source(self, lease, stream, wants_usage, opening=None)
        else:
            try:
                opening = await self._opening(lease, stream)
                if isinstance(opening, OpenAIJson):
                    meter = decode(await anext(stream, Meter(0.0)))
            except BaseException:
                lease.release()
                raise
            if isinstance(opening, OpenAIJson):
                lease.release()
                gpu_s = meter.gpu_s if isinstance(meter, Meter) else 0.0
                usage = opening.body.get("usage") or {}
                completion = usage.get("completion_tokens", 0)
                self.record_tokens(resolved.log, entry, usage.get("prompt_tokens", 0), completion)
                await lease.settle(gpu_s, completion)
                return JSONResponse(opening.body, headers=lease.headers(gpu_s))
            source = _Source(self, lease, stream, wants_usage, opening=opening)
        return self.stream_response(lease, source)

    async def _opening(self, lease: Lease, stream: AsyncIterator[Any]) -> OpenAIJson | OpenAIStream:
        """The engine's first message (bounded: it includes a wake): a whole answer, or the stream's start."""
        try:
            first = decode(await bounded(self.state, lease.entry, anext(stream), lease.grant.priority, lease.log))
        except StopAsyncIteration:
            raise ModelUnavailableError(f"model '{lease.entry.name}' returned nothing", retry_after_s=1) from None
        if not isinstance(first, OpenAIJson | OpenAIStream):
            raise ModelUnavailableError(f"model '{lease.entry.name}' answered out of order", retry_after_s=1)
        return first


class _Source:
    """The SSE of an engine's own OpenAI layer: relayed as it comes, usage taken out as data."""

    def __init__(
        self,
        serving: PassthroughServing,
        lease: Lease,
        stream: AsyncIterator[Any],
        wants_usage: bool,
        opening: OpenAIJson | OpenAIStream | None,
    ) -> None:
        self.serving, self.lease, self.stream, self.wants_usage = serving, lease, stream, wants_usage
        self.opening = opening
        self.usage: Usage | None = None

    async def prologue(self) -> AsyncIterator[str]:
        if self.opening is None:  # the model wakes: headers are out, comments keep the line open
            comment = waking_comment(self.lease.entry.name)
            spec = self.serving.state.spec
            async for item in keepalive(self.serving._opening(self.lease, self.stream), spec.keepalive_s, comment):
                if not isinstance(item, Result):
                    yield item

    async def messages(self) -> AsyncIterator[Any]:
        async for item in self.stream:
            message = decode(item)
            if isinstance(message, str):
                # A version 1 replica leaves vLLM's usage chunk in the text.
                for part in split_usage(message):
                    yield part
            else:
                yield message

    def render(self, message: Any) -> str:
        if isinstance(message, Usage):
            self.usage = message
            return message.line if self.wants_usage else ""
        return message if isinstance(message, str) else ""

    async def epilogue(self, gpu_s: float) -> AsyncIterator[str]:
        usage = self.usage
        await self.lease.settle(gpu_s, usage.completion_tokens if usage else 0)
        if usage is not None:
            self.serving.record_tokens(self.lease.log, self.lease.entry, usage.prompt_tokens, usage.completion_tokens)
        return
        yield  # an async generator with nothing to add after vLLM's own [DONE]

    def completion_tokens(self) -> int:
        return self.usage.completion_tokens if self.usage else 0

"""Chat and text completions on the native path: the gateway samples nothing, it shapes the answer."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from zeroserve.engines.base import collect
from zeroserve.errors import ModelUnavailableError
from zeroserve.gateway.backend import Prompt
from zeroserve.gateway.body import validate
from zeroserve.gateway.lease import Lease, admit
from zeroserve.gateway.openai_format import Completion, usage
from zeroserve.gateway.registry import ModelEntry, ModelState
from zeroserve.gateway.serving.base import Serving, check_caps
from zeroserve.gateway.serving.passthrough import PassthroughServing
from zeroserve.gateway.sse import DONE, Result, keepalive, merge, waking_comment
from zeroserve.gateway.waits import bounded
from zeroserve.protocol import ChatCompletionRequest, CompletionRequest, GenerateParams, new_id, now
from zeroserve.wire import Accepted, Delta, Meter, decode

__all__ = ["GenerateServing"]


class GenerateServing(Serving):
    """``/v1/chat/completions`` and ``/v1/completions``."""

    def __init__(self, passthrough: PassthroughServing) -> None:
        super().__init__(passthrough.state)
        self.passthrough = passthrough

    async def create(self, request: Request, chat: bool) -> Response:
        resolved = await self.resolve(request, "generate", "chat completions" if chat else "completions")
        entry = resolved.entry
        assert entry.spec is not None
        if entry.spec.serves_openai:
            return await self.passthrough.forward(resolved, "chat/completions" if chat else "completions")
        req: ChatCompletionRequest | CompletionRequest = (
            validate(resolved.data, ChatCompletionRequest) if chat else validate(resolved.data, CompletionRequest)
        )
        params = generate_params(req, entry)
        prompts: list[Prompt]
        if isinstance(req, ChatCompletionRequest):
            prompts = [[{"role": m.role, "content": m.text()} for m in req.messages]]
        else:
            prompts = list(req.prompts())
        completion = Completion(new_id("chatcmpl" if chat else "cmpl"), now(), entry.name, chat)
        predicted = (params.max_tokens or 0) * params.n * len(prompts) or None
        lease = await admit(self.state, resolved.log, resolved.grant, entry, predicted)
        streams = [_decoded(self.state.backend.stream(entry, p, params)) for p in prompts]
        firsts: list[Accepted] | None = None
        if not (req.stream and entry.state is not ModelState.READY):
            try:
                firsts = list(await asyncio.gather(*(self._accepted(lease, s) for s in streams)))
            except BaseException:
                lease.release()
                raise
        if not req.stream:
            assert firsts is not None
            return await self._whole(lease, completion, streams, params.n, sum(a.prompt_tokens for a in firsts))
        source = _Source(self, lease, completion, streams, params.n, req.include_usage, firsts)
        return self.stream_response(lease, source)

    async def _accepted(self, lease: Lease, stream: AsyncIterator[Any]) -> Accepted:
        """Wait (bounded) until the model accepted the prompt: its errors are still HTTP errors."""
        entry = lease.entry
        try:
            first = await bounded(self.state, entry, anext(stream), lease.grant.priority, lease.log)
        except StopAsyncIteration:
            raise ModelUnavailableError(
                f"model '{entry.name}' ended the stream without output", retry_after_s=1
            ) from None
        if not isinstance(first, Accepted):
            raise ModelUnavailableError(f"model '{entry.name}' answered out of order", retry_after_s=1)
        return first

    async def _whole(
        self, lease: Lease, completion: Completion, streams: list[AsyncIterator[Any]], n: int, prompt_tokens: int
    ) -> Response:
        entry = lease.entry
        timeout_s = self.state.spec.request_timeout_s
        try:
            outputs = await asyncio.wait_for(asyncio.gather(*(collect(s, n) for s in streams)), timeout_s)
        except TimeoutError:
            raise ModelUnavailableError(
                f"model '{entry.name}' did not finish within {timeout_s:.0f} s",
                code="timeout",
                retry_after_s=self.state.spec.retry_after_s,
            ) from None
        finally:
            lease.release()
        body, completion_tokens = completion.body(outputs, n, prompt_tokens)
        gpu_s = sum(o.gpu_s for o in outputs)
        self.record_tokens(lease.log, entry, prompt_tokens, completion_tokens)
        await lease.settle(gpu_s, completion_tokens)
        return JSONResponse(body, headers=lease.headers(gpu_s))


class _Source:
    """A native stream: role chunks, one chunk per delta, the usage chunk if asked, ``[DONE]``, then the charge."""

    def __init__(
        self,
        serving: GenerateServing,
        lease: Lease,
        completion: Completion,
        streams: list[AsyncIterator[Any]],
        n: int,
        include_usage: bool,
        firsts: list[Accepted] | None,
    ) -> None:
        self.serving, self.lease, self.completion, self.streams = serving, lease, completion, streams
        self.n, self.include_usage, self.firsts = n, include_usage, firsts
        self.tokens: Counter[int] = Counter()

    async def prologue(self) -> AsyncIterator[str]:
        if self.firsts is None:  # the model wakes: headers are out, comments keep the line open
            entry = self.lease.entry
            gathered = asyncio.gather(*(self.serving._accepted(self.lease, s) for s in self.streams))
            async for item in keepalive(gathered, self.serving.state.spec.keepalive_s, waking_comment(entry.name)):
                if isinstance(item, Result):
                    self.firsts = list(item.value)
                else:
                    yield item
        if self.completion.chat:
            for p_idx in range(len(self.streams)):
                for i in range(self.n):
                    yield self.completion.chunk([self.completion.choice(p_idx * self.n + i, "", None, role=True)])

    async def messages(self) -> AsyncIterator[Any]:
        async for p_idx, message in merge(self.streams):
            yield message if isinstance(message, Meter) else (p_idx, message)

    def render(self, message: tuple[int, Delta]) -> str:
        p_idx, delta = message
        index = p_idx * self.n + delta.index
        self.tokens[index] = max(self.tokens[index], delta.completion_tokens)
        if not (delta.text or delta.finish_reason):
            return ""
        return self.completion.chunk([self.completion.choice(index, delta.text, delta.finish_reason)])

    async def epilogue(self, gpu_s: float) -> AsyncIterator[str]:
        assert self.firsts is not None
        prompt_tokens = sum(a.prompt_tokens for a in self.firsts)
        total = self.completion_tokens()
        if self.include_usage:
            yield self.completion.chunk([], usage(prompt_tokens, total))
        # [DONE] first, then the charge: a client that hangs up after the last token still pays it.
        yield DONE
        self.serving.record_tokens(self.lease.log, self.lease.entry, prompt_tokens, total)
        await self.lease.settle(gpu_s, total)

    def completion_tokens(self) -> int:
        return sum(self.tokens.values())


async def _decoded(stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A replica's messages as this version's types (a previous version's replica too)."""
    async for item in stream:
        yield decode(item)


def generate_params(req: ChatCompletionRequest | CompletionRequest, entry: ModelEntry) -> GenerateParams:
    """The engine's sampling parameters, within the model's caps."""
    max_tokens = req.requested_max_tokens()
    check_caps(max_tokens, req.n, entry)
    return GenerateParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        n=req.n or 1,
        stop=req.stop_list(),
        seed=req.seed,
    )

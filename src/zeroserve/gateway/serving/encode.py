"""Embeddings and classification on the native path (the gateway shapes the answer)."""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from zeroserve.engines.base import Classification, Embedding
from zeroserve.gateway.body import validate
from zeroserve.gateway.lease import admit
from zeroserve.gateway.openai_format import classify_body, embeddings_body
from zeroserve.gateway.serving.base import Serving
from zeroserve.gateway.serving.passthrough import PassthroughServing
from zeroserve.gateway.waits import bounded
from zeroserve.protocol import ClassifyRequest, EmbeddingRequest, new_id, now

__all__ = ["EncodeServing"]


class EncodeServing(Serving):
    """``/v1/embeddings`` and ``/v1/classify``: one batched call to the model, one JSON answer."""

    def __init__(self, passthrough: PassthroughServing) -> None:
        super().__init__(passthrough.state)
        self.passthrough = passthrough

    async def embeddings(self, request: Request) -> Response:
        return await self._encode(request, "embed", "embeddings")

    async def classify(self, request: Request) -> Response:
        return await self._encode(request, "classify", "classification")

    async def _encode(self, request: Request, task: str, wanted: str) -> Response:
        resolved = await self.resolve(request, task, wanted)
        entry = resolved.entry
        assert entry.spec is not None
        embed = task == "embed"
        if entry.spec.serves_openai:
            return await self.passthrough.forward(resolved, "embeddings" if embed else "classify")
        req: EmbeddingRequest | ClassifyRequest = (
            validate(resolved.data, EmbeddingRequest) if embed else validate(resolved.data, ClassifyRequest)
        )
        texts = req.texts()
        lease = await admit(self.state, resolved.log, resolved.grant, entry, len(texts))
        backend = self.state.backend
        call: Awaitable[Sequence[Embedding] | Sequence[Classification]] = (
            backend.embed(entry, texts, req.dimensions)
            if isinstance(req, EmbeddingRequest)
            else backend.classify(entry, texts)
        )
        try:
            result: Sequence[Any] = await bounded(self.state, entry, call, lease.grant.priority, lease.log)
        finally:
            lease.release()
        tokens = sum(r.num_tokens for r in result)
        self.record_tokens(resolved.log, entry, tokens, 0)
        gpu_s = sum(r.gpu_s for r in result)
        await lease.settle(gpu_s, len(texts))
        if isinstance(req, EmbeddingRequest):
            body = embeddings_body(entry.name, result, req.encoding_format)
        else:
            body = classify_body(new_id("classify"), now(), entry.name, result)
        return JSONResponse(body, headers=lease.headers(gpu_s))

"""Embeddings and classification on the native path (the gateway shapes the answer)."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, Response

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
        resolved = await self.resolve(request, "embed", "embeddings")
        entry = resolved.entry
        assert entry.spec is not None
        if entry.spec.serves_openai:
            return await self.passthrough.forward(resolved, "embeddings")
        req = validate(resolved.data, EmbeddingRequest)
        lease = await admit(self.state, resolved.log, resolved.grant, entry, None)
        try:
            result = await bounded(self.state, entry, self.state.backend.embed(entry, req.texts(), req.dimensions))
        finally:
            lease.release()
        body = embeddings_body(entry.name, result, req.encoding_format)
        tokens = body["usage"]["prompt_tokens"]
        self.record_tokens(resolved.log, entry, tokens, 0)
        gpu_s = sum(e.gpu_s for e in result)
        await lease.settle(gpu_s)
        return JSONResponse(body, headers=lease.headers(gpu_s))

    async def classify(self, request: Request) -> Response:
        resolved = await self.resolve(request, "classify", "classification")
        entry = resolved.entry
        assert entry.spec is not None
        if entry.spec.serves_openai:
            return await self.passthrough.forward(resolved, "classify")
        req = validate(resolved.data, ClassifyRequest)
        lease = await admit(self.state, resolved.log, resolved.grant, entry, None)
        try:
            result = await bounded(self.state, entry, self.state.backend.classify(entry, req.texts()))
        finally:
            lease.release()
        tokens = sum(c.num_tokens for c in result)
        self.record_tokens(resolved.log, entry, tokens, 0)
        gpu_s = sum(c.gpu_s for c in result)
        await lease.settle(gpu_s)
        return JSONResponse(classify_body(new_id("classify"), now(), entry.name, result), headers=lease.headers(gpu_s))

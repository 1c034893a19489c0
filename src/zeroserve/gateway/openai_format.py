"""The OpenAI response bodies the gateway builds itself (the native path), as pure functions.

Key order and spelling are part of the wire: the golden transcripts in
tests/unit/snapshots pin them.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from zeroserve.engines.base import Classification, Embedding, GenerationResult
from zeroserve.gateway.registry import ModelEntry

__all__ = ["Completion", "classify_body", "embeddings_body", "model_card", "usage"]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def model_card(entry: ModelEntry, last_used: float | None = None) -> dict[str, Any]:
    """A model as ``/v1/models`` lists it, with zeroserve's state and limits (``last_used``: when
    this gateway replica last sent it a request, Unix seconds)."""
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
            "evicting": entry.evicting,
            "yielding_to": entry.yielding_to or None,
            "last_used": last_used,
            "replicas": entry.replicas,
            "target_replicas": entry.target_replicas,
            "gpu_fraction": s.gpu_fraction if s else None,
            "max_model_len": s.max_model_len if s else None,
            "max_tokens_cap": s.max_tokens_cap if s else None,
            "nodes": list(entry.nodes),
            "message": entry.message,
        },
    }


def embeddings_body(model: str, result: Sequence[Embedding], encoding_format: str) -> dict[str, Any]:
    items = []
    for i, emb in enumerate(result):
        vector: Any = emb.vector
        if encoding_format == "base64":
            vector = base64.b64encode(struct.pack(f"<{len(emb.vector)}f", *emb.vector)).decode()
        items.append({"object": "embedding", "index": i, "embedding": vector})
    tokens = sum(e.num_tokens for e in result)
    return {"object": "list", "data": items, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def classify_body(ident: str, created: int, model: str, result: Sequence[Classification]) -> dict[str, Any]:
    tokens = sum(c.num_tokens for c in result)
    return {
        "id": ident,
        "object": "list",
        "created": created,
        "model": model,
        "data": [
            {"index": i, "label": c.label, "probs": c.probs, "num_classes": len(c.probs)} for i, c in enumerate(result)
        ],
        "usage": {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens},
    }


@dataclass(frozen=True)
class Completion:
    """One chat or text completion's identity; builds its whole body and its stream chunks."""

    ident: str
    created: int
    model: str
    chat: bool

    def body(self, outputs: Sequence[GenerationResult], n: int, prompt_tokens: int) -> tuple[dict[str, Any], int]:
        """The whole response, and its completion tokens."""
        choices = []
        completion_tokens = 0
        for p_idx, out in enumerate(outputs):
            for i in range(n):
                completion_tokens += out.completion_tokens[i]
                if self.chat:
                    message = {"role": "assistant", "content": out.texts[i]}
                    choice: dict[str, Any] = {"index": p_idx * n + i, "message": message}
                else:
                    choice = {"index": p_idx * n + i, "text": out.texts[i]}
                choices.append({**choice, "logprobs": None, "finish_reason": out.finish_reasons[i]})
        body = {
            "id": self.ident,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens),
        }
        return body, completion_tokens

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        """One SSE event of the stream."""
        body: dict[str, Any] = {
            "id": self.ident,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def choice(self, index: int, text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        """One choice of a stream chunk."""
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}

"""The engine interface every model runtime implements.

An engine loads one model and serves one task. It knows nothing of Ray or HTTP:
the Serve deployment adds resources, batching and health around it, and a test can
drive it directly.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from zeroserve.protocol import GenerateParams
from zeroserve.wire import Accepted, Delta, Meter, OpenAIJson, OpenAIStream

__all__ = ["Accepted", "Classification", "Delta", "Embedding", "Engine", "GenerationResult", "Meter", "collect"]


@dataclass(frozen=True)
class Embedding:
    vector: list[float]
    num_tokens: int
    gpu_s: float = 0.0  # this input's share of its batch's engine time x GPU fraction


@dataclass(frozen=True)
class Classification:
    label: str
    probs: list[float]
    num_tokens: int
    gpu_s: float = 0.0


@dataclass
class GenerationResult:
    texts: list[str]
    finish_reasons: list[str]
    prompt_tokens: int
    completion_tokens: list[int] = field(default_factory=list)
    gpu_s: float = 0.0


class Engine(abc.ABC):
    """Load a model once; then embed, classify or generate, depending on its task."""

    @abc.abstractmethod
    def load(self) -> None:
        """Load weights and tokenizer; raise if the model cannot be served."""

    async def start(self) -> None:
        """Load, from an event loop (engines with async start-up override this)."""
        self.load()

    @abc.abstractmethod
    def health(self) -> None:
        """Raise if the engine can no longer serve."""

    def embed(self, texts: Sequence[str], dimensions: int | None = None) -> list[Embedding]:
        raise NotImplementedError

    def classify(self, texts: Sequence[str]) -> list[Classification]:
        raise NotImplementedError

    def check_inputs(self, texts: Sequence[str], dimensions: int | None = None) -> None:
        """Raise InvalidRequestError for inputs the model cannot take (too long, or an
        embedding size it cannot produce), before they join a batch with others."""
        return None

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        raise NotImplementedError

    # The forms a Serve replica awaits: an engine in this process runs the model work on a
    # worker thread; an engine elsewhere (the warm tier, deployments/warm.py) awaits a call.
    async def aembed(self, texts: Sequence[str], dimensions: int | None = None) -> list[Embedding]:
        return await asyncio.to_thread(self.embed, texts, dimensions)

    async def aclassify(self, texts: Sequence[str]) -> list[Classification]:
        return await asyncio.to_thread(self.classify, texts)

    # Tokenizing or templating a large input takes long enough to stall the replica's event loop
    # (its other requests, its health check): a worker thread does it.
    async def acheck_inputs(self, texts: Sequence[str], dimensions: int | None = None) -> None:
        await asyncio.to_thread(self.check_inputs, texts, dimensions)

    async def arender_chat(self, messages: Sequence[dict[str, str]]) -> str:
        return await asyncio.to_thread(self.render_chat, messages)

    async def stop(self) -> None:
        """The replica stops (an engine elsewhere is told; one in this process goes with it)."""
        return None

    async def close(self) -> None:
        """Free what the engine holds (its processes, its memory); it serves no more."""
        return None

    async def ahealth(self) -> None:
        self.health()

    async def astats(self) -> dict[str, Any]:
        """What the engine counts (vLLM: the most requests that ran in one step)."""
        return {"peak_running_requests": getattr(self, "peak_running_requests", None)}

    def stream(self, prompt: str, params: GenerateParams) -> AsyncIterator[Accepted | Delta]:
        """:class:`~zeroserve.wire.Accepted` once the prompt passed the checks, then the deltas."""
        raise NotImplementedError

    def openai(self, endpoint: str, body: dict[str, Any]) -> AsyncIterator[OpenAIJson | OpenAIStream | str]:
        """Serve an OpenAI request with the engine's own OpenAI layer (vLLM).

        Yields :class:`~zeroserve.wire.OpenAIJson` once, or :class:`~zeroserve.wire.OpenAIStream`
        followed by the ``data: ...`` lines of a stream.
        """
        raise NotImplementedError


async def collect(messages: AsyncIterator[Any], n: int) -> GenerationResult:
    """Join a generation's messages (:class:`Accepted`, deltas, :class:`Meter`) into whole choices."""
    texts = [""] * n
    reasons = ["length"] * n
    completion = [0] * n
    prompt_tokens = 0
    gpu_s = 0.0
    async for d in messages:
        if isinstance(d, Accepted):
            prompt_tokens = d.prompt_tokens
            continue
        if isinstance(d, Meter):
            gpu_s += d.gpu_s
            continue
        texts[d.index] += d.text
        completion[d.index] = max(completion[d.index], d.completion_tokens)
        if d.finish_reason is not None:
            reasons[d.index] = d.finish_reason
    return GenerationResult(texts, reasons, prompt_tokens, completion, gpu_s)

"""What the gateway app needs from the serving system, as an interface.

The Serve implementation (``deployments.gateway.ServeBackend``) reaches model
applications through ``DeploymentHandle``s; tests can substitute another one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from zeroserve.engines.base import Classification, Embedding
from zeroserve.gateway.registry import ModelEntry
from zeroserve.protocol import GenerateParams

__all__ = ["Backend", "Prompt"]

Prompt = str | list[dict[str, str]]  # a completion prompt, or chat messages


class Backend(Protocol):
    async def models(self, refresh: bool = False, max_age_s: float | None = None) -> dict[str, ModelEntry]:
        """Every configured model with its state, without waking any.

        Args:
            refresh: read the live state now.
            max_age_s: accept a view this old (overrides ``refresh``).
        """
        ...

    async def embed(self, entry: ModelEntry, texts: Sequence[str], dimensions: int | None) -> list[Embedding]: ...

    async def classify(self, entry: ModelEntry, texts: Sequence[str]) -> list[Classification]: ...

    def stream(self, entry: ModelEntry, prompt: Prompt, params: GenerateParams) -> AsyncIterator[Any]:
        """A generation's messages (:mod:`zeroserve.wire`, any version the gateway decodes):
        :class:`~zeroserve.wire.Accepted` once the prompt passed the model's checks, the
        :class:`~zeroserve.wire.Delta` pieces, then a :class:`~zeroserve.wire.Meter` reading."""
        ...

    async def gpus(self) -> dict[str, float]:
        """GPUs per live node (node id to count), for the pool's occupancy."""
        ...

    async def request_yield(self, model: str, victims: Sequence[str]) -> list[str]:
        """Ask ``victims`` to yield their slices to ``model`` (their autoscaling policies decide
        when they are idle); the ones asked now: none when room is already being made for ``model``."""
        ...

    def openai(self, entry: ModelEntry, endpoint: str, body: dict[str, Any]) -> AsyncIterator[Any]:
        """Forward an OpenAI request to the engine's own OpenAI layer (vLLM models).

        Yields :mod:`zeroserve.wire` messages: ``OpenAIJson`` once, or ``OpenAIStream`` and then
        ``data:`` lines (``str``) and a ``Usage``; then a ``Meter`` reading.
        """
        ...

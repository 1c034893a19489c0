"""Engines: model runtimes with no Ray in them, driven by the Serve deployments."""

from zeroserve.engines.base import (
    Classification,
    Delta,
    Embedding,
    Engine,
    GenerationResult,
    collect,
)

__all__ = [
    "Classification",
    "Delta",
    "Embedding",
    "Engine",
    "GenerationResult",
    "collect",
    "create_engine",
]


def create_engine(spec: object) -> Engine:
    """Build the engine a :class:`~zeroserve.config.ModelSpec` names (imports lazily)."""
    engine = getattr(spec, "engine", None)
    if engine == "transformers":
        from zeroserve.engines.transformers_engine import TransformersEngine

        return TransformersEngine(spec)  # type: ignore[arg-type]
    if engine == "vllm":
        from zeroserve.engines.vllm_engine import VLLMEngine  # type: ignore[import-not-found]

        return VLLMEngine(spec)  # type: ignore[no-any-return]
    raise ValueError(f"unknown engine {engine!r}")

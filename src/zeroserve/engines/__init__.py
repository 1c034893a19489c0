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


def create_engine(spec: object, name: str | None = None) -> Engine:
    """Build the engine a :class:`~zeroserve.config.ModelSpec` names (imports lazily).

    Args:
        spec: the model's spec.
        name: the model's API name (vLLM serves under it).
    """
    engine = getattr(spec, "engine", None)
    if engine == "transformers":
        from zeroserve.engines.transformers_engine import TransformersEngine

        return TransformersEngine(spec)  # type: ignore[arg-type]
    if engine == "vllm":
        from zeroserve.engines.vllm_engine import VLLMEngine

        return VLLMEngine(spec, name)  # type: ignore[arg-type]
    raise ValueError(f"unknown engine {engine!r}")

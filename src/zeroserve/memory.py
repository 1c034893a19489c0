"""GPU memory arithmetic: what a model may use, from its fraction of a card.

Ray's ``num_gpus`` fraction is a scheduling label; these functions turn it into limits the
engines enforce. Pure functions of plain numbers, unit-tested.
"""

from __future__ import annotations

import math

from zeroserve.config import ConfigError

__all__ = ["CUDA_CONTEXT_BYTES", "GIB", "vllm_memory_utilization"]

GIB = 1024**3
# What a CUDA process holds outside torch's allocator (context, cuBLAS/cuDNN workspaces).
# Measured on an H100 with torch 2.11 + CUDA 13: nvidia-smi showed 2298 MiB per process
# against 1.05 GiB reserved by torch, so about 1.2 GiB.
CUDA_CONTEXT_BYTES = int(1.25 * GIB)


def vllm_memory_utilization(
    gpu_fraction: float,
    total_bytes: int,
    override: float | None = None,
    context_bytes: int = CUDA_CONTEXT_BYTES,
    model: str = "model",
) -> float:
    """vLLM's ``gpu_memory_utilization`` for a model holding ``gpu_fraction`` of a card.

    vLLM checks at start-up that this fraction of the *whole* card is free. With four
    engines at 0.25 each, the fourth finds less than 0.25 free (every process also holds
    a CUDA context outside its budget) and refuses to start: the budget is therefore the
    share minus one context.

    Args:
        gpu_fraction: the model's share of one GPU, (0, 1].
        total_bytes: the card's memory.
        override: an explicit ``gpu_memory_utilization`` from the config (checked).
        context_bytes: memory a process holds outside the engine's budget.

    Raises:
        ConfigError: the override exceeds the share, or the share leaves no room.
    """
    if override is not None:
        if override > gpu_fraction:
            raise ConfigError(
                f"model '{model}': vllm.gpu_memory_utilization = {override} is above its gpu_fraction {gpu_fraction}"
            )
        return override
    budget = gpu_fraction - context_bytes / total_bytes
    share_gb = gpu_fraction * total_bytes / 1e9
    if budget * total_bytes < 0.5 * GIB:
        raise ConfigError(
            f"model '{model}': its {gpu_fraction:g} share of a {total_bytes / 1e9:.1f} GB GPU "
            f"is {share_gb:.1f} GB, which leaves under 0.5 GiB for vLLM after the "
            f"{context_bytes / GIB:.2f} GiB CUDA context"
        )
    # Round down: four rounded-up budgets could add up to more than the card.
    return math.floor(budget * 10_000) / 10_000

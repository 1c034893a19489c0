"""Will my models fit, and where? Memory estimates and a packing onto GPUs, before deploying.

Pure functions of plain data (model specs, safetensors headers, config.json, GPU sizes),
so they are unit- and property-tested without Ray or a GPU. ``zeroserve plan`` prints
the result.

The estimate of one replica's GPU memory:

- **weights**: the tensors' sizes read from the safetensors headers (no weights loaded),
  converted to the configured dtype; or the spec's ``weights_gb`` when the files are not
  on this machine;
- **KV cache** (LLMs): ``max_model_len × max_ongoing_requests × 2 × layers × kv_heads ×
  head_dim × dtype bytes``, from config.json;
- **activations**: 10 % of the weights, plus for embedders and classifiers one batch of
  ``max_batch_size × context × hidden × 4 bytes × 4`` (hidden states, attention, MLP);
- **CUDA context**: 1.25 GiB per process (measured on an H100).

A model fits its share when the estimate is at most ``gpu_fraction × GPU memory``. Shares
are then packed onto the cluster's GPUs (sum of fractions ≤ 1 per GPU), one replica per
model at least: a model at zero still needs room when it wakes.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zeroserve.config import ConfigError, ModelSpec, resolve_model_source
from zeroserve.memory import CUDA_CONTEXT_BYTES

__all__ = [
    "GPU",
    "GPU_MEMORY_GB",
    "Estimate",
    "Placement",
    "estimate",
    "parse_gpus",
    "pack",
    "first_fit",
    "read_safetensors_bytes",
]

GB = 1e9
# Marketing sizes in GB (10^9 bytes), as the cards are named.
GPU_MEMORY_GB = {
    "T4": 16,
    "L4": 24,
    "A10G": 24,
    "L40S": 48,
    "A100-40GB": 40,
    "A100-80GB": 80,
    "H100-80GB": 80,
    "H100": 80,
    "H200": 141,
    "B200": 180,
}
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
}


@dataclass(frozen=True)
class GPU:
    """One GPU of the cluster."""

    name: str  # e.g. "worker-0/gpu-1"
    kind: str  # e.g. "A100-80GB"
    memory_bytes: int


def parse_gpus(text: str) -> list[GPU]:
    """``4xA100-80GB`` or ``2xA100-80GB,1xL4`` or ``1x24GB`` into GPUs.

    Raises:
        ConfigError: an unknown card or a malformed item, naming it.
    """
    gpus: list[GPU] = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(\d+)\s*[xX]\s*([A-Za-z0-9-]+)", item)
        if not m:
            raise ConfigError(f"--gpus item {item!r}: expected COUNTxKIND, e.g. 4xA100-80GB")
        count, kind = int(m.group(1)), m.group(2)
        size = re.fullmatch(r"(\d+(?:\.\d+)?)GB", kind)
        if size:
            gb = float(size.group(1))
        elif kind in GPU_MEMORY_GB:
            gb = GPU_MEMORY_GB[kind]
        else:
            raise ConfigError(f"--gpus item {item!r}: unknown GPU {kind!r}; known: {', '.join(GPU_MEMORY_GB)}")
        start = len(gpus)
        gpus += [GPU(f"gpu-{start + i}", kind, int(gb * GB)) for i in range(count)]
    if not gpus:
        raise ConfigError("no GPUs given")
    return gpus


# -- estimates ---------------------------------------------------------------------------
def tensors_bytes(tensors: Sequence[tuple[str, Sequence[int]]], dtype: str = "auto") -> int:
    """Bytes of (safetensors dtype, shape) pairs, float tensors counted in the load ``dtype``."""
    target = DTYPE_BYTES.get(dtype)
    total = 0
    for st_dtype, shape in tensors:
        size = DTYPE_BYTES.get(st_dtype, 4)
        if target and st_dtype in ("F32", "F16", "BF16", "F64"):
            size = target
        total += (math.prod(shape) if shape else 1) * size
    return total


def read_safetensors_bytes(folder: Path, dtype: str = "auto") -> int | None:
    """Bytes of all tensors in a folder's safetensors files, from their headers only.

    Args:
        dtype: the dtype the engine will load in; floating tensors are counted at its size.
    """
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    tensors: list[tuple[str, Sequence[int]]] = []
    for path in files:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        tensors += [(i["dtype"], i["shape"]) for name, i in header.items() if name != "__metadata__"]
    return tensors_bytes(tensors, dtype)


def hub_safetensors_bytes(repo_id: str, dtype: str = "auto") -> tuple[int, dict[str, Any]] | None:
    """Weights of a hub model from its safetensors headers (HTTP range reads, no weights
    downloaded) and its config.json, where ``ZEROSERVE_ALLOW_HUB_DOWNLOAD=1`` allows the network.
    """
    from zeroserve.settings import get_settings

    if not get_settings().allow_hub_download:
        return None
    try:
        from huggingface_hub import get_safetensors_metadata, hf_hub_download

        meta = get_safetensors_metadata(repo_id)
        tensors = [(t.dtype, t.shape) for f in meta.files_metadata.values() for t in f.tensors.values()]
        config = json.loads(Path(hf_hub_download(repo_id, "config.json")).read_text())
    except Exception:  # noqa: BLE001 - no network or no safetensors: fall back to the spec's hints
        return None
    return tensors_bytes(tensors, dtype), config


@dataclass(frozen=True)
class Estimate:
    """One replica's estimated GPU memory, by part (bytes)."""

    model: str
    weights: int
    kv_cache: int
    activations: int
    context: int
    source: str  # where the weights figure came from
    notes: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.context


def _load_config(folder: Path | None) -> dict[str, Any]:
    if folder is None or not (folder / "config.json").is_file():
        return {}
    return dict(json.loads((folder / "config.json").read_text()))


def _dtype_bytes(spec: ModelSpec, config: dict[str, Any]) -> int:
    if spec.dtype != "auto":
        return DTYPE_BYTES[spec.dtype]
    # On GPUs "auto" is the checkpoint's dtype: 2 bytes for half-precision checkpoints.
    stored = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    return DTYPE_BYTES.get(stored, 4)


def _local_folder(spec: ModelSpec) -> Path | None:
    if spec.is_local:
        return Path(resolve_model_source(spec))
    try:  # a hub id already in the local cache: read its files, no download
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec.model, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or no huggingface_hub): use the spec's hint
        return None


def estimate(name: str, spec: ModelSpec, folder: Path | None = None) -> Estimate:
    """Estimate one replica's GPU memory for a model spec.

    Args:
        name: the model's name (for messages).
        spec: its spec.
        folder: the model folder, when known (default: the spec's local path or HF cache).

    Raises:
        ConfigError: neither the model's files nor ``weights_gb`` are available.
    """
    folder = folder if folder is not None else _local_folder(spec)
    config = _load_config(folder)
    nbytes = _dtype_bytes(spec, config)
    notes: list[str] = []
    weights = read_safetensors_bytes(folder, _dtype_name(nbytes)) if folder is not None else None
    source = "headers"
    if weights is None and not spec.is_local:
        remote = hub_safetensors_bytes(spec.model, spec.dtype)
        if remote is not None:
            weights, config = remote
            nbytes = _dtype_bytes(spec, config)
            source = "hub headers"
    if weights is None:
        if spec.weights_gb is None:
            raise ConfigError(
                f"model '{name}': cannot estimate its memory: the weights of {spec.model!r} are not "
                "on this machine (local path or Hugging Face cache) and the spec has no weights_gb"
            )
        weights = int(spec.weights_gb * GB)
        source = "weights_gb"
    text = config.get("text_config", config)
    hidden = int(text.get("hidden_size", 0) or 0)
    ctx = spec.max_model_len or int(text.get("max_position_embeddings", 2048) or 2048)
    if spec.task == "generate" and not spec.max_model_len and not config:
        notes.append("no max_model_len: 2048 assumed")
    kv = 0
    if spec.task == "generate":
        layers = int(text.get("num_hidden_layers", 0) or 0)
        heads = int(text.get("num_attention_heads", 0) or 0)
        kv_heads = int(text.get("num_key_value_heads", heads) or heads)
        head_dim = int(text.get("head_dim", 0) or (hidden // heads if heads else 0))
        per_token = 2 * layers * kv_heads * head_dim * nbytes if layers and kv_heads and head_dim else 0
        per_token = per_token or (spec.kv_bytes_per_token or 0)
        if per_token:
            kv = per_token * ctx * spec.max_ongoing_requests
        else:
            notes.append("no config.json and no kv_bytes_per_token: KV cache not counted")
        activations = int(0.1 * weights)
    else:
        batch = spec.max_batch_size
        activations = int(0.1 * weights) + batch * ctx * max(hidden, 1) * 4 * 4
    return Estimate(name, weights, kv, activations, CUDA_CONTEXT_BYTES, source, tuple(notes))


def _dtype_name(nbytes: int) -> str:
    return {4: "float32", 2: "bfloat16", 8: "float64"}.get(nbytes, "auto")


# -- packing -----------------------------------------------------------------------------
@dataclass
class Placement:
    """Replicas (model name, fraction) on each GPU; ``unplaced`` what did not fit."""

    gpus: list[GPU]
    assigned: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    unplaced: list[tuple[str, float]] = field(default_factory=list)

    def used(self, gpu: str) -> float:
        return sum(f for _, f in self.assigned.get(gpu, []))

    @property
    def ok(self) -> bool:
        return not self.unplaced

    @property
    def gpus_used(self) -> int:
        return sum(1 for g in self.gpus if self.assigned.get(g.name))


_EPS = 1e-9


def _fits(gpu: GPU, used: float, fraction: float, need: int) -> bool:
    return used + fraction <= 1.0 + _EPS and need <= fraction * gpu.memory_bytes + _EPS


def first_fit(items: Sequence[tuple[str, float, int]], gpus: Sequence[GPU]) -> Placement:
    """Place each (name, fraction, need_bytes) on the first GPU with room, in the given order."""
    placement = Placement(list(gpus), {g.name: [] for g in gpus})
    for name, fraction, need in items:
        for gpu in gpus:
            if _fits(gpu, placement.used(gpu.name), fraction, need):
                placement.assigned[gpu.name].append((name, fraction))
                break
        else:
            placement.unplaced.append((name, fraction))
    return placement


def pack(items: Sequence[tuple[str, float, int]], gpus: Sequence[GPU]) -> Placement:
    """Pack replicas onto GPUs: first-fit decreasing, then first-fit in the given order.

    First-fit decreasing uses the fewest GPUs on most inputs; it is not always at least as
    good as a plain first-fit, so that one is tried too: whenever a simple greedy packing
    exists, this finds one. GPUs are tried smallest first, so large cards stay free for
    models that need them.
    """
    ordered_gpus = sorted(gpus, key=lambda g: (g.memory_bytes, g.name))
    best = first_fit(sorted(items, key=lambda i: (-i[1], -i[2], i[0])), ordered_gpus)
    if best.ok:
        return best
    plain = first_fit(items, list(gpus))
    return plain if plain.ok or len(plain.unplaced) < len(best.unplaced) else best


# -- clusters ----------------------------------------------------------------------------
# GPU instances of the cloud providers that cluster.yaml files name (count, card).
INSTANCE_GPUS = {
    "p4d.24xlarge": (8, "A100-40GB"),
    "p4de.24xlarge": (8, "A100-80GB"),
    "p5.48xlarge": (8, "H100-80GB"),
    "g5.xlarge": (1, "A10G"),
    "g5.2xlarge": (1, "A10G"),
    "g5.12xlarge": (4, "A10G"),
    "g6.xlarge": (1, "L4"),
    "g6.12xlarge": (4, "L4"),
    "a2-ultragpu-1g": (1, "A100-80GB"),
    "a2-highgpu-1g": (1, "A100-40GB"),
}


def gpus_from_cluster(config: dict[str, Any]) -> list[GPU]:
    """Every GPU a Ray cluster-launcher config can scale to (``max_workers`` of each type).

    The card comes from the instance type (:data:`INSTANCE_GPUS`); the count from the node
    type's ``resources.GPU`` when given.

    Raises:
        ConfigError: a GPU node type whose card is unknown.
    """
    gpus: list[GPU] = []
    for type_name, node in (config.get("available_node_types") or {}).items():
        instance = str(
            (node.get("node_config") or {}).get("InstanceType")
            or (node.get("node_config") or {}).get("machineType")
            or ""
        )
        declared = int((node.get("resources") or {}).get("GPU", 0))
        known = INSTANCE_GPUS.get(instance)
        if known is None:
            if declared:
                raise ConfigError(
                    f"cluster node type {type_name!r}: {declared} GPU(s) on instance {instance!r}, whose "
                    f"card zeroserve does not know; use --gpus COUNTxKIND instead"
                )
            continue
        per_node, kind = known
        count = declared or per_node
        nodes = int(node.get("max_workers", node.get("min_workers", 0)) or 0)
        if type_name == config.get("head_node_type"):
            nodes = max(nodes, 1)
        for n in range(nodes):
            gpus += [GPU(f"{type_name}-{n}/gpu-{i}", kind, int(GPU_MEMORY_GB[kind] * GB)) for i in range(count)]
    return gpus


@dataclass
class PlanResult:
    estimates: dict[str, Estimate]
    placement: Placement
    errors: list[str]
    warnings: list[str]
    largest_bytes: int = 0  # the largest card's memory: each model's share is of that

    @property
    def ok(self) -> bool:
        return not self.errors

    def share_bytes(self, spec: ModelSpec) -> float:
        """A model's share: its fraction of the largest card."""
        return spec.gpu_fraction * self.largest_bytes


def plan(models: dict[str, ModelSpec], gpus: Sequence[GPU], folders: dict[str, Path] | None = None) -> PlanResult:
    """Estimate every model, check each against its share, and pack the shares.

    A model must fit its share on the smallest card it may land on; the packer only uses
    cards where it fits.
    """
    errors: list[str] = []
    warnings: list[str] = []
    estimates: dict[str, Estimate] = {}
    pinned: list[tuple[str, float, int]] = []
    others: list[tuple[str, float, int]] = []
    largest = max((g.memory_bytes for g in gpus), default=0)
    for name, spec in models.items():
        try:
            est = estimate(name, spec, (folders or {}).get(name))
        except ConfigError as err:
            errors.append(str(err))
            continue
        estimates[name] = est
        need = est.total
        share = spec.gpu_fraction * largest
        if need > share:
            errors.append(
                f"model '{name}' needs {need / GB:.1f} GB but its {spec.gpu_fraction:g} share of a "
                f"{largest / GB:.0f} GB GPU is {share / GB:.1f} GB"
            )
            continue
        if need < 0.4 * share:
            suggested = max(0.05, math.ceil(need / largest / 0.05) * 0.05)
            warnings.append(
                f"model '{name}' needs about {need / GB:.1f} GB of its {share / GB:.1f} GB share; "
                f"gpu_fraction {suggested:.2f} would do"
            )
        replicas = max(spec.autoscaling.min_replicas, 1)
        for r in range(replicas):
            (pinned if spec.never_yields else others).append(
                (f"{name}#{r}" if replicas > 1 else name, spec.gpu_fraction, need)
            )
    # Pinned models are always awake: they must fit together. Every other model must fit on some
    # GPU next to them; together they may hold more than the GPUs (the pool: idle models yield).
    placement = pack(pinned + others, gpus)
    held_placement = pack(pinned, gpus)
    for name, fraction in held_placement.unplaced:
        errors.append(f"pinned model '{name}' ({fraction:g} GPU) does not fit: pinned models alone fill the GPUs")
    for name, fraction, need in others:
        if not any(_fits(g, held_placement.used(g.name), fraction, need) for g in gpus):
            errors.append(
                f"model '{name}' ({fraction:g} GPU) does not fit: no GPU has room for it next to the pinned models"
            )
    if placement.unplaced and not errors:
        awake = len(pinned) + len(others) - len(placement.unplaced)
        names = ", ".join(n for n, _, _ in pinned) or "none"
        warnings.append(
            f"{len(pinned) + len(others)} models, {awake} slices: at most {awake} awake at once; "
            f"pinned: {names} (the others wake when an idle model yields its slice)"
        )
    return PlanResult(estimates, placement, errors, warnings, largest)

"""The estimator and the packer as pure functions, with hand-computed cases and properties."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zeroserve.config import ConfigError, ModelSpec
from zeroserve.memory import CUDA_CONTEXT_BYTES
from zeroserve.plan import GB, GPU, estimate, first_fit, pack, parse_gpus, plan, read_safetensors_bytes


def _write_safetensors(folder: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    header = {name: {"dtype": dt, "shape": shape, "data_offsets": [0, 0]} for name, (dt, shape) in tensors.items()}
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)


def test_weights_come_from_headers_in_the_load_dtype(tmp_path: Path) -> None:
    _write_safetensors(tmp_path, {"a": ("F32", [1000, 10]), "b": ("BF16", [10]), "ids": ("I64", [4])})
    assert read_safetensors_bytes(tmp_path) == 1000 * 10 * 4 + 10 * 2 + 4 * 8
    # Loaded in bfloat16, float tensors count 2 bytes; integer tensors keep their size.
    assert read_safetensors_bytes(tmp_path, "bfloat16") == 1000 * 10 * 2 + 10 * 2 + 4 * 8


def test_llm_estimate_by_hand(tmp_path: Path) -> None:
    _write_safetensors(tmp_path, {"w": ("BF16", [1_000_000])})
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "hidden_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "torch_dtype": "bfloat16",
                "max_position_embeddings": 4096,
            }
        )
    )
    spec = ModelSpec(task="generate", model=str(tmp_path), max_model_len=1000, max_ongoing_requests=3)
    est = estimate("m", spec)
    assert est.weights == 2_000_000
    # 2 (K, V) x 2 layers x 2 KV heads x 32 head_dim x 2 bytes = 512 bytes per token
    assert est.kv_cache == 512 * 1000 * 3
    assert est.activations == 200_000
    assert est.total == 2_000_000 + 1_536_000 + 200_000 + CUDA_CONTEXT_BYTES


def test_hub_model_without_files_needs_a_hint() -> None:
    spec = ModelSpec(task="generate", model="org/not-cached-anywhere")
    with pytest.raises(ConfigError, match="model 'm': cannot estimate .* no weights_gb"):
        estimate("m", spec)
    hinted = ModelSpec(
        task="generate",
        model="org/not-cached-anywhere",
        weights_gb=3.0,
        kv_bytes_per_token=1000,
        max_model_len=100,
        max_ongoing_requests=2,
    )
    est = estimate("m", hinted)
    assert (est.weights, est.kv_cache, est.source) == (3_000_000_000, 200_000, "weights_gb")


def test_parse_gpus() -> None:
    gpus = parse_gpus("2xA100-80GB, 1x24GB")
    assert [(g.kind, g.memory_bytes) for g in gpus] == [("A100-80GB", 80_000_000_000)] * 2 + [("24GB", 24_000_000_000)]
    with pytest.raises(ConfigError, match="unknown GPU 'Z9'"):
        parse_gpus("1xZ9")


def _gpus(n: int, gb: float = 80) -> list[GPU]:
    return [GPU(f"g{i}", "x", int(gb * GB)) for i in range(n)]


def test_packing_by_hand() -> None:
    items = [("a", 0.5, 1), ("b", 0.5, 1), ("c", 0.25, 1), ("d", 0.75, 1)]
    placement = pack(items, _gpus(2))
    assert placement.ok and placement.gpus_used == 2
    assert sorted(placement.used(g) for g in ("g0", "g1")) == [1.0, 1.0]
    assert not pack([("a", 0.6, 1), ("b", 0.6, 1)], _gpus(1)).ok


def test_a_model_goes_only_where_its_share_holds_it() -> None:
    small, big = GPU("small", "L4", int(24 * GB)), GPU("big", "A100", int(80 * GB))
    placement = pack([("llm", 0.5, int(30 * GB)), ("emb", 0.5, int(1 * GB))], [small, big])
    assert placement.assigned["big"] == [("llm", 0.5)] and placement.assigned["small"] == [("emb", 0.5)]


def test_plan_refuses_with_need_and_budget() -> None:
    spec = ModelSpec(task="generate", model="org/x", weights_gb=30, gpu_fraction=0.25)
    result = plan({"qwen": spec}, parse_gpus("1xA100-80GB"))
    assert not result.ok
    # 30 GB weights + 3 GB activations (10 %) + 1.34 GB CUDA context (1.25 GiB)
    assert result.errors[0].startswith("model 'qwen' needs 34.3 GB")
    assert "but its 0.25 share of a 80 GB GPU is 20.0 GB" in result.errors[0]


def test_plan_accepts_more_models_than_slices_and_says_so() -> None:
    tiny = ModelSpec(task="embed", model="org/e", weights_gb=0.1, gpu_fraction=0.5)
    result = plan({"a": tiny, "b": tiny, "c": tiny}, parse_gpus("1xA100-80GB"))
    assert result.ok, result.errors
    assert any(w.startswith("3 models, 2 slices: at most 2 awake at once; pinned: ") for w in result.warnings)
    assert any("gpu_fraction 0.05 would do" in w for w in result.warnings)


def test_plan_refuses_pinned_models_that_do_not_fit_together_and_a_model_with_no_room() -> None:
    tiny = ModelSpec(task="embed", model="org/e", weights_gb=0.1, gpu_fraction=0.5)
    pinned = ModelSpec.model_validate({**tiny.model_dump(), "pinned": True})
    result = plan({"a": pinned, "b": pinned, "c": pinned}, parse_gpus("1xA100-80GB"))
    assert not result.ok and "pinned model 'c' (0.5 GPU) does not fit" in result.errors[0]
    held = ModelSpec.model_validate({**tiny.model_dump(), "autoscaling": {"min_replicas": 1, "max_replicas": 1}})
    whole = ModelSpec.model_validate({**tiny.model_dump(), "gpu_fraction": 0.75})
    result = plan({"a": held, "b": whole}, parse_gpus("1xA100-80GB"))
    assert not result.ok and "model 'b' (0.75 GPU) does not fit: no GPU has room" in result.errors[0]


items_strategy = st.lists(
    st.tuples(st.sampled_from([0.1, 0.125, 0.2, 0.25, 0.3, 0.5, 0.75, 1.0]), st.integers(1, 60)),
    min_size=1,
    max_size=24,
)
gpus_strategy = st.lists(st.sampled_from([24, 40, 80]), min_size=1, max_size=6)


@settings(max_examples=300, deadline=None)
@given(items_strategy, gpus_strategy)
def test_packer_properties(raw: list[tuple[float, int]], sizes: list[int]) -> None:
    items = [(f"m{i}", f, int(need * GB)) for i, (f, need) in enumerate(raw)]
    gpus = [GPU(f"g{i}", "x", int(gb * GB)) for i, gb in enumerate(sizes)]
    placement = pack(items, gpus)
    needs = {name: need for name, _, need in items}
    by_gpu = {g.name: g for g in gpus}
    for gpu_name, placed in placement.assigned.items():
        assert sum(f for _, f in placed) <= 1.0 + 1e-9  # never more than one GPU
        assert sum(needs[n] for n, _ in placed) <= by_gpu[gpu_name].memory_bytes  # never over its memory
        for n, f in placed:
            assert needs[n] <= f * by_gpu[gpu_name].memory_bytes  # each within its share
    placed_names = [n for placed in placement.assigned.values() for n, _ in placed]
    assert sorted(placed_names + [n for n, _ in placement.unplaced]) == sorted(needs)  # nothing lost or doubled
    if first_fit(items, gpus).ok:  # whenever a simple greedy packing exists, pack finds one
        assert placement.ok

"""GPU-only checks of the engines (marker ``gpu``; skipped without CUDA; run by ``make gpu-check``)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from zeroserve.config import ModelSpec  # noqa: E402
from zeroserve.engines import collect, create_engine  # noqa: E402
from zeroserve.protocol import GenerateParams  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def test_greedy_generation_on_cuda_equals_cpu(demo_models: dict[str, Path]) -> None:
    spec = ModelSpec(task="generate", model=str(demo_models["tiny-llama"]), dtype="float32")
    gpu = create_engine(spec)
    gpu.load()
    assert gpu.device == "cuda"  # type: ignore[attr-defined]
    prompt = gpu.render_chat([{"role": "user", "content": "What is zeroserve?"}])
    on_gpu = asyncio.run(collect(gpu.stream(prompt, GenerateParams(max_tokens=20, temperature=0)), 1))

    from transformers import AutoModelForCausalLM

    tok = gpu.tokenizer  # type: ignore[attr-defined]
    cpu_model = AutoModelForCausalLM.from_pretrained(spec.model, dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    ref = cpu_model.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1] :]
    assert on_gpu.texts[0] == tok.decode(ref, skip_special_tokens=True)


def test_classifier_on_cuda_matches_cpu(demo_models: dict[str, Path]) -> None:
    spec = ModelSpec(task="classify", model=str(demo_models["tiny-sentiment"]))
    engine = create_engine(spec)
    engine.load()
    out = engine.classify(["I love this, wonderful.", "Terrible and broken."])
    assert [c.label for c in out] == ["positive", "negative"]


def test_gpu_fraction_is_enforced_per_process(demo_models: dict[str, Path]) -> None:
    """A process holding a 0.1 share cannot allocate 0.15 of the card; the guard maps it."""
    code = textwrap.dedent(f"""
        import torch
        from zeroserve.config import ModelSpec
        from zeroserve.engines import create_engine
        from zeroserve.errors import ModelUnavailableError
        spec = ModelSpec(task="classify", model={str(demo_models["tiny-sentiment"])!r}, gpu_fraction=0.1)
        engine = create_engine(spec); engine.load()
        total = torch.cuda.get_device_properties(0).total_memory
        small = torch.empty(int(0.05 * total), dtype=torch.uint8, device="cuda")
        try:
            with engine._guard():
                big = torch.empty(int(0.15 * total), dtype=torch.uint8, device="cuda")
        except ModelUnavailableError as err:
            assert err.code == "gpu_memory_exceeded", err.code
            print("REFUSED", err.message)
        else:
            raise SystemExit("allocated beyond the share")
        print("OK after refusal:", engine.classify(["fine"])[0].label)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "REFUSED" in proc.stdout and "OK after refusal" in proc.stdout


def test_a_warm_copy_is_on_the_gpu_only_while_attached(demo_models: dict[str, Path]) -> None:
    """The warm tier (deployments/warm.py): a copy built on the host moves to the replica's GPU on
    attach, answers there as on the host, and leaves no tensor on the card when it detaches (what
    stays is the process's CUDA context, printed for the note)."""
    spec = ModelSpec(task="classify", model=str(demo_models["tiny-sentiment"]), gpu_fraction=0.25)
    engine = create_engine(spec)
    engine.host_only = True  # type: ignore[attr-defined]
    engine.load()
    assert engine.device == "cpu"  # type: ignore[attr-defined]
    texts = ["I love this, wonderful.", "Terrible and broken."]
    on_host = engine.classify(texts)
    before = torch.cuda.memory_allocated(0)
    engine.place("cuda:0")  # type: ignore[attr-defined]
    assert torch.cuda.memory_allocated(0) > before
    on_gpu = engine.classify(texts)
    assert [c.label for c in on_gpu] == [c.label for c in on_host]
    assert all(
        abs(a - b) < 1e-3 for x, y in zip(on_gpu, on_host, strict=True) for a, b in zip(x.probs, y.probs, strict=True)
    )
    engine.place("cpu")  # type: ignore[attr-defined]
    assert torch.cuda.memory_allocated(0) == before
    free, total = torch.cuda.mem_get_info(0)
    print(
        f"detached: allocated {torch.cuda.memory_allocated(0)} B, reserved {torch.cuda.memory_reserved(0)} B, "
        f"card in use {(total - free) / 2**20:.0f} MiB (this process's CUDA context and any other process)"
    )

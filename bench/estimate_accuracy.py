"""How close is `zeroserve plan`'s memory estimate to a model's real peak on a GPU?

For each model: estimate with zeroserve.plan (the same spec), then load it with the
transformers engine in a fresh process on CUDA, run a worst case for that estimate (a full
batch at full context for embedders and classifiers; one request filling the context for
generators, estimated with max_ongoing_requests=1), and read the process's memory from
nvidia-smi (which includes the CUDA context). Needs CUDA (run by `make gpu-check`).

Models: the demo's tiny Llama and tiny classifier; MiniLM's exact shapes with random
weights (its 88 MB of weights do not travel to a lent GPU; memory depends only on shapes);
a generator with the Qwen2.5-0.5B layer shapes in bf16.

    python3 bench/estimate_accuracy.py --out estimate.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

WORKER = r"""
import asyncio, json, os, subprocess, sys, time
import torch
from zeroserve.config import ModelSpec
from zeroserve.engines import collect, create_engine
from zeroserve.protocol import GenerateParams

spec = ModelSpec.model_validate(json.loads(sys.argv[1]))
engine = create_engine(spec)
engine.load()
ctx = engine.max_len
if spec.task == "generate":
    prompt = "The quick brown fox " * 2000
    ids = engine.tokenizer(prompt)["input_ids"][: ctx - 64]
    text = engine.tokenizer.decode(ids)
    asyncio.run(collect(engine.stream(text, GenerateParams(max_tokens=32, temperature=0)), 1))
else:
    texts = ["word " * (ctx * 2)] * spec.max_batch_size
    fn = engine.embed if spec.task == "embed" else engine.classify
    fn(texts)
torch.cuda.synchronize()
smi = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                     capture_output=True, text=True).stdout
used = {int(a): int(b) for a, b in (l.split(",") for l in smi.strip().splitlines() if l.strip())}
print("RESULT", json.dumps({"peak_reserved": torch.cuda.max_memory_reserved(),
                            "smi_mib": used.get(os.getpid()), "ctx": ctx}))
"""


def minilm_shape(out: Path) -> Path:
    """MiniLM-L6's exact architecture with random weights (same memory, no 88 MB to carry)."""
    from transformers import BertConfig, BertModel

    from zeroserve.demo_models import _train_tokenizer

    if (out / "config.json").is_file():
        return out
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
    )
    BertModel(cfg).save_pretrained(out)
    _train_tokenizer(out)
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("estimate.md"))
    args = parser.parse_args()
    import torch
    from gpu_share import build_model

    from zeroserve.config import ModelSpec
    from zeroserve.plan import GB, estimate

    cases = {
        "tiny-llama": {
            "task": "generate",
            "model": str(ROOT / "models/tiny-llama"),
            "max_model_len": 512,
            "max_ongoing_requests": 1,
        },
        "tiny-sentiment": {"task": "classify", "model": str(ROOT / "models/tiny-sentiment"), "max_batch_size": 8},
        "MiniLM-L6 shapes": {
            "task": "embed",
            "model": str(minilm_shape(Path("/tmp/zs-gpu/minilm-shape"))),
            "max_batch_size": 8,
        },
        "Qwen2.5-0.5B shapes (bf16)": {
            "task": "generate",
            "dtype": "bfloat16",
            "max_model_len": 4096,
            "max_ongoing_requests": 1,
            "model": str(build_model(Path("/tmp/zs-gpu/qwen2.5-0.5b-shape"))),
        },
    }
    rows = []
    for name, raw in cases.items():
        spec = ModelSpec.model_validate({**raw, "gpu_fraction": 1.0})
        est = estimate(name, spec)
        out = subprocess.run(
            [sys.executable, "-c", WORKER, json.dumps(raw)], capture_output=True, text=True, timeout=600, cwd=ROOT
        )
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")), None)
        if line is None:
            print(out.stderr[-3000:])
            raise SystemExit(f"{name}: the worker failed")
        got = json.loads(line.split(" ", 1)[1])
        measured = (got["smi_mib"] or 0) * 2**20
        rows.append((name, est, measured, got))
    gpu = torch.cuda.get_device_name(0)
    lines = [
        f"{gpu}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}",
        "",
        "| model | estimate GB (weights / KV / act. / ctx) | measured GB (nvidia-smi, with context) "
        "| torch peak reserved GB | estimate / measured |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, est, measured, got in rows:
        lines.append(
            f"| {name} | {est.total / GB:.2f} ({est.weights / GB:.3f} / {est.kv_cache / GB:.3f} / "
            f"{est.activations / GB:.3f} / {est.context / GB:.2f}) | {measured / GB:.2f} | "
            f"{got['peak_reserved'] / GB:.3f} | {est.total / measured:.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

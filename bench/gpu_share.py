"""Four engines at 0.25 of one GPU each, serving at once: memory per process against its
share, load times, and generation throughput. Needs CUDA (run by `make gpu-check`).

The model is generated at a realistic size (the Qwen2.5-0.5B layer shapes: 24 layers,
hidden 896, 14 heads, 2 KV heads, MLP 4864) with random bf16 weights, since no hub is
reachable; its vocabulary is the demo tokenizer's.

    python3 bench/gpu_share.py --out gpu_share.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def build_model(out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    if (out / "config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(ROOT / "models" / "tiny-llama")
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def worker(rank: int, path: str, fraction: float, barrier: object, results: object) -> None:
    import os

    import torch

    from zeroserve.config import ModelSpec
    from zeroserve.engines import collect, create_engine
    from zeroserve.errors import ModelUnavailableError
    from zeroserve.protocol import GenerateParams

    t0 = time.perf_counter()
    engine = create_engine(
        ModelSpec(task="generate", model=path, gpu_fraction=fraction, dtype="bfloat16", max_tokens_cap=512)
    )
    engine.load()
    load_s = time.perf_counter() - t0
    barrier.wait()  # type: ignore[attr-defined]

    async def run() -> tuple[int, float]:
        params = GenerateParams(max_tokens=128, temperature=0.8, seed=rank, n=4)
        start = time.perf_counter()
        outs = await asyncio.gather(*(collect(engine.stream(f"The quick {i}", params), 4) for i in range(8)))
        return sum(sum(o.completion_tokens) for o in outs), time.perf_counter() - start

    tokens, secs = asyncio.run(run())
    total = torch.cuda.get_device_properties(0).total_memory
    peak = torch.cuda.max_memory_reserved()
    refused = False
    try:
        with engine._guard():  # type: ignore[attr-defined]
            torch.empty(int((fraction + 0.05) * total), dtype=torch.uint8, device="cuda")
    except ModelUnavailableError:
        refused = True
    results.put(
        {
            "rank": rank,
            "pid": os.getpid(),
            "load_s": load_s,
            "tokens": tokens,  # type: ignore[attr-defined]
            "gen_s": secs,
            "peak_reserved": peak,
            "total": total,
            "refused_over_share": refused,
        }
    )
    barrier.wait()  # type: ignore[attr-defined]  # hold memory while the parent reads nvidia-smi
    barrier.wait()  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("gpu_share.md"))
    parser.add_argument("--engines", type=int, default=4)
    args = parser.parse_args()
    import torch
    import transformers

    path = build_model(Path("/tmp/zs-gpu/qwen2.5-0.5b-shape"))
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(args.engines + 1)
    results = ctx.Queue()
    fraction = 1.0 / args.engines
    start = time.perf_counter()
    procs = [ctx.Process(target=worker, args=(r, str(path), fraction, barrier, results)) for r in range(args.engines)]
    for p in procs:
        p.start()
    barrier.wait()  # all loaded
    all_loaded_s = time.perf_counter() - start
    barrier.wait()  # all generated
    rows = sorted((results.get(timeout=600) for _ in procs), key=lambda r: r["rank"])
    smi = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
    ).stdout
    used = {int(a): int(b) for a, b in (ln.split(",") for ln in smi.strip().splitlines() if ln.strip())}
    barrier.wait()
    for p in procs:
        p.join(60)

    total_gib = rows[0]["total"] / 2**30
    gpu = torch.cuda.get_device_name(0)
    lines = [
        f"{gpu}, {total_gib:.1f} GiB; torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{time.strftime('%Y-%m-%d')}",
        f"{args.engines} transformers engines at {fraction:g} of the GPU each, started at once; all loaded "
        f"in {all_loaded_s:.1f} s. Model: Qwen2.5-0.5B layer shapes, random bf16 weights.",
        "",
        "| engine | load s | tokens | tok/s | peak reserved GiB | nvidia-smi MiB (incl. context) "
        "| share GiB | over-share alloc refused |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['rank']} | {r['load_s']:.1f} | {r['tokens']} | {r['tokens'] / r['gen_s']:.0f} | "
            f"{r['peak_reserved'] / 2**30:.2f} | {used.get(r['pid'], -1)} | {fraction * total_gib:.1f} | "
            f"{r['refused_over_share']} |"
        )
    text = "\n".join(lines)
    print(text)
    args.out.write_text(text + "\n\n```json\n" + json.dumps(rows, indent=1) + "\n```\n")
    share_mib = fraction * rows[0]["total"] / 2**20
    ok = all(r["refused_over_share"] for r in rows) and all(0 < used.get(r["pid"], 0) <= share_mib for r in rows)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

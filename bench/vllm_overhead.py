"""zeroserve against vLLM's own OpenAI server, same model, same machine, same run.

For concurrency 1, 8 and 32: output tokens/s and time to first token (streaming
completions, 64 tokens each with ignore_eos, the same prompts) first against
``python -m vllm.entrypoints.openai.api_server``, then through zeroserve's gateway to
the same model on the vLLM engine. Also: engine start time on CPU with the engine core
in-process (``LLM``, VLLM_ENABLE_V1_MULTIPROCESSING=0) and in a subprocess (``AsyncLLM``,
what serving needs).

    .venv/bin/python bench/vllm_overhead.py [--requests-per-level 32] [--model tiny|wide]
        [--stream-interval N]

``--model wide`` swaps the tiny Llama (about 3 ms per engine step here) for one with the same
tokenizer and random weights, wide enough that an engine step costs what a real model's does
on a GPU (tens of ms): how much of the gap is zeroserve's cost per streamed chunk.
``--stream-interval N`` gives both servers vLLM's ``--stream-interval`` (zeroserve:
``vllm.stream_interval``): N tokens per streamed chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
from common import ROOT, cluster, demo_config, deploy, machine, pct, vllm_server, wait

from zeroserve.config import ModelSpec, parse_model_spec

MODEL_PATH = str(ROOT / "models" / "tiny-llama")
NAME = "tiny-llama-vllm"
# Shapes for --model wide: ~110M parameters.
WIDE = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "head_dim": 64,
}
LEVELS = (1, 8, 32)
MAX_TOKENS = 64


async def load(base_url: str, concurrency: int, total: int) -> dict[str, float]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=600)
    sem = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    tokens = 0

    async def one(i: int) -> None:
        nonlocal tokens
        async with sem:
            start = time.perf_counter()
            first = None
            stream = await client.completions.create(
                model=NAME,
                prompt=f"The quick brown fox {i}",
                max_tokens=MAX_TOKENS,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].text:
                    first = time.perf_counter() - start
                if chunk.usage:
                    tokens += chunk.usage.completion_tokens
            ttfts.append(first or 0.0)

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(total)))
    wall = time.perf_counter() - start
    await client.close()
    return {
        "tok_s": tokens / wall,
        "ttft_p50_ms": statistics.median(ttfts) * 1000,
        "ttft_p99_ms": pct(ttfts, 99) * 1000,
        "tokens": tokens,
    }


def run_levels(base_url: str, per_level: int) -> dict[int, dict[str, float]]:
    asyncio.run(load(base_url, 4, 8))  # warm-up
    return {c: asyncio.run(load(base_url, c, max(per_level, c))) for c in LEVELS}


def build_wide(out: Path) -> str:
    """The tiny Llama's tokenizer and config, widened, random weights (ignore_eos needs no sense)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if not (out / "config.json").is_file():
        torch.manual_seed(0)
        config = LlamaConfig.from_pretrained(MODEL_PATH)
        for key, value in WIDE.items():
            setattr(config, key, value)
        LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
        AutoTokenizer.from_pretrained(MODEL_PATH).save_pretrained(out)
    return str(out)


def vllm_own_server(per_level: int, spec: ModelSpec) -> tuple[float, dict[int, dict[str, float]]]:
    """vLLM's own server with the engine arguments zeroserve's replica gives vLLM."""
    with vllm_server(spec, NAME, spec.model) as (base, launched):
        wait(lambda: httpx.get(f"{base}/health", timeout=2).status_code == 200, 600)
        started = time.perf_counter() - launched
        return started, run_levels(f"{base}/v1", per_level)


def zeroserve(per_level: int, args: dict[str, Any]) -> tuple[float, dict[int, dict[str, float]]]:
    with cluster() as (c, port):
        cfg = demo_config(port, only=[NAME])
        cfg["applications"][1]["args"] = args
        deploy(c, cfg, port)
        start = time.perf_counter()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=600)
        client.completions.create(model=NAME, prompt="warm", max_tokens=1)
        cold = time.perf_counter() - start
        return cold, run_levels(f"http://127.0.0.1:{port}/v1", per_level)


def engine_start(in_process: bool, model: str) -> float:
    code = f"""
import os, time, asyncio
os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "{0 if in_process else 1}"
t = time.perf_counter()
if {in_process}:
    from vllm import LLM
    LLM(model={model!r}, dtype="float32", enforce_eager=True, max_model_len=512)
else:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM
    async def main():
        e = AsyncLLM.from_engine_args(AsyncEngineArgs(model={model!r}, dtype="float32",
                                                      enforce_eager=True, max_model_len=512))
        e.shutdown()
    if __name__ == "__main__":
        asyncio.run(main())
print("START", time.perf_counter() - t)
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("START")), None)
    if line is None:
        raise RuntimeError(out.stderr[-2000:])
    return float(line.split()[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests-per-level", type=int, default=32)
    parser.add_argument("--model", choices=("tiny", "wide"), default="tiny")
    parser.add_argument("--stream-interval", type=int, default=None)
    args = parser.parse_args()
    model = build_wide(ROOT / "models" / "bench-llama-wide") if args.model == "wide" else MODEL_PATH
    # The demo's args for the model, both servers' engine arguments derived from them.
    app_args = demo_config(0, only=[NAME])["applications"][1]["args"]
    app_args["model"] = model
    if args.stream_interval:
        app_args["vllm"]["stream_interval"] = args.stream_interval
    starts = {
        "in-process (LLM)": engine_start(True, model),
        "engine-core subprocess (AsyncLLM)": engine_start(False, model),
    }
    v_start, v = vllm_own_server(args.requests_per_level, parse_model_spec(app_args, NAME))
    z_cold, z = zeroserve(args.requests_per_level, app_args)
    import vllm

    print(f"machine: {machine()}, vllm {vllm.__version__}")
    print(f"model: {model}, stream interval: {args.stream_interval or 1}")
    print("| engine start on CPU | s |\n| --- | --- |")
    for k, s in starts.items():
        print(f"| {k} | {s:.1f} |")
    print(
        f"\nvLLM server start to /health: {v_start:.1f} s; zeroserve cold start (request to "
        f"first answer, replica from zero): {z_cold:.1f} s\n"
    )
    print(
        "| concurrency | vLLM server tok/s | zeroserve tok/s | ratio | vLLM TTFT p50 ms | "
        "zeroserve TTFT p50 ms | vLLM TTFT p99 ms | zeroserve TTFT p99 ms |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for c in LEVELS:
        a, b = v[c], z[c]
        print(
            f"| {c} | {a['tok_s']:.0f} | {b['tok_s']:.0f} | {b['tok_s'] / a['tok_s']:.3f} | "
            f"{a['ttft_p50_ms']:.0f} | {b['ttft_p50_ms']:.0f} | {a['ttft_p99_ms']:.0f} | {b['ttft_p99_ms']:.0f} |"
        )


if __name__ == "__main__":
    main()

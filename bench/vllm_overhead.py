"""zeroserve's vLLM models against vLLM's own OpenAI server and Ray Serve LLM, same model,
same machine, same client, one run (issue 14's vLLM goals), written to docs/benchmarks.md.

For concurrency 1, 8 and 32: output tokens/s and time to first token (streaming completions,
64 tokens each with ``ignore_eos``, the same prompts, after a warm-up), back to back against:

- ``vllm``: ``python -m vllm.entrypoints.openai.api_server`` with the engine arguments
  zeroserve's replica gives vLLM;
- ``zeroserve``: the gateway on the default path (Serve's proxy, the gateway replica, the
  model replica);
- ``one-hop``: the gateway on the one-hop option (``zeroserve start --one-hop``: Ray's direct
  ingress behind zeroserve's HAProxy shim);
- ``ray-serve-llm``: Ray Serve LLM as a new user deploys it (``ray.serve.llm:build_openai_app``
  through ``serve deploy``'s REST API, one CPU bundle, the same engine arguments).

    .venv/bin/python bench/vllm_overhead.py [--model tiny|wide] [--requests-per-level 32]
        [--targets vllm,ray-serve-llm,zeroserve,one-hop] [--stream-interval N] [--stream-batch-ms MS]
        [--engine-start]
        [--no-write]

``--model wide`` swaps the tiny Llama (about 3 ms per engine step here) for one with the same
tokenizer and random weights, wide enough that an engine step costs what a real model's does
on a GPU (tens of ms). ``--stream-interval N`` gives every server vLLM's ``--stream-interval``
(zeroserve: ``vllm.stream_interval``); ``--stream-batch-ms MS`` sets zeroserve's
``vllm.stream_batch_ms``. ``--engine-start`` also times vLLM's engine start with
the engine core in-process and in a subprocess. The table goes to the section ``vllm-<model>``
(``vllm-<model>-interval-N`` with a stream interval) unless ``--no-write``.
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
from common import ROOT, chosen, cluster, demo_config, deploy, head_commit, machine, pct, publish, vllm_server, wait

from zeroserve.cluster import one_hop_env
from zeroserve.config import ModelSpec, parse_model_spec
from zeroserve.engines.vllm_engine import vllm_cli_args

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
RAY_WORKER_NICENESS = int(os.environ.get("RAY_worker_niceness", "15"))
TARGETS = ("vllm", "ray-serve-llm", "zeroserve", "one-hop")
LABELS = {
    "vllm": "vLLM's own server",
    "zeroserve": "zeroserve (proxy path, the default)",
    "one-hop": "zeroserve one-hop (`--one-hop`)",
    "ray-serve-llm": "Ray Serve LLM (`build_openai_app`)",
}
# Issue 14's goals against vLLM's own server: tokens/s at least this share at every level, and
# TTFT p50 within 1.2x + 10 ms.
TOK_GOAL = {"tiny": 0.8, "wide": 0.95}


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


Levels = dict[int, dict[str, float]]


def vllm_own_server(per_level: int, spec: ModelSpec, source: str) -> Levels:
    """vLLM's own server with the engine arguments zeroserve's replica gives vLLM, and what Ray
    gives a replica's processes: ``OMP_NUM_THREADS`` set to the actor's whole CPUs (at least 1),
    which on this CPU-only machine is the engine's compute, and Ray's worker niceness (15 unless
    ``RAY_worker_niceness`` says otherwise), so that the benchmark's client, on the same two
    cores, competes with every server alike."""
    threads = str(max(1, int(spec.num_cpus)))
    env = {"OMP_NUM_THREADS": threads}
    with vllm_server(spec, NAME, source, env=env, niceness=RAY_WORKER_NICENESS) as (base, _):
        wait(lambda: httpx.get(f"{base}/health", timeout=2).status_code == 200, 600)
        return run_levels(f"{base}/v1", per_level)


def zeroserve(per_level: int, args: dict[str, Any], one_hop: bool) -> Levels:
    with cluster(one_hop_env() if one_hop else None) as (c, port):
        cfg = demo_config(port, only=[NAME])
        cfg["applications"][1]["args"] = args
        deploy(c, cfg, port)
        openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=600).completions.create(
            model=NAME, prompt="warm", max_tokens=1
        )
        return run_levels(f"http://127.0.0.1:{port}/v1", per_level)


def engine_kwargs(argv: list[str]) -> dict[str, Any]:
    """``vllm serve`` arguments as vLLM engine keyword arguments (Ray Serve LLM's
    ``engine_kwargs``), less the model and its served name, which Ray Serve LLM sets."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        key = argv[i].removeprefix("--").replace("-", "_")
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value: Any = argv[i + 1]
            i += 2
        else:
            value, i = True, i + 1
        if key.startswith("no_"):
            key, value = key.removeprefix("no_"), False
        out[key] = int(value) if isinstance(value, str) and value.isdigit() else value
    for key in ("model", "served_model_name"):
        out.pop(key, None)
    return out


def ray_serve_llm(per_level: int, spec: ModelSpec, source: str) -> Levels:
    """Ray Serve LLM as its docs deploy it: ``build_openai_app`` by import path in a Serve config,
    on the same cluster setup zeroserve gets (one CPU bundle: this machine has no CUDA)."""
    assert spec.vllm is not None
    kwargs = engine_kwargs(vllm_cli_args(spec, NAME, source, cuda=False, total_bytes=None))
    llm_config = {
        "model_loading_config": {"model_id": NAME, "model_source": source},
        "engine_kwargs": kwargs,
        "placement_group_config": {"bundles": [{"CPU": 0.1}]},
        "runtime_env": {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": f"{spec.vllm.cpu_kv_cache_space_gb:g}"}},
        "deployment_config": {"num_replicas": 1, "max_ongoing_requests": spec.max_ongoing_requests},
    }
    with cluster() as (c, port):
        cfg = {
            "http_options": {"host": "127.0.0.1", "port": port},
            "applications": [
                {
                    "name": "ray-serve-llm",
                    "route_prefix": "/",
                    "import_path": "ray.serve.llm:build_openai_app",
                    # The ingress asks for a whole CPU by default, which two cores shared with the
                    # engine cannot give; it gets what zeroserve's gateway asks for.
                    "args": {
                        "llm_configs": [llm_config],
                        "ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0.1}},
                    },
                }
            ],
        }
        httpx.put(f"{c.dashboard_url}/api/serve/applications/", json=cfg, timeout=60).raise_for_status()
        base = f"http://127.0.0.1:{port}/v1"

        deadline = time.monotonic() + 900
        while True:
            app = httpx.get(f"{c.dashboard_url}/api/serve/applications/", timeout=10).json()["applications"]
            status = app.get("ray-serve-llm", {}).get("status")
            if status == "DEPLOY_FAILED":
                raise RuntimeError(f"Ray Serve LLM did not deploy: {app['ray-serve-llm'].get('message', '')[-2000:]}")
            if status == "RUNNING":
                body = {"model": NAME, "prompt": "warm", "max_tokens": 1}
                if httpx.post(f"{base}/completions", json=body, timeout=120).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"Ray Serve LLM not serving after 900 s (status {status})")
            time.sleep(1)
        return run_levels(base, per_level)


def measure(target: str, per_level: int, app_args: dict[str, Any]) -> Levels:
    spec = parse_model_spec(app_args, NAME)
    if target == "vllm":
        return vllm_own_server(per_level, spec, app_args["model"])
    if target == "ray-serve-llm":
        return ray_serve_llm(per_level, spec, app_args["model"])
    return zeroserve(per_level, app_args, one_hop=target == "one-hop")


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


def table(
    model: str,
    source: str,
    results: dict[str, Levels],
    args: argparse.Namespace,
    commit: str,
    threads: int,
    app_args: dict[str, Any],
) -> list[str]:
    import vllm

    interval = args.stream_interval or 1
    shown = Path(source).relative_to(ROOT) if Path(source).is_relative_to(ROOT) else source
    lines = [
        f"`bench/vllm_overhead.py --model {model}`"
        + (f" `--stream-interval {interval}`" if args.stream_interval else "")
        + f", commit {commit}; {machine()}; vllm {vllm.__version__}.",
        "",
        f"Model: {shown}; {MAX_TOKENS}-token streamed completions with `ignore_eos`, "
        f"{args.requests_per_level} requests per level (at least the concurrency), one chunk per "
        f"{interval} token(s), zeroserve's streams batched every "
        f"{parse_model_spec(app_args, NAME).stream_batch_s * 1000:g} ms; the servers measured back to back "
        "in this order. vLLM's own server "
        f"runs with `OMP_NUM_THREADS={threads}` and niceness {RAY_WORKER_NICENESS}, what Ray gives every "
        "replica's processes here (the engine computes on these two cores, beside the client).",
        "",
        "| concurrency | server | tok/s | vs vLLM | TTFT p50 ms | TTFT p99 ms |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    base = results.get("vllm")
    for c in LEVELS:
        for target, levels in results.items():
            row = levels[c]
            ratio = f"{row['tok_s'] / base[c]['tok_s']:.2f}x" if base else "-"
            lines.append(
                f"| {c} | {LABELS[target]} | {row['tok_s']:.0f} | {ratio} | "
                f"{row['ttft_p50_ms']:.0f} | {row['ttft_p99_ms']:.0f} |"
            )
    lines += ["", *verdicts(model, results)]
    return lines


def verdicts(model: str, results: dict[str, Levels]) -> list[str]:
    """Issue 14's goals, judged on this run's figures."""
    out = []
    base, rival = results.get("vllm"), results.get("ray-serve-llm")
    for target in ("zeroserve", "one-hop"):
        ours = results.get(target)
        if ours is None:
            continue
        if base:
            tok = all(ours[c]["tok_s"] >= TOK_GOAL[model] * base[c]["tok_s"] for c in LEVELS)
            ttft = all(ours[c]["ttft_p50_ms"] <= 1.2 * base[c]["ttft_p50_ms"] + 10 for c in LEVELS)
            out.append(
                f"- {LABELS[target]}: at least {TOK_GOAL[model]}x vLLM's tok/s at every level: "
                f"{'met' if tok else 'not met'}; TTFT p50 within 1.2x + 10 ms of vLLM's: "
                f"{'met' if ttft else 'not met'}."
            )
        if rival:
            ahead = [c for c in LEVELS if ours[c]["tok_s"] > rival[c]["tok_s"]]
            sooner = [c for c in LEVELS if ours[c]["ttft_p50_ms"] < rival[c]["ttft_p50_ms"]]
            out.append(
                f"- {LABELS[target]} ahead of Ray Serve LLM: tok/s at concurrency "
                f"{', '.join(map(str, ahead)) or 'none'}; TTFT p50 at {', '.join(map(str, sooner)) or 'none'} "
                f"(goal: every level)."
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests-per-level", type=int, default=32)
    parser.add_argument("--model", choices=("tiny", "wide"), default="tiny")
    parser.add_argument("--stream-interval", type=int, default=None)
    parser.add_argument(
        "--stream-batch-ms", type=float, default=None, help="zeroserve's vllm.stream_batch_ms (default: the config's)"
    )
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, from: " + ", ".join(TARGETS))
    parser.add_argument("--engine-start", action="store_true", help="also time vLLM's engine start both ways")
    parser.add_argument("--no-write", dest="write", action="store_false", help="print only")
    args = parser.parse_args()
    commit = head_commit()  # what is measured: read before the run, in which the tree may change
    targets = chosen(parser, args.targets, TARGETS, "targets")
    source = build_wide(ROOT / "models" / "bench-llama-wide") if args.model == "wide" else MODEL_PATH
    # The demo's args for the model; every server's engine arguments are derived from them.
    app_args = demo_config(0, only=[NAME])["applications"][1]["args"]
    app_args["model"] = source
    if args.stream_interval:
        app_args["vllm"]["stream_interval"] = args.stream_interval
    if args.stream_batch_ms is not None:
        app_args["vllm"]["stream_batch_ms"] = args.stream_batch_ms
    if args.engine_start:
        for name, in_process in (("in-process (LLM)", True), ("engine-core subprocess (AsyncLLM)", False)):
            print(f"engine start, {name}: {engine_start(in_process, source):.1f} s", flush=True)
    threads = max(1, int(parse_model_spec(app_args, NAME).num_cpus))
    results: dict[str, Levels] = {}
    for target in targets:
        results[target] = measure(target, args.requests_per_level, app_args)
        print(target, results[target], flush=True)
    section = f"vllm-{args.model}" + (f"-interval-{args.stream_interval}" if args.stream_interval else "")
    if args.stream_batch_ms is not None:
        section += f"-batch-{args.stream_batch_ms:g}ms"
    lines = table(args.model, source, results, args, commit, threads, app_args)
    publish(section, lines, write=args.write and len(targets) > 1)


if __name__ == "__main__":
    main()

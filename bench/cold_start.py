"""A wake from zero of each demo model, by phase, beside what it is compared with; writes the
``cold-start`` section of docs/benchmarks.md.

In one run, on one cluster:

- **warm path**: the model's warm copy is built (deployments/warm.py); the wake starts a thin
  replica that attaches to it. Timed from the request to the answer through the gateway, split
  into schedule+process (request to the replica constructor), attach, and first answer.
- **slow path**: the warm copy was dropped first (as the host-memory budget drops one); the
  wake attaches and the copy builds the model (imports are already done in its process).
- **fresh process**: a new Python process that imports torch and transformers, loads the same
  folder and answers one request (what the pool is measured against); for the vLLM model,
  **vLLM's own OpenAI server** with the same engine arguments, from launch to its first answer.
- **thin replica**: a Serve deployment at the same GPU fraction that imports nothing, woken
  from zero through a handle (the floor of any wake that starts a replica here).
- what a warm copy holds: its process's resident memory (with its children: vLLM's engine core)
  and the bytes the budget counts (weights; vLLM on CPU also its KV cache).
- **per request**: with every model awake, sequential requests through the gateway served by
  the warm copy (one more Ray call per request and per streamed message) against the same
  models with ``warm: false`` (the engine in the replica), in the same run.

    .venv/bin/python bench/cold_start.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from common import ROOT, cluster, demo_config, deploy, head_commit, machine, pct, publish, vllm_server, wait

from zeroserve.config import parse_model_spec

REQUESTS: dict[str, tuple[str, dict[str, Any]]] = {
    "all-MiniLM-L6-v2": ("/v1/embeddings", {"input": "hello world", "encoding_format": "float"}),
    "tiny-sentiment": ("/v1/classify", {"input": "I love it"}),
    "tiny-llama": ("/v1/completions", {"prompt": "The quick", "max_tokens": 8, "temperature": 0}),
    "tiny-llama-vllm": ("/v1/completions", {"prompt": "The quick", "max_tokens": 8, "temperature": 0}),
}
VLLM = "tiny-llama-vllm"
# Per request: the vLLM model streams 32 tokens (a message per token on every hop).
PER_REQUEST: dict[str, tuple[str, dict[str, Any]]] = {
    **REQUESTS,
    VLLM: (
        "/v1/completions",
        {"prompt": "The quick", "max_tokens": 32, "temperature": 0, "stream": True, "ignore_eos": True},
    ),
}
FAST = {
    "downscale_delay_s": 1,
    "downscale_to_zero_delay_s": 2,
    "look_back_period_s": 1,
    "metrics_interval_s": 0.5,
    "upscale_delay_s": 0,
}
FRESH = """
import sys, time
import torch, transformers
folder, task = sys.argv[1], sys.argv[2]
auto = {"embed": transformers.AutoModel, "classify": transformers.AutoModelForSequenceClassification,
        "generate": transformers.AutoModelForCausalLM}[task]
tok = transformers.AutoTokenizer.from_pretrained(folder)
model = auto.from_pretrained(folder).eval()
with torch.inference_mode():
    enc = tok(["The quick"], return_tensors="pt")
    model.generate(**enc, max_new_tokens=8) if task == "generate" else model(**enc)
"""
TASKS = {"all-MiniLM-L6-v2": "embed", "tiny-sentiment": "classify", "tiny-llama": "generate"}


def read_weights(folder: Path) -> float:
    start = time.perf_counter()
    for f in folder.glob("*.safetensors"):
        f.read_bytes()
    return time.perf_counter() - start


def fresh_process(model: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", FRESH, str(ROOT / "models" / model), TASKS[model]], check=True)
    return time.perf_counter() - start


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (vLLM's engine core)."""
    import psutil

    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


def vllm_server_first_answer(args: dict[str, Any]) -> float:
    """vLLM's own OpenAI server with the engine arguments zeroserve gives vLLM: seconds from launch
    to its first answer."""
    route, body = REQUESTS[VLLM]
    with vllm_server(parse_model_spec(args, VLLM), VLLM, str(ROOT / "models" / "tiny-llama")) as (base, launched):
        wait(lambda: httpx.post(f"{base}{route}", json={"model": VLLM, **body}, timeout=30).status_code == 200, 600)
        return time.perf_counter() - launched


def per_request(port: int, n: int, path: str) -> dict[str, list[float]]:
    """Milliseconds of ``n`` sequential requests to each model (awake, its replica started by the
    ``path`` given: the redeploy's new replicas), after 5 to warm up."""
    http = httpx.Client(timeout=300)
    out: dict[str, list[float]] = {}
    for model, (route, body) in PER_REQUEST.items():
        url = f"http://127.0.0.1:{port}{route}"
        wait(lambda model=model: _settled(model, path), 600)  # type: ignore[misc]
        samples = []
        for i in range(n + 5):
            t0 = time.perf_counter()
            with http.stream("POST", url, json={"model": model, **body}) as resp:
                resp.raise_for_status()
                for _ in resp.iter_bytes():
                    pass
            if i >= 5:
                samples.append((time.perf_counter() - t0) * 1000)
        out[model] = samples
    return out


def _settled(model: str, path: str) -> bool:
    """One replica of ``model``, running, and started by ``path`` (a redeploy's old one is gone)."""
    from ray import serve

    states = serve.status().applications[model].deployments["ModelServer"].replica_states
    started = serve.get_app_handle(model).stats.remote().result()["start_path"]
    return bool(states == {"RUNNING": 1} and started == path)


def awake_config(port: int, warm: bool) -> dict[str, Any]:
    cfg = demo_config(port, {"min_replicas": 1, "max_replicas": 1, "initial_replicas": 1}, only=tuple(REQUESTS))
    for app in cfg["applications"][1:]:
        app["args"]["warm"] = warm
    return cfg


def warm_actors(c: Any) -> dict[str, Any]:
    from ray.util.state import list_actors

    actors = list_actors(
        address=c.dashboard_url, filters=[("class_name", "=", "WarmModel"), ("state", "=", "ALIVE")], limit=1000
    )
    return {next(m for m in REQUESTS if f"::{m}::" in (a.name or "")): a for a in actors if a.name}


def wake(c: Any, port: int, http: httpx.Client, model: str) -> dict[str, Any]:
    from ray import serve

    state = lambda: httpx.get(f"http://127.0.0.1:{port}/v1/models/{model}").json()["zeroserve"]["state"]  # noqa: E731
    wait(lambda: state() == "cold", 120)
    quiet()
    route, body = REQUESTS[model]
    t0 = time.time()
    http.post(f"http://127.0.0.1:{port}{route}", json={"model": model, **body}).raise_for_status()
    t_end = time.time()
    stats = serve.get_app_handle(model).stats.remote().result()
    eng = stats["engine_timings"]
    return {
        "path": stats["start_path"],
        "total": t_end - t0,
        "schedule+process": stats["started_at"] - t0,
        "attach": eng.get("attach_s", 0.0),
        "build": eng.get("build_s", 0.0) if stats["start_path"] != "warm" else 0.0,
        "first answer": t_end - stats["ready_at"],
    }


def quiet() -> None:
    """Wait until no replica is stopping (a replica that scaled down exits a moment after it
    left the directory; its teardown on these two cores would be timed as part of the next wake),
    then a second more."""
    from ray.util.state import list_actors

    def none_stopping() -> bool:
        alive = list_actors(filters=[("state", "=", "ALIVE")], limit=10000)
        replicas = {f"SERVE_REPLICA::{m}#" for m in (*REQUESTS, "thin")}
        return not any(any((a.name or "").startswith(r) for r in replicas) for a in alive)

    wait(none_stopping, 120)
    time.sleep(1.0)


def thin_wakes(rounds: int) -> list[float]:
    """A Serve replica that imports no torch, at the demo's fraction, woken from zero."""
    from ray import serve

    @serve.deployment(
        ray_actor_options={"num_gpus": 0.25, "num_cpus": 0.1},
        autoscaling_config={"min_replicas": 0, "max_replicas": 1, **FAST, "initial_replicas": 0},
    )
    class Thin:
        def __call__(self) -> str:
            return "ok"

    handle = serve.run(Thin.bind(), name="thin", route_prefix=None)
    out = []
    for _ in range(rounds):
        wait(lambda: not serve.status().applications["thin"].deployments["Thin"].replica_states.get("RUNNING"), 120)
        quiet()
        t0 = time.perf_counter()
        handle.remote().result()
        out.append(time.perf_counter() - t0)
    serve.delete("thin")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-request", type=int, default=40)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    import ray
    from ray import serve

    warm: dict[str, list[dict[str, Any]]] = {m: [] for m in REQUESTS}
    slow: dict[str, list[dict[str, Any]]] = {m: [] for m in REQUESTS}
    fresh: dict[str, list[float]] = {m: [] for m in REQUESTS}
    memory: dict[str, tuple[float, int]] = {}
    latency: dict[bool, dict[str, list[float]]] = {}
    with cluster() as (c, port):
        deploy(c, demo_config(port, FAST, only=tuple(REQUESTS)), port)
        ray.init(address=c.address, logging_level="ERROR", log_to_driver=False)
        http = httpx.Client(timeout=300)
        for model in REQUESTS:  # the first wake of each (its copy may still be building)
            wake(c, port, http, model)
        for _ in range(args.rounds):
            for model in REQUESTS:
                warm[model].append(wake(c, port, http, model))
        for model, actor in warm_actors(c).items():
            info = ray.get(ray.get_actor(actor.name, namespace="serve").info.remote())
            memory[model] = (rss_mb(actor.pid), info["bytes"])
        for _ in range(args.rounds):
            for model in REQUESTS:
                copy = ray.get_actor(warm_actors(c)[model].name, namespace="serve")
                # Dropped once the last replica detached (it stops a moment after scaling to zero).
                wait(lambda copy=copy: ray.get(copy.drop.remote()), 60)  # type: ignore[misc]
                slow[model].append(wake(c, port, http, model))
        thin = thin_wakes(args.rounds)
        for warm_tier in (True, False):  # every model held awake: the request path alone
            deploy(c, awake_config(port, warm_tier), port)
            latency[warm_tier] = per_request(port, args.per_request, "warm" if warm_tier else "cold")
        # A handle's router pushes metrics from a thread that outlives ray.shutdown(): its next
        # push would start a local Ray in this process.
        serve.context._global_client.shutdown_cached_handles()
        ray.shutdown()
    vllm_args = {**demo_config(0, only=[VLLM])["applications"][1]["args"]}
    for _ in range(args.rounds):
        for model in REQUESTS:
            fresh[model].append(vllm_server_first_answer(vllm_args) if model == VLLM else fresh_process(model))

    med = statistics.median
    cols = ["total", "schedule+process", "attach", "build", "first answer"]
    lines = [
        f"`bench/cold_start.py --rounds {args.rounds}`, commit {head_commit()}; {machine()}.",
        "Seconds, medians of the rounds; a wake is timed from the request to the answer through the gateway.",
        "",
        "| model | path | " + " | ".join(cols) + " |",
        "| --- | --- |" + " --- |" * len(cols),
    ]
    for label, table in (("warm", warm), ("slow (copy dropped)", slow)):
        for model, samples in table.items():
            paths = "/".join(sorted({s["path"] for s in samples}))
            values = " | ".join(f"{med(s[c] for s in samples):.2f}" for c in cols)
            lines.append(f"| {model} | {label} ({paths}) | {values} |")
    lines += [
        "",
        "| model | warm wake | fresh process (import, load, answer; vLLM: its own server from launch to "
        "first answer) | warm / fresh | thin replica wake "
        "| warm - thin | disk read of the weights | warm copy: process RSS MB, weights MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    thin_s = med(thin)
    for model in REQUESTS:
        w, f = med(s["total"] for s in warm[model]), med(fresh[model])
        rss, weights = memory.get(model, (0.0, 0))
        lines.append(
            f"| {model} | {w:.2f} | {f:.2f} | {w / f:.2f} | {thin_s:.2f} | {w - thin_s:+.2f} "
            f"| {read_weights(ROOT / 'models' / 'tiny-llama' if model == VLLM else ROOT / 'models' / model):.3f} "
            f"| {rss:.0f}, {weights / 2**20:.1f} |"
        )
    lines += [
        "",
        f"Per request, every model awake: milliseconds of {args.per_request} sequential requests through the "
        f"gateway (the vLLM model streams {PER_REQUEST[VLLM][1]['max_tokens']} tokens).",
        "",
        "| model | warm copy p50 | warm copy p99 | engine in the replica p50 | engine in the replica p99 "
        "| cost of the warm copy p50 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for model in REQUESTS:
        w, r = latency[True][model], latency[False][model]
        lines.append(
            f"| {model} | {med(w):.1f} | {pct(w, 99):.1f} | {med(r):.1f} | {pct(r, 99):.1f} | {med(w) - med(r):+.1f} |"
        )
    lines += [
        "",
        "Issue 13's goals: a transformers model's warm wake of at most 2.5 s, at most half the fresh",
        "process, within 0.5 s of the thin replica; a vLLM model's wake at most half of vLLM's own server",
        "from launch to first answer. Each warm copy is its own process: the RSS column is what one more",
        "model costs a node while it is warm (the budget, `host_cache_gb`, counts the weights' bytes and,",
        "for vLLM on CPU, its KV cache).",
    ]
    publish("cold-start", lines, write=not args.no_write)


if __name__ == "__main__":
    main()

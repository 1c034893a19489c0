"""A wake from zero of each demo model, by phase, beside what it is compared with; writes the
``cold-start`` section of docs/benchmarks.md.

In one run, on one cluster:

- **warm path**: the model's warm copy is built (deployments/warm.py); the wake starts a thin
  replica that attaches to it. Timed from the request to the answer through the gateway, split
  into schedule+process (request to the replica constructor), attach, and first answer.
- **slow path**: the warm copy was dropped first (as the host-memory budget drops one); the
  wake attaches and the copy builds the model (imports are already done in its process).
- **fresh process**: a new Python process that imports torch and transformers, loads the same
  folder and answers one request (what the pool is measured against).
- **thin replica**: a Serve deployment at the same GPU fraction that imports nothing, woken
  from zero through a handle (the floor of any wake that starts a replica here).
- what a warm copy holds: its process's resident memory and its weights' bytes.

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
from common import ROOT, cluster, demo_config, deploy, head_commit, machine, publish, wait

REQUESTS = {
    "all-MiniLM-L6-v2": ("/v1/embeddings", {"input": "hello world", "encoding_format": "float"}),
    "tiny-sentiment": ("/v1/classify", {"input": "I love it"}),
    "tiny-llama": ("/v1/completions", {"prompt": "The quick", "max_tokens": 8, "temperature": 0}),
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
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


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
        t0 = time.perf_counter()
        handle.remote().result()
        out.append(time.perf_counter() - t0)
    serve.delete("thin")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    import ray
    from ray import serve

    warm: dict[str, list[dict[str, Any]]] = {m: [] for m in REQUESTS}
    slow: dict[str, list[dict[str, Any]]] = {m: [] for m in REQUESTS}
    fresh: dict[str, list[float]] = {m: [] for m in REQUESTS}
    memory: dict[str, tuple[float, int]] = {}
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
        # A handle's router pushes metrics from a thread that outlives ray.shutdown(): its next
        # push would start a local Ray in this process.
        serve.context._global_client.shutdown_cached_handles()
        ray.shutdown()
    for _ in range(args.rounds):
        for model in REQUESTS:
            fresh[model].append(fresh_process(model))

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
        "| model | warm wake | fresh process (import, load, answer) | warm / fresh | thin replica wake "
        "| warm - thin | disk read of the weights | warm copy: process RSS MB, weights MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    thin_s = med(thin)
    for model in REQUESTS:
        w, f = med(s["total"] for s in warm[model]), med(fresh[model])
        rss, weights = memory.get(model, (0.0, 0))
        lines.append(
            f"| {model} | {w:.2f} | {f:.2f} | {w / f:.2f} | {thin_s:.2f} | {w - thin_s:+.2f} "
            f"| {read_weights(ROOT / 'models' / model):.3f} | {rss:.0f}, {weights / 2**20:.1f} |"
        )
    lines += [
        "",
        "Issue 13's goals: a warm wake of at most 2.5 s, at most half the fresh process, within 0.5 s of",
        "the thin replica. vLLM models are not in the warm tier yet (their wake builds the engine: see",
        "the vLLM section). Each warm copy is its own process: the RSS column is what one more model",
        "costs a node while it is warm (the budget, `host_cache_gb`, counts the weights).",
    ]
    publish("cold-start", lines, write=not args.no_write)


if __name__ == "__main__":
    main()

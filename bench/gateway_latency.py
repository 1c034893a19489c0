"""Latency the gateway adds: one embedding request through HTTP+gateway, through a
DeploymentHandle, and through the engine in-process, measured in the same run; beside them
Ray Serve's own floor on the same path, a deployment that only reads the same body and answers,
through Serve's proxy and through a handle. Writes its section of docs/benchmarks.md (between
the ``gateway-latency`` markers).

    .venv/bin/python bench/gateway_latency.py [--n 300] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
from common import ROOT, cluster, demo_config, deploy, head_commit, machine, pct, publish, summary

MODEL = "all-MiniLM-L6-v2"
TEXT = "A man is eating a piece of bread."
FLOOR = "serve-floor"  # an app of its own, not a model: the gateway does not list it


def floor_app() -> Any:
    """A Serve ingress that does nothing but read the request's body and answer: what any POST
    through Serve's proxy costs (the proxy, the hop to a replica, the body fetched back from the
    proxy, the answer streamed back), with no gateway and no model."""
    from ray import serve
    from starlette.requests import Request

    @serve.deployment(name="Floor", ray_actor_options={"num_cpus": 0.1})
    class Floor:
        async def __call__(self, request: Request) -> dict[str, int]:
            return {"bytes": len(await request.body())}

        async def ping(self, body: dict[str, Any]) -> dict[str, int]:
            return {"bytes": len(json.dumps(body))}

    return Floor.bind()  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--json", help="also write the raw milliseconds per path to this file")
    args = parser.parse_args()

    import ray
    from ray import serve

    from zeroserve.config import ModelSpec
    from zeroserve.engines import create_engine

    with cluster() as (c, port):
        deploy(c, demo_config(port, {"min_replicas": 1, "initial_replicas": 1}, only=(MODEL,)), port)
        url = f"http://127.0.0.1:{port}/v1/embeddings"
        http = httpx.Client(timeout=120)
        body = {"model": MODEL, "input": TEXT, "encoding_format": "float"}
        for _ in range(20):
            http.post(url, json=body).raise_for_status()

        ray.init(address=c.address, logging_level="ERROR", log_to_driver=False)
        handle = serve.get_app_handle(MODEL)
        for _ in range(20):
            handle.embed.remote([TEXT]).result()

        floor = serve.run(floor_app(), name=FLOOR, route_prefix=f"/{FLOOR}")
        floor_url = f"http://127.0.0.1:{port}/{FLOOR}"
        for _ in range(20):
            http.post(floor_url, json=body).raise_for_status()
            floor.ping.remote(body).result()

        engine = create_engine(ModelSpec(task="embed", model=str(ROOT / "models" / MODEL)))
        engine.load()
        for _ in range(20):
            engine.embed([TEXT])

        calls = {
            "gateway (HTTP)": lambda: http.post(url, json=body).raise_for_status(),
            "DeploymentHandle": lambda: handle.embed.remote([TEXT]).result(),
            "engine in-process": lambda: engine.embed([TEXT]),
            "Serve floor (HTTP)": lambda: http.post(floor_url, json=body).raise_for_status(),
            "Serve floor (handle)": lambda: floor.ping.remote(body).result(),
        }
        results: dict[str, list[float]] = {name: [] for name in calls}
        # Interleave the paths so drift on a shared 2-core box hits them all alike.
        for _ in range(args.n):
            for name, call in calls.items():
                t = time.perf_counter()
                call()
                results[name].append((time.perf_counter() - t) * 1000)
        serve.delete(FLOOR)
        # A handle's router pushes metrics from a thread that outlives ray.shutdown().
        serve.context._global_client.shutdown_cached_handles()
        ray.shutdown()

    commit = head_commit()
    added_p50, added_p99 = added(results["gateway (HTTP)"], results["DeploymentHandle"])
    floor_p50, floor_p99 = added(results["Serve floor (HTTP)"], results["Serve floor (handle)"])
    lines = [
        f"`bench/gateway_latency.py`, commit {commit}; {machine()}.",
        f"One MiniLM embedding of one sentence, {args.n} requests per path, the {len(results)} paths",
        "interleaved in one run on one warm replica.",
        "",
        "| path | n | p50 ms | p99 ms | mean ms |",
        "| --- | --- | --- | --- | --- |",
        *(summary(name, values) for name, values in results.items()),
        "",
        f"The gateway (HTTP proxy hop, parsing, admission, a second handle hop) adds {added_p50:.1f} ms",
        f"at p50 and {added_p99:.1f} ms at p99 over a direct handle call in this run. The handle path",
        "includes up to 10 ms of `@serve.batch` wait (`batch_wait_timeout_s: 0.01`).",
        "Serve's own floor on this path (the same body POSTed through Serve's proxy to a deployment",
        f"that only reads it, against a handle call to that deployment) is {floor_p50:.1f} ms at p50 and",
        f"{floor_p99:.1f} ms at p99: the gateway's share beyond it is {added_p50 - floor_p50:.1f} ms at p50.",
    ]
    if args.json:
        Path(args.json).write_text(json.dumps(results))
    publish("gateway-latency", lines, write=not args.no_write)


def added(path_ms: list[float], base_ms: list[float]) -> tuple[float, float]:
    """What ``path_ms`` adds over ``base_ms``, at p50 and at p99."""
    return statistics.median(path_ms) - statistics.median(base_ms), pct(path_ms, 99) - pct(base_ms, 99)


if __name__ == "__main__":
    asyncio.run(asyncio.sleep(0))
    main()

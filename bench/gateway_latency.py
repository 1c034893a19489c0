"""Latency the gateway adds: one embedding request through HTTP+gateway, through a
DeploymentHandle, and through the engine in-process, measured in the same run.

    .venv/bin/python bench/gateway_latency.py [--n 300]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import httpx
from common import ROOT, cluster, demo_config, deploy, machine, summary

MODEL = "all-MiniLM-L6-v2"
TEXT = "A man is eating a piece of bread."


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=300)
    args = parser.parse_args()

    import ray
    from ray import serve

    from zeroserve.config import ModelSpec
    from zeroserve.engines import create_engine

    with cluster() as (c, port):
        deploy(c, demo_config(port, {"min_replicas": 1, "initial_replicas": 1}), port)
        url = f"http://127.0.0.1:{port}/v1/embeddings"
        http = httpx.Client(timeout=120)
        body = {"model": MODEL, "input": TEXT, "encoding_format": "float"}
        for _ in range(20):
            http.post(url, json=body).raise_for_status()

        ray.init(address=c.address, logging_level="ERROR", log_to_driver=False)
        handle = serve.get_app_handle(MODEL)
        for _ in range(20):
            handle.embed.remote([TEXT]).result()

        engine = create_engine(ModelSpec(task="embed", model=str(ROOT / "models" / MODEL)))
        engine.load()
        for _ in range(20):
            engine.embed([TEXT])

        results: dict[str, list[float]] = {"gateway (HTTP)": [], "DeploymentHandle": [], "engine in-process": []}
        # Interleave the three paths so drift on a shared 2-core box hits them all alike.
        for _ in range(args.n):
            t = time.perf_counter()
            http.post(url, json=body).raise_for_status()
            results["gateway (HTTP)"].append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            handle.embed.remote([TEXT]).result()
            results["DeploymentHandle"].append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            engine.embed([TEXT])
            results["engine in-process"].append((time.perf_counter() - t) * 1000)
        ray.shutdown()

    print(f"machine: {machine()}")
    print("| path | n | p50 ms | p99 ms | mean ms |")
    print("| --- | --- | --- | --- | --- |")
    for name, values in results.items():
        print(summary(name, values))


if __name__ == "__main__":
    asyncio.run(asyncio.sleep(0))
    main()

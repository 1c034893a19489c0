"""Issue 5 figures, one run: the latency auth + metering add at the gateway (on vs off),
ledger throughput (charges/s from concurrent gateway requests) on SQLite and on Redis,
and metered GPU-seconds against the replica's measured engine time.

    .venv/bin/python bench/quota_overhead.py [--n 300]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from common import cluster, demo_config, deploy, embedding_latencies, machine, pct, wait

from zeroserve.cluster import local_redis
from zeroserve.quota import KeyRecord, hash_key, new_key, open_ledger

MODEL = "all-MiniLM-L6-v2"


def gateway_config(port: int, ledger: dict | None) -> dict:
    cfg = demo_config(port, {"min_replicas": 1, "initial_replicas": 1}, only=[MODEL])
    if ledger is not None:
        cfg["applications"][0]["args"]["auth"] = {
            "enabled": True,
            "ledger": ledger,
            "tiers": {"bench": {"daily_gpu_seconds": 1e9, "requests_per_minute": 10**6, "max_concurrent": 1000}},
        }
    return cfg


def sequential(port: int, key: str | None, n: int) -> list[float]:
    def swapped(r: httpx.Response) -> bool:
        # The previous gateway serves until the redeployed one takes over, with its own ledger.
        return r.status_code == 200 and (key is None) == ("x-zeroserve-quota-remaining" not in r.headers)

    headers = {"authorization": f"Bearer {key}"} if key else {}
    return embedding_latencies(port, n, headers, ready=swapped)


def concurrent_charges(port: int, key: str, total: int) -> tuple[float, float]:
    """Charges per second from 16 concurrent clients, and the sum of the charged GPU-seconds."""
    url = f"http://127.0.0.1:{port}/v1/embeddings"
    body = {"model": MODEL, "input": "hello", "encoding_format": "float"}

    def one(_: int) -> float:
        r = httpx.post(url, json=body, headers={"authorization": f"Bearer {key}"}, timeout=120)
        r.raise_for_status()
        return float(r.headers["x-zeroserve-gpu-seconds"])

    start = time.perf_counter()
    with ThreadPoolExecutor(16) as ex:
        charged = list(ex.map(one, range(total)))
    return total / (time.perf_counter() - start), sum(charged)


def metric(metrics_url: str, name: str) -> float:
    text = httpx.get(metrics_url, timeout=10).text
    return sum(
        float(ln.rsplit(" ", 1)[1])
        for ln in text.splitlines()
        if ln.startswith(name + "{") and f'model="{MODEL}"' in ln
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=300)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    latency, throughput = {}, {}
    with local_redis(tmp) as redis_url:
        with cluster() as (c, port):
            for label, ledger in (
                ("off", None),
                ("on, SQLite", {"backend": "sqlite", "path": str(tmp / "l.db")}),
                ("on, Redis", {"backend": "redis", "url": redis_url}),
            ):
                key = None
                if ledger is not None:
                    store = open_ledger(ledger["backend"], ledger.get("path"), ledger.get("url"))
                    key, key_id = new_key()
                    store.add_key(hash_key(key), KeyRecord(key_id, "", "bench", time.time()))
                deploy(c, gateway_config(port, ledger), port)
                latency[label] = sequential(port, key, args.n)
                if key is not None:
                    # The meter's series is exported (the sequential requests above were charged).
                    wait(lambda: "ray_zeroserve_gpu_seconds_total{" in httpx.get(c.metrics_url, timeout=10).text, 30)
                    time.sleep(3)
                    before = metric(c.metrics_url, "ray_zeroserve_gpu_seconds_total")
                    rate, charged = concurrent_charges(port, key, 400)
                    time.sleep(4)  # one metrics export interval and more
                    busy = metric(c.metrics_url, "ray_zeroserve_gpu_seconds_total") - before
                    throughput[label] = (rate, charged, busy)
    print(f"machine: {machine()}")
    print("| auth + metering | p50 ms | p99 ms |\n| --- | --- | --- |")
    for label, values in latency.items():
        print(f"| {label} | {statistics.median(values):.2f} | {pct(values, 99):.2f} |")
    print("\n| ledger | charges/s (16 concurrent clients) | charged GPU-s | replica busy GPU-s | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for label, (rate, charged, busy) in throughput.items():
        print(f"| {label} | {rate:.0f} | {charged:.4f} | {busy:.4f} | {charged / busy if busy else float('nan'):.3f} |")


if __name__ == "__main__":
    sys.exit(main())

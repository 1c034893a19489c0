"""Auth, metering and the ledger, one run: the latency auth + metering add at the gateway (on vs
off), ledger throughput (charges/s from concurrent gateway requests) on SQLite and on Redis, and
the metered GPU-seconds checked against a clock the meter does not own: the CPU time of the
process that runs the model (its warm copy, one torch thread), read from /proc before and after.
Writes the ``quota`` section of docs/benchmarks.md.

    .venv/bin/python bench/quota_overhead.py [--n 300] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from common import cluster, demo_config, deploy, embedding_latencies, head_commit, machine, pct, publish, wait

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


def engine_pid(dashboard_url: str) -> int:
    """The pid of the model's warm copy, the process whose torch thread does the model's work."""
    from ray.util.state import list_actors

    (actor,) = list_actors(
        address=dashboard_url, filters=[("class_name", "=", "WarmModel"), ("state", "=", "ALIVE")], detail=True
    )
    return int(actor.pid)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads), from /proc."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()  # noqa: SIM115
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    commit = head_commit()  # read first: what runs is what was committed then
    tmp = Path(tempfile.mkdtemp())
    latency, throughput = {}, {}
    fraction = float(demo_config(0, only=[MODEL])["applications"][1]["args"]["gpu_fraction"])
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
                    pid = engine_pid(c.dashboard_url)
                    before, cpu_before = metric(c.metrics_url, "ray_zeroserve_gpu_seconds_total"), cpu_seconds(pid)
                    rate, charged = concurrent_charges(port, key, 400)
                    cpu = cpu_seconds(pid) - cpu_before
                    time.sleep(4)  # one metrics export interval and more
                    busy = metric(c.metrics_url, "ray_zeroserve_gpu_seconds_total") - before
                    throughput[label] = (rate, charged, busy, cpu * fraction)
    lines = [
        f"`bench/quota_overhead.py --n {args.n}`, commit {commit}; {machine()}.",
        "The gateway redeployed with API keys off, on with the SQLite ledger, and on with the Redis ledger",
        f"(redis-server on loopback). Latency: one MiniLM embedding per request, {args.n} sequential requests each.",
        "",
        "| auth + metering | p50 ms | p99 ms |",
        "| --- | --- | --- |",
    ]
    for label, values in latency.items():
        lines.append(f"| {label} | {statistics.median(values):.2f} | {pct(values, 99):.2f} |")
    lines += [
        "",
        "400 requests from 16 concurrent clients. *Charged*: the sum of every answer's `x-zeroserve-gpu-seconds`."
        " *Meter's busy*: the replica's `ray_zeroserve_gpu_seconds_total` over the run (the same `SharedMeter`,"
        " so it checks only that charges add up to the busy time). *Engine CPU*: the CPU seconds the model's"
        f" warm copy process used over the run (`/proc`, one torch thread), times the model's {fraction:g}"
        " GPU fraction: a clock the meter does not own.",
        "",
        "| ledger | charges/s | charged GPU-s | meter's busy GPU-s | charged / busy | engine CPU x fraction |"
        " charged / engine CPU |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, (rate, charged, busy, engine) in throughput.items():
        lines.append(
            f"| {label} | {rate:.0f} | {charged:.4f} | {busy:.4f} | {charged / busy if busy else float('nan'):.3f} |"
            f" {engine:.4f} | {charged / engine if engine else float('nan'):.2f} |"
        )
    lines += [
        "",
        "The meter charges the engine's wall time per request, shared among the requests in it at once; the",
        "warm copy's CPU time counts its one torch thread's work plus the process's own overhead (Ray's calls,",
        "Python). A ratio above 1 is time the meter charges while the engine's process is not on a CPU: the",
        "call from the replica to the warm copy, and waiting for a core on this shared 2-core machine. On a",
        "GPU the independent clock would be CUDA events around the forward pass; not measured here (no GPU).",
    ]
    publish("quota", lines, write=not args.no_write)


if __name__ == "__main__":
    sys.exit(main())

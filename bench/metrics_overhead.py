"""The gateway's latency with metrics on and off (same run), and the size and time of a metrics
scrape with 20 models configured. Writes the ``metrics`` section of docs/benchmarks.md.

    .venv/bin/python bench/metrics_overhead.py [--n 300] [--no-write]
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx
from common import cluster, demo_config, deploy, embedding_latencies, head_commit, machine, pct, publish, wait

MODEL = "all-MiniLM-L6-v2"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    commit = head_commit()  # read first: what runs is what was committed then
    rows = []
    with cluster() as (c, port):
        for label, metrics in (("on", True), ("off", False), ("on (again)", True)):
            cfg = demo_config(port, {"min_replicas": 1, "initial_replicas": 1}, only=[MODEL])
            cfg["applications"][0]["args"]["metrics"] = metrics
            deploy(c, cfg, port)
            lat = embedding_latencies(port, args.n)
            rows.append((label, statistics.median(lat), pct(lat, 99)))

        cfg = demo_config(port)
        template = next(a for a in cfg["applications"] if a["name"] == "tiny-sentiment")
        cfg["applications"] = [cfg["applications"][0]] + [
            # No warm copies: twenty of them would build at once on these cores (and they export no series).
            {**template, "name": f"m{i:02d}", "args": {**template["args"], "gpu_fraction": 0.05, "warm": False}}
            for i in range(20)
        ]
        deploy(c, cfg, port)
        http = httpx.Client(timeout=120)
        for i in range(3):
            http.post(f"http://127.0.0.1:{port}/v1/classify", json={"model": f"m{i:02d}", "input": "x"})
        wait(lambda: b"ray_zeroserve_model_state" in httpx.get(c.metrics_url, timeout=10).content, 120)
        time.sleep(5)
        sizes, times, series = [], [], 0
        for _ in range(10):
            t = time.perf_counter()
            text = httpx.get(c.metrics_url, timeout=30).text
            times.append((time.perf_counter() - t) * 1000)
            sizes.append(len(text.encode()))
            series = sum(1 for ln in text.splitlines() if ln.startswith("ray_zeroserve_"))
            total = sum(1 for ln in text.splitlines() if ln and not ln.startswith("#"))
    lines = [
        f"`bench/metrics_overhead.py --n {args.n}`, commit {commit}; {machine()}.",
        f"One MiniLM embedding per request through the gateway, {args.n} sequential requests per setting after",
        "30 warm-up ones, the gateway redeployed with `metrics: true`, `false`, then `true` again in one run.",
        "",
        "| gateway metrics | p50 ms | p99 ms |",
        "| --- | --- | --- |",
        *(f"| {label} | {p50:.2f} | {p99:.2f} |" for label, p50, p99 in rows),
        "",
        'Two "on" runs bracket the "off" one: a difference between "on" and "off" smaller than between',
        'the two "on" runs is run-to-run noise.',
        "",
        f"Scrape of the head node's metrics port with 20 models configured (3 of them woken, so histograms exist"
        f" for those): {statistics.median(sizes) / 1024:.0f} KiB, p50 {statistics.median(times):.0f} ms over 10"
        f" scrapes; {series} of its {total} samples are zeroserve's, the rest Ray's own.",
    ]
    publish("metrics", lines, write=not args.no_write)


if __name__ == "__main__":
    main()

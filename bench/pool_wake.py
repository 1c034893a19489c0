"""What a wake costs when the pool first has to make room: a wake into a free GPU slice against a
wake that first evicts an idle model, in the same run. Writes the ``pool-wake`` section of
docs/benchmarks.md.

Each round deploys five copies of the demo classifier at 0.25 on the one logical GPU (four
slices), all cold, with a ten-minute idle delay: three are woken, then the fourth wakes into the
free slot ("free"), then the fifth, which fits nowhere, waits for the least recently used to yield
("evict"). Timed from the request to its answer, through the gateway.

    .venv/bin/python bench/pool_wake.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import httpx
from common import cluster, demo_config, deploy, head_commit, machine, publish, wait

NAMES = [f"w{i}" for i in range(5)]


def _config(port: int, models: bool = True) -> dict[str, object]:
    cfg = demo_config(port, only=("tiny-sentiment",))
    gateway, model = cfg["applications"]
    args = copy.deepcopy(model["args"])
    args["min_hold_s"] = 1
    args["autoscaling"] = {
        "min_replicas": 0,
        "max_replicas": 1,
        "downscale_to_zero_delay_s": 600,
        "look_back_period_s": 1,
        "metrics_interval_s": 0.5,
    }
    apps = [{**model, "name": n, "args": args} for n in NAMES]
    cfg["applications"] = [gateway, *(apps if models else [])]
    return cfg


def _apps(c: object) -> dict[str, str]:
    details = httpx.get(f"{c.dashboard_url}/api/serve/applications/", timeout=10).json()  # type: ignore[attr-defined]
    return {name: app.get("status", "") for name, app in details.get("applications", {}).items()}


def _running(c: object, name: str) -> int:
    details = httpx.get(f"{c.dashboard_url}/api/serve/applications/", timeout=10).json()  # type: ignore[attr-defined]
    deployments = details.get("applications", {}).get(name, {}).get("deployments", {})
    return sum(1 for d in deployments.values() for r in d.get("replicas", []) if r.get("state") == "RUNNING")


def _call(http: httpx.Client, port: int, name: str) -> float:
    t = time.perf_counter()
    http.post(f"http://127.0.0.1:{port}/v1/classify", json={"model": name, "input": "fine"}).raise_for_status()
    return time.perf_counter() - t


def _row(name: str, values: list[float]) -> str:
    each = ", ".join(f"{v:.2f}" for v in values)
    return f"| {name} | {len(values)} | {statistics.median(values):.2f} | {each} |"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    free: list[float] = []
    evict: list[float] = []
    http = httpx.Client(timeout=300)
    with cluster() as (c, port):
        for r in range(args.rounds):
            # Fresh applications each round (the last round's removed first): every model starts cold.
            deploy(c, _config(port, models=False), port)
            wait(lambda: not set(NAMES) & set(_apps(c)), 120)
            deploy(c, _config(port), port)
            wait(
                lambda: all(_apps(c).get(n) == "RUNNING" for n in NAMES) and not any(_running(c, n) for n in NAMES), 120
            )
            for name in NAMES[:3]:
                _call(http, port, name)
                wait(lambda n=name: _running(c, n) == 1, 60)  # type: ignore[misc]
            time.sleep(1.5)  # the woken models pass their min_hold_s (1 s): the fifth may evict
            free.append(_call(http, port, NAMES[3]))
            wait(lambda: _running(c, NAMES[3]) == 1, 60)
            time.sleep(1.5)
            evict.append(_call(http, port, NAMES[4]))
            print(f"round {r + 1}: free {free[-1]:.2f} s, evict {evict[-1]:.2f} s", flush=True)
    commit = head_commit()
    ratio = statistics.median(evict) / statistics.median(free)
    lines = [
        f"`bench/pool_wake.py --rounds {args.rounds}`, commit {commit}; {machine()}.",
        "Five copies of tiny-sentiment at 0.25 on one logical GPU, a ten-minute idle delay, `min_hold_s: 1`;",
        "per round (fresh apps): three woken, then a wake into the free slot, then a wake that first evicts",
        "the least recently used. Seconds from request to answer through the gateway.",
        "",
        "| wake | rounds | median s | each round s |",
        "| --- | --- | --- | --- |",
        _row("into a free slot", free),
        _row("after an eviction", evict),
        "",
        f"A wake that first evicts costs {ratio:.2f}x a wake into a free slot (issue 12's goal: at most 1.2x).",
        "Without the pool the fifth model would wait out the ten-minute idle delay of one of the four.",
    ]
    publish("pool-wake", lines, write=not args.no_write)


if __name__ == "__main__":
    main()

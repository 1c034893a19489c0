"""A trace against an over-subscribed pool, with the pool's eviction on and off, in one run.
Writes the ``pool-trace`` section of docs/benchmarks.md.

Sixteen copies of the demo classifier at 0.25 on the one logical GPU (four slices), each with
the demo's one-minute idle delay and the default ``min_hold_s`` (10 s). One trace (seeded):
Poisson arrivals, each request's model drawn with Zipf popularity (s = 1.1). It is played twice
against fresh applications, all cold: with ``evict_idle_models: true`` (the pool) and ``false``
(before it: a model that fits nowhere waits for one to scale to zero after its own delay). The
gateway's cold-start bound is 120 s. Each request's class comes from the gateway's answer
(``X-Zeroserve-Wake``): warm, woke into a free slice, woke after an eviction, joined a wake, or
waited for a slice with eviction off.

    .venv/bin/python bench/pool_trace.py [--minutes 10] [--rate 0.1] [--seed 7]
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
from common import cluster, demo_config, deploy, head_commit, machine, pct, publish, wait

MODELS = [f"z{i:02d}" for i in range(16)]
ZIPF_S = 1.1
BOUND_S = 120.0
CLASSES = ("warm", "free", "evicted", "joined", "queued")


@dataclass
class Shot:
    at: float
    model: str
    status: int = 0
    seconds: float = 0.0
    wake: str = ""


def _trace(minutes: float, rate: float, seed: int) -> list[tuple[float, str]]:
    rng = random.Random(seed)
    ranked = MODELS[:]
    rng.shuffle(ranked)  # popularity does not follow the names
    weights = [1 / (k**ZIPF_S) for k in range(1, len(ranked) + 1)]
    out, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t > minutes * 60:
            return out
        out.append((t, rng.choices(ranked, weights)[0]))


def _config(port: int, evict: bool, models: bool = True) -> dict[str, object]:
    cfg = demo_config(port, only=("tiny-sentiment",))
    gateway, model = cfg["applications"]
    gateway["args"] = {**gateway["args"], "evict_idle_models": evict, "cold_start_timeout_s": BOUND_S}
    args = copy.deepcopy(model["args"])
    args["num_cpus"] = 0.05
    args["autoscaling"] = {**args["autoscaling"], "look_back_period_s": 2, "metrics_interval_s": 0.5}
    cfg["applications"] = [gateway, *({**model, "name": n, "args": args} for n in MODELS if models)]
    return cfg


def _apps(c: object) -> dict[str, dict[str, object]]:
    details = httpx.get(f"{c.dashboard_url}/api/serve/applications/", timeout=10).json()  # type: ignore[attr-defined]
    return details.get("applications", {})  # type: ignore[no-any-return]


def _awake(c: object) -> int:
    return sum(
        1
        for name, app in _apps(c).items()
        if name != "gateway"
        for d in app.get("deployments", {}).values()  # type: ignore[attr-defined]
        for r in d.get("replicas", [])
        if r.get("state") == "RUNNING"
    )


def _play(port: int, trace: list[tuple[float, str]]) -> list[Shot]:
    http = httpx.Client(timeout=BOUND_S + 60)
    shots: list[Shot] = []
    lock = threading.Lock()

    def send(at: float, model: str) -> None:
        shot = Shot(at, model)
        start = time.perf_counter()
        try:
            resp = http.post(f"http://127.0.0.1:{port}/v1/classify", json={"model": model, "input": "fine"})
            shot.status, shot.wake = resp.status_code, resp.headers.get("x-zeroserve-wake", "") or "warm"
        except httpx.HTTPError:
            shot.status = -1
        shot.seconds = time.perf_counter() - start
        with lock:
            shots.append(shot)

    began = time.monotonic()
    with ThreadPoolExecutor(64) as ex:
        for at, model in trace:
            time.sleep(max(0.0, began + at - time.monotonic()))
            ex.submit(send, at, model)
    return sorted(shots, key=lambda s: s.at)


def _rows(label: str, shots: list[Shot], minutes: float) -> list[str]:
    served = sum(1 for s in shots if s.status == 200)
    rows = []
    for cls in CLASSES:
        lat = [s.seconds for s in shots if s.wake == cls and s.status == 200]
        if not lat:
            continue
        rows.append(f"| {label} | {cls} | {len(lat)} | {statistics.median(lat):.2f} | {pct(lat, 99):.2f} |")
    failed = [s for s in shots if s.status != 200]
    evicted = sum(1 for s in shots if s.wake == "evicted")
    summary = (
        f"| {label} | **all** | {len(shots)} | served {served}/{len(shots)} = {served / max(1, len(shots)):.1%} | "
        f"not served: {len(failed)} ({', '.join(sorted({str(s.status) for s in failed})) or '-'}); "
        f"wakes after an eviction: {evicted / minutes:.2f}/min |"
    )
    return [*rows, summary]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=0.1, help="requests per second")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    trace = _trace(args.minutes, args.rate, args.seed)
    results: dict[str, list[Shot]] = {}
    with cluster() as (c, port):
        for label, evict in (("eviction on", True), ("eviction off", False)):
            deploy(c, _config(port, evict, models=False), port)
            wait(lambda: not set(MODELS) & set(_apps(c)), 180)
            deploy(c, _config(port, evict), port)
            wait(lambda: all(_apps(c).get(n, {}).get("status") == "RUNNING" for n in MODELS) and not _awake(c), 180)
            print(f"{label}: {len(trace)} requests over {args.minutes:g} min", flush=True)
            results[label] = _play(port, trace)
            for line in _rows(label, results[label], args.minutes):
                print(line, flush=True)
    commit = head_commit()
    lines = [
        f"`bench/pool_trace.py --minutes {args.minutes:g} --rate {args.rate:g} --seed {args.seed}`, commit {commit}; "
        f"{machine()}.",
        "Sixteen copies of tiny-sentiment at 0.25 on one logical GPU (four slices), one-minute idle delay,",
        f"`min_hold_s` 10 s; {len(trace)} requests, Poisson arrivals at {args.rate:g}/s, Zipf popularity",
        f"(s = {ZIPF_S}); the same trace with the pool's eviction on and off, one after the other on fresh",
        f"applications; cold-start bound {BOUND_S:.0f} s. Classes from the gateway's `X-Zeroserve-Wake`;",
        "seconds from request to answer.",
        "",
        "| pool | class | requests | p50 s | p99 s |",
        "| --- | --- | --- | --- | --- |",
        *(line for label in results for line in _rows(label, results[label], args.minutes)),
        "",
        "With equal fractions each wake after an eviction evicted exactly one model, so its rate is the",
        "eviction rate.",
    ]
    publish("pool-trace", lines, write=not args.no_write)


if __name__ == "__main__":
    main()

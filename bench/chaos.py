"""``make chaos``: the reliability suite's long version, figures to docs/reliability.md.

On a private local cluster (loopback only) with three warm models and two gateway
replicas: a mixed load of up to --requests requests (embeddings, classification, chat
and completions, streamed and not) while each fault kind is injected --rounds times
(SIGKILL of a model replica, ray.kill of a gateway replica, ray.kill of the Serve
controller); per fault kind the time back to full service. Then a model whose
constructor fails (time to its clear 503), a rolling redeploy under load, and
schemathesis against the live gateway and its real engines.

    .venv/bin/python bench/chaos.py [--requests 2000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
from common import ROOT, cluster, demo_config, deploy, machine, wait, write_section

from zeroserve.chaos import Fault, Pool, run_faults
from zeroserve.loadgen import Tally, mixed, run_load

EMB, GEN, CLS = "all-MiniLM-L6-v2", "tiny-llama", "tiny-sentiment"
MIX = mixed(EMB, GEN, CLS)
DOC = ROOT / "docs" / "reliability.md"


def config(port: int, extra: dict[str, dict[str, Any]] | None = None, **gen: Any) -> dict[str, Any]:
    cfg = demo_config(port, {"min_replicas": 1, "max_replicas": 1}, only=(EMB, GEN, CLS))
    cfg["applications"][0]["args"] = {**cfg["applications"][0]["args"], "num_replicas": 2}
    apps = cfg["applications"]
    for app in apps:
        if app["name"] == GEN:
            app["args"].update(gen)
    for name, args in (extra or {}).items():
        apps.append({"name": name, "route_prefix": None, "import_path": "deployments.model:build", "args": args})
    cfg["applications"] = apps
    return cfg


def row(name: str, t: Tally) -> str:
    return f"| {name} | {t.sent} | {t.count('ok')} | {t.count('retryable')} | {t.count('lost')} |"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--fuzz", type=int, default=30, help="schemathesis examples per operation and mode")
    args = parser.parse_args()
    lines = [f"Machine: {machine()}.", ""]
    with cluster() as (c, port):
        pool = Pool(f"http://127.0.0.1:{port}", c.dashboard_url, c.address)
        deploy(c, config(port), port)
        wait(
            lambda: (
                all(pool.running_replica_ids(m) for m in (EMB, GEN, CLS))
                and len(pool.running_replica_ids("gateway")) == 2
            ),
            300,
        )
        assert run_load(pool.base_url, MIX, requests=10, concurrency=2).count("ok") == 10

        kinds = [
            Fault("sigkill_model_replica", GEN),
            Fault("ray_kill_gateway_replica", "gateway"),
            Fault("ray_kill_controller"),
            Fault("sigkill_model_replica", EMB),
        ]
        report = run_faults(pool, MIX, kinds * args.rounds, requests=args.requests, concurrency=6, log=print)
        recovery: dict[str, list[float]] = defaultdict(list)
        for f in report.faults:
            recovery[f.fault.kind].append(f.recovered_s if f.recovered_s is not None else float("inf"))
        t = report.tally
        print(t.summary())
        problems = report.judge()
        for f in report.faults:
            print(f"{f.fault.kind} at {f.at_s:.1f} s: {f.in_flight} requests in flight, recovered in {f.recovered_s}")
        if problems:  # a figure is published only for a run that tested what it claims
            raise SystemExit("not published: " + "; ".join(problems))
        lines += [
            f"### Faults under load ({report.duration_s:.0f} s, concurrency 6, {len(report.faults)} faults)",
            "",
            "| scenario | sent | succeeded | retryable error | lost |",
            "|---|---|---|---|---|",
            row("SIGKILL model replicas, ray.kill gateway replica and controller", t),
            "",
            "Retryable errors seen: "
            + (", ".join(f"{k} x{v}" for k, v in sorted(t.reasons().items())) or "none")
            + ".",
            "",
            "| fault | times | requests in flight when it hit, each | recovery to full service, each (s) |",
            "|---|---|---|---|",
        ]
        for kind, times in recovery.items():
            hits = ", ".join(str(f.in_flight) for f in report.faults if f.fault.kind == kind)
            lines.append(f"| {kind} | {len(times)} | {hits} | {', '.join(f'{x:.1f}' for x in times)} |")

        # A model that cannot start: how long until its requests get a clear 503, and Serve gives up.
        broken_dir = Path(tempfile.mkdtemp()) / "broken"
        broken_dir.mkdir()
        (broken_dir / "config.json").write_text("{ not json")
        emb_args = next(a["args"] for a in config(port)["applications"] if a["name"] == EMB)
        broken = {**emb_args, "model": str(broken_dir), "autoscaling": {"min_replicas": 0, "max_replicas": 1}}
        deploy(c, config(port, {"broken": broken}), port)
        wait(lambda: "broken" in httpx.get(f"{pool.base_url}/v1/models", timeout=10).text, 120)
        t0 = time.monotonic()
        resp = httpx.post(f"{pool.base_url}/v1/embeddings", json={"model": "broken", "input": "x"}, timeout=300)
        to_503 = time.monotonic() - t0
        status = pool.details()["applications"]["broken"]["status"]
        again = time.monotonic()
        resp2 = httpx.post(f"{pool.base_url}/v1/embeddings", json={"model": "broken", "input": "x"}, timeout=60)
        second = time.monotonic() - again
        others = run_load(pool.base_url, MIX, requests=10, concurrency=2)
        lines += [
            "",
            "### A model whose constructor fails",
            "",
            f"First request: {resp.status_code} `{resp.json()['error']['code']}` after {to_503:.1f} s "
            f"(Serve's 3 constructor attempts); app status `{status}`; the next request: {resp2.status_code} "
            f"in {second * 1000:.0f} ms; the other models meanwhile: {others.count('ok')}/{others.sent} ok.",
        ]

        # A rolling redeploy of tiny-llama under load.
        deploy(c, config(port), port)
        before = pool.running_replica_ids(GEN)
        stop = threading.Event()
        out: dict[str, Tally] = {}
        loader = threading.Thread(
            target=lambda: out.update(t=run_load(pool.base_url, MIX, requests=5000, concurrency=4, stop=stop))
        )
        loader.start()
        time.sleep(3)
        t0 = time.monotonic()
        httpx.put(f"{c.dashboard_url}/api/serve/applications/", json=config(port, max_tokens_cap=128), timeout=60)
        wait(lambda: bool(pool.running_replica_ids(GEN)) and not (pool.running_replica_ids(GEN) & before), 300)
        swap = time.monotonic() - t0
        time.sleep(3)
        stop.set()
        loader.join()
        if out["t"].sent == 0:
            raise SystemExit("not published: the redeploy ran under no load")
        lines += [
            "",
            "### Rolling redeploy of one model under load",
            "",
            "| scenario | sent | succeeded | retryable error | lost |",
            "|---|---|---|---|---|",
            row(f"tiny-llama replaced by a new version ({swap:.1f} s to swap)", out["t"]),
        ]
        print(out["t"].summary())

        # Hostile input against the live gateway and real engines, then: does it still serve?
        fuzz = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "fuzz.py"), "--url", pool.base_url, "--examples", str(args.fuzz)],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        after = run_load(pool.base_url, MIX, requests=10, concurrency=2)
        fuzz_lines = [line for line in fuzz.stdout.splitlines() if not line.startswith("machine:")]
        lines += [
            "",
            f"### Fuzzing the live gateway ({args.fuzz} examples per operation and mode)",
            "",
            "```",
            *fuzz_lines[-12:],
            "```",
            "",
            f"Afterwards: {after.count('ok')}/{after.sent} requests of every kind answered.",
        ]
        print(fuzz.stdout, fuzz.stderr[-2000:])
    write_section(DOC, "chaos", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""``make chaos``: the reliability suite's long version, figures to docs/reliability.md.

On a private local cluster (loopback only) with three warm models and two gateway
replicas: a mixed load of up to --requests requests (embeddings, classification, chat
and completions, streamed and not) while each fault kind is injected --rounds times
(SIGKILL of a model replica, ray.kill of a gateway replica, ray.kill of the Serve
controller); per fault kind the time back to full service. Then a model whose
constructor fails (time to its clear 503), a rolling redeploy under load, and
schemathesis against the live gateway and its real engines. Last, on a second cluster of
two nodes, a whole machine lost at once under load (section "machine-loss").

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
from common import ROOT, cluster, demo_config, deploy, head_commit, machine, wait, write_section
from ray.util.state import list_nodes

from zeroserve.chaos import Fault, Pool, run_faults
from zeroserve.cluster import add_node, kill_node
from zeroserve.loadgen import Shot, Tally, mixed, run_load

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
    parser.add_argument("--machine-loss-only", action="store_true", help="only the lost-machine scenario")
    args = parser.parse_args()
    if args.machine_loss_only:
        machine_loss()
        return
    lines = [
        f"`bench/chaos.py --requests {args.requests} --rounds {args.rounds}`, commit {head_commit()}; {machine()}.",
        "",
    ]
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
    machine_loss()


def machine_loss() -> None:
    """Two nodes of one logical GPU each, four half-GPU classifiers awake (two per node), a load
    on one model of each node, and the second machine lost at once: every process of it SIGKILLed
    together. Its model must be answered or refused with Retry-After throughout, and come back on
    the head once an idle model there yields its half."""
    lines = [
        f"`bench/chaos.py --machine-loss-only` (also the end of `make chaos`), commit {head_commit()}; {machine()}.",
        "",
    ]
    awake = {"min_replicas": 0, "initial_replicas": 1, "max_replicas": 1, "downscale_to_zero_delay_s": 600}
    half = {
        "task": "classify",
        "model": "./models/tiny-sentiment",
        "gpu_fraction": 0.5,
        "num_cpus": 0.05,
        "warm": False,
        "min_hold_s": 1,
        "cold_start_timeout_s": 60,
        "autoscaling": awake,
    }
    with cluster(joinable=True) as (c, port):
        pool = Pool(f"http://127.0.0.1:{port}", c.dashboard_url, c.address)
        base = demo_config(port, only=())
        deploy(c, base, port)  # the gateway first, on the head: the lost machine holds models only
        alive = lambda: sum(n.state == "ALIVE" for n in list_nodes(address=c.dashboard_url))  # noqa: E731
        node_env = {"ZEROSERVE_HOME": str(ROOT), "HF_HUB_OFFLINE": "1"}
        for attempt in range(2):  # a node can time out joining a head that is still busy starting
            node = add_node(ROOT / ".run-bench", c, num_gpus=1, num_cpus=2, env=node_env)
            try:
                wait(lambda: alive() == 2, 120)
                break
            except TimeoutError:
                kill_node(node)
                if attempt:
                    raise
        models = [f"h{i}" for i in range(4)]
        base["applications"] += [
            {"name": m, "route_prefix": None, "import_path": "deployments.model:build", "args": dict(half)}
            for m in models
        ]
        deploy(c, base, port)
        wait(lambda: all(pool.running_replica_ids(m) for m in models), 300)
        head = pool.details()["controller_info"]["node_id"]
        on_head = [m for m in models if pool.running(m)[0]["node_id"] == head]
        lost = [m for m in models if m not in on_head]
        shots = [Shot("classify", lost[0]), Shot("classify", on_head[0])]
        report = run_faults(
            pool, shots, [Fault("lose_node", lost[0])], requests=100_000, concurrency=3, recover_within_s=300, log=print
        )
        problems = report.judge()
        (fault,) = report.faults
        print(report.tally.summary())
        if problems:
            raise SystemExit("not published: " + "; ".join(problems))
        after = [o for o in report.tally.outcomes if o.shot.model == lost[0] and o.started + o.latency_s >= fault.at]
        slowest = max(o.latency_s for o in after)
        back_on = [r["node_id"] == head for r in pool.running(lost[0])]
        lines += [
            f"### A whole machine lost under load ({report.duration_s:.0f} s, concurrency 3)",
            "",
            "| scenario | sent | succeeded | retryable error | lost |",
            "|---|---|---|---|---|",
            row("second node's every process SIGKILLed at once", report.tally),
            "",
            "Retryable errors seen: "
            + (", ".join(f"{k} x{v}" for k, v in sorted(report.tally.reasons().items())) or "none")
            + ".",
            "",
            f"Requests in flight when the machine went: {fault.in_flight}. The slowest answer (any verdict) to "
            f"the lost machine's model from then on: {slowest:.1f} s. Back to full service, "
            f"{lost[0]} on the head in the half an idle model gave up: {fault.recovered_s:.1f} s "
            f"(on the head now: {all(back_on) and bool(back_on)}).",
        ]
    write_section(DOC, "machine-loss", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

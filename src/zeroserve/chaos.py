"""Faults on purpose, while a load runs: the reliability suite's other half.

Each fault is what production does to a pool: a model replica's process killed
(SIGKILL, as the OOM killer does), a gateway replica or the Serve controller killed
through Ray (``ray.kill``, as an operator does), or a whole machine lost at once (every
process of a local node SIGKILLed together, as a power loss would). :func:`run_faults` runs
a bounded load (:mod:`zeroserve.loadgen`), injects the faults one after another while
it flows, and times how long the pool takes to return to full service after each.

``ray.kill`` runs in a short-lived child process (``python -m zeroserve.chaos kill``)
so that the caller never becomes a Ray driver itself. Used by the integration tests
(short) and ``bench/chaos.py`` (long, figures in docs/reliability.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from zeroserve.cluster import LOOPBACK_ENV, kill_node
from zeroserve.loadgen import Shot, Tally, run_load

__all__ = ["Fault", "FaultResult", "Pool", "Report", "ray_kill", "run_faults"]

CONTROLLER = "SERVE_CONTROLLER_ACTOR"
FaultKind = Literal["sigkill_model_replica", "ray_kill_gateway_replica", "ray_kill_controller", "lose_node"]


@dataclass(frozen=True)
class Pool:
    """How to reach a running zeroserve: its gateway and its Ray cluster."""

    base_url: str
    dashboard_url: str
    ray_address: str

    def details(self) -> dict[str, Any]:
        """Serve's details, as ``serve status`` reads them from the dashboard."""
        resp = httpx.get(f"{self.dashboard_url}/api/serve/applications/", timeout=30)
        resp.raise_for_status()
        return resp.json()  # type: ignore[no-any-return]

    def replicas(self, app: str) -> list[dict[str, Any]]:
        apps = self.details().get("applications", {})
        if app not in apps:
            return []
        return [r for d in apps[app]["deployments"].values() for r in d["replicas"]]

    def running(self, app: str) -> list[dict[str, Any]]:
        return [r for r in self.replicas(app) if r.get("state") == "RUNNING"]

    def running_replica_ids(self, app: str) -> set[str]:
        return {r["replica_id"] for r in self.running(app)}


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    app: str = ""  # the model (or "gateway") whose replica is hit; lose_node: whose machine is lost


@dataclass
class FaultResult:
    fault: Fault
    at_s: float  # seconds into the load
    recovered_s: float | None  # from the kill to full service; None: not within the bound
    detail: str = ""
    under_load: bool = True  # the load was still flowing when the fault hit
    at: float = 0.0  # time.monotonic() of the fault (the outcomes' clock)
    in_flight: int = 0  # requests sent before the fault that ended after it (set by Report.judge)


@dataclass
class Report:
    tally: Tally
    faults: list[FaultResult] = field(default_factory=list)
    duration_s: float = 0.0

    def judge(self) -> list[str]:
        """Count, for each fault, the requests that were in flight when it hit, and say what makes
        this run unfit to publish: no requests, a fault that hit no live traffic, or one the pool
        did not recover from. Empty: the run counts."""
        problems = []
        if self.tally.sent == 0:
            problems.append("no request was sent")
        for f in self.faults:
            f.in_flight = sum(1 for o in self.tally.outcomes if o.started <= f.at <= o.started + o.latency_s)
            if not f.under_load or f.in_flight == 0:
                problems.append(f"{f.fault.kind} at {f.at_s:.1f} s hit no request in flight")
            if f.recovered_s is None:
                problems.append(f"{f.fault.kind} at {f.at_s:.1f} s: the pool did not recover")
        return problems


def ray_kill(address: str, name: str, namespace: str = "serve") -> None:
    """``ray.kill`` the named actor (it restarts if it may), from a child process."""
    cmd = [
        sys.executable,
        "-m",
        "zeroserve.chaos",
        "kill",
        "--address",
        address,
        "--name",
        name,
        "--namespace",
        namespace,
    ]
    # The child reaches a loopback-only cluster at 127.0.0.1 (see zeroserve.cluster.LOOPBACK_ENV).
    env = {**os.environ, LOOPBACK_ENV: "0"}
    subprocess.run(cmd, check=True, capture_output=True, timeout=120, env=env)


def _inject(pool: Pool, fault: Fault) -> tuple[Callable[[], bool], str]:
    """Do the fault; return the check that says the pool is whole again, and what was hit."""
    if fault.kind == "ray_kill_controller":
        details = pool.details()
        apps = set(details.get("applications", {}))
        before = str(details.get("controller_info", {}).get("actor_id"))
        ray_kill(pool.ray_address, CONTROLLER)

        def back() -> bool:
            now = pool.details()
            running = all(a.get("status") == "RUNNING" for a in now.get("applications", {}).values())
            return running and set(now.get("applications", {})) == apps

        return back, f"controller {before[:8]}"
    victims = pool.running(fault.app)
    if not victims:
        raise RuntimeError(f"no running replica of {fault.app!r} to kill")
    victim = victims[0]
    wanted = len(victims)
    if fault.kind == "sigkill_model_replica":
        os.kill(int(victim["pid"]), signal.SIGKILL)
    elif fault.kind == "lose_node":
        head = pool.details().get("controller_info", {}).get("node_id")
        if victim.get("node_id") == head:
            raise RuntimeError(f"{fault.app!r} runs on the head node (the controller's): not losing the head")
        # A local node is one session (its `ray start`, raylet, workers): all of it goes at once.
        session = os.getsid(int(victim["pid"]))
        kill_node(session)

        def moved() -> bool:
            running = pool.running(fault.app)
            return bool(running) and all(r.get("node_id") != victim.get("node_id") for r in running)

        return moved, f"node {str(victim.get('node_id'))[:8]} (session {session}) with {fault.app}"
    else:
        ray_kill(pool.ray_address, str(victim["actor_name"]))

    def whole() -> bool:
        running = pool.running(fault.app)
        return len(running) >= wanted and victim["replica_id"] not in {r["replica_id"] for r in running}

    return whole, f"{fault.app} replica {victim['replica_id']} (pid {victim.get('pid')})"


def _probe(pool: Pool, shots: list[Shot]) -> bool:
    """One request of each kind answers: the pool serves again."""
    tally = run_load(pool.base_url, shots, requests=len(shots), concurrency=1, timeout_s=60)
    return tally.count("ok") == len(shots)


def run_faults(
    pool: Pool,
    shots: list[Shot],
    faults: list[Fault],
    *,
    requests: int,
    concurrency: int,
    recover_within_s: float = 120.0,
    settle_s: float = 3.0,
    log: Callable[[str], None] = lambda _: None,
) -> Report:
    """Run a load of at most ``requests`` and inject ``faults`` one after another while it flows.

    After each fault the pool must come back whole (replicas replaced, controller back,
    a request of every kind answered) before the next; the load keeps flowing all along.

    Returns:
        The load's outcomes and, per fault, when it hit and how long the pool took to recover.
    """
    stop = threading.Event()
    result: dict[str, Tally] = {}
    t0 = time.monotonic()

    def load() -> None:
        result["tally"] = run_load(pool.base_url, shots, requests=requests, concurrency=concurrency, stop=stop)

    loader = threading.Thread(target=load, name="zeroserve-load", daemon=True)
    loader.start()
    report = Report(Tally())
    try:
        time.sleep(settle_s)
        for fault in faults:
            at = time.monotonic()
            under_load = loader.is_alive()
            whole, what = _inject(pool, fault)
            log(f"{at - t0:6.1f} s  {fault.kind}: {what}")
            recovered: float | None = None
            while time.monotonic() - at < recover_within_s:
                try:
                    if whole() and _probe(pool, shots):
                        recovered = time.monotonic() - at
                        break
                except (httpx.HTTPError, ValueError, KeyError):
                    pass  # the dashboard or the controller is still coming back
                time.sleep(0.5)
            log(f"        recovered in {recovered:.1f} s" if recovered is not None else "        NOT recovered")
            report.faults.append(FaultResult(fault, at - t0, recovered, what, under_load, at))
            if recovered is None:
                break
            time.sleep(settle_s)
    finally:
        # The load stops once every fault has been recovered from (or at its count, if sooner).
        stop.set()
        loader.join(timeout=600)
    report.tally = result.get("tally", Tally())
    report.duration_s = time.monotonic() - t0
    report.judge()
    return report


def _main() -> None:
    parser = argparse.ArgumentParser(prog="python -m zeroserve.chaos")
    sub = parser.add_subparsers(dest="cmd", required=True)
    kill = sub.add_parser("kill", help="ray.kill a named actor (it restarts if it may)")
    kill.add_argument("--address", required=True)
    kill.add_argument("--name", required=True)
    kill.add_argument("--namespace", default="serve")
    args = parser.parse_args()
    import ray

    ray.init(address=args.address, namespace=args.namespace, logging_level=logging.ERROR, log_to_driver=False)
    try:
        ray.kill(ray.get_actor(args.name, namespace=args.namespace), no_restart=False)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    _main()

"""One real Ray cluster for the whole integration session, on free loopback ports.

The cluster has one logical GPU, so fractional placement is Ray's real scheduler at
work. Apps are deployed through the dashboard's REST API, the same call that
``serve deploy`` makes. The cluster is stopped by its own process group at the end.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from zeroserve.chaos import Pool as ChaosPool
from zeroserve.cluster import LocalCluster, free_port, read_cluster, start_local, stop_local
from zeroserve.config import load_serve_config

ROOT = Path(__file__).resolve().parents[2]

# Short delays so scale-to-zero is observable within a test.
FAST_AUTOSCALING = {
    "min_replicas": 0,
    "max_replicas": 1,
    "upscale_delay_s": 0,
    "downscale_delay_s": 2,
    "downscale_to_zero_delay_s": 6,
    "look_back_period_s": 2,
    "metrics_interval_s": 0.5,
}
# Held at one replica: warm from the start, and never scaled down during a test.
WARM = {"min_replicas": 1, "max_replicas": 1}


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.25) -> Any:
    """Poll until ``condition()`` is truthy; fail with ``what`` after the deadline."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as err:  # noqa: BLE001 - retried until the deadline
            last_error = err
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last error: {last_error})")


@dataclass
class Pool:
    """The session's cluster and how to reach it (started by ``_cluster_in_mode``)."""

    http_port: int
    run_dir: Path
    mode: str | None = None  # see cluster_mode; None until a module starts it
    started: LocalCluster | None = None

    @property
    def cluster(self) -> LocalCluster:
        assert self.started is not None, "the session's cluster is started by _cluster_in_mode"
        return self.started

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def openai(self, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0, **kw)

    @property
    def view(self) -> ChaosPool:
        """The pool as zeroserve.chaos sees it (Serve's details, replicas; faults under load)."""
        return ChaosPool(self.base_url, self.cluster.dashboard_url, self.cluster.address)

    def details(self) -> dict[str, Any]:
        return self.view.details()

    def replicas(self, app: str) -> list[dict[str, Any]]:
        return self.view.replicas(app)

    def running_replica_ids(self, app: str) -> set[str]:
        return self.view.running_replica_ids(app)

    def models(self, *names: str, **overrides: Any) -> dict[str, dict[str, Any]]:
        """The demo models called ``names`` (their args, fast autoscaling), each with ``overrides``."""
        return {a["name"]: {**a["args"], **overrides} for a in self.config()["applications"][1:] if a["name"] in names}

    def config(self, models: dict[str, dict[str, Any]] | None = None, **gateway_args: Any) -> dict[str, Any]:
        """The demo config on this pool's port, with fast autoscaling; ``models`` replaces its models.

        API keys are off unless ``auth`` is given (test_demo_keys deploys the demo's own).
        """
        cfg = load_serve_config(ROOT / "serve_config.demo.yaml")
        cfg["http_options"] = {"host": "127.0.0.1", "port": self.http_port}
        apps = cfg["applications"]
        gateway = apps[0]
        gateway["args"] = {**gateway["args"], "auth": {"enabled": False}, **gateway_args}
        if models is None:
            # The demo's own delays are minutes long: the fast ones win here.
            models = {
                a["name"]: {**a["args"], "autoscaling": {**a["args"].get("autoscaling", {}), **FAST_AUTOSCALING}}
                for a in apps[1:]
            }
        cfg["applications"] = [gateway] + [
            {
                "name": name,
                "route_prefix": None,
                "import_path": "deployments.model:build",
                "args": {**copy.deepcopy(args), "autoscaling": {**FAST_AUTOSCALING, **args.get("autoscaling", {})}},
            }
            for name, args in models.items()
        ]
        return cfg

    def deploy(self, config: dict[str, Any], timeout_s: float = 120) -> None:
        """Deploy as `serve deploy` does, then wait for every app and the gateway."""
        resp = httpx.put(f"{self.cluster.dashboard_url}/api/serve/applications/", json=config, timeout=60)
        resp.raise_for_status()
        names = {a["name"] for a in config["applications"]}

        def settled() -> bool:
            apps = self.details().get("applications", {})
            return set(apps) == names and all(apps[n]["status"] == "RUNNING" for n in names)

        wait_for(settled, timeout_s, f"apps {sorted(names)} to be RUNNING")
        expected = names - {"gateway"}

        def listed() -> bool:
            resp = httpx.get(f"{self.base_url}/v1/models", timeout=10)
            return resp.status_code == 200 and {m["id"] for m in resp.json()["data"]} == expected

        wait_for(listed, 60, "the gateway to list the deployed models")


_CLUSTER_ENV = {
    "ZEROSERVE_HOME": str(ROOT),
    "HF_HUB_OFFLINE": "1",
    "ZEROSERVE_LOG_LEVEL": "INFO",
    # Export application metrics every second (Ray's default is 10 s) so tests wait less.
    "RAY_metrics_report_interval_ms": "1000",
}


MODES = ("loopback", "one-hop", "joinable")


def cluster_mode(module: object) -> str:
    """The cluster a test module needs: its ``CLUSTER_MODE`` (one of :data:`MODES`), else loopback.

    "loopback": as ``make run`` starts it; "one-hop": ``start_local(..., one_hop=True)``;
    "joinable": not loopback only, so that ``add_node`` can join more nodes to it.
    """
    mode = getattr(module, "CLUSTER_MODE", "loopback")
    assert mode in MODES, mode
    return str(mode)


def _start(run_dir: Path, mode: str) -> LocalCluster:
    return start_local(
        run_dir, num_gpus=1, env=_CLUSTER_ENV, loopback_only=mode != "joinable", one_hop=mode == "one-hop"
    )


@pytest.fixture(scope="session")
def pool(tmp_path_factory: pytest.TempPathFactory, demo_models: dict[str, Path]) -> Iterator[Pool]:
    """The session's one cluster, started in the mode of the first module that uses it."""
    run_dir = tmp_path_factory.mktemp("ray-run")
    try:
        yield Pool(free_port(), run_dir)
    finally:
        stop_local(run_dir)


@pytest.fixture(scope="module", autouse=True)
def _cluster_in_mode(request: pytest.FixtureRequest) -> None:
    """The session's cluster (re)started in the mode this module needs, if it uses it at all.

    One cluster at a time on this machine, so a mode change is a stop and a start; the modules
    are ordered by mode (tests/conftest.py) so that the session changes mode as few times as it
    can, and a module that needs the loopback cluster after a stop gets it started again. A
    module none of whose tests use ``pool`` (test_redis_ledger) starts nothing.
    """
    items = [i for i in request.session.items if getattr(i, "module", None) is request.module]
    if not any("pool" in getattr(i, "fixturenames", ()) for i in items):
        return
    pool: Pool = request.getfixturevalue("pool")
    mode = cluster_mode(request.module)
    if pool.mode != mode or read_cluster(pool.run_dir) is None:
        stop_local(pool.run_dir)
        pool.started = _start(pool.run_dir, mode)
        pool.mode = mode


@pytest.fixture(scope="module")
def demo(pool: Pool) -> Pool:
    """The demo models deployed (cold) with fast autoscaling."""
    pool.deploy(pool.config())
    return pool

"""Many nodes: a second Ray node (its own raylet and logical GPU) joins the session cluster;
half-GPU models spread over both and the gateway reaches all, and a cold model evicts an idle
one on the node it then fits on; and losing a whole machine under load loses no request, its model
coming back on the surviving node once there is room."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from ray.util.state import list_nodes

from zeroserve.chaos import Fault, run_faults
from zeroserve.cluster import add_node, kill_node
from zeroserve.loadgen import Shot

from .conftest import WARM, Pool, wait_for

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_MODE = "joinable"  # other nodes may join (conftest.cluster_mode)
ARGS = {
    "task": "classify",
    "model": "./models/tiny-sentiment",
    "gpu_fraction": 0.25,
    "num_cpus": 0.05,
    "cold_start_timeout_s": 10,
    "autoscaling": WARM,
}


def _alive_nodes(pool: Pool) -> int:
    return sum(1 for n in list_nodes(address=pool.cluster.dashboard_url) if n.state == "ALIVE")


def _classify(pool: Pool, model: str) -> httpx.Response:
    return httpx.post(f"{pool.base_url}/v1/classify", json={"model": model, "input": "I love it"}, timeout=60)


@contextlib.contextmanager
def _second_node(pool: Pool) -> Iterator[Any]:
    """The gateway deployed alone on the head, then a second node (one logical GPU) joined; killed after."""
    # The gateway first, while the head is the only node: losing the second node is about its
    # models (a gateway replica on a lost node is issue 15's whole-machine case).
    pool.deploy(pool.config({}))
    before = _alive_nodes(pool)
    node = add_node(
        pool.run_dir, pool.cluster, num_gpus=1, num_cpus=2, env={"ZEROSERVE_HOME": str(ROOT), "HF_HUB_OFFLINE": "1"}
    )
    try:
        wait_for(lambda: _alive_nodes(pool) == before + 1, 60, "the second node to join")
        yield node
    finally:
        kill_node(node)


def test_two_nodes_spread_evict_where_room_is_and_lose_no_request_when_one_is_lost(pool: Pool) -> None:
    """Four idle half-GPU models fill the GPUs of two nodes, two on each, and the gateway reaches
    all of them; a fifth, cold, is answered after one of them yields, and its replica lands on the
    node that model left. Then, with a load on one model of each node, the second machine is lost
    at once: every request is answered or refused with Retry-After (none hangs or is cut), and the
    lost model comes back on the head once an idle model there yields its half.

    One test: a second node and its replicas take a minute to start on two cores."""
    with _second_node(pool):
        awake = {"min_replicas": 0, "initial_replicas": 1, "max_replicas": 1, "downscale_to_zero_delay_s": 600}
        half = {**ARGS, "gpu_fraction": 0.5, "warm": False, "min_hold_s": 1, "cold_start_timeout_s": 45}
        models = {f"h{i}": {**half, "autoscaling": awake} for i in range(4)}
        cold = {**half, "autoscaling": {**awake, "initial_replicas": 0}}
        pool.deploy(pool.config({**models, "h4": cold}), timeout_s=300)
        wait_for(lambda: all(pool.running_replica_ids(m) for m in models), 300, "four replicas running")

        placement = {m: pool.replicas(m)[0]["node_id"] for m in models}
        per_node = Counter(placement.values())
        assert len(per_node) == 2 and sorted(per_node.values()) == [2, 2], per_node
        with ThreadPoolExecutor(4) as ex:
            answers = list(ex.map(lambda m: _classify(pool, m), models))
        assert [r.status_code for r in answers] == [200] * 4
        listed = {
            m["id"]: m["zeroserve"]["nodes"]
            for m in httpx.get(f"{pool.base_url}/v1/models", timeout=10).json()["data"]
            if m["id"] in models
        }
        assert {tuple(v) for v in listed.values()} == {(n,) for n in per_node}

        # A cold model evicts an idle one, on the node where that frees the room it needs.
        time.sleep(2)  # past every model's min_hold_s
        assert _classify(pool, "h4").status_code == 200
        gone = [m for m in models if not pool.running_replica_ids(m)]
        assert len(gone) == 1, gone
        (h4,) = [r["node_id"] for r in pool.replicas("h4") if r.get("state") == "RUNNING"]
        assert h4 == placement[gone[0]]

        # The second machine lost under load.
        up = [m for m in [*models, "h4"] if m not in gone]
        head = next(n.node_id for n in list_nodes(address=pool.cluster.dashboard_url) if n.is_head_node)
        on_head = [m for m in up if pool.view.running(m)[0]["node_id"] == head]
        lost = [m for m in up if m not in on_head]
        assert len(on_head) == 2 and len(lost) == 2, on_head
        # The load: one model that loses its machine, one on the head (busy, so it never yields).
        shots = [Shot("classify", lost[0]), Shot("classify", on_head[0])]
        report = run_faults(
            pool.view, shots, [Fault("lose_node", lost[0])], requests=100_000, concurrency=3, recover_within_s=120
        )
        tally = report.tally
        assert report.judge() == [], (
            report.judge(),
            tally.reasons(),
            [
                (d["status"], d["message"], [(r["state"], r.get("node_id")) for r in d["replicas"]])
                for d in pool.details()["applications"][lost[0]]["deployments"].values()
            ],
        )
        assert tally.count("lost") == 0, [(o.shot.model, o.status, o.reason) for o in tally.lost()][:5]
        assert any(o.shot.model == lost[0] and o.verdict == "retryable" for o in tally.outcomes), tally.summary()
        # Back on the head, in the half the idle head model gave up.
        assert [r["node_id"] for r in pool.replicas(lost[0]) if r.get("state") == "RUNNING"] == [head]
        assert not pool.running_replica_ids(on_head[1])

"""More models than GPU slices: an idle model yields its slice to one that cannot be placed.

Five cheap models at 0.25 on the cluster's one logical GPU (four slices), each with a scale-to-zero
delay of ten minutes: without the pool, the fifth would wait for one of them to go idle for ten
minutes. With it, the least recently used idle model that is not pinned yields at once.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from .conftest import Pool, wait_for

NAMES = [f"pool-{i}" for i in range(5)]


@pytest.fixture(scope="module")
def full_pool(pool: Pool) -> Pool:
    cheap = pool.models("tiny-sentiment")["tiny-sentiment"]
    hold = {"downscale_to_zero_delay_s": 600, "look_back_period_s": 1, "max_replicas": 1}
    models = {
        name: {**cheap, "gpu_fraction": 0.25, "min_hold_s": 1, "pinned": i == 0, "autoscaling": hold}
        for i, name in enumerate(NAMES)
    }
    pool.deploy(pool.config(models))
    return pool


def _evicting(pool: Pool) -> set[str]:
    listed = httpx.get(f"{pool.base_url}/v1/models", timeout=10).json()["data"]
    return {m["id"] for m in listed if m["zeroserve"]["evicting"]}


def _running(pool: Pool, name: str) -> int:
    return len(pool.running_replica_ids(name))


def test_a_fifth_model_is_served_after_an_idle_one_yields(full_pool: Pool) -> None:
    client = full_pool.openai(timeout=180)
    for name in NAMES[:4]:
        assert client.post("/classify", body={"model": name, "input": "fine"}, cast_to=object)
        wait_for(lambda n=name: _running(full_pool, n) == 1, 60, f"{name} to hold a slice")
    started = time.monotonic()
    with ThreadPoolExecutor(1) as ex:
        fifth = ex.submit(client.post, "/classify", body={"model": NAMES[4], "input": "fine"}, cast_to=object)
        # While it waits, /v1/models shows which model is giving its slice up.
        wait_for(lambda: _evicting(full_pool) == {NAMES[1]}, 60, "pool-1 listed as evicting")
        answer = fifth.result(timeout=180)
    waited = time.monotonic() - started
    assert answer
    # The least recently used model that is not pinned (pool-1) gave way; pool-0 is pinned.
    wait_for(lambda: _running(full_pool, NAMES[1]) == 0, 30, "pool-1 to have yielded")
    assert _running(full_pool, NAMES[0]) == 1
    assert all(_running(full_pool, n) == 1 for n in NAMES[2:])
    assert waited < 120, f"the fifth model waited {waited:.0f} s"


def _at_zero(pool: Pool, names: list[str]) -> list[str]:
    return [n for n in names if _running(pool, n) == 0]


def test_two_gateway_replicas_racing_for_one_slot_evict_one_model(full_pool: Pool) -> None:
    """Requests for one cold model arrive through two gateway replicas at once: one claim, one victim."""
    models = {n: a["args"] for n, a in _apps(full_pool).items()}
    full_pool.deploy(full_pool.config(models, num_replicas=2))
    wait_for(lambda: len(full_pool.running_replica_ids("gateway")) == 2, 120, "two gateway replicas")
    cold = _at_zero(full_pool, NAMES)
    assert len(cold) == 1, cold  # the first test's victim
    (late,) = cold
    resident = [n for n in NAMES[1:] if n != late]
    client = full_pool.openai(timeout=180)
    with ThreadPoolExecutor(6) as ex:
        answers = list(
            ex.map(lambda _: client.post("/classify", body={"model": late, "input": "x"}, cast_to=object), range(6))
        )
    assert all(answers)
    wait_for(lambda: _running(full_pool, late) == 1, 60, f"{late} to hold a slice")
    time.sleep(3)  # what is checked is that nothing more happens: a second eviction would within the yield delay
    assert len(_at_zero(full_pool, resident)) == 1, {n: _running(full_pool, n) for n in NAMES}
    assert _running(full_pool, NAMES[0]) == 1  # pinned


def test_eviction_still_works_after_a_controller_kill(full_pool: Pool) -> None:
    """The yield keys live in the GCS and the policy is rebuilt with the controller."""
    from zeroserve.chaos import CONTROLLER, ray_kill

    def worker() -> object:
        return full_pool.details().get("controller_info", {}).get("worker_id")

    before = worker()
    ray_kill(full_pool.cluster.address, CONTROLLER)
    # The same actor restarts in a new worker process.
    wait_for(lambda: worker() not in (None, before), 120, "the controller to restart")
    wait_for(
        lambda: all(a["status"] == "RUNNING" for a in full_pool.details()["applications"].values()), 120, "apps back"
    )
    late = _at_zero(full_pool, NAMES)[0]
    answer = full_pool.openai(timeout=180).post("/classify", body={"model": late, "input": "x"}, cast_to=object)
    assert answer
    assert len(_at_zero(full_pool, NAMES)) == 1 and _running(full_pool, late) == 1


def _apps(pool: Pool) -> dict[str, dict[str, object]]:
    """The deployed model applications' configs, by name."""
    cfg = pool.details().get("applications", {})
    return {n: a["deployed_app_config"] for n, a in cfg.items() if n in NAMES}

"""More models than GPU slices: an idle model yields its slice to one that cannot be placed.

Five cheap models at 0.25 on the cluster's one logical GPU (four slices), each with a scale-to-zero
delay of ten minutes: without the pool, the fifth would wait for one of them to go idle for ten
minutes. With it, the least recently used idle model that is not pinned yields at once.
"""

from __future__ import annotations

import time

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


def _running(pool: Pool, name: str) -> int:
    return len(pool.running_replica_ids(name))


def test_a_fifth_model_is_served_after_an_idle_one_yields(full_pool: Pool) -> None:
    client = full_pool.openai(timeout=180)
    for name in NAMES[:4]:
        assert client.post("/classify", body={"model": name, "input": "fine"}, cast_to=object)
        wait_for(lambda n=name: _running(full_pool, n) == 1, 60, f"{name} to hold a slice")
    started = time.monotonic()
    answer = client.post("/classify", body={"model": NAMES[4], "input": "fine"}, cast_to=object)
    waited = time.monotonic() - started
    assert answer
    # The least recently used model that is not pinned (pool-1) gave way; pool-0 is pinned.
    wait_for(lambda: _running(full_pool, NAMES[1]) == 0, 30, "pool-1 to have yielded")
    assert _running(full_pool, NAMES[0]) == 1
    assert all(_running(full_pool, n) == 1 for n in NAMES[2:])
    assert waited < 120, f"the fifth model waited {waited:.0f} s"

"""The warm tier: a woken model attaches to its copy kept built in host memory (deployments/warm.py).

What is checked is the path each wake took, as the replica recorded it (``stats()["start_path"]``:
"warm" attached to a built copy, "cold" built it, "changed" rebuilt it because its files changed),
and that every answer is right; the timings are bench/cold_start.py's.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import ROOT, Pool, wait_for

NAMES = ["warm-a", "warm-b", "warm-c"]
QUICK = {"min_replicas": 0, "max_replicas": 1, "downscale_to_zero_delay_s": 2, "look_back_period_s": 1}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the demo classifier that the tests may rewrite."""
    out = tmp_path_factory.mktemp("warm") / "cls"
    shutil.copytree(ROOT / "models" / "tiny-sentiment", out)
    return out


@pytest.fixture(scope="module")
def warm_pool(pool: Pool, folder: Path) -> Iterator[Pool]:
    import ray
    from ray import serve

    weights = (folder / "model.safetensors").stat().st_size
    args = {**pool.models("tiny-sentiment")["tiny-sentiment"], "model": str(folder), "min_hold_s": 0}
    models = {n: {**args, "autoscaling": QUICK} for n in NAMES}
    # Room for two copies of the classifier on the node, not three.
    pool.deploy(pool.config(models, host_cache_gb=2.5 * weights / 1024**3))
    ray.init(address=pool.cluster.address, logging_level="ERROR", log_to_driver=False)
    yield pool
    client = serve.context._global_client
    if client is not None:
        client.shutdown_cached_handles()
    ray.shutdown()


def _wake(pool: Pool, name: str) -> tuple[str, list[float]]:
    """Wake ``name`` from zero; its answer's probabilities and the path its replica's start took."""
    from ray import serve

    wait_for(lambda: not pool.running_replica_ids(name), 60, f"{name} at zero")
    resp = httpx.post(f"{pool.base_url}/v1/classify", json={"model": name, "input": "I love it"}, timeout=180)
    assert resp.status_code == 200, resp.text
    path = serve.get_app_handle(name).stats.remote().result(timeout_s=60)["start_path"]
    return path, resp.json()["data"][0]["probs"]


def test_a_budget_of_two_keeps_the_two_last_woken_warm_and_all_three_answer(warm_pool: Pool) -> None:
    answers = {name: _wake(warm_pool, name)[1] for name in NAMES}
    assert answers["warm-a"] == pytest.approx(answers["warm-b"]) and answers["warm-a"] == pytest.approx(
        answers["warm-c"]
    )
    # warm-c's wake kept the two last woken; warm-a, the least recently used, left the warm tier.
    path_c, probs_c = _wake(warm_pool, "warm-c")
    assert path_c == "warm" and probs_c == pytest.approx(answers["warm-c"])
    path_a, probs_a = _wake(warm_pool, "warm-a")
    assert path_a == "cold" and probs_a == pytest.approx(answers["warm-a"])


def test_a_changed_folder_is_built_again_and_its_answers_change(warm_pool: Pool, folder: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    _, before = _wake(warm_pool, "warm-b")
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    head = model.classifier if hasattr(model, "classifier") else model.score
    head.weight.data = head.weight.data.flip(0)  # the labels' rows swapped: the answers swap too
    if getattr(head, "bias", None) is not None:
        head.bias.data = head.bias.data.flip(0)
    model.save_pretrained(folder)
    path, after = _wake(warm_pool, "warm-b")
    assert path == "changed"
    assert after == pytest.approx(list(reversed(before)), abs=1e-5)


def test_a_killed_warm_process_is_replaced_and_the_next_wake_is_answered(warm_pool: Pool) -> None:
    from ray.util.state import list_actors

    def warm_pids() -> dict[str, int]:
        actors = list_actors(
            address=warm_pool.cluster.dashboard_url, filters=[("class_name", "=", "WarmModel"), ("state", "=", "ALIVE")]
        )
        return {a.name: a.pid for a in actors if "warm-c" in (a.name or "")}

    ((_, pid),) = warm_pids().items()
    os.kill(pid, signal.SIGKILL)
    # The wake waits for the controller to start a new warm process (it builds the model).
    path, probs = _wake(warm_pool, "warm-c")
    assert path in ("warm", "cold") and len(probs) == 2 and abs(sum(probs) - 1) < 1e-5
    assert warm_pids() and pid not in warm_pids().values()

"""The reliability suite, short version: faults, overload and redeploys while traffic flows.

Every request must end in success or a clear, retryable error (503/429 with
Retry-After, or an SSE error event); none may hang, be cut short or turn into a bare
500. The long versions with figures are ``make chaos`` and ``make load``
(docs/reliability.md); these assert the properties, not timings.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx

from zeroserve.chaos import Fault, run_faults
from zeroserve.loadgen import Shot, mixed, run_load

from .conftest import WARM, Pool, wait_for

EMB = "all-MiniLM-L6-v2"
GEN = "tiny-llama"
CLS = "tiny-sentiment"

MIX = mixed(EMB, GEN, CLS)


def _explain(tally: Any) -> str:
    lost = tally.lost()
    return f"{tally.summary()}; first lost: {[(o.shot, o.status, o.reason) for o in lost[:5]]}"


def test_kills_during_load_lose_no_request(pool: Pool) -> None:
    models = pool.models(EMB, GEN, CLS, autoscaling=WARM)
    pool.deploy(pool.config(models, num_replicas=2))
    wait_for(lambda: all(pool.running_replica_ids(m) for m in models), 120, "the models to be warm")
    wait_for(lambda: len(pool.running_replica_ids("gateway")) == 2, 60, "two gateway replicas")

    faults = [
        Fault("sigkill_model_replica", GEN),
        Fault("ray_kill_gateway_replica", "gateway"),
        Fault("ray_kill_controller"),
        Fault("sigkill_model_replica", EMB),
    ]
    # At most 2000 requests; the load stops a few seconds after the last fault's recovery.
    report = run_faults(pool.view, MIX, faults, requests=2000, concurrency=4, recover_within_s=120)

    tally = report.tally
    assert len(report.faults) == len(faults)
    for result in report.faults:
        assert result.recovered_s is not None, f"{result.fault} not recovered: {result.detail}"
    # Every fault hit requests in flight (a fault between requests tests nothing).
    assert report.judge() == [], report.faults
    assert tally.count("lost") == 0, _explain(tally)
    assert tally.count("ok") > tally.sent // 2, _explain(tally)
    # Whole again: every model answers through both gateway replicas.
    assert run_load(pool.base_url, MIX * 2, requests=10, concurrency=2).count("ok") == 10


def test_broken_model_fails_clearly_and_the_others_keep_serving(pool: Pool, tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{ this is not json")
    models = pool.models(EMB)
    models["broken"] = {**models[EMB], "model": str(broken), "description": "weights that do not load"}
    pool.deploy(pool.config(models))

    started = time.monotonic()
    resp = httpx.post(f"{pool.base_url}/v1/embeddings", json={"model": "broken", "input": "x"}, timeout=180)
    assert resp.status_code == 503, resp.text
    assert int(resp.headers["retry-after"]) > 0
    error = resp.json()["error"]
    assert "broken" in error["message"] and error["code"] == "model_failed", error
    assert time.monotonic() - started < 150

    # Serve stopped retrying (3 constructor attempts): the app is marked failed and stays without replicas.
    app = pool.details()["applications"]["broken"]
    assert app["status"] in ("DEPLOY_FAILED", "UNHEALTHY"), app["status"]
    listed = {m["id"]: m["zeroserve"] for m in httpx.get(f"{pool.base_url}/v1/models", timeout=10).json()["data"]}
    assert listed["broken"]["state"] == "failed"
    time.sleep(3)  # a retry would show as a starting replica
    assert pool.replicas("broken") == []
    # A second request is refused at once, naming the model.
    t0 = time.monotonic()
    again = httpx.post(f"{pool.base_url}/v1/embeddings", json={"model": "broken", "input": "x"}, timeout=30)
    assert again.status_code == 503 and "broken" in again.json()["error"]["message"]
    assert time.monotonic() - t0 < 30  # at once, not after the 120 s cold-start bound
    ok = httpx.post(f"{pool.base_url}/v1/embeddings", json={"model": EMB, "input": "still serving"}, timeout=120)
    assert ok.status_code == 200, ok.text


def test_a_request_racing_its_models_deploy_waits_and_is_answered(pool: Pool) -> None:
    """Serve creates a new application's deployment a moment after the application: a request
    in between must wait for it (bounded), not hold a handle to a deployment that never comes."""
    base = pool.models(EMB)
    pool.deploy(pool.config(base))
    late = pool.models(CLS)
    httpx.put(
        f"{pool.cluster.dashboard_url}/api/serve/applications/", json=pool.config({**base, **late}), timeout=60
    ).raise_for_status()
    body = {"model": CLS, "input": "I love it"}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        resp = httpx.post(f"{pool.base_url}/v1/classify", json=body, timeout=150)
        if resp.status_code != 404:
            break
        time.sleep(0.05)
    assert resp.status_code == 200, resp.text


def test_twice_the_load_is_shed_with_retry_after_and_drains(pool: Pool) -> None:
    # One replica taking 2 at a time, 2 more may wait: at concurrency 12 most of the load is excess.
    models = pool.models(CLS, max_ongoing_requests=2, max_queued_requests=2, autoscaling={"min_replicas": 1})
    pool.deploy(pool.config(models))
    wait_for(lambda: pool.running_replica_ids(CLS), 120, f"{CLS} warm")

    tally = run_load(pool.base_url, [Shot("classify", CLS)], requests=240, concurrency=12)
    assert tally.count("lost") == 0, _explain(tally)
    shed = [o for o in tally.outcomes if o.verdict == "retryable"]
    served = [o for o in tally.outcomes if o.verdict == "ok"]
    assert shed and served, tally.summary()
    assert all(o.status in (429, 503) for o in shed)
    # Shedding is a quick answer, not a wait for the 120 s request bound.
    slowest_refusal = max(o.latency_s for o in shed)
    assert slowest_refusal < 30, f"a refusal took {slowest_refusal:.1f} s"

    # The load stopped: nothing is left queued or in flight, and the model serves normally.
    def drained() -> bool:
        status = httpx.get(f"{pool.base_url}/v1/zeroserve/status", timeout=10).json()
        model = next(m for m in status["models"] if m["id"] == CLS)
        return model["queued"] == 0 and model["in_flight"] == 0

    wait_for(drained, 30, "the queue to drain")
    assert run_load(pool.base_url, [Shot("classify", CLS)], requests=4, concurrency=1).count("ok") == 4


def test_rolling_redeploy_under_traffic_loses_nothing(pool: Pool) -> None:
    models = pool.models(GEN, EMB, autoscaling=WARM)
    pool.deploy(pool.config(models))
    wait_for(lambda: pool.running_replica_ids(GEN) and pool.running_replica_ids(EMB), 120, "models warm")
    before = pool.running_replica_ids(GEN)

    stop = threading.Event()
    result: dict[str, Any] = {}
    shots = [Shot("chat_stream", GEN), Shot("chat", GEN), Shot("embed", EMB)]
    loader = threading.Thread(
        target=lambda: result.update(tally=run_load(pool.base_url, shots, requests=2000, concurrency=3, stop=stop))
    )
    loader.start()
    try:
        time.sleep(2)  # traffic flows before the redeploy (a duration of load, not a wait for a state)
        # A new version of tiny-llama (a different cap): Serve replaces its replica, one at a time.
        changed = {**models, GEN: {**models[GEN], "max_tokens_cap": 128}}
        pool.deploy(pool.config(changed))
        wait_for(lambda: (ids := pool.running_replica_ids(GEN)) and not (ids & before), 120, "the new replica")
        time.sleep(3)  # and keeps flowing to the new version for a while
    finally:
        stop.set()
        loader.join(timeout=180)
    tally = result["tally"]
    assert tally.sent > 10
    assert tally.count("ok") == tally.sent, _explain(tally)

"""API keys and GPU-second quotas through the real gateway: two gateway replicas on one
SQLite ledger, a restart that keeps the counts, a revoked key, a small budget refused with
its reset time, and a high-priority request jumping a queue of low-priority ones."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import Pool, wait_for

EMB, GEN, VLLM = "all-MiniLM-L6-v2", "tiny-llama", "tiny-llama-vllm"


def _keys(ledger: Path, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "zeroserve.cli", "keys", *args, "--ledger-path", str(ledger)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


def _auth_config(pool: Pool, ledger: Path, **gateway: Any) -> dict[str, Any]:
    models = pool.models(EMB, VLLM)
    # One request at a time on the vLLM model, so that others queue in the gateway.
    models[VLLM] = {
        **models[VLLM],
        "max_ongoing_requests": 1,
        "max_tokens_cap": 400,
        "autoscaling": {"downscale_to_zero_delay_s": 120},
    }
    auth = {
        "enabled": True,
        "ledger": {"backend": "sqlite", "path": str(ledger)},
        "tiers": {
            "tiny": {"daily_gpu_seconds": 0.02, "requests_per_minute": 1000},
            "low": {"daily_gpu_seconds": 10_000, "priority": 0, "max_concurrent": 8, "requests_per_minute": 1000},
            "high": {"daily_gpu_seconds": 10_000, "priority": 10, "requests_per_minute": 1000},
        },
    }
    return pool.config(models, auth=auth, **gateway)


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ledger") / "ledger.sqlite3"


def _embed(pool: Pool, key: str | None, text: str = "hello") -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(
        f"{pool.base_url}/v1/embeddings", json={"model": EMB, "input": text}, headers=headers, timeout=120
    )


def test_budget_usage_two_replicas_restart_and_revoke(pool: Pool, ledger: Path) -> None:
    pool.deploy(_auth_config(pool, ledger, num_replicas=2))
    wait_for(lambda: len(pool.running_replica_ids("gateway")) == 2, 60, "two gateway replicas")
    key = _keys(ledger, "create", "--tier", "tiny")
    assert _embed(pool, None).status_code == 401
    charges, refused = [], None
    for i in range(200):  # spend the small budget, through both gateway replicas
        resp = _embed(pool, key, f"sentence number {i}")
        if resp.status_code == 429:
            refused = resp
            break
        assert resp.status_code == 200, resp.text
        charges.append(float(resp.headers["x-zeroserve-gpu-seconds"]))
    assert refused is not None, "the budget was never exhausted"
    assert refused.json()["error"]["code"] == "quota_exceeded"
    assert int(refused.headers["retry-after"]) > 0 and "resets at" in refused.json()["error"]["message"]
    usage = httpx.get(f"{pool.base_url}/v1/usage", headers={"authorization": f"Bearer {key}"}, timeout=30).json()
    # The headers carry 6 decimals: the sum of the charges matches within that rounding.
    assert usage["gpu_seconds_used"] == pytest.approx(sum(charges), abs=1e-6 * len(charges))
    assert usage["resets_at"].endswith("T00:00:00Z")
    # Refused up front: the day's budget is spent, or what is left is less than the cost this
    # gateway replica predicts for one more input (its measured cost per input).
    message = refused.json()["error"]["message"]
    assert usage["gpu_seconds_remaining"] == 0 or "would cost about" in message, (usage, message)

    # A restarted gateway (new replicas) keeps the counts.
    before = pool.running_replica_ids("gateway")
    pool.deploy(_auth_config(pool, ledger, num_replicas=2, keepalive_s=4.0))
    wait_for(
        lambda: len(pool.running_replica_ids("gateway")) == 2 and not pool.running_replica_ids("gateway") & before,
        120,
        "new gateway replicas",
    )
    again = httpx.get(f"{pool.base_url}/v1/usage", headers={"authorization": f"Bearer {key}"}, timeout=30).json()
    assert again["gpu_seconds_used"] == pytest.approx(usage["gpu_seconds_used"], rel=1e-12)

    # A revoked key stops at once.
    other = _keys(ledger, "create", "--tier", "low")
    assert _embed(pool, other).status_code == 200
    key_id = other.split("-")[1]
    _keys(ledger, "revoke", key_id)
    assert _embed(pool, other).status_code == 401


def test_high_priority_jumps_the_queue(pool: Pool, ledger: Path) -> None:
    pool.deploy(_auth_config(pool, ledger, num_replicas=1))
    low, high = _keys(ledger, "create", "--tier", "low"), _keys(ledger, "create", "--tier", "high")
    # 400 tokens each, whatever the model would say (vLLM's ignore_eos): about a second each here.
    body = {"model": VLLM, "prompt": "The", "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    # Warm the model (a cold start would blur the order).
    assert (
        httpx.post(
            f"{pool.base_url}/v1/completions",
            json={**body, "max_tokens": 2},
            headers={"authorization": f"Bearer {low}"},
            timeout=300,
        ).status_code
        == 200
    )
    finished: list[str] = []
    lock = threading.Lock()

    def call(name: str, key: str) -> None:
        resp = httpx.post(
            f"{pool.base_url}/v1/completions", json=body, timeout=300, headers={"authorization": f"Bearer {key}"}
        )
        assert resp.status_code == 200, resp.text
        with lock:
            finished.append(name)

    threads = [threading.Thread(target=call, args=(f"low{i}", low)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # the lows are queued behind the one running
    jumper = threading.Thread(target=call, args=("high", high))
    jumper.start()
    for t in [*threads, jumper]:
        t.join()
    # In arrival order it would finish last; by priority it overtakes the lows still waiting.
    assert finished.index("high") <= 2, finished

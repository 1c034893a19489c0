"""The key ledger down under load, for real: a Redis ledger stopped and started again, and a
SQLite ledger whose file another process holds locked. Requests from a key the gateway
confirmed keep being served and charged (the charges wait in the gateway's journal), a key it
never saw gets a 503 with Retry-After, and once the ledger is back `GET /v1/usage` equals the
sum of the charges of what was served: none lost, none written twice."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from zeroserve.cluster import RedisServer

from .conftest import Pool, wait_for

EMB = "all-MiniLM-L6-v2"
TIERS = {"t": {"daily_gpu_seconds": 10_000, "requests_per_minute": 100_000, "max_concurrent": 64}}


def _create_key(*ledger_args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "zeroserve.cli", "keys", "create", "--tier", "t", *ledger_args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


class Load:
    """Four clients embedding in a loop with one key; every answer is recorded by phase."""

    def __init__(self, pool: Pool, key: str) -> None:
        self.pool, self.key = pool, key
        self.phase = "before"
        self.codes: Counter[tuple[str, int]] = Counter()
        self.charged: list[float] = []
        self.bad: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(4)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.pool.base_url, headers={"authorization": f"Bearer {self.key}"}) as client:
            while not self.stop.is_set():
                phase = self.phase
                resp = client.post("/v1/embeddings", json={"model": EMB, "input": "the ledger"}, timeout=120)
                self.codes[(phase, resp.status_code)] += 1
                if resp.status_code == 200:
                    self.charged.append(float(resp.headers["x-zeroserve-gpu-seconds"]))
                elif not (resp.status_code == 503 and int(resp.headers.get("retry-after", "0")) >= 1):
                    self.bad.append(f"{resp.status_code} {resp.text[:200]}")

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(130)

    def served(self, phase: str) -> int:
        return self.codes[(phase, 200)]


def _usage(pool: Pool, key: str) -> httpx.Response:
    return httpx.get(f"{pool.base_url}/v1/usage", headers={"authorization": f"Bearer {key}"}, timeout=30)


def _embed(pool: Pool, key: str) -> httpx.Response:
    return httpx.post(
        f"{pool.base_url}/v1/embeddings",
        json={"model": EMB, "input": "x"},
        headers={"authorization": f"Bearer {key}"},
        timeout=60,
    )


def _ride_out(
    pool: Pool, key: str, outage: Callable[[], Any], recover: Callable[[], Any], while_down: Callable[[], Any]
) -> tuple[Load, Any]:
    """The load before, during and after an outage; ``while_down``'s result, taken during it.
    Then every charge of what was served must be in the ledger, written once."""
    with Load(pool, key) as load:
        wait_for(lambda: load.served("before") >= 10, 60, "load to be served")
        outage()
        load.phase = "during"
        try:
            wait_for(lambda: load.served("during") >= 10, 60, "the known key to be served during the outage")
            seen = while_down()
        finally:
            recover()
        load.phase = "after"
        wait_for(lambda: load.served("after") >= 10, 60, "load to be served after the outage")
    assert not load.bad, load.bad[:5]
    wait_for(
        lambda: (
            (u := _usage(pool, key)).status_code == 200
            and u.json()["gpu_seconds_used"] == pytest.approx(sum(load.charged), abs=1e-6 * len(load.charged))
        ),
        60,
        f"usage to equal the sum of {len(load.charged)} charges",
    )
    return load, seen


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, persist=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_a_redis_outage_loses_no_charge(pool: Pool, redis_server: RedisServer, tmp_path: Path) -> None:
    ledger = {"backend": "redis", "url": redis_server.url, "journal_dir": str(tmp_path / "journal")}
    pool.deploy(pool.config(pool.models(EMB), auth={"enabled": True, "ledger": ledger, "tiers": TIERS}))
    key, stranger = _create_key("--redis-url", redis_server.url), _create_key("--redis-url", redis_server.url)
    _, refused = _ride_out(pool, key, redis_server.stop, redis_server.start, lambda: _embed(pool, stranger))
    # A key this gateway never saw cannot be checked while the ledger is down.
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "ledger_unavailable", refused.text
    assert int(refused.headers["retry-after"]) >= 1
    assert _embed(pool, stranger).status_code == 200  # known to the ledger again


def test_a_locked_sqlite_ledger_loses_no_charge(pool: Pool, tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = {"backend": "sqlite", "path": str(path)}
    pool.deploy(pool.config(pool.models(EMB), auth={"enabled": True, "ledger": ledger, "tiers": TIERS}))
    key = _create_key("--ledger-path", str(path))
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        # Another process holds the write lock: every charge fails. Reads still work on a
        # locked WAL file, so keys are checked as usual: only charges are down here.
        _, journal = _ride_out(
            pool,
            key,
            lambda: holder.execute("BEGIN IMMEDIATE"),
            lambda: holder.execute("ROLLBACK"),
            lambda: [f.read_text() for f in (tmp_path / "ledger.sqlite3.journal").glob("charges-*.jsonl")],
        )
    finally:
        holder.close()
    assert journal and journal[0].strip(), "the charges were not journaled"

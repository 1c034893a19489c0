"""The key ledger unreachable, through the gateway's HTTP layer: keys it confirmed recently are
served from memory, others get a 503 with Retry-After, charges wait in an on-disk journal and
are written once when the ledger is back, and a journal left by a dead gateway is adopted.

The ledger is the real SQLite one; ``outage`` makes its calls raise what SQLite raises on a
locked file (the real lock and a real Redis stop are in tests/integration/test_ledger_outage.py).
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest

from zeroserve.config import AuthSpec, GatewaySpec
from zeroserve.gateway import create_app
from zeroserve.gateway.fair import FairShare
from zeroserve.gateway.telemetry import NullObserver
from zeroserve.quota import Charge, ChargeJournal, KeyRecord, SQLiteLedger, hash_key, new_key

from .gateway_support import FakeBackend

AUTH = {"enabled": True, "tiers": {"free": {"daily_gpu_seconds": 0.5}, "pro": {"daily_gpu_seconds": 100}}}


class FlakyLedger(SQLiteLedger):
    """A real SQLite ledger whose every call fails while ``outage`` is set."""

    outage = False

    def __getattribute__(self, name: str) -> Any:
        method = object.__getattribute__(self, name)
        if name not in {"find_key", "usage", "charge"}:
            return method

        def call(*args: Any) -> Any:
            if object.__getattribute__(self, "outage"):
                raise sqlite3.OperationalError("database is locked")
            return method(*args)

        return call


class JournalWatch(NullObserver):
    """What the gateway reports of its journal (the ``zeroserve_ledger_journal_charges`` gauge)."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def ledger_journal(self, pending: int) -> None:
        self.seen.append(pending)


def _gateway(
    ledger: SQLiteLedger, observer: NullObserver | None = None, **auth: Any
) -> tuple[httpx.AsyncClient, FairShare]:
    spec = GatewaySpec.model_validate({"auth": {**AUTH, **auth}})
    app = create_app(spec, FakeBackend(), observer, ledger=ledger)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")
    return client, app.state.gateway.fair


def _key(ledger: SQLiteLedger, tier: str) -> str:
    key, key_id = new_key()
    ledger.add_key(hash_key(key), KeyRecord(key_id, "", tier, 0.0))
    return key


async def _embed(client: httpx.AsyncClient, key: str) -> httpx.Response:
    return await client.post(
        "/v1/embeddings", json={"model": "emb", "input": "x"}, headers={"authorization": f"Bearer {key}"}
    )


async def _drained(fair: FairShare, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while fair.pending_charges:
            await asyncio.sleep(0.05)


async def test_known_keys_are_served_and_charged_through_an_outage(tmp_path: Path) -> None:
    ledger = FlakyLedger(tmp_path / "l.db")
    known, stranger = _key(ledger, "pro"), _key(ledger, "pro")
    watch = JournalWatch()
    client, fair = _gateway(ledger, watch)
    charges = [float((await _embed(client, known)).headers["x-zeroserve-gpu-seconds"])]

    ledger.outage = True
    for _ in range(4):
        resp = await _embed(client, known)
        assert resp.status_code == 200, resp.text
        charges.append(float(resp.headers["x-zeroserve-gpu-seconds"]))
    # Each charge is on disk before its answer is out.
    files = list((tmp_path / "l.db.journal").glob("charges-*.jsonl"))
    assert len(files) == 1 and len(files[0].read_text().splitlines()) == 4
    refused = await _embed(client, stranger)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "ledger_unavailable"
    assert int(refused.headers["retry-after"]) >= 1 and refused.json()["error"]["type"] == "service_unavailable"
    usage = await client.get("/v1/usage", headers={"authorization": f"Bearer {known}"})
    assert usage.status_code == 503 and usage.json()["error"]["code"] == "ledger_unavailable"

    assert watch.seen[:4] == [1, 2, 3, 4]  # an operator sees the charges pile up...
    ledger.outage = False
    await _drained(fair)
    assert watch.seen[-1] == 0  # ...and drain
    assert not list((tmp_path / "l.db.journal").glob("*.jsonl"))  # written, then removed
    usage = await client.get("/v1/usage", headers={"authorization": f"Bearer {known}"})
    assert usage.json()["gpu_seconds_used"] == pytest.approx(sum(charges))
    assert (await _embed(client, stranger)).status_code == 200  # the ledger answers for it again


async def test_the_budget_holds_through_an_outage(tmp_path: Path) -> None:
    ledger = FlakyLedger(tmp_path / "l.db")
    # 0.5 GPU-s a day each; the fake engine charges 0.1 per input.
    calm, stormy = _key(ledger, "free"), _key(ledger, "free")
    client, _ = _gateway(ledger)
    expected = [(await _embed(client, calm)).status_code for _ in range(8)]
    assert expected[0] == 200 and expected[-2:] == [429, 429]
    codes = [(await _embed(client, stormy)).status_code]
    ledger.outage = True
    codes += [(await _embed(client, stormy)).status_code for _ in range(7)]
    # What was read before the outage plus what this gateway journaled since: refused on time.
    assert codes == expected


async def test_a_key_confirmed_too_long_ago_is_not_trusted(tmp_path: Path) -> None:
    ledger = FlakyLedger(tmp_path / "l.db")
    key = _key(ledger, "pro")
    client, _ = _gateway(ledger, key_cache_s=0.2)
    assert (await _embed(client, key)).status_code == 200
    ledger.outage = True
    await asyncio.sleep(0.3)
    resp = await _embed(client, key)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "ledger_unavailable"


async def test_a_journal_left_by_a_dead_gateway_is_written_once(tmp_path: Path) -> None:
    ledger = SQLiteLedger(tmp_path / "l.db")
    key = _key(ledger, "pro")
    key_id = key.split("-")[1]
    dead = ChargeJournal(tmp_path / "l.db.journal")
    day = "2027-01-15"
    for i in range(3):
        dead.add(Charge(key_id, day, "emb", 0.25, f"req-{i}"))
    # The first charge reached the ledger before the gateway died (written, not yet removed).
    ledger.charge(key_id, day, "emb", 0.25, "req-0")
    alive = ChargeJournal(tmp_path / "l.db.journal")
    assert alive.pending == []  # its owner still holds the file's lock
    dead._file.close()  # the process dies: the lock goes with it

    auth = AuthSpec.model_validate({**AUTH, "ledger": {"path": str(tmp_path / "l.db")}})
    fair = FairShare(auth, ledger)
    assert fair.pending_charges == 3
    await fair.authenticate(f"Bearer {key}")  # the first request starts the writer
    await _drained(fair)
    assert ledger.usage(key_id, day) == {"emb": pytest.approx(0.75)}  # req-0 counted once
    assert not list((tmp_path / "l.db.journal").glob("*.jsonl"))
    assert ChargeJournal(tmp_path / "l.db.journal").pending == []

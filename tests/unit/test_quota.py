"""Keys, metering, limits and priority as pure logic with a fake clock; the SQLite ledger for real."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from zeroserve.config import AuthSpec
from zeroserve.gateway.fair import AuthError, Dispatcher, FairShare, ForbiddenError, QueueFull, QuotaError
from zeroserve.quota import (
    KeyRecord,
    RateLimiter,
    SharedMeter,
    SQLiteLedger,
    day_of,
    hash_key,
    new_key,
    next_reset,
    parse_bearer,
    priority_order,
)


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_shared_meter_splits_overlapping_time_and_adds_up() -> None:
    clock = Clock(0)
    meter = SharedMeter(clock)
    a = meter.enter()
    clock.t = 2  # a alone: 2 s
    b = meter.enter()
    clock.t = 6  # a and b together for 4 s: 2 s each
    charge_a = meter.exit(a)
    clock.t = 7  # b alone: 1 s
    charge_b = meter.exit(b)
    assert (charge_a, charge_b) == (4.0, 3.0)
    assert charge_a + charge_b == 7.0  # the engine's busy time


def test_rate_limiter_window() -> None:
    clock = Clock(0)
    rate = RateLimiter(clock)
    assert [rate.check("k", 2) for _ in range(2)] == [0.0, 0.0]
    clock.t = 10
    assert rate.check("k", 2) == 50.0  # the first event leaves the window at t=60
    clock.t = 60
    assert rate.check("k", 2) == 0.0


def test_priority_with_aging_never_starves() -> None:
    # Tier first, then shorter predicted work...
    assert priority_order(5, 1.0, 0, 0, 10) < priority_order(1, 0.1, 0, 0, 10)
    assert priority_order(1, 0.1, 0, 0, 10) < priority_order(1, 2.0, 0, 0, 10)
    # ...but a low-tier request that has waited 50 s outranks a fresh high-tier one.
    assert priority_order(0, 1.0, 0, 50, 10) < priority_order(4, 1.0, 50, 50, 10)


def test_days_and_resets_are_utc() -> None:
    ts = 1_800_000_000.0  # 2027-01-15T08:00:00Z
    assert day_of(ts) == "2027-01-15"
    assert next_reset(ts) == 1_800_057_600.0  # 2027-01-16T00:00:00Z


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic zs-abc",
        "Bearer " + "x" * 5000,
        "Bearer zs-00000000-" + "é" * 32,
        "Bearer zs-zzzzzzzz-" + "a" * 32,
        "Bearer\tzs-00000000-" + "a" * 32,
        "Bearer zs-00000000-" + "a" * 31,
    ],
)
def test_malformed_bearers_are_refused(header: str | None) -> None:
    assert parse_bearer(header) is None


def test_sqlite_ledger_keys_charges_once_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ledger = SQLiteLedger(path)
    key, key_id = new_key()
    assert parse_bearer(f"Bearer {key}") == key
    ledger.add_key(hash_key(key), KeyRecord(key_id, "alice", "free", 0.0))
    assert ledger.charge(key_id, "2027-01-15", "m", 0.5, "req-1")
    assert not ledger.charge(key_id, "2027-01-15", "m", 0.5, "req-1")  # a retry is not charged twice
    assert ledger.charge(key_id, "2027-01-15", "n", 0.25, "req-2")
    again = SQLiteLedger(path)  # a restarted gateway
    assert again.usage(key_id, "2027-01-15") == {"m": 0.5, "n": 0.25}
    assert again.find_key(hash_key(key)) == KeyRecord(key_id, "alice", "free", 0.0)
    assert again.revoke(key_id) and ledger.find_key(hash_key(key)).revoked  # type: ignore[union-attr]


def _fair(tmp_path: Path, **tier: object) -> tuple[FairShare, str, Clock]:
    auth = AuthSpec.model_validate({"enabled": True, "tiers": {"free": {"daily_gpu_seconds": 1.0, **tier}}})
    ledger = SQLiteLedger(tmp_path / "l.db")
    key, key_id = new_key()
    ledger.add_key(hash_key(key), KeyRecord(key_id, "", "free", 0.0))
    clock = Clock()
    return FairShare(auth, ledger, clock), key, clock


async def test_budget_refusals_name_the_reset(tmp_path: Path) -> None:
    fair, key, clock = _fair(tmp_path)
    grant = await fair.authenticate(f"Bearer {key}")
    await fair.check(grant, "m", 10)
    fair.release(grant)
    await fair.charge(grant, "m", 0.6, "r1", units=10)  # learns 0.06 GPU-s per output token
    grant = await fair.authenticate(f"Bearer {key}")
    with pytest.raises(QuotaError) as err:
        await fair.check(grant, "m", 10)  # predicted 0.6 > 0.4 left: refused up front
    assert "resets at 2027-01-16T00:00:00Z" in err.value.message
    assert err.value.retry_after_s == pytest.approx(57_600)
    await fair.check(grant, "m", 5)  # 0.3 fits
    fair.release(grant)
    await fair.charge(grant, "m", 0.5, "r2")
    grant = await fair.authenticate(f"Bearer {key}")
    with pytest.raises(QuotaError, match="used up"):
        await fair.check(grant, "m", None)
    clock.t = next_reset(clock.t) + 1  # a new day
    grant = await fair.authenticate(f"Bearer {key}")
    await fair.check(grant, "m", None)
    assert (await fair.usage(grant))["gpu_seconds_used"] == 0


async def test_rate_concurrency_and_model_limits(tmp_path: Path) -> None:
    fair, key, _ = _fair(tmp_path, requests_per_minute=100, max_concurrent=1, models=["m"])
    g1 = await fair.authenticate(f"Bearer {key}")
    await fair.check(g1, "m", None)
    with pytest.raises(QuotaError, match="concurrent"):
        await fair.check(await fair.authenticate(f"Bearer {key}"), "m", None)
    fair.release(g1)
    with pytest.raises(ForbiddenError, match="may not use model 'other'"):
        await fair.check(await fair.authenticate(f"Bearer {key}"), "other", None)
    with pytest.raises(AuthError):
        await fair.authenticate("Bearer zs-00000000-" + "a" * 32)


async def test_dispatcher_serves_by_priority_once_saturated() -> None:
    disp = Dispatcher(aging_s=1000)
    order: list[str] = []
    await disp.acquire("m", 1, 0, 0)  # the one running request

    async def wait(name: str, priority: int, predicted: float) -> None:
        await disp.acquire("m", 1, priority, predicted)
        order.append(name)
        disp.release("m", 1)

    tasks = [
        asyncio.create_task(wait(n, p, w))
        for n, p, w in [("low-long", 0, 5.0), ("low-short", 0, 1.0), ("high", 3, 9.0)]
    ]
    await asyncio.sleep(0.01)
    disp.release("m", 1)
    await asyncio.gather(*tasks)
    assert order == ["high", "low-short", "low-long"]


async def test_a_cancelled_waiter_does_not_leak_capacity() -> None:
    disp = Dispatcher()
    await disp.acquire("m", 1, 0, 0)
    waiter = asyncio.create_task(disp.acquire("m", 1, 0, 0))
    await asyncio.sleep(0.01)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    disp.release("m", 1)
    assert disp.running["m"] == 0
    await asyncio.wait_for(disp.acquire("m", 1, 0, 0), 1)


async def test_a_full_wait_queue_sheds_at_once_and_frees_as_it_drains() -> None:
    disp = Dispatcher()
    await disp.acquire("m", 1, 0, 0)
    waiters = [asyncio.create_task(disp.acquire("m", 1, 0, 0, max_waiting=2)) for _ in range(2)]
    await asyncio.sleep(0.01)
    with pytest.raises(QueueFull, match="2 requests waiting"):
        await asyncio.wait_for(disp.acquire("m", 1, 0, 0, max_waiting=2), 1)
    await disp.acquire("other", 1, 0, 0, max_waiting=2)  # the bound is per model
    disp.release("m", 1)
    await asyncio.wait_for(waiters[0], 1)
    waiter = asyncio.create_task(disp.acquire("m", 1, 0, 0, max_waiting=2))  # room again
    await asyncio.sleep(0.01)
    assert not waiter.done()
    for _ in range(2):
        disp.release("m", 1)
    await asyncio.wait_for(asyncio.gather(waiters[1], waiter), 1)


async def test_a_full_queue_sheds_its_lowest_tier_for_a_higher_one() -> None:
    disp = Dispatcher(aging_s=1000)
    await disp.acquire("m", 1, 0, 0)
    first = asyncio.create_task(disp.acquire("m", 1, 0, 1.0, max_waiting=2))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(disp.acquire("m", 1, 0, 1.0, max_waiting=2))
    await asyncio.sleep(0.01)
    with pytest.raises(QueueFull):  # the same tier waits behind those who came first
        await disp.acquire("m", 1, 0, 0.1, max_waiting=2)
    high = asyncio.create_task(disp.acquire("m", 1, 5, 1.0, max_waiting=2))
    await asyncio.sleep(0.01)
    with pytest.raises(QueueFull):  # the last of the lower tier is shed in its place
        await second
    assert not first.done() and not high.done()
    disp.release("m", 1)
    await asyncio.wait_for(high, 1)  # the higher tier goes first
    assert not first.done()
    disp.release("m", 1)
    await asyncio.wait_for(first, 1)
    assert disp.running["m"] == 1 and disp.waiting["m"] == []


async def test_simultaneous_requests_see_each_other_in_the_concurrency_limit(tmp_path: Path) -> None:
    fair, key, _ = _fair(tmp_path, max_concurrent=1)
    grants = [await fair.authenticate(f"Bearer {key}") for _ in range(2)]
    results = await asyncio.gather(*(fair.check(g, "m", None) for g in grants), return_exceptions=True)
    assert sum(isinstance(r, QuotaError) for r in results) == 1

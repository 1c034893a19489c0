"""The Redis ledger against a real redis-server (started here, on loopback, and stopped):
what several gateway replicas across nodes share."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from zeroserve.cluster import local_redis
from zeroserve.config import AuthSpec
from zeroserve.gateway.fair import AuthError, FairShare
from zeroserve.quota import KeyRecord, RedisLedger, day_of, hash_key, new_key


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with local_redis(tmp_path_factory.mktemp("redis")) as url:
        yield url


def test_redis_ledger_charges_once_under_concurrency(redis_url: str) -> None:
    ledger = RedisLedger(redis_url, prefix="t1")
    key, key_id = new_key()
    ledger.add_key(hash_key(key), KeyRecord(key_id, "alice", "free", 1.0))
    assert ledger.find_key(hash_key(key)) == KeyRecord(key_id, "alice", "free", 1.0)

    def charge(i: int) -> bool:  # every request charged twice (a retry), from 8 threads
        return RedisLedger(redis_url, prefix="t1").charge(key_id, "2027-01-15", f"m{i % 2}", 0.125, f"req-{i // 2}")

    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(charge, range(200)))
    assert sum(results) == 100  # 100 distinct requests, each counted once
    usage = ledger.usage(key_id, "2027-01-15")
    assert sum(usage.values()) == pytest.approx(100 * 0.125)
    assert ledger.revoke(key_id) and ledger.find_key(hash_key(key)).revoked  # type: ignore[union-attr]
    assert [k.key_id for k in ledger.list_keys()] == [key_id]


async def test_two_gateways_share_one_redis_ledger(redis_url: str) -> None:
    auth = AuthSpec.model_validate(
        {
            "enabled": True,
            "tiers": {"free": {"daily_gpu_seconds": 1.0}},
            "ledger": {"backend": "redis", "url": redis_url},
        }
    )
    key, key_id = new_key()
    RedisLedger(redis_url).add_key(hash_key(key), KeyRecord(key_id, "", "free", 0.0))
    one, two = FairShare(auth, RedisLedger(redis_url)), FairShare(auth, RedisLedger(redis_url))
    for i, gateway in enumerate([one, two, one, two]):
        grant = await gateway.authenticate(f"Bearer {key}")
        await gateway.check(grant, "m", None)
        gateway.release(grant)
        await gateway.charge(grant, "m", 0.2, f"r{i}")
    grant = await two.authenticate(f"Bearer {key}")
    usage = await two.usage(grant)
    assert usage["gpu_seconds_used"] == pytest.approx(0.8) and usage["day"] == day_of(time.time())
    RedisLedger(redis_url).revoke(key_id)
    with pytest.raises(AuthError):  # revoked through one, refused by the other at once
        await one.authenticate(f"Bearer {key}")

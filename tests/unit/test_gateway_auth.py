"""API keys at the HTTP layer: 401 for any bad key or header (never 500), 403, 429 with the
reset time, quota headers, and /v1/usage equal to the sum of the charges."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from zeroserve.config import GatewaySpec
from zeroserve.gateway import create_app
from zeroserve.quota import KeyRecord, SQLiteLedger, hash_key, new_key

from .gateway_support import FakeBackend


@pytest.fixture
def setup(tmp_path: Path) -> tuple[httpx.AsyncClient, str, str]:
    spec = GatewaySpec.model_validate(
        {
            "auth": {
                "enabled": True,
                "tiers": {
                    "free": {"daily_gpu_seconds": 0.25, "models": ["emb"]},
                    "pro": {"daily_gpu_seconds": 100, "priority": 5},
                },
            }
        }
    )
    ledger = SQLiteLedger(tmp_path / "l.db")
    free, free_id = new_key()
    ledger.add_key(hash_key(free), KeyRecord(free_id, "alice", "free", 0.0))
    pro, pro_id = new_key()
    ledger.add_key(hash_key(pro), KeyRecord(pro_id, "bob", "pro", 0.0))
    app = create_app(spec, FakeBackend(), ledger=ledger)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw"), free, pro


BAD_HEADERS = [
    {},
    {"authorization": ""},
    {"authorization": "Bearer"},
    {"authorization": "Bearer zs-nope"},
    {"authorization": "Bearer " + "a" * 100_000},
    {"authorization": "Bearer zs-00000000-ééééééééééééééééééééééééééééééé"},
    {"authorization": "Bearer zs-00000000-" + "a" * 32},
    {"authorization": "Basic dXNlcjpwYXNz"},
    {"authorization": "Bearer \x00\x01"},
]


@pytest.mark.parametrize("headers", BAD_HEADERS)
async def test_bad_keys_are_401_never_500(setup: tuple[httpx.AsyncClient, str, str], headers: dict[str, str]) -> None:
    client, _, _ = setup
    try:
        resp = await client.post("/v1/embeddings", json={"model": "emb", "input": "x"}, headers=headers)
    except (httpx.LocalProtocolError, UnicodeEncodeError):
        return  # the client itself refuses to send such a header
    assert resp.status_code == 401, resp.text
    assert resp.json()["error"]["code"] == "invalid_api_key"
    assert resp.headers["www-authenticate"] == "Bearer"


async def test_auth_comes_before_the_model_lookup(setup: tuple[httpx.AsyncClient, str, str]) -> None:
    client, _, _ = setup
    resp = await client.post("/v1/embeddings", json={"model": "no-such-model", "input": "x"})
    assert resp.status_code == 401


async def test_tier_models_quota_headers_and_usage(setup: tuple[httpx.AsyncClient, str, str]) -> None:
    client, free, _ = setup
    auth = {"authorization": f"Bearer {free}"}
    resp = await client.post(
        "/v1/chat/completions", headers=auth, json={"model": "gen", "messages": [{"role": "user", "content": "x"}]}
    )
    assert resp.status_code == 403 and resp.json()["error"]["param"] == "model"
    charges = []
    for _ in range(2):  # the fake engine charges 0.1 GPU-s per input
        resp = await client.post("/v1/embeddings", headers=auth, json={"model": "emb", "input": "x"})
        assert resp.status_code == 200
        charges.append(float(resp.headers["x-zeroserve-gpu-seconds"]))
        assert resp.headers["x-zeroserve-quota-reset"].endswith("T00:00:00Z")
    assert float(resp.headers["x-zeroserve-quota-remaining"]) == pytest.approx(0.05)
    # A third input would cost 0.1 (learned from the first two) and 0.05 is left: refused up front.
    refused = await client.post("/v1/embeddings", headers=auth, json={"model": "emb", "input": "x"})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "quota_exceeded"
    assert int(refused.headers["retry-after"]) > 0 and "resets at" in refused.json()["error"]["message"]
    usage = (await client.get("/v1/usage", headers=auth)).json()
    assert usage["gpu_seconds_used"] == pytest.approx(sum(charges))
    assert usage["gpu_seconds_by_model"] == {"emb": pytest.approx(sum(charges))}
    assert usage["tier"] == "free" and usage["gpu_seconds_remaining"] == pytest.approx(0.05)


async def test_a_repeated_request_id_is_still_charged_each_time(setup: tuple[httpx.AsyncClient, str, str]) -> None:
    client, _, pro = setup
    auth = {"authorization": f"Bearer {pro}", "x-request-id": "same-id"}
    for _ in range(3):
        assert (
            await client.post("/v1/embeddings", headers=auth, json={"model": "emb", "input": "x"})
        ).status_code == 200
    usage = (await client.get("/v1/usage", headers={"authorization": f"Bearer {pro}"})).json()
    assert usage["gpu_seconds_used"] == pytest.approx(0.3)


async def test_an_embedding_predicted_over_the_budget_is_refused_before_it_runs(tmp_path: Path) -> None:
    spec = GatewaySpec.model_validate({"auth": {"enabled": True, "tiers": {"free": {"daily_gpu_seconds": 0.25}}}})
    ledger = SQLiteLedger(tmp_path / "l.db")
    key, key_id = new_key()
    ledger.add_key(hash_key(key), KeyRecord(key_id, "", "free", 0.0))
    backend = FakeBackend()
    app = create_app(spec, backend, ledger=ledger)
    auth = {"authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        # The fake engine charges 0.1 GPU-s per input: the first request teaches the gateway so.
        first = await client.post("/v1/embeddings", headers=auth, json={"model": "emb", "input": "x"})
        assert first.status_code == 200
        calls = len(backend.calls)
        three = await client.post("/v1/embeddings", headers=auth, json={"model": "emb", "input": ["a", "b", "c"]})
        assert three.status_code == 429 and three.json()["error"]["code"] == "quota_exceeded", three.text
        assert "would cost about 0.300 GPU-seconds and 0.150 are left" in three.json()["error"]["message"]
        assert len(backend.calls) == calls  # refused up front: the model never saw it
        one = await client.post("/v1/embeddings", headers=auth, json={"model": "emb", "input": "a"})
        assert one.status_code == 200

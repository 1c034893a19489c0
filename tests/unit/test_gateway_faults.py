"""What a client sees when a model fails while its request waits (no Ray)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Sequence

import httpx
import pytest

from zeroserve.config import GatewaySpec, ModelSpec
from zeroserve.engines.base import Embedding
from zeroserve.gateway import ModelEntry, ModelState, create_app, waits
from zeroserve.wire import Accepted, Delta

from .gateway_support import FakeBackend


class _WakingBackend(FakeBackend):
    """A cold model whose replica never comes: Serve gives up after its constructor retries."""

    def __init__(self) -> None:
        super().__init__()
        self.entries["waking"] = ModelEntry("waking", ModelSpec(task="embed", model="./w"), ModelState.COLD)

    async def embed(self, entry: ModelEntry, texts: Sequence[str], dimensions: int | None) -> list[Embedding]:
        if entry.name != "waking":
            return await super().embed(entry, texts, dimensions)
        await asyncio.sleep(60)  # the router waits for a replica that never starts
        raise AssertionError("unreachable")


async def test_a_wake_that_fails_ends_the_wait_with_503_naming_the_model() -> None:
    backend = _WakingBackend()
    app = create_app(GatewaySpec(cold_start_timeout_s=60, retry_after_s=2), backend)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")

    async def fail_soon() -> None:
        await asyncio.sleep(0.5)
        entry = backend.entries["waking"]
        backend.entries["waking"] = dataclasses.replace(
            entry, state=ModelState.FAILED, message="constructor failed 3 times"
        )

    failer = asyncio.create_task(fail_soon())
    started = time.monotonic()
    resp = await client.post("/v1/embeddings", json={"model": "waking", "input": "x"})
    await failer
    assert resp.status_code == 503
    assert time.monotonic() - started < 30, "the request waited out its 60 s bound instead"
    error = resp.json()["error"]
    assert error["code"] == "model_failed"
    assert "'waking'" in error["message"] and "constructor failed 3 times" in error["message"]
    assert int(resp.headers["retry-after"]) == 12
    # The others keep serving.
    ok = await client.post("/v1/embeddings", json={"model": "emb", "input": "x"})
    assert ok.status_code == 200


async def test_a_model_removed_while_its_request_waits_is_a_clear_503() -> None:
    backend = _WakingBackend()
    app = create_app(GatewaySpec(cold_start_timeout_s=60), backend)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")

    async def remove_soon() -> None:
        await asyncio.sleep(0.5)
        del backend.entries["waking"]

    remover = asyncio.create_task(remove_soon())
    resp = await client.post("/v1/embeddings", json={"model": "waking", "input": "x"})
    await remover
    assert resp.status_code == 503
    assert "removed" in resp.json()["error"]["message"]


class _LostNodeBackend(FakeBackend):
    """Models on node n1, which vanishes while their calls are in flight: the calls never end
    (as Ray's do not, until it declares the node dead), and n1 leaves the node list."""

    def __init__(self) -> None:
        super().__init__()
        for name in ("emb", "gen"):
            self.entries[name] = dataclasses.replace(self.entries[name], replica_nodes=("n1",))
        self.nodes = {"n1": 1.0, "head": 1.0}
        self.lost = asyncio.Event()

    async def gpus(self) -> dict[str, float]:
        return dict(self.nodes)

    def lose_n1(self) -> None:
        del self.nodes["n1"]
        self.lost.set()

    async def embed(self, entry: ModelEntry, texts: Sequence[str], dimensions: int | None) -> list[Embedding]:
        self.lose_n1()
        await asyncio.sleep(60)
        raise AssertionError("unreachable")

    async def stream(self, entry: ModelEntry, prompt: object, params: object) -> AsyncIterator[object]:
        yield Accepted(3)
        yield Delta(0, "Hel", completion_tokens=1)
        self.lose_n1()
        await asyncio.sleep(60)
        yield Delta(0, "lo", "stop", completion_tokens=2)


async def test_a_lost_machine_is_a_503_or_an_error_event_not_a_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(waits, "NODE_POLL_S", 0.05)
    backend = _LostNodeBackend()
    app = create_app(GatewaySpec(request_timeout_s=60), backend)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        started = time.monotonic()
        resp = await client.post("/v1/embeddings", json={"model": "emb", "input": "x"})
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "replica_died", resp.text
        assert int(resp.headers["retry-after"]) >= 1
        assert time.monotonic() - started < 30  # long before the request's 60 s bound

        backend.nodes["n1"] = 1.0
        body = {"model": "gen", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=body) as stream:
            assert stream.status_code == 200
            events = [line async for line in stream.aiter_lines() if line.startswith("data: ")]
    assert '"Hel"' in events[1]  # the part that came, then the error in-band, then the end
    assert json.loads(events[-2][6:])["error"]["code"] == "replica_died" and events[-1] == "data: [DONE]"


async def test_a_model_on_a_live_node_is_not_cut_short(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(waits, "NODE_POLL_S", 0.05)
    backend = FakeBackend()
    backend.entries["emb"] = dataclasses.replace(backend.entries["emb"], replica_nodes=("n1",))
    backend.gate.clear()  # a slow answer: many node checks pass while it runs
    app = create_app(GatewaySpec(request_timeout_s=60), backend)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        call = asyncio.ensure_future(client.post("/v1/embeddings", json={"model": "emb", "input": "x"}))
        await asyncio.sleep(0.5)
        assert not call.done()
        backend.gate.set()
        assert (await call).status_code == 200


async def test_requests_in_flight_share_one_node_list_read() -> None:
    """Every request in flight watches its model's nodes; a stale list is read once for all."""
    reads = 0

    class Slow(FakeBackend):
        async def gpus(self) -> dict[str, float]:
            nonlocal reads
            reads += 1
            await asyncio.sleep(0.1)
            return {"n1": 1.0}

    app = create_app(GatewaySpec(), Slow())
    state = app.state.gateway
    results = await asyncio.gather(*(state.capacity(max_age_s=0) for _ in range(50)))
    assert reads == 1 and all(r == {"n1": 1.0} for r in results)

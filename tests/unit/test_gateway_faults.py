"""What a client sees when a model fails while its request waits (no Ray)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence

import httpx

from zeroserve.config import GatewaySpec, ModelSpec
from zeroserve.engines.base import Embedding
from zeroserve.gateway import ModelEntry, ModelState, create_app

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
    assert time.monotonic() - started < 5, "the request waited out its bound instead"
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

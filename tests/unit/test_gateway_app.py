"""The gateway's HTTP contract with an in-memory backend: validation, errors, limits, SSE.

The integration suite checks the same contract through Ray; these pin the edge cases fast.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from typing import Any

import httpx
import pytest

from zeroserve.config import GatewaySpec
from zeroserve.gateway import create_app
from zeroserve.protocol import GenerateParams

from .gateway_support import FakeBackend


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def client(backend: FakeBackend) -> httpx.AsyncClient:
    spec = GatewaySpec(max_inflight_per_model=2, max_body_bytes=10_000, retry_after_s=3)
    app = create_app(spec, backend)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


def _error(resp: httpx.Response) -> dict[str, Any]:
    body = resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]  # type: ignore[no-any-return]


async def test_models_list_states_without_calls(client: httpx.AsyncClient) -> None:
    resp = await client.get("/v1/models")
    data = {m["id"]: m for m in resp.json()["data"]}
    assert data["cls"]["zeroserve"]["state"] == "cold"
    assert data["emb"]["zeroserve"]["task"] == "embed"
    assert data["broken"]["zeroserve"]["state"] == "failed"


async def test_embeddings_float_and_base64(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/embeddings", json={"model": "emb", "input": ["a b", "c"]})
    body = resp.json()
    assert resp.status_code == 200
    assert body["data"][1]["embedding"] == [0.5, -1.0, 1.0]
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    resp = await client.post("/v1/embeddings", json={"model": "emb", "input": "abc", "encoding_format": "base64"})
    raw = base64.b64decode(resp.json()["data"][0]["embedding"])
    assert list(struct.unpack("<3f", raw)) == [0.5, -1.0, 3.0]


@pytest.mark.parametrize(
    ("path", "payload", "status", "param"),
    [
        ("/v1/embeddings", {"model": "nope", "input": "x"}, 404, "model"),
        ("/v1/embeddings", {"model": "gen", "input": "x"}, 400, "model"),
        ("/v1/chat/completions", {"model": "emb", "messages": [{"role": "user", "content": "x"}]}, 400, "model"),
        ("/v1/embeddings", {"model": "emb"}, 400, "input"),
        ("/v1/embeddings", {"model": "emb", "input": []}, 400, "input"),
        ("/v1/embeddings", {"model": "emb", "input": "x", "encoding_format": "hex"}, 400, "encoding_format"),
        ("/v1/chat/completions", {"model": "gen", "messages": []}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"model": "gen", "messages": [{"role": "user", "content": "x"}], "max_tokens": 65},
            400,
            "max_tokens",
        ),
        ("/v1/chat/completions", {"model": "gen", "messages": [{"role": "user", "content": "x"}], "n": 5}, 400, "n"),
        (
            "/v1/chat/completions",
            {"model": "gen", "messages": [{"role": "user", "content": "x"}], "temperature": -1},
            400,
            "temperature",
        ),
        ("/v1/completions", {"model": "gen", "prompt": "x", "top_p": 0}, 400, "top_p"),
        ("/v1/completions", {"model": "gen", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ("/v1/completions", {"model": "gen", "prompt": "x", "logprobs": 2}, 400, None),
        ("/v1/completions", {"model": "gen", "prompt": "too long"}, 400, "messages"),
    ],
)
async def test_openai_errors(
    client: httpx.AsyncClient, path: str, payload: dict[str, Any], status: int, param: str | None
) -> None:
    resp = await client.post(path, json=payload)
    assert resp.status_code == status, resp.text
    err = _error(resp)
    assert err["param"] == param
    assert resp.headers["x-request-id"]


async def test_nan_is_refused(client: httpx.AsyncClient) -> None:
    body = '{"model": "gen", "prompt": "x", "temperature": NaN}'
    resp = await client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 400 and _error(resp)["param"] == "temperature"


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe", b"[1, 2]", b"", b"[" * 100_00])
async def test_malformed_bodies_are_400(client: httpx.AsyncClient, body: bytes) -> None:
    resp = await client.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
    assert resp.status_code in (400, 413)
    _error(resp)


async def test_body_over_limit_is_413(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/embeddings", json={"model": "emb", "input": "x" * 20_000})
    assert resp.status_code == 413


async def test_failed_model_is_503_naming_it(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/embeddings", json={"model": "broken", "input": "x"})
    assert resp.status_code == 503 and "broken" in _error(resp)["message"]
    assert "weights missing" in _error(resp)["message"]
    assert int(resp.headers["retry-after"]) > 0


async def test_cold_start_wait_is_bounded(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/embeddings", json={"model": "sleepy", "input": "x"})
    assert resp.status_code == 503
    assert resp.headers["retry-after"] == "3"
    assert "did not answer within" in _error(resp)["message"]


async def test_internal_errors_are_generic(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/embeddings", json={"model": "boom", "input": "x"})
    assert resp.status_code == 500
    assert "passwd" not in resp.text and "Traceback" not in resp.text
    # And the server still serves.
    assert (await client.post("/v1/embeddings", json={"model": "emb", "input": "x"})).status_code == 200


async def test_overload_sheds_with_retry_after(client: httpx.AsyncClient, backend: FakeBackend) -> None:
    backend.gate.clear()
    held = [asyncio.create_task(client.post("/v1/embeddings", json={"model": "emb", "input": "x"})) for _ in range(2)]
    await asyncio.sleep(0.1)
    resp = await client.post("/v1/embeddings", json={"model": "emb", "input": "x"})
    assert resp.status_code == 503 and resp.headers["retry-after"] == "3"
    assert _error(resp)["code"] == "overloaded"
    backend.gate.set()
    assert all(r.status_code == 200 for r in await asyncio.gather(*held))
    assert (await client.post("/v1/embeddings", json={"model": "emb", "input": "x"})).status_code == 200


async def test_chat_non_stream_shape_and_usage(client: httpx.AsyncClient, backend: FakeBackend) -> None:
    resp = await client.post(
        "/v1/chat/completions",
        json={
            "model": "gen",
            "messages": [{"role": "user", "content": "hi"}],
            "n": 2,
            "seed": 7,
            "stop": "x",
            "temperature": 0,
            "top_p": 0.5,
            "max_completion_tokens": 10,
        },
    )
    body = resp.json()
    assert [c["message"]["content"] for c in body["choices"]] == ["Hello", "Hello"]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert backend.seen_params[-1] == GenerateParams(max_tokens=10, temperature=0, top_p=0.5, n=2, stop=("x",), seed=7)


async def test_completion_stream_ends_with_done_and_usage(client: httpx.AsyncClient) -> None:
    resp = await client.post(
        "/v1/completions",
        json={"model": "gen", "prompt": ["a", "b"], "stream": True, "stream_options": {"include_usage": True}},
    )
    lines = [ln for ln in resp.text.split("\n\n") if ln]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]
    texts: dict[int, str] = {}
    for c in chunks[:-1]:
        for ch in c["choices"]:
            texts[ch["index"]] = texts.get(ch["index"], "") + ch["text"]
    assert texts == {0: "Hello", 1: "Hello"}
    assert chunks[-1]["usage"]["completion_tokens"] == 4 and chunks[-1]["choices"] == []


async def test_request_id_is_echoed_or_replaced(client: httpx.AsyncClient) -> None:
    ok = await client.get("/v1/models", headers={"x-request-id": "abc-123"})
    assert ok.headers["x-request-id"] == "abc-123"
    bad = await client.get("/v1/models", headers={"x-request-id": "evil\tvalue"})
    assert bad.headers["x-request-id"] != "evil\tvalue"


async def test_unknown_route_is_openai_shaped(client: httpx.AsyncClient) -> None:
    resp = await client.get("/v1/nothing")
    assert resp.status_code == 404
    _error(resp)


async def test_classify_follows_vllm_shape(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/classify", json={"model": "cls", "input": ["a", "b"]})
    body = resp.json()
    assert body["object"] == "list" and body["data"][1] == {
        "index": 1,
        "label": "positive",
        "probs": [0.25, 0.75],
        "num_classes": 2,
    }


async def test_status_endpoint_reports_models_and_pool(client: httpx.AsyncClient) -> None:
    await client.post("/v1/embeddings", json={"model": "emb", "input": "x"})
    resp = await client.get("/v1/zeroserve/status")
    body = resp.json()
    rows = {m["id"]: m for m in body["models"]}
    assert rows["emb"]["requests_per_min"] == 1 and rows["emb"]["last_request"] is not None
    assert rows["cls"]["state"] == "cold" and rows["cls"]["requests_per_min"] == 0
    assert body["pool"] == [{"node": "n1", "gpus": 1.0, "gpus_used": 0.25, "occupancy": 0.25}]


async def test_health_says_which_models_are_placeable(client: httpx.AsyncClient) -> None:
    body = (await client.get("/health")).json()
    assert body["status"] == "ok"
    # n1 has 1 GPU, 0.25 allocated to "emb": a cold 0.25 model fits, the failed one does not.
    assert body["models"]["emb"] == {"state": "ready", "placeable": True}
    assert body["models"]["cls"] == {"state": "cold", "placeable": True}
    assert body["models"]["broken"] == {"state": "failed", "placeable": False}

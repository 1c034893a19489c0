"""Hostile input against the real engines, through the real gateway, on every path.

The unit fuzz drives the gateway with an in-memory backend; here the same checks run against
the demo's engines (transformers for embeddings, classification and generation, vLLM through
its own OpenAI layer), so an input that only an engine chokes on is found too. Every answer
is a 2xx or an OpenAI-shaped 4xx (or a 503 with Retry-After), never a 500.
"""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.unit.gateway_support import fuzz_schema, response_problems

from .conftest import WARM, Pool

VLLM = "tiny-llama-vllm"
LLAMA = "tiny-llama"
MODELS = {"all-MiniLM-L6-v2": "embed", "tiny-sentiment": "classify", LLAMA: "generate", VLLM: "generate"}
CHAT = [{"role": "user", "content": "hi"}]
SEED = 20261202


@pytest.fixture(scope="module")
def engines(pool: Pool) -> Pool:
    """Every demo model warm (held at one replica), so no case waits for a wake."""
    pool.deploy(pool.config(pool.models(*MODELS, autoscaling=WARM)), timeout_s=400)
    return pool


def _post(pool: Pool, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{pool.base_url}{path}", json=body, timeout=120)


def _refused(resp: httpx.Response, param: str | None = None) -> dict[str, Any]:
    assert resp.status_code == 400, resp.text
    assert response_problems(resp) == []
    error: dict[str, Any] = resp.json()["error"]
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.mark.parametrize("model", [LLAMA, VLLM])
def test_a_temperature_that_underflows_is_served_greedily(engines: Pool, model: str) -> None:
    """temperature 1e-300 overflowed the transformers sampler (a 500): below vLLM's epsilon it is greedy."""
    client = engines.openai(timeout=120)
    tiny = client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=1e-300)  # type: ignore[arg-type]
    greedy = client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    assert tiny.choices[0].message.content == greedy.choices[0].message.content


@pytest.mark.parametrize("stream", [False, True])
def test_the_vllm_path_has_the_native_limits(engines: Pool, stream: bool) -> None:
    """Before, a vLLM body was forwarded after checking five fields: 5,000 prompts reached vLLM."""
    for body, param in [
        ({"prompt": ["x"] * 5000, "max_tokens": 1}, "prompt"),
        ({"prompt": "x", "stop": ["s"] * 100}, "stop"),
        ({"prompt": "x", "max_tokens": 257}, "max_tokens"),
        ({"prompt": "x", "n": 9}, "n"),
    ]:
        _refused(_post(engines, "/v1/completions", {"model": VLLM, "stream": stream, **body}), param)
    resp = _post(engines, "/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": ["x"] * 5000})
    _refused(resp, "input")


def test_a_tool_choice_naming_a_missing_function_is_a_400(engines: Pool) -> None:
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    choice = {"type": "function", "function": {"name": "stocks"}}
    client = engines.openai(timeout=120)
    with pytest.raises(openai.BadRequestError, match="stocks"):
        client.chat.completions.create(model=VLLM, messages=CHAT, tools=tools, tool_choice=choice)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=VLLM, messages=CHAT, tool_choice="required")  # type: ignore[arg-type]


def test_an_engine_refusal_reaches_the_client_as_a_400(engines: Pool) -> None:
    """A request only the engine can judge (a prompt over the context) is vLLM's own 400, streamed or not."""
    for stream in (False, True):
        body = {"model": VLLM, "prompt": "word " * 600, "max_tokens": 4, "stream": stream}
        error = _refused(_post(engines, "/v1/completions", body))
        assert "context" in error["message"]


def test_schema_fuzz_against_the_real_engines(engines: Pool) -> None:
    """A short schemathesis run over every operation, with model names of the live pool."""
    import schemathesis

    schema = schemathesis.openapi.from_url(f"{engines.base_url}/openapi.json")
    report = fuzz_schema(schema, examples=4, seed=SEED, models=MODELS)
    assert report.failures == [], "\n".join(report.failures[:20])
    assert report.cases >= 40 and report.statuses[200] > 0 and report.statuses[400] > 0
    # Still serving afterwards.
    client = engines.openai(timeout=120)
    assert client.completions.create(model=VLLM, prompt="The", max_tokens=2).choices[0].text


def test_slow_uploads_cannot_hold_every_connection(engines: Pool) -> None:
    """More clients than the gateway's places for slow uploads (64) send their headers and a part
    of their body, then nothing: the ones beyond the places get a 503 `slow_uploads` with
    Retry-After at once, and requests that send their body at once are served meanwhile."""
    import json
    import socket
    import time
    from urllib.parse import urlsplit

    url = urlsplit(engines.base_url)
    body = json.dumps({"model": "all-MiniLM-L6-v2", "input": "hello"}).encode()
    head = (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    slow = [socket.create_connection((url.hostname, url.port), timeout=30) for _ in range(70)]
    try:
        for sock in slow:
            sock.sendall(head + body[:5])
        client = engines.openai(timeout=120)
        for _ in range(5):
            assert client.embeddings.create(model="all-MiniLM-L6-v2", input="x").data[0].embedding
        refused: list[bytes] = []
        deadline = time.monotonic() + 60
        while len(refused) < 6 and time.monotonic() < deadline:
            for sock in slow:
                sock.settimeout(0.05)
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                if data:
                    refused.append(data)
        assert len(refused) == 6, refused
        for answer in refused:
            head_part, _, payload = answer.partition(b"\r\n\r\n")
            assert head_part.startswith(b"HTTP/1.1 503") and b"retry-after:" in head_part.lower(), answer
            assert json.loads(payload)["error"]["code"] == "slow_uploads", answer
    finally:
        for sock in slow:
            sock.close()
    assert client.embeddings.create(model="all-MiniLM-L6-v2", input="x").data[0].embedding

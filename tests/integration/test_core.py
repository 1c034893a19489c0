"""The core promise end to end: one OpenAI endpoint, fractional GPUs, scale to zero.

Real Ray, real engines, real HTTP, the official ``openai`` client.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from .conftest import Pool, wait_for

EMB = "all-MiniLM-L6-v2"
GEN = "tiny-llama"
CLS = "tiny-sentiment"
VLLM = "tiny-llama-vllm"


def _states(pool: Pool) -> dict[str, str]:
    data = httpx.get(f"{pool.base_url}/v1/models", timeout=10).json()["data"]
    return {m["id"]: m["zeroserve"]["state"] for m in data}


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_listing_models_wakes_none(demo: Pool) -> None:
    wait_for(lambda: all(s == "cold" for s in _states(demo).values()), 60, "all models cold")
    models = demo.openai().models.list()
    assert {m.id for m in models.data} == {EMB, GEN, CLS, VLLM, "tiny-sentiment-2"}
    for _ in range(5):
        demo.openai().models.list()
        httpx.get(f"{demo.base_url}/v1/models/{GEN}", timeout=10)
    time.sleep(1)  # give a (wrong) wake-up the chance to show
    for app in (EMB, GEN, CLS, VLLM):
        assert demo.replicas(app) == [], f"{app} was woken by a listing"
    assert set(_states(demo).values()) == {"cold"}


def test_cold_start_with_concurrent_requests_then_back_to_zero(demo: Pool) -> None:
    wait_for(lambda: demo.replicas(EMB) == [], 60, f"{EMB} to be at zero")
    client = demo.openai(timeout=120)
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awful."]

    def call(_: int) -> Any:
        return client.embeddings.create(model=EMB, input=sentences)

    with ThreadPoolExecutor(6) as ex:
        results = list(ex.map(call, range(6)))
    assert len(results) == 6
    for r in results:
        a, para, other = (d.embedding for d in r.data)
        assert len(a) == 384
        assert _cos(a, para) > _cos(a, other) + 0.3
        assert r.usage.prompt_tokens > 0
    assert _states(demo)[EMB] == "ready"
    # With no traffic the model goes back to zero replicas after its delay.
    wait_for(lambda: demo.replicas(EMB) == [], 90, f"{EMB} to scale back to zero")
    wait_for(lambda: _states(demo)[EMB] == "cold", 10, "state cold")


def test_embeddings_base64_matches_float(demo: Pool) -> None:
    client = demo.openai(timeout=120)
    as_float = client.embeddings.create(model=EMB, input="hello world", encoding_format="float")
    as_b64 = client.embeddings.create(model=EMB, input="hello world")  # the client asks for base64
    assert as_b64.data[0].embedding == pytest.approx(as_float.data[0].embedding, abs=1e-6)
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=EMB, input="x", dimensions=64)
    assert err.value.body["param"] == "dimensions"  # type: ignore[index]


def test_chat_stream_and_non_stream_agree(demo: Pool) -> None:
    client = demo.openai(timeout=120)
    messages = [{"role": "user", "content": "What is zeroserve?"}]
    whole = client.chat.completions.create(model=GEN, messages=messages, max_tokens=24, temperature=0)  # type: ignore[arg-type]
    text = whole.choices[0].message.content
    assert text and whole.usage and whole.usage.completion_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    stream = client.chat.completions.create(
        model=GEN,
        messages=messages,
        max_tokens=24,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == text
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    assert finish == whole.choices[0].finish_reason


def test_completions_sampling_options(demo: Pool) -> None:
    client = demo.openai(timeout=120)
    kw: dict[str, Any] = {
        "model": GEN,
        "prompt": "The quick",
        "max_tokens": 8,
        "temperature": 0.9,
        "top_p": 0.9,
        "n": 3,
        "seed": 11,
    }
    first = client.completions.create(**kw)
    second = client.completions.create(**kw)
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert sorted(c.index for c in first.choices) == [0, 1, 2]
    short = client.completions.create(model=GEN, prompt="The quick", max_tokens=2, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    greedy = client.completions.create(model=GEN, prompt="The quick", max_tokens=8, temperature=0)
    word = greedy.choices[0].text.split()[1]
    stopped = client.completions.create(model=GEN, prompt="The quick", max_tokens=8, temperature=0, stop=[word])
    assert word not in stopped.choices[0].text
    assert stopped.choices[0].finish_reason == "stop"


def test_classification_route(demo: Pool) -> None:
    resp = httpx.post(
        f"{demo.base_url}/v1/classify",
        timeout=120,
        json={"model": CLS, "input": ["I love this, wonderful.", "Terrible and broken."]},
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert [d["label"] for d in body["data"]] == ["positive", "negative"]
    assert all(abs(sum(d["probs"]) - 1) < 1e-5 and d["num_classes"] == 2 for d in body["data"])


def test_errors_are_openai_shaped_and_the_server_keeps_serving(demo: Pool) -> None:
    client = demo.openai(timeout=120)
    with pytest.raises(openai.NotFoundError) as nf:
        client.embeddings.create(model="no-such-model", input="x")
    assert nf.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="does not support embeddings"):
        client.embeddings.create(model=GEN, input="x")
    with pytest.raises(openai.BadRequestError, match="cap of 256"):
        client.chat.completions.create(model=GEN, messages=[{"role": "user", "content": "x"}], max_tokens=1000)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=GEN, prompt="word " * 600, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="has .* tokens"):
        client.embeddings.create(model=EMB, input="word " * 400)
    bad = httpx.post(
        f"{demo.base_url}/v1/chat/completions",
        content=b'{"model": ',
        timeout=10,
        headers={"content-type": "application/json"},
    )
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert "Traceback" not in bad.text
    ok = client.completions.create(model=GEN, prompt="The", max_tokens=2, temperature=0)
    assert ok.choices[0].text

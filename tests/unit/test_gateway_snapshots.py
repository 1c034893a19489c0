"""Golden snapshots of the gateway's wire behaviour, to keep a refactor of the app byte-for-byte identical.

Each scenario drives a fresh app in-process with :class:`FakeBackend` (plus a few extra fake models
defined here) and writes a transcript: every request, the response's status, headers and exact body
bytes, then the ``zeroserve.gateway`` log lines of the scenario. The transcript is compared with the
golden file under ``tests/unit/snapshots/gateway/``. Only what is nondeterministic is normalised
(generated ids, timestamps, latencies, request ids); everything else, JSON separators and key order
in SSE ``data:`` lines included, is compared as raw text.

To regenerate the goldens after an intended change: ``ZEROSERVE_UPDATE_SNAPSHOTS=1 pytest
tests/unit/test_gateway_snapshots.py``, then review the diff of the snapshot files.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

from zeroserve.config import GatewaySpec, ModelSpec
from zeroserve.engines.base import Embedding
from zeroserve.errors import InvalidRequestError
from zeroserve.gateway import ModelEntry, ModelState, create_app
from zeroserve.protocol import GenerateParams
from zeroserve.quota import KeyRecord, SQLiteLedger, hash_key
from zeroserve.wire import Accepted, Delta

from .gateway_support import FakeBackend

SNAPSHOTS = Path(__file__).parent / "snapshots" / "gateway"
UPDATE = os.environ.get("ZEROSERVE_UPDATE_SNAPSHOTS") == "1"

# Small enough that a cold model's wake (WAKE_DELAY_S) always spans at least one keepalive comment.
KEEPALIVE_S = 0.05
WAKE_DELAY_S = 4 * KEEPALIVE_S
# A key of the right shape (zs-<8 hex>-<32 url-safe>) with a fixed id, so that nothing random is shown.
API_KEY = "zs-0badc0de-" + "K" * 32
KEY_ID = "0badc0de"


def _spec(**overrides: Any) -> GatewaySpec:
    """The limits of every scenario: small, so that 413, 503 and keepalives are cheap to reach."""
    args: dict[str, Any] = {
        "max_inflight_per_model": 2,
        "max_body_bytes": 10_000,
        "retry_after_s": 3,
        "keepalive_s": KEEPALIVE_S,
    }
    return GatewaySpec.model_validate({**args, **overrides})


class SnapshotBackend(FakeBackend):
    """FakeBackend plus the models a snapshot needs that the shared fake has not.

    - ``coldgen``: a COLD native generator whose first delta comes after WAKE_DELAY_S (a wake).
    - ``coldvgen``: a COLD passthrough (vLLM) generator that answers after WAKE_DELAY_S.
    - ``crashgen``: yields two deltas, then raises RuntimeError (an engine crash mid-stream).
    - ``rejectgen``: yields one delta, then raises InvalidRequestError (a refusal mid-stream).

    ``held`` counts embed calls waiting on ``gate``, so a test can wait for them without sleeping.
    """

    def __init__(self, wire_version: int = 2) -> None:
        super().__init__(wire_version)
        cold = ModelSpec(task="generate", model="./cg", max_tokens_cap=64)
        self.entries["coldgen"] = ModelEntry("coldgen", cold, ModelState.COLD)
        cold_v = ModelSpec(task="generate", engine="vllm", model="./cv", max_tokens_cap=64)
        self.entries["coldvgen"] = ModelEntry("coldvgen", cold_v, ModelState.COLD)
        for name in ("crashgen", "rejectgen"):
            self.entries[name] = ModelEntry(
                name, ModelSpec(task="generate", model=f"./{name}", max_tokens_cap=64), ModelState.READY, 1
            )
        self.held = 0
        self.held_changed = asyncio.Event()

    async def embed(self, entry: ModelEntry, texts: Sequence[str], dimensions: int | None) -> list[Embedding]:
        if not self.gate.is_set():
            self.held += 1
            self.held_changed.set()
        return await super().embed(entry, texts, dimensions)

    async def wait_held(self, count: int) -> None:
        """Until ``count`` embed calls wait on the gate (each holds its admission slot)."""
        while self.held < count:
            self.held_changed.clear()
            await self.held_changed.wait()

    async def stream(self, entry: ModelEntry, prompt: Any, params: GenerateParams) -> AsyncIterator[Any]:
        if entry.name == "coldgen":
            await asyncio.sleep(WAKE_DELAY_S)  # the model waking up
        if entry.name == "crashgen":
            self.calls.append(("stream", entry.name))
            yield self.out(Accepted(3))
            yield Delta(0, "Hel", completion_tokens=1)
            yield Delta(0, "lo", completion_tokens=2)
            raise RuntimeError("secret engine detail /dev/nvidia0")
        if entry.name == "rejectgen":
            self.calls.append(("stream", entry.name))
            yield self.out(Accepted(3))
            yield Delta(0, "Hel", completion_tokens=1)
            raise InvalidRequestError("the prompt became too long while generating", param="messages")
        async for delta in super().stream(entry, prompt, params):
            yield delta

    async def openai(self, entry: ModelEntry, endpoint: str, body: dict[str, Any]) -> AsyncIterator[Any]:
        if entry.name == "coldvgen":
            await asyncio.sleep(WAKE_DELAY_S)  # the model waking up
        async for item in super().openai(entry, endpoint, body):
            yield item


# -- normalisation ----------------------------------------------------------------------------------
_GENERATED_ID = re.compile(r"\b(chatcmpl|cmpl|classify)-[0-9a-f]{32}\b")
# Unix times only: a model card's "created": 0 is fixed and stays pinned.
_CREATED = re.compile(r'("created":\s?)\d{9,}')
# Wall-clock and latency figures of /v1/zeroserve/status.
_TIMING_FIELD = re.compile(
    r'("(?:time|last_request|last_used|p50_latency_s|cold_start_p50_s)":\s?)-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?'
)
_DAY_FIELD = re.compile(r'("day":\s?)"\d{4}-\d{2}-\d{2}"')
# The quota's reset time (next midnight UTC), in /v1/usage and in a 429's message.
_UTC_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
_LOG_LATENCY = re.compile(r" in \d+\.\d ms ")
_HEX_ID = re.compile(r"\b[0-9a-f]{32}\b")
# The number of keepalive comments depends on timing: consecutive ones are collapsed to one.
_KEEPALIVES = re.compile(r"(: waiting for model '[^'\n]*' to wake\n\n)(?:\1)+")


class Transcript:
    """One scenario's exchanges and log lines as normalised text."""

    def __init__(self, client: httpx.AsyncClient, volatile: frozenset[str] = frozenset()) -> None:
        """``volatile``: headers whose value depends on the clock in this scenario (shown as a placeholder)."""
        self.client = client
        self.volatile = volatile
        self.lines: list[str] = []
        self.request_ids: dict[str, str] = {}

    def _request_id(self, value: str) -> str:
        """A generated request id as ``<request-id-N>`` (N by first appearance), so that log lines
        and headers of the same request still match up in the golden file."""
        if value not in self.request_ids:
            self.request_ids[value] = f"<request-id-{len(self.request_ids) + 1}>"
        return self.request_ids[value]

    def note(self, text: str) -> None:
        """A heading in the golden file, so that a failing diff says what the exchange is about."""
        self.lines.append(f"### {text}\n")

    async def call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """Send one request and record it with its response."""
        if json_body is not None:
            content = json.dumps(json_body).encode()
            headers = {"content-type": "application/json", **(headers or {})}
        resp = await self.client.request(method, path, content=content, headers=headers)
        self.record(method, path, content, headers, resp)
        return resp

    def record(
        self, method: str, path: str, content: bytes | None, headers: dict[str, str] | None, resp: httpx.Response
    ) -> None:
        """Append one exchange: the request as sent, then status, headers (sorted by name) and exact body."""
        out = [f">>> {method} {path}\n"]
        for name, value in (headers or {}).items():
            out.append(f">>> {name}: {value}\n")
        if content is not None:
            shown = content.decode("utf-8", "backslashreplace")
            out.append(f">>> {shown}\n" if len(shown) <= 400 else f">>> <{len(content)} bytes>\n")
        out.append(f"<<< {resp.status_code}\n")
        body = resp.content
        # Header order carries no meaning in HTTP; repeated headers stay visible (multi_items).
        for name, value in sorted(resp.headers.multi_items(), key=lambda kv: kv[0]):
            if name == "x-request-id" and _HEX_ID.fullmatch(value):
                value = self._request_id(value)
            elif name == "content-length" and value == str(len(body)):
                value = "<length of the body>"  # the body itself is pinned; its ids and times vary in length
            elif name == "x-zeroserve-quota-reset":
                value = "<next midnight UTC>"
            elif name in self.volatile:
                value = "<depends on the clock>"
            out.append(f"<<< {name}: {value}\n")
        out.append(f"<<< body:\n{normalise_body(body.decode('utf-8'))}\n<<< end of body\n\n")
        self.lines.extend(out)

    def logs(self, records: list[logging.LogRecord]) -> None:
        """The gateway's log lines (message and exception type; no traceback: paths and line numbers move)."""
        self.lines.append("### log of zeroserve.gateway\n")
        for rec in records:
            msg = _LOG_LATENCY.sub(" in <ms> ms ", rec.getMessage())
            msg = _HEX_ID.sub(lambda m: self._request_id(m.group(0)), msg)
            exc = f" exc={rec.exc_info[0].__name__}" if rec.exc_info and rec.exc_info[0] else ""
            self.lines.append(f"{rec.levelname} {msg}{exc}\n")

    def text(self) -> str:
        return "".join(self.lines)


def normalise_body(text: str) -> str:
    """Placeholders for what differs between runs (ids, clock readings); collapse keepalive runs."""
    text = _GENERATED_ID.sub(lambda m: f"{m.group(1)}-<id>", text)
    text = _CREATED.sub(r"\1<created>", text)
    text = _TIMING_FIELD.sub(r"\1<number>", text)
    text = _DAY_FIELD.sub(r'\1"<day>"', text)
    text = _UTC_TIME.sub("<next midnight UTC>", text)
    return _KEEPALIVES.sub(r"\1", text)


def check_snapshot(name: str, actual: str) -> None:
    """Compare with the golden file (or write it when ZEROSERVE_UPDATE_SNAPSHOTS=1)."""
    path = SNAPSHOTS / name
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual, encoding="utf-8")
        return
    assert path.exists(), f"no golden file {path}; run with ZEROSERVE_UPDATE_SNAPSHOTS=1 to write it"
    expected = path.read_text(encoding="utf-8")
    if actual != expected:
        diff = difflib.unified_diff(
            expected.splitlines(keepends=True),
            actual.splitlines(keepends=True),
            fromfile=f"golden/{name}",
            tofile=f"actual/{name}",
        )
        pytest.fail(f"{name} differs from its golden file:\n" + "".join(diff), pytrace=False)


# -- scenarios --------------------------------------------------------------------------------------
Scenario = Callable[[Transcript, SnapshotBackend], Awaitable[None]]
SCENARIOS: dict[str, Scenario] = {}

_CHAT = {"model": "gen", "messages": [{"role": "user", "content": "hi"}]}


def scenario(fn: Scenario) -> Scenario:
    """Register a scenario: it runs on a fresh app and its golden file is ``<function name>.txt``."""
    SCENARIOS[fn.__name__] = fn
    return fn


@scenario
async def chat_native(t: Transcript, backend: SnapshotBackend) -> None:
    t.note("native chat completion (model gen): JSON, SSE, SSE with the usage chunk, n=2")
    await t.call("POST", "/v1/chat/completions", json_body=_CHAT)
    await t.call("POST", "/v1/chat/completions", json_body={**_CHAT, "stream": True})
    await t.call(
        "POST",
        "/v1/chat/completions",
        json_body={**_CHAT, "stream": True, "stream_options": {"include_usage": True}},
    )
    await t.call(
        "POST",
        "/v1/chat/completions",
        json_body={**_CHAT, "n": 2, "seed": 7, "stop": "x", "temperature": 0, "top_p": 0.5, "max_tokens": 10},
    )
    await t.call("POST", "/v1/chat/completions", json_body={**_CHAT, "n": 2, "stream": True})


@scenario
async def completions_native(t: Transcript, backend: SnapshotBackend) -> None:
    t.note("native completions (model gen), 2 prompts x n=2: JSON, SSE, SSE with usage")
    body = {"model": "gen", "prompt": ["a", "b"], "n": 2}
    await t.call("POST", "/v1/completions", json_body=body)
    await t.call("POST", "/v1/completions", json_body={**body, "stream": True})
    await t.call(
        "POST", "/v1/completions", json_body={**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    await t.call("POST", "/v1/completions", json_body={"model": "gen", "prompt": "a", "max_tokens": 5})


@scenario
async def passthrough(t: Transcript, backend: SnapshotBackend) -> None:
    t.note("passthrough to the engine's OpenAI layer (model vgen, engine vllm)")
    body = {"model": "vgen", "prompt": "a"}
    await t.call("POST", "/v1/completions", json_body=body)
    await t.call("POST", "/v1/completions", json_body={**body, "stream": True})
    await t.call("POST", "/v1/completions", json_body={**body, "stream": True, "stream_options": {}})
    await t.call(
        "POST", "/v1/completions", json_body={**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    await t.call(
        "POST",
        "/v1/chat/completions",
        json_body={"model": "vgen", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    )
    t.note("passthrough refusals: stream_options not an object, max_tokens over the cap, n over the cap")
    await t.call("POST", "/v1/completions", json_body={**body, "stream": True, "stream_options": [1]})
    await t.call("POST", "/v1/completions", json_body={**body, "max_tokens": 65})
    await t.call("POST", "/v1/completions", json_body={**body, "n": 1000})


HI = [{"role": "user", "content": "hi"}]
STREAM_USAGE = {"stream": True, "stream_options": {"include_usage": True}}


@scenario
async def cold_wake(t: Transcript, backend: SnapshotBackend) -> None:
    t.note(f"cold models waking for {WAKE_DELAY_S} s with keepalive_s={KEEPALIVE_S}")
    t.note("(consecutive keepalive comments are collapsed to one: their number depends on timing)")
    await t.call("POST", "/v1/chat/completions", json_body={"model": "coldgen", "messages": HI, "stream": True})
    await t.call("POST", "/v1/completions", json_body={"model": "coldgen", "prompt": "a", **STREAM_USAGE})
    await t.call("POST", "/v1/completions", json_body={"model": "coldgen", "prompt": "a"})
    await t.call("POST", "/v1/completions", json_body={"model": "coldvgen", "prompt": "a", "stream": True})
    await t.call("POST", "/v1/completions", json_body={"model": "coldvgen", "prompt": "a"})


@scenario
async def stream_errors(t: Transcript, backend: SnapshotBackend) -> None:
    t.note("a model failing mid-stream: an in-band SSE error event, then [DONE]")
    await t.call("POST", "/v1/chat/completions", json_body={"model": "crashgen", "messages": HI, "stream": True})
    await t.call("POST", "/v1/completions", json_body={"model": "rejectgen", "prompt": "a", **STREAM_USAGE})
    t.note("the same models, not streamed: the error is the HTTP answer")
    await t.call("POST", "/v1/completions", json_body={"model": "crashgen", "prompt": "a"})
    await t.call("POST", "/v1/completions", json_body={"model": "rejectgen", "prompt": "a"})
    t.note("a prompt refused before its first delta: an HTTP error even when streamed")
    await t.call("POST", "/v1/completions", json_body={"model": "gen", "prompt": "too long", "stream": True})


@scenario
async def embeddings(t: Transcript, backend: SnapshotBackend) -> None:
    t.note("embeddings (model emb): float, base64, dimensions")
    await t.call("POST", "/v1/embeddings", json_body={"model": "emb", "input": ["a b", "c"]})
    await t.call("POST", "/v1/embeddings", json_body={"model": "emb", "input": "abc", "encoding_format": "base64"})
    await t.call("POST", "/v1/embeddings", json_body={"model": "emb", "input": "abc", "dimensions": 2})
    t.note("an engine failure (500, generic), a failed model (503), a cold start over its bound (503)")
    await t.call("POST", "/v1/embeddings", json_body={"model": "boom", "input": "x"})
    await t.call("POST", "/v1/embeddings", json_body={"model": "broken", "input": "x"})
    await t.call("POST", "/v1/embeddings", json_body={"model": "sleepy", "input": "x"})


@scenario
async def classify(t: Transcript, backend: SnapshotBackend) -> None:
    t.note("classification (model cls, cold) on both paths")
    await t.call("POST", "/v1/classify", json_body={"model": "cls", "input": ["a", "b"]})
    await t.call("POST", "/classify", json_body={"model": "cls", "input": "a"})


@scenario
async def models_and_status(t: Transcript, backend: SnapshotBackend) -> None:
    t.note("the model directory, health and the pool status")
    await t.call("GET", "/v1/models")
    await t.call("GET", "/v1/models/gen")
    await t.call("GET", "/v1/models/broken")
    await t.call("GET", "/v1/models/nope")
    await t.call("GET", "/health")
    await t.call("POST", "/v1/embeddings", json_body={"model": "emb", "input": "x"})
    await t.call("POST", "/v1/classify", json_body={"model": "cls", "input": "a"})
    await t.call("GET", "/v1/zeroserve/status")
    await t.call("GET", "/v1/usage")


@scenario
async def errors(t: Transcript, backend: SnapshotBackend) -> None:
    t.note("model lookup: unknown (404), wrong task (400)")
    await t.call("POST", "/v1/embeddings", json_body={"model": "nope", "input": "x"})
    await t.call("POST", "/v1/embeddings", json_body={"model": "gen", "input": "x"})
    await t.call("POST", "/v1/chat/completions", json_body={"model": "emb", "messages": [{"role": "user"}]})
    t.note("validation (400)")
    await t.call("POST", "/v1/embeddings", json_body={"model": "emb"})
    await t.call("POST", "/v1/embeddings", json_body={"model": "emb", "input": "x", "encoding_format": "hex"})
    await t.call("POST", "/v1/chat/completions", json_body={"model": "gen", "messages": []})
    await t.call("POST", "/v1/chat/completions", json_body={**_CHAT, "max_tokens": 65})
    await t.call("POST", "/v1/chat/completions", json_body={**_CHAT, "n": 5})
    await t.call("POST", "/v1/chat/completions", json_body={**_CHAT, "temperature": -1})
    await t.call("POST", "/v1/chat/completions", json_body={**_CHAT, "stream_options": {"include_usage": True}})
    await t.call("POST", "/v1/completions", json_body={"model": "gen", "prompt": "x", "logprobs": 2})
    await t.call("POST", "/v1/completions", json_body={"model": "gen", "prompt": "x", "stop": ["a"] * 5})
    t.note("malformed bodies (400)")
    json_type = {"content-type": "application/json"}
    await t.call("POST", "/v1/completions", content=b'{"model": "gen", "prompt": "x", "temperature": NaN}')
    await t.call("POST", "/v1/embeddings", content=b"{not json", headers=json_type)
    await t.call("POST", "/v1/embeddings", content=b"\xff\xfe", headers=json_type)
    await t.call("POST", "/v1/embeddings", content=b"[1, 2]", headers=json_type)
    await t.call("POST", "/v1/embeddings", content=b"", headers=json_type)
    await t.call("POST", "/v1/embeddings", content=b'{"model": "emb", "input": "\\ud800"}', headers=json_type)
    await t.call("POST", "/v1/embeddings", content=b'{"a": ' * 70 + b"1" + b"}" * 70, headers=json_type)
    t.note("too large (413): by content-length, and a chunked body without one")
    await t.call("POST", "/v1/embeddings", json_body={"model": "emb", "input": "x" * 20_000})

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b" " * 6_000

    resp = await t.client.post("/v1/embeddings", content=chunks(), headers=json_type)
    t.record("POST", "/v1/embeddings", b"<3 chunks of 6000 spaces, no content-length>", json_type, resp)
    t.note("routing: unknown path (404), wrong method (405)")
    await t.call("GET", "/v1/nothing")
    await t.call("GET", "/v1/embeddings")


@scenario
async def overload(t: Transcript, backend: SnapshotBackend) -> None:
    t.note("load shedding: 2 requests hold model emb's 2 slots; the third gets 503 + Retry-After")
    backend.gate.clear()
    body = {"model": "emb", "input": "x"}
    raw, json_type = json.dumps(body).encode(), {"content-type": "application/json"}
    held = [asyncio.create_task(t.client.post("/v1/embeddings", content=raw, headers=json_type)) for _ in range(2)]
    await backend.wait_held(2)
    await t.call("POST", "/v1/embeddings", json_body=body)
    backend.gate.set()
    for resp in await asyncio.gather(*held):
        t.record("POST", "/v1/embeddings", raw, json_type, resp)


@scenario
async def request_ids(t: Transcript, backend: SnapshotBackend) -> None:
    t.note("X-Request-Id: a well-formed one is echoed, anything else replaced")
    await t.call("GET", "/v1/models/emb", headers={"x-request-id": "abc-123"})
    await t.call("GET", "/v1/models/emb", headers={"x-request-id": "evil value"})
    await t.call("GET", "/v1/models/emb", headers={"x-request-id": "x" * 65})


async def _run(
    name: str,
    run: Scenario,
    app: FastAPI,
    backend: SnapshotBackend,
    caplog: pytest.LogCaptureFixture,
    volatile: frozenset[str] = frozenset(),
) -> None:
    """Run one scenario on a fresh client and compare its transcript with the golden file ``name``."""
    caplog.set_level(logging.INFO, logger="zeroserve.gateway")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        t = Transcript(client, volatile)
        await run(t, backend)
    # A stream that ended without its charge settles in a task of its own: let those finish first.
    others = asyncio.all_tasks() - {asyncio.current_task()}
    async with asyncio.timeout(5):
        await asyncio.gather(*others, return_exceptions=True)
    t.logs([r for r in caplog.records if r.name == "zeroserve.gateway"])
    check_snapshot(name, t.text())


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_gateway_scenario(name: str, caplog: pytest.LogCaptureFixture) -> None:
    backend = SnapshotBackend()
    await _run(f"{name}.txt", SCENARIOS[name], create_app(_spec(), backend), backend, caplog)


@pytest.mark.parametrize("name", ["chat_native", "completions_native", "passthrough", "cold_wake", "stream_errors"])
async def test_replicas_of_the_previous_wire_version_give_the_same_transcript(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """During a rolling redeploy a new gateway meets replicas of the previous version: sentinel
    deltas, tagged tuples, vLLM's usage chunk inside the text. Every byte to the client is the same."""
    backend = SnapshotBackend(wire_version=1)
    await _run(f"{name}.txt", SCENARIOS[name], create_app(_spec(), backend), backend, caplog)


async def test_request_id_not_echoed_behind_serve_proxy(caplog: pytest.LogCaptureFixture) -> None:
    """echo_request_id=False (behind Ray Serve's proxy): no X-Request-Id header, still logged."""
    backend = SnapshotBackend()
    app = create_app(_spec(), backend, echo_request_id=False)
    await _run("request_ids_not_echoed.txt", request_ids, app, backend, caplog)


async def test_auth(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """API keys: 401 without or with an unknown key, 403 for a model outside the tier, quota headers,
    429 once the day's budget is spent, /v1/usage."""
    spec = _spec(
        auth={
            "enabled": True,
            "tiers": {"free": {"daily_gpu_seconds": 0.25, "models": ["emb", "gen"]}},
        }
    )
    ledger = SQLiteLedger(tmp_path / "ledger.db")
    ledger.add_key(hash_key(API_KEY), KeyRecord(KEY_ID, "alice", "free", 0.0))
    backend = SnapshotBackend()
    app = create_app(spec, backend, ledger=ledger)
    auth = {"authorization": f"Bearer {API_KEY}"}

    async def auth_scenario(t: Transcript, backend: SnapshotBackend) -> None:
        await t.call("POST", "/v1/embeddings", json_body={"model": "emb", "input": "x"})
        await t.call(
            "POST",
            "/v1/embeddings",
            json_body={"model": "emb", "input": "x"},
            headers={"authorization": "Bearer zs-00000000-" + "a" * 32},
        )
        await t.call("POST", "/v1/classify", json_body={"model": "cls", "input": "x"}, headers=auth)
        await t.call("POST", "/v1/embeddings", json_body={"model": "emb", "input": "x"}, headers=auth)
        await t.call("POST", "/v1/chat/completions", json_body={**_CHAT, "stream": True}, headers=auth)
        await t.call("POST", "/v1/embeddings", json_body={"model": "emb", "input": ["x", "y"]}, headers=auth)
        await t.call("POST", "/v1/embeddings", json_body={"model": "emb", "input": "x"}, headers=auth)
        await t.call("GET", "/v1/usage", headers=auth)
        await t.call("GET", "/v1/usage")

    # A 429's Retry-After counts the seconds to the next midnight UTC.
    await _run("auth.txt", auth_scenario, app, backend, caplog, volatile=frozenset({"retry-after"}))


def test_openapi_and_routes() -> None:
    """The OpenAPI document (what schemathesis fuzzes and clients generate from) and the route table."""
    app = create_app(_spec(), SnapshotBackend())
    check_snapshot("openapi.json", json.dumps(app.openapi(), sort_keys=True, indent=1) + "\n")
    routes = []
    for route in app.routes:
        routes.append(
            {
                "path": getattr(route, "path", None),
                "methods": sorted(getattr(route, "methods", None) or []),
                "name": getattr(route, "name", None),
                "kind": type(route).__name__,
                "in_schema": route.include_in_schema if isinstance(route, APIRoute) else None,
            }
        )
    check_snapshot("routes.json", json.dumps(routes, indent=1) + "\n")

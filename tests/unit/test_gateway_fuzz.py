"""Hostile input at the gateway: schemathesis over its OpenAPI schema, hypothesis over bodies,
names and headers, and the explicit cases of the reliability issue, each with its exact status.

Every answer is a 2xx or a 4xx in the OpenAI error shape, never a 5xx or a traceback; nothing
hangs; a model name that is not configured reaches no replica, no file and no network; and the
gateway still answers a normal request afterwards. ``bench/fuzz.py`` runs the same schema fuzz
with more examples and reports the figures.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Coroutine, Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import hypothesis
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import strategies as st

from zeroserve.config import GatewaySpec
from zeroserve.gateway import create_app
from zeroserve.protocol import MAX_INPUTS
from zeroserve.quota import SQLiteLedger

from .gateway_support import HEALTHY_MODELS, FakeBackend, fuzz_schema, response_problems

pytestmark = pytest.mark.timeout(120)

SEED = 20260611  # hypothesis seed of the schema fuzz (bench/fuzz.py takes --seed)
EXAMPLES = 50  # per operation and generation mode; the whole file stays well under a minute on 2 cores
SPEC = GatewaySpec(max_body_bytes=50_000, request_timeout_s=10, cold_start_timeout_s=10)
NORMAL: dict[str, Any] = {"model": "emb", "input": "hello"}
_T = TypeVar("_T")

_settings = hypothesis.settings(
    max_examples=250,
    database=None,
    deadline=None,
    # One app serves every example on purpose: it must keep serving whatever came before.
    suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture, hypothesis.HealthCheck.too_slow],
)


# -- side effects: nothing but the backend may act on a model name -----------------------------------------
_WATCHED = frozenset(
    {
        "open",
        "os.listdir",
        "os.scandir",
        "shutil.copyfile",
        "socket.connect",
        "socket.getaddrinfo",
        "urllib.Request",
        "subprocess.Popen",
        "os.system",
        "os.posix_spawn",
        "os.exec",
    }
)
_touched: list[str] | None = None
_hooked = False


def _python_code(path: str) -> bool:
    """Python reading its own code: a lazy import, or FastAPI's getsourcelines on an endpoint's first error."""
    return path.endswith((".py", ".pyc", ".so")) and any(path.startswith(d) for d in sys.path if d.startswith("/"))


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _touched is None or event not in _WATCHED:
        return
    if event == "open" and _python_code(str(args[0])):
        return
    _touched.append(f"{event}{args!r}"[:200])


@contextmanager
def watch_side_effects() -> Iterator[list[str]]:
    """Record every file open, directory listing, connection or process start (Python audit events)."""
    global _touched, _hooked
    if not _hooked:
        sys.addaudithook(_audit)  # cannot be removed; a no-op outside this block
        _hooked = True
    _touched = []
    try:
        yield _touched
    finally:
        _touched = None


def test_side_effect_watch_sees_a_file_read(tmp_path: Path) -> None:
    with watch_side_effects() as touched:
        (tmp_path / "f").write_text("x")
    assert touched and "open" in touched[0]


# -- drivers ---------------------------------------------------------------------------------------------
class Gateway:
    """An app on its own event loop, for synchronous hypothesis tests."""

    def __init__(self, spec: GatewaySpec = SPEC, **kwargs: Any) -> None:
        self.backend = FakeBackend()
        self.app: FastAPI = create_app(spec, self.backend, **kwargs)
        self.loop = asyncio.new_event_loop()
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://gw")

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return self.loop.run_until_complete(asyncio.wait_for(coro, 30))

    def post(self, path: str, content: bytes | str, headers: dict[str, str] | None = None) -> httpx.Response:
        return self.run(self.client.post(path, content=content, headers=headers))

    def close(self) -> None:
        self.loop.run_until_complete(self.client.aclose())
        self.loop.close()


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    gw = Gateway()
    yield gw
    gw.close()


async def raw_call(
    app: FastAPI,
    path: str,
    body: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    messages: list[dict[str, Any]] | None = None,
    method: str = "POST",
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Call the ASGI app with bytes no HTTP client would send; after ``messages``, the client waits."""
    pending = messages if messages is not None else [{"type": "http.request", "body": body, "more_body": False}]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers or [],
        "client": ("127.0.0.1", 5000),
        "server": ("gw", 80),
    }
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop(0)
        await asyncio.Event().wait()  # a client that never sends the rest
        raise AssertionError("unreachable")

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), 30)
    start = next(m for m in sent if m["type"] == "http.response.start")
    content = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], start.get("headers", []), content


def _error(resp: httpx.Response) -> dict[str, Any]:
    assert response_problems(resp) == [], response_problems(resp)
    return resp.json()["error"]  # type: ignore[no-any-return]


async def _still_serves(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/embeddings", json=NORMAL)
    assert resp.status_code == 200, resp.text


# -- (a) schemathesis over the whole schema --------------------------------------------------------------
def test_openapi_describes_every_request_body() -> None:
    schema = create_app(SPEC, FakeBackend()).openapi()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/classify", "/classify"):
        body = schema["paths"][path]["post"]["requestBody"]
        described = body["content"]["application/json"]["schema"]
        assert body["required"] and "model" in described["required"], path
        assert "$ref" not in json.dumps(described), path  # $defs are inlined: refs would not resolve
    chat = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    part = chat["properties"]["messages"]["items"]["properties"]["content"]["anyOf"][1]["items"]
    assert part["properties"]["type"]["const"] == "text"  # what the server accepts, not just the type


# Positive data may still be refused for what the static schema cannot know: which names are
# configured, their tasks and caps. Anything else would mean the schema promises too much.
_EXPECTED_REFUSALS = {
    "404 model model_not_found",
    "400 model wrong_task",
    "400 max_tokens None",
    "400 n None",
    "400 stream_options None",  # only with stream: true, which the schema says in words only
    "400 top_logprobs None",  # 0 to 20 on a vLLM model (OpenAI's range); the native path ignores it
    "404 None None",  # /v1/usage with API keys off; an empty path parameter
}


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schema_fuzz_finds_no_failure(mode: str) -> None:
    backend = FakeBackend()
    app = create_app(SPEC, backend)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    report = fuzz_schema(schema, examples=EXAMPLES, seed=SEED, models=HEALTHY_MODELS, modes=[mode])
    assert report.failures == [], "\n".join(report.failures[:20])
    assert report.cases >= 5 * EXAMPLES and report.statuses[400] > 0
    assert set(report.statuses) <= {200, 400, 404, 413}  # not even a 503: every model named here is healthy
    if mode == "positive":
        assert report.statuses[200] > 0  # generated bodies got past validation to the backend
        assert set(report.refusals) <= _EXPECTED_REFUSALS, report.refusals
    assert {name for _, name in backend.calls} <= set(HEALTHY_MODELS)
    operation = schema.find_operation_by_label("POST /v1/embeddings")
    assert operation is not None
    assert operation.Case(body=NORMAL, media_type="application/json").call().status_code == 200


# -- (b) the explicit cases, each with its exact status ---------------------------------------------------
_CHAT = {"model": "gen", "messages": [{"role": "user", "content": "hi"}]}
_DEEP = 20_000  # nesting json cannot parse within the recursion limit, in 40 KB (under the 50 KB limit)


def _nested(depth: int, inner: Any = None) -> Any:
    value: Any = [] if inner is None else inner
    for _ in range(depth - 1):
        value = [value] if inner is None else {"a": value}
    return value


HOSTILE: list[tuple[str, str, bytes | str | dict[str, Any] | list[Any], int, str | None]] = [
    # wrong types
    ("model-int", "/v1/embeddings", {"model": 5, "input": "x"}, 400, "model"),
    ("model-null", "/v1/embeddings", {"model": None, "input": "x"}, 400, "model"),
    ("model-list", "/v1/embeddings", {"model": ["emb"], "input": "x"}, 400, "model"),
    ("input-object", "/v1/embeddings", {"model": "emb", "input": {"a": 1}}, 400, "input"),
    ("input-token-ids", "/v1/embeddings", {"model": "emb", "input": [1, 2]}, 400, "input"),
    ("input-mixed", "/v1/embeddings", {"model": "emb", "input": ["x", 1]}, 400, "input"),
    ("dimensions-negative", "/v1/embeddings", {**NORMAL, "dimensions": -1}, 400, "dimensions"),
    ("messages-string", "/v1/chat/completions", {"model": "gen", "messages": "hi"}, 400, "messages"),
    ("role-unknown", "/v1/chat/completions", {"model": "gen", "messages": [{"role": "root"}]}, 400, "messages"),
    ("stream-string", "/v1/completions", {"model": "gen", "prompt": "x", "stream": "sure"}, 400, "stream"),
    ("stop-int", "/v1/completions", {"model": "gen", "prompt": "x", "stop": [1]}, 400, "stop"),
    ("classify-input-null", "/classify", {"model": "cls", "input": None}, 400, "input"),
    ("body-list", "/v1/embeddings", [NORMAL], 400, None),
    ("body-string", "/v1/chat/completions", '"hi"', 400, None),
    ("body-null", "/v1/completions", "null", 400, None),
    ("body-empty", "/v1/classify", b"", 400, None),
    ("body-truncated", "/v1/embeddings", b'{"model": "emb", "inp', 400, None),
    # an image part naming a local file: refused, never opened
    (
        "image-file-part",
        "/v1/chat/completions",
        {
            "model": "gen",
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}
            ],
        },
        400,
        None,
    ),
    # huge and deeply nested JSON
    ("over-limit", "/v1/embeddings", {"model": "emb", "input": ["x"] * 20_000}, 413, None),
    ("too-many-inputs", "/v1/embeddings", {"model": "emb", "input": ["x"] * (MAX_INPUTS + 1)}, 400, "input"),
    ("too-many-prompts", "/v1/completions", {"model": "gen", "prompt": ["x"] * 65}, 400, "prompt"),
    (
        "nested-too-deep",
        "/v1/embeddings",
        '{"model": "emb", "input": "x", "x": ' + "[" * _DEEP + "]" * _DEEP + "}",
        400,
        None,
    ),
    ("nested-array-body", "/v1/embeddings", "[" * _DEEP, 400, None),
    ("nested-64-is-fine", "/v1/embeddings", {**NORMAL, "x": json.loads("[" * 63 + "]" * 63)}, 200, None),
    ("nested-65", "/v1/embeddings", {**NORMAL, "x": json.loads("[" * 64 + "]" * 64)}, 400, None),
    # a forwarded (vLLM) body is pickled for the replica: 500 levels overflowed there (was a 500)
    ("nested-forwarded", "/v1/completions", {"model": "vgen", "prompt": "x", "x": _nested(500)}, 400, None),
    ("nested-dicts-forwarded", "/v1/completions", {"model": "vgen", "prompt": "x", "x": _nested(500, {})}, 400, None),
    (
        "int-over-digit-limit",
        "/v1/completions",
        '{"model": "gen", "prompt": "x", "seed": 1' + "0" * 5000 + "}",
        400,
        None,
    ),
    # invalid UTF-8 and lone surrogates
    ("invalid-utf8", "/v1/embeddings", b'{"model": "emb", "input": "\xff\xfe"}', 400, None),
    ("utf8-encoded-surrogate", "/v1/embeddings", b'{"model": "emb", "input": "\xed\xa0\x80"}', 400, None),
    ("lone-high-surrogate", "/v1/embeddings", '{"model": "emb", "input": "a\\ud800b"}', 400, None),
    ("lone-low-surrogate", "/v1/classify", '{"model": "cls", "input": ["\\udfff"]}', 400, None),
    ("surrogate-in-key", "/v1/embeddings", '{"model": "emb", "input": "x", "\\udc00": 1}', 400, None),
    ("surrogate-in-stop", "/v1/completions", '{"model": "gen", "prompt": "x", "stop": "\\ud800"}', 400, None),
    ("utf16-body", "/v1/embeddings", json.dumps(NORMAL).encode("utf-16"), 400, None),
    ("utf8-bom", "/v1/embeddings", b"\xef\xbb\xbf" + json.dumps(NORMAL).encode(), 400, None),
    ("surrogate-pair-is-fine", "/v1/embeddings", '{"model": "emb", "input": "\\ud83d\\ude00"}', 200, None),
    ("escaped-backslash-is-fine", "/v1/embeddings", '{"model": "emb", "input": "\\\\ud800"}', 200, None),
    # prompts over the context (the engine refuses; the gateway passes its 400 on)
    ("prompt-over-context", "/v1/completions", {"model": "gen", "prompt": "too long"}, 400, "messages"),
    (
        "prompt-over-context-stream",
        "/v1/completions",
        {"model": "gen", "prompt": "too long", "stream": True},
        400,
        "messages",
    ),
    # max_tokens and n far over the caps
    (
        "max-tokens-over-cap",
        "/v1/completions",
        {"model": "gen", "prompt": "x", "max_tokens": 10**12},
        400,
        "max_tokens",
    ),
    (
        "max-tokens-huge-int",
        "/v1/completions",
        {"model": "gen", "prompt": "x", "max_tokens": 10**400},
        400,
        "max_tokens",
    ),
    ("max-tokens-zero", "/v1/chat/completions", {**_CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("max-completion-over-cap", "/v1/chat/completions", {**_CHAT, "max_completion_tokens": 10**9}, 400, "max_tokens"),
    (
        "max-tokens-over-cap-vllm",
        "/v1/completions",
        {"model": "vgen", "prompt": "x", "max_tokens": 10**9},
        400,
        "max_tokens",
    ),
    ("n-over-schema", "/v1/chat/completions", {**_CHAT, "n": 10**9}, 400, "n"),
    ("n-over-cap", "/v1/chat/completions", {**_CHAT, "n": 100}, 400, "n"),
    ("n-over-cap-vllm", "/v1/chat/completions", {**_CHAT, "model": "vgen", "n": 100}, 400, "n"),
    ("n-zero", "/v1/completions", {"model": "gen", "prompt": "x", "n": 0}, 400, "n"),
    ("n-negative", "/v1/completions", {"model": "gen", "prompt": "x", "n": -3}, 400, "n"),
    ("n-fraction", "/v1/completions", {"model": "gen", "prompt": "x", "n": 2.5}, 400, "n"),
    ("seed-over-64-bits", "/v1/completions", {"model": "gen", "prompt": "x", "seed": 2**70}, 400, "seed"),
    # negative or NaN sampling values
    ("temperature-negative", "/v1/chat/completions", {**_CHAT, "temperature": -0.5}, 400, "temperature"),
    ("temperature-nan", "/v1/completions", '{"model": "gen", "prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("top-p-infinity", "/v1/completions", '{"model": "gen", "prompt": "x", "top_p": Infinity}', 400, "top_p"),
    ("top-p-underflow", "/v1/completions", '{"model": "gen", "prompt": "x", "top_p": 1e-400}', 400, "top_p"),
    ("top-p-negative", "/v1/completions", {"model": "gen", "prompt": "x", "top_p": -1}, 400, "top_p"),
    (
        "max-tokens-minus-inf",
        "/v1/completions",
        '{"model": "gen", "prompt": "x", "max_tokens": -Infinity}',
        400,
        "max_tokens",
    ),
    (
        "penalty-nan",
        "/v1/completions",
        '{"model": "gen", "prompt": "x", "presence_penalty": NaN}',
        400,
        "presence_penalty",
    ),
    # model names: path separators, "..", control characters, hub ids that are not configured
    ("name-traversal", "/v1/embeddings", {"model": "../../etc/passwd", "input": "x"}, 404, "model"),
    ("name-absolute-path", "/v1/embeddings", {"model": "/etc/passwd", "input": "x"}, 404, "model"),
    ("name-dotdot", "/v1/embeddings", {"model": "..", "input": "x"}, 404, "model"),
    ("name-is-weights-path", "/v1/embeddings", {"model": "./e", "input": "x"}, 404, "model"),
    ("name-home", "/v1/completions", {"model": "~/.cache/huggingface/hub", "prompt": "x"}, 404, "model"),
    ("name-hub-id", "/v1/embeddings", {"model": "sentence-transformers/all-MiniLM-L6-v2", "input": "x"}, 404, "model"),
    ("name-hub-id-chat", "/v1/chat/completions", {**_CHAT, "model": "Qwen/Qwen2.5-0.5B-Instruct"}, 404, "model"),
    ("name-url", "/v1/classify", {"model": "https://huggingface.co/org/model", "input": "x"}, 404, "model"),
    ("name-file-url", "/v1/completions", {"model": "file:///etc/passwd", "prompt": "x"}, 404, "model"),
    ("name-nul", "/v1/embeddings", {"model": "emb\x00", "input": "x"}, 404, "model"),
    ("name-newline", "/v1/embeddings", {"model": "emb\r\nX-Injected: 1", "input": "x"}, 404, "model"),
    ("name-backslashes", "/v1/embeddings", {"model": "..\\..\\windows", "input": "x"}, 404, "model"),
    ("name-case", "/v1/embeddings", {"model": "EMB", "input": "x"}, 404, "model"),
    ("name-empty", "/v1/embeddings", {"model": "", "input": "x"}, 400, "model"),
    ("name-too-long", "/v1/embeddings", {"model": "a/" * 200, "input": "x"}, 400, "model"),
]


def zeroserve_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The captured records of zeroserve's own loggers.

    caplog sees every logger that propagates to the root: a Ray Serve background task left
    running by an earlier test ("Failed to run metrics task 'push_metrics_to_controller'") once
    failed a hostile-request case here that had logged nothing itself.
    """
    return [r for r in caplog.records if r.name == "zeroserve" or r.name.startswith("zeroserve.")]


@pytest.mark.parametrize(
    ("path", "payload", "status", "param"), [case[1:] for case in HOSTILE], ids=[case[0] for case in HOSTILE]
)
async def test_hostile_request_gets_its_status(
    path: str, payload: Any, status: int, param: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    backend = FakeBackend()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(SPEC, backend)), base_url="http://gw")
    content = payload if isinstance(payload, bytes | str) else json.dumps(payload)
    with caplog.at_level(logging.ERROR, logger="zeroserve"), watch_side_effects() as touched:
        resp = await client.post(path, content=content, headers={"content-type": "application/json"})
    assert resp.status_code == status, resp.text
    assert response_problems(resp) == []
    if status >= 400:
        assert _error(resp)["param"] == param
    assert touched == [] and zeroserve_records(caplog) == []
    if status == 404:
        assert backend.calls == []  # an unknown name reaches no replica
    await _still_serves(client)


async def test_body_over_the_limit_without_content_length_is_413() -> None:
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(SPEC, FakeBackend())), base_url="http://gw")

    async def chunks() -> Any:
        for _ in range(100):
            yield b"x" * 1000

    resp = await client.post("/v1/embeddings", content=chunks())
    assert resp.status_code == 413 and _error(resp)
    await _still_serves(client)


async def test_unknown_routes_and_methods_are_openai_shaped() -> None:
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(SPEC, FakeBackend())), base_url="http://gw")
    for method, path, status in [
        ("GET", "/v1/embeddings", 405),
        ("PUT", "/v1/chat/completions", 405),
        ("DELETE", "/v1/models/emb", 405),
        ("GET", "/../../etc/passwd", 404),
        ("GET", "/v1/models/..%2F..%2Fetc%2Fpasswd", 404),
        ("GET", "/v1/models/org%2Fmodel", 404),
        ("POST", "/v1/engines/emb/embeddings", 404),
    ]:
        resp = await client.request(method, path)
        assert resp.status_code == status, (method, path, resp.text)
        _error(resp)
    await _still_serves(client)


@pytest.mark.parametrize(
    ("header", "echoed"),
    [
        (b"abc-123", True),
        (b"abc\n", False),  # a trailing newline slipped past "^...$"
        (b"abc\r\nSet-Cookie: session=stolen", False),
        (b"abc\x00", False),
        (b"a" * 65, False),
        ("r\xe9sum\xe9".encode("latin-1"), False),
        (b"", False),
    ],
)
async def test_request_id_header_cannot_inject(header: bytes, echoed: bool) -> None:
    app = create_app(SPEC, FakeBackend())
    status, headers, _ = await raw_call(app, "/v1/models", method="GET", headers=[(b"x-request-id", header)])
    ids = [value for key, value in headers if key.lower() == b"x-request-id"]
    assert status == 200 and len(ids) == 1
    assert (ids[0] == header) is echoed
    assert b"\r" not in ids[0] and b"\n" not in ids[0] and len(ids[0]) <= 64


async def test_error_answers_carry_one_request_id() -> None:
    app = create_app(SPEC, FakeBackend())
    body = json.dumps({"model": "nope", "input": "x"}).encode()
    status, headers, _ = await raw_call(app, "/v1/embeddings", body, headers=[(b"x-request-id", b"req-1")])
    assert status == 404
    assert [value for key, value in headers if key.lower() == b"x-request-id"] == [b"req-1"]


@pytest.mark.parametrize(
    ("length", "status"),
    [(b"\xb2", 200), (b"9" * 30, 413), (b"-1", 200), (b"abc", 200), (b"", 200), (b"\xd9\xa3", 200)],
)
async def test_content_length_that_lies_is_not_a_500(length: bytes, status: int) -> None:
    # "\xb2" (superscript two) passes str.isdigit() but not int(): it was a 500.
    app = create_app(SPEC, FakeBackend())
    body = json.dumps(NORMAL).encode()
    got, _, _ = await raw_call(app, "/v1/embeddings", body, headers=[(b"content-length", length)])
    assert got == status


async def test_client_that_hangs_up_mid_body_is_not_a_server_error(caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(SPEC, FakeBackend())
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": b'{"model": "e', "more_body": True},
        {"type": "http.disconnect"},
    ]
    with caplog.at_level(logging.ERROR, logger="zeroserve"):
        status, _, body = await raw_call(app, "/v1/embeddings", messages=messages)
    assert status == 400 and b"closed the connection" in body
    assert zeroserve_records(caplog) == []  # was a 500 with a logged traceback


async def test_body_that_never_ends_times_out_with_408() -> None:
    app = create_app(GatewaySpec(body_timeout_s=0.2), FakeBackend())
    messages = [{"type": "http.request", "body": b'{"model": "emb", ', "more_body": True}]
    status, _, body = await raw_call(app, "/v1/embeddings", messages=messages)
    assert status == 408 and json.loads(body)["error"]["code"] == "body_timeout"
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")
    await _still_serves(client)


async def test_slow_uploads_hold_at_most_their_places_and_others_are_served() -> None:
    """Six clients that send a part of their body and stop, against four places: two are refused at
    once (503, Retry-After), four hold their places until the body timeout (408), and requests
    whose body comes at once are served all along, none of them waiting for a place."""
    app = create_app(GatewaySpec(body_timeout_s=4, max_slow_bodies=4, retry_after_s=2), FakeBackend())
    part = [{"type": "http.request", "body": b'{"model": "emb", ', "more_body": True}]
    slow = [asyncio.ensure_future(raw_call(app, "/v1/embeddings", messages=list(part))) for _ in range(6)]
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")
    await asyncio.sleep(1.5)  # past the grace: every slow one has taken a place or been refused
    refused = [t for t in slow if t.done()]
    assert len(refused) == 2
    for task in refused:
        status, headers, body = task.result()
        assert status == 503 and json.loads(body)["error"]["code"] == "slow_uploads"
        assert dict(headers)[b"retry-after"] == b"2"
    for _ in range(5):  # every place is held: a body that comes at once needs none
        await _still_serves(client)
    held = await asyncio.gather(*[t for t in slow if t not in refused])
    assert [status for status, _, _ in held] == [408] * 4
    # The places are given back: slow uploads may take them again.
    again = await asyncio.wait_for(raw_call(app, "/v1/embeddings", messages=list(part)), 10)
    assert again[0] == 408


async def test_auth_on_refuses_hostile_requests_with_401_first(tmp_path: Path) -> None:
    spec = GatewaySpec.model_validate(
        {**SPEC.model_dump(), "auth": {"enabled": True, "tiers": {"t": {"daily_gpu_seconds": 100}}}}
    )
    backend = FakeBackend()
    app = create_app(spec, backend, ledger=SQLiteLedger(tmp_path / "l.db"))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")
    for path, content in [
        ("/v1/embeddings", b"\xff\xfe"),
        ("/v1/embeddings", json.dumps({"model": "../../etc/passwd", "input": "x"}).encode()),
        ("/v1/completions", json.dumps({"model": "gen", "prompt": "x", "n": 10**9}).encode()),
        ("/v1/embeddings", b"x" * 100_000),
    ]:
        resp = await client.post(path, content=content, headers={"authorization": "Bearer zs-nope"})
        assert resp.status_code == 401, resp.text
        assert response_problems(resp) == []
    assert backend.calls == []


# -- (c) hypothesis ---------------------------------------------------------------------------------------
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
_FIELDS = (
    "input",
    "prompt",
    "messages",
    "n",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "encoding_format",
    "dimensions",
    "logprobs",
    "tools",
)
_bodies = st.one_of(
    _json,
    st.fixed_dictionaries({"model": st.sampled_from(list(HEALTHY_MODELS))}, optional={name: _json for name in _FIELDS}),
)
_POSTS = ["/v1/embeddings", "/v1/chat/completions", "/v1/completions", "/v1/classify", "/classify"]


@_settings
@hypothesis.given(path=st.sampled_from(_POSTS), body=_bodies)
def test_any_json_body_gets_a_clean_answer(gateway: Gateway, path: str, body: Any) -> None:
    resp = gateway.post(path, json.dumps(body))
    assert resp.status_code in (200, 400, 404), resp.text
    assert response_problems(resp) == []


@_settings
@hypothesis.given(path=st.sampled_from(_POSTS), body=st.binary(max_size=500))
def test_any_bytes_body_gets_a_400(gateway: Gateway, path: str, body: bytes) -> None:
    resp = gateway.post(path, body)
    assert resp.status_code == 400, resp.text
    assert response_problems(resp) == []


_segments = st.sampled_from(["..", ".", "", "etc", "passwd", "~", "org", "emb", "gen", "models", "C:", "%2e%2e", "\\"])
_names = st.one_of(
    st.lists(_segments, min_size=1, max_size=6).map("/".join),
    st.from_regex(r"[A-Za-z0-9-]{1,20}/[A-Za-z0-9._-]{1,30}", fullmatch=True),  # hub ids
    st.text(max_size=40),  # control characters and everything else
)
_BODY_FOR: dict[str, dict[str, Any]] = {
    "/v1/embeddings": {"input": "x"},
    "/v1/classify": {"input": "x"},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "x"}]},
    "/v1/completions": {"prompt": "x", "stream": True},
}


@_settings
@hypothesis.given(name=_names, path=st.sampled_from(list(_BODY_FOR)))
def test_unconfigured_model_names_reach_nothing(gateway: Gateway, name: str, path: str) -> None:
    hypothesis.assume(name not in gateway.backend.entries)
    with watch_side_effects() as touched:
        resp = gateway.post(path, json.dumps({**_BODY_FOR[path], "model": name}))
        # "", "." and ".." would be path segments the client itself removes from the URL.
        card = (
            None if name in ("", ".", "..") else gateway.run(gateway.client.get("/v1/models/" + quote(name, safe="")))
        )
    assert resp.status_code == (404 if 1 <= len(name) <= 256 else 400), resp.text
    assert _error(resp)["param"] == "model"
    assert card is None or (card.status_code == 404 and response_problems(card) == [])
    assert touched == []  # no file, no directory, no connection, no process: never a download
    assert gateway.backend.calls == []


@_settings
@hypothesis.given(value=st.binary(max_size=100) | st.text(alphabet=st.characters(max_codepoint=255), max_size=80))
def test_any_request_id_is_echoed_only_when_safe(gateway: Gateway, value: bytes | str) -> None:
    raw = value.encode("latin-1") if isinstance(value, str) else value
    status, headers, _ = gateway.run(
        raw_call(gateway.app, "/v1/embeddings", json.dumps(NORMAL).encode(), headers=[(b"x-request-id", raw)])
    )
    ids = [v for k, v in headers if k.lower() == b"x-request-id"]
    assert status == 200 and len(ids) == 1
    safe = 1 <= len(raw) <= 64 and all(chr(c).isascii() and (chr(c).isalnum() or chr(c) in "._:-") for c in raw)
    assert (ids[0] == raw) is safe
    assert all(0x21 <= c < 0x7F for c in ids[0])  # printable ASCII only: nothing to inject


@pytest.fixture(scope="module")
def auth_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    spec = GatewaySpec.model_validate(
        {**SPEC.model_dump(), "auth": {"enabled": True, "tiers": {"t": {"daily_gpu_seconds": 100}}}}
    )
    gw = Gateway(spec, ledger=SQLiteLedger(tmp_path_factory.mktemp("ledger") / "l.db"))
    yield gw
    gw.close()


@_settings
@hypothesis.given(value=st.binary(max_size=300))
def test_any_authorization_header_is_a_401(auth_gateway: Gateway, value: bytes) -> None:
    status, _, body = auth_gateway.run(
        raw_call(auth_gateway.app, "/v1/embeddings", json.dumps(NORMAL).encode(), headers=[(b"authorization", value)])
    )
    assert status == 401, body
    assert json.loads(body)["error"]["code"] == "invalid_api_key"

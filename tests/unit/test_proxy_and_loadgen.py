"""The proxy failsafe (what a client sees when a gateway replica dies) and the load judge."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from zeroserve.loadgen import Shot, judge_json, judge_sse, require_loopback
from zeroserve.proxy import ProxyFailsafe, middlewares


def _scope(path: str = "/v1/chat/completions") -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": path, "headers": [(b"x-request-id", b"req-1")]}


async def _drive(app: Any) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(dict(message))

    await ProxyFailsafe(app)(_scope(), receive, send)
    return sent


async def test_no_answer_becomes_503_with_retry_after() -> None:
    async def died(scope: Any, receive: Any, send: Any) -> None:
        return None  # what Serve's proxy does when the replica dies before the response starts

    sent = await _drive(died)
    assert sent[0]["status"] == 503
    headers = dict(sent[0]["headers"])
    assert headers[b"retry-after"] == b"1"
    assert headers[b"x-request-id"] == b"req-1"  # the id Serve gave the request, for the logs
    body = json.loads(sent[1]["body"])
    assert body["error"]["code"] == "gateway_replica_died"
    assert sent[1]["more_body"] is False


async def test_cut_stream_ends_with_error_event_and_done() -> None:
    async def cut(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b'data: {"choices": []}\n\n', "more_body": True})

    sent = await _drive(cut)
    tail = sent[-1]
    assert tail["more_body"] is False
    lines = tail["body"].decode().split("\n")
    assert json.loads(lines[0][len("data: ") :])["error"]["code"] == "gateway_replica_died"
    assert "data: [DONE]" in lines
    verdict, _ = judge_sse(b"".join(m.get("body", b"") for m in sent[1:]).decode().splitlines())
    assert verdict == "retryable"


async def test_whole_answers_pass_untouched_and_503s_get_retry_after() -> None:
    async def fine(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})

    sent = await _drive(fine)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["headers"] == [(b"content-type", b"application/json")]

    async def unavailable(scope: Any, receive: Any, send: Any) -> None:  # Serve's own text 503
        await send({"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"no replica ", "more_body": True})
        await send({"type": "http.response.body", "body": b"for gateway", "more_body": False})

    sent = await _drive(unavailable)
    assert len(sent) == 2 and sent[0]["status"] == 503
    headers = dict(sent[0]["headers"])
    assert headers[b"retry-after"] == b"1" and headers[b"content-type"] == b"application/json"
    error = json.loads(sent[1]["body"])["error"]
    assert error["message"] == "no replica for gateway" and error["type"] == "service_unavailable"
    assert int(headers[b"content-length"]) == len(sent[1]["body"])

    async def overloaded(scope: Any, receive: Any, send: Any) -> None:  # the gateway's own JSON 503
        await send({"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"error": {}}', "more_body": False})

    sent = await _drive(overloaded)
    assert dict(sent[0]["headers"])[b"retry-after"] == b"1" and sent[1]["body"] == b'{"error": {}}'


async def test_a_client_that_left_gets_nothing_more() -> None:
    async def left(scope: Any, receive: Any, send: Any) -> None:
        await receive()

    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    await ProxyFailsafe(left)(_scope(), receive, send)
    assert sent == []


def test_middlewares_is_what_ray_expects() -> None:
    from starlette.middleware import Middleware

    (mw,) = middlewares()
    assert isinstance(mw, Middleware) and mw.cls is ProxyFailsafe


def _resp(status: int, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, content=json.dumps(body).encode(), headers=headers or {})


@pytest.mark.parametrize(
    ("status", "body", "headers", "verdict"),
    [
        (200, {"data": [{"embedding": [0.1]}]}, {}, "ok"),
        (200, {"data": []}, {}, "lost"),
        (503, {"error": {"code": "replica_died"}}, {"retry-after": "1"}, "retryable"),
        (429, {"error": {"code": "rate_limited"}}, {"retry-after": "3"}, "retryable"),
        (503, {"error": {"code": "x"}}, {}, "lost"),  # no Retry-After: not actionable
        (500, {"error": {"code": "internal_error"}}, {"retry-after": "1"}, "lost"),
    ],
)
def test_judge_json(status: int, body: Any, headers: dict[str, str], verdict: str) -> None:
    resp = _resp(status, body, headers)
    assert judge_json(Shot("embed", "m"), status, resp.content, resp)[0] == verdict


def test_judge_json_truncated_200_is_lost() -> None:
    resp = httpx.Response(200, content=b'{"data": [{"embe')
    assert judge_json(Shot("embed", "m"), 200, resp.content, resp) == ("lost", "200 with a body that is not whole JSON")


@pytest.mark.parametrize(
    ("lines", "verdict"),
    [
        (['data: {"choices": [{"delta": {"content": "a"}}]}', "", "data: [DONE]"], "ok"),
        (
            [
                ": waking",
                'data: {"choices": []}',
                'data: {"error": {"type": "service_unavailable", "code": "replica_died"}}',
                "data: [DONE]",
            ],
            "retryable",
        ),
        (['data: {"choices": []}', 'data: {"choices": []}'], "lost"),  # cut without [DONE]
        (["data: [DONE]"], "lost"),  # nothing generated
        # A server failure in the stream is not a refusal to retry.
        (
            ['data: {"choices": []}', 'data: {"error": {"type": "internal_error", "code": null}}', "data: [DONE]"],
            "lost",
        ),
        (['data: {"choices": [', "data: [DONE]"], "lost"),
    ],
)
def test_judge_sse(lines: list[str], verdict: str) -> None:
    assert judge_sse(lines)[0] == verdict


def test_load_goes_to_loopback_only() -> None:
    require_loopback("http://127.0.0.1:8000")
    with pytest.raises(ValueError, match="loopback"):
        require_loopback("http://10.0.0.5:8000")

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
        (
            503,
            {"error": {"message": "m", "type": "service_unavailable", "code": "replica_died"}},
            {"retry-after": "1"},
            "retryable",
        ),
        (
            429,
            {"error": {"message": "m", "type": "rate_limit_error", "code": "rate_limited"}},
            {"retry-after": "3"},
            "retryable",
        ),
        (503, {"error": {"message": "m", "type": "service_unavailable", "code": "x"}}, {}, "lost"),  # no Retry-After
        (503, {"error": {"message": "m", "type": "t"}}, {"retry-after": "soon"}, "lost"),  # not a number of seconds
        (500, {"error": {"message": "m", "type": "internal_error"}}, {"retry-after": "1"}, "lost"),
        # Not OpenAI's error shape: a client cannot read it, however it is sent.
        (503, {"error": "overloaded"}, {"retry-after": "1"}, "lost"),
        (503, {"error": {"code": "x"}}, {"retry-after": "1"}, "lost"),
        (503, {"detail": "no replica"}, {"retry-after": "1"}, "lost"),
        (503, ["error"], {"retry-after": "1"}, "lost"),
        (503, "Service Unavailable", {"retry-after": "1"}, "lost"),
        (200, ["data"], {}, "lost"),
        (200, "ok", {}, "lost"),
    ],
)
def test_judge_json(status: int, body: Any, headers: dict[str, str], verdict: str) -> None:
    resp = _resp(status, body, headers)
    assert judge_json(Shot("embed", "m"), status, resp.content, resp)[0] == verdict


def test_a_200_that_is_not_an_object_is_lost_not_a_crash() -> None:
    resp = httpx.Response(200, content=b"null")
    assert judge_json(Shot("chat", "m"), 200, resp.content, resp)[0] == "lost"


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
                'data: {"error": {"message": "m", "type": "service_unavailable", "code": "replica_died"}}',
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
        # Error events a client cannot read: never a crash, always lost.
        (['data: {"error": "overloaded"}', "data: [DONE]"], "lost"),
        (['data: {"error": null}', "data: [DONE]"], "lost"),
        (['data: {"error": {"type": 5, "message": "m"}}', "data: [DONE]"], "lost"),
        (["data: 5", "data: [DONE]"], "lost"),
        ([], "lost"),
    ],
)
def test_judge_sse(lines: list[str], verdict: str) -> None:
    assert judge_sse(lines)[0] == verdict


def test_load_goes_to_loopback_only() -> None:
    require_loopback("http://127.0.0.1:8000")
    with pytest.raises(ValueError, match="loopback"):
        require_loopback("http://10.0.0.5:8000")


def _outcome(started: float, latency_s: float, verdict: str = "ok") -> Any:
    from zeroserve.loadgen import Outcome

    return Outcome(Shot("embed", "m"), verdict, 200, started, latency_s)  # type: ignore[arg-type]


def test_a_chaos_run_counts_only_when_every_fault_hit_requests_in_flight() -> None:
    from zeroserve.chaos import Fault, FaultResult, Report
    from zeroserve.loadgen import Tally

    hit = FaultResult(Fault("ray_kill_controller"), at_s=1.0, recovered_s=2.0, at=101.0)
    report = Report(Tally([_outcome(100.0, 0.5), _outcome(100.5, 1.0), _outcome(101.5, 0.2)]), [hit])
    assert report.judge() == [] and hit.in_flight == 1
    # A fault between requests (the load paused, or ended) tests nothing: the run does not count.
    idle = FaultResult(Fault("ray_kill_controller"), at_s=5.0, recovered_s=2.0, at=105.0)
    assert Report(report.tally, [hit, idle]).judge() == ["ray_kill_controller at 5.0 s hit no request in flight"]
    late = FaultResult(Fault("ray_kill_controller"), at_s=1.0, recovered_s=2.0, at=101.0, under_load=False)
    assert Report(report.tally, [late]).judge() == ["ray_kill_controller at 1.0 s hit no request in flight"]
    lost = FaultResult(Fault("ray_kill_controller"), at_s=1.0, recovered_s=None, at=101.0)
    assert Report(report.tally, [lost]).judge() == ["ray_kill_controller at 1.0 s: the pool did not recover"]
    assert Report(Tally(), []).judge() == ["no request was sent"]


def test_the_deadline_is_total_not_per_read() -> None:
    """A server that sends a byte at a time, each well within a read timeout, is lost at the deadline."""
    import threading
    import time as _time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from zeroserve.loadgen import run_load

    class Drip(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            for byte in b'{"data": [{"embedding": [0.1]}]}':
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                _time.sleep(0.1)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        (slow,) = run_load(url, [Shot("embed", "m")], requests=1, concurrency=1, timeout_s=1.0).outcomes
        assert slow.verdict == "lost" and "within 1 s" in slow.reason, slow
        (whole,) = run_load(url, [Shot("embed", "m")], requests=1, concurrency=1, timeout_s=30.0).outcomes
        assert whole.verdict == "ok", whole
    finally:
        server.shutdown()

"""A bounded, mixed OpenAI load that judges every answer: the reliability suite's client.

Each request ends in exactly one verdict:

- ``ok``: a 200 with a whole body (JSON that parses and carries its data, or an SSE
  stream that reached ``data: [DONE]`` without an error event);
- ``retryable``: a clear error the client can act on: 503 or 429 with
  ``Retry-After`` and an OpenAI error body, or an SSE ``error`` event on a broken stream;
- ``lost``: anything else: a 5xx without ``Retry-After``, a 200 with a truncated
  body, a dropped connection, no answer within the deadline.

It uses plain threads and httpx so that tests and ``bench/chaos.py`` drive the real
endpoint the way clients do, over loopback only. Nothing here knows about Ray.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

__all__ = ["Kind", "Outcome", "Shot", "Tally", "judge_json", "judge_sse", "mixed", "require_loopback", "run_load"]

Kind = Literal["embed", "classify", "chat", "chat_stream", "completion_stream"]
Verdict = Literal["ok", "retryable", "lost"]

# Error types (OpenAI's "type") of the refusals a client should retry: 503 and 429 in HTTP.
# An "internal_error" event on a stream is a server failure, not a refusal.
_RETRYABLE_TYPES = {"service_unavailable", "server_overloaded", "rate_limit_error"}


@dataclass(frozen=True)
class Shot:
    """One kind of request against one model."""

    kind: Kind
    model: str


@dataclass(frozen=True)
class Outcome:
    shot: Shot
    verdict: Verdict
    status: int
    started: float  # time.monotonic() when sent
    latency_s: float
    reason: str = ""


@dataclass
class Tally:
    """Every outcome of a run, in the order they finished."""

    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return len(self.outcomes)

    def count(self, verdict: Verdict) -> int:
        return sum(1 for o in self.outcomes if o.verdict == verdict)

    def lost(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.verdict == "lost"]

    def reasons(self) -> Counter[str]:
        return Counter(f"{o.verdict}: {o.reason}" for o in self.outcomes if o.verdict != "ok")

    def summary(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "ok": self.count("ok"),
            "retryable": self.count("retryable"),
            "lost": self.count("lost"),
            "reasons": dict(self.reasons()),
        }


def mixed(embed: str, generate: str, classify: str) -> list[Shot]:
    """Every kind of request over three models: the reliability suite's default mix."""
    return [
        Shot("embed", embed),
        Shot("chat_stream", generate),
        Shot("classify", classify),
        Shot("chat", generate),
        Shot("completion_stream", generate),
    ]


def require_loopback(base_url: str) -> None:
    """Refuse to aim load (or hostile input) at anything but this machine.

    Raises:
        ValueError: not http(s) on a loopback host (127.0.0.0/8, ::1, localhost).
    """
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if parts.scheme not in ("http", "https") or not local:
        raise ValueError(
            f"load is only sent to http(s) on a loopback host (127.0.0.1, ::1, localhost), not {base_url!r}"
        )


def _request(shot: Shot) -> tuple[str, dict[str, Any]]:
    if shot.kind == "embed":
        return "/v1/embeddings", {"model": shot.model, "input": ["a man is eating food", "the movie was awful"]}
    if shot.kind == "classify":
        return "/v1/classify", {"model": shot.model, "input": ["what a wonderful day", "this is terrible"]}
    if shot.kind in ("chat", "chat_stream"):
        return "/v1/chat/completions", {
            "model": shot.model,
            "messages": [{"role": "user", "content": "Tell me a story about a cat."}],
            "max_tokens": 12,
            "temperature": 0,
            "stream": shot.kind == "chat_stream",
        }
    return "/v1/completions", {
        "model": shot.model,
        "prompt": "Once upon a time",
        "max_tokens": 12,
        "temperature": 0,
        "stream": True,
    }


def _openai_error(body: object) -> dict[str, Any] | None:
    """The ``error`` object of an OpenAI error body (a message and a type), or None."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str) and isinstance(error.get("type"), str):
        return error
    return None


def _error_is_clear(status: int, body: bytes, resp: httpx.Response) -> tuple[bool, str]:
    """A retryable refusal: 429/503, a whole-number Retry-After, and the OpenAI error shape."""
    try:
        data = json.loads(body)
    except ValueError:
        return False, f"{status} without a JSON body"
    error = _openai_error(data)
    if error is None:
        return False, f"{status} without an OpenAI error body"
    code = error.get("code")
    if status not in (429, 503):
        return False, f"{status} {code}"
    if not resp.headers.get("retry-after", "").strip().isdigit():
        return False, f"{status} {code} without Retry-After"
    return True, f"{status} {code}"


def judge_json(shot: Shot, status: int, body: bytes, resp: httpx.Response) -> tuple[Verdict, str]:
    """The verdict on a non-streamed answer."""
    if status != 200:
        clear, reason = _error_is_clear(status, body, resp)
        return ("retryable" if clear else "lost"), reason
    try:
        data = json.loads(body)
    except ValueError:
        return "lost", "200 with a body that is not whole JSON"
    key = "choices" if shot.kind == "chat" else "data"
    items = data.get(key) if isinstance(data, dict) else None
    if not items:
        return "lost", f"200 without {key}"
    return "ok", ""


def judge_sse(lines: Iterable[str]) -> tuple[Verdict, str]:
    """The verdict on a streamed 200: whole (``[DONE]``), a clear error event, or truncated."""
    chunks = 0
    error: str | None = None
    for line in lines:
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            if error is not None:
                return "retryable", f"SSE error event {error}"
            return ("ok", "") if chunks else ("lost", "[DONE] without any chunk")
        try:
            event = json.loads(payload)
        except ValueError:
            return "lost", "an SSE event that is not JSON"
        if not isinstance(event, dict):
            return "lost", "an SSE event that is not a JSON object"
        if "error" in event:
            detail = _openai_error(event)
            if detail is None:
                return "lost", "an SSE error event that is not OpenAI-shaped"
            if detail["type"] not in _RETRYABLE_TYPES:
                return "lost", f"SSE error event {detail['type']} {detail.get('code')}"
            error = str(detail.get("code"))
        else:
            chunks += 1
    if error is not None:
        return "retryable", f"SSE error event {error} (no [DONE])"
    return "lost", f"stream ended after {chunks} chunks without [DONE]"


def _fire(client: httpx.Client, base_url: str, shot: Shot, headers: dict[str, str], deadline_s: float) -> Outcome:
    """Send one request; its answer must be whole within ``deadline_s`` in total (a server that
    drips bytes never hits a per-read timeout, so the total is checked as the body arrives)."""
    path, payload = _request(shot)
    started = time.monotonic()
    deadline = started + deadline_s
    status = 0
    try:
        with client.stream("POST", base_url + path, json=payload, headers=headers) as resp:
            status = resp.status_code
            streamed = status == 200 and bool(payload.get("stream"))
            parts: list[bytes] = []
            for chunk in resp.iter_bytes():
                parts.append(chunk)
                if time.monotonic() > deadline:
                    raise _PastDeadline
            body = b"".join(parts)
            if streamed:
                verdict, reason = judge_sse(body.decode("utf-8", errors="replace").splitlines())
            else:
                verdict, reason = judge_json(shot, status, body, resp)
    except (httpx.TimeoutException, _PastDeadline):
        verdict, reason = "lost", f"no whole answer within {deadline_s:g} s"
    except httpx.HTTPError as err:
        verdict, reason = "lost", f"{type(err).__name__}: {err}"
    except Exception as err:  # noqa: BLE001 - whatever came back that the judge cannot read is lost
        verdict, reason = "lost", f"unreadable answer: {type(err).__name__}: {err}"
    return Outcome(shot, verdict, status, started, time.monotonic() - started, reason)


class _PastDeadline(Exception):
    """The request's total deadline passed while its answer was still arriving."""


def run_load(
    base_url: str,
    shots: list[Shot],
    *,
    requests: int,
    concurrency: int,
    timeout_s: float = 60.0,
    api_key: str | None = None,
    stop: threading.Event | None = None,
    rate_per_s: float | None = None,
) -> Tally:
    """Send ``requests`` requests cycling through ``shots`` from ``concurrency`` threads.

    Args:
        base_url: the gateway, e.g. ``http://127.0.0.1:8000``; loopback only.
        requests: the most requests to send (the load is bounded in count...).
        timeout_s: ...and each request in time: no whole answer by then (in total, not per
            read) is ``lost``.
        stop: set it to stop sending early; requests in flight still finish.
        rate_per_s: open-loop arrivals at this rate instead of closed-loop threads.

    Returns:
        Every request's outcome.
    """
    require_loopback(base_url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    tally = Tally()
    lock = threading.Lock()
    order: Iterator[Shot] = itertools.cycle(shots)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(timeout_s, connect=10.0)
    with httpx.Client(timeout=timeout, limits=limits) as client:

        def one(shot: Shot) -> None:
            outcome = _fire(client, base_url, shot, headers, timeout_s)
            with lock:
                tally.outcomes.append(outcome)

        with ThreadPoolExecutor(concurrency) as pool:
            if rate_per_s:
                t0 = time.monotonic()
                futures = []
                for i in range(requests):
                    if stop is not None and stop.is_set():
                        break
                    delay = t0 + i / rate_per_s - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    futures.append(pool.submit(one, next(order)))
                for f in futures:
                    f.result()
            else:
                counter = itertools.count()

                def worker() -> None:
                    while next(counter) < requests and not (stop is not None and stop.is_set()):
                        with lock:
                            shot = next(order)
                        one(shot)

                for f in [pool.submit(worker) for _ in range(concurrency)]:
                    f.result()
    return tally

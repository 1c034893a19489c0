"""Drive the gateway app without Ray: an in-memory backend and the checks every hostile request must pass.

Shared by the gateway tests and bench/fuzz.py.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import re
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from zeroserve.config import ModelSpec
from zeroserve.engines.base import Classification, Embedding
from zeroserve.errors import InvalidRequestError
from zeroserve.gateway import ModelEntry, ModelState
from zeroserve.protocol import GenerateParams
from zeroserve.wire import Accepted, Delta, Meter, OpenAIJson, OpenAIStream, Usage, split_usage

__all__ = ["FakeBackend", "FuzzReport", "HEALTHY_MODELS", "as_wire_v1", "fuzz_schema", "response_problems"]

# The models that answer every valid request at once (the others time out, fail or raise on purpose), by task.
HEALTHY_MODELS = {"emb": "embed", "gen": "generate", "cls": "classify", "vgen": "generate"}
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_TRACEBACK = re.compile(r'Traceback \(most recent call last\)|File "[^"]*", line \d+')


class _Response(Protocol):
    """What httpx, requests and schemathesis responses have in common."""

    status_code: int

    @property
    def headers(self) -> Mapping[str, Any]: ...

    @property
    def text(self) -> str: ...


def _header(resp: _Response, name: str) -> str | None:
    """One header's value, repeated values joined as a proxy would (schemathesis keeps a list)."""
    value = resp.headers.get(name)
    return ", ".join(value) if isinstance(value, list) else value


def response_problems(resp: _Response) -> list[str]:
    """What is wrong with the gateway's answer to a hostile request; empty when nothing is.

    No 5xx but a 503 with ``Retry-After`` (overload, or a model still waking: "come back
    later" by design), no traceback text, every 4xx and 5xx in the OpenAI error shape, a sane
    ``X-Request-Id`` (one value, nothing a client could inject), valid JSON or SSE in a 2xx.
    """
    problems = []
    status, text = resp.status_code, resp.text
    if status >= 500 and not (status == 503 and _header(resp, "retry-after")):
        problems.append(f"status {status}")
    if _TRACEBACK.search(text):
        problems.append("traceback text in the body")
    request_id = _header(resp, "x-request-id")
    if request_id is not None and not _SAFE_REQUEST_ID.fullmatch(request_id):
        problems.append(f"x-request-id {request_id!r} is not one sanitized value")
    content_type = _header(resp, "content-type") or ""
    if status >= 400:
        try:
            error = json.loads(text)["error"]
            shaped = set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
        except (ValueError, TypeError, KeyError):
            shaped = False
        if not shaped:
            problems.append(f"{status} body is not the OpenAI error shape: {text[:200]!r}")
    elif content_type.startswith("text/event-stream"):
        for event in filter(None, text.split("\n\n")):
            if event.startswith(":") or event == "data: [DONE]":
                continue
            try:
                chunk = json.loads(event.removeprefix("data: "))
            except ValueError:
                problems.append(f"SSE event is not JSON: {event[:200]!r}")
                continue
            if isinstance(chunk, dict) and chunk.get("error", {}).get("type") == "internal_error":
                problems.append(f"SSE stream failed in-band: {event[:200]!r}")
    elif content_type.startswith("application/json"):
        try:
            json.loads(text)
        except ValueError:
            problems.append(f"{status} body is not JSON: {text[:200]!r}")
    return problems


def as_wire_v1(message: Any) -> Any:
    """A message as a replica of wire version 1 sent it (sentinel deltas, tagged tuples, usage in the text)."""
    if isinstance(message, Accepted):
        return Delta(-1, prompt_tokens=message.prompt_tokens)
    if isinstance(message, Meter):
        return ("meter", message.gpu_s)
    if isinstance(message, OpenAIJson):
        return ("json", message.body)
    if isinstance(message, OpenAIStream):
        return ("sse", None)
    if isinstance(message, Usage):
        return message.line
    return message


class FakeBackend:
    """Models of every task and state; records each call that would reach a model replica in ``calls``.

    Args:
        wire_version: 2 sends this version's typed messages; 1 sends what replicas of the previous
            version sent (a new gateway must understand both during a rolling redeploy).
    """

    def __init__(self, wire_version: int = 2) -> None:
        self.wire_version = wire_version
        self.entries = {
            "emb": ModelEntry("emb", ModelSpec(task="embed", model="./e"), ModelState.READY, 1, replica_nodes=("n1",)),
            "gen": ModelEntry("gen", ModelSpec(task="generate", model="./g", max_tokens_cap=64), ModelState.READY, 1),
            "cls": ModelEntry("cls", ModelSpec(task="classify", model="./c"), ModelState.COLD),
            "sleepy": ModelEntry(
                "sleepy", ModelSpec(task="embed", model="./s", cold_start_timeout_s=0.3), ModelState.COLD
            ),
            "broken": ModelEntry("broken", None, ModelState.FAILED, message="weights missing"),
            "boom": ModelEntry("boom", ModelSpec(task="embed", model="./b"), ModelState.READY, 1),
            "vgen": ModelEntry(
                "vgen", ModelSpec(task="generate", engine="vllm", model="./v", max_tokens_cap=64), ModelState.READY, 1
            ),
        }
        self.gate = asyncio.Event()
        self.gate.set()
        self.seen_params: list[GenerateParams] = []
        self.calls: list[tuple[str, str]] = []  # (method, model) of every call meant for a replica
        self.yields: list[tuple[str, list[str]]] = []  # (for model, victims) of every request to yield

    async def models(self, refresh: bool = False, max_age_s: float | None = None) -> dict[str, ModelEntry]:
        return self.entries

    async def gpus(self) -> dict[str, float]:
        return {"n1": 1.0}

    async def request_yield(self, model: str, victims: Sequence[str]) -> list[str]:
        self.yields.append((model, list(victims)))
        return list(victims)

    async def embed(self, entry: ModelEntry, texts: Sequence[str], dimensions: int | None) -> list[Embedding]:
        self.calls.append(("embed", entry.name))
        if entry.name == "sleepy":
            await asyncio.sleep(5)
        if entry.name == "boom":
            raise RuntimeError("secret internal detail /etc/passwd")
        await self.gate.wait()
        return [Embedding([0.5, -1.0, float(len(t))], len(t.split()), gpu_s=0.1) for t in texts]

    async def classify(self, entry: ModelEntry, texts: Sequence[str]) -> list[Classification]:
        self.calls.append(("classify", entry.name))
        return [Classification("positive", [0.25, 0.75], 2) for _ in texts]

    def out(self, message: Any) -> Any:
        """``message`` as a replica of this backend's wire version sends it."""
        return as_wire_v1(message) if self.wire_version == 1 else message

    async def stream(self, entry: ModelEntry, prompt: Any, params: GenerateParams) -> AsyncIterator[Any]:
        self.calls.append(("stream", entry.name))
        self.seen_params.append(params)
        if isinstance(prompt, str) and "too long" in prompt:
            raise InvalidRequestError("prompt too long", param="messages")
        yield self.out(Accepted(3))
        for i in range(params.n):
            yield Delta(i, "Hel", completion_tokens=1)
            yield Delta(i, "lo", "stop", completion_tokens=2)

    async def openai(self, entry: ModelEntry, endpoint: str, body: dict[str, Any]) -> AsyncIterator[Any]:
        """vLLM's OpenAI layer in miniature: one JSON answer, or SSE lines; then the meter reading."""
        self.calls.append(("openai", entry.name))
        pickle.dumps(body)  # as Ray does with the arguments of a call to a replica
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        choice = {"index": 0, "text": "Hello", "finish_reason": "stop"}
        if not body.get("stream") or endpoint in ("embeddings", "classify"):  # pooling answers are JSON
            yield self.out(
                OpenAIJson({"id": "cmpl-1", "object": "text_completion", "choices": [choice], "usage": usage})
            )
        else:
            yield self.out(OpenAIStream())
            yield f"data: {json.dumps({'id': 'cmpl-1', 'choices': [choice]}, separators=(',', ':'))}\n\n"
            usage_line = (
                f"data: {json.dumps({'id': 'cmpl-1', 'choices': [], 'usage': usage}, separators=(',', ':'))}\n\n"
            )
            for part in split_usage(usage_line):  # as the replica reads it
                yield self.out(part)
            yield "data: [DONE]\n\n"
        yield self.out(Meter(0.05))


@dataclass
class FuzzReport:
    """What a schemathesis run saw: cases sent, answers by status, and every problem found."""

    cases: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    refusals: Counter[str] = field(default_factory=Counter)  # "status param code" of each 4xx
    skipped: list[str] = field(default_factory=list)  # operation and mode with nothing to generate


_TASKS = {
    "/v1/embeddings": "embed",
    "/v1/classify": "classify",
    "/classify": "classify",
    "/v1/chat/completions": "generate",
    "/v1/completions": "generate",
}


def fuzz_schema(
    schema: Any,
    *,
    examples: int,
    seed: int,
    models: Mapping[str, str],
    modes: Sequence[str] = ("positive", "negative"),
    headers: Mapping[str, str] | None = None,
) -> FuzzReport:
    """Send up to ``examples`` generated cases per operation and mode; check each answer, never stop early.

    Args:
        schema: a schemathesis OpenAPI schema (from the app in-process, or from a URL).
        examples: hypothesis examples per operation and generation mode.
        seed: the hypothesis seed, for a run that can be repeated.
        models: configured model names and their tasks; a third of the cases get a model of
            the route's task in place of the generated name, a third any model, so that
            they reach the handlers behind the model lookup.
        modes: "positive" (data the schema allows) and/or "negative" (data it does not).
        headers: sent with every case (an API key for a live gateway).
    """
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    report = FuzzReport()

    def known_model(pair: tuple[Any, str | None]) -> Any:
        case, name = pair
        if name is not None and isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
            case.body["model"] = name
        if name is not None and isinstance(case.path_parameters, dict) and "model" in case.path_parameters:
            case.path_parameters["model"] = name
        return case

    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in modes:
            task = _TASKS.get(operation.path)
            names = [st.none()]
            for fitting in ([m for m, t in models.items() if t == task], list(models)):
                if fitting:
                    names.append(st.sampled_from(fitting))
            cases = st.tuples(operation.as_strategy(generation_mode=GenerationMode(mode)), st.one_of(names)).map(
                known_model
            )
            _fuzz_operation(report, cases, f"{operation.label} [{mode}]", examples, seed, dict(headers or {}))
    return report


def _fuzz_operation(
    report: FuzzReport, cases: Any, where: str, examples: int, seed: int, headers: dict[str, str]
) -> None:
    import hypothesis

    @hypothesis.settings(
        max_examples=examples,
        database=None,
        deadline=None,
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.seed(seed)
    @hypothesis.given(cases)
    def run(case: Any) -> None:
        report.cases += 1
        try:
            response = case.call(headers=headers, timeout=30)
        except Exception as err:  # noqa: BLE001 - an escaped exception, or no answer in time, is a finding
            report.failures.append(f"{where} raised {err!r}: {case.as_curl_command()[:300]}")
            return
        report.statuses[response.status_code] += 1
        if 400 <= response.status_code < 500:
            try:
                error = response.json()["error"]
                report.refusals[f"{response.status_code} {error['param']} {error['code']}"] += 1
            except (ValueError, TypeError, KeyError):
                pass  # response_problems reports it
        for problem in response_problems(response):
            report.failures.append(f"{where} {problem}: {case.as_curl_command()[:300]}")

    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        report.skipped.append(where)

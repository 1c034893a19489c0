"""The passthrough request models: bodies forwarded to vLLM's own OpenAI layer.

They take what vLLM takes and the native models refuse (tools, logprobs, penalties, token-id
prompts, image parts, vLLM's extension fields), hold it to the same caps as the native models
(the same definitions), and refuse NaN and infinities anywhere in the body. Each refusal is a
pydantic ValidationError whose first error names the field, which the gateway turns into a 400
with that ``param``.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from zeroserve import protocol
from zeroserve.protocol import (
    MAX_INPUTS,
    MAX_PROMPT_TOKENS,
    MAX_PROMPTS,
    MAX_STOP,
    MAX_TOOLS,
    MAX_TOP_LOGPROBS,
    PASSTHROUGH_REQUESTS,
    ChatCompletionRequest,
    ClassifyRequest,
    CompletionRequest,
    EmbeddingRequest,
    PassthroughChatRequest,
    PassthroughClassifyRequest,
    PassthroughCompletionRequest,
    PassthroughEmbeddingRequest,
    PassthroughRequest,
)

TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION: dict[str, Any] = {"model": "m", "prompt": "Once upon a time"}
EMBEDDING: dict[str, Any] = {"model": "m", "input": "a text"}
CLASSIFY: dict[str, Any] = {"model": "m", "input": "a text"}
BASE: dict[type[BaseModel], dict[str, Any]] = {
    PassthroughChatRequest: CHAT,
    PassthroughCompletionRequest: COMPLETION,
    PassthroughEmbeddingRequest: EMBEDDING,
    PassthroughClassifyRequest: CLASSIFY,
}
GENERATE = [PassthroughChatRequest, PassthroughCompletionRequest]
POOLING = [PassthroughEmbeddingRequest, PassthroughClassifyRequest]
ALL = GENERATE + POOLING

# Valid vLLM-style bodies, beyond the base body of their model.
VALID: list[tuple[type[BaseModel], dict[str, Any]]] = [
    (PassthroughChatRequest, {}),
    (PassthroughChatRequest, {"tools": [TOOL]}),
    (PassthroughChatRequest, {"tools": [TOOL], "tool_choice": "auto", "parallel_tool_calls": False}),
    (PassthroughChatRequest, {"tools": [TOOL], "tool_choice": "required"}),
    (PassthroughChatRequest, {"tools": [TOOL], "tool_choice": "none"}),
    (
        PassthroughChatRequest,
        {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
    ),
    (PassthroughChatRequest, {"logprobs": True, "top_logprobs": MAX_TOP_LOGPROBS}),
    (PassthroughChatRequest, {"logprobs": True, "top_logprobs": 0}),
    (PassthroughChatRequest, {"presence_penalty": -2, "frequency_penalty": 1.5, "repetition_penalty": 1.1}),
    (PassthroughChatRequest, {"temperature": 0, "top_p": 1, "n": 128, "seed": -(2**63), "stop": ["a", "b", "c", "d"]}),
    (PassthroughChatRequest, {"max_tokens": 10, "max_completion_tokens": 20}),
    (PassthroughChatRequest, {"stream": True, "stream_options": {"include_usage": True}}),
    (PassthroughChatRequest, {"response_format": {"type": "json_object"}, "logit_bias": {"50256": -100}}),
    (PassthroughChatRequest, {"top_k": 40, "min_p": 0.05, "chat_template_kwargs": {"enable_thinking": False}}),
    (
        PassthroughChatRequest,
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    ],
                },
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21.5 C"},
            ],
            "tools": [TOOL],
        },
    ),
    (PassthroughCompletionRequest, {}),
    (PassthroughCompletionRequest, {"prompt": ["a", "b"], "n": 2, "logprobs": 5, "echo": True}),
    (PassthroughCompletionRequest, {"prompt": [1, 2, 3], "max_tokens": 1}),
    (PassthroughCompletionRequest, {"prompt": [[1, 2, 3], [4, 5]], "presence_penalty": 0.5}),
    (PassthroughCompletionRequest, {"prompt": [0] * MAX_PROMPT_TOKENS}),
    (PassthroughCompletionRequest, {"prompt": ["p"] * MAX_PROMPTS, "stop": "\n"}),
    (PassthroughCompletionRequest, {"prompt": [[7]] * MAX_PROMPTS}),
    (PassthroughCompletionRequest, {"suffix": " the end", "best_of": 1, "max_tokens": None}),
    (PassthroughCompletionRequest, {"logit_bias": {"1": 2.5}, "min_tokens": 2, "ignore_eos": True}),
    (PassthroughEmbeddingRequest, {}),
    (PassthroughEmbeddingRequest, {"input": ["a", "b"], "encoding_format": "base64", "dimensions": 32}),
    (PassthroughEmbeddingRequest, {"input": [1, 2, 3]}),
    (PassthroughEmbeddingRequest, {"input": [[1, 2, 3], [4]], "truncate_prompt_tokens": -1}),
    (PassthroughEmbeddingRequest, {"input": ["x"] * MAX_INPUTS}),
    (PassthroughEmbeddingRequest, {"input": [0] * 5000}),  # one input of 5000 tokens, not 5000 inputs
    (PassthroughClassifyRequest, {}),
    (PassthroughClassifyRequest, {"input": ["a", "b"], "use_activation": True}),
    (PassthroughClassifyRequest, {"input": [[1, 2], [3]]}),
    (PassthroughClassifyRequest, {"input": [5, 6, 7], "priority": 0}),
]


def body(cls: type[BaseModel], **fields: Any) -> dict[str, Any]:
    return {**BASE[cls], **fields}


def refused(cls: type[BaseModel], data: dict[str, Any] | str) -> dict[str, Any]:
    """The first error of a refused body (a dict, or JSON text)."""
    with pytest.raises(ValidationError) as info:
        if isinstance(data, str):
            cls.model_validate_json(data)
        else:
            cls.model_validate(data)
    return info.value.errors()[0]  # type: ignore[return-value]


@pytest.mark.parametrize(("cls", "extra"), VALID, ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(VALID)])
def test_valid_vllm_bodies_pass(cls: type[BaseModel], extra: dict[str, Any]) -> None:
    data = body(cls, **extra)
    model = cls.model_validate(data)
    # The same through JSON text, as a client sends it.
    assert cls.model_validate_json(json.dumps(data)) == model
    # Unknown fields stay, unchanged, for vLLM.
    known = set(type(model).model_fields)
    assert {k: v for k, v in data.items() if k not in known} == model.model_extra


@pytest.mark.parametrize(
    ("native", "passthrough", "extra"),
    [
        (ChatCompletionRequest, PassthroughChatRequest, {"tools": [TOOL]}),
        (ChatCompletionRequest, PassthroughChatRequest, {"logprobs": True, "top_logprobs": 3}),
        (ChatCompletionRequest, PassthroughChatRequest, {"presence_penalty": 1.0}),
        (
            ChatCompletionRequest,
            PassthroughChatRequest,
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
        ),
        (CompletionRequest, PassthroughCompletionRequest, {"prompt": [1, 2, 3]}),
        (CompletionRequest, PassthroughCompletionRequest, {"logprobs": 2}),
        (CompletionRequest, PassthroughCompletionRequest, {"echo": True}),
        (EmbeddingRequest, PassthroughEmbeddingRequest, {"input": [[1, 2], [3]]}),
        (ClassifyRequest, PassthroughClassifyRequest, {"input": [1, 2, 3]}),
    ],
)
def test_passthrough_takes_what_the_native_models_refuse(
    native: type[BaseModel], passthrough: type[BaseModel], extra: dict[str, Any]
) -> None:
    data = body(passthrough, **extra)
    with pytest.raises(ValidationError):
        native.model_validate(data)
    passthrough.model_validate(data)


def test_requested_max_tokens_follows_openai_per_route() -> None:
    chat = PassthroughChatRequest.model_validate
    assert chat(body(PassthroughChatRequest)).requested_max_tokens() is None
    assert chat(body(PassthroughChatRequest, max_tokens=7)).requested_max_tokens() == 7
    assert chat(body(PassthroughChatRequest, max_completion_tokens=9)).requested_max_tokens() == 9
    # max_completion_tokens wins over the deprecated max_tokens, whichever is larger.
    assert chat(body(PassthroughChatRequest, max_tokens=50, max_completion_tokens=9)).requested_max_tokens() == 9
    assert chat(body(PassthroughChatRequest, max_tokens=5, max_completion_tokens=9)).requested_max_tokens() == 9
    completion = PassthroughCompletionRequest.model_validate
    assert completion(body(PassthroughCompletionRequest)).requested_max_tokens() == 16  # OpenAI's default
    assert completion(body(PassthroughCompletionRequest, max_tokens=3)).requested_max_tokens() == 3
    assert completion(body(PassthroughCompletionRequest, max_tokens=None)).requested_max_tokens() is None
    # Completions have no max_completion_tokens: it is an unknown field there, left to vLLM.
    assert completion(body(PassthroughCompletionRequest, max_completion_tokens=3)).requested_max_tokens() == 16


def test_prompt_count() -> None:
    def count(**fields: Any) -> int:
        return PassthroughCompletionRequest.model_validate(body(PassthroughCompletionRequest, **fields)).prompt_count()

    assert count(prompt="a") == 1
    assert count(prompt=["a", "b", "c"]) == 3
    assert count(prompt=[1, 2, 3]) == 1
    assert count(prompt=[[1], [2]]) == 2
    assert count(prompt=None, prompt_embeds=["AAAA", "BBBB"]) == 2


# Hostile bodies: (model, fields over its base body, the field the first error must name).
HOSTILE: list[tuple[type[BaseModel], dict[str, Any], str]] = [
    (PassthroughCompletionRequest, {"prompt": ["p"] * 5000}, "prompt"),
    (PassthroughCompletionRequest, {"prompt": [[1]] * 5000}, "prompt"),
    (PassthroughCompletionRequest, {"prompt": ["p"] * (MAX_PROMPTS + 1)}, "prompt"),
    (PassthroughCompletionRequest, {"prompt": []}, "prompt"),
    (PassthroughCompletionRequest, {"prompt": [0] * (MAX_PROMPT_TOKENS + 1)}, "prompt"),
    (PassthroughCompletionRequest, {"prompt": [[1], [0] * (MAX_PROMPT_TOKENS + 1)]}, "prompt"),
    (PassthroughCompletionRequest, {"prompt": [1, -1]}, "prompt"),
    (PassthroughCompletionRequest, {"prompt": ["a", 1]}, "prompt"),
    (PassthroughCompletionRequest, {"prompt": {"text": "a"}}, "prompt"),
    (PassthroughCompletionRequest, {"prompt": None, "prompt_embeds": ["AAAA"] * (MAX_PROMPTS + 1)}, "prompt_embeds"),
    (PassthroughCompletionRequest, {"logprobs": MAX_TOP_LOGPROBS + 1}, "logprobs"),
    (PassthroughCompletionRequest, {"logprobs": -1}, "logprobs"),
    *[(cls, {"input": ["x"] * 5000}, "input") for cls in POOLING],
    *[(cls, {"input": [[1]] * (MAX_INPUTS + 1)}, "input") for cls in POOLING],
    *[(cls, {"input": []}, "input") for cls in POOLING],
    *[(cls, {"input": [0] * (MAX_PROMPT_TOKENS + 1)}, "input") for cls in POOLING],
    *[(cls, {"input": [[0] * (MAX_PROMPT_TOKENS + 1)]}, "input") for cls in POOLING],
    *[(cls, {"input": [-5]}, "input") for cls in POOLING],
    *[(cls, {"input": 3}, "input") for cls in POOLING],
    *[(cls, {"model": ""}, "model") for cls in ALL],
    *[(cls, {"model": "m" * 257}, "model") for cls in ALL],
    *[(cls, {"user": "u" * 257}, "user") for cls in ALL],
    *[(cls, {"stop": ["s"] * 100}, "stop") for cls in GENERATE],
    *[(cls, {"stop": ["s"] * (MAX_STOP + 1)}, "stop") for cls in GENERATE],
    *[(cls, {"stop": ""}, "stop") for cls in GENERATE],
    *[(cls, {"stop": ["a", ""]}, "stop") for cls in GENERATE],
    *[(cls, {"temperature": value}, "temperature") for cls in GENERATE for value in (math.nan, math.inf, -math.inf)],
    *[(cls, {"temperature": 3}, "temperature") for cls in GENERATE],
    *[(cls, {"temperature": -0.1}, "temperature") for cls in GENERATE],
    *[(cls, {"top_p": 0}, "top_p") for cls in GENERATE],
    *[(cls, {"top_p": 1.01}, "top_p") for cls in GENERATE],
    *[(cls, {"top_p": math.nan}, "top_p") for cls in GENERATE],
    *[(cls, {"n": 0}, "n") for cls in GENERATE],
    *[(cls, {"n": 129}, "n") for cls in GENERATE],
    *[(cls, {"seed": 2**64}, "seed") for cls in GENERATE],
    *[(cls, {"max_tokens": 0}, "max_tokens") for cls in GENERATE],
    *[(cls, {"max_tokens": -1}, "max_tokens") for cls in GENERATE],
    *[(cls, {"presence_penalty": 2.5}, "presence_penalty") for cls in GENERATE],
    *[(cls, {"frequency_penalty": -3}, "frequency_penalty") for cls in GENERATE],
    *[(cls, {"frequency_penalty": math.inf}, "frequency_penalty") for cls in GENERATE],
    *[(cls, {"stream_options": {"include_usage": True}}, "stream_options") for cls in GENERATE],
    *[(cls, {"stream": True, "stream_options": {"x": math.nan}}, "stream_options") for cls in GENERATE],
    # NaN and infinities in fields zeroserve does not know: vLLM's extensions.
    *[(cls, {"min_p": math.nan}, "min_p") for cls in ALL],
    *[(cls, {"repetition_penalty": math.inf}, "repetition_penalty") for cls in GENERATE],
    *[(cls, {"logit_bias": {"50256": -math.inf}}, "logit_bias") for cls in GENERATE],
    *[(cls, {"vllm_xargs": {"k": [1.0, math.nan]}}, "vllm_xargs") for cls in ALL],
    (PassthroughChatRequest, {"max_completion_tokens": 0}, "max_completion_tokens"),
    (PassthroughChatRequest, {"messages": []}, "messages"),
    (PassthroughChatRequest, {"messages": ["hi"]}, "messages"),
    (PassthroughChatRequest, {"messages": [{"content": "no role"}]}, "messages"),
    (
        PassthroughChatRequest,
        {"messages": [{"role": "user", "content": [{"type": "input_audio", "volume": math.nan}]}]},
        "messages",
    ),
    (PassthroughChatRequest, {"top_logprobs": MAX_TOP_LOGPROBS + 1, "logprobs": True}, "top_logprobs"),
    (PassthroughChatRequest, {"top_logprobs": -1, "logprobs": True}, "top_logprobs"),
    (PassthroughChatRequest, {"tool_choice": "required"}, "tool_choice"),
    (PassthroughChatRequest, {"tools": [], "tool_choice": "required"}, "tool_choice"),
    (PassthroughChatRequest, {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    (
        PassthroughChatRequest,
        {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "rm_rf"}}},
        "tool_choice",
    ),
    (PassthroughChatRequest, {"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice"),
    (PassthroughChatRequest, {"tools": [TOOL], "tool_choice": {"type": "function", "function": {}}}, "tool_choice"),
    (PassthroughChatRequest, {"tools": [TOOL] * (MAX_TOOLS + 1)}, "tools"),
    (PassthroughChatRequest, {"tools": [{"type": "function", "function": {"name": ""}}]}, "tools"),
    (PassthroughChatRequest, {"tools": [{"type": "function"}]}, "tools"),
    (
        PassthroughChatRequest,
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"maximum": math.inf}}}]},
        "tools",
    ),
]


@pytest.mark.parametrize(
    ("cls", "extra", "field"),
    HOSTILE,
    ids=[f"{c.__name__}-{f}-{i}" for i, (c, _, f) in enumerate(HOSTILE)],
)
def test_hostile_bodies_are_refused_naming_the_field(cls: type[BaseModel], extra: dict[str, Any], field: str) -> None:
    error = refused(cls, body(cls, **extra))
    assert error["loc"][0] == field, error


@pytest.mark.parametrize("cls", GENERATE)
@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_json_numbers_are_refused(cls: type[BaseModel], token: str) -> None:
    """As a client sends them: JSON text with NaN or Infinity (which json.loads accepts too)."""
    base = json.dumps(BASE[cls])[:-1]
    assert refused(cls, f'{base}, "temperature": {token}}}')["loc"][0] == "temperature"
    assert refused(cls, f'{base}, "min_p": {token}}}')["loc"][0] == "min_p"
    assert refused(cls, f'{base}, "logit_bias": {{"7": [{token}]}}}}')["loc"][0] == "logit_bias"
    # What the gateway does: json.loads, then model_validate.
    assert refused(cls, json.loads(f'{base}, "top_p": {token}}}'))["loc"][0] == "top_p"
    assert refused(cls, json.loads(f'{base}, "top_k": {token}}}'))["loc"][0] == "top_k"


@pytest.mark.parametrize(
    ("cls", "extra", "field"),
    [
        (PassthroughCompletionRequest, {"prompt": ["a", 1] * 100_000}, "prompt"),
        (PassthroughCompletionRequest, {"prompt": [1, "a"] * 100_000}, "prompt"),
        (PassthroughCompletionRequest, {"prompt": [[1, -1]] * 50}, "prompt"),
        (PassthroughCompletionRequest, {"prompt": None, "prompt_embeds": [1] * 100_000}, "prompt_embeds"),
        (PassthroughEmbeddingRequest, {"input": [[1, "a"]] * 2000}, "input"),
        (PassthroughClassifyRequest, {"input": ["a", None] * 1000}, "input"),
        (PassthroughCompletionRequest, {"vllm_xargs": [math.nan] * 100_000}, "vllm_xargs"),
        (PassthroughChatRequest, {"messages": [{"content": "no role"}] * 10_000}, "messages"),
        (PassthroughChatRequest, {"tools": [{"type": "function"}] * 100}, "tools"),
    ],
)
def test_a_long_bad_list_is_one_error(cls: type[BaseModel], extra: dict[str, Any], field: str) -> None:
    """The gateway builds every error of a refusal: a body of many bad items must not cost many
    (one error, or one per shape the field may take)."""
    with pytest.raises(ValidationError) as info:
        cls.model_validate(body(cls, **extra))
    assert info.value.error_count() <= 2
    assert info.value.errors()[0]["loc"][0] == field


@pytest.mark.parametrize("value", [(1, 2), {1: 2}, {"a": {3}}, b"bytes", object()])
def test_unknown_fields_must_be_json(value: Any) -> None:
    """From Python (not from the gateway, whose bodies come from JSON): only JSON values pass on."""
    assert refused(PassthroughCompletionRequest, body(PassthroughCompletionRequest, x=value))["loc"] == ("x",)


def test_tool_choice_errors_name_the_function() -> None:
    error = refused(
        PassthroughChatRequest,
        body(PassthroughChatRequest, tools=[TOOL], tool_choice={"type": "function", "function": {"name": "x"}}),
    )
    assert "tool_choice names function 'x' which is not in tools" in error["msg"]
    error = refused(
        PassthroughChatRequest,
        body(PassthroughChatRequest, tool_choice={"type": "function", "function": {"name": "x"}}),
    )
    assert "tool_choice names function 'x' which is not in tools" in error["msg"]
    error = refused(PassthroughChatRequest, body(PassthroughChatRequest, tool_choice="required"))
    assert "required" in error["msg"] and "tools" in error["msg"]


def test_counts_are_the_native_limits() -> None:
    """The same count caps as the native models: one bound each side of each limit."""
    for native, passthrough, field, items, limit in [
        (CompletionRequest, PassthroughCompletionRequest, "prompt", "p", MAX_PROMPTS),
        (EmbeddingRequest, PassthroughEmbeddingRequest, "input", "x", MAX_INPUTS),
        (ClassifyRequest, PassthroughClassifyRequest, "input", "x", MAX_INPUTS),
        (ChatCompletionRequest, PassthroughChatRequest, "stop", "s", MAX_STOP),
    ]:
        base = body(passthrough)
        for cls in (native, passthrough):
            cls.model_validate({**base, field: [items] * limit})
            assert refused(cls, {**base, field: [items] * (limit + 1)})["loc"][0] == field


SHARED_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**65), max_value=2**65),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
    st.lists(st.text(max_size=2), max_size=6),
)


@settings(max_examples=400, deadline=None)
@given(
    field=st.sampled_from(["model", "user", "temperature", "top_p", "n", "seed", "stop", "max_tokens", "stream"]),
    value=SHARED_VALUES,
)
def test_shared_fields_have_one_definition(field: str, value: Any) -> None:
    """Native and passthrough requests accept and refuse the same values of the fields they share."""
    for native, passthrough in [
        (ChatCompletionRequest, PassthroughChatRequest),
        (CompletionRequest, PassthroughCompletionRequest),
    ]:
        data = {**body(passthrough), field: value}
        outcomes = []
        for cls in (native, passthrough):
            try:
                outcomes.append(getattr(cls.model_validate(data), field))
            except ValidationError as err:
                outcomes.append(("refused", err.errors()[0]["loc"][0]))
        assert outcomes[0] == outcomes[1], (field, value, outcomes)


# Any JSON value, NaN and infinities included, for the property test below.
JSON_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=4),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(["type", "text", "name", "a", "b"]), inner, max_size=3),
    ),
    max_leaves=12,
)
FIELDS = [
    "temperature",
    "top_p",
    "n",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "presence_penalty",
    "frequency_penalty",
    "max_tokens",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "prompt",
    "input",
    "messages",
    "min_p",
    "logit_bias",
    "response_format",
    "vllm_xargs",
]
TOOLS = st.lists(
    st.fixed_dictionaries(
        {"type": st.just("function"), "function": st.fixed_dictionaries({"name": st.sampled_from(["f", "g"])})},
        optional={"x": JSON_VALUES},
    ),
    max_size=2,
)
SHAPED: dict[str, st.SearchStrategy[Any]] = {
    "temperature": st.floats(allow_nan=True, allow_infinity=True),
    "top_p": st.floats(allow_nan=True, allow_infinity=True),
    "presence_penalty": st.floats(allow_nan=True, allow_infinity=True),
    "min_p": st.floats(allow_nan=True, allow_infinity=True),
    "stream_options": st.dictionaries(st.sampled_from(["include_usage", "x"]), JSON_VALUES, max_size=2),
    "tools": TOOLS,
    "tool_choice": st.one_of(
        st.sampled_from(["none", "auto", "required"]),
        st.fixed_dictionaries(
            {"type": st.just("function"), "function": st.fixed_dictionaries({"name": st.sampled_from(["f", "g"])})}
        ),
    ),
    "prompt": st.one_of(
        st.text(max_size=3),
        st.lists(st.integers(0, 9), max_size=3),
        st.lists(st.lists(st.integers(0, 9), max_size=2), max_size=2),
    ),
    "input": st.one_of(
        st.text(max_size=3), st.lists(st.text(max_size=2), max_size=3), st.lists(st.integers(0, 9), max_size=3)
    ),
    "messages": st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "assistant"]), "content": JSON_VALUES}, optional={"extra": JSON_VALUES}
        ),
        min_size=1,
        max_size=2,
    ),
    "logit_bias": st.dictionaries(
        st.sampled_from(["1", "2"]), st.floats(allow_nan=True, allow_infinity=True), max_size=2
    ),
}
BODIES = st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=7).flatmap(
    lambda d: st.fixed_dictionaries({k: SHAPED.get(k, st.just(v)) for k, v in d.items()})
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cls=st.sampled_from(ALL), fields=BODIES, as_json=st.booleans(), stream=st.booleans())
def test_accepted_bodies_are_finite_json(
    cls: type[BaseModel], fields: dict[str, Any], as_json: bool, stream: bool
) -> None:
    """Whatever a passthrough model accepts, the body forwarded to vLLM and the model's own dump
    are JSON without NaN or infinities."""
    data = {**BASE[cls], "stream": stream, **fields}
    try:
        model = cls.model_validate_json(json.dumps(data)) if as_json else cls.model_validate(data)
    except ValidationError as err:
        # Refusals name a field of the body.
        assert err.errors()[0]["loc"][0] in data
        return
    json.dumps(data, allow_nan=False)
    json.dumps(model.model_dump(mode="json"), allow_nan=False)
    json.dumps(model.model_dump(), allow_nan=False)


def test_passthrough_requests_table() -> None:
    assert PASSTHROUGH_REQUESTS == {
        "chat/completions": PassthroughChatRequest,
        "completions": PassthroughCompletionRequest,
        "embeddings": PassthroughEmbeddingRequest,
        "classify": PassthroughClassifyRequest,
    }
    for name in ("PassthroughChatRequest", "PassthroughCompletionRequest", "PassthroughEmbeddingRequest"):
        assert name in protocol.__all__
    assert "PassthroughClassifyRequest" in protocol.__all__
    assert "PassthroughRequest" in protocol.__all__


@pytest.mark.parametrize("cls", ALL)
def test_schemas_generate(cls: type[BaseModel]) -> None:
    schema = cls.model_json_schema()
    json.dumps(schema, allow_nan=False)
    assert schema["additionalProperties"] is not False  # vLLM's extensions pass


def test_routing_head_is_unchanged() -> None:
    """PassthroughRequest still reads only the routing fields and caps, whatever the rest is."""
    head = PassthroughRequest.model_validate(
        {"model": "m", "prompt": [[1]] * 5000, "max_completion_tokens": 5, "max_tokens": 50, "n": 3}
    )
    assert head.requested_max_tokens() == 5
    assert head.n == 3
    assert refused(PassthroughRequest, {"model": "m", "n": 129})["loc"] == ("n",)
    assert refused(PassthroughRequest, {"model": "m", "max_tokens": 0})["loc"] == ("max_tokens",)


@pytest.fixture(scope="module")
def vllm_requests() -> dict[type[BaseModel], type[BaseModel]]:
    pytest.importorskip("vllm")
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VChat
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest as VCompletion
    from vllm.entrypoints.pooling.classify.protocol import ClassificationCompletionRequest as VClassify
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingCompletionRequest as VEmbedding

    return {
        PassthroughChatRequest: VChat,
        PassthroughCompletionRequest: VCompletion,
        PassthroughEmbeddingRequest: VEmbedding,
        PassthroughClassifyRequest: VClassify,
    }


def test_valid_bodies_are_valid_for_vllm(vllm_requests: dict[type[BaseModel], type[BaseModel]]) -> None:
    """Every valid example is one that vLLM's own request classes (the engine's) accept too."""
    for cls, extra in VALID:
        data = body(cls, **extra)
        if cls is PassthroughCompletionRequest and isinstance(data.get("prompt"), list) and len(data["prompt"]) > 1000:
            continue  # a valid one-million-token prompt: vLLM checks it against the model later
        vllm_requests[cls].model_validate(json.loads(json.dumps(data)))

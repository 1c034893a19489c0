"""OpenAI request and response schemas: the gateway's whole HTTP vocabulary.

Requests allow unknown fields (clients such as the ``openai`` package add new ones
over time) but refuse known fields whose values are out of range, and refuse the
OpenAI options zeroserve does not implement rather than ignoring them silently.
The classification route follows vLLM's ``/classify`` convention.

The JSON schemas of the request models are the gateway's OpenAPI request bodies. Where a
validator refuses what the field's type allows, the field carries a ``WithJsonSchema`` that
says what is accepted, so the published schema matches the server.

Two families of request models share one set of limits (the constants and the annotated
types below, and the validators of ``_Request`` and ``_SamplingLimits``):

- the native models (``ChatCompletionRequest`` ...) for engines that zeroserve drives itself,
  which refuse what those engines cannot do;
- the passthrough models (``PassthroughChatRequest`` ...) for requests forwarded to an
  engine's own OpenAI layer (vLLM). They accept what vLLM accepts and the native models do
  not (tools, logprobs, penalties, token-id prompts, image parts, vLLM's extension fields),
  but hold it to the same caps, and refuse NaN and infinities anywhere in the body: vLLM
  validates the rest of the body itself.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

__all__ = [
    "ChatMessage",
    "ChatCompletionRequest",
    "CompletionRequest",
    "EmbeddingRequest",
    "ClassifyRequest",
    "GenerateParams",
    "PassthroughRequest",
    "PassthroughChatRequest",
    "PassthroughCompletionRequest",
    "PassthroughEmbeddingRequest",
    "PassthroughClassifyRequest",
    "PassthroughChatMessage",
    "PassthroughTool",
    "PassthroughToolChoice",
    "PassthroughFunction",
    "PASSTHROUGH_REQUESTS",
    "MAX_STOP",
    "MAX_INPUTS",
    "MAX_PROMPTS",
    "MAX_PROMPT_TOKENS",
    "MAX_TOP_LOGPROBS",
    "MAX_TOOLS",
    "new_id",
]

MAX_STOP = 4
MAX_INPUTS = 2048
MAX_PROMPTS = 64
# Token ids in one token-id prompt (completions) or input (embeddings, classify). Above any
# model's context, so it refuses nothing a model could take; vLLM then checks the context.
MAX_PROMPT_TOKENS = 1_000_000
MAX_TOP_LOGPROBS = 20  # OpenAI's cap on top_logprobs (vLLM's default --max-logprobs too)
MAX_TOOLS = 128  # OpenAI's cap on the functions of one request

# The limits of the fields that native and passthrough requests share, written once.
ModelName = Annotated[str, Field(min_length=1, max_length=256)]
UserName = Annotated[str, Field(max_length=256)]
Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(gt=0, le=1)]
Choices = Annotated[int, Field(ge=1, le=128)]  # a model's own max_n is checked by the gateway
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
MaxTokens = Annotated[int, Field(ge=1)]
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]
TokenId = Annotated[int, Field(ge=0)]


def _json_schema(schema: dict[str, Any], description: str) -> WithJsonSchema:
    return WithJsonSchema({**schema, "description": description})


_UNSUPPORTED = "Accepted for compatibility; only the values in this schema are supported."
_ZERO_ONLY = _json_schema({"anyOf": [{"const": 0}, {"type": "null"}]}, _UNSUPPORTED)
_STOP = _json_schema(
    {
        "anyOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP},
            {"type": "null"},
        ]
    },
    f"Up to {MAX_STOP} non-empty stop sequences.",
)
_INPUTS = _json_schema(
    {
        "anyOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": MAX_INPUTS},
        ]
    },
    f"A text or a list of 1 to {MAX_INPUTS} texts (token ids are not supported).",
)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


# Checks shared by native and passthrough requests. A text is one prompt (or input); so is a
# list of token ids (passthrough only: the native models' types refuse token ids first).


def _items(value: Any) -> list[Any]:
    """The prompts (or inputs) of a list-valued field: a flat list of token ids is one."""
    if value and not isinstance(value[0], (str, list)):
        return [value]
    return list(value)


def _check_token_ids(field: str, items: list[Any]) -> None:
    for item in items:
        if isinstance(item, list) and len(item) > MAX_PROMPT_TOKENS:
            raise ValueError(f"a token-id {field} may hold at most {MAX_PROMPT_TOKENS} token ids")


_V = TypeVar("_V")


def _check_prompts(value: _V, noun: str = "strings") -> _V:
    if isinstance(value, list):
        items = _items(value)
        if not (1 <= len(items) <= MAX_PROMPTS):
            raise ValueError(f"prompt must be a string or a list of 1 to {MAX_PROMPTS} {noun}")
        _check_token_ids("prompt", items)
    return value


def _check_inputs(value: _V) -> _V:
    if isinstance(value, list):
        items = _items(value)
        if not items:
            raise ValueError("input must not be an empty list")
        if len(items) > MAX_INPUTS:
            raise ValueError(f"input may hold at most {MAX_INPUTS} items")
        _check_token_ids("input", items)
    return value


def _chat_max_tokens(max_completion_tokens: int | None, max_tokens: int | None) -> int | None:
    """OpenAI's chat rule: max_completion_tokens, else the deprecated max_tokens."""
    return max_completion_tokens if max_completion_tokens is not None else max_tokens


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, frozen=True)

    model: ModelName
    user: UserName | None = None


class GenerateParams(BaseModel):
    """Sampling parameters as the engines receive them (validated by the gateway)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    max_tokens: int | None = Field(default=None, gt=0, description="None: up to the context or the model's cap.")
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    stop: tuple[str, ...] = ()
    seed: int | None = None


class _SamplingLimits(_Request):
    """The sampling fields and limits that native and passthrough generation requests share."""

    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Choices | None = None
    stop: Annotated[str | list[str] | None, _STOP] = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = Field(default=None, description="Only allowed when stream is true.")

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else (value or [])
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed")
        if any(s == "" for s in items):
            raise ValueError("stop sequences must not be empty")
        return value

    @field_validator("stream_options")
    @classmethod
    def _check_stream_options(cls, value: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        # A field validator (stream is validated first), so that the error names its param.
        if value is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def requested_max_tokens(self) -> int | None:
        return None


class _SamplingFields(_SamplingLimits):
    """Native requests: the shared limits, and refusals of what zeroserve's own engines cannot do."""

    presence_penalty: Annotated[Penalty | None, _ZERO_ONLY] = None
    frequency_penalty: Annotated[Penalty | None, _ZERO_ONLY] = None
    logprobs: Annotated[Any, _json_schema({"enum": [None, False, 0]}, _UNSUPPORTED)] = None

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _SamplingFields:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise ValueError(f"{name} is not supported by this server")
        if self.logprobs not in (None, False, 0):
            raise ValueError("logprobs is not supported by this model's engine")
        return self


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", json_schema_extra={"required": ["type", "text"]})

    type: Annotated[str, _json_schema({"const": "text"}, "Only text parts are supported.")]
    text: Annotated[str | None, WithJsonSchema({"type": "string"})] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"content part of type {part.type!r} is not supported")
            parts.append(part.text)
        return "".join(parts)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    tools: Annotated[
        list[Any] | None, _json_schema({"anyOf": [{"type": "array", "maxItems": 0}, {"type": "null"}]}, _UNSUPPORTED)
    ] = None
    top_logprobs: int | None = None

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.tools:
            raise ValueError("tools are not supported by this model's engine")
        for message in self.messages:
            message.text()  # raises on image or audio parts
        return self

    def requested_max_tokens(self) -> int | None:
        return _chat_max_tokens(self.max_completion_tokens, self.max_tokens)


class CompletionRequest(_SamplingFields):
    prompt: Annotated[
        str | list[str],
        _json_schema(
            {
                "anyOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": MAX_PROMPTS},
                ]
            },
            f"A prompt or a list of 1 to {MAX_PROMPTS} prompts.",
        ),
    ]
    max_tokens: MaxTokens | None = 16
    echo: Annotated[bool, _json_schema({"const": False}, _UNSUPPORTED)] = False
    suffix: Annotated[str | None, _json_schema({"anyOf": [{"const": ""}, {"type": "null"}]}, _UNSUPPORTED)] = None
    best_of: Annotated[int | None, _json_schema({"anyOf": [{"const": 1}, {"type": "null"}]}, _UNSUPPORTED)] = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: str | list[str]) -> str | list[str]:
        return _check_prompts(value)

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported by this server")
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        if self.best_of not in (None, 1):
            raise ValueError("best_of is not supported by this server")
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class EmbeddingRequest(_Request):
    input: Annotated[str | list[str] | list[int] | list[list[int]], _INPUTS]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)

    @field_validator("input")
    @classmethod
    def _check_input(cls, value: Any) -> Any:
        if isinstance(value, list) and value and not isinstance(value[0], str):
            raise ValueError("token-id input is not supported; send text")
        return _check_inputs(value)

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)  # type: ignore[arg-type]


class ClassifyRequest(_Request):
    input: Annotated[str | list[str], _INPUTS]

    _check = field_validator("input")(classmethod(lambda cls, v: _check_inputs(v)))

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


# The routing head, read of every request before the model is known. (Its docstring is its
# published schema's description, kept as it was.) Bodies forwarded to vLLM are then checked
# with the endpoint's passthrough model below (``PASSTHROUGH_REQUESTS``).
class PassthroughRequest(_Request):
    """What the gateway checks of a request it forwards to an engine's own OpenAI layer
    (vLLM): routing fields and the pool's caps. The engine validates everything else."""

    stream: bool = False
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    n: Choices | None = None

    def requested_max_tokens(self) -> int | None:
        return _chat_max_tokens(self.max_completion_tokens, self.max_tokens)


# Passthrough requests: bodies forwarded to vLLM's own OpenAI layer. Every number anywhere in
# them must be finite, including in fields zeroserve does not know (vLLM's extensions, tool
# schemas, content parts): json.loads takes NaN and Infinity, and vLLM's own range checks let
# NaN through (every comparison with NaN is false).


def _finite_json(value: Any) -> Any:
    # One walk, with a stack (a body may nest as deep as the gateway lets it), and one error
    # however many bad numbers: pydantic's JsonValue would report each one (and it lets NaN
    # through from JSON text).
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                raise ValueError("numbers must be finite (no NaN or Infinity)")
        elif isinstance(item, dict):
            if not all(isinstance(key, str) for key in item):
                raise ValueError("object keys must be strings")
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif not (item is None or isinstance(item, (str, int))):  # bool is an int
            raise ValueError(f"{type(item).__name__} is not a JSON value")
    return value


# Any JSON value without NaN or infinities.
FiniteJson = Annotated[Any, AfterValidator(_finite_json)]


def _text_or_token_ids(value: Any) -> str | None:
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        if not value or isinstance(value[0], str):
            return "texts"
        return "token_id_lists" if isinstance(value[0], list) else "token_ids"
    return None


# A list that stops at its first bad item: a body of a million bad items is one error, not a
# million (each built into a dict by the gateway's error handler).
_TokenIds = Annotated[list[TokenId], Field(fail_fast=True)]

# A text, texts, a list of token ids, or lists of token ids (tagged by the first item, so that
# a list fails against one shape only). The counts are checked by _check_prompts and
# _check_inputs.
TextsOrTokenIds = Annotated[
    Annotated[str, Tag("text")]
    | Annotated[list[str], Field(fail_fast=True), Tag("texts")]
    | Annotated[_TokenIds, Tag("token_ids")]
    | Annotated[list[_TokenIds], Field(fail_fast=True), Tag("token_id_lists")],
    Discriminator(
        _text_or_token_ids,
        custom_error_type="text_or_token_ids",
        custom_error_message="expected a string, a list of strings, a list of token ids or a list of such lists",
    ),
]


class _Open(BaseModel):
    """An object inside a passthrough request: the fields zeroserve checks, and any other
    finite JSON, kept for vLLM."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, frozen=True)
    __pydantic_extra__: dict[str, FiniteJson] = Field(init=False)


class _Passthrough(_Request):
    """A passthrough request: unknown fields are vLLM's to check, but must be finite JSON."""

    __pydantic_extra__: dict[str, FiniteJson] = Field(init=False)


class _PassthroughSampling(_SamplingLimits, _Passthrough):
    """The shared sampling limits, with what vLLM does and zeroserve's own engines do not."""

    stream_options: dict[str, FiniteJson] | None = Field(default=None, description="Only allowed when stream is true.")
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None


class PassthroughFunction(_Open):
    """A function of a tool, or the function that ``tool_choice`` names."""

    name: str = Field(min_length=1)


class PassthroughTool(_Open):
    type: Literal["function"] = "function"
    function: PassthroughFunction


class PassthroughToolChoice(_Open):
    type: Literal["function"] = "function"
    function: PassthroughFunction


class PassthroughChatMessage(_Open):
    """Any role and any content (text, image, audio or video parts): vLLM decides."""

    role: str
    content: FiniteJson = None


class PassthroughChatRequest(_PassthroughSampling):
    messages: list[PassthroughChatMessage] = Field(min_length=1, fail_fast=True)
    max_tokens: MaxTokens | None = Field(default=None, description="Deprecated: max_completion_tokens wins.")
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    tools: list[PassthroughTool] | None = Field(default=None, max_length=MAX_TOOLS, fail_fast=True)
    tool_choice: Literal["none", "auto", "required"] | PassthroughToolChoice | None = None

    @field_validator("tool_choice")
    @classmethod
    def _check_tool_choice(
        cls, value: str | PassthroughToolChoice | None, info: ValidationInfo
    ) -> str | PassthroughToolChoice | None:
        # A field validator (tools is validated first), so that the error names its param.
        if value is None or value in ("none", "auto") or "tools" not in info.data:
            return value  # "auto" without tools is vLLM's to judge; invalid tools have their own error
        tools: list[PassthroughTool] = info.data["tools"] or []
        if value == "required":
            if not tools:
                raise ValueError('tool_choice "required" needs at least one tool in tools')
            return value
        assert isinstance(value, PassthroughToolChoice)
        name = value.function.name
        if name not in {tool.function.name for tool in tools}:
            raise ValueError(f"tool_choice names function '{name}' which is not in tools")
        return value

    def requested_max_tokens(self) -> int | None:
        return _chat_max_tokens(self.max_completion_tokens, self.max_tokens)


class PassthroughCompletionRequest(_PassthroughSampling):
    # Optional: vLLM also takes prompt_embeds instead, and says when neither is there.
    prompt: TextsOrTokenIds | None = None
    prompt_embeds: str | Annotated[list[str], Field(fail_fast=True)] | None = None
    max_tokens: MaxTokens | None = 16
    logprobs: TopLogprobs | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        return _check_prompts(value, noun="prompts")

    @field_validator("prompt_embeds")
    @classmethod
    def _check_prompt_embeds(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) > MAX_PROMPTS:
            raise ValueError(f"prompt_embeds may hold at most {MAX_PROMPTS} prompts")
        return value

    def prompt_count(self) -> int:
        """How many prompts the request holds (each generates n sequences)."""
        if isinstance(self.prompt, list):
            return len(_items(self.prompt))
        if isinstance(self.prompt_embeds, list):
            return max(1, len(self.prompt_embeds))
        return 1

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class _PassthroughInputs(_Passthrough):
    input: TextsOrTokenIds

    @field_validator("input")
    @classmethod
    def _check_input(cls, value: Any) -> Any:
        return _check_inputs(value)


class PassthroughEmbeddingRequest(_PassthroughInputs):
    pass


class PassthroughClassifyRequest(_PassthroughInputs):
    pass


PASSTHROUGH_REQUESTS: dict[str, type[_Request]] = {
    "chat/completions": PassthroughChatRequest,
    "completions": PassthroughCompletionRequest,
    "embeddings": PassthroughEmbeddingRequest,
    "classify": PassthroughClassifyRequest,
}

"""OpenAI request and response schemas: the gateway's whole HTTP vocabulary.

Requests allow unknown fields (clients such as the ``openai`` package add new ones
over time) but refuse known fields whose values are out of range, and refuse the
OpenAI options zeroserve does not implement rather than ignoring them silently.
The classification route follows vLLM's ``/classify`` convention.

The JSON schemas of the request models are the gateway's OpenAPI request bodies. Where a
validator refuses what the field's type allows, the field carries a ``WithJsonSchema`` that
says what is accepted, so the published schema matches the server.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, WithJsonSchema, field_validator, model_validator

__all__ = [
    "ChatMessage",
    "ChatCompletionRequest",
    "CompletionRequest",
    "EmbeddingRequest",
    "ClassifyRequest",
    "GenerateParams",
    "PassthroughRequest",
    "new_id",
]

MAX_STOP = 4
MAX_INPUTS = 2048
MAX_PROMPTS = 64


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


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, frozen=True)

    model: str = Field(min_length=1, max_length=256)
    user: str | None = Field(default=None, max_length=256)


class GenerateParams(BaseModel):
    """Sampling parameters as the engines receive them (validated by the gateway)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    max_tokens: int | None = Field(default=None, gt=0, description="None: up to the context or the model's cap.")
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    stop: tuple[str, ...] = ()
    seed: int | None = None


class _SamplingFields(_Request):
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1, le=128)
    stop: Annotated[str | list[str] | None, _STOP] = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    stream: bool = False
    stream_options: dict[str, Any] | None = Field(default=None, description="Only allowed when stream is true.")
    presence_penalty: Annotated[float | None, _ZERO_ONLY] = Field(default=None, ge=-2, le=2)
    frequency_penalty: Annotated[float | None, _ZERO_ONLY] = Field(default=None, ge=-2, le=2)
    logprobs: Annotated[Any, _json_schema({"enum": [None, False, 0]}, _UNSUPPORTED)] = None

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

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _SamplingFields:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise ValueError(f"{name} is not supported by this server")
        if self.logprobs not in (None, False, 0):
            raise ValueError("logprobs is not supported by this model's engine")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def requested_max_tokens(self) -> int | None:
        return None


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
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
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
        return self.max_completion_tokens or self.max_tokens


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
    max_tokens: int | None = Field(default=16, ge=1)
    echo: Annotated[bool, _json_schema({"const": False}, _UNSUPPORTED)] = False
    suffix: Annotated[str | None, _json_schema({"anyOf": [{"const": ""}, {"type": "null"}]}, _UNSUPPORTED)] = None
    best_of: Annotated[int | None, _json_schema({"anyOf": [{"const": 1}, {"type": "null"}]}, _UNSUPPORTED)] = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not (1 <= len(value) <= MAX_PROMPTS):
            raise ValueError(f"prompt must be a string or a list of 1 to {MAX_PROMPTS} strings")
        return value

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


def _check_inputs(value: str | list[str]) -> str | list[str]:
    if isinstance(value, list):
        if not value:
            raise ValueError("input must not be an empty list")
        if len(value) > MAX_INPUTS:
            raise ValueError(f"input may hold at most {MAX_INPUTS} items")
    return value


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


class PassthroughRequest(_Request):
    """What the gateway checks of a request it forwards to an engine's own OpenAI layer
    (vLLM): routing fields and the pool's caps. The engine validates everything else."""

    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1, le=128)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

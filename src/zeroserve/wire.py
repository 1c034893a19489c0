"""The messages a model replica streams to the gateway: typed, versioned, no sentinels.

The gateway and each model are separate Serve applications, deployed and rolled
independently, so this is a contract between versions as much as between processes:

- a generation (the native path) yields :class:`Accepted` once the prompt passed the
  model's checks, then :class:`Delta` pieces of its choices, then one :class:`Meter`;
- a request served by an engine's own OpenAI layer (vLLM) yields :class:`OpenAIJson`
  once, or :class:`OpenAIStream` and then the ``data:`` lines of its SSE stream as
  ``str``, with vLLM's usage chunk split off as :class:`Usage`; then one :class:`Meter`.

The opening message carries :data:`WIRE_VERSION`. Replicas of version 1 (before these
types) sent ``Delta(index=-1)`` for accepted, ``Delta(index=-2)`` for the meter and
tagged tuples on the OpenAI path; :func:`decode` turns those into the same types, so a
new gateway keeps serving old replicas during a rolling redeploy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = [
    "WIRE_VERSION",
    "Accepted",
    "Delta",
    "Meter",
    "OpenAIJson",
    "OpenAIStream",
    "Usage",
    "WireError",
    "decode",
    "split_usage",
]

WIRE_VERSION = 2
# Version 1 sentinels, read by decode() only.
_V1_ACCEPTED = -1
_V1_METER = -2


@dataclass(frozen=True)
class Delta:
    """A piece of one choice's output (``index`` is the choice, from 0).

    Pickled by its module path ``zeroserve.engines.base.Delta`` in version 1: that name stays
    (a re-export), and no ``slots`` here, so a version 1 pickle still loads into this class.
    """

    index: int
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    gpu_s: float = 0.0  # version 1 meter readings only


@dataclass(frozen=True)
class Accepted:
    """The prompt passed the model's own checks; the output follows."""

    prompt_tokens: int
    version: int = WIRE_VERSION


@dataclass(frozen=True)
class Meter:
    """The request's metered GPU-seconds (engine time x GPU fraction); the last message."""

    gpu_s: float


@dataclass(frozen=True)
class OpenAIJson:
    """A whole (non-streamed) answer of the engine's own OpenAI layer."""

    body: dict[str, Any]
    version: int = WIRE_VERSION


@dataclass(frozen=True)
class OpenAIStream:
    """The engine's own OpenAI layer answers with SSE: ``data:`` lines follow as ``str``."""

    version: int = WIRE_VERSION


@dataclass(frozen=True)
class Usage:
    """The token counts of a stream, from vLLM's usage chunk; ``line`` is that chunk as sent."""

    prompt_tokens: int
    completion_tokens: int
    line: str = ""


class WireError(Exception):
    """A replica sent something this gateway does not understand (a newer wire version)."""


def decode(item: Any) -> Any:
    """One message from a replica of any version, as this version's type.

    Raises:
        WireError: the message is of no version this gateway knows.
    """
    if isinstance(item, str | Delta | Accepted | Meter | OpenAIJson | OpenAIStream | Usage):
        if isinstance(item, Delta) and item.index < 0:
            return Accepted(item.prompt_tokens, 1) if item.index == _V1_ACCEPTED else Meter(item.gpu_s)
        if isinstance(item, Accepted | OpenAIJson | OpenAIStream) and item.version > WIRE_VERSION:
            raise WireError(f"a replica speaks wire version {item.version}; this gateway knows {WIRE_VERSION}")
        return item
    if isinstance(item, tuple) and len(item) == 2:
        kind, payload = item
        if kind == "json" and isinstance(payload, dict):
            return OpenAIJson(payload, 1)
        if kind == "sse":
            return OpenAIStream(1)
        if kind == "meter":
            return Meter(float(payload))
    raise WireError(f"a replica sent an unknown message of type {type(item).__name__}")


def split_usage(text: str) -> list[str | Usage]:
    """``text`` (SSE events) in order, with vLLM's usage chunk (``choices: []`` and a ``usage``
    object) as a :class:`Usage` of its own.

    The chunk is recognised by its parsed JSON, not by its spelling; ``'"usage"' in event``
    only spares the parse for the other events.
    """
    if '"usage"' not in text:
        return [text]
    parts: list[str | Usage] = []
    pending = ""
    for event in text.split("\n\n"):
        if not event:
            continue
        line = event + "\n\n"
        usage = _usage_of(event) if event.startswith("data:") and '"usage"' in event else None
        if usage is None:
            pending += line
            continue
        if pending:
            parts.append(pending)
            pending = ""
        parts.append(Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0), line))
    if pending:
        parts.append(pending)
    return parts


def _usage_of(event: str) -> dict[str, Any] | None:
    try:
        chunk = json.loads(event[5:])
    except ValueError:
        return None
    if isinstance(chunk, dict) and chunk.get("choices") == [] and isinstance(chunk.get("usage"), dict):
        return chunk["usage"]  # type: ignore[no-any-return]
    return None

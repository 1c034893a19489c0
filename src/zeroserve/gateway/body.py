"""Reading a request body: size, time, strict UTF-8 JSON, depth; then typed validation.

Pure functions of the request stream and the limits, unit-tested directly. The handlers
read bodies here rather than through FastAPI body parameters, so that the limits hold
while the body streams in and every refusal is an OpenAI-shaped 4xx.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from zeroserve.errors import (
    InvalidRequestError,
    OverloadedError,
    PayloadTooLargeError,
    RequestTimeoutError,
    from_validation,
)

__all__ = ["MAX_JSON_DEPTH", "SlowBodies", "json_body_schema", "nests_deeper", "read_json", "validate"]

# Only a \u escape can put a UTF-16 surrogate into a body decoded as strict UTF-8.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
# Deeper JSON is refused: a forwarded body is pickled on its way to a replica, and pickling a
# few hundred levels exhausts the recursion limit there. OpenAI bodies (tool schemas included)
# need far fewer.
MAX_JSON_DEPTH = 64
_T = TypeVar("_T", bound=BaseModel)


class SlowBodies:
    """The requests of one gateway replica whose body is still arriving after ``grace_s``.

    A body sent at network speed arrives in milliseconds and takes no place here. One that is
    still arriving after the grace (a slow upload, or a client that sent its headers only) takes
    a place for as long as it keeps arriving, and is refused (503 with ``Retry-After``) when
    ``limit`` are held already: slow uploads hold at most ``limit`` of the replica's connections,
    whatever their number, and the others keep being served.
    """

    def __init__(self, limit: int, grace_s: float = 1.0, retry_after_s: int = 1) -> None:
        self.limit, self.grace_s, self.retry_after_s = limit, grace_s, retry_after_s
        self.held = 0

    def take(self) -> None:
        """Raises OverloadedError: every place is held."""
        if self.held >= self.limit:
            raise OverloadedError(
                f"too many request bodies are arriving slowly ({self.limit}); send the body at once, or retry",
                code="slow_uploads",
                retry_after_s=self.retry_after_s,
            )
        self.held += 1

    def give(self) -> None:
        self.held -= 1


async def read_json(
    content_length: str | None,
    stream: AsyncIterator[bytes],
    max_bytes: int,
    timeout_s: float,
    slow: SlowBodies | None = None,
) -> dict[str, Any]:
    """The body as a JSON object, read within ``max_bytes`` and ``timeout_s``; a body still
    arriving after ``slow.grace_s`` takes a place in ``slow`` (or is refused) while it does.

    Raises:
        PayloadTooLargeError: over ``max_bytes`` (announced or sent).
        RequestTimeoutError: the body did not arrive in time.
        OverloadedError: the body arrives slowly and ``slow`` is full.
        InvalidRequestError: not a JSON object in strict UTF-8, a lone surrogate, too deep.
    """
    # isascii: headers are decoded as latin-1, where "\xb2" (superscript two) passes isdigit but not int().
    if content_length and content_length.isascii() and content_length.isdigit() and int(content_length) > max_bytes:
        raise PayloadTooLargeError(f"request body over {max_bytes} bytes")
    body = bytearray()
    held = False
    part: asyncio.Future[bytes] | None = None
    chunks = stream.__aiter__()
    loop = asyncio.get_running_loop()
    slow_at = loop.time() + slow.grace_s if slow is not None else None
    try:
        # A client that sends its body slowly, or never ends it, must not hold a handler forever.
        async with asyncio.timeout(timeout_s):
            while True:
                # The next part is read by a task of its own, so that waiting for it can stop at
                # the grace (to take a place) without cancelling the read.
                part = asyncio.ensure_future(anext(chunks))
                if slow is not None and slow_at is not None and not held:
                    done, _ = await asyncio.wait({part}, timeout=max(0.0, slow_at - loop.time()))
                    if not done:
                        slow.take()  # or a 503: the read is given up below
                        held = True
                try:
                    chunk = await part
                except StopAsyncIteration:
                    break
                body += chunk
                if len(body) > max_bytes:
                    raise PayloadTooLargeError(f"request body over {max_bytes} bytes")
    except TimeoutError:
        raise RequestTimeoutError(
            f"the request body did not arrive within {timeout_s:.0f} s", code="body_timeout"
        ) from None
    except ClientDisconnect:
        # Nobody will read this answer; it keeps a client that hung up from counting as a server error.
        raise InvalidRequestError("the client closed the connection before the body was complete") from None
    finally:
        if part is not None and not part.done():  # the read was given up (a timeout, a cancel)
            part.cancel()
        if held and slow is not None:
            slow.give()
    return parse_json(bytes(body))


def parse_json(body: bytes) -> dict[str, Any]:
    """Strict UTF-8 JSON (RFC 8259), an object, with no lone surrogate and at most MAX_JSON_DEPTH levels."""
    try:
        # json.loads(bytes) would also take UTF-16 and -32, and let encoded surrogates through.
        data = json.loads(body.decode("utf-8"))
        if _SURROGATE_ESCAPE.search(body):
            # Engines cannot encode a lone surrogate (a tokenizer raises); pairs such as emoji pass.
            json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise InvalidRequestError("the body holds a lone UTF-16 surrogate escape (\\ud800 to \\udfff)") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise InvalidRequestError(f"the body is not valid JSON: {err}") from None
    except RecursionError:
        raise InvalidRequestError("the body is nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("the body must be a JSON object")
    # Counting brackets is cheap, and spares almost every body the walk.
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and nests_deeper(data, MAX_JSON_DEPTH):
        raise InvalidRequestError(f"the body nests deeper than {MAX_JSON_DEPTH} levels")
    return data


def nests_deeper(data: Any, limit: int) -> bool:
    """Whether parsed JSON nests deeper than ``limit`` levels (a loop: no recursion to exhaust)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def validate(data: dict[str, Any], model_cls: type[_T]) -> _T:
    """``data`` as ``model_cls``, or a 400 naming the first invalid field."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        raise from_validation(err) from None
    except RecursionError:
        raise InvalidRequestError("the body is nested too deeply") from None


def json_body_schema(model_cls: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI request body of a route that reads its body itself, as ``model_cls`` validates it.

    Its ``$defs`` are inlined because an OpenAPI document resolves ``$ref`` from its own root.
    """
    schema = model_cls.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, list):
            return [inline(item) for item in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            node = {**defs[ref.removeprefix("#/$defs/")], **{k: v for k, v in node.items() if k != "$ref"}}
        return {key: inline(value) for key, value in node.items()}

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}

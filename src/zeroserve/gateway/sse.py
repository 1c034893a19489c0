"""Server-sent events: the one relay every streaming path uses, and its helpers.

A streaming path supplies a :class:`StreamSource` (what to send before, how to render each
message, what to send and do after); :func:`relay` owns what they share: one deadline for
the whole stream, the meter reading, time to first token and per output token, and the
in-band error event once the headers are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi.responses import StreamingResponse

from zeroserve.errors import ZeroserveError, error_body, replica_died
from zeroserve.wire import Meter

__all__ = ["DONE", "GuardedStream", "Result", "StreamSource", "keepalive", "merge", "relay", "stream_error"]

logger = logging.getLogger("zeroserve.gateway")

DONE = "data: [DONE]\n\n"


class GuardedStream(StreamingResponse):
    """A StreamingResponse that runs ``on_close`` however the response ends.

    Starlette may cancel a response whose client went away before its body iterator ever
    started; a ``finally`` inside that iterator would then never run.
    """

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            self._on_close()


class StreamSource(Protocol):
    """One streaming path's part of a relay."""

    def prologue(self) -> AsyncIterator[str]:
        """Events before the messages (keepalive comments while the model wakes, role chunks)."""
        ...

    def messages(self) -> AsyncIterator[Any]:
        """The replica's messages; :class:`Meter` readings are taken by the relay."""
        ...

    def render(self, message: Any) -> str:
        """The SSE text of one message ("" to send nothing)."""
        ...

    def epilogue(self, gpu_s: float) -> AsyncIterator[str]:
        """Events after the last message, and the request's settlement, in this path's order."""
        ...

    def completion_tokens(self) -> int:
        """Output tokens so far (for the time per output token)."""
        ...


@dataclass
class Result:
    """What :func:`keepalive` yields last: the awaited value."""

    value: Any


async def relay(
    source: StreamSource,
    *,
    model: str,
    started: float,
    timeout_s: float,
    obs: Any,
    request_id: str,
    lost: Callable[[], Coroutine[Any, Any, None]] | None = None,
) -> AsyncIterator[str]:
    """The SSE events of ``source`` within one deadline of ``timeout_s``, errors in-band.

    Args:
        source: the path's prologue, messages, rendering and epilogue.
        model: the model's name (metrics).
        started: ``time.perf_counter()`` when the request arrived (time to first token).
        timeout_s: the whole stream's bound once its first message came.
        obs: the observer of first-token and per-token times.
        request_id: for the log line of an unexpected failure.
        lost: makes a coroutine that returns when the stream's replica is known lost
            (``waits.replica_lost``): the wait for the next message ends then, with a
            ``replica_died`` error event.
    """
    first_at: float | None = None
    gpu_s = 0.0
    loop = asyncio.get_running_loop()
    watch = asyncio.ensure_future(lost()) if lost is not None else None
    scope: asyncio.Timeout | None = None  # the wait for the next message, while it waits

    def on_lost(done: asyncio.Future[None]) -> None:
        if not done.cancelled() and scope is not None:
            scope.reschedule(loop.time())  # ends that wait now; seen as lost below

    if watch is not None:
        watch.add_done_callback(on_lost)
    try:
        async for text in source.prologue():
            yield text
        messages = source.messages()
        deadline = loop.time() + timeout_s
        while True:
            # One deadline for the whole stream; asyncio.timeout adds no task per item.
            try:
                async with asyncio.timeout_at(deadline) as scope:
                    if watch is not None and watch.done():
                        raise TimeoutError
                    try:
                        message = await anext(messages)
                    except StopAsyncIteration:
                        break
            except TimeoutError:
                if watch is not None and watch.done() and not watch.cancelled():
                    raise replica_died(model) from None
                raise
            finally:
                scope = None
            if isinstance(message, Meter):  # the replica's reading, last
                gpu_s += message.gpu_s
                continue
            text = source.render(message)
            if text:
                if first_at is None:
                    first_at = time.perf_counter()
                    obs.first_token(model, first_at - started)
                yield text
        async for text in source.epilogue(gpu_s):
            yield text
        total = source.completion_tokens()
        if first_at is not None and total > 1:
            obs.per_output_token(model, (time.perf_counter() - first_at) / (total - 1))
    except Exception as err:  # noqa: BLE001 - reported in-band: the headers are sent
        yield stream_error(err, request_id)
        yield DONE
    finally:
        if watch is not None:
            watch.cancel()


async def keepalive(aw: Awaitable[Any], interval_s: float, comment: str) -> AsyncIterator[str | Result]:
    """Await ``aw``, yielding an SSE comment every ``interval_s`` meanwhile, then its :class:`Result`.

    A stream to a cold model sends its headers at once and these comments while the model
    wakes, so clients and proxies with idle timeouts do not give up on it.
    """
    task = asyncio.ensure_future(aw)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=interval_s)
            if done:
                yield Result(task.result())
                return
            yield comment
    finally:
        if not task.done():
            task.cancel()


def waking_comment(model: str) -> str:
    return f": waiting for model '{model}' to wake\n\n"


def stream_error(err: Exception, request_id: str) -> str:
    """An SSE error event for a stream whose headers are already sent."""
    if isinstance(err, ZeroserveError):
        body = err.body()
    elif isinstance(err, TimeoutError):
        body = error_body("the model did not finish in time", "timeout", code="timeout")
    else:
        logger.exception("[%s] stream failed", request_id, exc_info=err)
        body = error_body("the model failed while streaming", "internal_error")
    return f"data: {json.dumps(body)}\n\n"


async def merge(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several streams as their items arrive, tagged with the stream's index."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    end = object()

    async def pump(i: int, s: AsyncIterator[Any]) -> None:
        try:
            async for item in s:
                await queue.put((i, item))
            await queue.put((i, end))
        except BaseException as exc:  # noqa: BLE001 - forwarded
            await queue.put((i, _Raised(exc)))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    live = len(streams)
    try:
        while live:
            i, item = await queue.get()
            if item is end:
                live -= 1
            elif isinstance(item, _Raised):
                raise item.exc
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


@dataclass
class _Raised:
    exc: BaseException

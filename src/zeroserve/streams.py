"""Stream helpers shared by the deployments (no Ray here)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

__all__ = ["coalesce"]

_DONE = object()
_NONE = object()


async def coalesce(source: AsyncIterator[Any], max_items: int = 256, interval_s: float = 0.0) -> AsyncIterator[Any]:
    """Join the text pieces of ``source`` that are already waiting into one, adding no delay.

    Items that are not ``str`` (typed messages) are never joined: they go out alone, in order.

    Every item streamed through a Ray handle costs an object and a message on each hop
    (replica → gateway → proxy). Under load the consumer falls behind the engine and
    pieces pile up: they are sent together. When the consumer keeps up, every piece goes
    out alone as soon as it exists, so the time to first token is unchanged.

    ``interval_s`` (Ray Serve LLM's stream batching, without its wait for the first token):
    the first text goes out at once, and each later text at least ``interval_s`` after the
    one before, with every piece that arrived meanwhile. A stream whose pieces come further
    apart than that is not slowed; one that comes faster is sent at most once per interval,
    so each hop carries one message per interval instead of one per token.
    """
    queue: asyncio.Queue[object] = asyncio.Queue()

    ended = asyncio.Event()  # the source finished (or failed): nothing more is worth waiting for

    async def pump() -> None:
        try:
            async for item in source:
                queue.put_nowait(item)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(_DONE)
            ended.set()

    task = asyncio.create_task(pump())
    loop = asyncio.get_running_loop()
    last_text: float | None = None
    try:
        while True:
            item = await queue.get()
            if interval_s and last_text is not None and isinstance(item, str):
                # Hold the piece until the interval since the last text is over: more pieces
                # arriving meanwhile go with it. The end of the stream is not waited out.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ended.wait(), max(0.0, last_text + interval_s - loop.time()))
            pending: BaseException | None = None
            done = False
            parts: list[str] = []
            alone: object = _NONE
            while True:
                if item is _DONE:
                    done = True
                    break
                if isinstance(item, BaseException):
                    pending = item
                    break
                if not isinstance(item, str):
                    alone = item
                    break
                parts.append(item)
                if queue.empty() or len(parts) >= max_items:
                    break
                item = queue.get_nowait()
            if parts:
                yield "".join(parts)
                last_text = loop.time()
            if alone is not _NONE:
                yield alone
            if pending is not None:
                raise pending
            if done:
                return
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from zeroserve.streams import coalesce


async def _source(items: list[str], fail: bool = False, delay: float = 0) -> AsyncIterator[str]:
    for item in items:
        if delay:
            await asyncio.sleep(delay)
        yield item
    if fail:
        raise ValueError("engine broke")


async def test_a_fast_consumer_gets_every_piece_alone() -> None:
    out = [x async for x in coalesce(_source(["a", "b", "c"], delay=0.01))]
    assert out == ["a", "b", "c"]


async def test_a_slow_consumer_gets_waiting_pieces_joined_in_order() -> None:
    got = []
    async for chunk in coalesce(_source([str(i) for i in range(50)])):
        got.append(chunk)
        await asyncio.sleep(0.01)
    assert "".join(got) == "".join(str(i) for i in range(50))
    assert len(got) < 50


async def test_an_error_arrives_after_the_pieces_before_it() -> None:
    got = []
    with pytest.raises(ValueError, match="engine broke"):
        async for chunk in coalesce(_source(["a", "b"], fail=True)):
            got.append(chunk)
    assert "".join(got) == "ab"


async def test_typed_messages_go_alone_and_in_order() -> None:
    marker = ("usage", 7)

    async def source() -> AsyncIterator[object]:
        for item in ["a", "b", marker, "c", "d"]:
            yield item

    got = []
    async for chunk in coalesce(source()):
        got.append(chunk)
        await asyncio.sleep(0.01)  # a slow consumer: waiting text is joined, never with the marker
    at = got.index(marker)
    assert "".join(got[:at]) == "ab"
    assert "".join(got[at + 1 :]) == "cd"


async def test_with_an_interval_the_first_piece_goes_at_once_and_later_ones_together() -> None:
    """A piece every 5 ms, a 50 ms interval: the first alone and at once, then about one message
    per interval carrying everything that arrived, in order, and nothing held past the end."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    got: list[tuple[float, str]] = []
    async for chunk in coalesce(_source([str(i % 10) for i in range(40)], delay=0.005), interval_s=0.05):
        got.append((loop.time() - started, chunk))
    assert got[0][1] == "0"
    assert "".join(chunk for _, chunk in got) == "".join(str(i % 10) for i in range(40))
    # 40 pieces over at least 0.2 s: one message per interval at most (plus the first).
    assert len(got) <= 1 + (got[-1][0] - got[0][0]) / 0.05 + 1
    assert len(got) < 40
    # Every message but the last waited out its interval; the last one goes when the stream
    # ends (the end is not held), so it may follow the one before at once.
    gaps = [b - a for (a, _), (b, _) in zip(got, got[1:-1], strict=False)]
    assert gaps and min(gaps) >= 0.045


async def test_with_an_interval_pieces_further_apart_are_not_held() -> None:
    """Pieces 30 ms apart with a 10 ms interval: each goes alone, as soon as it exists."""
    got = [x async for x in coalesce(_source(["a", "b", "c"], delay=0.03), interval_s=0.01)]
    assert got == ["a", "b", "c"]


async def test_with_an_interval_the_end_of_the_stream_is_not_held() -> None:
    """The last pieces of a stream go as soon as the stream ends, not an interval later."""
    loop = asyncio.get_running_loop()
    got = []
    async for chunk in coalesce(_source(["a", "b", "c"], delay=0.01), interval_s=5.0):
        got.append((loop.time(), chunk))
    assert "".join(c for _, c in got) == "abc"
    assert got[-1][0] - got[0][0] < 2.5  # half the interval: the end was not waited out

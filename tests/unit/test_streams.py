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

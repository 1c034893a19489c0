"""A Ray Serve handle's background work left by an earlier test is found, stopped, and cannot fail
a gateway test's log check (the flaky ``test_hostile_request_gets_its_status[lone-high-surrogate]``)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator

import pytest

from .serve_leftovers import router_loop_threads, serve_leftovers, stop_serve_leftovers
from .test_gateway_fuzz import zeroserve_records


@pytest.fixture
def leftover_router_loop(monkeypatch: pytest.MonkeyPatch) -> Iterator[asyncio.AbstractEventLoop]:
    """Serve's router loop as a handle from an earlier test leaves it: a daemon thread running it."""
    from ray.serve._private import router

    loop = asyncio.new_event_loop()

    def _run_router_event_loop() -> None:  # Serve's name for it (router.py)
        asyncio.set_event_loop(loop)
        loop.run_forever()

    thread = threading.Thread(target=_run_router_event_loop, daemon=True)
    thread.start()
    monkeypatch.setattr(router.SingletonThreadRouter, "_asyncio_loop", loop)
    try:
        yield loop
    finally:
        stop_serve_leftovers()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_a_leftover_metrics_push_is_found_stopped_and_not_a_zeroserve_error(
    leftover_router_loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    import ray
    from ray.serve._private.metrics_utils import MetricsPusher

    assert router_loop_threads()
    pusher = MetricsPusher()

    async def register() -> None:
        pusher.start()
        # What a router's push does after ray.shutdown(): a controller call, so Ray's auto-init.
        pusher.register_or_update_task("push_metrics_to_controller", ray.init, 0.01)

    with caplog.at_level(logging.ERROR):
        asyncio.run_coroutine_threadsafe(register(), leftover_router_loop).result(5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not caplog.records:
            time.sleep(0.01)
        assert serve_leftovers() == ["MetricsPusher.metrics_task"]
        stop_serve_leftovers()
        assert serve_leftovers() == []
    failed = [r for r in caplog.records if r.name.startswith("ray.serve")]
    assert failed and "Failed to run metrics task 'push_metrics_to_controller'" in failed[0].getMessage()
    assert "unit tests must not start Ray" in failed[0].getMessage()  # the CI failure, reproduced
    assert zeroserve_records(caplog) == []  # and a gateway test's log check no longer sees it

    caplog.clear()
    time.sleep(0.05)
    assert caplog.records == []  # stopped: no more pushes


def test_nothing_of_serve_runs_without_a_handle() -> None:
    assert serve_leftovers() == []
    stop_serve_leftovers()  # harmless when there is nothing to stop

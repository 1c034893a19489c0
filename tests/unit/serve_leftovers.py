"""Ray Serve background work alive in the test process, and how to stop it (no Ray needed).

A ``DeploymentHandle`` that sent a request owns a router on Serve's router loop (one daemon
thread per process, ``SingletonThreadRouter._asyncio_loop``), and the router a
``MetricsPusher`` task that calls the controller every few seconds. ``ray.shutdown()`` stops
neither: the next push calls ``ray.init()`` again through Ray's auto-init. In ``make test``
(``pytest tests``: integration before unit, one process) a handle from
``tests/integration/test_vllm.py`` outlived its cluster, and its push, refused by the unit
tests' ``_no_ray`` fixture, logged "Failed to run metrics task 'push_metrics_to_controller':
unit tests must not start Ray" on ``ray.serve`` in the middle of a gateway test.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import Any

__all__ = ["router_loop_threads", "serve_leftovers", "stop_serve_leftovers"]

# Serve's own loop-lag monitor lives as long as the router loop itself: not a handle's work.
_PROCESS_WIDE = ("_run_monitoring_loop",)


def _router_loop() -> asyncio.AbstractEventLoop | None:
    router = sys.modules.get("ray.serve._private.router")  # never imported here: only looked at
    singleton = getattr(router, "SingletonThreadRouter", None)
    loop = getattr(singleton, "_asyncio_loop", None)
    return loop if isinstance(loop, asyncio.AbstractEventLoop) and not loop.is_closed() else None


def _serve_tasks(loop: asyncio.AbstractEventLoop) -> list[asyncio.Task[Any]]:
    tasks = []
    for task in asyncio.all_tasks(loop):
        coro = task.get_coro()
        code = getattr(coro, "cr_code", None)
        name = getattr(coro, "__qualname__", "")
        if code is None or "ray/serve" not in code.co_filename.replace("\\", "/"):
            continue
        if not task.done() and not name.endswith(_PROCESS_WIDE):
            tasks.append(task)
    return tasks


def serve_leftovers() -> list[str]:
    """The Ray Serve tasks still running on Serve's router loop (a handle's metrics pusher ...)."""
    loop = _router_loop()
    if loop is None:
        return []
    return sorted(getattr(t.get_coro(), "__qualname__", repr(t)) for t in _serve_tasks(loop))


def router_loop_threads() -> set[int]:
    """Idents of the threads running Serve's router loop."""
    return {t.ident for t in threading.enumerate() if "_run_router_event_loop" in t.name and t.ident is not None}


def stop_serve_leftovers(timeout_s: float = 10.0) -> None:
    """Shut down every cached handle's router (Serve's own way), then cancel what still runs."""
    context = sys.modules.get("ray.serve.context")
    client = getattr(context, "_global_client", None)
    if client is not None:
        done = threading.Event()

        def shutdown() -> None:
            try:
                client.shutdown_cached_handles()
            finally:
                done.set()

        # In a thread: a router that does not answer must not hang the test session.
        threading.Thread(target=shutdown, name="stop-serve-handles", daemon=True).start()
        done.wait(timeout_s)
    loop = _router_loop()
    if loop is None:
        return
    tasks = _serve_tasks(loop)
    if not tasks or not loop.is_running():
        return

    async def cancel() -> None:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=timeout_s)

    asyncio.run_coroutine_threadsafe(cancel(), loop).result(timeout_s + 1)

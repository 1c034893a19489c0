"""Everything one gateway replica holds across requests, in one typed object."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from zeroserve.config import GatewaySpec
from zeroserve.gateway.backend import Backend
from zeroserve.gateway.body import SlowBodies
from zeroserve.gateway.fair import Dispatcher, FairShare
from zeroserve.gateway.lease import Admission
from zeroserve.gateway.room import RoomQueue
from zeroserve.gateway.telemetry import FanOut, Observer, RollingStats, WakeTracker
from zeroserve.quota import Ledger

__all__ = ["GatewayState"]


@dataclass
class GatewayState:
    """The gateway's limits, its backend, its limiters and what it observes.

    Build with :meth:`create`; the serving classes share one instance.
    """

    spec: GatewaySpec
    backend: Backend
    fair: FairShare
    dispatcher: Dispatcher
    admission: Admission
    stats: RollingStats
    obs: Any  # an Observer: RollingStats alone, or fanned out to the app's observer too
    wakes: WakeTracker
    # Requests waiting for a GPU slice for a cold model, in tier then arrival order.
    room: RoomQueue = field(default_factory=RoomQueue)
    # Request bodies still arriving after their grace (slow uploads), bounded.
    slow: SlowBodies = field(default_factory=lambda: SlowBodies(64))
    # Work that must finish after its request is answered (a charge at a stream's close).
    background: set[asyncio.Task[Any]] = field(default_factory=set)
    _capacity: tuple[float, dict[str, float]] = (-1e9, {})
    _capacity_read: asyncio.Future[dict[str, float]] | None = None

    @classmethod
    def create(
        cls, spec: GatewaySpec, backend: Backend, observer: Observer | None = None, ledger: Ledger | None = None
    ) -> GatewayState:
        """Raises ValueError: auth is on but there is no ledger."""
        if spec.auth.enabled and ledger is None:
            raise ValueError("auth is enabled but no ledger was given")
        stats = RollingStats()
        obs: Any = FanOut(stats, observer) if observer is not None else stats
        return cls(
            spec=spec,
            backend=backend,
            fair=FairShare(spec.auth, ledger, on_journal=obs.ledger_journal),
            dispatcher=Dispatcher(spec.auth.aging_s),
            admission=Admission(
                spec.max_inflight_requests, spec.max_inflight_per_model, spec.retry_after_s, obs.inflight
            ),
            stats=stats,
            obs=obs,
            wakes=WakeTracker(),
            slow=SlowBodies(spec.max_slow_bodies, retry_after_s=spec.retry_after_s),
        )

    async def capacity(self, max_age_s: float = 5.0) -> dict[str, float]:
        """GPUs per live node, read at most every ``max_age_s`` (the node list is a GCS call).

        One read at a time: callers that find the list stale while a read is under way share
        it (every request in flight watches its model's nodes, ``waits.replica_lost``).
        """
        read_at, capacity = self._capacity
        if time.monotonic() - read_at < max_age_s:
            return capacity
        if self._capacity_read is None or self._capacity_read.done():
            self._capacity_read = asyncio.ensure_future(self._read_capacity())
        return await asyncio.shield(self._capacity_read)

    async def _read_capacity(self) -> dict[str, float]:
        capacity = await self.backend.gpus()
        self._capacity = (time.monotonic(), capacity)
        return capacity

    def keep(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` to its end after the request that started it is gone (a reference is kept)."""
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

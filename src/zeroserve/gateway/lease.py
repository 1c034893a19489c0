"""Admission of one request to one model: a typed :class:`Lease` with one owner.

A request takes, in order, a slot of its key's concurrency (:class:`FairShare`), a slot of
the gateway's in-flight limits (:class:`Admission`) and a turn at the model's capacity
(:class:`Dispatcher`). :func:`admit` takes them under one ``ExitStack``, so a failure or a
cancellation at any step gives back what was taken; the :class:`Lease` it returns gives
them all back once (:meth:`Lease.release`) and charges the request once
(:meth:`Lease.settle`), whichever of the request's endings gets there first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from zeroserve.errors import OverloadedError, model_saturated
from zeroserve.gateway.fair import Grant, QueueFull
from zeroserve.gateway.middleware import RequestLog
from zeroserve.gateway.registry import ModelEntry

if TYPE_CHECKING:
    from zeroserve.gateway.state import GatewayState

__all__ = ["Admission", "Lease", "admit"]

logger = logging.getLogger("zeroserve.gateway")


class Admission:
    """Counts requests in flight and sheds load beyond the limits (503 + Retry-After).

    Queuing without bound only turns overload into timeouts; refusing early lets a
    client back off and keeps the admitted requests fast.
    """

    def __init__(
        self, total: int, per_model: int, retry_after_s: int, on_change: Callable[[str, int], None] | None = None
    ) -> None:
        self.on_change = on_change or (lambda model, count: None)
        self.total_limit = total
        self.per_model_limit = per_model
        self.retry_after_s = retry_after_s
        self.total = 0
        self.per_model: Counter[str] = Counter()

    def acquire(self, model: str) -> None:
        """Take a slot for ``model`` or raise :class:`OverloadedError`."""
        if self.total >= self.total_limit:
            raise OverloadedError(
                f"the server has {self.total} requests in flight (limit {self.total_limit}); retry later",
                code="overloaded",
                retry_after_s=self.retry_after_s,
            )
        if self.per_model[model] >= self.per_model_limit:
            raise OverloadedError(
                f"model '{model}' has {self.per_model[model]} requests in flight "
                f"(limit {self.per_model_limit}); retry later",
                code="overloaded",
                retry_after_s=self.retry_after_s,
            )
        self.total += 1
        self.per_model[model] += 1
        self.on_change(model, self.per_model[model])

    def release(self, model: str) -> None:
        self.total -= 1
        self.per_model[model] -= 1
        self.on_change(model, self.per_model[model])


@dataclass(eq=False)
class Lease:
    """One admitted request's slots and its one charge.

    Args:
        state: the gateway's state (its fair share and background tasks).
        grant: who is calling.
        entry: the model.
        log: the request's log record (its charge is reported there).
        slots: gives back every slot :func:`admit` took, in reverse order.
    """

    state: GatewayState
    grant: Grant
    entry: ModelEntry
    log: RequestLog
    slots: contextlib.ExitStack
    # An id the server made: a client's X-Request-Id may repeat, a charge must not.
    charge_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    entered_at: float = field(default_factory=time.monotonic)
    released: bool = False
    settled: bool = False

    def release(self) -> None:
        """Give back every slot (once; later calls do nothing)."""
        if not self.released:
            self.released = True
            self.slots.close()

    async def settle(self, gpu_s: float, units: int = 0) -> None:
        """Charge the request ``gpu_s`` (once; later calls do nothing). A ledger failure is logged,
        never raised: the answer is already out."""
        if self.settled:
            return
        self.settled = True
        self.log.gpu_s = gpu_s
        try:
            await self.state.fair.charge(self.grant, self.entry.name, gpu_s, self.charge_id, units)
        except Exception:  # noqa: BLE001 - the ledger must not turn a served request into an error
            logger.exception("[%s] could not record a charge of %.6f GPU-s", self.log.request_id, gpu_s)

    def close(self) -> None:
        """The response ended, however: release, and charge what was not charged yet (the
        wall time since admission times the model's GPU fraction), in a task that is kept."""
        self.release()
        if not self.settled:
            fraction = self.entry.spec.gpu_fraction if self.entry.spec is not None else 0.0
            self.state.keep(self.settle((time.monotonic() - self.entered_at) * fraction))

    def headers(self, charged: float | None) -> dict[str, str]:
        """The quota headers of the answer (``charged``: None while it is unknown)."""
        return self.grant.headers(charged)


async def admit(state: GatewayState, log: RequestLog, grant: Grant, entry: ModelEntry, units: int | None) -> Lease:
    """Limits, load shedding, then a turn by priority once the model's capacity is in use.

    ``units``: the most work the request asks for (``max_tokens``, or the number of inputs),
    which predicts its cost for the key's budget (:meth:`FairShare.check`).

    Raises:
        ForbiddenError, QuotaError: the key's limits (403, 429).
        OverloadedError: the gateway or the model is saturated (503 + Retry-After).
    """
    assert entry.spec is not None
    replicas = max(1, entry.replicas, entry.target_replicas)
    capacity = entry.spec.max_ongoing_requests * replicas
    # The model's own queue bound (max_queued_requests per replica) holds here, where requests
    # wait: beyond it a request is shed at once instead of waiting out its timeout.
    max_waiting = entry.spec.max_queued_requests * replicas
    with contextlib.ExitStack() as slots:
        await state.fair.check(grant, entry.name, units)
        slots.callback(state.fair.release, grant)
        state.admission.acquire(entry.name)
        slots.callback(state.admission.release, entry.name)
        try:
            await asyncio.wait_for(
                state.dispatcher.acquire(entry.name, capacity, grant.priority, grant.predicted_s, max_waiting),
                state.spec.request_timeout_s,
            )
        except (QueueFull, TimeoutError) as err:
            why = f"is saturated: {err.waiting} requests already wait for it" if isinstance(err, QueueFull) else ""
            raise model_saturated(entry.name, why or "is saturated", state.spec.retry_after_s) from None
        slots.callback(state.dispatcher.release, entry.name, capacity)
        return Lease(state, grant, entry, log, slots.pop_all())

"""Making room for a model that cannot be placed: the pool's idle models yield their slices.

Two ways in, both while a request waits for a cold model (``waits.bounded``):

- :class:`RoomQueue`, before the model is called. A request to a model at zero that fits on no
  node does not call it yet (the call is what makes Serve start a replica, which Ray would then
  queue in its own order): it waits here, in the order of the waiting requests' priority (their
  key's tier), then arrival, and :func:`zeroserve.pool.plan_room` hands free slices and idle
  victims to the waiting models in that order. A model is called when it fits.
- :func:`make_room`, after it is called: a replica Serve started that Ray cannot place (another
  gateway replica woke it, or the room went to someone else first) asks for victims too.

The choice is over what this gateway replica knows (the directory's running replicas, its own
in-flight counts and last uses); the victim's autoscaling policy, which sees every gateway's
requests, yields only when it is really idle and held long enough, so a stale view here costs
time, never a request. Each gateway replica orders its own waiters; a GCS claim per waiting
model keeps two of them from choosing victims for the same model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from zeroserve.errors import model_failed
from zeroserve.gateway.registry import ModelEntry, ModelState, gpus_in_use
from zeroserve.pool import EPSILON, Resident, RoomPlan, Waiter, choose_victims, plan_room

if TYPE_CHECKING:
    from zeroserve.gateway.state import GatewayState

__all__ = ["REWAKE_WINDOW_S", "ROOM_POLL_S", "RoomLook", "RoomQueue", "make_room", "residents"]

logger = logging.getLogger("zeroserve.gateway")

# How often a request waiting for room looks again (a directory read, shared by every waiter).
ROOM_POLL_S = 0.25
# A model this gateway let wake keeps its room this long, or until its replica is placed.
GRANT_HOLD_S = 30.0
# Victims asked this recently are counted on to leave; after it, others may be asked (the same
# span as the GCS claim of the model waiting, deployments/gateway.py).
YIELD_FRESH_S = 15.0
# A wake this soon after the same model was evicted is counted as a re-wake (the pool thrashing).
REWAKE_WINDOW_S = 60.0


def residents(state: GatewayState, models: Mapping[str, ModelEntry]) -> list[Resident]:
    """Every running replica that holds a GPU slice and may be asked to yield, with what this
    gateway knows of its use. A model already yielding is left out: it is not asked twice."""
    out = []
    for name, entry in models.items():
        if entry.spec is None or entry.state is not ModelState.READY or entry.evicting:
            continue
        busy = state.admission.per_model[name] + len(state.dispatcher.waiting.get(name, []))
        stats = state.stats.models.get(name)
        last_used = stats.last_request if stats is not None and stats.last_request is not None else 0.0
        for node in entry.replica_nodes:
            out.append(
                Resident(
                    model=name,
                    node=node,
                    fraction=entry.spec.gpu_fraction,
                    priority=entry.spec.priority,
                    last_used=last_used,
                    busy=busy,
                    min_hold_s=entry.spec.min_hold_s,
                    pinned=entry.spec.never_yields,
                )
            )
    return out


@dataclass
class RoomLook:
    """What the last look for room found: ``busy`` when the model fit on no GPU and no model
    there could yield (all busy, pinned or just woken)."""

    busy: bool = False


@dataclass
class _Waiting:
    model: str
    fraction: float
    priority: int
    arrival: float


class RoomQueue:
    """This gateway replica's requests waiting for a GPU slice for a cold model."""

    def __init__(self) -> None:
        self._waiting: list[_Waiting] = []
        self._granted: dict[str, tuple[str, float]] = {}  # model -> (node, when it was let wake)
        self._evicted: dict[str, float] = {}  # model -> when this gateway asked it to yield

    async def enter(self, state: GatewayState, entry: ModelEntry, priority: int, look: RoomLook) -> str:
        """Return when ``entry`` may be called: it is not at zero, or it fits on a node now.
        ``look.busy`` says, after each look, whether it fits nowhere and nothing can yield.

        Returns:
            How it wakes: "free" (it fit at once), "evicted" (it waited for idle models to yield),
            "joined" (a wake had begun already), "queued" (it fits nowhere and eviction is off:
            Ray places it when a model scales to zero on its own), "" (it was awake).

        Raises:
            ModelUnavailableError: the model failed or was removed while it waited.
        """
        assert entry.spec is not None
        if entry.state is ModelState.READY:
            return ""
        if entry.state is not ModelState.COLD:
            return "joined"
        if entry.spec.gpu_fraction <= 0:
            return "free"
        me = _Waiting(entry.name, entry.spec.gpu_fraction, priority, time.time())
        if not state.spec.evict_idle_models:
            # Ray places the replica when a slice frees (an idle model's own delay): say which.
            return "free" if await self._fits_alone(state, me) else "queued"
        self._count_rewake(state, entry.name)
        self._waiting.append(me)
        started, waited = time.monotonic(), False
        try:
            models = await state.backend.models(max_age_s=ROOM_POLL_S)
            while True:
                current = models.get(entry.name)
                if current is None:
                    raise model_failed(entry.name, "it was removed from the pool", state.spec.retry_after_s)
                if current.state is ModelState.FAILED:
                    raise model_failed(entry.name, current.message, state.spec.retry_after_s)
                if current.state is not ModelState.COLD or self._holds_grant(entry.name):
                    return "evicted" if waited else "joined"
                try:
                    plan = await self._plan(state, models)
                    if plan is None or entry.name in plan.go:
                        if plan is not None:
                            self._granted[entry.name] = (plan.go[entry.name], time.monotonic())
                        return "evicted" if waited else "free"
                    look.busy = entry.name in plan.blocked
                    if entry.name in plan.asks:
                        await _ask(state, entry.name, plan.asks[entry.name], "waiting_request", self._evicted)
                except Exception as err:  # noqa: BLE001 - the GCS or the node list is back soon: look again
                    logger.warning("pool: could not make room for %s: %s", entry.name, err)
                waited = True
                await asyncio.sleep(ROOM_POLL_S)
                models = await state.backend.models(max_age_s=ROOM_POLL_S)
        finally:
            self._waiting.remove(me)
            if waited:  # it did wait for a slot, not only look
                state.obs.slot_wait(entry.name, time.monotonic() - started)

    async def _fits_alone(self, state: GatewayState, me: _Waiting) -> bool:
        """Whether ``me`` fits on a node now (eviction off: nothing is asked or held)."""
        try:
            plan = await self._plan(state, await state.backend.models(max_age_s=ROOM_POLL_S), [me])
        except Exception:  # noqa: BLE001 - only a label depends on it
            return True
        return plan is None or me.model in plan.go

    def _holds_grant(self, model: str) -> bool:
        """Whether this gateway let ``model`` wake a moment ago (its replica is not listed yet)."""
        granted = self._granted.get(model)
        return granted is not None and time.monotonic() - granted[1] < GRANT_HOLD_S

    async def _plan(
        self, state: GatewayState, models: Mapping[str, ModelEntry], waiting: list[_Waiting] | None = None
    ) -> RoomPlan | None:
        """The pool's plan for this gateway's waiting models; None when it has no GPU to plan."""
        capacity = await state.capacity()
        if not capacity:
            return None
        free = free_gpus(capacity, models)
        now = time.monotonic()
        for model, (node, at) in list(self._granted.items()):
            entry = models.get(model)
            placed = entry is not None and (entry.replica_nodes or entry.starting_nodes)
            if placed or now - at >= GRANT_HOLD_S or entry is None:
                del self._granted[model]
            elif node in free:
                free[node] -= entry.spec.gpu_fraction if entry.spec else 0.0
        waiters = [
            Waiter(w.model, w.fraction, w.priority, w.arrival, coming(models, w.model))
            for w in (self._waiting if waiting is None else waiting)
        ]
        return plan_room(waiters, free, residents(state, models), time.time())

    def _count_rewake(self, state: GatewayState, model: str) -> None:
        evicted = self._evicted.pop(model, None)
        if evicted is not None and time.time() - evicted < REWAKE_WINDOW_S:
            logger.info("pool: %s wakes %.0f s after it was evicted", model, time.time() - evicted)
            state.obs.rewake(model)


def free_gpus(capacity: Mapping[str, float], models: Mapping[str, ModelEntry]) -> dict[str, float]:
    """The GPUs free per live node: its GPUs less the fractions its placed replicas hold."""
    used = gpus_in_use(models)
    return {node: gpus - used.get(node, 0.0) for node, gpus in capacity.items()}


def coming(models: Mapping[str, ModelEntry], model: str) -> dict[str, float]:
    """The GPUs per node that models asked a moment ago to yield to ``model`` will free. An ask
    older than ``YIELD_FRESH_S`` is not counted: its victim found work meanwhile, and others may
    be asked."""
    now = time.time()
    out: dict[str, float] = {}
    for e in models.values():
        if e.yielding_to == model and e.spec is not None and now - e.yield_asked_at < YIELD_FRESH_S:
            for node in e.replica_nodes:
                out[node] = out.get(node, 0.0) + e.spec.gpu_fraction
    return out


async def _ask(
    state: GatewayState, model: str, victims: list[Resident], reason: str, evicted: dict[str, float] | None = None
) -> list[str]:
    """Ask ``victims`` to yield to ``model``; log and count each one asked."""
    asked = await state.backend.request_yield(model, [v.model for v in victims])
    now = time.time()
    for victim in victims:
        if victim.model in asked:
            logger.info(
                "pool: evicting %s for %s (idle %.0f s, %.3g GPU on node %s, priority %d, %s)",
                victim.model,
                model,
                now - victim.last_used,
                victim.fraction,
                victim.node[:12],
                victim.priority,
                reason,
            )
            state.obs.eviction(victim.model, model, reason)
            if evicted is not None:
                evicted[victim.model] = now
    return asked


async def make_room(state: GatewayState, entry: ModelEntry, models: Mapping[str, ModelEntry]) -> list[str] | None:
    """Ask idle models to yield when ``entry``'s replica is wanted but fits on no node.

    Returns:
        The models asked now; [] when it fits, or room is already being made for it; None when it
        fits on no node and nothing there can yield (every resident busy, pinned or just woken).
    """
    if entry.spec is None or entry.state is ModelState.READY or not state.spec.evict_idle_models:
        return []
    if entry.replica_nodes or entry.starting_nodes:
        return []  # placed: it holds its slice already
    capacity = await state.capacity()
    if not capacity:
        return []
    free = free_gpus(capacity, models)
    on_the_way = coming(models, entry.name)
    if any(free.get(n, 0.0) + g + EPSILON >= entry.spec.gpu_fraction for n, g in on_the_way.items()):
        return []  # its victims are on their way out
    victims = choose_victims(entry.spec.gpu_fraction, free, residents(state, models), time.time())
    if victims is None:
        return None
    if not victims:
        return []
    return await _ask(state, entry.name, victims, "pending_replica", state.room._evicted)

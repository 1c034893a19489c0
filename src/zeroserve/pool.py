"""Which idle models yield their GPU slices to a model that cannot be placed: pure logic.

The pool may hold more models than slices. When a request needs a model whose fraction fits
on no node, the gateway asks :func:`choose_victims` which resident models to scale to zero at
once. The rules (ZeroGPU's pool, as ``docs/architecture.md`` says):

- a victim is idle: nothing in flight or queued, and idle for at least its ``min_hold_s``
  (a model just woken serves its caller before it can yield);
- a victim is not pinned (``pinned: true``, or ``min_replicas >= 1``);
- victims free enough on ONE node for the waiting model's fraction (a replica cannot span
  nodes), on a node whose GPUs the waiting model may use;
- the fewest victims that free enough, and among as many, the lowest ``priority`` first,
  then the least recently used.

No Ray here, no clock: the caller passes ``now``. Unit-tested with hypothesis properties.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "EPSILON",
    "Resident",
    "RoomPlan",
    "ScaleInput",
    "Waiter",
    "choose_victims",
    "desired_replicas",
    "is_idle",
    "plan_room",
]

# Fractions are floats (0.25 + 0.25 + 0.5 == 1.0 must fit): compare with this slack.
EPSILON = 1e-9
# Subsets of more candidates than this on one node are not enumerated: the greedy order is used.
_EXACT_LIMIT = 16


@dataclass(frozen=True)
class Resident:
    """One replica holding a GPU slice, as the gateway sees it.

    Args:
        model: the model's name.
        node: the node the replica is on.
        fraction: the GPU fraction it holds.
        priority: the model's priority (lower yields first).
        last_used: when it last had work (seconds, the caller's clock; its wake counts).
        busy: requests in flight or queued for it.
        min_hold_s: the least idle time before it may yield.
        pinned: never yields.
    """

    model: str
    node: str
    fraction: float
    priority: int = 0
    last_used: float = 0.0
    busy: int = 0
    min_hold_s: float = 10.0
    pinned: bool = False


def is_idle(resident: Resident, now: float) -> bool:
    """Whether ``resident`` may yield now: not pinned, nothing to do, held long enough."""
    return not resident.pinned and resident.busy == 0 and now - resident.last_used >= resident.min_hold_s


def _order(resident: Resident) -> tuple[int, float, str]:
    return (resident.priority, resident.last_used, resident.model)


def choose_victims(
    fraction: float,
    free: Mapping[str, float],
    residents: Iterable[Resident],
    now: float,
    nodes: Sequence[str] | None = None,
) -> list[Resident] | None:
    """The residents to scale to zero so that a replica of ``fraction`` fits, or None.

    Args:
        fraction: the waiting model's GPU fraction.
        free: the GPUs free per node now.
        residents: the replicas holding slices.
        now: the caller's clock (the same as ``Resident.last_used``).
        nodes: the nodes the waiting model may use (its GPU type); None: any node in ``free``.

    Returns:
        [] when the model fits somewhere already; the victims, all on one node, when freeing
        them makes it fit; None when no choice of idle residents makes room.
    """
    allowed = list(free) if nodes is None else [n for n in nodes if n in free]
    if any(free[n] + EPSILON >= fraction for n in allowed):
        return []
    candidates: dict[str, list[Resident]] = {}
    for resident in residents:
        if resident.node in allowed and is_idle(resident, now):
            candidates.setdefault(resident.node, []).append(resident)
    best: list[Resident] | None = None
    for node, idle in candidates.items():
        chosen = _fewest(sorted(idle, key=_order), fraction - free[node])
        if chosen is not None and (best is None or _rank(chosen) < _rank(best)):
            best = chosen
    return best


def _rank(victims: list[Resident]) -> tuple[int, list[tuple[int, float, str]]]:
    return (len(victims), sorted(_order(v) for v in victims))


def _fewest(ordered: list[Resident], needed: float) -> list[Resident] | None:
    """The fewest of ``ordered`` whose fractions sum to ``needed``, the best-ordered such set."""
    if sum(r.fraction for r in ordered) + EPSILON < needed:
        return None
    if len(ordered) > _EXACT_LIMIT:
        # Too many to enumerate: the best-ordered prefix that fits, less any victim it can spare.
        chosen: list[Resident] = []
        for resident in ordered:
            chosen.append(resident)
            if sum(r.fraction for r in chosen) + EPSILON >= needed:
                break
        for resident in sorted(chosen, key=_order, reverse=True):
            if sum(r.fraction for r in chosen if r is not resident) + EPSILON >= needed:
                chosen.remove(resident)
        return chosen
    for size in range(1, len(ordered) + 1):
        fitting = [
            list(combo)
            for combo in itertools.combinations(ordered, size)
            if sum(r.fraction for r in combo) + EPSILON >= needed
        ]
        if fitting:
            return min(fitting, key=lambda combo: sorted(_order(r) for r in combo))
    return None


@dataclass(frozen=True)
class Waiter:
    """A request waiting to wake a cold model.

    Args:
        model: the cold model.
        fraction: its GPU fraction.
        priority: the request's priority (its key's tier; higher goes first).
        arrival: when it began to wait (the caller's clock).
        coming: GPUs per node already being freed for this model (its victims, asked earlier,
            still leaving).
    """

    model: str
    fraction: float
    priority: int = 0
    arrival: float = 0.0
    coming: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RoomPlan:
    """What to do for the waiting models, in their order.

    Args:
        go: the models that fit now, each with the node it fits on: call them (they wake).
        asks: the victims to ask, per waiting model that does not fit.
        blocked: the waiting models that fit nowhere and for which nothing can yield now.
    """

    go: dict[str, str]
    asks: dict[str, list[Resident]]
    blocked: list[str]


def plan_room(
    waiters: Iterable[Waiter], free: Mapping[str, float], residents: Iterable[Resident], now: float
) -> RoomPlan:
    """Hand out free GPUs and idle residents to the waiting models, best first.

    The order is the waiting requests' priority (highest first), then arrival; a model waited
    for by several requests takes the place of its best. Each model in turn takes a node it fits
    on, or the victims that make it fit (:func:`choose_victims`) among those not yet given to a
    model before it. A model whose victims are already leaving (``coming``) asks for no more
    while they and what is free on their node are enough, and holds that node's free room. Room
    that a model before could not use goes to the next (a big model that fits nowhere does not
    stop a small one that fits), but never room that is not free yet.
    """
    best: dict[str, Waiter] = {}
    for w in sorted(waiters, key=lambda w: (-w.priority, w.arrival, w.model)):
        best.setdefault(w.model, w)
    room = dict(free)
    pool = [r for r in residents if r.model not in best]
    go: dict[str, str] = {}
    asks: dict[str, list[Resident]] = {}
    blocked: list[str] = []
    for w in best.values():
        fits = [n for n in room if room[n] + EPSILON >= w.fraction]
        if fits:
            node = min(fits, key=lambda n: (room[n], n))  # the tightest fit keeps big holes whole
            room[node] -= w.fraction
            go[w.model] = node
            continue
        held = [n for n, g in w.coming.items() if room.get(n, 0.0) + g + EPSILON >= w.fraction]
        if held:
            room[held[0]] = 0.0  # its room is on the way: what is free there is part of it
            continue
        victims = choose_victims(w.fraction, room, pool, now)
        if not victims:
            blocked.append(w.model)
            continue
        asks[w.model] = victims
        # What is free on the victims' node now is part of this model's room; what the victims
        # free beyond it is not handed on before it is free (a model called on it now would wait
        # in Ray's queue and could be placed first).
        room[victims[0].node] = 0.0
        pool = [r for r in pool if r not in victims]
    return RoomPlan(go, asks, blocked)


@dataclass(frozen=True)
class ScaleInput:
    """What a model's autoscaling decision looks at (from Serve's autoscaling context).

    Args:
        current: running replicas.
        target: the current target.
        requests: requests in flight and queued, averaged over Serve's look-back window.
        target_ongoing: requests per replica the model aims at.
        idle_s: seconds since the model last had a request (0 while it has some).
        evict: the pool asked this model to yield its slice.
        idle_to_zero_s: the model's own delay before it scales to zero when idle.
        min_hold_s: the least idle time before it may yield to another model.
        pinned: never yields (it may still scale to zero after its own delay, unless min_replicas holds it).
    """

    current: int
    target: int
    requests: float
    target_ongoing: float
    idle_s: float
    evict: bool
    idle_to_zero_s: float
    min_hold_s: float
    pinned: bool = False


def desired_replicas(s: ScaleInput) -> float:
    """The replicas a model wants: Ray's queue-length rule, held at one replica until the model
    was idle for its own delay, and zero at once when the pool asked it to yield and it may.

    Serve applies its bounds and delays after this; its scale-to-zero delay is kept short,
    because this function owns the model's idle delay (a custom policy cannot shorten Serve's).
    """
    if s.current == 0:
        return float(s.target)
    if s.requests <= 0:
        if s.evict and not s.pinned and s.idle_s >= s.min_hold_s:
            return 0.0
        if s.idle_s >= s.idle_to_zero_s:
            return 0.0
    return max(1.0, s.requests / s.target_ongoing)

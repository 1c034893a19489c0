"""The pool's choice of victims, as properties over random pools (no Ray, no clock)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from zeroserve.pool import EPSILON, Resident, Waiter, choose_victims, is_idle, plan_room

NOW = 1000.0
FRACTIONS = st.sampled_from([0.125, 0.25, 0.5, 1.0])
NODES = ["a", "b"]


@st.composite
def pools(draw: st.DrawFn) -> tuple[float, dict[str, float], list[Resident]]:
    """A waiting model's fraction, the free GPUs per node, and the residents of one GPU per node."""
    residents: list[Resident] = []
    free = {}
    for node in NODES:
        left = 1.0
        for i in range(draw(st.integers(0, 8))):
            fraction = draw(FRACTIONS)
            if fraction > left + EPSILON:
                break
            left -= fraction
            residents.append(
                Resident(
                    model=f"{node}{i}",
                    node=node,
                    fraction=fraction,
                    priority=draw(st.integers(0, 2)),
                    last_used=NOW - draw(st.sampled_from([0.0, 5.0, 11.0, 60.0, 600.0])),
                    busy=draw(st.sampled_from([0, 0, 0, 1, 3])),
                    min_hold_s=10.0,
                    pinned=draw(st.booleans()) and draw(st.booleans()),
                )
            )
        free[node] = left
    return draw(FRACTIONS), free, residents


def _fits(fraction: float, free: dict[str, float], node: str, victims: list[Resident]) -> bool:
    return free[node] + sum(v.fraction for v in victims) + EPSILON >= fraction


@settings(max_examples=400, deadline=None)
@given(pools())
def test_victims_are_idle_on_one_node_and_free_enough(pool: tuple[float, dict[str, float], list[Resident]]) -> None:
    fraction, free, residents = pool
    victims = choose_victims(fraction, free, residents, NOW)
    fits_now = any(f + EPSILON >= fraction for f in free.values())
    if fits_now:
        assert victims == []
        return
    if victims is None:
        # Nothing idle on any one node frees enough.
        for node in NODES:
            idle = [r for r in residents if r.node == node and is_idle(r, NOW)]
            assert not _fits(fraction, free, node, idle)
        return
    assert victims, "a model that does not fit needs at least one victim"
    assert all(is_idle(v, NOW) and not v.pinned and v.busy == 0 for v in victims)
    assert len({v.node for v in victims}) == 1
    node = victims[0].node
    assert _fits(fraction, free, node, victims)
    # Never more victims than needed: no smaller set of idle residents fits, on any node.
    for other in NODES:
        idle = [r for r in residents if r.node == other and is_idle(r, NOW)]
        for size in range(1, len(victims)):
            assert not any(_fits(fraction, free, other, list(c)) for c in itertools.combinations(idle, size))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.floats(0, 800)), min_size=4, max_size=8, unique_by=lambda t: t[1]))
def test_equal_slices_yield_lowest_priority_then_least_recently_used(keys: list[tuple[int, float]]) -> None:
    residents = [Resident(f"m{i}", "a", 0.25, priority=p, last_used=NOW - 900 + t) for i, (p, t) in enumerate(keys[:4])]
    victims = choose_victims(0.5, {"a": 0.0}, residents, NOW)
    assert victims is not None
    expected = sorted(residents, key=lambda r: (r.priority, r.last_used))[:2]
    assert sorted(v.model for v in victims) == sorted(r.model for r in expected)


def test_a_busy_pinned_or_just_woken_model_never_yields() -> None:
    residents = [
        Resident("busy", "a", 0.25, last_used=0, busy=1),
        Resident("pinned", "a", 0.25, last_used=0, pinned=True),
        Resident("held", "a", 0.25, last_used=NOW - 9.9, min_hold_s=10),
        Resident("idle", "a", 0.25, last_used=NOW - 10, min_hold_s=10),
    ]
    assert choose_victims(0.25, {"a": 0.0}, residents, NOW) == [residents[3]]
    assert choose_victims(0.5, {"a": 0.0}, residents, NOW) is None


def test_the_fewest_victims_win_over_the_order() -> None:
    # The least recently used is small; one larger idle model alone frees enough.
    small = Resident("small", "a", 0.25, last_used=0)
    large = Resident("large", "a", 0.5, last_used=500)
    assert choose_victims(0.5, {"a": 0.25}, [small, large], NOW) == [small]
    assert choose_victims(0.75, {"a": 0.0}, [small, large], NOW) is not None
    assert choose_victims(0.5, {"a": 0.0}, [small, large], NOW) == [large]


def test_only_nodes_the_model_may_use() -> None:
    there = Resident("there", "b", 0.5, last_used=0)
    assert choose_victims(0.5, {"a": 0.0, "b": 0.0}, [there], NOW, nodes=["a"]) is None
    assert choose_victims(0.5, {"a": 0.0, "b": 0.0}, [there], NOW, nodes=["b"]) == [there]


def test_many_candidates_spare_what_is_not_needed() -> None:
    residents = [Resident(f"m{i}", "a", 0.125 if i % 2 else 0.25, last_used=i) for i in range(32)]
    victims = choose_victims(0.25, {"a": 0.0}, residents, NOW)
    assert victims is not None and sum(v.fraction for v in victims) >= 0.25
    assert all(sum(v.fraction for v in victims if v is not spared) < 0.25 for spared in victims)


def _scale(**kw: object) -> float:
    from zeroserve.pool import ScaleInput, desired_replicas

    base: dict[str, object] = dict(
        current=1,
        target=1,
        requests=0.0,
        target_ongoing=2.0,
        idle_s=0.0,
        evict=False,
        idle_to_zero_s=300.0,
        min_hold_s=10.0,
    )
    return desired_replicas(ScaleInput(**{**base, **kw}))  # type: ignore[arg-type]


def test_a_model_keeps_its_replica_until_its_own_idle_delay() -> None:
    assert _scale(idle_s=299.0) == 1.0
    assert _scale(idle_s=300.0) == 0.0
    assert _scale(requests=6.0) == 3.0  # Ray's queue-length rule above one replica
    assert _scale(current=0, target=1, requests=1.0) == 1.0  # a wake


def test_a_model_asked_to_yield_goes_at_once_when_idle_and_held_long_enough() -> None:
    assert _scale(evict=True, idle_s=10.0) == 0.0
    assert _scale(evict=True, idle_s=9.0) == 1.0  # min_hold_s: just woken, serves its caller first
    assert _scale(evict=True, idle_s=60.0, requests=0.5) == 1.0  # work in the look-back window: never
    assert _scale(evict=True, idle_s=60.0, pinned=True) == 1.0


@st.composite
def queues(draw: st.DrawFn) -> tuple[list[Waiter], dict[str, float], list[Resident]]:
    """Cold models waiting (with their requests' priorities and arrivals) over a random pool."""
    _, free, residents = draw(pools())
    waiters = [
        Waiter(
            model=f"w{i}",
            fraction=draw(FRACTIONS),
            priority=draw(st.integers(0, 2)),
            arrival=float(draw(st.integers(0, 100))),
            coming=draw(st.sampled_from([{}, {}, {"a": 0.25}, {"b": 0.5}])),
        )
        for i in range(draw(st.integers(1, 5)))
    ]
    return waiters, free, residents


@settings(max_examples=400, deadline=None)
@given(queues())
def test_room_is_handed_out_once_and_only_what_fits(
    case: tuple[list[Waiter], dict[str, float], list[Resident]],
) -> None:
    waiters, free, residents = case
    plan = plan_room(waiters, free, residents, NOW)
    by_model = {w.model: w for w in waiters}
    # What goes fits in what is free now, all of them together on their nodes.
    for node in NODES:
        taken = sum(by_model[m].fraction for m, n in plan.go.items() if n == node)
        assert taken <= free[node] + EPSILON
    # No victim is given to two models, and each model's victims are idle and free enough.
    asked = [v for victims in plan.asks.values() for v in victims]
    assert len(asked) == len(set(asked))
    for model, victims in plan.asks.items():
        assert victims and all(is_idle(v, NOW) for v in victims)
        assert len({v.node for v in victims}) == 1
        assert sum(v.fraction for v in victims) + free[victims[0].node] + EPSILON >= by_model[model].fraction
    # The first model in order whose victims already leave with enough room on their node asks for
    # no more (a later one may have to: the models before it may take that room).
    first = min(waiters, key=lambda w: (-w.priority, w.arrival, w.model))
    if any(free[n] + g + EPSILON >= first.fraction for n, g in first.coming.items()):
        assert first.model not in plan.asks
    # Each model is in at most one of go, asks, blocked.
    assert not set(plan.go) & set(plan.asks) and not set(plan.go) & set(plan.blocked)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 50)), min_size=2, max_size=6))
def test_one_slot_goes_to_the_highest_tier_then_the_first_to_arrive(keys: list[tuple[int, int]]) -> None:
    """A full GPU with one idle model: of the cold models waiting, only the best placed request's
    model may ask it to yield; the others wait."""
    residents = [Resident("idle", "a", 0.25, last_used=NOW - 600)] + [
        Resident(f"busy{i}", "a", 0.25, busy=1) for i in range(3)
    ]
    waiters = [Waiter(f"w{i}", 0.25, priority=p, arrival=float(t)) for i, (p, t) in enumerate(keys)]
    plan = plan_room(waiters, {"a": 0.0}, residents, NOW)
    best = min(waiters, key=lambda w: (-w.priority, w.arrival, w.model))
    assert list(plan.asks) == [best.model] and plan.asks[best.model][0].model == "idle"
    assert not plan.go
    assert sorted(plan.blocked) == sorted(w.model for w in waiters if w is not best)


def test_a_free_slot_goes_to_the_better_request_and_a_model_with_room_on_its_way_asks_no_more() -> None:
    free = {"a": 0.25}
    residents = [Resident("idle", "a", 0.25, last_used=NOW - 600)]
    low, high = Waiter("low", 0.25, priority=0, arrival=1.0), Waiter("high", 0.25, priority=2, arrival=5.0)
    plan = plan_room([low, high], free, residents, NOW)
    assert plan.go == {"high": "a"} and plan.asks == {"low": residents}
    # Victims already leaving for "low" cover it: nobody else is asked for it.
    plan = plan_room([Waiter("low", 0.25, coming={"a": 0.25})], {"a": 0.0}, residents, NOW)
    assert plan.go == {} and plan.asks == {} and plan.blocked == []
    # Half of a whole-GPU model's room is free and its victim frees the rest: that free half is
    # held for it, not handed to a later, lower request.
    big = Waiter("big", 1.0, priority=5, arrival=1.0, coming={"a": 0.5})
    small = Waiter("small", 0.5, priority=0, arrival=2.0)
    plan = plan_room([big, small], {"a": 0.5}, [], NOW)
    assert plan.go == {} and plan.blocked == ["small"]
    # A model waited for by several requests takes the place of its best one, once.
    plan = plan_room([low, Waiter("low", 0.25, priority=5, arrival=9.0), high], free, residents, NOW)
    assert plan.go == {"low": "a"} and plan.asks == {"high": residents}

"""What the gateway observes about each request, for metrics, the status view and logs.

The app reports events to an :class:`Observer`; the Ray layer plugs in one that exports
Prometheus metrics through Ray's metrics pipeline, and :class:`RollingStats` keeps the
recent per-model figures that ``GET /v1/zeroserve/status`` and ``zeroserve status`` show.
Label values stay bounded: configured model names, fixed route names, status codes.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["Observer", "NullObserver", "FanOut", "RollingStats", "WakeTracker"]


class Observer(Protocol):
    def request(self, model: str, route: str, status: int, seconds: float) -> None: ...

    def first_token(self, model: str, seconds: float) -> None: ...

    def per_output_token(self, model: str, seconds: float) -> None: ...

    def tokens(self, model: str, prompt: int, completion: int) -> None: ...

    def inflight(self, model: str, count: int) -> None: ...

    def cold_start(self, model: str, seconds: float) -> None: ...

    def eviction(self, victim: str, for_model: str, reason: str) -> None: ...

    def slot_wait(self, model: str, seconds: float) -> None: ...

    def rewake(self, model: str) -> None: ...

    def ledger_journal(self, pending: int) -> None: ...


class NullObserver:
    def request(self, model: str, route: str, status: int, seconds: float) -> None:
        pass

    def first_token(self, model: str, seconds: float) -> None:
        pass

    def per_output_token(self, model: str, seconds: float) -> None:
        pass

    def tokens(self, model: str, prompt: int, completion: int) -> None:
        pass

    def inflight(self, model: str, count: int) -> None:
        pass

    def cold_start(self, model: str, seconds: float) -> None:
        pass

    def eviction(self, victim: str, for_model: str, reason: str) -> None:
        pass

    def slot_wait(self, model: str, seconds: float) -> None:
        pass

    def rewake(self, model: str) -> None:
        pass

    def ledger_journal(self, pending: int) -> None:
        pass


class FanOut:
    """Report every event to several observers."""

    def __init__(self, *observers: Any) -> None:
        self.observers = observers

    def __getattr__(self, name: str) -> Callable[..., None]:
        def call(*args: Any) -> None:
            for o in self.observers:
                getattr(o, name)(*args)

        return call


@dataclass
class _ModelStats:
    requests: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=2048))
    cold_starts: deque[float] = field(default_factory=lambda: deque(maxlen=64))
    last_request: float | None = None


class RollingStats(NullObserver):
    """Recent figures per model: last request, requests per minute, p50s.

    Args:
        clock: wall-clock seconds (injectable for tests).
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.models: dict[str, _ModelStats] = defaultdict(_ModelStats)

    def request(self, model: str, route: str, status: int, seconds: float) -> None:
        stats = self.models[model]
        now = self.clock()
        stats.last_request = now
        stats.requests.append((now, seconds))

    def cold_start(self, model: str, seconds: float) -> None:
        self.models[model].cold_starts.append(seconds)

    def summary(self, model: str) -> dict[str, Any]:
        stats = self.models.get(model)
        if stats is None:
            return {"last_request": None, "requests_per_min": 0, "p50_latency_s": None, "cold_start_p50_s": None}
        now = self.clock()
        recent = [lat for t, lat in stats.requests if now - t <= 60]
        latencies = [lat for _, lat in stats.requests]
        return {
            "last_request": stats.last_request,
            "requests_per_min": len(recent),
            "p50_latency_s": statistics.median(latencies) if latencies else None,
            "cold_start_p50_s": statistics.median(stats.cold_starts) if stats.cold_starts else None,
        }


class WakeTracker:
    """Counts one cold start per wake of a model, however many requests waited for it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.waking: dict[str, float] = {}

    def begin(self, model: str) -> None:
        self.waking.setdefault(model, self.clock())

    def end(self, model: str) -> float | None:
        """The wake's duration if this is its first answer, else None."""
        started = self.waking.pop(model, None)
        return None if started is None else self.clock() - started

    def abandon(self, model: str) -> None:
        self.waking.pop(model, None)

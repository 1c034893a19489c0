from __future__ import annotations

from zeroserve.gateway.telemetry import RollingStats, WakeTracker
from zeroserve.quota import SharedMeter


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_rolling_stats_with_a_fake_clock() -> None:
    clock = Clock()
    stats = RollingStats(clock)
    stats.request("m", "chat", 200, 0.5)
    clock.t += 30
    stats.request("m", "chat", 200, 1.5)
    stats.request("m", "chat", 500, 2.5)
    stats.cold_start("m", 7.0)
    clock.t += 45  # the first request is now over a minute old
    s = stats.summary("m")
    assert s == {"last_request": 1030.0, "requests_per_min": 2, "p50_latency_s": 1.5, "cold_start_p50_s": 7.0}
    assert stats.summary("other")["requests_per_min"] == 0


def test_one_cold_start_per_wake() -> None:
    clock = Clock()
    wakes = WakeTracker(clock)
    wakes.begin("m")
    clock.t += 3
    wakes.begin("m")  # a second request waiting for the same wake
    clock.t += 4
    assert wakes.end("m") == 7.0
    assert wakes.end("m") is None


def test_busy_time_counts_overlap_once() -> None:
    clock = Clock()
    spans: list[float] = []
    busy = SharedMeter(clock, on_busy=spans.append)
    first = busy.enter()
    clock.t += 1
    second = busy.enter()
    clock.t += 2
    busy.exit(second)
    clock.t += 1
    busy.exit(first)
    assert sum(spans) == 4.0  # reported as it goes: 1 + 2 + 1

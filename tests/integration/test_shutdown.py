"""Stopping the pool lets the answers in flight finish (``make stop`` = ``stop_local``)."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest

from zeroserve.cluster import read_cluster, stop_local
from zeroserve.loadgen import judge_sse

from .conftest import WARM, Pool, wait_for

GEN = "tiny-llama"


@pytest.mark.stops_cluster
def test_stop_lets_streams_in_flight_finish(pool: Pool) -> None:
    pool.deploy(pool.config(pool.models(GEN, autoscaling=WARM)))
    wait_for(lambda: pool.running_replica_ids(GEN), 120, f"{GEN} warm")

    first_chunk = threading.Barrier(4)
    verdicts: list[tuple[str, str]] = []
    finished: list[float] = []

    def stream() -> None:
        body: dict[str, Any] = {
            "model": GEN,
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 256,
            "stream": True,
        }
        lines: list[str] = []
        try:
            with httpx.stream("POST", f"{pool.base_url}/v1/chat/completions", json=body, timeout=120) as resp:
                assert resp.status_code == 200
                for line in resp.iter_lines():
                    lines.append(line)
                    if line.startswith("data:") and sum(x.startswith("data:") for x in lines) == 1:
                        first_chunk.wait(timeout=60)
        except httpx.HTTPError as err:
            verdicts.append(("lost", f"{type(err).__name__}"))
            return
        finally:
            finished.append(time.monotonic())
        verdicts.append(judge_sse(lines))

    threads = [threading.Thread(target=stream) for _ in range(3)]
    for t in threads:
        t.start()
    first_chunk.wait(timeout=60)  # three streams are under way
    started = time.monotonic()
    assert stop_local(pool.run_dir, drain_s=90)
    took = time.monotonic() - started
    for t in threads:
        t.join(timeout=120)
    assert verdicts == [("ok", "")] * 3, verdicts
    assert max(finished) > started, "no stream was still in flight when the stop began"
    assert read_cluster(pool.run_dir) is None
    assert took < 120, f"stopping took {took:.0f} s"

"""Stopping the pool lets the answers in flight finish (``make stop`` = ``stop_local``)."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest

from zeroserve import cluster as cluster_module
from zeroserve.cluster import read_cluster, stop_local
from zeroserve.loadgen import judge_sse

from .conftest import WARM, Pool, wait_for

# vLLM's ignore_eos keeps each stream going for hundreds of tokens (most of a second here),
# so a drain that returned early would show; the tiny transformers model stops after a few.
LLM = "tiny-llama-vllm"


@pytest.mark.stops_cluster
def test_stop_lets_streams_in_flight_finish(pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    pool.deploy(pool.config(pool.models(LLM, autoscaling=WARM)))
    wait_for(lambda: pool.running_replica_ids(LLM), 180, f"{LLM} warm")

    first_chunk = threading.Barrier(4)
    verdicts: list[tuple[str, str]] = []
    finished: list[float] = []

    def stream() -> None:
        body: dict[str, Any] = {
            "model": LLM,
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 256,
            "ignore_eos": True,
            "stream": True,
        }
        lines: list[str] = []
        try:
            with httpx.stream("POST", f"{pool.base_url}/v1/chat/completions", json=body, timeout=120) as resp:
                assert resp.status_code == 200, resp.read()
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

    # The real drain, its return noted: every stream must have ended by then.
    drained: list[float] = []
    drain_gateway = cluster_module.drain_gateway

    def drain_and_note(*args: Any, **kwargs: Any) -> float | None:
        took = drain_gateway(*args, **kwargs)
        drained.append(time.monotonic())
        return took

    monkeypatch.setattr(cluster_module, "drain_gateway", drain_and_note)

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
    assert drained and max(finished) <= drained[0], "the gateway was called drained before its streams ended"
    assert read_cluster(pool.run_dir) is None
    assert took < 120, f"stopping took {took:.0f} s"

"""Metrics through Ray's pipeline with exact counts, the Grafana dashboard against a live
scrape, `zeroserve status --json`, request ids and SSE comments while a model wakes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from .conftest import Pool, wait_for

ROOT = Path(__file__).resolve().parents[2]
EMB, GEN = "all-MiniLM-L6-v2", "tiny-llama"
SAMPLE_RE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")
LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(pool: Pool) -> str:
    return httpx.get(pool.cluster.metrics_url, timeout=10).text


def value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (Ray adds its own)."""
    total = 0.0
    for line in text.splitlines():
        m = SAMPLE_RE.match(line)
        if not m or m.group("name") != name:
            continue
        got = dict(LABEL_RE.findall(m.group("labels") or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group("value"))
    return total


@pytest.fixture(scope="module")
def obs_pool(pool: Pool) -> Pool:
    models = pool.models(EMB, GEN)
    big = {
        "task": "classify",
        "model": "./models/tiny-sentiment",
        "gpu_fraction": 1.0,
        "num_cpus": 0.05,
        "cold_start_timeout_s": 25,
    }
    # Eviction off: a model that fits nowhere is called at once and waits in Ray's queue, so the
    # status view shows it "starting" (with eviction on it would wait uncalled in the gateway).
    pool.deploy(pool.config({**models, "whole-gpu": big}, keepalive_s=1.0, evict_idle_models=False))
    wait_for(lambda: not pool.replicas(EMB) and not pool.replicas(GEN), 90, "both models at zero")
    return pool


def _await_metrics(pool: Pool, check: Callable[[str], bool], what: str) -> str:
    return wait_for(lambda: (t := scrape(pool)) and check(t) and t, 60, what, interval_s=1)  # type: ignore[no-any-return]


def test_known_sequence_gives_exact_metrics(obs_pool: Pool) -> None:
    pool = obs_pool
    before = scrape(pool)
    client = pool.openai(timeout=120)
    emb = client.embeddings.create(model=EMB, input=["hello world", "a second sentence"])  # a cold start
    with pytest.raises(Exception):  # noqa: B017 - an error: embeddings on a generator
        client.embeddings.create(model=GEN, input="x")
    # A streamed chat to the cold generator: SSE comments arrive while it wakes, then tokens.
    lines = []
    with httpx.stream(
        "POST",
        f"{pool.base_url}/v1/chat/completions",
        timeout=120,
        headers={"x-request-id": "obs-test-1"},
        json={
            "model": GEN,
            "messages": [{"role": "user", "content": "Hello!"}],
            "max_tokens": 8,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as resp:
        assert resp.status_code == 200 and resp.headers["x-request-id"] == "obs-test-1"
        lines = [ln for ln in resp.iter_lines() if ln]
    assert any(ln.startswith(": waiting for model 'tiny-llama' to wake") for ln in lines)
    assert lines[-1] == "data: [DONE]"
    usage = json.loads(lines[-2][6:])["usage"]

    def delta(text: str, name: str, **labels: str) -> float:
        return value(text, name, **labels) - value(before, name, **labels)

    expected = {
        ("ray_zeroserve_requests_total", (("model", EMB), ("route", "embeddings"), ("status", "200"))): 1,
        ("ray_zeroserve_requests_total", (("model", GEN), ("route", "embeddings"), ("status", "400"))): 1,
        ("ray_zeroserve_requests_total", (("model", GEN), ("route", "chat"), ("status", "200"))): 1,
        ("ray_zeroserve_cold_starts_total", (("model", EMB),)): 1,
        ("ray_zeroserve_cold_starts_total", (("model", GEN),)): 1,
        ("ray_zeroserve_time_to_first_token_seconds_count", (("model", GEN),)): 1,
        ("ray_zeroserve_request_duration_seconds_count", (("model", EMB), ("route", "embeddings"))): 1,
        ("ray_zeroserve_tokens_total", (("model", EMB), ("kind", "prompt"))): emb.usage.prompt_tokens,
        ("ray_zeroserve_tokens_total", (("model", GEN), ("kind", "prompt"))): usage["prompt_tokens"],
        ("ray_zeroserve_tokens_total", (("model", GEN), ("kind", "completion"))): usage["completion_tokens"],
    }

    def matches(text: str) -> bool:
        return all(delta(text, name, **dict(labels)) == want for (name, labels), want in expected.items())

    text = _await_metrics(pool, matches, "the exact metric counts")
    assert value(text, "ray_zeroserve_gpu_seconds_total", model=EMB) > 0
    text = _await_metrics(
        pool, lambda t: value(t, "ray_zeroserve_model_state", model=GEN, state="ready") == 1, "the ready state gauge"
    )
    assert value(text, "ray_zeroserve_model_state", model=GEN, state="cold") == 0
    # Label values stay bounded: no prompt text, no request id, unknown models pooled.
    assert "hello world" not in text and "obs-test-1" not in text


def test_grafana_dashboard_queries_exported_metrics(obs_pool: Pool) -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "zeroserve-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    names = {n for e in exprs for n in re.findall(r"\bray_zeroserve_[a-z_]+", e)}
    assert len(names) >= 10
    client = obs_pool.openai(timeout=120)
    client.chat.completions.create(
        model=GEN, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True
    ).close()
    client.embeddings.create(model=EMB, input="x")

    def all_exported(text: str) -> bool:
        exported = {m.group("name") for ln in text.splitlines() if (m := SAMPLE_RE.match(ln))}
        return names <= exported

    _await_metrics(obs_pool, all_exported, f"every dashboard metric in the scrape: {sorted(names)}")


def _status_json(pool: Pool) -> dict[str, dict[str, object]]:
    out = subprocess.run(
        [sys.executable, "-m", "zeroserve.cli", "status", "--json", "--url", pool.base_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return {m["id"]: m for m in json.loads(out.stdout)["models"]}


def test_status_json_shows_cold_starting_and_ready(obs_pool: Pool) -> None:
    pool = obs_pool
    wait_for(lambda: not pool.replicas(GEN), 90, f"{GEN} at zero")
    client = pool.openai(timeout=120)
    client.embeddings.create(model=EMB, input="x")  # EMB ready, holding a quarter of the GPU
    stop = threading.Event()

    def keep_awake() -> None:
        while not stop.wait(1.0):
            client.embeddings.create(model=EMB, input="x")

    # "whole-gpu" asks for the whole logical GPU, a quarter of which EMB holds: it stays
    # starting until its request gives up.
    threads = [
        threading.Thread(target=keep_awake),
        threading.Thread(
            target=lambda: httpx.post(
                f"{pool.base_url}/v1/classify", json={"model": "whole-gpu", "input": "x"}, timeout=60
            )
        ),
    ]
    for t in threads:
        t.start()
    try:
        wait_for(
            lambda: _status_json(pool)["whole-gpu"]["state"] == "starting", 20, "whole-gpu starting", interval_s=0.5
        )
        status = _status_json(pool)
        assert status[EMB]["state"] == "ready" and status[EMB]["replicas"] == 1
        assert status[EMB]["last_request"] is not None and status[EMB]["requests_per_min"] >= 1
        assert status[GEN]["state"] == "cold" and status[GEN]["replicas"] == 0
        assert status["whole-gpu"]["state"] == "starting"
    finally:
        stop.set()
        for t in threads:
            t.join()

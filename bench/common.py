"""Shared set-up for the benchmarks: a private local cluster and the demo config."""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from zeroserve.cluster import LocalCluster, free_port, start_local, stop_local  # noqa: E402
from zeroserve.config import ModelSpec, load_serve_config  # noqa: E402


def machine() -> str:
    import ray
    import torch
    import transformers

    cpu = subprocess.run(
        ["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True
    ).stdout.strip()
    return (
        f"{platform.node()}: {cpu}, {subprocess.getoutput('nproc')} cores; Python "
        f"{platform.python_version()}, ray {ray.__version__}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}; {time.strftime('%Y-%m-%d')}"
    )


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summary(name: str, values_ms: list[float]) -> str:
    return (
        f"| {name} | {len(values_ms)} | {statistics.median(values_ms):.2f} | "
        f"{pct(values_ms, 99):.2f} | {statistics.mean(values_ms):.2f} |"
    )


@contextmanager
def cluster(env: dict[str, str] | None = None, joinable: bool = False) -> Iterator[tuple[LocalCluster, int]]:
    """A local cluster for one benchmark (``env``: more environment for Ray and its workers;
    ``joinable``: not loopback only, so that ``add_node`` can join more nodes to it)."""
    run_dir = ROOT / ".run-bench"
    c = start_local(
        run_dir,
        num_gpus=1,
        loopback_only=not joinable,
        env={
            "ZEROSERVE_HOME": str(ROOT),
            "HF_HUB_OFFLINE": "1",
            "ZEROSERVE_LOG_LEVEL": "WARNING",
            "RAY_metrics_report_interval_ms": "1000",  # metrics read by the benchmarks are current
            **(env or {}),
        },
    )
    try:
        yield c, free_port()
    finally:
        stop_local(run_dir)


def demo_config(port: int, autoscaling: dict[str, Any] | None = None, only: Collection[str] = ()) -> dict[str, Any]:
    """The demo config on ``port``, API keys off; ``only``: the gateway and just these models.

    The demo's keys are off here: these figures are of serving, and bench/quota_overhead.py
    measures what keys and the ledger add (it turns them on itself).
    """
    cfg = copy.deepcopy(load_serve_config(ROOT / "serve_config.demo.yaml"))
    cfg["http_options"] = {"host": "127.0.0.1", "port": port}
    gateway, *models = cfg["applications"]
    gateway["args"] = {**gateway["args"], "auth": {"enabled": False}}
    cfg["applications"] = [gateway, *(a for a in models if not only or a["name"] in only)]
    for app in cfg["applications"][1:]:
        app["args"]["autoscaling"] = {**app["args"].get("autoscaling", {}), **(autoscaling or {})}
    return cfg


def deploy(c: LocalCluster, cfg: dict[str, Any], port: int, timeout_s: float = 300) -> None:
    httpx.put(f"{c.dashboard_url}/api/serve/applications/", json=cfg, timeout=60).raise_for_status()
    wait(lambda: httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200, timeout_s)


def wait(cond: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except Exception:  # noqa: BLE001
            pass
        time.sleep(0.2)
    raise TimeoutError("condition not met")


EMBED_BODY = {"model": "all-MiniLM-L6-v2", "input": "A man is eating a piece of bread.", "encoding_format": "float"}


def embedding_latencies(
    port: int, n: int, headers: dict[str, str] | None = None, ready: Callable[[httpx.Response], bool] | None = None
) -> list[float]:
    """Milliseconds of ``n`` sequential MiniLM embedding requests through the gateway, after
    waiting until ``ready`` accepts an answer (a redeployed gateway has taken over) and 30
    warm-up requests."""
    http = httpx.Client(timeout=120, headers=headers or {})
    url = f"http://127.0.0.1:{port}/v1/embeddings"
    if ready is not None:
        wait(lambda: ready(http.post(url, json=EMBED_BODY)), 120)
    for _ in range(30):
        http.post(url, json=EMBED_BODY).raise_for_status()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        http.post(url, json=EMBED_BODY).raise_for_status()
        out.append((time.perf_counter() - t) * 1000)
    return out


@contextmanager
def worktree(ref: str, where: Path) -> Iterator[Path]:
    """A detached checkout of ``ref`` at ``where`` for the duration (another commit's code)."""
    subprocess.run(["git", "worktree", "add", "--detach", str(where), ref], cwd=ROOT, check=True, capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=ROOT, check=False)


def alternating(rounds: int, first: str, second: str) -> Iterator[tuple[int, str]]:
    """(round, side) for two sides measured in turn, their order swapped every round so that a
    drift of the machine hits both alike."""
    for r in range(rounds):
        for side in (first, second) if r % 2 == 0 else (second, first):
            yield r, side


def chosen(parser: argparse.ArgumentParser, value: str, choices: Collection[str], what: str) -> list[str]:
    """The comma-separated ``value``, each one of ``choices``, in its order (the parser exits on
    an unknown one, naming ``what`` it lists)."""
    picked = [v for v in value.split(",") if v]
    if unknown := set(picked) - set(choices):
        parser.error(f"unknown {what}: {sorted(unknown)}")
    return picked


def head_commit() -> str:
    """This tree's commit, short (what a figure was measured on), marked when the code that runs
    (src, deployments, bench) differs from it."""
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "src", "deployments", "bench"], cwd=ROOT, capture_output=True, text=True
    )
    return (out.stdout.strip() or "unknown") + (" with uncommitted changes" if dirty.stdout.strip() else "")


def publish(section: str, lines: list[str], write: bool = True) -> None:
    """Print a benchmark's figures and (unless ``write`` is off) put them in their section of
    docs/benchmarks.md."""
    text = "\n".join(lines)
    print(text)
    if write:
        write_section(ROOT / "docs" / "benchmarks.md", section, text)


def write_section(path: Path, name: str, text: str) -> None:
    """Replace the text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``path``
    (appending the markers if they are missing): benchmarks rewrite their own figures only."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    doc = path.read_text() if path.exists() else ""
    block = f"{begin}\n{text.strip()}\n{end}"
    if begin in doc and end in doc:
        doc = doc[: doc.index(begin)] + block + doc[doc.index(end) + len(end) :]
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    path.write_text(doc)


@contextmanager
def vllm_server(
    spec: ModelSpec, name: str, source: str, env: dict[str, str] | None = None, niceness: int = 0
) -> Iterator[tuple[str, float]]:
    """vLLM's own OpenAI server (a subprocess on loopback) with the engine arguments zeroserve
    gives vLLM for ``spec``: its base URL and when it was launched (``time.perf_counter()``).
    Stopped on exit."""
    from zeroserve.engines.vllm_engine import vllm_cli_args

    assert spec.vllm is not None
    port = free_port()
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": f"{spec.vllm.cpu_kv_cache_space_gb:g}",
        "HF_HUB_OFFLINE": "1",
        **(env or {}),
    }
    argv = vllm_cli_args(spec, name, source, cuda=False, total_bytes=None)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *argv, "--host", "127.0.0.1"]
    launched = time.perf_counter()
    nice = ["nice", "-n", str(niceness)] if niceness else []
    proc = subprocess.Popen(
        [*nice, *cmd, "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield f"http://127.0.0.1:{port}", launched
    finally:
        proc.terminate()
        proc.wait(60)

"""Start and stop one local Ray cluster by its own process group, never a bare ``ray stop``.

``ray stop`` stops every Ray process on the machine, other people's too. zeroserve
starts its head with ``ray start --head --block`` in a new session and records the
session's id; stopping signals that process group only. Used by ``make run``/``make
stop`` and by the integration tests' session fixture.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["LocalCluster", "add_node", "free_port", "kill_node", "read_cluster", "start_local", "stop_local"]


@dataclass(frozen=True)
class LocalCluster:
    pid: int
    gcs_port: int
    dashboard_port: int
    temp_dir: str
    metrics_port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def metrics_url(self) -> str:
        """The head node's Prometheus endpoint (Ray's metrics and zeroserve's, prefixed ray_)."""
        return f"http://127.0.0.1:{self.metrics_port}/metrics"


def free_port() -> int:
    """A TCP port that is free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_cluster(run_dir: Path) -> LocalCluster | None:
    """The cluster recorded in ``run_dir``, if its process is still alive."""
    state = run_dir / "cluster.json"
    if not state.is_file():
        return None
    cluster = LocalCluster(**json.loads(state.read_text()))
    return cluster if _alive(cluster.pid) else None


def start_local(
    run_dir: Path,
    *,
    num_gpus: int = 1,
    num_cpus: int | None = None,
    gcs_port: int | None = None,
    dashboard_port: int | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 120,
) -> LocalCluster:
    """Start a Ray head on loopback with logical GPUs; return once the dashboard answers.

    Args:
        run_dir: where the pid file, temp dir and log go (``.run`` for ``make run``).
        num_gpus: logical GPUs (whole): placement by fraction is real even without CUDA.
        num_cpus: logical CPUs; Ray's default is the core count.
        env: extra environment for Ray and every worker it starts.

    Raises:
        RuntimeError: the head did not come up in time (its log's tail is in the message).
    """
    existing = read_cluster(run_dir)
    if existing is not None:
        return existing
    run_dir.mkdir(parents=True, exist_ok=True)
    # Ray's socket paths must stay under 107 bytes, so the temp dir is short and in /tmp.
    temp_dir = f"/tmp/zs-{os.getpid()}-{int(time.time())}"
    gcs_port = gcs_port or free_port()
    dashboard_port = dashboard_port or free_port()
    metrics_port = free_port()
    ray = Path(sys.executable).with_name("ray")
    cmd = [
        str(ray),
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(gcs_port),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard_port),
        "--num-gpus",
        str(num_gpus),  # an integer: ray start refuses "1.0"
        "--temp-dir",
        temp_dir,
        "--disable-usage-stats",
        "--include-dashboard",
        "true",
        "--metrics-export-port",
        str(metrics_port),
    ]
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    full_env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    log = open(run_dir / "ray.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    cluster = LocalCluster(proc.pid, gcs_port, dashboard_port, temp_dir, metrics_port)
    (run_dir / "cluster.json").write_text(json.dumps(asdict(cluster)))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"{cluster.dashboard_url}/api/version", timeout=2):
                return cluster
        except OSError:
            time.sleep(0.5)
    tail = (run_dir / "ray.log").read_text(errors="replace")[-2000:]
    stop_local(run_dir)
    raise RuntimeError(f"the Ray head did not start within {timeout_s:.0f} s:\n{tail}")


def add_node(
    run_dir: Path,
    cluster: LocalCluster,
    *,
    num_gpus: int = 1,
    num_cpus: int | None = None,
    env: dict[str, str] | None = None,
) -> int:
    """Join one more Ray node (its own raylet, with logical GPUs) to a local cluster.

    Several nodes on one machine stand in for a multi-node cluster. The node runs in its own
    process group, recorded in ``run_dir`` so that :func:`stop_local` stops it too.

    Returns:
        The node's process-group id (for :func:`kill_node`).
    """
    ray = Path(sys.executable).with_name("ray")
    cmd = [
        str(ray),
        "start",
        "--address",
        cluster.address,
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--num-gpus",
        str(num_gpus),
        "--disable-usage-stats",
    ]
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    full_env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    log = open(run_dir / "ray-node.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    with open(run_dir / "nodes.txt", "a") as f:
        f.write(f"{proc.pid}\n")
    return proc.pid


def kill_node(pgid: int) -> None:
    """Kill a node abruptly (SIGKILL to its process group), as a lost machine would go."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop_local(run_dir: Path, grace_s: float = 10) -> bool:
    """Stop the cluster recorded in ``run_dir`` (its process groups only).

    Returns:
        True if a cluster was running.
    """
    nodes = run_dir / "nodes.txt"
    if nodes.is_file():
        for line in nodes.read_text().split():
            _stop_group(int(line), grace_s)
        nodes.unlink()
    state = run_dir / "cluster.json"
    if not state.is_file():
        return False
    cluster = LocalCluster(**json.loads(state.read_text()))
    was_running = _alive(cluster.pid)
    _stop_group(cluster.pid, grace_s)
    state.unlink(missing_ok=True)
    return was_running


def _stop_group(pgid: int, grace_s: float) -> None:
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _group_alive(pgid):
            time.sleep(0.2)
        if not _group_alive(pgid):
            return


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True

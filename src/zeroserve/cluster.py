"""Start and stop one local Ray cluster by its own session, never a bare ``ray stop``.

``ray stop`` stops every Ray process on the machine, other people's too. zeroserve
starts its head with ``ray start --head --block`` in a new session and records the
session's id; stopping signals that session's processes only. Used by ``make run``/``make
stop`` and by the integration tests' session fixture.

**Loopback only by default.** ``--node-ip-address 127.0.0.1`` alone is not enough: on
Linux ``ray start`` swaps a loopback address for the machine's own IP
(``services.resolve_ip_for_localhost``, called from Ray's ``scripts.py``), and Ray's
servers then listen on all interfaces. With ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` Ray
keeps ``127.0.0.1`` as the node IP (its default mode on macOS and Windows), and the
servers that choose their address from the node IP listen on loopback: GCS, raylet,
object manager, core workers, dashboard agent, runtime-env agent, metrics export, client
server. Each Ray Serve replica's inter-deployment gRPC server stays on all interfaces
whatever the flags (``[::]:0`` in Ray 2.60's ``serve/_private/replica.py``); the Serve
proxy listens where ``http_options.host`` says. See docs/security.md. Such a head takes
no other nodes (Ray refuses ``ray start --address`` in that mode), so :func:`add_node`
needs ``start_local(..., loopback_only=False)``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "LOOPBACK_ENV",
    "RAY_ENV",
    "LocalCluster",
    "add_node",
    "drain_gateway",
    "free_port",
    "head_command",
    "kill_node",
    "local_redis",
    "one_hop_env",
    "RedisServer",
    "ray_env",
    "read_cluster",
    "start_local",
    "stop_local",
]

#: Ray's switch for multi-node clusters (``ray_constants.ENABLE_RAY_CLUSTER``, read when
#: ``ray`` is imported). "0" keeps a loopback node IP as it is instead of replacing it with
#: the machine's IP, in ``ray start`` and in ``ray.init(address=...)`` alike.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

logger = logging.getLogger("zeroserve.cluster")


@dataclass(frozen=True)
class LocalCluster:
    pid: int
    gcs_port: int
    dashboard_port: int
    temp_dir: str
    metrics_port: int = 0
    loopback_only: bool = False  # records written before this field existed were not
    one_hop: bool = False  # HAProxy in front of the gateway replicas (see one_hop_env)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def driver_env(self) -> dict[str, str]:
        """Environment a driver process needs for ``ray.init(address=cluster.address)``.

        Set it before ``import ray``: otherwise Ray replaces ``127.0.0.1`` in the address
        with the machine's IP, where a loopback-only GCS does not listen.
        """
        return {LOOPBACK_ENV: "0"} if self.loopback_only else {}

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def metrics_url(self) -> str:
        """The head node's Prometheus endpoint (Ray's metrics and zeroserve's, prefixed ray_)."""
        return f"http://127.0.0.1:{self.metrics_port}/metrics"


# The environment of every Ray process zeroserve starts (head and extra nodes).
RAY_ENV = {
    # Local clusters run without Ray's token auth: a stale ~/.ray/auth_token would switch it on.
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Every Serve proxy answers a request whose gateway replica died with a 503 + Retry-After
    # (or an SSE error event), never a bare 500 or a cut stream: see zeroserve.proxy.
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "zeroserve.proxy:middlewares",
}


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


def head_command(
    ray: str,
    *,
    gcs_port: int,
    dashboard_port: int,
    metrics_port: int,
    client_server_port: int,
    temp_dir: str,
    num_gpus: int = 1,
    num_cpus: int | None = None,
) -> list[str]:
    """The ``ray start --head`` command line of a local head (pure: nothing is started).

    Every address in it is 127.0.0.1; with :func:`ray_env`'s ``loopback_only`` the node IP
    stays so, and the servers that follow the node IP listen on loopback only.
    """
    cmd = [
        ray,
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
        # The client server always runs on a head where grpc is installed (Ray refuses port
        # 0); a free port instead of the fixed 10001 lets two local clusters coexist.
        "--ray-client-server-port",
        str(client_server_port),
    ]
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    return cmd


def ray_env(base: Mapping[str, str], extra: Mapping[str, str] | None = None, *, loopback_only: bool) -> dict[str, str]:
    """The environment of a ``ray start`` (and so of every Ray process it starts).

    Args:
        base: usually ``os.environ``.
        extra: more variables; they override :data:`RAY_ENV` but not ``loopback_only``.
        loopback_only: keep the node IP on 127.0.0.1 (:data:`LOOPBACK_ENV` = "0"); "1"
            otherwise, so that an inherited "0" cannot make a joinable cluster refuse nodes.
    """
    return {**base, **RAY_ENV, **(extra or {}), LOOPBACK_ENV: "0" if loopback_only else "1"}


def one_hop_env() -> dict[str, str]:
    """The environment of Ray 2.60's one-hop path, as zeroserve runs it (docs/architecture.md, "One hop").

    Direct ingress (each gateway replica serves HTTP itself) behind Ray's HAProxy, which takes
    the configured host and port and forwards to the gateway replicas: one hop between the client
    and the gateway's code instead of two. HAProxy is zeroserve's shim
    (:mod:`zeroserve.haproxy_shim`: every frontend on the configured host, a 503 with
    ``Retry-After`` for HAProxy's own errors), and its files and its stats and metrics ports are
    this cluster's own (Ray's defaults are fixed paths in /tmp and fixed ports, which two local
    clusters would share).
    """
    stats_port = free_port()
    # Short: Ray puts a 56-character folder per HAProxy actor under it, and HAProxy refuses an
    # admin socket path over 97 bytes. The stats port (free, so unused by another cluster now)
    # names it.
    haproxy = f"/tmp/zsh-{stats_port}"
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(Path(sys.executable).with_name("zeroserve-haproxy")),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{haproxy}/haproxy.cfg",
        "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{haproxy}/admin.sock",
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": haproxy,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{haproxy}/server-state",
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats_port),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
    }


def start_local(
    run_dir: Path,
    *,
    num_gpus: int = 1,
    num_cpus: int | None = None,
    gcs_port: int | None = None,
    dashboard_port: int | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 120,
    loopback_only: bool = True,
    one_hop: bool = False,
) -> LocalCluster:
    """Start a Ray head with logical GPUs; return once the dashboard answers.

    Args:
        run_dir: where the pid file, temp dir and log go (``.run`` for ``make run``).
        num_gpus: logical GPUs (whole): placement by fraction is real even without CUDA.
        num_cpus: logical CPUs; Ray's default is the core count.
        env: extra environment for Ray and every worker it starts.
        loopback_only: Ray's servers listen on 127.0.0.1 only (the module docstring names
            the exceptions) and the head takes no other nodes; a driver then needs
            :attr:`LocalCluster.driver_env`. False: the node IP is the machine's and Ray's
            servers listen on all interfaces, so that :func:`add_node` can join nodes.
        one_hop: the gateway is reached through HAProxy and direct ingress (:func:`one_hop_env`)
            instead of Serve's Python proxy: less latency, and a stream cut short with no error
            event when a gateway replica dies mid-answer.

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
    cmd = head_command(
        str(Path(sys.executable).with_name("ray")),
        gcs_port=gcs_port,
        dashboard_port=dashboard_port,
        metrics_port=metrics_port,
        client_server_port=free_port(),
        temp_dir=temp_dir,
        num_gpus=num_gpus,
        num_cpus=num_cpus,
    )
    extra = {**(one_hop_env() if one_hop else {}), **(env or {})}
    full_env = ray_env(os.environ, extra, loopback_only=loopback_only)
    log = open(run_dir / "ray.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    cluster = LocalCluster(proc.pid, gcs_port, dashboard_port, temp_dir, metrics_port, loopback_only, one_hop)
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
    process group, recorded in ``run_dir`` so that :func:`stop_local` stops it too. On a one-hop
    cluster (``start_local(..., one_hop=True)``) the node gets the one-hop environment too.

    Returns:
        The node's process-group id (for :func:`kill_node`).

    Raises:
        RuntimeError: the cluster listens on loopback only: Ray refuses to join a node to
            it (and the address a joining node would use has no GCS behind it).
    """
    if cluster.loopback_only:
        raise RuntimeError(
            "this local cluster listens on loopback only and cannot take more nodes: "
            "start it with start_local(..., loopback_only=False) to add nodes"
        )
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
    # A gateway replica reads direct ingress from its own process's environment, so on a one-hop
    # cluster every node needs it (else a replica placed here would not serve HTTP), with HAProxy
    # files and ports of its own in case Serve runs one here.
    extra = {**(one_hop_env() if cluster.one_hop else {}), **(env or {})}
    full_env = ray_env(os.environ, extra, loopback_only=False)
    log = open(run_dir / "ray-node.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    with open(run_dir / "nodes.txt", "a") as f:
        f.write(f"{proc.pid}\n")
    return proc.pid


def kill_node(sid: int) -> None:
    """Lose a node as a machine loss would: SIGKILL to every process of it at once.

    ``sid`` is the node's session (its ``ray start``, from :func:`add_node`). Ray gives each
    worker a process group of its own, but they all stay in the node's session, so the
    raylet, its workers (model replicas, warm copies) and their children all go together.
    """
    for _ in range(10):  # a process forked meanwhile is caught by the next pass
        pids = _session_pids(sid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def drain_gateway(cluster: LocalCluster, timeout_s: float = 120) -> float | None:
    """Take the gateway out of service gracefully; return how long it took (None: no gateway).

    The gateway application alone is removed (the models and Serve's proxies stay): Serve
    routes no new request to it (those get the proxy's 404: the pool is stopping), and each
    gateway replica finishes the requests it holds, streams included, within its
    ``shutdown_grace_s`` before it exits. Only then is the cluster stopped, so stopping does
    not cut anyone's answer short.

    Raises:
        TimeoutError: the gateway was still there after ``timeout_s``.
    """
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient  # what `serve deploy` uses

    from zeroserve.config import GATEWAY_BUILDER

    def gateways(details: dict[str, Any]) -> set[str]:
        apps = details.get("applications") or {}
        return {
            n for n, a in apps.items() if (a.get("deployed_app_config") or {}).get("import_path") == GATEWAY_BUILDER
        }

    started = time.monotonic()
    client = ServeSubmissionClient(cluster.dashboard_url)
    details = client.get_serve_details()
    names = gateways(details)
    if not names:
        return None
    # The same config as deployed, less the gateway: nothing else is redeployed.
    config = {
        k: details[k] for k in ("proxy_location", "http_options", "grpc_options", "target_capacity") if details.get(k)
    }
    config["applications"] = [
        a["deployed_app_config"]
        for n, a in details["applications"].items()
        if n not in names and a.get("deployed_app_config")
    ]
    client.deploy_applications(config)
    # Watch the names, not the import path: Serve clears a deleting app's
    # ``deployed_app_config`` at once, but lists the app (DELETING) until its replicas exit.
    while time.monotonic() - started < timeout_s:
        if not names & set(client.get_serve_details().get("applications") or {}):
            return time.monotonic() - started
        time.sleep(0.5)
    raise TimeoutError(f"the gateway still had requests to finish after {timeout_s:.0f} s")


def stop_local(run_dir: Path, grace_s: float = 10, drain_s: float = 120) -> bool:
    """Stop the cluster recorded in ``run_dir`` (its nodes' sessions only), gateway drained first.

    Args:
        grace_s: how long Ray's processes get between SIGTERM and SIGKILL.
        drain_s: the longest wait for the gateway to finish the requests it holds.

    Returns:
        True if a cluster was running.
    """
    nodes = run_dir / "nodes.txt"
    state = run_dir / "cluster.json"
    cluster = LocalCluster(**json.loads(state.read_text())) if state.is_file() else None
    if cluster is not None and _alive(cluster.pid) and drain_s > 0:
        try:
            drain_gateway(cluster, drain_s)
        except (OSError, RuntimeError, ValueError) as err:  # a cluster half up, a drain past its bound: stop anyway
            logger.warning("could not drain the gateway (%s); stopping anyway", err)
    if nodes.is_file():
        for line in nodes.read_text().split():
            _stop_session(int(line), grace_s)
        nodes.unlink()
    if cluster is None:
        return False
    was_running = _alive(cluster.pid)
    _stop_session(cluster.pid, grace_s)
    state.unlink(missing_ok=True)
    return was_running


def _stop_session(leader: int, grace_s: float) -> None:
    """Stop a node started in a session of its own; ``leader`` is its ``ray start``.

    Ray gives each worker (Serve's proxy and controller, the replicas) a process group of
    its own, in the node's session: they are signalled too, and waited for, so that a
    cluster started next finds the ports and memory free.
    """
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        pids = _session_pids(leader)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _session_pids(leader):
            time.sleep(0.2)


def _session_pids(sid: int) -> list[int]:
    """The processes of session ``sid`` that still run; zombies do not count.

    A dead ``ray start`` stays a zombie until its parent reaps it (the test session, or
    nobody where the init process does not reap); counting it made every stop wait out
    both grace periods (20 s). Without /proc, the leader's process group is all we see
    (as ``-sid``: ``os.kill`` signals the group).
    """
    if not Path("/proc/self/stat").is_file():
        try:
            os.killpg(sid, 0)
        except ProcessLookupError:
            return []
        return [-sid]
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # After "(comm)": state, ppid, pgrp, session, ...
            state, _, _, session = stat.read_text().rsplit(")", 1)[1].split()[:4]
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if int(session) == sid and state != "Z":
            pids.append(int(stat.parent.name))
    return pids


class RedisServer:
    """A redis-server of our own on a free loopback port, which can be stopped and started again
    on the same port with its data (append-only file in ``workdir``): a ledger outage, for real.

    Raises:
        RuntimeError: redis-server is not installed (``make services`` installs Debian's).
    """

    def __init__(self, workdir: Path, persist: bool = False) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server is missing: make services installs it (apt-get install redis-server)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.cmd = [server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(workdir)]
        self.cmd += ["--appendonly", "yes", "--appendfsync", "always"] if persist else ["--appendonly", "no"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 20) -> None:
        """Start it and wait until it answers a ping."""
        import redis

        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.RedisError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@contextlib.contextmanager
def local_redis(workdir: Path, timeout_s: float = 20) -> Iterator[str]:
    """A throwaway redis-server on a free loopback port (the shared ledger's tests and benchmark).

    Yields its URL once it answers a ping; stops it on exit.

    Raises:
        RuntimeError: redis-server is not installed (``make services`` installs Debian's).
    """
    server = RedisServer(workdir)
    try:
        server.start(timeout_s)
        yield server.url
    finally:
        server.stop()

"""The local cluster's command line and environment: loopback by default, nothing started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zeroserve.cluster import (
    LOOPBACK_ENV,
    RAY_ENV,
    LocalCluster,
    _session_pids,
    _stop_session,
    add_node,
    free_port,
    head_command,
    kill_node,
    ray_env,
    read_cluster,
)


def _head(**kwargs: object) -> list[str]:
    args: dict[str, object] = {
        "gcs_port": 40001,
        "dashboard_port": 40002,
        "metrics_port": 40003,
        "client_server_port": 40004,
        "temp_dir": "/tmp/zs-test",
    }
    return head_command("ray", **{**args, **kwargs})  # type: ignore[arg-type]


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_head_command_names_only_loopback_and_its_own_ports() -> None:
    cmd = _head(num_cpus=2)
    assert cmd[:4] == ["ray", "start", "--head", "--block"]
    assert _flag(cmd, "--node-ip-address") == "127.0.0.1"
    assert _flag(cmd, "--dashboard-host") == "127.0.0.1"
    assert _flag(cmd, "--port") == "40001"
    assert _flag(cmd, "--dashboard-port") == "40002"
    assert _flag(cmd, "--metrics-export-port") == "40003"
    # Ray starts its client server on every head (port 0 is refused): a port of our own, not 10001.
    assert _flag(cmd, "--ray-client-server-port") == "40004"
    assert _flag(cmd, "--num-gpus") == "1" and _flag(cmd, "--num-cpus") == "2"
    assert not any("0.0.0.0" in part for part in cmd)


def test_ray_env_keeps_the_node_ip_on_loopback_unless_asked_not_to() -> None:
    base = {"PATH": "/bin", LOOPBACK_ENV: "1"}
    env = ray_env(base, {"ZEROSERVE_HOME": "/x", LOOPBACK_ENV: "1"}, loopback_only=True)
    assert env[LOOPBACK_ENV] == "0"  # neither the caller's env nor extra can undo it
    assert env["RAY_AUTH_MODE"] == "disabled" and env["PATH"] == "/bin" and env["ZEROSERVE_HOME"] == "/x"
    assert RAY_ENV.items() <= env.items()
    # A joinable cluster: an inherited "0" (e.g. from the Makefile) must not make Ray refuse nodes.
    assert ray_env({LOOPBACK_ENV: "0"}, loopback_only=False)[LOOPBACK_ENV] == "1"
    assert ray_env({}, {"RAY_AUTH_MODE": "token"}, loopback_only=True)["RAY_AUTH_MODE"] == "token"


def test_with_that_env_ray_keeps_127_0_0_1_as_the_node_ip() -> None:
    """The Ray function `ray start --node-ip-address` goes through (scripts.py), in a fresh
    process because Ray reads the variable at import. Nothing is started."""
    code = "from ray._private.services import resolve_ip_for_localhost as r; print(r('127.0.0.1'))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=ray_env({"PATH": "/usr/bin:/bin"}, loopback_only=True),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.strip() == "127.0.0.1"


def test_a_loopback_only_cluster_refuses_extra_nodes(tmp_path: Path) -> None:
    cluster = LocalCluster(pid=1, gcs_port=1, dashboard_port=2, temp_dir="/tmp/x", loopback_only=True)
    assert cluster.driver_env == {LOOPBACK_ENV: "0"}
    with pytest.raises(RuntimeError, match="loopback_only=False"):
        add_node(tmp_path, cluster)
    assert not (tmp_path / "nodes.txt").exists()  # refused before anything started
    assert LocalCluster(pid=1, gcs_port=1, dashboard_port=2, temp_dir="/tmp/x").driver_env == {}


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


@pytest.mark.parametrize("one_hop", [False, True])
def test_a_node_joined_to_a_one_hop_cluster_gets_direct_ingress(tmp_path: Path, one_hop: bool) -> None:
    """A gateway replica reads direct ingress from its process's environment, so a joined node
    of a one-hop cluster must carry it (and HAProxy files of its own); a proxy-path one must not."""
    cluster = LocalCluster(pid=1, gcs_port=free_port(), dashboard_port=2, temp_dir="/tmp/x", one_hop=one_hop)
    sid = add_node(tmp_path, cluster, env={"ZEROSERVE_HOME": "/somewhere"})  # no head there: it exits later
    try:
        env = _environ(sid)  # the real `ray start` process, before it gives up on the missing head
    finally:
        kill_node(sid)
    assert env["ZEROSERVE_HOME"] == "/somewhere" and env[LOOPBACK_ENV] == "1"
    if one_hop:
        assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1" and env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
        assert env["RAY_SERVE_HAPROXY_BINARY_PATH"].endswith("zeroserve-haproxy")
    else:
        assert env.get("RAY_SERVE_ENABLE_DIRECT_INGRESS", "0") == "0"
        assert "RAY_SERVE_HAPROXY_BINARY_PATH" not in env


def test_a_record_from_before_the_loopback_field_still_reads(tmp_path: Path) -> None:
    (tmp_path / "cluster.json").write_text(
        json.dumps({"pid": 1, "gcs_port": 1, "dashboard_port": 2, "temp_dir": "/tmp/x", "metrics_port": 3})
    )
    cluster = read_cluster(tmp_path)  # pid 1 is alive on any Linux
    assert cluster is not None and cluster.loopback_only is False


def test_stopping_a_node_reaches_its_whole_session_and_skips_zombies() -> None:
    # Like `ray start`: a session leader whose worker sits in a process group of its own.
    leader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, subprocess\n"
            "w = subprocess.Popen(['sleep', 'infinity'], process_group=0)\n"
            "print(w.pid, flush=True)\n"
            "signal.pause()\n",  # until the stop's signal
        ],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert leader.stdout is not None
        worker = int(leader.stdout.readline())
        assert os.getpgid(worker) != leader.pid and os.getsid(worker) == leader.pid
        started = time.monotonic()
        _stop_session(leader.pid, grace_s=30)
        took = time.monotonic() - started
        os.killpg(leader.pid, 0)  # the leader is a zombie still in its group, unreaped...
        assert _session_pids(leader.pid) == []  # ...but nothing of the session runs
        state = (
            Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if Path(f"/proc/{worker}").exists()
            else "gone"
        )
        assert state in ("Z", "gone"), f"the worker in its own group survived the stop ({state})"
        assert took < 15, f"waited {took:.1f} s on a dead session (a grace is 30 s)"
    finally:
        leader.kill()
        leader.wait()

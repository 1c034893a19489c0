"""What the pool exposes by default: every listening socket of the cluster's processes.

The cluster is started as ``make run`` starts it. Everything listens on loopback except
what Ray 2.60 offers no setting for: each Serve replica's inter-deployment gRPC server
binds ``[::]:0`` (ray/serve/_private/replica.py). docs/security.md says what that means.
"""

from __future__ import annotations

from collections import Counter

import httpx
import psutil

from .conftest import Pool, wait_for

EMB = "all-MiniLM-L6-v2"
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _listeners(head_pid: int) -> list[tuple[str, int, int, str]]:
    """Listening sockets (ip, port, pid, title) of the head process and everything it started."""
    head = psutil.Process(head_pid)
    found = []
    for proc in [head, *head.children(recursive=True)]:
        try:
            title = " ".join(proc.cmdline())[:80]
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append((conn.laddr.ip, conn.laddr.port, proc.pid, title))
        except psutil.Error:
            continue
    return found


def test_only_loopback_beyond_the_replicas_grpc(pool: Pool) -> None:
    pool.deploy(pool.config(pool.models(EMB)))
    resp = httpx.post(f"{pool.base_url}/v1/embeddings", json={"model": EMB, "input": "x"}, timeout=120)
    assert resp.status_code == 200
    wait_for(lambda: pool.running_replica_ids(EMB), 30, "a running replica")

    listeners = _listeners(pool.cluster.pid)
    ports = {port for _, port, _, _ in listeners}
    # The ones the user sees are among them, on loopback.
    for port in (pool.http_port, pool.cluster.gcs_port, pool.cluster.dashboard_port):
        assert port in ports, f"nothing of the cluster listens on {port}"
    exposed = [(ip, port, pid, title) for ip, port, pid, title in listeners if ip not in LOOPBACK]
    # The known exception is exactly one gRPC server per Serve replica process, on every interface.
    replicas = [
        r for app in pool.details()["applications"].values() for d in app["deployments"].values() for r in d["replicas"]
    ]
    per_pid = Counter(pid for _, _, pid, _ in exposed)
    assert set(per_pid) <= {r["pid"] for r in replicas}, exposed
    assert {r["pid"] for r in replicas if r["state"] == "RUNNING"} <= set(per_pid), exposed
    assert set(per_pid.values()) == {1}, exposed
    assert all(ip in ("::", "0.0.0.0") and "ServeReplica" in title for ip, _, _, title in exposed), exposed

"""`zeroserve start --one-hop`: HAProxy (zeroserve's shim of Ray's) in front of gateway replicas
that serve HTTP themselves (Ray's direct ingress), instead of Serve's Python proxy.

What must hold on that path as on the default one: the official client is served, nothing of it
listens beyond loopback (HAProxy's stats and Prometheus frontends included), a gateway replica
that dies before it answers leaves its client a 503 with Retry-After in OpenAI's shape, not a
bare 500, and a redeployed gateway loses no request, streams included.
"""

from __future__ import annotations

import threading
import time

import httpx
import psutil

from zeroserve.chaos import ray_kill
from zeroserve.loadgen import Shot, Tally, run_load

from .conftest import WARM, Pool, wait_for

EMB, CLS, GEN = "all-MiniLM-L6-v2", "tiny-sentiment", "tiny-llama"
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
CLUSTER_MODE = "one-hop"  # the session's cluster restarted on this path (conftest.cluster_mode)


def _listeners(head_pid: int) -> list[tuple[str, int, str]]:
    head = psutil.Process(head_pid)
    found = []
    for proc in [head, *head.children(recursive=True)]:
        try:
            title = " ".join(proc.cmdline())[:120]
            found += [
                (c.laddr.ip, c.laddr.port, title)
                for c in proc.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN
            ]
        except psutil.Error:
            continue
    return found


def test_one_hop_serves_the_client_on_loopback_only(pool: Pool) -> None:
    pool.deploy(pool.config(pool.models(EMB)))
    emb = pool.openai(timeout=120).embeddings.create(model=EMB, input="one hop")
    assert len(emb.data[0].embedding) == 384

    listeners = _listeners(pool.cluster.pid)
    front = [title for ip, port, title in listeners if port == pool.http_port]
    assert front and all("haproxy" in t for t in front), front  # HAProxy holds the port, not Serve's proxy
    haproxy = [(ip, port) for ip, port, title in listeners if "haproxy" in title]
    assert len({port for _, port in haproxy}) >= 3, haproxy  # the API, stats and Prometheus frontends
    assert all(ip in LOOPBACK for ip, _ in haproxy), haproxy
    # Beyond loopback: only each Serve replica's inter-deployment gRPC server, as on the default
    # path (tests/integration/test_exposure.py says why).
    exposed = [(ip, port, title) for ip, port, title in listeners if ip not in LOOPBACK]
    assert all(ip in ("::", "0.0.0.0") and "ServeReplica" in title for ip, _, title in exposed), exposed


def test_a_gateway_replica_killed_before_it_answers_is_a_503_with_retry_after(pool: Pool) -> None:
    # The whole GPU held by a pinned model, so a request to a cold one waits in the gateway for
    # room (up to its 60 s bound): the gateway replica dies while it holds that request.
    models = pool.models(CLS, EMB)
    models[CLS] = {**models[CLS], "gpu_fraction": 1.0, "pinned": True, "autoscaling": {"min_replicas": 1}}
    models[EMB] = {**models[EMB], "cold_start_timeout_s": 60}
    pool.deploy(pool.config(models))
    wait_for(lambda: pool.running_replica_ids(CLS), 120, f"{CLS} awake")
    (gateway,) = pool.replicas("gateway")
    answer: dict[str, httpx.Response | Exception] = {}

    def call() -> None:
        try:
            answer["r"] = httpx.post(f"{pool.base_url}/v1/embeddings", json={"model": EMB, "input": "x"}, timeout=180)
        except httpx.HTTPError as err:  # a reset or an empty answer: what the shim exists to prevent
            answer["r"] = err

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(2)  # the request is in the gateway, waiting for room
    ray_kill(pool.cluster.address, gateway["actor_name"])
    caller.join(200)
    resp = answer["r"]
    assert isinstance(resp, httpx.Response), repr(resp)
    assert resp.status_code == 503, (resp.status_code, resp.text)
    assert int(resp.headers["retry-after"]) >= 1
    error = resp.json()["error"]
    assert error["type"] == "service_unavailable" and error["code"] == "gateway_unavailable", error
    # Serve replaces the gateway replica; the path serves again.
    wait_for(
        lambda: (
            httpx.post(f"{pool.base_url}/v1/classify", json={"model": CLS, "input": "x"}, timeout=60).status_code == 200
        ),
        180,
        "the one-hop path to serve again",
    )


def test_the_gateway_redeployed_under_streaming_traffic_loses_nothing(pool: Pool) -> None:
    """A new version of the gateway replaces its replicas while streams run: every request gets
    a whole answer (no proxy failsafe on this path, so an old replica that dropped its streams or
    a HAProxy reload that cut connections would lose requests here)."""
    models = pool.models(GEN, autoscaling=WARM)
    pool.deploy(pool.config(models, num_replicas=2))
    wait_for(lambda: pool.running_replica_ids(GEN), 120, f"{GEN} warm")
    wait_for(lambda: len(pool.running_replica_ids("gateway")) == 2, 120, "two gateway replicas")
    before = pool.running_replica_ids("gateway")

    stop = threading.Event()
    result: dict[str, Tally] = {}
    shots = [Shot("chat_stream", GEN), Shot("chat", GEN)]
    loader = threading.Thread(  # bounded by ``stop``, not by a count
        target=lambda: result.update(tally=run_load(pool.base_url, shots, requests=10**6, concurrency=3, stop=stop))
    )
    loader.start()
    try:
        time.sleep(2)  # traffic flows before the redeploy (a duration of load, not a wait for a state)
        redeployed = time.monotonic()
        pool.deploy(pool.config(models, num_replicas=2, request_timeout_s=121))  # new args: new replicas
        wait_for(
            lambda: len(ids := pool.running_replica_ids("gateway")) == 2 and not ids & before,
            180,
            "both gateway replicas replaced",
        )
        replaced = time.monotonic()
        time.sleep(3)  # and keeps flowing through the new ones for a while
        assert loader.is_alive(), "the load ended before the redeploy did"
    finally:
        stop.set()
        loader.join(timeout=180)
    assert not loader.is_alive() and "tally" in result, "the load did not finish within 180 s of its stop"
    tally = result["tally"]
    streams = [o for o in tally.outcomes if o.shot.kind == "chat_stream"]
    # Streams ran while the replicas were replaced, and traffic went on after.
    assert sum(redeployed < o.started < replaced for o in streams) >= 3, tally.summary()
    assert any(o.started > replaced for o in tally.outcomes), tally.summary()
    assert tally.count("ok") == tally.sent, (tally.summary(), [(o.shot, o.status, o.reason) for o in tally.lost()][:5])

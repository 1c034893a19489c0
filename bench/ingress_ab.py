"""One hop or two: Ray Serve's direct ingress (Ray 2.60, alpha) against the proxy path zeroserve uses,
in one run; writes the ``ingress-ab`` section of docs/benchmarks.md.

Three clusters, one after the other, each with the gateway and two demo models held awake:

- **proxy** (today): client → Serve's HTTP proxy → gateway replica → model replica.
- **direct**: ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``: each ingress replica serves HTTP itself on a
  port of its own (30000 up); the client calls the gateway replica's port (from Serve's
  ``target_groups``). Port 8000 is still the head's proxy.
- **one-hop** (``zeroserve start --one-hop``): ``RAY_SERVE_ENABLE_HA_PROXY=1`` through
  zeroserve's HAProxy shim (``cluster.one_hop_env``): HAProxy (bundled with Ray) listens on the
  configured port and forwards to the ingress replicas' ports.

Per mode, interleaved in one run: a MiniLM embedding through the gateway against a direct
``DeploymentHandle`` call (the issue's "added over the handle" figure), and a 32-token stream
from the transformers tiny Llama; then the wake of a model from zero (every ingress replica opens
a listener in direct ingress, models included), and what listens beyond loopback.

    .venv/bin/python bench/ingress_ab.py [--n 200] [--no-write]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import httpx
import psutil
from common import cluster, demo_config, deploy, head_commit, machine, pct, publish, wait

from zeroserve.cluster import one_hop_env

EMB = "all-MiniLM-L6-v2"
GEN = "tiny-llama"
WAKE = "tiny-sentiment"
EMBED_BODY = {"model": EMB, "input": "A man is eating a piece of bread.", "encoding_format": "float"}
STREAM_BODY = {"model": GEN, "prompt": "The quick", "max_tokens": 32, "temperature": 0, "stream": True}
MODES = {
    "proxy": {},
    "direct": {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"},
    "one-hop": {},  # one_hop_env(), made when its cluster starts (it picks free ports)
}
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def gateway_url(c: Any, port: int, mode: str) -> str:
    """Where a client reaches the gateway in ``mode``."""
    if mode != "direct":
        return f"http://127.0.0.1:{port}"
    details = httpx.get(f"{c.dashboard_url}/api/serve/applications/", timeout=30).json()
    groups = [g for g in details.get("target_groups") or [] if g.get("app_name") == "gateway"]
    targets = [t for g in groups if g.get("protocol") == "HTTP" for t in g["targets"]]
    assert targets, f"no direct-ingress target for the gateway: {details.get('target_groups')}"
    return f"http://{targets[0]['ip']}:{targets[0]['port']}"


def exposed(head_pid: int) -> list[str]:
    """Listening sockets beyond loopback of the head and everything it started (ip:port process)."""
    out = []
    head = psutil.Process(head_pid)
    for proc in [head, *head.children(recursive=True)]:
        try:
            name = proc.name()
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr.ip not in LOOPBACK:
                    out.append(f"{conn.laddr.ip}:{conn.laddr.port} {name}")
        except psutil.Error:
            continue
    return sorted(out)


def wake(base: str, http: httpx.Client) -> float:
    from ray import serve

    def at_zero() -> bool:
        states = serve.status().applications[WAKE].deployments["ModelServer"].replica_states
        return not states.get("RUNNING")

    wait(at_zero, 120)
    t0 = time.perf_counter()
    http.post(f"{base}/v1/classify", json={"model": WAKE, "input": "I love it"}).raise_for_status()
    return time.perf_counter() - t0


def measure(mode: str, n: int, rounds: int) -> dict[str, Any]:
    import ray
    from ray import serve

    awake = {"min_replicas": 1, "max_replicas": 1, "initial_replicas": 1}
    with cluster(one_hop_env() if mode == "one-hop" else MODES[mode]) as (c, port):
        cfg = demo_config(port, awake, only=(EMB, GEN, WAKE))
        for app in cfg["applications"]:
            if app["name"] == WAKE:
                app["args"]["autoscaling"] = {
                    "min_replicas": 0,
                    "max_replicas": 1,
                    "initial_replicas": 0,
                    "downscale_to_zero_delay_s": 2,
                    "downscale_delay_s": 1,
                    "look_back_period_s": 1,
                    "metrics_interval_s": 0.5,
                    "upscale_delay_s": 0,
                }
                app["args"]["min_hold_s"] = 0
        deploy(c, cfg, port)
        ray.init(address=c.address, logging_level="ERROR", log_to_driver=False)
        base = gateway_url(c, port, mode)
        http = httpx.Client(timeout=300)
        handle = serve.get_app_handle(EMB)
        for _ in range(30):
            http.post(f"{base}/v1/embeddings", json=EMBED_BODY).raise_for_status()
            handle.embed.remote([EMBED_BODY["input"]]).result()
        out: dict[str, list[float]] = {"gateway": [], "handle": [], "stream": []}
        for _ in range(n):
            t = time.perf_counter()
            http.post(f"{base}/v1/embeddings", json=EMBED_BODY).raise_for_status()
            out["gateway"].append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            handle.embed.remote([EMBED_BODY["input"]]).result()
            out["handle"].append((time.perf_counter() - t) * 1000)
        for i in range(n // 4 + 3):
            t = time.perf_counter()
            with http.stream("POST", f"{base}/v1/completions", json=STREAM_BODY) as resp:
                resp.raise_for_status()
                for _ in resp.iter_bytes():
                    pass
            if i >= 3:
                out["stream"].append((time.perf_counter() - t) * 1000)
        wakes = [wake(base, http) for _ in range(rounds)]
        listening = exposed(c.pid)
        serve.context._global_client.shutdown_cached_handles()
        serve.context._set_global_client(None)  # the next mode is another cluster
        ray.shutdown()
    return {**out, "wake": wakes, "exposed": listening, "base": base}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    commit = head_commit()  # read first: what runs is what was committed then
    results: dict[str, dict[str, Any]] = {}
    for mode in args.modes.split(","):
        try:
            results[mode] = measure(mode, args.n, args.rounds)
        except Exception as err:  # noqa: BLE001 - a mode that does not work is a finding
            results[mode] = {"error": f"{type(err).__name__}: {err}"[:300]}
        print(mode, {k: v for k, v in results[mode].items() if k in ("error", "exposed", "base")}, flush=True)

    med = statistics.median
    lines = [
        f"`bench/ingress_ab.py --n {args.n} --rounds {args.rounds}`, commit {commit}; {machine()}.",
        f"Milliseconds; {args.n} MiniLM embeddings per path, the gateway and the handle interleaved in one run",
        f"per mode; {args.n // 4} streams of 32 tokens from the transformers tiny Llama; wakes of {WAKE} from",
        "zero in seconds.",
        "",
        "| mode | gateway p50 | gateway p99 | handle p50 | handle p99 | added p50 | added p99 "
        "| 32-token stream p50 | wake s (median) | listening beyond loopback |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode, r in results.items():
        if "error" in r:
            lines.append(f"| {mode} | failed: {r['error']} |  |  |  |  |  |  |  |  |")
            continue
        g, h = r["gateway"], r["handle"]
        beyond = ", ".join(r["exposed"]) or "none"
        lines.append(
            f"| {mode} | {med(g):.1f} | {pct(g, 99):.1f} | {med(h):.1f} | {pct(h, 99):.1f} "
            f"| {med(g) - med(h):+.1f} | {pct(g, 99) - pct(h, 99):+.1f} | {med(r['stream']):.1f} "
            f"| {med(r['wake']):.2f} | {beyond} |"
        )
    publish("ingress-ab", lines, write=not args.no_write)


if __name__ == "__main__":
    main()

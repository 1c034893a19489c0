"""The ``zeroserve`` command: validate configs, run a local cluster, deploy and wait.

zeroserve validate serve_config.yaml
zeroserve build-models --out models
zeroserve start            # local Ray head with one logical GPU (.run/)
zeroserve deploy serve_config.demo.yaml
zeroserve stop             # only the cluster that `start` started
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from zeroserve.config import ConfigError, load_serve_config, validate_serve_config

__all__ = ["main"]

RUN_DIR = Path(".run")


def _print(msg: str = "") -> None:
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def _load_config(path: str) -> dict[str, Any]:
    """Read a serve config and check the shape every command relies on.

    Raises:
        ConfigError: the file cannot be read, is not YAML, or its ``applications`` are not a
            list of mappings (each command then says so in one line, not a traceback).
    """
    import yaml

    try:
        config = load_serve_config(path)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    apps = config.get("applications")
    if not isinstance(apps, list) or not apps:
        raise ConfigError(f"{path}: the config has no 'applications' list")
    for i, app in enumerate(apps):
        if not isinstance(app, dict):
            raise ConfigError(f"{path}: applications[{i}] is {app!r}, not a mapping with name, import_path and args")
    return config


def _load_yaml_mapping(path: str, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping (a cluster-launcher config); ConfigError otherwise."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a YAML mapping ({what})")
    return data


def cmd_validate(args: argparse.Namespace) -> int:
    status = 0
    for path in args.configs:
        try:
            gateway, models = validate_serve_config(_load_config(path))
        except ConfigError as err:
            _print(f"{path}: INVALID\n{err}")
            status = 1
            continue
        names = ", ".join(f"{n} ({s.task}, {s.engine}, {s.gpu_fraction:g} GPU)" for n, s in models.items())
        _print(f"{path}: ok: gateway + {len(models)} models: {names}")
    return status


def cmd_plan(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from zeroserve.plan import GB, gpus_from_cluster, parse_gpus, plan

    console = Console(width=140)
    try:
        _, models = validate_serve_config(_load_config(args.config))
        if args.gpus:
            gpus = parse_gpus(args.gpus)
        elif args.cluster:
            cluster = _load_yaml_mapping(args.cluster, "a Ray cluster-launcher config")
            try:
                gpus = gpus_from_cluster(cluster)
            except (AttributeError, TypeError, ValueError) as err:
                if isinstance(err, ConfigError):
                    raise
                # A node type that is not a mapping, a GPU count that is not a number...
                raise ConfigError(f"{args.cluster}: malformed available_node_types: {err}") from None
        else:
            gpus = parse_gpus(os.environ.get("ZEROSERVE_GPUS_SPEC", "1x80GB"))
    except ConfigError as err:
        console.print(f"[red]{err}[/red]")
        return 2
    if not gpus:
        console.print("[red]the cluster has no GPUs zeroserve can place models on[/red]")
        return 2
    result = plan(models, gpus)
    table = Table(title=f"{args.config} on {len(gpus)} GPU(s), largest {result.largest_bytes / GB:.0f} GB")
    for col in (
        "model",
        "task/engine",
        "fraction",
        "weights GB",
        "KV GB",
        "act.+ctx GB",
        "need GB",
        "share GB",
        "headroom GB",
        "source",
    ):
        table.add_column(col, justify="right" if "GB" in col or col == "fraction" else "left")
    for name, spec in models.items():
        est = result.estimates.get(name)
        share = result.share_bytes(spec)
        if est is None:
            table.add_row(
                name, f"{spec.task}/{spec.engine}", f"{spec.gpu_fraction:g}", *["?"] * 5, f"{share / GB:.1f}", "-"
            )
            continue
        headroom = share - est.total
        table.add_row(
            name,
            f"{spec.task}/{spec.engine}",
            f"{spec.gpu_fraction:g}",
            f"{est.weights / GB:.2f}",
            f"{est.kv_cache / GB:.2f}",
            f"{(est.activations + est.context) / GB:.2f}",
            f"{est.total / GB:.2f}",
            f"{share / GB:.1f}",
            f"[{'green' if headroom >= 0 else 'red'}]{headroom / GB:.1f}[/]",
            est.source,
        )
    console.print(table)
    packing = Table(title="packing (one replica per model; a model at zero needs room when it wakes)")
    packing.add_column("GPU")
    packing.add_column("card")
    packing.add_column("used", justify="right")
    packing.add_column("models")
    for g in result.placement.gpus:
        placed = result.placement.assigned.get(g.name, [])
        if placed:
            packing.add_row(
                g.name, g.kind, f"{result.placement.used(g.name):.2f}", ", ".join(f"{n} ({f:g})" for n, f in placed)
            )
    console.print(packing)
    idle = len(gpus) - result.placement.gpus_used
    console.print(f"{result.placement.gpus_used} of {len(gpus)} GPUs used; {idle} free")
    for w in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    for e in result.errors:
        console.print(f"[red]error:[/red] {e}")
    if not result.ok:
        console.print("[red]the plan does not fit: nothing should be deployed[/red]")
        return 1
    return 0


def _status_table(data: dict[str, Any]) -> Any:
    from rich.console import Group
    from rich.table import Table

    def ago(ts: float | None) -> str:
        return "-" if ts is None else f"{max(0.0, data['time'] - ts):.0f} s ago"

    def secs(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f} ms" if v < 1 else f"{v:.1f} s"

    models = Table(title="zeroserve models")
    for col in (
        "model",
        "task",
        "engine",
        "state",
        "replicas",
        "GPU",
        "nodes",
        "last request",
        "req/min",
        "p50",
        "cold start p50",
    ):
        models.add_column(col)
    colors = {"ready": "green", "starting": "yellow", "cold": "blue", "failed": "red"}
    for m in data["models"]:
        evicting = f" (evicting for {m.get('yielding_to') or '?'})" if m.get("evicting") else ""
        models.add_row(
            m["id"],
            str(m["task"]),
            str(m["engine"]),
            f"[{colors.get(m['state'], 'white')}]{m['state']}[/]{evicting}",
            f"{m['replicas']}/{m['target_replicas']}",
            f"{m['gpu_fraction']}",
            ", ".join(n[:8] for n in m["nodes"]) or "-",
            ago(m["last_request"]),
            str(m["requests_per_min"]),
            secs(m["p50_latency_s"]),
            secs(m["cold_start_p50_s"]),
        )
    pool = Table(title="GPU pool")
    for col in ("node", "GPUs", "used", "occupancy"):
        pool.add_column(col)
    for p in data["pool"]:
        occ = "-" if p["occupancy"] is None else f"{p['occupancy']:.0%}"
        pool.add_row(p["node"][:12], str(p["gpus"]), f"{p['gpus_used']:g}", occ)
    return Group(models, pool)


def cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    url = f"{args.url.rstrip('/')}/v1/zeroserve/status"
    try:
        data = _get_json(url, timeout=10)
    except (urllib.error.URLError, OSError, ValueError) as err:
        _print(f"cannot reach the gateway at {args.url}: {err}")
        return 1
    if args.json:
        _print(json.dumps(data, indent=2))
        return 0
    console = Console()
    if not args.watch:
        console.print(_status_table(data))
        return 0
    with Live(_status_table(data), console=console, refresh_per_second=1) as live:
        try:
            while True:
                time.sleep(args.interval)
                try:
                    live.update(_status_table(_get_json(url, timeout=10)))
                except (urllib.error.URLError, OSError, ValueError) as err:
                    live.update(f"cannot reach the gateway: {err}")
        except KeyboardInterrupt:
            return 0


def _ledger_from_args(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    from zeroserve.config import GATEWAY_BUILDER, parse_gateway_spec
    from zeroserve.quota import open_ledger

    tiers: dict[str, Any] = {}
    backend, path, url = "sqlite", args.ledger_path, args.redis_url
    if args.config:
        config = _load_config(args.config)
        gateway = next((a for a in config["applications"] if a.get("import_path") == GATEWAY_BUILDER), None)
        if gateway is None:
            raise ConfigError(
                f"{args.config}: no gateway application (import_path: {GATEWAY_BUILDER}), whose args "
                "name the key ledger and the tiers; pass a config with one, or --ledger-path / --redis-url"
            )
        auth = parse_gateway_spec(gateway.get("args")).auth
        tiers = dict(auth.tiers)
        backend, path, url = auth.ledger.backend, path or auth.ledger.path, url or auth.ledger.url
    if url:
        backend = "redis"
    return open_ledger(backend, path, url), tiers


def cmd_keys(args: argparse.Namespace) -> int:
    import sqlite3

    from redis.exceptions import RedisError

    if args.action in ("rotate", "revoke") and not args.key_id:
        _print(f"keys {args.action} needs the KEY_ID (see `zeroserve keys list`)")
        return 2
    try:
        ledger, tiers = _ledger_from_args(args)
        return _keys(args, ledger, tiers)
    except (OSError, sqlite3.Error, RedisError) as err:
        where = args.redis_url or args.ledger_path or (f"the ledger of {args.config}" if args.config else "the ledger")
        _print(f"cannot use the key ledger ({where}): {err}")
        return 1


def _keys(args: argparse.Namespace, ledger: Any, tiers: dict[str, Any]) -> int:
    from zeroserve.quota import KeyRecord, hash_key, new_key

    if args.action in ("create", "rotate"):
        tier, name = args.tier, args.name or ""
        if args.action == "rotate":
            old = next((k for k in ledger.list_keys() if k.key_id == args.key_id), None)
            if old is None:
                _print(f"no key {args.key_id}")
                return 1
            tier, name = old.tier, old.name
            ledger.revoke(old.key_id)
        if not tier:
            _print("--tier is required")
            return 2
        if tiers and tier not in tiers:
            _print(f"tier {tier!r} is not in {args.config} (tiers: {', '.join(tiers)})")
            return 2
        key, key_id = new_key()
        ledger.add_key(hash_key(key), KeyRecord(key_id, name, tier, time.time()))
        _print(f"key id {key_id} (tier {tier}{', name ' + name if name else ''}); the key, shown once:")
        _print(key)
        return 0
    if args.action == "list":
        for k in ledger.list_keys():
            created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(k.created))
            _print(f"{k.key_id}  {k.tier:10s} {k.name or '-':20s} {created}  {'REVOKED' if k.revoked else 'active'}")
        return 0
    if args.action == "revoke":
        ok = ledger.revoke(args.key_id)
        _print(f"revoked {args.key_id}" if ok else f"no key {args.key_id}")
        return 0 if ok else 1
    return 2


def cmd_build_models(args: argparse.Namespace) -> int:
    from zeroserve.demo_models import build_all

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name, path in build_all(args.out, args.force).items():
        _print(f"{name:18s} {path}")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    from zeroserve.cluster import read_cluster, start_local

    existing = read_cluster(args.run_dir)
    if existing:
        _print(f"Ray is already running (pid {existing.pid}); dashboard {existing.dashboard_url}")
        return 0
    hop = " (one hop: HAProxy in front of the gateway replicas)" if args.one_hop else ""
    _print(f"starting a local Ray head with {args.num_gpus} logical GPU(s){hop}...")
    cluster = start_local(
        args.run_dir,
        num_gpus=args.num_gpus,
        dashboard_port=args.dashboard_port,
        env={"ZEROSERVE_HOME": str(Path.cwd()), "HF_HUB_OFFLINE": "1"},
        one_hop=args.one_hop,
    )
    _print(f"Ray is up: address {cluster.address}, dashboard {cluster.dashboard_url}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from zeroserve.cluster import stop_local

    _print("stopped the local Ray cluster" if stop_local(args.run_dir) else "no local cluster was running")
    return 0


def _get_json(url: str, timeout: float = 5) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def wait_rolled_out(client: Any, config: dict[str, Any], before: dict[str, Any], timeout_s: float) -> bool:
    """Wait until every application whose config changed runs the new one: RUNNING, and none of
    the replicas it had before the deploy still running (they served the old config: a redeployed
    gateway with another key ledger would answer for a while with the old one).

    Returns False if one failed to deploy or the time ran out.
    """

    def key(app: dict[str, Any] | None) -> Any:
        return None if app is None else (app.get("import_path"), app.get("args") or {})

    def running(app: dict[str, Any]) -> set[str]:
        return {
            r["replica_id"]
            for d in (app.get("deployments") or {}).values()
            for r in d.get("replicas", [])
            if r.get("state") == "RUNNING"
        }

    old_apps = before.get("applications") or {}
    changed = {
        a["name"]: running(old_apps[a["name"]]) if a["name"] in old_apps else set()
        for a in config["applications"]
        if key((old_apps.get(a["name"]) or {}).get("deployed_app_config")) != key(a)
    }
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            apps = client.get_serve_details().get("applications") or {}
        except (OSError, RuntimeError):
            apps = {}
        failed = [n for n in changed if (apps.get(n) or {}).get("status") == "DEPLOY_FAILED"]
        if failed:
            _print(f"failed to deploy: {', '.join(failed)} ({(apps[failed[0]].get('message') or '')[:300]})")
            return False
        if apps and all(
            (app := apps.get(n)) is not None and app.get("status") == "RUNNING" and not running(app) & old
            for n, old in changed.items()
        ):
            return True
        time.sleep(1)
    return False


def wait_ready(base_url: str, timeout_s: float, expect_models: int | None = None) -> bool:
    """Poll the gateway until /health is 200 and every model is listed; print progress."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        line = "waiting for the gateway..."
        try:
            _get_json(f"{base_url}/health")
            data = _get_json(f"{base_url}/v1/models")["data"]
            states = ", ".join(f"{m['id']}: {m['zeroserve']['state']}" for m in data)
            line = f"gateway ready; models: {states or 'none yet'}"
            if expect_models is None or len(data) >= expect_models:
                _print(line)
                return True
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            pass
        if line != last:
            _print(line)
            last = line
        time.sleep(1)
    return False


def cmd_deploy(args: argparse.Namespace) -> int:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    from zeroserve.cluster import read_cluster

    try:
        config = _load_config(args.config)
        gateway, models = validate_serve_config(config)
        http = config.get("http_options") or {}
        if not isinstance(http, dict):
            raise ConfigError(f"http_options = {http!r}: expected a mapping (host, port)")
    except ConfigError as err:
        _print(f"{args.config}: refused, nothing deployed:\n{err}")
        return 1
    address = args.address
    if address is None:
        cluster = read_cluster(args.run_dir)
        if cluster is None:
            _print("no local cluster: run `zeroserve start` (or `make run`), or pass --address")
            return 1
        address = cluster.dashboard_url
    try:
        client = ServeSubmissionClient(address)
        before = client.get_serve_details()
        client.deploy_applications(config)
    except (OSError, RuntimeError) as err:  # unreachable dashboard (ConnectionError), or Serve refused the config
        _print(f"deploying {args.config} to {address} failed: {err}")
        return 1
    if not wait_rolled_out(client, config, before, args.timeout):
        _print(f"the new config did not take over within {args.timeout:.0f} s; see `serve status -a {address}`")
        return 1
    host = http.get("host", "127.0.0.1")
    base_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{http.get('port', 8000)}"
    _print(f"deployed {args.config} to {address}; {len(models)} models")
    if not wait_ready(base_url, args.timeout, expect_models=len(models)):
        _print(f"the gateway did not become ready within {args.timeout:.0f} s; see `serve status -a {address}`")
        return 1
    key_file, created = None, False
    if gateway.auth.enabled and args.address is None:
        # A local demo: one key of the first tier, kept in the run folder (as Jupyter prints its
        # token), so that the first request already shows the quota headers and /v1/usage.
        key_file = args.run_dir / "demo-key"
        try:
            created = ensure_demo_key(gateway.auth, key_file)
        except Exception as err:  # noqa: BLE001 - sqlite3/redis/OS errors: the deploy itself succeeded
            _print(f"could not make a demo API key in the ledger: {err}")
            key_file = None
    first = next(iter(models), "MODEL")
    _print("")
    _print(f"  OpenAI endpoint : {base_url}/v1")
    if key_file is not None:
        tier = next(iter(gateway.auth.tiers))
        _print(f"  API key         : {key_file.read_text().strip()}")
        _print(f"                    (tier {tier}; {'new, ' if created else ''}kept in {key_file})")
    elif gateway.auth.enabled:
        _print(f"  API keys        : zeroserve keys create --tier TIER --config {args.config}")
    _print(f"  Ray dashboard   : {address}")
    _print(f"  models          : {base_url}/v1/models")
    if key_file is not None:
        _print(f'  usage today     : curl {base_url}/v1/usage -H "Authorization: Bearer $(cat {key_file})"')
    _print("  try             :")
    task = models[first].task if models else "embed"
    if task == "embed":
        body = f'{{"model": "{first}", "input": "hello"}}'
        route = "embeddings"
    else:
        body = f'{{"model": "{first}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'
        route = "chat/completions"
    auth = f' -H "Authorization: Bearer $(cat {key_file})"' if key_file is not None else ""
    _print(f"    curl -i {base_url}/v1/{route}{auth} -H 'Content-Type: application/json' -d '{body}'")
    return 0


def ensure_demo_key(auth: Any, key_file: Path) -> bool:
    """Make sure ``key_file`` holds a live key of the config's first tier; True if one was made.

    A key already in the file is kept while the ledger knows it, unrevoked, in a configured tier.
    """
    from zeroserve.quota import KeyRecord, hash_key, new_key, open_ledger, parse_bearer

    ledger = open_ledger(auth.ledger.backend, auth.ledger.path, auth.ledger.url)
    if key_file.exists():
        key = parse_bearer(f"Bearer {key_file.read_text().strip()}")
        record = ledger.find_key(hash_key(key)) if key else None
        if record is not None and not record.revoked and record.tier in auth.tiers:
            return False
    key, key_id = new_key()
    ledger.add_key(hash_key(key), KeyRecord(key_id, "demo", next(iter(auth.tiers)), time.time()))
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.touch(mode=0o600)
    key_file.chmod(0o600)
    key_file.write_text(key + "\n")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zeroserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check Serve config files the way the builders will")
    p.add_argument("configs", nargs="+")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plan", help="estimate GPU memory per model and pack the models onto GPUs")
    p.add_argument("config")
    p.add_argument("--cluster", help="a Ray cluster-launcher config (cluster.yaml)")
    p.add_argument("--gpus", help="shorthand such as 4xA100-80GB or 2xA100-80GB,1xL4")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("status", help="models, their state and figures, and the GPU pool")
    p.add_argument("--url", default=os.environ.get("ZEROSERVE_URL", "http://127.0.0.1:8000"))
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument("--watch", action="store_true", help="refresh until interrupted")
    p.add_argument("--interval", type=float, default=2.0)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("keys", help="create, list, rotate and revoke API keys")
    p.add_argument("action", choices=["create", "list", "rotate", "revoke"])
    p.add_argument("key_id", nargs="?", help="for rotate and revoke")
    p.add_argument("--tier")
    p.add_argument("--name")
    p.add_argument("--config", help="a serve config whose gateway args name the ledger and tiers")
    p.add_argument("--ledger-path", help="SQLite ledger file")
    p.add_argument("--redis-url", help="Redis ledger, redis://host:port/db")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("build-models", help="build the demo models offline")
    p.add_argument("--out", type=Path, default=Path("models"))
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_build_models)

    p = sub.add_parser("start", help="start a local Ray head with logical GPUs")
    p.add_argument("--run-dir", type=Path, default=RUN_DIR)
    p.add_argument("--num-gpus", type=int, default=int(os.environ.get("ZEROSERVE_GPUS", "1")))
    p.add_argument("--dashboard-port", type=int, default=8265)
    p.add_argument(
        "--one-hop",
        action="store_true",
        help="reach the gateway through HAProxy and Ray's direct ingress instead of Serve's proxy: one Ray hop "
        "fewer per request (docs/benchmarks.md, 'ingress-ab'); a gateway replica that dies mid-stream cuts "
        "the stream without an error event",
    )
    p.set_defaults(func=cmd_start)

    p = sub.add_parser("stop", help="stop the local cluster that `start` started (only that one)")
    p.add_argument("--run-dir", type=Path, default=RUN_DIR)
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("deploy", help="validate, deploy (as `serve deploy` does) and wait until ready")
    p.add_argument("config")
    p.add_argument("--address", help="Ray dashboard URL; default: the local cluster")
    p.add_argument("--run-dir", type=Path, default=RUN_DIR)
    p.add_argument("--timeout", type=float, default=300)
    p.set_defaults(func=cmd_deploy)

    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as err:
        # A config or file missing a piece a command needs: say which, exit non-zero, no traceback.
        sys.stderr.write(f"zeroserve {args.command}: {err}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())

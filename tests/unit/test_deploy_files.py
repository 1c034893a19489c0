"""The deployment files stay valid and in step with serve_config.yaml."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ray
import yaml
from jsonschema import validate

from zeroserve.config import load_serve_config, validate_serve_config
from zeroserve.plan import gpus_from_cluster, plan

ROOT = Path(__file__).resolve().parents[2]
# Ports that run code for whoever reaches them (docs/security.md): GCS, dashboard, client
# server, dashboard agent, Ray's metrics, object manager (cluster.yaml pins 8076).
RAY_PORTS = {6379, 8265, 10001, 52365, 8080, 8076}


def _covers(rule: dict[str, Any], port: int) -> bool:
    if rule.get("IpProtocol") == "-1" or rule.get("FromPort") == -1:
        return True
    return bool(rule["FromPort"] <= port <= rule["ToPort"])


def _from_anywhere(rule: dict[str, Any]) -> bool:
    cidrs = [r.get("CidrIp") for r in rule.get("IpRanges", [])] + [
        r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])
    ]
    return any(c in ("0.0.0.0/0", "::/0") for c in cidrs)


def test_cluster_yaml_validates_against_rays_schema() -> None:
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate(cfg, schema)
    workers = cfg["available_node_types"]["gpu-a100-80gb"]
    assert workers["min_workers"] == 0  # GPU nodes scale from zero
    head_cmds = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmds  # dashboard private
    opened = {p["FromPort"] for p in cfg["provider"]["security_group"]["IpPermissions"]}
    assert opened == {8000}  # only the gateway is public (SSH is the launcher's own rule)


def test_cluster_yaml_opens_only_the_gateway_and_keeps_ray_private() -> None:
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    rules = cfg["provider"]["security_group"]["IpPermissions"]
    public = [r for r in rules if _from_anywhere(r)]
    assert [(r["IpProtocol"], r["FromPort"], r["ToPort"]) for r in public] == [("tcp", 8000, 8000)]
    assert not [(r, port) for r in rules for port in RAY_PORTS if _covers(r, port)]
    head = " ".join(cfg["head_start_ray_commands"])
    starts = head + " ".join(cfg["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in starts
    assert "RAY_AUTH_MODE=" in head  # explicit either way: a stale token file must not decide
    # The public port is the gateway's: Serve's proxy listens on 8000, on the head only.
    serve = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    assert serve["http_options"]["port"] == 8000 and serve["proxy_location"] == "HeadOnly"


def test_production_plan_fits_the_cluster() -> None:
    _, models = validate_serve_config(load_serve_config(ROOT / "serve_config.yaml"))
    gpus = gpus_from_cluster(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    assert len(gpus) == 16 and {g.kind for g in gpus} == {"A100-80GB"}
    result = plan(models, gpus)
    assert result.ok, result.errors


def test_rayservice_embeds_serve_config_verbatim() -> None:
    manifest = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayservice.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert embedded == yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    cluster = manifest["spec"]["rayClusterConfig"]
    workers = cluster["workerGroupSpecs"][0]
    assert workers["minReplicas"] == 0
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_rayservice_exposes_only_the_gateway() -> None:
    manifest = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayservice.yaml").read_text())
    spec = manifest["spec"]
    # The one public Service carries the Serve port only.
    serve_svc = spec["serveService"]["spec"]
    assert serve_svc["type"] == "LoadBalancer"
    assert [(p["name"], p["port"]) for p in serve_svc["ports"]] == [("serve", 8000)]
    head = spec["rayClusterConfig"]["headGroupSpec"]
    # The head service (GCS, dashboard, client) stays inside the Kubernetes cluster. Its dashboard
    # listens on the pod IP because the KubeRay operator deploys serveConfigV2 through it.
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    for group in [head, *spec["rayClusterConfig"]["workerGroupSpecs"]]:
        for container in group["template"]["spec"]["containers"]:
            assert {"name": "RAY_AUTH_MODE", "value": "disabled"} in container["env"]


def test_networkpolicy_lets_only_the_gateway_port_in_from_anywhere() -> None:
    manifest = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayservice.yaml").read_text())
    policy = yaml.safe_load((ROOT / "deploy" / "kuberay" / "networkpolicy.yaml").read_text())
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
    selected = policy["spec"]["podSelector"]["matchLabels"]
    cluster = manifest["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert selected.items() <= group["template"]["metadata"]["labels"].items()
    rules = policy["spec"]["ingress"]
    open_rules = [r for r in rules if not r.get("from")]
    assert [[p["port"] for p in r["ports"]] for r in open_rules] == [[8000]]
    for rule in rules:
        if not rule.get("from"):
            continue
        peers = rule["from"]
        if all(p.get("podSelector", {}).get("matchLabels") == selected and "namespaceSelector" not in p for p in peers):
            continue  # the Ray pods among themselves: every port
        # Anyone else (the KubeRay operator) reaches the dashboard only, and never by IP block.
        assert all("ipBlock" not in p and "podSelector" in p for p in peers)
        assert [p["port"] for p in rule["ports"]] == [8265]


def test_every_ray_start_installs_the_proxy_failsafe() -> None:
    """Each node's Serve proxy answers a dead gateway replica with 503 + Retry-After (zeroserve.proxy)."""
    from zeroserve.cluster import RAY_ENV
    from zeroserve.proxy import middlewares

    setting = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
    module, _, func = RAY_ENV[setting].partition(":")
    assert (module, func) == ("zeroserve.proxy", middlewares.__name__)
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    for command in cfg["head_start_ray_commands"][1:] + cfg["worker_start_ray_commands"][1:]:
        assert f"{setting}={RAY_ENV[setting]}" in command
    spec = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayservice.yaml").read_text())["spec"]["rayClusterConfig"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        for container in group["template"]["spec"]["containers"]:
            assert {"name": setting, "value": RAY_ENV[setting]} in container["env"]

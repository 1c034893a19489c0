"""The deployment files stay valid and in step with serve_config.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import ray
import yaml
from jsonschema import validate

from zeroserve.config import load_serve_config, validate_serve_config
from zeroserve.plan import gpus_from_cluster, plan

ROOT = Path(__file__).resolve().parents[2]


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
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    workers = cluster["workerGroupSpecs"][0]
    assert workers["minReplicas"] == 0
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"

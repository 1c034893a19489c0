from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from zeroserve.config import (
    ConfigError,
    ModelSpec,
    load_serve_config,
    parse_model_spec,
    resolve_model_source,
    validate_serve_config,
)

ROOT = Path(__file__).resolve().parents[2]


def _config(*models: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    apps: list[dict[str, Any]] = [{"name": "gateway", "route_prefix": "/", "import_path": "deployments.gateway:build"}]
    for name, args in models:
        apps.append({"name": name, "route_prefix": None, "import_path": "deployments.model:build", "args": args})
    return {"applications": apps}


GOOD = {"task": "embed", "model": "./models/all-MiniLM-L6-v2"}


@pytest.mark.parametrize("path", ["serve_config.yaml", "serve_config.demo.yaml"])
def test_repo_configs_validate(path: str) -> None:
    gateway, models = validate_serve_config(load_serve_config(ROOT / path))
    assert models
    assert all(0 < s.gpu_fraction <= 1 for s in models.values())


def test_defaults_make_scale_to_zero_real() -> None:
    spec = parse_model_spec(GOOD)
    assert spec.autoscaling.min_replicas == 0
    assert spec.autoscaling.upscale_delay_s == 0
    assert spec.autoscaling.to_ray()["downscale_to_zero_delay_s"] == 300


def test_unknown_key_names_model_field_and_value() -> None:
    with pytest.raises(ConfigError) as err:
        validate_serve_config(_config(("minilm", {**GOOD, "gpu_fractoin": 0.5})))
    assert "model 'minilm'" in str(err.value)
    assert "gpu_fractoin" in str(err.value) and "0.5" in str(err.value)


def test_old_autoscaling_key_is_refused_not_ignored() -> None:
    args = {**GOOD, "autoscaling": {"target_num_ongoing_requests_per_replica": 2}}
    with pytest.raises(ConfigError, match="autoscaling.target_num_ongoing_requests_per_replica"):
        parse_model_spec(args, "minilm")


@pytest.mark.parametrize("fraction", [0, -0.25, 1.5])
def test_fraction_outside_unit_interval(fraction: float) -> None:
    with pytest.raises(ConfigError) as err:
        parse_model_spec({**GOOD, "gpu_fraction": fraction}, "minilm")
    msg = str(err.value)
    assert "model 'minilm'" in msg and "gpu_fraction" in msg and repr(fraction) in msg


def test_whole_gpu_is_allowed() -> None:
    assert parse_model_spec({**GOOD, "gpu_fraction": 1}).gpu_fraction == 1


def test_unknown_task() -> None:
    with pytest.raises(ConfigError, match=r"field 'task' = 'translate'"):
        parse_model_spec({**GOOD, "task": "translate"}, "m")


def test_duplicate_model_names() -> None:
    with pytest.raises(ConfigError, match="model 'a': the name is used by two applications"):
        validate_serve_config(_config(("a", GOOD), ("a", GOOD)))


def test_replica_bounds_are_cross_checked() -> None:
    with pytest.raises(ConfigError, match=r"min_replicas \(3\) is above max_replicas \(1\)"):
        parse_model_spec({**GOOD, "autoscaling": {"min_replicas": 3, "max_replicas": 1}}, "m")


@pytest.mark.parametrize("model", ["../../etc", "org/name/../x", "a b", "org//x"])
def test_model_source_must_be_hub_id_or_explicit_path(model: str) -> None:
    if model.startswith("../"):
        assert parse_model_spec({**GOOD, "model": model}).is_local
    else:
        with pytest.raises(ConfigError, match="field 'model'"):
            parse_model_spec({**GOOD, "model": model})


def test_relative_paths_resolve_against_zeroserve_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ZEROSERVE_HOME", str(tmp_path))
    spec = ModelSpec(task="embed", model="./models/x")
    assert resolve_model_source(spec) == str(tmp_path / "models" / "x")
    assert resolve_model_source(ModelSpec(task="embed", model="org/x")) == "org/x"


def test_model_route_prefix_and_name_rules() -> None:
    cfg = _config(("bad/name", GOOD))
    cfg["applications"][1]["route_prefix"] = "/minilm"
    with pytest.raises(ConfigError) as err:
        validate_serve_config(cfg)
    assert "must match" in str(err.value) and "route_prefix" in str(err.value)


def test_missing_gateway() -> None:
    cfg = _config(("a", GOOD))
    cfg["applications"].pop(0)
    with pytest.raises(ConfigError, match="no gateway"):
        validate_serve_config(cfg)


def test_duplicate_yaml_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("applications: []\napplications: []\n")
    with pytest.raises(ConfigError, match="appears twice"):
        load_serve_config(path)

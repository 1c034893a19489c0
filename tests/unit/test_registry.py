from __future__ import annotations

from typing import Any

import pytest

from zeroserve.gateway.registry import ModelState, entries_from_details, model_state

ARGS = {"task": "embed", "model": "./models/x", "gpu_fraction": 0.25}


def _app(
    status: str,
    replicas: list[str] | None,
    target: int = 0,
    args: Any = ARGS,
    import_path: str = "deployments.model:build",
) -> dict[str, Any]:
    app: dict[str, Any] = {
        "status": status,
        "message": "",
        "deployed_app_config": {"import_path": import_path, "args": args},
        "deployments": {},
    }
    if replicas is not None:
        app["deployments"]["ModelServer"] = {
            "status": "HEALTHY",
            "target_num_replicas": target,
            "replicas": [{"state": s, "node_id": f"node-{i}"} for i, s in enumerate(replicas)],
        }
    return app


@pytest.mark.parametrize(
    ("status", "replicas", "target", "expected"),
    [
        ("RUNNING", [], 0, ModelState.COLD),
        ("RUNNING", [], 1, ModelState.STARTING),
        ("RUNNING", ["STARTING"], 1, ModelState.STARTING),
        ("RUNNING", ["RUNNING"], 1, ModelState.READY),
        ("RUNNING", ["RUNNING", "STARTING"], 2, ModelState.READY),
        ("DEPLOYING", None, 0, ModelState.STARTING),
        ("DEPLOY_FAILED", None, 0, ModelState.FAILED),
        ("DEPLOY_FAILED", ["RUNNING"], 1, ModelState.FAILED),
    ],
)
def test_model_state(status: str, replicas: list[str] | None, target: int, expected: ModelState) -> None:
    entries = entries_from_details({"applications": {"m": _app(status, replicas, target)}})
    assert entries["m"].state is expected


def test_unhealthy_deployment_without_running_replica_is_failed() -> None:
    dep = {"status": "UNHEALTHY", "target_num_replicas": 1, "replicas": [{"state": "STARTING", "node_id": "n1"}]}
    assert model_state("RUNNING", dep) is ModelState.FAILED


def test_unhealthy_while_serve_recreates_the_warm_copy_is_starting() -> None:
    """Serve's own message while it recreates a dead deployment actor (Ray 2.60): a wake waits."""
    message = (
        "A deployment actor's health check failed. This deployment will be UNHEALTHY until the actor "
        "is recreated or a new deploy happens."
    )
    dep = {"status": "UNHEALTHY", "message": message, "target_num_replicas": 1, "replicas": [{"state": "STARTING"}]}
    assert model_state("RUNNING", dep) is ModelState.STARTING


def test_unhealthy_while_serve_replaces_a_dead_replica_is_starting() -> None:
    """Serve's own message after a replica died (Ray 2.60): a wake waits for the replacement,
    and makes room for it; without a replacement on its way the model stays failed."""
    message = (
        "A replica's health check failed. This deployment will be UNHEALTHY until the replica "
        "recovers or a new deploy happens."
    )
    placed = [{"state": "STARTING", "node_id": "n2"}]
    dep = {"status": "UNHEALTHY", "message": message, "target_num_replicas": 1, "replicas": placed}
    assert model_state("RUNNING", dep) is ModelState.STARTING
    assert model_state("RUNNING", {**dep, "replicas": []}) is ModelState.FAILED
    # Its machine lost: Serve's message is then about the replacement that never ran there, and
    # the next one waits for room (no node yet).
    lost = {
        **dep,
        "message": "A replica failed to start with exception. Retrying. Error: ... missing too many heartbeats",
    }
    assert model_state("RUNNING", {**lost, "replicas": [{"state": "STARTING", "node_id": None}]}) is ModelState.STARTING
    # A placed replacement whose constructor fails: failed, at once.
    assert model_state("RUNNING", {**lost, "replicas": placed}) is ModelState.FAILED


def test_gateway_and_foreign_apps_are_not_models() -> None:
    details = {
        "applications": {
            "gateway": _app("RUNNING", ["RUNNING"], import_path="deployments.gateway:build"),
            "other": {"status": "RUNNING", "deployed_app_config": None, "deployments": {}},
            "m": _app("RUNNING", ["RUNNING", "RUNNING"], 2),
        }
    }
    entries = entries_from_details(details)
    assert list(entries) == ["m"]
    assert entries["m"].replicas == 2 and entries["m"].nodes == ("node-0", "node-1")
    assert entries["m"].spec is not None and entries["m"].spec.task == "embed"


def test_invalid_args_list_the_model_as_failed_with_the_reason() -> None:
    details = {"applications": {"m": _app("DEPLOY_FAILED", None, args={"task": "nope", "model": "./x"})}}
    entry = entries_from_details(details)["m"]
    assert entry.state is ModelState.FAILED and entry.spec is None
    assert "field 'task'" in entry.message

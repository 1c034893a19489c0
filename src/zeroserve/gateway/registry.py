"""Which models exist and what state they are in, read from Serve's own details.

The gateway never asks a model replica about itself: that would wake it. Everything
it needs (task, limits, state, replicas and their nodes) comes from the Serve
controller's instance details, which hold each application's deployed config (its
``args``, i.e. the model spec) and its replicas. These functions are pure: they take
the details dict and return entries, so they are tested without Ray.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from zeroserve.config import MODEL_BUILDER, ConfigError, ModelSpec, parse_model_spec

__all__ = ["ModelEntry", "ModelState", "entries_from_details", "gpus_in_use", "model_state"]

# Serve's status message while it recreates a deployment actor (deployment_state.py, Ray 2.60).
_RECREATING_WARM_COPY = "until the actor is recreated"
# ... and after a replica's health check failed, while it starts a replacement (Ray 2.60).
_REPLACING_REPLICA = "until the replica recovers"
_STARTING_REPLICA_STATES = {"STARTING", "UPDATING", "RECOVERING", "PENDING_MIGRATION"}


class ModelState(enum.StrEnum):
    COLD = "cold"  # no replica, none wanted: the next request wakes it
    STARTING = "starting"  # a replica is wanted or starting but none serves yet
    READY = "ready"  # at least one replica serves
    FAILED = "failed"  # the application failed to deploy or its replicas keep dying


@dataclass(frozen=True)
class ModelEntry:
    """One model as the gateway sees it."""

    name: str
    spec: ModelSpec | None
    state: ModelState
    replicas: int = 0
    target_replicas: int = 0
    replica_nodes: tuple[str, ...] = ()  # one entry per running replica
    message: str = ""
    deployment: str = ""
    # The model the pool asked this one to yield its slice to ("" when not asked); it goes once idle.
    yielding_to: str = ""
    yield_asked_at: float = 0.0  # when it was asked (wall clock)
    # One entry per replica placed on a node and still starting: it holds its GPU slice already.
    starting_nodes: tuple[str, ...] = ()

    @property
    def evicting(self) -> bool:
        """The pool asked it to yield its slice and it has not yet."""
        return bool(self.yielding_to)

    @property
    def nodes(self) -> tuple[str, ...]:
        """The nodes its running replicas are on, each once."""
        return tuple(sorted(set(self.replica_nodes)))


def model_state(app_status: str, deployment: Mapping[str, Any] | None) -> ModelState:
    """Map a Serve application and its deployment to a model state.

    Args:
        app_status: the application's status (``RUNNING``, ``DEPLOYING``, ``DEPLOY_FAILED``...).
        deployment: the model deployment's details, or None before it exists.
    """
    if app_status == "DEPLOY_FAILED":
        return ModelState.FAILED
    if deployment is None:
        return (
            ModelState.STARTING
            if app_status in ("DEPLOYING", "NOT_STARTED")
            else (ModelState.FAILED if app_status == "UNHEALTHY" else ModelState.COLD)
        )
    states = [r.get("state") for r in deployment.get("replicas", [])]
    if "RUNNING" in states:
        return ModelState.READY
    message = str(deployment.get("message", ""))
    if deployment.get("status") == "UNHEALTHY" and _RECREATING_WARM_COPY in message:
        # Serve marks the deployment UNHEALTHY while it recreates a dead deployment actor (the
        # model's warm copy, deployments/warm.py): a wake waits for it instead of failing.
        return ModelState.STARTING
    starting = [r for r in deployment.get("replicas", []) if r.get("state") in _STARTING_REPLICA_STATES]
    if (
        deployment.get("status") == "UNHEALTHY"
        and starting
        and (_REPLACING_REPLICA in message or any(not r.get("node_id") for r in starting))
    ):
        # Its replica died (killed, or its machine lost) and Serve starts another, or waits for
        # room to place one: the model is waking, not failed, so a request waits and makes room
        # for it like any wake. (Refused as failed, a replacement that needed room never got it.)
        # A placed replacement whose constructor fails is still a failure, told at once.
        return ModelState.STARTING
    if deployment.get("status") in ("DEPLOY_FAILED", "UNHEALTHY"):
        return ModelState.FAILED
    if any(s in _STARTING_REPLICA_STATES for s in states):
        return ModelState.STARTING
    if int(deployment.get("target_num_replicas", 0)) > 0:
        return ModelState.STARTING
    return ModelState.COLD


def entries_from_details(details: Mapping[str, Any]) -> dict[str, ModelEntry]:
    """Read every model application out of ``ServeControllerClient.get_serve_details()``.

    Applications that were not deployed from a config through
    :data:`~zeroserve.config.MODEL_BUILDER` (the gateway itself, foreign apps) are
    skipped. A model whose args do not validate is listed as FAILED with the reason.
    """
    out: dict[str, ModelEntry] = {}
    for name, app in (details.get("applications") or {}).items():
        cfg = app.get("deployed_app_config") or {}
        if cfg.get("import_path") != MODEL_BUILDER:
            continue
        deployments = app.get("deployments") or {}
        dep_name, dep = next(iter(deployments.items()), ("", None))
        message = app.get("message") or ""
        try:
            spec: ModelSpec | None = parse_model_spec(cfg.get("args"), name)
        except ConfigError as err:
            spec, message = None, str(err)
        state = model_state(str(app.get("status", "")), dep)
        if spec is None:
            state = ModelState.FAILED
        if dep is not None and not message:
            message = dep.get("message") or ""
        replicas = [r for r in (dep or {}).get("replicas", []) if r.get("state") == "RUNNING"]
        starting = [r for r in (dep or {}).get("replicas", []) if r.get("state") == "STARTING" and r.get("node_id")]
        out[name] = ModelEntry(
            name=name,
            spec=spec,
            state=state,
            replicas=len(replicas),
            target_replicas=int((dep or {}).get("target_num_replicas", 0)),
            replica_nodes=tuple(str(r.get("node_id", "")) for r in replicas),
            starting_nodes=tuple(str(r["node_id"]) for r in starting),
            message=message,
            deployment=dep_name,
        )
    return out


def gpus_in_use(entries: Mapping[str, ModelEntry]) -> dict[str, float]:
    """GPUs held per node: each running or placed starting replica holds its model's fraction."""
    used: dict[str, float] = {}
    for entry in entries.values():
        for node in (*entry.replica_nodes, *entry.starting_nodes):
            used[node] = used.get(node, 0.0) + (entry.spec.gpu_fraction if entry.spec else 0.0)
    return used

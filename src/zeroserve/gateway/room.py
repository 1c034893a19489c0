"""Making room for a model that cannot be placed: the pool's idle models yield their slices.

Called while a request waits for a cold model (``waits.bounded`` polls once a second). The
choice is :func:`zeroserve.pool.choose_victims` over what this gateway replica knows (the
directory's running replicas, its own in-flight counts and last uses); the model's autoscaling
policy, which sees every gateway's requests, yields only when the victim is really idle and
held long enough, so a stale view here costs time, never a request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from zeroserve.gateway.registry import ModelEntry, ModelState, gpus_in_use
from zeroserve.pool import Resident, choose_victims

if TYPE_CHECKING:
    from zeroserve.gateway.state import GatewayState

__all__ = ["make_room", "residents"]

logger = logging.getLogger("zeroserve.gateway")


def residents(state: GatewayState, models: Mapping[str, ModelEntry]) -> list[Resident]:
    """Every running replica that holds a GPU slice, with what this gateway knows of its use."""
    out = []
    for name, entry in models.items():
        if entry.spec is None or entry.state is not ModelState.READY:
            continue
        busy = state.admission.per_model[name] + len(state.dispatcher.waiting.get(name, []))
        stats = state.stats.models.get(name)
        last_used = stats.last_request if stats is not None and stats.last_request is not None else 0.0
        for node in entry.replica_nodes:
            out.append(
                Resident(
                    model=name,
                    node=node,
                    fraction=entry.spec.gpu_fraction,
                    priority=entry.spec.priority,
                    last_used=last_used,
                    busy=busy,
                    min_hold_s=entry.spec.min_hold_s,
                    pinned=entry.spec.never_yields,
                )
            )
    return out


async def make_room(state: GatewayState, entry: ModelEntry, models: Mapping[str, ModelEntry]) -> list[str] | None:
    """Ask idle models to yield when ``entry`` fits on no node.

    Returns:
        The models asked now; [] when it fits, or room is already being made for it; None when it
        fits on no node and nothing there can yield (every resident busy, pinned or just woken).
    """
    if entry.spec is None or entry.state is ModelState.READY:
        return []
    capacity = await state.capacity()
    if not capacity:
        return []
    used = gpus_in_use(models)
    free = {node: gpus - used.get(node, 0.0) for node, gpus in capacity.items()}
    now = time.time()
    victims = choose_victims(entry.spec.gpu_fraction, free, residents(state, models), now)
    if victims is None:
        return None
    if not victims:
        return []
    asked = await state.backend.request_yield(entry.name, [v.model for v in victims])
    for victim in victims:
        if victim.model in asked:
            logger.info(
                "pool: %s yields %.3g GPU on node %s to %s (idle %.0f s, priority %d)",
                victim.model,
                victim.fraction,
                victim.node[:12],
                entry.name,
                now - victim.last_used,
                victim.priority,
            )
            state.obs.eviction(victim.model, entry.name)
    return asked

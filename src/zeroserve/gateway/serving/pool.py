"""The pool's own endpoints: health, status, models and usage. None of them wakes a model."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from zeroserve.errors import ModelNotFoundError, error_body
from zeroserve.gateway.openai_format import model_card
from zeroserve.gateway.registry import ModelEntry, ModelState, gpus_in_use
from zeroserve.gateway.serving.base import Serving

__all__ = ["PoolServing", "placeability"]

logger = logging.getLogger("zeroserve.gateway")

# /health answers within this even when the controller or the node list does not.
_HEALTH_READ_TIMEOUT_S = 10.0


class PoolServing(Serving):
    """What the pool holds and whether the gateway can serve."""

    async def health(self) -> Response:
        """200 with each model's placeability once the model directory can be read; 503 until then."""
        try:
            models = await asyncio.wait_for(self.state.backend.models(), _HEALTH_READ_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - not ready is the answer
            logger.warning("health: model directory unavailable: %s", err)
            return JSONResponse(
                error_body("the gateway cannot reach the Serve controller", "service_unavailable"),
                status_code=503,
                headers={"Retry-After": str(self.state.spec.retry_after_s)},
            )
        try:
            capacity = await asyncio.wait_for(self.state.backend.gpus(), _HEALTH_READ_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - placeability unknown, the gateway still serves
            capacity = {}
        return JSONResponse({"status": "ok", "models": placeability(models, capacity)})

    async def status(self) -> dict[str, Any]:
        """Models with their state and recent figures, and the pool's GPU occupancy per node."""
        models = await self.state.backend.models(refresh=True)
        try:
            capacity = await self.state.backend.gpus()
        except Exception as err:  # noqa: BLE001 - occupancy without capacities is still useful
            logger.warning("status: node capacities unavailable: %s", err)
            capacity = {}
        used = gpus_in_use(models)
        admission, dispatcher, stats = self.state.admission, self.state.dispatcher, self.state.stats
        rows = []
        for name, entry in sorted(models.items()):
            # In flight and waiting in this gateway replica (one of possibly several).
            load = {"in_flight": admission.per_model[name], "queued": len(dispatcher.waiting.get(name, []))}
            rows.append(
                {**model_card(entry, self._last_used(name))["zeroserve"], "id": name, **stats.summary(name), **load}
            )
        pool = [
            {
                "node": node,
                "gpus": capacity.get(node),
                "gpus_used": round(used.get(node, 0.0), 4),
                "occupancy": round(used.get(node, 0.0) / capacity[node], 4) if capacity.get(node) else None,
            }
            for node in sorted(set(capacity) | set(used))
        ]
        return {"models": rows, "pool": pool, "time": time.time()}

    def _last_used(self, model: str) -> float | None:
        stats = self.state.stats.models.get(model)
        return stats.last_request if stats is not None else None

    async def usage(self, authorization: str | None) -> dict[str, Any]:
        """The calling key's GPU-seconds today by model, what is left, and when it resets."""
        fair = self.state.fair
        if not fair.enabled:
            raise StarletteHTTPException(404, "usage is kept per API key, and API keys are off on this gateway")
        return await fair.usage(await fair.authenticate(authorization))

    async def list_models(self) -> dict[str, Any]:
        models = await self.state.backend.models(refresh=True)
        return {"object": "list", "data": [model_card(e, self._last_used(n)) for n, e in sorted(models.items())]}

    async def get_model(self, name: str) -> dict[str, Any]:
        entry = (await self.state.backend.models(refresh=True)).get(name)
        if entry is None:
            raise ModelNotFoundError(name)
        return model_card(entry, self._last_used(entry.name))


def placeability(models: dict[str, ModelEntry], capacity: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Whether each model could get a replica now: ready, or a node has its fraction free."""
    used = gpus_in_use(models)
    free = max((capacity[n] - used.get(n, 0.0) for n in capacity), default=None)
    out = {}
    for name, e in sorted(models.items()):
        if e.state is ModelState.READY:
            placeable: bool | None = True
        elif e.state is ModelState.FAILED or e.spec is None:
            placeable = False
        else:
            placeable = None if free is None else free + 1e-9 >= e.spec.gpu_fraction
        out[name] = {"state": e.state.value, "placeable": placeable}
    return out

"""The autoscaling policy of a model in the pool: Serve's own extension point, run by the controller.

``autoscaling_config.policy.policy_function: deployments.pool_policy:PoolPolicy``. Serve makes
one instance per deployment and calls it every control-loop tick with the deployment's
``AutoscalingContext``. The decision itself is :func:`zeroserve.pool.desired_replicas` (pure);
this class adds what only a Ray process can read: whether the pool asked the model to yield,
a key in the GCS key-value store (it outlives a controller restart), which it clears once the
model is at zero.

Serve wraps every custom policy with its bounds and delays, and a policy cannot shorten them:
so the model's own scale-to-zero delay is ``idle_to_zero_s`` here, and Serve's
``downscale_to_zero_delay_s`` is 0 (``zeroserve.config.POOL_YIELD_DELAY_S``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from zeroserve.pool import ScaleInput, desired_replicas

__all__ = ["NAMESPACE", "YIELD_TTL_S", "PoolPolicy", "evict_key", "yield_for", "yield_time", "yield_value"]

logger = logging.getLogger("zeroserve.pool")

NAMESPACE = "zeroserve_pool"
_BUSY_AT = "zeroserve_busy_at"


# A request to yield that has not been carried out in this long is stale (see PoolPolicy._read).
YIELD_TTL_S = 60.0


def evict_key(app: str) -> bytes:
    """The GCS key that asks model application ``app`` to yield its slice."""
    return f"evict:{app}".encode()


def yield_value(for_model: str, at: float) -> bytes:
    """The value of a yield key: when it was asked, and for which model."""
    return f"{at:.3f} {for_model}".encode()


def yield_for(value: bytes) -> str:
    """The model a yield key's value asks for ("" when unreadable)."""
    parts = value.split(b" ", 1)
    return parts[1].decode(errors="replace") if len(parts) == 2 else ""


def yield_time(value: bytes) -> float | None:
    try:
        return float(value.split(b" ", 1)[0])
    except ValueError:
        return None


class PoolPolicy:
    """A model's autoscaling decision with the pool's requests to yield.

    Args:
        idle_to_zero_s: the model's own delay before scaling to zero when idle.
        min_hold_s: the least idle time before it yields to another model.
        pinned: never yields.
        poll_s: how often the yield key is read (a GCS call, from the controller's loop).
    """

    def __init__(self, idle_to_zero_s: float, min_hold_s: float = 10.0, pinned: bool = False, poll_s: float = 0.25):
        self.idle_to_zero_s = idle_to_zero_s
        self.min_hold_s = min_hold_s
        self.pinned = pinned
        self.poll_s = poll_s
        self._checked_at = -1e9
        self._evict = False

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        now = time.time()
        requests = float(ctx.total_num_requests)
        busy_at = ctx.policy_state.get(_BUSY_AT)
        if busy_at is None or requests > 0 or ctx.current_num_replicas == 0:
            busy_at = now
        app = ctx.app_name or ctx.deployment_name
        if now - self._checked_at >= self.poll_s:
            self._checked_at = now
            self._evict = self._read(app)
        if self._evict and ctx.current_num_replicas == 0:
            self._clear(app)  # yielded: the next wake is not asked to yield again
        desired = desired_replicas(
            ScaleInput(
                current=ctx.current_num_replicas,
                target=ctx.target_num_replicas,
                requests=requests,
                target_ongoing=float(ctx.config.get_target_ongoing_requests()),
                idle_s=now - busy_at,
                evict=self._evict,
                idle_to_zero_s=self.idle_to_zero_s,
                min_hold_s=self.min_hold_s,
                pinned=self.pinned,
            )
        )
        return desired, {_BUSY_AT: busy_at}

    def _read(self, app: str) -> bool:
        """Whether a live request to yield stands (one older than YIELD_TTL_S is dropped: the
        model it was for has woken elsewhere or given up)."""
        from ray.experimental import internal_kv

        try:
            value = internal_kv._internal_kv_get(evict_key(app), namespace=NAMESPACE)
        except Exception as err:  # noqa: BLE001 - the GCS restarts: decide without the pool this tick
            logger.warning("pool: could not read the yield key of %s: %s", app, err)
            return False
        if value is None:
            return False
        asked_at = yield_time(value)
        if asked_at is None or time.time() - asked_at > YIELD_TTL_S:
            self._clear(app)
            return False
        return True

    def _clear(self, app: str) -> None:
        from ray.experimental import internal_kv

        try:
            internal_kv._internal_kv_del(evict_key(app), namespace=NAMESPACE)
        except Exception as err:  # noqa: BLE001 - read again next tick
            logger.warning("pool: could not clear the yield key of %s: %s", app, err)
        self._evict = False

"""The gateway application: ``import_path: deployments.gateway:build``, ``route_prefix: /``.

It never scales to zero. It finds model applications at run time from the Serve
controller's details, so adding or removing a model never restarts it, and reaches
each through a ``DeploymentHandle`` (whose request wakes a cold model).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve import Application
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from deployments.metrics import GatewayMetrics
from deployments.pool_policy import NAMESPACE, evict_key, yield_for, yield_time, yield_value
from deployments.warm import BUDGET_KEY
from zeroserve.config import GatewaySpec, parse_gateway_spec
from zeroserve.engines import Classification, Embedding
from zeroserve.errors import ModelUnavailableError, ZeroserveError, model_failed, model_saturated, replica_died
from zeroserve.gateway import ModelEntry, create_app, entries_from_details, gpus_in_use
from zeroserve.gateway.backend import Prompt
from zeroserve.logs import configure_logging
from zeroserve.protocol import GenerateParams
from zeroserve.quota import open_ledger

__all__ = ["Gateway", "ServeBackend", "build"]

logger = logging.getLogger("zeroserve.gateway")

# A controller read that takes longer than this is treated as a controller that is down.
_CONTROLLER_TIMEOUT_S = 5.0
_CONTROLLER_BACKOFF_S = 2.0


def _translate(err: BaseException, entry: ModelEntry, retry_after_s: int) -> BaseException:
    """Turn what a handle raises into the error the client should see."""
    if isinstance(err, RayTaskError) and isinstance(err.cause, ZeroserveError):
        return err.cause
    if isinstance(err, ZeroserveError):
        return err
    if isinstance(err, BackPressureError):
        return model_saturated(entry.name, "has too many queued requests", retry_after_s)
    if isinstance(err, DeploymentUnavailableError):
        return model_failed(entry.name, "it failed to deploy", retry_after_s)
    if isinstance(err, (RayActorError, ActorDiedError, ActorUnavailableError)):
        return replica_died(entry.name)
    return err


# A model waiting for room holds a claim this long: another gateway replica does not choose
# victims for it meanwhile (its victims may need their min_hold_s before they yield).
_ROOM_CLAIM_S = 15.0


def _request_yield(model: str, victims: list[str]) -> list[str]:
    """Claim the making of room for ``model`` in the GCS (one gateway replica wins), then set each
    victim's yield key, which its autoscaling policy reads (deployments/pool_policy.py)."""
    from ray.experimental import internal_kv

    claim, now = f"room:{model}".encode(), time.time()
    if internal_kv._internal_kv_put(claim, str(now).encode(), overwrite=False, namespace=NAMESPACE):
        held = internal_kv._internal_kv_get(claim, namespace=NAMESPACE)
        try:
            fresh = held is not None and now - float(held) < _ROOM_CLAIM_S
        except ValueError:
            fresh = False
        if fresh:
            return []
        internal_kv._internal_kv_put(claim, str(now).encode(), overwrite=True, namespace=NAMESPACE)
    asked, value = [], yield_value(model, now)
    for victim in victims:
        if not internal_kv._internal_kv_put(evict_key(victim), value, overwrite=False, namespace=NAMESPACE):
            asked.append(victim)
    return asked


def _yielding() -> dict[str, tuple[str, float]]:
    """The models the pool asked to yield and that have not yet (their GCS keys), each with the
    model it yields to and when it was asked."""
    from ray.experimental import internal_kv

    out: dict[str, tuple[str, float]] = {}
    try:
        for key in internal_kv._internal_kv_list(b"evict:", namespace=NAMESPACE):
            value = internal_kv._internal_kv_get(key, namespace=NAMESPACE)
            if value is not None:
                name = key.decode(errors="replace").removeprefix("evict:")
                out[name] = (yield_for(value) or "?", yield_time(value) or 0.0)
    except Exception as err:  # noqa: BLE001 - shown as not evicting until the next read
        logger.debug("pool: could not read the yield keys: %s", err)
    return out


def _publish_warm_budget(gb: float) -> None:
    """The warm tier's budget per node, where the warm copies read it (deployments/warm.py)."""
    from ray.experimental import internal_kv

    try:
        internal_kv._internal_kv_put(BUDGET_KEY, str(gb).encode(), overwrite=True, namespace=NAMESPACE)
    except Exception as err:  # noqa: BLE001 - the copies keep the last budget, or the default
        logger.warning("could not publish the warm tier's budget: %s", err)


class ServeBackend:
    """The gateway's view of Serve: a cached model directory and one handle per model."""

    def __init__(self, spec: GatewaySpec, client: Any = None) -> None:
        self.spec = spec
        self._client = client  # Serve's controller client; the replica's own when None
        self._entries: dict[str, ModelEntry] | None = None
        self._fetched_at = 0.0
        self._failed_at = -1e9
        # One controller read at a time, in its own thread: a read blocked on a dead controller
        # (Ray retries it until the controller is back) holds that thread only, never the
        # default executor that the key ledger uses, and never a second thread.
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="zeroserve-directory")
        self._pending: asyncio.Future[dict[str, ModelEntry]] | None = None
        self._pending_since = 0.0
        self._handles: dict[str, DeploymentHandle] = {}

    async def models(self, refresh: bool = False, max_age_s: float | None = None) -> dict[str, ModelEntry]:
        """The model directory, at most ``max_age_s`` old (the discovery TTL; 0 with ``refresh``).

        While the Serve controller is down (it restarts; replicas and handles keep serving) the
        last directory is used: after one read has taken ``_CONTROLLER_TIMEOUT_S``, callers get the
        cached directory at once until a read succeeds again.

        Raises:
            ModelUnavailableError: no directory was ever read and the controller does not answer.
        """
        now = time.monotonic()
        limit = max_age_s if max_age_s is not None else (0.0 if refresh else self.spec.discovery_ttl_s)
        if self._entries is not None and now - self._fetched_at < limit:
            return self._entries
        stuck = self._pending is not None and not self._pending.done()
        if self._entries is not None and (
            now - self._failed_at < _CONTROLLER_BACKOFF_S
            or (stuck and now - self._pending_since > _CONTROLLER_TIMEOUT_S)
        ):
            return self._entries  # the controller is not answering: do not queue on it again
        if not stuck:
            self._pending = asyncio.ensure_future(self._read())
            self._pending.add_done_callback(lambda f: f.cancelled() or f.exception())  # read by someone
            self._pending_since = now
        assert self._pending is not None
        try:
            # Concurrent callers share one read; a caller that gives up does not cancel it.
            return await asyncio.wait_for(asyncio.shield(self._pending), _CONTROLLER_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - the controller restarts; replicas keep serving
            self._failed_at = time.monotonic()
            if self._entries is None:
                raise ModelUnavailableError(
                    "the pool's directory of models is unreachable (the Serve controller is restarting); retry",
                    code="controller_unavailable",
                    retry_after_s=self.spec.retry_after_s,
                ) from None
            logger.warning(
                "could not read the Serve controller (%s); using the model list from %.0f s ago",
                type(err).__name__,
                time.monotonic() - self._fetched_at,
            )
            return self._entries

    async def _read(self) -> dict[str, ModelEntry]:
        client = self._client or serve.context._get_global_client()
        assert client is not None, "not running inside a Serve application"
        loop = asyncio.get_running_loop()
        details = await loop.run_in_executor(self._reader, client.get_serve_details)
        yielding = await loop.run_in_executor(self._reader, _yielding)
        entries = entries_from_details(details)
        self._entries = {
            n: dataclasses.replace(e, yielding_to=yielding[n][0], yield_asked_at=yielding[n][1]) if n in yielding else e
            for n, e in entries.items()
        }
        self._fetched_at = time.monotonic()
        for gone in set(self._handles) - set(self._entries):
            self._handles.pop(gone, None)
        return self._entries

    async def _handle(self, entry: ModelEntry) -> DeploymentHandle:
        deployment = entry.deployment
        while not deployment:
            # The application exists but Serve has not created its deployment yet (a model deployed
            # a moment ago). A handle to a deployment named "" would wait forever: wait for the
            # name instead (the caller's bound applies).
            await asyncio.sleep(0.5)
            current = (await self.models(max_age_s=0.5)).get(entry.name)
            if current is None:
                raise ModelUnavailableError(f"model '{entry.name}' was removed", code="model_failed", retry_after_s=1)
            deployment = current.deployment
        handle = self._handles.get(entry.name)
        if handle is None or handle.deployment_name != deployment:
            # The directory just read the app from the controller: no need to check again.
            handle = serve.get_deployment_handle(deployment, entry.name, _check_exists=False)
            self._handles[entry.name] = handle
        return handle

    async def gpus(self) -> dict[str, float]:
        import ray

        nodes = await asyncio.to_thread(ray.nodes)
        return {n["NodeID"]: float(n.get("Resources", {}).get("GPU", 0)) for n in nodes if n.get("Alive")}

    async def request_yield(self, model: str, victims: Sequence[str]) -> list[str]:
        return await asyncio.to_thread(_request_yield, model, list(victims))

    async def embed(self, entry: ModelEntry, texts: Sequence[str], dimensions: int | None) -> list[Embedding]:
        try:
            return await (await self._handle(entry)).embed.remote(list(texts), dimensions)  # type: ignore[no-any-return]
        except BaseException as err:
            raise _translate(err, entry, self.spec.retry_after_s) from None

    async def classify(self, entry: ModelEntry, texts: Sequence[str]) -> list[Classification]:
        try:
            return await (await self._handle(entry)).classify.remote(list(texts))  # type: ignore[no-any-return]
        except BaseException as err:
            raise _translate(err, entry, self.spec.retry_after_s) from None

    async def stream(self, entry: ModelEntry, prompt: Prompt, params: GenerateParams) -> AsyncIterator[Any]:
        async for item in self._stream(entry, "stream", prompt, params):
            yield item

    async def openai(self, entry: ModelEntry, endpoint: str, body: dict[str, Any]) -> AsyncIterator[Any]:
        async for item in self._stream(entry, "openai", endpoint, body):
            yield item

    async def _stream(self, entry: ModelEntry, method: str, *args: Any) -> AsyncIterator[Any]:
        try:
            handle = (await self._handle(entry)).options(stream=True)
        except BaseException as err:
            raise _translate(err, entry, self.spec.retry_after_s) from None
        response = getattr(handle, method).remote(*args)
        try:
            async for delta in response:
                yield delta
        except (asyncio.CancelledError, GeneratorExit):
            response.cancel()
            raise
        except BaseException as err:
            raise _translate(err, entry, self.spec.retry_after_s) from None


@serve.deployment(name="Gateway", health_check_period_s=10)
@serve.ingress()
class Gateway:
    """The OpenAI endpoint. Its app is built per replica around a :class:`ServeBackend`."""

    async def __init__(self, spec: dict[str, Any]) -> None:  # type: ignore[misc]
        configure_logging()
        self.spec = GatewaySpec.model_validate(spec)
        self.backend = ServeBackend(self.spec)
        self.metrics = GatewayMetrics() if self.spec.metrics else None
        logger.info("gateway config: %s", self.spec.model_dump())
        _publish_warm_budget(self.spec.host_cache_gb)
        ledger = self.spec.auth.ledger
        self.ledger = open_ledger(ledger.backend, ledger.path, ledger.url) if self.spec.auth.enabled else None
        if not self.spec.auth.enabled:
            await self._warn_if_exposed()
        if self.metrics is not None:
            self._refresher = asyncio.create_task(self._publish_states())

    async def _warn_if_exposed(self) -> None:
        """API keys off is for a local demo: say so loudly if the proxy listens beyond loopback."""
        try:
            client = serve.context._get_global_client()
            assert client is not None
            details = await asyncio.to_thread(client.get_serve_details)
            host = str((details.get("http_options") or {}).get("host", "127.0.0.1"))
        except Exception:  # noqa: BLE001 - no warning is better than no gateway
            return
        if host not in ("127.0.0.1", "localhost", "::1"):
            logger.warning(
                "!!! API keys are OFF and the gateway listens on %s: anyone who can reach this port can use "
                "every model. Set auth.enabled in the gateway's args (see README, 'API keys and quotas'). !!!",
                host,
            )

    async def _publish_states(self) -> None:
        """Keep the model-state and replica gauges current even when nobody lists models."""
        assert self.metrics is not None
        while True:
            try:
                # The directory as fresh as any request would see it: no extra controller reads.
                models = await self.backend.models(max_age_s=self.spec.discovery_ttl_s)
                self.metrics.states({n: (e.state.value, e.replicas) for n, e in models.items()})
                self.metrics.pool(gpus_in_use(models), await self.backend.gpus())
            except Exception as err:  # noqa: BLE001 - the next round retries
                logger.warning("could not refresh model states: %s", err)
            await asyncio.sleep(max(self.spec.discovery_ttl_s, 2.0))

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.spec, self.backend, self.metrics, echo_request_id=False, ledger=self.ledger)


def build(args: dict[str, Any]) -> Application:
    """Build the gateway application from its ``args``.

    Raises:
        ConfigError: the args are invalid; Serve shows the message in ``serve status``.
    """
    spec = parse_gateway_spec(args)
    return Gateway.options(  # type: ignore[attr-defined]
        num_replicas=spec.num_replicas,
        ray_actor_options={"num_cpus": spec.num_cpus},
        # The gateway sheds load itself (503 + Retry-After); Serve must not queue first, also while
        # slow uploads hold their places.
        max_ongoing_requests=spec.max_inflight_requests + spec.max_slow_bodies + 64,
        # A replica being replaced or removed finishes what it holds (streams too) first.
        graceful_shutdown_timeout_s=spec.shutdown_grace_s,
    ).bind(spec.model_dump())

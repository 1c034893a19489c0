"""One model as a Serve application: ``import_path: deployments.model:build``.

The deployment adds what Ray does well around an engine: a GPU fraction, autoscaling
to zero, dynamic batching, health checks. The engine does the model work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import DeploymentActorConfig

from deployments.metrics import ReplicaMetrics
from deployments.warm import WARM_ACTOR, NoWarmCopy, WarmEngine, WarmModel
from zeroserve.config import ModelSpec, parse_model_spec
from zeroserve.engines import Classification, Embedding, Engine, create_engine
from zeroserve.errors import ModelUnavailableError
from zeroserve.logs import configure_logging
from zeroserve.protocol import GenerateParams
from zeroserve.quota import SharedMeter
from zeroserve.streams import coalesce
from zeroserve.wire import Accepted, Delta, Meter, OpenAIStream, Usage, split_usage

__all__ = ["ModelServer", "build"]


@dataclasses.dataclass
class _Work:
    engine_s: float = 0.0  # set when the work ends


logger = logging.getLogger("zeroserve.model")


@serve.deployment(name="ModelServer", health_check_period_s=10, health_check_timeout_s=30)
class ModelServer:
    """Serve one engine.

    Args:
        spec: the model spec as a dict (validated again here: replicas may be
            restarted long after the build).
        engine_factory: builds the engine; tests inject a fake one.
    """

    async def __init__(  # type: ignore[misc]  # Serve supports async constructors
        self, spec: dict[str, Any], engine_factory: Callable[..., Engine] | None = None
    ) -> None:
        self.started_at = time.time()
        configure_logging()
        self.spec = ModelSpec.model_validate(spec)
        self.name = serve.get_replica_context().app_name
        self.engine: Engine = await self._engine(engine_factory)
        self._embed_batch.set_max_batch_size(self.spec.max_batch_size)  # type: ignore[attr-defined]
        self._embed_batch.set_batch_wait_timeout_s(self.spec.batch_wait_timeout_s)  # type: ignore[attr-defined]
        self._classify_batch.set_max_batch_size(self.spec.max_batch_size)  # type: ignore[attr-defined]
        self._classify_batch.set_batch_wait_timeout_s(self.spec.batch_wait_timeout_s)  # type: ignore[attr-defined]
        self.batch_sizes: list[int] = []
        self.ready_at = time.time()
        self.metrics = ReplicaMetrics(self.name)
        self.meter = SharedMeter(on_busy=lambda seconds: self.metrics.gpu_seconds(seconds * self.spec.gpu_fraction))
        timings = dict(getattr(self.engine, "timings", {}))
        self.metrics.started(
            {**{k.removesuffix("_s"): v for k, v in timings.items()}, "total": self.ready_at - self.started_at}
        )

    async def _engine(self, engine_factory: Callable[..., Engine] | None) -> Engine:
        """The model's warm copy attached (deployments/warm.py), or an engine built here: when
        the model is not in the warm tier, or its copy refused (on another node than this
        replica, or a vLLM model on a GPU)."""
        if engine_factory is None and self.spec.uses_warm_tier:
            warm = WarmEngine(self.name)
            try:
                await warm.start()
                return warm
            except NoWarmCopy as err:
                logger.info("%s; building the model in this replica", err)
        engine = (engine_factory or create_engine)(self.spec, self.name)
        await engine.start()
        return engine

    async def check_health(self) -> None:
        await self.engine.ahealth()

    async def __del__(self) -> None:
        """Serve stops the replica: a warm copy is told it may be dropped again."""
        await self.engine.stop()

    @contextlib.asynccontextmanager
    async def _engine_work(self) -> AsyncIterator[_Work]:
        """Time the engine work inside (shared with concurrent work: processor sharing), and turn
        a failure on an engine that died into a 503 to retry."""
        work = _Work()
        token = self.meter.enter()
        try:
            yield work
        except Exception as err:
            raise await self._unavailable_if_dead(err) from None
        finally:
            work.engine_s = self.meter.exit(token)

    async def _unavailable_if_dead(self, err: Exception) -> Exception:
        """A request that failed because the engine died is a 503 to retry, not a 500.

        Serve replaces the replica once its health check fails (vLLM's engine core killed,
        a CUDA error that poisons the process); until then requests fail fast and clearly.
        """
        try:
            await self.engine.ahealth()  # a warm copy is asked about its engine
        except Exception as dead:  # noqa: BLE001 - any health failure means the engine is gone
            logger.warning("request failed on a dead engine (%s): %r", dead, err)
            return ModelUnavailableError(
                f"model '{self.name}' lost its engine ({dead}); its replica is being replaced, retry",
                code="engine_dead",
                retry_after_s=5,
            )
        return err

    # -- embeddings and classification: batched across requests ------------------
    async def embed(self, texts: Sequence[str], dimensions: int | None = None) -> list[Embedding]:
        await self.engine.acheck_inputs(texts, dimensions)
        return await self._embed_batch(list(texts))

    async def classify(self, texts: Sequence[str]) -> list[Classification]:
        await self.engine.acheck_inputs(texts)
        return await self._classify_batch(list(texts))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _embed_batch(self, requests: list[list[str]]) -> list[list[Embedding]]:
        return await self._run_batched(self.engine.aembed, requests)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _classify_batch(self, requests: list[list[str]]) -> list[list[Classification]]:
        return await self._run_batched(self.engine.aclassify, requests)

    async def _run_batched(
        self, fn: Callable[[list[str]], Awaitable[list[Any]]], requests: list[list[str]]
    ) -> list[list[Any]]:
        flat = [t for texts in requests for t in texts]
        self.batch_sizes = (self.batch_sizes + [len(requests)])[-100:]
        async with self._engine_work() as work:
            results = await fn(flat)
        # The batch's engine time is shared equally among its inputs.
        each = work.engine_s * self.spec.gpu_fraction / max(len(flat), 1)
        results = [dataclasses.replace(r, gpu_s=each) for r in results]
        out, pos = [], 0
        for texts in requests:
            out.append(results[pos : pos + len(texts)])
            pos += len(texts)
        return out

    # -- generation ----------------------------------------------------------------
    async def stream(
        self, prompt: str | list[dict[str, str]], params: GenerateParams
    ) -> AsyncIterator[Accepted | Delta | Meter]:
        """:class:`Accepted`, the deltas, then the request's :class:`Meter` reading (zeroserve.wire)."""
        text = prompt if isinstance(prompt, str) else await self.engine.arender_chat(prompt)
        async with self._engine_work() as work:
            async for message in self.engine.stream(text, params):
                yield message
        yield Meter(work.engine_s * self.spec.gpu_fraction)

    async def openai(self, endpoint: str, body: dict[str, Any]) -> AsyncIterator[Any]:
        """An OpenAI request served by the engine's own OpenAI layer (vLLM), in zeroserve.wire's
        messages: :class:`OpenAIJson`, or :class:`OpenAIStream` then text with vLLM's usage chunk
        as a :class:`Usage`; then the :class:`Meter` reading.

        SSE lines already waiting are sent as one item: each item costs a message on every
        hop (replica, gateway, proxy), which under load costs more than the tokens.
        """
        async with self._engine_work() as work:
            stream = self.engine.openai(endpoint, body)
            first = await anext(stream)
            yield first
            if isinstance(first, OpenAIStream):
                async for chunk in coalesce(_usage_apart(stream), interval_s=self.spec.stream_batch_s):
                    yield chunk
        yield Meter(work.engine_s * self.spec.gpu_fraction)

    async def stats(self) -> dict[str, Any]:
        """Start-up timings and recent batch sizes (for benchmarks and operators)."""
        return {
            **await self.engine.astats(),
            "started_at": self.started_at,
            "ready_at": self.ready_at,
            "engine_timings": dict(getattr(self.engine, "timings", {})),
            "start_path": getattr(self.engine, "path", "") or "cold",
            "batch_sizes": list(self.batch_sizes),
        }


async def _usage_apart(stream: AsyncIterator[Any]) -> AsyncIterator[str | Usage]:
    """vLLM's SSE lines (what follows its :class:`OpenAIStream`), its usage chunk read as data
    into a :class:`Usage` of its own."""
    async for line in stream:
        for part in split_usage(line):
            yield part


def build(args: dict[str, Any]) -> Application:
    """Build a model application from its spec (the ``args`` of its config entry).

    Raises:
        ConfigError: the spec is invalid; Serve shows the message in ``serve status``.
    """
    spec = parse_model_spec(args)
    warm = []
    if spec.uses_warm_tier:
        # The model itself lives here, kept built while the replicas come and go (the warm tier).
        warm = [
            DeploymentActorConfig(
                name=WARM_ACTOR,
                actor_class=WarmModel,
                init_kwargs={"spec": spec.model_dump()},
                actor_options={"num_cpus": spec.num_cpus},
            )
        ]
    return ModelServer.options(  # type: ignore[attr-defined]
        deployment_actors=warm,
        ray_actor_options={"num_gpus": spec.gpu_fraction, "num_cpus": spec.num_cpus},
        autoscaling_config=spec.ray_autoscaling(),
        max_ongoing_requests=spec.max_ongoing_requests,
        max_queued_requests=spec.max_queued_requests,
        # A replica that is told to stop checks for unfinished requests this often (Serve's default
        # is 2 s): a model yielding its slice to a waiting one frees it sooner.
        graceful_shutdown_wait_loop_s=0.25,
    ).bind(spec.model_dump())

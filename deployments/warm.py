"""The warm tier: a model kept built in host memory between wakes, as ZeroGPU keeps every Space.

A wake used to start a Ray worker, import torch and transformers and build the model from disk
(seconds) while reading the weights takes a fraction of a second. Here the model lives in a
:class:`WarmModel`, a deployment-scoped actor of its model deployment (Ray 2.60's
``deployment_actors``: started and health-checked by the Serve controller, shared by the
deployment's replicas, alive while the deployment is, also at zero replicas). The Serve
replica that asks for the GPU fraction and scales to zero is thin: it imports no torch, and its
start *attaches* to the warm model (:class:`WarmEngine`) instead of building one.

Bounded: the warm copies on a node hold at most ``host_cache_gb`` (the gateway's setting, read
from the GCS) of weights; the least recently used copies that no replica is attached to are
dropped first, and a dropped model is built again on its next wake (the slow path, correct).
A warm copy remembers the files it was built from: a changed folder is built again on attach.

vLLM models are kept warm too: the copy holds vLLM's engine (its engine core a child process)
and its OpenAI layer, and the replica forwards each OpenAI request to it. That is only on the
CPU platform: on a GPU a vLLM engine holds its KV cache on the card while it lives, which a
detached copy must not (vLLM's sleep mode is the way; it is not written until it can be tested
on a GPU), so there the copy refuses and the replica starts its own engine as before.

The cost is one Ray call per request (replica to warm actor) and per streamed message; see
docs/architecture.md ("The warm tier") for what was measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import ray
from ray import serve

from deployments.pool_policy import NAMESPACE
from zeroserve.config import ModelSpec, resolve_model_source
from zeroserve.engines import Classification, Embedding, Engine, create_engine
from zeroserve.logs import configure_logging
from zeroserve.protocol import GenerateParams
from zeroserve.streams import coalesce
from zeroserve.wire import Accepted, Delta

__all__ = ["BUDGET_KEY", "WARM_ACTOR", "NoWarmCopy", "WarmEngine", "WarmModel", "fingerprint"]

logger = logging.getLogger("zeroserve.warm")

WARM_ACTOR = "warm"

BUDGET_KEY = b"host_cache_gb"
DEFAULT_BUDGET_GB = 16.0
_GB = 1024**3
# A copy rebuilt (its files changed) while a replica was attached: the old engine's requests
# have this long to finish before it is closed.
OLD_ENGINE_GRACE_S = 60.0
# Serve creates deployment actors, named, in its own namespace (deployment_state.py, Ray 2.60).
SERVE_NAMESPACE = "serve"


def fingerprint(source: str) -> str:
    """What a model folder holds now (file names, sizes, modification times); a hub id as is."""
    root = Path(source)
    if not root.is_dir():
        return source
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return json.dumps([(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def _kv() -> Any:
    from ray.experimental import internal_kv

    return internal_kv


def budget_bytes() -> float:
    """The warm tier's budget per node (``host_cache_gb`` of the gateway, in the GCS)."""
    try:
        value = _kv()._internal_kv_get(BUDGET_KEY, namespace=NAMESPACE)
        return float(value) * _GB if value is not None else DEFAULT_BUDGET_GB * _GB
    except Exception:  # noqa: BLE001 - the GCS restarts: the default holds meanwhile
        return DEFAULT_BUDGET_GB * _GB


@ray.remote
class WarmModel:
    """One model's engine, built in host memory and kept between wakes.

    Args:
        spec: the model's spec (as a dict).
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        configure_logging()
        self.spec = ModelSpec.model_validate(spec)
        self.app = serve.get_deployment_actor_context().app_name
        self.engine: Engine | None = None
        self.built_from = ""
        self.replicas: set[str] = set()  # the replicas attached (a retried attach counts once)
        self.last_used = time.time()
        self.bytes = 0
        self.timings: dict[str, float] = {}
        self.node = ray.get_runtime_context().get_node_id()
        self.name = ray.get_runtime_context().get_actor_name()
        self._lock = asyncio.Lock()  # an async actor's constructor runs in its event loop
        self.refused = ""
        self._closing: set[asyncio.Task[None]] = set()  # engines being shut down
        started = time.perf_counter()
        import torch  # noqa: F401 - the imports are what a warm process saves every wake
        import transformers  # noqa: F401

        if self.spec.engine == "vllm":
            from vllm.platforms import current_platform

            if not current_platform.is_cpu():
                self.refused = "vLLM models keep their engine in the replica on a GPU"
        self.import_s = time.perf_counter() - started
        # Built now, so that even the first wake attaches (unless the node's budget is full).
        self._prebuild: asyncio.Task[None] | None = None
        if not self.refused:
            self._prebuild = asyncio.get_running_loop().create_task(self._build_ahead())

    async def _build_ahead(self) -> None:
        """A model that does not build stays unbuilt: its wake builds it again and fails as itself
        (the replica's constructor), as a model without a warm copy would."""
        async with self._lock:
            try:
                source = resolve_model_source(self.spec)
                await self._build(await asyncio.to_thread(fingerprint, source), waking=False)
            except Exception as err:  # noqa: BLE001 - reported by the wake that needs it
                logger.warning("warm: %s was not built ahead of its wake: %s", self.app, err)
                # Never raises: every attach awaits this task (a GCS that is restarting is
                # read again by the next attach's budget).
                with contextlib.suppress(Exception):
                    await self._forget()

    @property
    def attached(self) -> int:
        return len(self.replicas)

    async def attach(self, replica: str, node: str, gpu_ids: Sequence[str] = ()) -> dict[str, Any]:
        """A replica starts: the model, built now if it is not warm or its files changed.

        Args:
            replica: the replica's id (attaching again is one attach).
            node: the replica's node. A copy on another node cannot serve it (its GPU slice is
                there): it is refused, and the replica builds its own engine.

        Returns:
            ``path`` ("warm": it was built already; "cold": built now, or again because its
            engine died; "changed": rebuilt because its files changed), the build's timings, and
            ``refused`` (why the replica must build its own engine; empty when attached).
        """
        if node != self.node:
            return {"refused": f"the warm copy of {self.app} is on node {self.node[:12]}"}
        if self.refused:
            return {"refused": self.refused}
        if self._prebuild is not None:
            await asyncio.shield(self._prebuild)
        async with self._lock:
            self.replicas.add(replica)
            self.last_used = time.time()
            source = resolve_model_source(self.spec)
            now = await asyncio.to_thread(fingerprint, source)
            path = "warm"
            if self.engine is not None and not self._healthy():
                logger.warning("warm: the engine of %s died; building it again", self.app)
                await self._forget()
            if self.engine is None or now != self.built_from:
                path = "cold" if self.engine is None else "changed"
                await self._build(now, waking=True)
            # Now the most recently used: the node's least recently used copies make room.
            await asyncio.to_thread(self._keep_budget)
            if gpu_ids:  # the replica's GPU slice: the copy moves there while it is attached
                await asyncio.to_thread(self._place, f"cuda:{int(gpu_ids[0])}")
            return {
                "refused": "",
                "path": path,
                "timings": dict(self.timings),
                "import_s": self.import_s,
                "bytes": self.bytes,
            }

    async def detach(self, replica: str) -> None:
        """A replica stopped: the model stays warm, and may be dropped under the budget."""
        async with self._lock:
            self.replicas.discard(replica)
            self.last_used = time.time()
            if not self.attached:
                await asyncio.to_thread(self._place, "cpu")  # the GPU slice is given back
            self._register()

    async def drop(self) -> bool:
        """Leave the warm tier (frees the host memory) unless a replica is attached or it is busy
        attaching (never waits: another copy's build is waiting for the answer)."""
        if self._lock.locked():
            return False
        async with self._lock:
            if self.attached or self.engine is None:
                return False
            logger.info("warm: %s leaves the warm tier (%.0f MB)", self.app, self.bytes / 2**20)
            await self._forget()
            return True

    async def info(self) -> dict[str, Any]:
        return {
            "warm": self.engine is not None,
            "attached": self.attached,
            "bytes": self.bytes,
            "pid": os.getpid(),
            "node": self.node,
            "last_used": self.last_used,
        }

    # -- the engine's work, for the attached replicas ---------------------------------
    async def check_inputs(self, texts: Sequence[str], dimensions: int | None) -> None:
        await self._engine().acheck_inputs(texts, dimensions)

    async def embed(self, texts: Sequence[str], dimensions: int | None) -> list[Embedding]:
        return await asyncio.to_thread(self._engine().embed, texts, dimensions)

    async def classify(self, texts: Sequence[str]) -> list[Classification]:
        return await asyncio.to_thread(self._engine().classify, texts)

    async def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        return await self._engine().arender_chat(messages)

    async def stream(self, prompt: str, params: GenerateParams) -> AsyncIterator[Accepted | Delta]:
        async for message in self._engine().stream(prompt, params):
            yield message

    async def openai(self, endpoint: str, body: dict[str, Any]) -> AsyncIterator[Any]:
        """An OpenAI request for vLLM's own layer; the SSE lines already waiting go as one message
        (each message is a Ray object on the way to the replica)."""
        async for message in coalesce(self._engine().openai(endpoint, body), interval_s=self.spec.stream_batch_s):
            yield message

    async def health(self) -> None:
        """Raises when the engine an attached replica serves with died (vLLM's engine core)."""
        if self.engine is not None:
            self.engine.health()

    async def stats(self) -> dict[str, Any]:
        return {"peak_running_requests": getattr(self.engine, "peak_running_requests", None)}

    # -- inside -----------------------------------------------------------------------
    def _healthy(self) -> bool:
        try:
            self._engine().health()
            return True
        except Exception:  # noqa: BLE001 - any failure: the engine is gone
            return False

    def _close_later(self, engine: Engine, delay_s: float) -> None:
        """Shut ``engine`` down in ``delay_s``, without waiting for it (a reference is kept)."""
        task = asyncio.get_running_loop().create_task(_close_after(engine, delay_s))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _forget(self) -> None:
        """Let the built engine go; one with processes of its own (vLLM's engine core) is shut
        down just after (that takes seconds, which whoever asked for the drop does not wait for)."""
        engine, self.engine, self.built_from, self.bytes = self.engine, None, "", 0
        self._unregister()
        if engine is not None:
            self._close_later(engine, 0.0)
        del engine
        gc.collect()

    def _place(self, device: str) -> None:
        """Move the copy to ``device``; a logical GPU (no CUDA on the node: the CPU demo) is the host."""
        import torch

        place = getattr(self.engine, "place", None)
        if place is not None and (device == "cpu" or torch.cuda.is_available()):
            place(device)

    def _engine(self) -> Engine:
        if self.engine is None:
            raise RuntimeError(f"model '{self.app}' is not attached to its warm copy")
        return self.engine

    async def _build(self, built_from: str, waking: bool) -> None:
        """Build the model in host memory, then keep the node's budget; a copy built ahead of a
        wake is dropped again if it does not fit."""
        old = self.engine
        if not self.replicas:  # nobody uses the old one: free it before building the new one
            await self._forget()
            old = None
        started = time.perf_counter()
        engine = create_engine(self.spec, self.app)
        engine.host_only = True  # type: ignore[attr-defined]  # on a GPU only while attached
        if self.spec.engine == "vllm":
            await engine.start()  # vLLM's engine lives in this event loop
        else:
            await asyncio.to_thread(engine.load)
        self.engine, self.built_from = engine, built_from
        if old is not None:  # rebuilt under a replica still attached: its requests end first
            self._close_later(old, OLD_ENGINE_GRACE_S)
        self.timings = {**getattr(engine, "timings", {}), "build_s": time.perf_counter() - started}
        self.bytes = int(getattr(engine, "host_bytes", lambda: 0)())
        if not waking and not await asyncio.to_thread(self._keep_budget):
            await self._forget()

    def _register(self) -> None:
        if self.engine is None:
            return
        value = json.dumps({"bytes": self.bytes, "last_used": self.last_used, "attached": self.attached})
        _kv()._internal_kv_put(self._key(), value.encode(), overwrite=True, namespace=NAMESPACE)

    def _unregister(self) -> None:
        _kv()._internal_kv_del(self._key(), namespace=NAMESPACE)

    def _key(self) -> bytes:
        return f"warm:{self.node}:{self.name}".encode()

    def _keep_budget(self) -> bool:
        """Drop the least recently used warm copies on this node that no replica is attached
        to until the node's warm copies fit its budget. Returns whether they fit."""
        self._register()
        kv = _kv()
        copies = []
        for key in kv._internal_kv_list(f"warm:{self.node}:".encode(), namespace=NAMESPACE):
            raw = kv._internal_kv_get(key, namespace=NAMESPACE)
            if raw is not None:
                copies.append((key, json.loads(raw)))
        total = sum(e["bytes"] for _, e in copies)
        budget = budget_bytes()
        for key, entry in sorted(copies, key=lambda c: c[1]["last_used"]):
            if total <= budget:
                break
            if key == self._key() or entry["attached"]:
                continue
            name = key.decode().split(":", 2)[2]
            dropped: bool
            try:
                dropped = bool(ray.get(ray.get_actor(name, namespace=SERVE_NAMESPACE).drop.remote(), timeout=5))
            except (ValueError, ray.exceptions.RayActorError):  # its actor is gone: so is its copy
                logger.info("warm: the copy of %s is gone with its actor", name)
                kv._internal_kv_del(key, namespace=NAMESPACE)
                dropped = True
            except ray.exceptions.GetTimeoutError:  # busy building or attaching: it stays
                dropped = False
            if dropped:
                total -= entry["bytes"]
        if total > budget:
            logger.warning(
                "warm: the copies on node %s hold %.1f MB, over the %.1f MB budget",
                self.node[:12],
                total / 2**20,
                budget / 2**20,
            )
        return total <= budget


async def _close_after(engine: Engine, delay_s: float) -> None:
    await asyncio.sleep(delay_s)
    try:
        await engine.close()
    except Exception as err:  # noqa: BLE001 - a dead engine's processes are gone already
        logger.warning("warm: closing an engine: %r", err)


class NoWarmCopy(Exception):
    """The model's warm copy cannot serve this replica: it is on another node than the replica
    (whose GPU slice is here), or it is a vLLM model on a GPU."""


class WarmEngine(Engine):
    """The engine as a replica sees it: the model's warm copy, one Ray call away."""

    def __init__(self, app: str) -> None:
        self.app = app
        self.handle: Any = None
        self.timings: dict[str, float] = {}
        self.path = ""
        ctx = ray.get_runtime_context()
        self.replica = ctx.get_actor_id() or ""
        self.node = ctx.get_node_id()
        self._reattaching: asyncio.Lock | None = None

    def load(self) -> None:  # pragma: no cover - the warm copy loads (start attaches)
        raise NotImplementedError

    async def start(self, timeout_s: float = 120.0) -> None:
        """Attach to the warm copy. One that died is recreated by the controller (its health check,
        every 10 s): until then its name may still resolve to the dead actor, so this retries.

        Raises:
            NoWarmCopy: the copy refused (the replica builds its own engine).
        """
        started = time.perf_counter()
        while True:
            self.handle = await _deployment_actor(timeout_s)
            try:
                info = await self.handle.attach.remote(self.replica, self.node, ray.get_gpu_ids())
                break
            except ray.exceptions.RayTaskError as err:
                raise _cause(err) from None
            except ray.exceptions.RayActorError:
                if time.perf_counter() - started > timeout_s:
                    raise
                await asyncio.sleep(0.5)
        if info["refused"]:
            raise NoWarmCopy(info["refused"])
        self.path = info["path"]
        self.timings = {**info["timings"], "attach_s": time.perf_counter() - started}
        logger.info("%s attached to its warm copy (%s path) in %.2f s", self.app, self.path, self.timings["attach_s"])

    async def stop(self) -> None:
        if self.handle is not None:
            try:
                await self.handle.detach.remote(self.replica)
            except ray.exceptions.RayActorError:
                pass

    def health(self) -> None:
        # The warm actor's own health is the controller's (it recreates it); a call that finds it
        # dead attaches to the new one (_call). Its engine's health is ahealth's.
        return None

    async def ahealth(self) -> None:
        await self._call("health")

    async def astats(self) -> dict[str, Any]:
        return await self._call("stats")  # type: ignore[no-any-return]

    async def acheck_inputs(self, texts: Sequence[str], dimensions: int | None = None) -> None:
        await self._call("check_inputs", list(texts), dimensions)

    async def arender_chat(self, messages: Sequence[dict[str, str]]) -> str:
        return await self._call("render_chat", list(messages))  # type: ignore[no-any-return]

    async def aembed(self, texts: Sequence[str], dimensions: int | None = None) -> list[Embedding]:
        return await self._call("embed", list(texts), dimensions)  # type: ignore[no-any-return]

    async def aclassify(self, texts: Sequence[str]) -> list[Classification]:
        return await self._call("classify", list(texts))  # type: ignore[no-any-return]

    async def stream(self, prompt: str, params: GenerateParams) -> AsyncIterator[Accepted | Delta]:
        async for message in self._stream("stream", prompt, params):
            yield message

    async def openai(self, endpoint: str, body: dict[str, Any]) -> AsyncIterator[Any]:
        async for message in self._stream("openai", endpoint, body):
            yield message

    async def _stream(self, method: str, *args: Any) -> AsyncIterator[Any]:
        started = False
        for attempt in (0, 1):
            generator = None
            try:
                generator = getattr(self.handle, method).options(num_returns="streaming").remote(*args)
                async for ref in generator:
                    started = True
                    yield await ref
                generator = None
                return
            except ray.exceptions.RayTaskError as err:
                raise _cause(err) from None
            except ray.exceptions.RayActorError:
                generator = None
                if started or attempt:
                    raise
                await self._reattach()
            finally:
                if generator is not None:  # left early (the client went away): stop generating
                    ray.cancel(generator)

    async def _call(self, method: str, *args: Any) -> Any:
        for attempt in (0, 1):
            try:
                return await getattr(self.handle, method).remote(*args)
            except ray.exceptions.RayTaskError as err:
                raise _cause(err) from None
            except ray.exceptions.RayActorError:
                if attempt:
                    raise
                await self._reattach()
        raise AssertionError("unreachable")

    async def _reattach(self) -> None:
        """The warm actor died: the controller starts a new one; attach to it (it builds the model).
        Calls that fail together attach once."""
        if self._reattaching is None:
            self._reattaching = asyncio.Lock()
        handle = self.handle
        async with self._reattaching:
            if self.handle is not handle:
                return  # another call attached meanwhile
            logger.warning("%s lost its warm copy; attaching to the new one", self.app)
            await self.start()


def _cause(err: Exception) -> Exception:
    """The exception the warm copy raised (an InvalidRequestError stays a 400), not Ray's wrapper."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, Exception) else err


async def _deployment_actor(timeout_s: float = 120.0) -> Any:
    """The deployment's warm actor; right after a recreation the name resolves a moment later."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return serve.get_deployment_actor(WARM_ACTOR)
        except ValueError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)

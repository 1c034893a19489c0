"""How long a request waits for its model, in one place.

A ready model answers within the request timeout, unless every node its replicas ran on is
lost meanwhile (a machine gone at once: Ray may not fail the call for a long while), which is
a 503 ``replica_died`` as soon as Ray lists those nodes dead. A cold model's first answer
includes its wake, so it gets the model's cold-start bound, counts one cold start per wake,
and stops waiting as soon as Serve says the model failed to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

from zeroserve.errors import model_failed, model_not_ready, pool_busy, replica_died
from zeroserve.gateway.registry import ModelEntry, ModelState
from zeroserve.gateway.room import RoomLook, make_room

if TYPE_CHECKING:
    from zeroserve.gateway.middleware import RequestLog
    from zeroserve.gateway.state import GatewayState

__all__ = ["FAILURE_POLL_S", "NODE_POLL_S", "bounded", "replica_lost"]

logger = logging.getLogger("zeroserve.gateway")

# How often a request waiting for a cold model checks that the model has not failed to start.
FAILURE_POLL_S = 1.0
# How often a request in flight on a ready model checks that a node its replicas ran on lives
# (one node list per gateway replica per period, shared by every request: ``state.capacity``).
NODE_POLL_S = 2.0
_T = TypeVar("_T")


async def replica_lost(state: GatewayState, entry: ModelEntry) -> None:
    """Return once no node that ran ``entry``'s replicas is alive; never, while one is.

    The nodes are those of the entry, or, for a model that was cold when the request came, the
    first ones the directory lists for it afterwards. A replica dying alone fails its calls at
    once (Ray); a whole machine gone leaves them waiting until the request's own bound, which
    this shortens to the time Ray takes to declare the node dead.
    """
    nodes = set(entry.replica_nodes) - {""}
    while True:
        await asyncio.sleep(NODE_POLL_S)
        try:
            if not nodes:
                current = (await state.backend.models(max_age_s=NODE_POLL_S)).get(entry.name)
                nodes = set(current.replica_nodes) - {""} if current is not None else set()
                continue
            alive = await state.capacity(max_age_s=NODE_POLL_S)
        except Exception as err:  # noqa: BLE001 - no verdict without a node list: look again
            logger.debug("could not list nodes for %s: %s", entry.name, err)
            continue
        if not nodes & alive.keys():
            logger.warning("model %s: every node of its replicas (%s) is gone", entry.name, ", ".join(sorted(nodes)))
            return


async def bounded(
    state: GatewayState, entry: ModelEntry, answer: Awaitable[_T], priority: int = 0, log: RequestLog | None = None
) -> _T:
    """Await ``answer`` from ``entry`` within the bound its state calls for.

    A cold model's call waits first for a GPU slice (:class:`~zeroserve.gateway.room.RoomQueue`,
    in the order of ``priority``, the request's tier, then arrival), then for the wake; one bound
    covers both. ``answer`` must not have started (a coroutine, or ``anext`` of a generator): it is
    not called until the model may wake. ``log.wake`` says how it woke (``X-Zeroserve-Wake``).

    Raises:
        ModelUnavailableError: the bound ran out (``model_not_ready``, or ``pool_busy`` when no
            model could yield) or the model failed.
    """
    assert entry.spec is not None
    if entry.state is ModelState.READY:
        call = asyncio.ensure_future(answer)
        lost = asyncio.ensure_future(replica_lost(state, entry))
        try:
            await asyncio.wait({call, lost}, timeout=state.spec.request_timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if call.done():
                return call.result()
            if lost.done():
                raise replica_died(entry.name)
            raise model_not_ready(entry.name, state.spec.request_timeout_s, entry.state.value, state.spec.retry_after_s)
        finally:
            lost.cancel()
            if not call.done():
                call.cancel()  # its clean-up (the handle call's cancel) runs before the error goes out
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await call
    budget = entry.spec.cold_start_timeout_s or state.spec.cold_start_timeout_s
    state.wakes.begin(entry.name)
    room = RoomLook()
    task: asyncio.Future[_T] | None = None

    async def wake() -> _T:
        nonlocal task
        how = await state.room.enter(state, entry, priority, room)
        if log is not None:
            log.wake = how
        task = asyncio.ensure_future(answer)  # started here, so it is cancelled here on any exit
        return await _unless_failed(state, entry, task, room)  # type: ignore[no-any-return]

    try:
        result = await asyncio.wait_for(wake(), budget)
    except BaseException as err:
        state.wakes.abandon(entry.name)
        if isinstance(err, TimeoutError):
            if room.busy:
                raise pool_busy(entry.name, budget, state.spec.retry_after_s) from None
            raise model_not_ready(entry.name, budget, entry.state.value, state.spec.retry_after_s) from None
        raise
    finally:
        if task is None:
            _close(answer)  # never started: no "coroutine was never awaited"
        elif not task.done():
            task.cancel()  # its clean-up (the handle call's cancel) runs before the error goes out
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if (woke := state.wakes.end(entry.name)) is not None:
        state.obs.cold_start(entry.name, woke)
    return result


def _close(answer: Awaitable[Any]) -> None:
    close = getattr(answer, "close", None)
    if close is not None:
        with contextlib.suppress(Exception):
            close()


async def _unless_failed(state: GatewayState, entry: ModelEntry, answer: asyncio.Future[Any], room: RoomLook) -> Any:
    """Await a waking model's answer, but give up as soon as Serve says the model failed.

    A request waiting for a replica is not told when Serve gives up starting one (its
    constructor failed its bounded number of times): without this it would wait out the
    whole cold-start bound for a model that will not come.
    """
    current: ModelEntry | None = entry
    models = None  # the first look for room is at once: a model that fits nowhere asks without a poll
    while True:
        if current is None:
            raise model_failed(entry.name, "it was removed from the pool", state.spec.retry_after_s)
        if current.state is ModelState.FAILED:
            raise model_failed(entry.name, current.message, state.spec.retry_after_s)
        try:
            room.busy = await make_room(state, current, models or await state.backend.models()) is None
        except Exception as err:  # noqa: BLE001 - the wait goes on: the model may still find room
            logger.warning("pool: could not make room for %s: %s", entry.name, err)
        done, _ = await asyncio.wait({answer}, timeout=FAILURE_POLL_S)
        if not done:
            models = await state.backend.models(max_age_s=FAILURE_POLL_S)
            current = models.get(entry.name)
        if done or answer.done():  # an answer that came during the look is kept
            return answer.result()

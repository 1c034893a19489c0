"""The gateway's fair-sharing layer: who may call, how much is left, who goes first.

- :class:`FairShare` authenticates API keys, applies each tier's rate, concurrency and
  model limits, refuses a request whose predicted cost exceeds what is left of the daily
  GPU-second budget (up front, with the reset time), and records each request's metered
  charge in the ledger once. While the ledger is unreachable it keeps serving the keys it
  confirmed recently and keeps their charges in a local journal (see :meth:`FairShare.charge`).
- :class:`Dispatcher` holds each model's requests beyond its capacity and releases them by
  priority (tier first, then shorter predicted work), with aging so low tiers never starve.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zeroserve.config import AuthSpec
from zeroserve.errors import AuthError, ForbiddenError, LedgerUnavailableError, QuotaError
from zeroserve.quota import (
    Charge,
    ChargeJournal,
    KeyRecord,
    Ledger,
    RateLimiter,
    day_of,
    hash_key,
    next_reset,
    parse_bearer,
    priority_order,
)

logger = logging.getLogger("zeroserve.gateway")

__all__ = ["AuthError", "Dispatcher", "FairShare", "ForbiddenError", "Grant", "QueueFull", "QuotaError"]


@dataclass
class Grant:
    """What the gateway knows of one admitted request's caller."""

    key: KeyRecord | None = None
    priority: int = 0
    predicted_s: float = 0.0
    budget: float | None = None
    used_before: float = 0.0
    reset: float = 0.0
    counted: bool = False  # holds one of its key's concurrent slots

    def headers(self, charged: float | None) -> dict[str, str]:
        if self.key is None or self.budget is None:
            return {} if charged is None else {"x-zeroserve-gpu-seconds": f"{charged:.6f}"}
        spent = self.used_before + (charged or 0.0)
        out = {
            "x-zeroserve-quota-remaining": f"{max(self.budget - spent, 0.0):.6f}",
            "x-zeroserve-quota-reset": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.reset)),
        }
        if charged is not None:
            out["x-zeroserve-gpu-seconds"] = f"{charged:.6f}"
        return out


class _LedgerDown(Exception):
    """A ledger call failed (unreachable, locked, full): the policies below decide what follows."""


class FairShare:
    """Keys, limits, budgets and the ledger.

    When the ledger cannot be reached, one policy per operation (docs/reliability.md):

    - authenticating: a key the ledger confirmed within ``auth.key_cache_s`` is accepted from
      memory; any other key gets a 503 ``ledger_unavailable`` with ``Retry-After``;
    - the budget: the used seconds last read, plus the charges journaled since;
    - a charge: kept in the local :class:`ChargeJournal` and written when the ledger answers
      again (in the background, oldest first; every later charge joins the journal until it is
      empty, so none overtakes it);
    - ``GET /v1/usage``: writes the journal first, and is a 503 until it can.

    Args:
        auth: the gateway's auth config.
        ledger: where keys and charges live (None when auth is off).
        clock: wall-clock seconds (injectable for tests).
        journal: where charges wait for the ledger (default: ``auth.ledger.journal_dir``, else the
            ledger's own ``journal_dir``).
        on_journal: told how many charges wait in the journal whenever that changes (a metric).
    """

    def __init__(
        self,
        auth: AuthSpec,
        ledger: Ledger | None,
        clock: Callable[[], float] = time.time,
        journal: ChargeJournal | None = None,
        on_journal: Callable[[int], None] = lambda pending: None,
    ) -> None:
        self.auth = auth
        self.ledger = ledger
        self.clock = clock
        self.rate = RateLimiter(time.monotonic)
        self.concurrent: Counter[str] = Counter()
        # Measured GPU-seconds per unit of work, by model: per output token for a generator, per
        # input for embeddings and classification (a model serves one task).
        self.per_unit_s: dict[str, float] = {}
        if journal is None and ledger is not None:
            journal = ChargeJournal(auth.ledger.journal_dir or ledger.journal_dir)
        self.journal = journal
        self.on_journal = on_journal
        self.known: dict[str, tuple[KeyRecord, float]] = {}  # key hash -> record, when the ledger said so
        self.used: dict[str, tuple[str, float]] = {}  # key id -> (day, GPU-s in the ledger at the last read)
        self._flusher: asyncio.Task[None] | None = None

    async def _ledger(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except Exception as err:  # noqa: BLE001 - sqlite3, redis and OS errors alike: the ledger is down
            logger.warning("the key ledger failed (%s: %s)", type(err).__name__, err)
            raise _LedgerDown from err

    @property
    def pending_charges(self) -> int:
        return len(self.journal.pending) if self.journal is not None else 0

    def _keep_flushing(self) -> None:
        """Write the journal in the background until it is empty (one task at a time)."""
        if self.pending_charges and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.get_running_loop().create_task(self._flush_until_empty())

    async def _flush_until_empty(self, first_wait_s: float = 0.5, max_wait_s: float = 5.0) -> None:
        assert self.journal is not None and self.ledger is not None
        wait = first_wait_s
        while self.journal.pending:
            try:
                written = await self._ledger(self.journal.flush, self.ledger)
            except _LedgerDown:
                await asyncio.sleep(wait)
                wait = min(wait * 2, max_wait_s)
            else:
                logger.info("the key ledger is back: wrote %d journaled charges", written)
                wait = first_wait_s
            finally:
                self.on_journal(len(self.journal.pending))

    @property
    def enabled(self) -> bool:
        return self.auth.enabled

    async def authenticate(self, authorization: str | None) -> Grant:
        """Who is calling (before anything else, even the model lookup).

        Raises:
            AuthError: no, malformed, unknown or revoked key (401).
        """
        if not self.enabled:
            return Grant()
        self._keep_flushing()  # charges a dead replica left in the journal, or ours
        key = parse_bearer(authorization)
        if key is None:
            raise AuthError("a valid API key is required: Authorization: Bearer zs-...", code="invalid_api_key")
        # Looked up every time, so a revoked key stops at once: one primary-key read.
        assert self.ledger is not None
        key_hash = hash_key(key)
        try:
            record = await self._ledger(self.ledger.find_key, key_hash)
        except _LedgerDown:
            record = self._known(key_hash)
        else:
            if record is None:
                self.known.pop(key_hash, None)
            else:
                self.known[key_hash] = (record, time.monotonic())
        if record is None or record.revoked:
            raise AuthError("the API key is unknown or revoked", code="invalid_api_key")
        tier = self.auth.tiers.get(record.tier)
        if tier is None:
            raise ForbiddenError(f"the key's tier {record.tier!r} is not configured", code="unknown_tier")
        return Grant(key=record, priority=tier.priority, budget=tier.daily_gpu_seconds, reset=next_reset(self.clock()))

    def _known(self, key_hash: str) -> KeyRecord:
        record, confirmed = self.known.get(key_hash, (None, 0.0))
        if record is None or time.monotonic() - confirmed > self.auth.key_cache_s:
            raise LedgerUnavailableError("this API key cannot be checked")
        return record

    async def check(self, grant: Grant, model: str, units: int | None) -> None:
        """Apply the tier's model, rate, concurrency and budget limits; count the request.

        ``units``: the most work the request can ask for (``max_tokens`` of a generation, the
        number of inputs of an embedding or classification); with the model's measured cost per
        unit it predicts the request's cost, refused up front when more than is left.

        Raises:
            ForbiddenError: the tier may not use ``model`` (403).
            QuotaError: over the rate, concurrency or daily budget (429 with Retry-After).
        """
        if grant.key is None:
            return
        record = grant.key
        tier = self.auth.tiers[record.tier]
        if tier.models is not None and model not in tier.models:
            raise ForbiddenError(
                f"tier {record.tier!r} may not use model '{model}'", param="model", code="model_not_allowed"
            )
        wait = self.rate.check(record.key_id, tier.requests_per_minute)
        if wait > 0:
            raise QuotaError(
                f"over {tier.requests_per_minute} requests per minute", code="rate_limit_exceeded", retry_after_s=wait
            )
        if self.concurrent[record.key_id] >= tier.max_concurrent:
            raise QuotaError(
                f"over {tier.max_concurrent} concurrent requests", code="concurrency_limit_exceeded", retry_after_s=1
            )
        # Counted before the ledger read below, so that simultaneous requests see each other.
        self.concurrent[record.key_id] += 1
        grant.counted = True
        try:
            await self._check_budget(grant, tier.daily_gpu_seconds, model, units)
        except BaseException:
            self.release(grant)
            raise

    async def _check_budget(self, grant: Grant, budget: float, model: str, units: int | None) -> None:
        assert self.ledger is not None and self.journal is not None and grant.key is not None
        now = self.clock()
        key_id, day = grant.key.key_id, day_of(now)
        try:
            used = sum((await self._ledger(self.ledger.usage, key_id, day)).values())
            self.used[key_id] = (day, used)
        except _LedgerDown:
            last_day, used = self.used.get(key_id, ("", 0.0))
            if last_day != day:
                raise LedgerUnavailableError("what is left of this key's budget is unknown") from None
        used += self.journal.pending_seconds(key_id, day)  # served here, not in the ledger yet
        grant.used_before = used
        remaining = budget - used
        grant.predicted_s = (units or 0) * self.per_unit_s.get(model, 0.0)
        if remaining <= 0 or grant.predicted_s > remaining:
            why = (
                f"the daily budget of {budget:g} GPU-seconds is used up"
                if remaining <= 0
                else f"this request would cost about {grant.predicted_s:.3f} GPU-seconds and "
                f"{remaining:.3f} are left today"
            )
            reset_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(grant.reset))
            raise QuotaError(
                f"{why}; the quota resets at {reset_at}", code="quota_exceeded", retry_after_s=grant.reset - now
            )

    def release(self, grant: Grant) -> None:
        if grant.key is not None and grant.counted:
            grant.counted = False
            self.concurrent[grant.key.key_id] -= 1

    async def charge(self, grant: Grant, model: str, gpu_s: float, request_id: str, units: int = 0) -> None:
        """Record a request's metered GPU-seconds once, and learn the model's cost per unit of work
        (``units``: the output tokens of a generation, the inputs of an embedding or classification).

        If the ledger fails, or charges already wait in the journal, the charge joins the
        journal (on disk before this returns) and a background task writes it later.

        Raises:
            OSError: the journal could not be written either (the charge is lost; logged by the caller).
        """
        if units > 0 and gpu_s > 0:
            per_unit = gpu_s / units
            old = self.per_unit_s.get(model)
            self.per_unit_s[model] = per_unit if old is None else 0.8 * old + 0.2 * per_unit
        if grant.key is None or self.ledger is None or self.journal is None:
            return
        charge = Charge(grant.key.key_id, day_of(self.clock()), model, gpu_s, request_id)
        if not self.journal.pending:
            try:
                await self._ledger(self.ledger.charge, *vars(charge).values())
            except _LedgerDown:
                pass
            else:
                last_day, used = self.used.get(charge.key_id, ("", 0.0))
                if last_day == charge.day:  # so that the last read stays current for an outage
                    self.used[charge.key_id] = (last_day, used + gpu_s)
                return
        await asyncio.to_thread(self.journal.add, charge)
        self.on_journal(len(self.journal.pending))
        self._keep_flushing()

    async def usage(self, grant: Grant) -> dict[str, Any]:
        """The key's usage today, journaled charges included.

        Raises:
            LedgerUnavailableError: the ledger is unreachable, or the journal cannot be written to it yet.
        """
        assert grant.key is not None and self.ledger is not None and self.journal is not None
        assert grant.budget is not None
        now = self.clock()
        try:
            if self.journal.pending:
                await self._ledger(self.journal.flush, self.ledger)
                self.on_journal(len(self.journal.pending))
            by_model = await self._ledger(self.ledger.usage, grant.key.key_id, day_of(now))
        except _LedgerDown:
            raise LedgerUnavailableError("today's usage cannot be read") from None
        used = sum(by_model.values())
        return {
            "object": "usage",
            "key_id": grant.key.key_id,
            "tier": grant.key.tier,
            "day": day_of(now),
            "gpu_seconds_by_model": by_model,
            "gpu_seconds_used": used,
            "gpu_seconds_budget": grant.budget,
            "gpu_seconds_remaining": max(grant.budget - used, 0.0),
            "resets_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(grant.reset)),
        }


@dataclass
class _Waiter:
    priority: int
    predicted_s: float
    arrival: float
    future: asyncio.Future[None]


class QueueFull(Exception):
    """A model's wait queue is at its bound."""

    def __init__(self, model: str, waiting: int) -> None:
        super().__init__(f"model '{model}' already has {waiting} requests waiting")
        self.model = model
        self.waiting = waiting


class Dispatcher:
    """Per-model admission by priority once a model's capacity is in use.

    Args:
        aging_s: waiting this long raises a request by one priority level.
    """

    def __init__(self, aging_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.aging_s = aging_s
        self.clock = clock
        self.running: Counter[str] = Counter()
        self.waiting: dict[str, list[_Waiter]] = {}

    async def acquire(
        self, model: str, capacity: int, priority: int, predicted_s: float, max_waiting: int | None = None
    ) -> None:
        """Wait for one of ``capacity`` slots of ``model``.

        Raises:
            QueueFull: ``max_waiting`` requests already wait for this model: the caller sheds
                this one at once rather than let the queue (and every waiter's latency) grow.
                When the newcomer would be served before the last of them, that one is shed
                in its place, so a full queue of low-priority work never turns away a tier above.
        """
        queue = self.waiting.setdefault(model, [])
        if self.running[model] < capacity and not queue:
            self.running[model] += 1
            return
        waiter = _Waiter(priority, predicted_s, self.clock(), asyncio.get_running_loop().create_future())
        if max_waiting is not None and len(queue) >= max_waiting:
            now = self.clock()
            last = max(queue, key=lambda w: self._order(w, now))
            # Only a higher (aged) tier displaces a waiter; within a tier, first come keeps its place.
            if self._order(waiter, now)[0] >= self._order(last, now)[0]:
                raise QueueFull(model, len(queue))
            queue.remove(last)
            last.future.set_exception(QueueFull(model, len(queue) + 1))
        queue.append(waiter)
        try:
            await waiter.future
        except BaseException:
            if waiter in queue:
                queue.remove(waiter)
            elif waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                self.release(model, capacity)  # granted just as it was cancelled: hand it on
            raise

    def _order(self, waiter: _Waiter, now: float) -> tuple[float, ...]:
        return priority_order(waiter.priority, waiter.predicted_s, waiter.arrival, now, self.aging_s)

    def release(self, model: str, capacity: int) -> None:
        self.running[model] -= 1
        queue = self.waiting.get(model, [])
        while queue and self.running[model] < capacity:
            now = self.clock()
            best = min(queue, key=lambda w: self._order(w, now))
            queue.remove(best)
            if not best.future.done():
                self.running[model] += 1
                best.future.set_result(None)

"""Fair sharing: API keys, GPU-second budgets per day, rate and concurrency limits, priority.

Pure logic (keys, metering, limits, scheduling order) plus two ledgers with one interface:
SQLite for one machine (no extra service; several gateway replicas on the node share the
file) and Redis for a cluster. Keys are stored as SHA-256 hashes (they carry 192 random
bits, so a slow hash adds nothing); the key itself is shown once, at creation.

Metering rule: a request is charged the engine time it used times its model's GPU
fraction. Engine time is shared: while k requests are in a replica's engine at once (a
batch, or concurrent streams), each is charged 1/k of that time, so the charges of a
replica add up to its busy time (see :class:`SharedMeter`).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import sqlite3
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from zeroserve.config import DEFAULT_LEDGER_PATH

__all__ = [
    "Charge",
    "ChargeJournal",
    "KeyRecord",
    "Ledger",
    "SQLiteLedger",
    "RedisLedger",
    "SharedMeter",
    "RateLimiter",
    "day_of",
    "next_reset",
    "new_key",
    "hash_key",
    "parse_bearer",
    "open_ledger",
]

KEY_RE = re.compile(r"^zs-([0-9a-f]{8})-([A-Za-z0-9_-]{32})$")


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    name: str
    tier: str
    created: float
    revoked: bool = False


def new_key() -> tuple[str, str]:
    """A new API key and its id: ``zs-<id>-<secret>``."""
    key_id = secrets.token_hex(4)
    return f"zs-{key_id}-{secrets.token_urlsafe(24)}", key_id


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_bearer(header: str | None) -> str | None:
    """The key in ``Authorization: Bearer <key>``, or None for anything malformed."""
    if not header or len(header) > 300 or not header.isascii():
        return None
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not KEY_RE.match(key):
        return None
    return key


def day_of(ts: float) -> str:
    """The quota day (UTC) of a timestamp."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d")


def next_reset(ts: float) -> float:
    """When the quota day of ``ts`` ends: the next midnight UTC."""
    day = dt.datetime.fromtimestamp(ts, dt.UTC).date() + dt.timedelta(days=1)
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp()


class Ledger(Protocol):
    @property
    def journal_dir(self) -> Path:
        """Where a gateway keeps the charges this ledger could not take yet (local disk)."""
        ...

    def add_key(self, key_hash: str, record: KeyRecord) -> None: ...

    def find_key(self, key_hash: str) -> KeyRecord | None: ...

    def list_keys(self) -> list[KeyRecord]: ...

    def revoke(self, key_id: str) -> bool: ...

    def charge(self, key_id: str, day: str, model: str, gpu_seconds: float, request_id: str) -> bool:
        """Add a charge once per ``request_id``; False if it was already charged."""
        ...

    def usage(self, key_id: str, day: str) -> dict[str, float]: ...


class SQLiteLedger:
    """The ledger in one SQLite file (WAL): survives restarts, shared by local processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._db() as db:
            db.executescript("""
                PRAGMA journal_mode=WAL;
                CREATE TABLE IF NOT EXISTS keys (hash TEXT PRIMARY KEY, key_id TEXT UNIQUE, record TEXT);
                CREATE TABLE IF NOT EXISTS charges (request_id TEXT PRIMARY KEY, key_id TEXT, day TEXT,
                                                    model TEXT, gpu_seconds REAL);
                CREATE INDEX IF NOT EXISTS charges_by_key_day ON charges (key_id, day);
            """)

    @property
    def journal_dir(self) -> Path:
        return self.path.with_name(self.path.name + ".journal")

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # Writers wait for each other briefly in WAL mode; a lock held longer is an outage,
            # which the gateway rides out with its journal rather than hold the request.
            conn = sqlite3.connect(self.path, timeout=5, isolation_level=None)
            self._local.conn = conn
        yield conn

    def add_key(self, key_hash: str, record: KeyRecord) -> None:
        with self._db() as db:
            db.execute("INSERT INTO keys VALUES (?, ?, ?)", (key_hash, record.key_id, json.dumps(asdict(record))))

    def find_key(self, key_hash: str) -> KeyRecord | None:
        with self._db() as db:
            row = db.execute("SELECT hash, record FROM keys WHERE hash = ?", (key_hash,)).fetchone()
        if row is None or not hmac.compare_digest(row[0], key_hash):
            return None
        return KeyRecord(**json.loads(row[1]))

    def list_keys(self) -> list[KeyRecord]:
        with self._db() as db:
            return [KeyRecord(**json.loads(r[0])) for r in db.execute("SELECT record FROM keys ORDER BY key_id")]

    def revoke(self, key_id: str) -> bool:
        with self._db() as db:
            row = db.execute("SELECT record FROM keys WHERE key_id = ?", (key_id,)).fetchone()
            if row is None:
                return False
            record = {**json.loads(row[0]), "revoked": True}
            db.execute("UPDATE keys SET record = ? WHERE key_id = ?", (json.dumps(record), key_id))
            return True

    def charge(self, key_id: str, day: str, model: str, gpu_seconds: float, request_id: str) -> bool:
        with self._db() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO charges VALUES (?, ?, ?, ?, ?)", (request_id, key_id, day, model, gpu_seconds)
            )
            return cur.rowcount == 1

    def usage(self, key_id: str, day: str) -> dict[str, float]:
        with self._db() as db:
            rows = db.execute(
                "SELECT model, SUM(gpu_seconds) FROM charges WHERE key_id = ? AND day = ? GROUP BY model", (key_id, day)
            ).fetchall()
        return {model: float(total) for model, total in rows}


_CHARGE_ONCE = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', 259200) then
  redis.call('HINCRBYFLOAT', KEYS[2], ARGV[1], ARGV[2])
  redis.call('EXPIRE', KEYS[2], 3888000)
  return 1
end
return 0
"""


class RedisLedger:
    """The ledger in Redis, for several gateway replicas across nodes.

    A charge is one Lua script: a request id marker set only if absent, then the increment,
    so a retried charge is never counted twice.
    """

    def __init__(self, url: str, prefix: str = "zeroserve") -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # No retries inside the client: an unreachable ledger must fail fast (the gateway then
        # authenticates from its cache and journals charges) instead of holding each request.
        self.r = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=5, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
        )
        self.prefix = prefix
        self._charge = self.r.register_script(_CHARGE_ONCE)

    @property
    def journal_dir(self) -> Path:
        return Path("~/.zeroserve/journal").expanduser() / self.prefix

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def add_key(self, key_hash: str, record: KeyRecord) -> None:
        self.r.hset(self._k("keys"), key_hash, json.dumps(asdict(record)))
        self.r.hset(self._k("key_ids"), record.key_id, key_hash)

    def find_key(self, key_hash: str) -> KeyRecord | None:
        raw = self.r.hget(self._k("keys"), key_hash)
        return None if raw is None else KeyRecord(**json.loads(str(raw)))

    def list_keys(self) -> list[KeyRecord]:
        values = self.r.hvals(self._k("keys"))
        return sorted((KeyRecord(**json.loads(v)) for v in values), key=lambda k: k.key_id)  # type: ignore[union-attr]

    def revoke(self, key_id: str) -> bool:
        key_hash = self.r.hget(self._k("key_ids"), key_id)
        if key_hash is None:
            return False
        record = self.find_key(str(key_hash))
        assert record is not None
        self.r.hset(self._k("keys"), str(key_hash), json.dumps({**asdict(record), "revoked": True}))
        return True

    def charge(self, key_id: str, day: str, model: str, gpu_seconds: float, request_id: str) -> bool:
        done = self._charge(
            keys=[self._k("charged", request_id), self._k("usage", key_id, day)], args=[model, repr(float(gpu_seconds))]
        )
        return bool(done)

    def usage(self, key_id: str, day: str) -> dict[str, float]:
        raw = self.r.hgetall(self._k("usage", key_id, day))
        return {str(m): float(v) for m, v in raw.items()}  # type: ignore[union-attr]


@dataclass(frozen=True)
class Charge:
    """One request's charge, as the ledger takes it."""

    key_id: str
    day: str
    model: str
    gpu_seconds: float
    request_id: str


class ChargeJournal:
    """Charges the ledger could not take yet, kept on local disk until it can.

    Each journal appends to a file of its own (``charges-<uuid>.jsonl`` in ``directory``,
    made at the first charge, flushed and fsynced per line) and holds an exclusive ``flock``
    on it while it lives. A journal that opens finds the files of journals that died (the
    lock is free) and adopts them, so a gateway replica killed during an outage loses no
    charge: the next one on the node writes them. :meth:`flush` writes every pending charge
    and removes the files only when all are written; a charge is keyed by its request id in
    the ledger, so writing one again after a partial flush counts it once.
    """

    PREFIX = "charges-"

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser()
        self._lock = threading.Lock()
        self._flushing = threading.Lock()
        self._file: Any = None  # our own journal file, open and locked once a charge is kept
        self._adopted: list[Any] = []  # files of dead journals: open, locked, removed once written
        self.pending: list[Charge] = []
        self._adopt()

    def _adopt(self) -> None:
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.glob(f"{self.PREFIX}*.jsonl")):
            try:
                fh = path.open("r+")
            except FileNotFoundError:  # written and removed by its owner meanwhile
                continue
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its journal is alive
                fh.close()
                continue
            if not path.exists():  # removed between our open and our lock
                fh.close()
                continue
            self.pending.extend(self._read(fh))
            self._adopted.append(fh)

    @staticmethod
    def _read(fh: Any) -> list[Charge]:
        out = []
        for line in fh.read().splitlines():
            try:
                out.append(Charge(**json.loads(line)))
            except (ValueError, TypeError):  # a line cut short by a crash mid-write: never fsynced
                continue
        return out

    def add(self, charge: Charge) -> None:
        """Keep ``charge`` on disk (durable when this returns)."""
        with self._lock:
            if self._file is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._file = (self.directory / f"{self.PREFIX}{uuid.uuid4().hex}.jsonl").open("a+")
                fcntl.flock(self._file, fcntl.LOCK_EX)
            self._file.write(json.dumps(asdict(charge)) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
            self.pending.append(charge)

    def pending_seconds(self, key_id: str, day: str) -> float:
        with self._lock:
            return sum(c.gpu_seconds for c in self.pending if c.key_id == key_id and c.day == day)

    def flush(self, ledger: Ledger) -> int:
        """Write every pending charge to ``ledger``; return how many were written.

        Charges kept meanwhile wait for the next flush. One flush at a time.

        Raises:
            Exception: whatever the ledger raised; what was not written stays pending.
        """
        with self._flushing:
            with self._lock:
                batch = list(self.pending)
            for c in batch:
                ledger.charge(c.key_id, c.day, c.model, c.gpu_seconds, c.request_id)
                with self._lock:
                    self.pending.pop(0)  # adds append, only a flush removes: the oldest is ``c``
            with self._lock:
                if not self.pending:
                    for fh in [*self._adopted, *([self._file] if self._file is not None else [])]:
                        Path(fh.name).unlink(missing_ok=True)  # removed while locked: never adopted again
                        fh.close()
                    self._adopted, self._file = [], None
            return len(batch)


def open_ledger(backend: str, path: str | None = None, url: str | None = None) -> Ledger:
    if backend == "redis":
        if not url:
            raise ValueError("the redis ledger needs a url")
        return RedisLedger(url)
    return SQLiteLedger(path or DEFAULT_LEDGER_PATH)


class SharedMeter:
    """Engine time per request, shared among the requests in the engine at the same time.

    Between two events (a request entering or leaving), each of the k active requests is
    charged elapsed / k. The charges of all requests add up to the time the engine was busy,
    which ``on_busy`` receives as it goes (overlapping requests count once), so that a replica
    that is never idle still reports.
    """

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, on_busy: Callable[[float], None] | None = None
    ) -> None:
        self.clock = clock
        self.on_busy = on_busy
        self.active: dict[int, float] = {}
        self.last = clock()
        self._next = 0

    def _advance(self) -> float:
        """Share the time since the last event among the active requests; return it if busy."""
        now = self.clock()
        elapsed = now - self.last if self.active else 0.0
        if self.active:
            share = elapsed / len(self.active)
            for token in self.active:
                self.active[token] += share
        self.last = now
        return elapsed

    def _report(self, elapsed: float) -> None:
        # After the bookkeeping: the charges must not depend on the metrics.
        if elapsed and self.on_busy is not None:
            self.on_busy(elapsed)

    def enter(self) -> int:
        elapsed = self._advance()
        self._next += 1
        self.active[self._next] = 0.0
        self._report(elapsed)
        return self._next

    def exit(self, token: int) -> float:
        """The engine seconds charged to the request that got ``token``."""
        elapsed = self._advance()
        charge = self.active.pop(token)
        self._report(elapsed)
        return charge


class RateLimiter:
    """At most ``limit`` events per key in any 60 s window; says how long to wait."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.events: dict[str, deque[float]] = {}

    def check(self, key: str, limit: int) -> float:
        """0 if the event may happen now (and records it), else the seconds to wait."""
        now = self.clock()
        q = self.events.setdefault(key, deque())
        while q and now - q[0] >= 60:
            q.popleft()
        if len(q) >= limit:
            return 60 - (now - q[0])
        q.append(now)
        return 0.0


def priority_order(priority: int, predicted_s: float, arrival: float, now: float, aging_s: float) -> tuple[float, ...]:
    """Sort key of a queued request: tier priority first, then shorter predicted work.

    Waiting raises priority by one level every ``aging_s`` seconds, so a low tier is never
    starved: after enough waiting it outranks any fresh request.
    """
    effective = priority + math.floor((now - arrival) / aging_s)
    return (-effective, predicted_s, arrival)

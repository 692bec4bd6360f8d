"""Per-caller rate limits: one token bucket per key (per client IP for anonymous callers).

A limit is one per server, not one per process: ``twin serve`` runs several worker processes
and a key's connections land on any of them. Two stores with one interface (``take``):

- ``SharedTokenBuckets``: a fixed table of bucket slots in a file in shared memory, which
  ``twin serve`` creates before it starts its workers (``create_table``) and removes when it
  stops; every worker maps it, and each update holds a lock on the slots it reads.
- ``TokenBuckets``: in one process's memory, for a single-process server (TWIN_WORKERS=1, the
  tests' in-thread server), and the fallback when the table cannot be used.

Neither needs the database, so limits keep working while it is down.

Several twin nodes (machines) on one database share a third store, ``PostgresTokenBuckets``:
a row per key in the UNLOGGED table ``rate_buckets`` (migration 0015), one statement per
request (its ``take`` is a coroutine). While the database cannot be reached it limits with
the node's own store (one of the two above), so limits still hold, per node.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import math
import mmap
import os
import re
import secrets
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import suppress
from hashlib import blake2b
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: worker and test processes that only use the shared
    # table start without SQLAlchemy (about a second on a busy 2-core machine)
    from sqlalchemy.ext.asyncio import AsyncEngine

    from twin.core.settings import Settings

log = logging.getLogger(__name__)


def _spend(tokens: float, last: float, now: float, rate: float, burst: float
           ) -> tuple[float, float]:
    """Refills a bucket to ``now`` and takes one token: (tokens left, seconds to wait)."""
    tokens = min(burst, tokens + (now - last) * rate)
    if tokens >= 1:
        return tokens - 1, 0.0
    return tokens, (1 - tokens) / rate


class TokenBuckets:
    """``burst`` requests at once, refilled at ``rate`` per second, per key.

    Not thread-safe: the API calls it from the event loop only. The least recently used
    buckets beyond ``max_keys`` are dropped (a dropped bucket was idle, so nearly full).
    """

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000,
                 clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = burst
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float:
        """0 when the request may go ahead; else the seconds until it may (Retry-After)."""
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        tokens, last = self._buckets.pop(key, (float(self.burst), now))
        tokens, wait = _spend(tokens, last, now, self.rate, self.burst)
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return wait


# --- the shared table ------------------------------------------------------------------------
# A header, then slots of 32 bytes: the key's hash (0: a free slot), its tokens and the time
# they were counted (time.monotonic: CLOCK_MONOTONIC, one clock for every process of the
# machine). A key lives in one of PROBE slots from its home slot (linear probing without
# wrapping: the table has PROBE - 1 slots past the last home). Slots are never freed, so a
# lookup stops at the first free one; a full bucket is the same as no bucket, so a key that
# finds no free slot takes over a full one.
MAGIC = b"twinrl1\0"
HEADER = struct.Struct("<8sII16s")  # magic, home slots, probe length, hash key
HEADER_BYTES = 64
SLOT = struct.Struct("<Qdd")  # key hash, tokens, last update
SLOT_BYTES = 32
SLOTS = 65_536  # 2 MiB; pages are only allocated where keys land
PROBE = 8
TABLE_NAME = "twin-ratelimit-{pid}-{port}"
TABLE_PATTERN = re.compile(r"twin-ratelimit-(\d+)-\d+")


def table_bytes(slots: int, probe: int) -> int:
    return HEADER_BYTES + (slots + probe - 1) * SLOT_BYTES


def table_dirs(home: Path) -> list[Path]:
    """Where a table may go: memory (/dev/shm), else twin's home."""
    return [Path("/dev/shm"), home / "run"]


def create_table(home: Path, port: int, slots: int = SLOTS, probe: int = PROBE) -> Path | None:
    """Creates this server's empty table and returns its path; None (logged) when no
    directory takes it. Tables left by servers no longer running are removed first."""
    for directory in table_dirs(home):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            remove_stale_tables(directory)
            path = directory / TABLE_NAME.format(pid=os.getpid(), port=port)
            with suppress(FileNotFoundError):  # this pid's, from an earlier boot
                path.unlink()
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            log.info("rate-limit table: cannot create one in %s (%s)", directory, exc)
            continue
        try:
            os.ftruncate(fd, table_bytes(slots, probe))  # zeros: every slot free
            os.pwrite(fd, HEADER.pack(MAGIC, slots, probe, secrets.token_bytes(16)), 0)
        except OSError as exc:
            log.warning("rate-limit table %s: cannot write it (%s)", path, exc)
            remove_table(path)
            continue
        finally:
            os.close(fd)
        return path
    log.warning("rate-limit table: none could be created in %s",
                " or ".join(map(str, table_dirs(home))))
    return None


def remove_table(path: Path) -> None:
    with suppress(FileNotFoundError):
        path.unlink()


def remove_stale_tables(directory: Path) -> None:
    """A server killed outright (SIGKILL) leaves its table: remove those whose server is gone."""
    for path in directory.glob("twin-ratelimit-*"):
        match = TABLE_PATTERN.fullmatch(path.name)
        if match and not _alive(int(match.group(1))):
            with suppress(OSError):
                path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class SharedTokenBuckets:
    """``TokenBuckets`` over the table at ``path``, shared by every process that opens it.

    Each take locks the byte range of the key's PROBE slots (fcntl.lockf: a lock between
    processes; the kernel drops it if the process dies) and reads the clock under it, so the
    updates of all processes to one bucket are serialised in time order. fcntl locks belong
    to the process, not the thread, so a thread lock serialises this process's own callers.
    Keep one instance per process: closing any other descriptor of the file would drop the
    process's locks.

    A key that finds no slot (its PROBE slots all hold keys whose buckets are not full) gets
    an in-process bucket instead, logged once.
    """

    def __init__(self, path: Path, rate: float, burst: int,
                 clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = burst
        self.path = path
        self._clock = clock
        self._fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(self._fd).st_size
            if size < HEADER_BYTES:
                raise ValueError(f"{size} bytes, not a rate-limit table")
            self._table = mmap.mmap(self._fd, size)
            magic, self._slots, probe, self._hash_key = HEADER.unpack_from(self._table, 0)
            if magic != MAGIC or size != table_bytes(self._slots, probe):
                self._table.close()
                raise ValueError("not a rate-limit table of this twin version")
        except BaseException:
            os.close(self._fd)
            raise
        self._window = probe * SLOT_BYTES
        self._lock = threading.Lock()
        self._fallback = TokenBuckets(rate, burst, clock=clock)
        self._overflowed = False

    def take(self, key: str) -> float:
        """0 when the request may go ahead; else the seconds until it may (Retry-After)."""
        if self.rate <= 0:
            return 0.0
        digest = blake2b(key.encode(), digest_size=8, key=self._hash_key).digest()
        hashed = int.from_bytes(digest, "little") or 1  # 0 marks a free slot
        start = HEADER_BYTES + hashed % self._slots * SLOT_BYTES
        with self._lock:
            fcntl.lockf(self._fd, fcntl.LOCK_EX, self._window, start)
            try:
                wait = self._take_slot(hashed, start)
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, self._window, start)
            return self._take_fallback(key) if wait is None else wait

    def _take_slot(self, hashed: int, start: int) -> float | None:
        """Under the lock: the key's bucket among its slots, taken; None when it has none."""
        table, rate, burst = self._table, self.rate, self.burst
        now = self._clock()
        full = None
        for offset in range(start, start + self._window, SLOT_BYTES):
            slot_key, tokens, last = SLOT.unpack_from(table, offset)
            if slot_key == hashed:
                break
            if slot_key == 0:
                tokens, last = burst, now
                break
            if full is None and tokens + (now - last) * rate >= burst:
                full = offset
        else:
            if full is None:
                return None
            offset, tokens, last = full, burst, now
        tokens, wait = _spend(tokens, last, now, rate, burst)
        SLOT.pack_into(table, offset, hashed, tokens, now)
        return wait

    def _take_fallback(self, key: str) -> float:
        if not self._overflowed:
            self._overflowed = True
            log.warning("rate-limit table %s: no free slot for a key; keys without one are "
                        "limited per worker process until slots free up", self.path)
        return self._fallback.take(key)

    def close(self) -> None:
        self._table.close()
        os.close(self._fd)


def open_buckets(table: Path | None, rate: float, burst: int
                 ) -> TokenBuckets | SharedTokenBuckets:
    """The shared table's buckets when there is a table and it opens; else in-process ones
    (logged: then each worker process limits on its own)."""
    if table is None or rate <= 0:
        return TokenBuckets(rate, burst)
    try:
        return SharedTokenBuckets(table, rate, burst)
    except (OSError, ValueError) as exc:
        log.warning("rate-limit table %s: cannot use it (%s); this worker process keeps "
                    "its own buckets, so a key may get more than its limit", table, exc)
        return TokenBuckets(rate, burst)


# --- the database's table (several nodes) ----------------------------------------------------
# One statement per take. The upsert locks the key's row, so the takes of every node on one
# key are serialised. Each refills the bucket from ``at`` to its own clock reading (taken in
# VALUES, before it may wait for the lock; one that queued behind a take stamped later refills
# nothing and leaves the later time), then spends a token if there is a whole one.
# ``tokens`` is what the bucket holds minus the token the last take asked for: negative when
# that take was refused (it got nothing, so the next take adds the token back). RETURNING sees
# only the new row; this way it still tells a grant (tokens >= 0) from a refusal, whose wait is
# -tokens / rate: the same arithmetic as ``_spend``. (psycopg placeholders: the take runs on
# the driver's connection, see ``PostgresTokenBuckets.take``.)
TAKE_SQL = """
INSERT INTO rate_buckets AS b (key, tokens, at)
VALUES (%(key)s, %(burst)s::float8 - 1, clock_timestamp())
ON CONFLICT (key) DO UPDATE SET
    tokens = least(%(burst)s::float8,
                   CASE WHEN b.tokens < 0 THEN b.tokens + 1 ELSE b.tokens END
                   + %(rate)s::float8
                     * greatest(0, extract(epoch FROM excluded.at - b.at))::float8) - 1,
    at = greatest(b.at, excluded.at)
RETURNING tokens
"""
# A bucket idle for burst / rate seconds is full, the same as no row: such rows go, a batch
# at a time (short statements; rows a take holds are skipped, they are not idle). A take
# racing the delete either locked the row first (then its new ``at`` fails the re-checked
# condition) or finds no row and starts a full bucket, as the deleted row would have given.
# No index on ``at``: it changes on every take, and an index on it would end HOT updates.
SWEEP_SQL = """
DELETE FROM rate_buckets WHERE key IN (
    SELECT key FROM rate_buckets
    WHERE at < clock_timestamp() - make_interval(secs => :idle_s)
    LIMIT :batch FOR UPDATE SKIP LOCKED)
  AND at < clock_timestamp() - make_interval(secs => :idle_s)
"""
SWEEP_BATCH = 5_000
MAX_IDLE_S = 10 * 365 * 86_400.0  # past this, a tiny rate's rows are simply kept
HASH_PERSON = b"twin-ratelimit"
POOL_LABEL = "twin rate limits"  # application_name of the limiter's connections


def row_key(key: str, hash_key: bytes = b"") -> str:
    """A bucket's key in ``rate_buckets``: keyed blake2b of its name, 128 bits as hex. Every
    node must hash with the same ``hash_key``."""
    return blake2b(key.encode(), digest_size=16, key=hash_key, person=HASH_PERSON).hexdigest()


class PostgresTokenBuckets:
    """``TokenBuckets`` in the database's ``rate_buckets`` table, shared by every twin node
    (process, machine) working on that database; ``take`` is a coroutine.

    Exact across nodes: one ``INSERT ... ON CONFLICT DO UPDATE ... RETURNING`` per take
    (``TAKE_SQL``) on a small pool of its own in autocommit (never the requests' pool: a
    request holding its connection must not wait for another one to be limited). The clock is
    the database server's, one for every node. Keys are stored as a keyed blake2b hash
    (``row_key``), never as given (a principal's name, a client's address).

    When the database does not answer (down, unreachable, a statement over its timeout, the
    pool exhausted) the take falls back to ``fallback`` (the node's shared-memory table or an
    in-process store), logged once per outage; the database is tried again by one take every
    ``retry_after_s``. A database outage thus never refuses a request for the limiter's sake:
    limits still hold, per node, from full buckets. ``rate_buckets`` is UNLOGGED, so a crash
    of the database refills every bucket too.

    Rows of buckets full again are deleted every ``sweep_every_s`` by a background task of
    the process (``sweep``), each node on its own (the delete is idempotent). Every node must
    have the same limits: a node sweeps what its own limits call full.
    """

    def __init__(self, engine: AsyncEngine, rate: float, burst: int, *,
                 fallback: TokenBuckets | SharedTokenBuckets | None = None,
                 hash_key: bytes = b"", retry_after_s: float = 5.0,
                 sweep_every_s: float = 300.0, owns_engine: bool = False):
        """``engine``: a pool in autocommit (``open_postgres_buckets`` makes one)."""
        import psycopg
        from sqlalchemy import text
        from sqlalchemy.exc import SQLAlchemyError

        self.rate = rate
        self.burst = burst
        self.engine = engine
        self._owns_engine = owns_engine
        self.fallback = fallback if fallback is not None else TokenBuckets(rate, burst)
        self._hash_key = hash_key
        self._retry_after_s = retry_after_s
        self._sweep_every_s = sweep_every_s
        self._next_sweep = time.monotonic() + sweep_every_s
        self._down_until: float | None = None  # falling back until then
        self._sweeping: asyncio.Task | None = None
        self._sweep_sql = text(SWEEP_SQL)
        self._errors: tuple[type[Exception], ...] = (SQLAlchemyError, psycopg.Error, OSError)

    @property
    def falling_back(self) -> bool:
        """True while the database did not answer and takes go to ``fallback``."""
        return self._down_until is not None

    def hashed(self, key: str) -> str:
        return row_key(key, self._hash_key)

    async def take(self, key: str) -> float:
        """0 when the request may go ahead; else the seconds until it may (Retry-After).

        The statement runs on the pooled connection's psycopg connection itself, prepared:
        SQLAlchemy's execution would add about as much time again as the round trip
        (benchmarks/ratelimit.py). A connection that fails is invalidated (closed, never
        reused)."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        if self._down_until is not None:
            if now < self._down_until:
                return self.fallback.take(key)
            # This take tries the database again; the takes meanwhile keep falling back.
            self._down_until = now + self._retry_after_s
        try:
            async with self.engine.connect() as conn:
                driver = (await conn.get_raw_connection()).driver_connection
                assert driver is not None  # a checked-out connection has its driver's
                try:
                    cursor = await driver.execute(
                        TAKE_SQL, {"key": self.hashed(key), "rate": self.rate,
                                   "burst": float(self.burst)}, prepare=True)
                    found = await cursor.fetchone()
                except BaseException:
                    await conn.invalidate()
                    raise
        except self._errors as error:
            self._lost(error, now)
            return self.fallback.take(key)
        if self._down_until is not None:
            self._down_until = None
            log.info("rate limits: the database answers again; the buckets are shared again")
        if now >= self._next_sweep:
            self._start_sweep(now)
        tokens = found[0]
        return 0.0 if tokens >= 0 else -tokens / self.rate

    def _lost(self, error: Exception, now: float) -> None:
        if self._down_until is None:
            reason = str(error).strip().splitlines() or [type(error).__name__]
            log.warning("rate limits: the database does not answer (%s); this process limits "
                        "with its own buckets until it does (tried again every %g s)",
                        reason[0], self._retry_after_s)
        self._down_until = now + self._retry_after_s

    def _start_sweep(self, now: float) -> None:
        self._next_sweep = now + self._sweep_every_s
        if self._sweeping is None or self._sweeping.done():
            self._sweeping = asyncio.get_running_loop().create_task(self._sweep_quietly())

    async def _sweep_quietly(self) -> None:
        try:
            await self.sweep()
        except self._errors as error:
            log.info("rate limits: idle buckets not swept this time (%s)", error)

    async def sweep(self) -> int:
        """Deletes the rows of buckets full again (idle burst / rate seconds); how many."""
        idle_s = min(self.burst / self.rate, MAX_IDLE_S) if self.rate > 0 else MAX_IDLE_S
        deleted = 0
        while True:
            async with self.engine.connect() as conn:
                result = await conn.execute(self._sweep_sql,
                                            {"idle_s": idle_s, "batch": SWEEP_BATCH})
            deleted += result.rowcount
            if result.rowcount < SWEEP_BATCH:
                return deleted

    async def close(self) -> None:
        """Waits for a running sweep; disposes of the pool when this object made it."""
        if self._sweeping is not None:
            with suppress(Exception):
                await self._sweeping
        if self._owns_engine:
            await self.engine.dispose()


def open_postgres_buckets(settings: Settings,
                          fallback: TokenBuckets | SharedTokenBuckets | None = None, *,
                          pool_size: int = 2, max_overflow: int = 2,
                          **options: Any) -> PostgresTokenBuckets:
    """``PostgresTokenBuckets`` of ``settings.limits`` on a pool of their own (``pool_size``
    + ``max_overflow`` connections in autocommit, labelled ``twin rate limits`` in
    pg_stat_activity) to the settings' database. A take waits at most 1 s to connect, 1 s
    for a pooled connection and 2 s for its statement before it falls back: a slow database
    must not hold requests. ``options``: ``PostgresTokenBuckets``'s (``hash_key``,
    ``retry_after_s``, ...)."""
    from sqlalchemy.ext.asyncio import create_async_engine

    from twin.core.db import database_url

    engine = create_async_engine(
        database_url(settings), pool_size=pool_size, max_overflow=max_overflow,
        pool_timeout=1.0, pool_pre_ping=False,  # a dead connection fails its take: fallback
        isolation_level="AUTOCOMMIT", pool_reset_on_return=None,  # no transaction to end
        connect_args={"connect_timeout": 1, "application_name": POOL_LABEL,
                      "options": "-c statement_timeout=2000"})
    return PostgresTokenBuckets(engine, settings.limits.rate_per_s, settings.limits.burst,
                                fallback=fallback, owns_engine=True, **options)


def retry_after(wait_s: float) -> str:
    """Retry-After in whole seconds, never 0 (0 invites an immediate retry storm)."""
    return str(max(1, math.ceil(wait_s)))

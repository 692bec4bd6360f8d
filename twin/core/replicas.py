"""Reads on hot standbys, writes on the primary, read-your-writes (issue 15).

``ReadRouter`` holds one pool per standby of ``TWIN_DB_STANDBY_URLS`` (the options of
twin.core.db.async_engine: connect and statement timeouts, the server-gone handling) and a
background task that checks every standby each ``TWIN_DB_STANDBY_CHECK_S``: does it answer,
is it in recovery, how far has it replayed (``pg_last_wal_replay_lsn()``), and how stale is
it. ``choose(min_lsn)`` gives the engine a read-only request reads on.

The lag is measured against the primary, not with ``pg_last_xact_replay_timestamp()`` (which
grows without bound while the primary is idle, and says nothing while it is busy): each
check reads the primary's ``pg_current_wal_lsn()`` first and keeps these samples; a
standby's lag is the age of the oldest sample it has not replayed yet, 0 when it has
replayed the newest. So a standby that stopped replaying (paused, or cut off) ages from the
first write it missed, whether or not the primary writes anything after it.

A read carrying a write's WAL position (the ``Twin-LSN`` token, twin/api/readroute.py) goes
to a standby that has replayed it; when none has yet, it waits up to ``TWIN_DB_RYW_WAIT_MS``
(one poll per standby shared by every waiting request, a few milliseconds apart), then
reads the primary. A standby that fails a request (``report_failure``) is skipped until
its next successful check. With no standby URLs every call gives the primary.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import psycopg
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from twin.core.db import SERVER_GONE, async_engine
from twin.core.settings import Settings

log = logging.getLogger("twin.core.replicas")

# A WAL position as PostgreSQL prints it: two hexadecimal 32-bit halves.
LSN = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")
# Pauses between the polls of a standby's replay position while requests wait for it.
FIRST_PAUSE_S, LAST_PAUSE_S = 0.002, 0.02
# SQLSTATEs PostgreSQL cancels (or ends) a standby's query with when it conflicts with the
# replay of the primary's WAL (a dropped table, a vacuumed row, a lock), all with the
# message "... due to conflict with recovery": serialization_failure (snapshots, locks, buffer
# pins, tablespaces; also the FATAL that ends an idle-in-transaction session),
# deadlock_detected (a buffer pin deadlock with the startup process), database_dropped,
# query_canceled (kept for older servers).
RECOVERY_CONFLICT = frozenset({"40001", "40P01", "57P04", "57014"})
# The standby has not replayed the table or column yet that the registry (read on the
# primary) names: undefined_table, undefined_column.
BEHIND = frozenset({"42P01", "42703"})
# A standby's pool: the reads of the primary's pool move there, in pools a little smaller.
POOL_SHARE = 2


def parse_lsn(value: str | None) -> int | None:
    """A WAL position as a number (None for None or anything that is not one)."""
    if not value:
        return None
    match = LSN.match(value.strip())
    if match is None:
        return None
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def _sqlstate(error: BaseException) -> str | None:
    original = getattr(error, "orig", error)
    return getattr(original, "sqlstate", None)


def is_recovery_conflict(error: BaseException) -> bool:
    """A standby cancelled the statement (or ended the session) because it conflicted with
    the replay of the primary's WAL."""
    original = getattr(error, "orig", error)
    return (_sqlstate(error) in RECOVERY_CONFLICT
            and "conflict with recovery" in str(original))


def retry_on_primary(error: BaseException) -> str | None:
    """Why a read that failed on a standby with ``error`` is worth doing again on the primary
    ("recovery conflict", "standby unavailable", "standby behind"), or None: the same read
    would fail there too (a statement timeout, bad input, a bug)."""
    if is_recovery_conflict(error):
        return "recovery conflict"
    state = _sqlstate(error)
    if state in BEHIND:
        return "standby behind"
    if state == "57014":  # the statement timeout: the primary would take as long
        return None
    if state in SERVER_GONE or isinstance(error, (OperationalError, psycopg.OperationalError)):
        return "standby unavailable"
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return "standby unavailable"
    return None


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _shown(url: str) -> str:
    made = make_url(url)
    return f"{made.host or 'localhost'}:{made.port or 5432}/{made.database or ''}"


@dataclass
class Standby:
    """One standby as the last check (and the requests since) found it."""

    name: str  # host:port/database, no credentials
    url: str
    engine: AsyncEngine
    # Connections its pool may hold; a read finding them all busy goes to the primary
    # rather than queue for one.
    capacity: int = 1
    healthy: bool = False
    in_recovery: bool | None = None
    replayed: int | None = None
    # monotonic time of the oldest primary position it has not replayed, None: caught up.
    behind_since: float | None = None
    error: str | None = None
    checked: float | None = None
    conn: psycopg.AsyncConnection | None = field(default=None, repr=False)
    poll_conn: psycopg.AsyncConnection | None = field(default=None, repr=False)
    # Requests waiting for a WAL position: (position, future set to True once replayed).
    waiters: list[tuple[int, asyncio.Future]] = field(default_factory=list, repr=False)
    poller: asyncio.Task | None = field(default=None, repr=False)

    def lag_s(self, now: float) -> float:
        return 0.0 if self.behind_since is None else max(now - self.behind_since, 0.0)

    def usable(self, now: float, max_lag_s: float) -> bool:
        return (self.healthy and self.lag_s(now) <= max_lag_s
                and self.engine.pool.checkedout() < self.capacity)  # type: ignore[attr-defined]

    def detail(self, now: float, max_lag_s: float) -> dict:
        """``healthy``: answering, in recovery; ``serving``: healthy and within the lag bound
        (reads go there)."""
        return {"standby": self.name, "healthy": self.healthy,
                "serving": self.healthy and self.lag_s(now) <= max_lag_s,
                "lag_s": round(self.lag_s(now), 3) if self.replayed is not None else None,
                "replay_lsn": format_lsn(self.replayed) if self.replayed is not None else None,
                **({"error": self.error} if self.error else {})}


class ReadRouter:
    """Where a read-only request reads: see the module's doc. ``open`` inside the event loop,
    ``close`` at shutdown."""

    def __init__(self, settings: Settings, primary: AsyncEngine):
        self.settings = settings
        self.primary = primary
        db = settings.db
        pool_size = max(2, db.pool_size // POOL_SHARE)
        overflow = max(db.max_overflow // POOL_SHARE, 0)
        self.standbys = [
            Standby(_shown(url), url, async_engine(
                settings, pool_size=pool_size, max_overflow=overflow,
                application_name="twin reads", url=url), capacity=pool_size + overflow)
            for url in db.standby_urls]
        self._by_engine = {id(standby.engine): standby for standby in self.standbys}
        self._turn = itertools.count()
        # (monotonic time, primary WAL position) of the recent checks, oldest first.
        self._samples: deque[tuple[float, int]] = deque()
        self._primary_conn: psycopg.AsyncConnection | None = None
        self._task: asyncio.Task | None = None
        self._first_check = asyncio.Event()

    @property
    def active(self) -> bool:
        """Whether there are standbys at all (else every read is the primary's)."""
        return bool(self.standbys)

    @classmethod
    async def open(cls, settings: Settings, primary: AsyncEngine) -> ReadRouter:
        """The router with its checks running; the first check is awaited (bounded by the
        connect timeout), so the first requests already read on the standbys."""
        router = cls(settings, primary)
        if router.active:
            router._task = asyncio.get_running_loop().create_task(router._check_forever())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(router._first_check.wait(),
                                       settings.db.connect_timeout + 1.0)
        return router

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for standby in self.standbys:
            if standby.poller is not None:
                standby.poller.cancel()
                await asyncio.gather(standby.poller, return_exceptions=True)
            for conn in (standby.conn, standby.poll_conn):
                await _close(conn)
            standby.conn = standby.poll_conn = None
            await standby.engine.dispose()
        await _close(self._primary_conn)
        self._primary_conn = None

    # --- choosing -------------------------------------------------------------------------

    def standby_of(self, engine: AsyncEngine | None) -> Standby | None:
        """The standby whose pool ``engine`` is (None: the primary's or unknown)."""
        return self._by_engine.get(id(engine)) if engine is not None else None

    def is_standby(self, engine: AsyncEngine | None) -> bool:
        return self.standby_of(engine) is not None

    async def choose(self, min_lsn: str | None = None) -> AsyncEngine:
        """The engine to read on: a healthy standby within TWIN_DB_MAX_LAG_S that has
        replayed ``min_lsn`` (when given; waiting up to TWIN_DB_RYW_WAIT_MS for one), spread
        over the standbys that qualify; else the primary."""
        if not self.standbys:
            return self.primary
        now = time.monotonic()
        usable = [s for s in self.standbys if s.usable(now, self.settings.db.max_lag_s)]
        if not usable:
            return self.primary
        want = parse_lsn(min_lsn)
        if want is None:
            return self._spread(usable).engine
        ready = [s for s in usable if s.replayed is not None and s.replayed >= want]
        if ready:
            return self._spread(ready).engine
        wait_s = self.settings.db.ryw_wait_ms / 1000
        if wait_s <= 0:
            return self.primary
        replayed = await self._first_to_replay(usable, want, wait_s)
        return replayed.engine if replayed is not None else self.primary

    def _spread(self, standbys: list[Standby]) -> Standby:
        return standbys[next(self._turn) % len(standbys)]

    async def _first_to_replay(self, standbys: list[Standby], want: int,
                               timeout_s: float) -> Standby | None:
        loop = asyncio.get_running_loop()
        futures: dict[asyncio.Future, Standby] = {}
        for standby in standbys:
            future = loop.create_future()
            standby.waiters.append((want, future))
            futures[future] = standby
            if standby.poller is None or standby.poller.done():
                standby.poller = loop.create_task(self._poll_replay(standby))
        pending = set(futures)
        deadline = loop.time() + timeout_s
        try:
            while pending:
                left = deadline - loop.time()
                if left <= 0:
                    return None
                done, pending = await asyncio.wait(pending, timeout=left,
                                                   return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    if not future.cancelled() and future.result():
                        return futures[future]
            return None
        finally:
            for future, standby in futures.items():
                if not future.done():
                    future.cancel()
                standby.waiters = [(lsn, f) for lsn, f in standby.waiters if not f.done()]

    async def _poll_replay(self, standby: Standby) -> None:
        """Polls the standby's replay position while requests wait for it; wakes each when
        its position is replayed. One poll serves every waiter of the standby."""
        pause = FIRST_PAUSE_S
        try:
            while standby.waiters:
                if standby.poll_conn is None or standby.poll_conn.closed:
                    standby.poll_conn = await self._connect(standby.url)
                cursor = await standby.poll_conn.execute(
                    "SELECT pg_last_wal_replay_lsn()::text")
                row = await cursor.fetchone()
                replayed = parse_lsn(row[0]) if row else None
                if replayed is not None:
                    standby.replayed = max(standby.replayed or 0, replayed)
                    waiting = []
                    for lsn, future in standby.waiters:
                        if future.done():
                            continue
                        if lsn <= replayed:
                            future.set_result(True)
                        else:
                            waiting.append((lsn, future))
                    standby.waiters = waiting
                if standby.waiters:
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, LAST_PAUSE_S)
        except (psycopg.Error, OSError) as error:
            self._mark_down(standby, error)
            await _close(standby.poll_conn)
            standby.poll_conn = None
            for _lsn, future in standby.waiters:
                if not future.done():
                    future.set_result(False)
            standby.waiters = []

    # --- what requests report --------------------------------------------------------------

    def report_failure(self, engine: AsyncEngine | None, error: BaseException) -> None:
        """A request failed on ``engine`` with ``error``: when the standby itself is the
        problem (gone, refusing connections), skip it until its next good check."""
        standby = self.standby_of(engine)
        if standby is not None and retry_on_primary(error) == "standby unavailable":
            self._mark_down(standby, error)

    def _mark_down(self, standby: Standby, error: BaseException) -> None:
        if standby.healthy:
            log.warning("standby %s skipped: %s", standby.name,
                        str(getattr(error, "orig", error)).strip().splitlines()[:1])
        standby.healthy = False
        standby.error = (str(getattr(error, "orig", error)).strip().splitlines() or [""])[0]

    async def current_lsn(self) -> str:
        """The primary's WAL position now (``pg_current_wal_lsn()``): read after a write
        committed, every read that waits for it sees the write."""
        async with self.primary.connect() as conn:
            return (await conn.execute(text("SELECT pg_current_wal_lsn()::text"))).scalar_one()

    def details(self) -> list[dict]:
        now = time.monotonic()
        return [standby.detail(now, self.settings.db.max_lag_s) for standby in self.standbys]

    # --- the background checks --------------------------------------------------------------

    async def _check_forever(self) -> None:
        while True:
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the checks die: the next one tries again
                log.exception("standby check failed")
            self._first_check.set()
            await asyncio.sleep(self.settings.db.standby_check_s)

    async def check(self) -> None:
        """One pass: the primary's position first, then every standby at once."""
        now = time.monotonic()
        primary = await self._primary_position()
        if primary is not None:
            self._samples.append((now, primary))
            # Kept long enough to age a stuck standby past the lag bound, and a little more.
            horizon = now - max(self.settings.db.max_lag_s * 2, 10.0)
            while len(self._samples) > 1 and self._samples[0][0] < horizon:
                self._samples.popleft()
        await asyncio.gather(*(self._check_standby(standby) for standby in self.standbys))

    async def _primary_position(self) -> int | None:
        try:
            if self._primary_conn is None or self._primary_conn.closed:
                self._primary_conn = await self._connect(
                    self.primary.url.render_as_string(hide_password=False))
            cursor = await self._primary_conn.execute("SELECT pg_current_wal_lsn()::text")
            row = await cursor.fetchone()
            return parse_lsn(row[0]) if row else None
        except (psycopg.Error, OSError) as error:
            log.debug("standby check: the primary does not answer: %s", error)
            await _close(self._primary_conn)
            self._primary_conn = None
            return None

    async def _check_standby(self, standby: Standby) -> None:
        timeout = float(self.settings.db.connect_timeout)
        try:
            async with asyncio.timeout(timeout + 1.0):
                if standby.conn is None or standby.conn.closed:
                    standby.conn = await self._connect(standby.url)
                cursor = await standby.conn.execute(
                    "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text")
                row = await cursor.fetchone()
        except (psycopg.Error, OSError, TimeoutError) as error:
            self._mark_down(standby, error)
            await _close(standby.conn)
            standby.conn = None
            standby.checked = time.monotonic()
            return
        assert row is not None
        in_recovery, replay = row
        replayed = parse_lsn(replay)
        standby.in_recovery = in_recovery
        standby.checked = time.monotonic()
        if replayed is not None:
            standby.replayed = max(standby.replayed or 0, replayed)
        standby.behind_since = self._oldest_missing(standby.replayed, self._samples)
        # Promoted (no longer in recovery): no longer fed by the primary; never read there.
        good = bool(in_recovery) and standby.replayed is not None
        if good and not standby.healthy:
            log.info("standby %s serves reads", standby.name)
        standby.healthy = good
        standby.error = None if good else "not in recovery"

    @staticmethod
    def _oldest_missing(replayed: int | None, samples: Iterable[tuple[float, int]]
                        ) -> float | None:
        """When the oldest primary position the standby has not replayed was read."""
        for at, position in samples:
            if replayed is None or position > replayed:
                return at
        return None

    async def _connect(self, url: str) -> psycopg.AsyncConnection:
        return await psycopg.AsyncConnection.connect(
            _libpq(url), autocommit=True, connect_timeout=self.settings.db.connect_timeout,
            application_name="twin standby check")


async def _close(conn: psycopg.AsyncConnection | None) -> None:
    if conn is not None:
        with contextlib.suppress(Exception):
            await conn.close()

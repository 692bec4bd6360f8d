"""Every layer's data version, pushed to each server process by PostgreSQL LISTEN/NOTIFY.

Tiles, the registry and the listings key everything by ``layers.data_version``, which a
trigger bumps on every write to a layer's table (migration 0001); migration 0008 announces
each change of a ``layers`` row on the ``twin_layer_versions`` channel (``id:version``,
``id:`` for a deleted layer). Each process holds one connection LISTENing there
(``LayerVersions``) and keeps the versions in memory, so a request that only needs them (a
cached tile) costs no database round trip.

Exactness ("a request that starts after a commit sees it") rests on three facts:

* PostgreSQL delivers notifications after commit, in commit order, to every listener;
* a listener that (re)connects LISTENs first and then reads every version, and is not used
  until its own marker notification, sent after that read, comes back: everything committed
  before the marker has been applied by then (``_Resync``);
* a change made through twin is answered only once every listener of the database has
  applied it: the writer sends a barrier notification after its commit and waits for each
  listener's acknowledgement (``LayerVersions.sync``, called before a write's response
  leaves). The listeners are found by name in ``pg_stat_activity`` in the same statement
  that sends the barrier; a listener names itself only once it LISTENs, so each one named
  receives the barrier, after every notification committed before it.

Routes that do database work anyway (the listings, features, the style) read the versions
per request (``read(pushed=False)``): exact for any writer at the cost of one shared query.
While the listener is down (a database restart) or not yet in sync, tiles read them per
request too (``DataVersions``: one query shared by concurrent requests,
sent after they arrived), until it has reconnected and read everything again. While it is
up, it reads everything again every ``TWIN_TILES_VERSIONS_POLL_S`` seconds (the bounded
fallback poll: a lost notification, were there one, lives at most that long) and counts as
down when that read's marker does not come back within the same time.

Changes made outside twin (``psql``, a loader) are seen by each process as soon as its
listener receives them: the notification delivery latency (well under a millisecond on
one machine), with no barrier to wait on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from dataclasses import dataclass, field

import psycopg
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from twin.core.errors import DatabaseUnavailable

log = logging.getLogger("twin.core.versions")

CHANNEL = "twin_layer_versions"
# application_name of every listener connection; writers find the listeners by it.
LISTENER_PREFIX = "twin versions "
# Control payloads carry no ':' (a layer's payload always does): a writer's barrier
# (?token), a listener's acknowledgement of it (!token name) and a resync marker (#token).
BARRIER, ACK, MARKER = "?", "!", "#"


class DataVersions:
    """Every layer's ``data_version``, read by one query that concurrent requests share.

    Exact: a request joins the next query *sent after it arrived*, never one already on its
    way, so the versions it gets are at least as new as the database when it asked.

    The query runs on one connection held for the purpose (no pool checkout, no pre-ping per
    request). When it breaks (a database restart), the query is retried once on a new
    connection; if that fails too, the waiting requests get 503. The same connection sends
    the writers' barriers (``barrier``).
    """

    _QUERY = "SELECT id, data_version FROM layers"
    # The listeners of this database, and the barrier, in one statement: pg_stat_activity is
    # read before the notification commits (at the statement's end), so every listener
    # named was LISTENing before the barrier was sent.
    _BARRIER = ("SELECT pg_notify(%s, %s), ARRAY(SELECT application_name FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name LIKE %s)")

    def __init__(self, engine: AsyncEngine):
        self._engine = engine
        self._conn: AsyncConnection | None = None
        self._driver: psycopg.AsyncConnection | None = None
        # One opener at a time: the reader task and a writer's barrier can both find the
        # connection gone (a restart), and the engine's pool holds one connection; a second
        # opener would wait for it until the pool timeout.
        self._opening = asyncio.Lock()
        # The query the next arrivals join, and whether a reader task is running.
        self._next: asyncio.Future | None = None
        self._reading = False
        self._task: asyncio.Task | None = None  # held: the loop keeps only weak references

    async def read(self) -> dict[str, int]:
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            if not self._reading:
                self._reading = True
                self._task = asyncio.get_running_loop().create_task(self._read_batches())
        # shield: one caller giving up (a client gone) must not cancel the others' answer.
        return await asyncio.shield(self._next)

    async def barrier(self, token: str) -> list[str]:
        """Sends the barrier ``token``; returns the listeners that will receive it."""
        row = await self._execute(self._BARRIER, (CHANNEL, BARRIER + token,
                                                  LISTENER_PREFIX + "%"))
        return row[0][1]

    async def _read_batches(self) -> None:
        try:
            while self._next is not None:
                batch, self._next = self._next, None
                try:
                    batch.set_result(dict(await self._execute(self._QUERY)))
                except Exception as error:  # every waiter gets the error, e.g. 503
                    batch.set_exception(error)
                    # Retrieved or not, the error is the waiters'; no "never retrieved" noise.
                    batch.exception()
        finally:
            self._reading = False

    async def _execute(self, query: str, params: tuple | None = None) -> list[tuple]:
        for attempt in (1, 2):
            driver = None
            try:
                # Connecting is inside: with the database down it fails (SQLAlchemy's
                # error), and a writer's barrier, sent as its response starts (twin/api/sync.py),
                # must meet DatabaseUnavailable, never an error that turns the answer into a 500.
                driver = await self._connection()
                # psycopg directly: SQLAlchemy's execute costs ~150 us of CPU more than the
                # query itself.
                cursor = await driver.execute(query, params, prepare=True)
                return await cursor.fetchall()
            except (psycopg.Error, DBAPIError) as error:
                await self._drop(driver)
                if attempt == 2:
                    raise DatabaseUnavailable("the database is unavailable; try again "
                                              "shortly") from error
        raise AssertionError("unreachable")

    async def _connection(self) -> psycopg.AsyncConnection:
        """The held connection, from the engine DataVersions was given (twin.core.db's options)."""
        async with self._opening:
            if self._conn is None:
                conn = await self._engine.connect()
                try:
                    conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
                    self._driver = (await conn.get_raw_connection()).driver_connection
                except BaseException:
                    await _discard(conn)  # back to the pool, not leaked
                    raise
                self._conn = conn
            driver = self._driver
        assert driver is not None
        return driver

    async def _drop(self, driver: psycopg.AsyncConnection | None) -> None:
        """Drops the held connection if it is still the one that failed (``driver``): the
        other user of it may have replaced it already, with one that works."""
        if driver is None or driver is not self._driver:
            return
        conn, self._conn, self._driver = self._conn, None, None
        if conn is not None:
            await _discard(conn)

    async def close(self) -> None:
        """Closes the connection and disposes of the engine: give DataVersions one of its own."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()
        await self._engine.dispose()


@dataclass
class _Resync:
    """A full read in progress: the snapshot, with every notification received since the read
    was sent applied on top, in order. When ``token`` comes back, everything committed before
    the snapshot has been received too, so the copy is exact (a notification older than the
    snapshot may arrive after it, but every later one follows it)."""

    token: str
    versions: dict[str, int]
    deadline: float


@dataclass
class _Barrier:
    expected: set[str] | None = None
    acked: set[str] = field(default_factory=set)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def check(self) -> None:
        if self.expected is not None and self.expected <= self.acked:
            self.done.set()


class LayerVersions:
    """This process's layer versions, kept current by its listener (see the module's doc).

    ``current()`` is the hot path: the versions in memory, or None while the listener is not
    in sync (then ``read()`` reads them per request). ``sync()`` is for writers, after their
    commit. ``start()`` in the app's lifespan, ``close()`` at its end.
    """

    def __init__(self, url: str, fallback: DataVersions, poll_s: float = 5.0,
                 sync_timeout_s: float = 2.0, connect_timeout_s: float = 3.0):
        self._url = url
        self._fallback = fallback
        self._poll_s = poll_s
        self._sync_timeout_s = sync_timeout_s
        self._connect_timeout_s = connect_timeout_s
        # Unique per listener connection of the database (pid alone repeats across machines).
        self.name = f"{LISTENER_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self._versions: dict[str, int] | None = None
        self._resync: _Resync | None = None
        self._barriers: dict[str, _Barrier] = {}
        self._next_poll = 0.0
        self._task: asyncio.Task | None = None

    # --- readers ------------------------------------------------------------------------

    def current(self) -> dict[str, int] | None:
        """Every layer's version as of now, or None while the listener is not in sync.

        Never mutated in place: a request holding it keeps one consistent set."""
        return self._versions

    async def read(self, pushed: bool = True) -> dict[str, int]:
        """The versions in memory when in sync (and ``pushed``), else read now: a query that
        concurrent requests share, sent after they arrived, exact for any writer."""
        versions = self._versions if pushed else None
        return versions if versions is not None else await self._fallback.read()

    @property
    def listening(self) -> bool:
        return self._versions is not None

    # --- writers ------------------------------------------------------------------------

    async def sync(self) -> None:
        """Returns once every listener of the database has applied everything committed
        before this call (or after ``TWIN_TILES_VERSIONS_SYNC_TIMEOUT_S``, logged)."""
        if self._task is None:
            return
        token = secrets.token_hex(8)
        barrier = self._barriers[token] = _Barrier()
        try:
            listeners = await self._fallback.barrier(token)
            if self.name not in listeners:
                return  # acknowledgements come through this process's listener: it is down
            barrier.expected = set(listeners)
            barrier.check()
            await asyncio.wait_for(barrier.done.wait(), self._sync_timeout_s)
        except TimeoutError:
            log.warning("layer versions: listeners %s did not acknowledge a change within "
                        "%g s (TWIN_TILES_VERSIONS_SYNC_TIMEOUT_S)",
                        sorted((barrier.expected or set()) - barrier.acked),
                        self._sync_timeout_s)
        except DatabaseUnavailable:
            pass  # nothing was committed through a database that is away
        finally:
            del self._barriers[token]

    # --- the listener -------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._listen())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._versions = None
        await self._fallback.close()

    async def _listen(self) -> None:
        delay, failing = 0.1, False
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._url, autocommit=True,
                    connect_timeout=max(1, round(self._connect_timeout_s)))
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    # Named only now: a writer that sees this name knows it LISTENs.
                    await conn.execute("SELECT set_config('application_name', %s, false)",
                                       (self.name,))
                    if failing:
                        log.info("layer versions: listening again")
                    delay, failing = 0.1, False
                    await self._session(conn)
            except (psycopg.Error, OSError, _OutOfSync) as error:
                self._versions, self._resync = None, None
                if not failing:
                    log.warning("layer versions: listener down, reading versions per request "
                                "until it is back: %s", error)
                failing = True
            await asyncio.sleep(delay)
            delay = min(2 * delay, self._poll_s)

    async def _session(self, conn: psycopg.AsyncConnection) -> None:
        await self._start_resync(conn)
        while True:
            assert self._resync is not None or self._versions is not None
            now = time.monotonic()
            if self._resync is not None and now > self._resync.deadline:
                raise _OutOfSync(f"no answer to a full read within {self._poll_s:g} s")
            wait = (self._resync.deadline if self._resync else self._next_poll) - now
            acks: list[str] = []
            # stop_after=1 ends the generator after the packet it is in (never mid-packet:
            # breaking out of it would drop the rest), so acknowledgements leave at once.
            async for note in conn.notifies(timeout=max(0.0, wait), stop_after=1):
                self._apply(note.payload, acks)
            for token in acks:
                await conn.execute("SELECT pg_notify(%s, %s)",
                                   (CHANNEL, f"{ACK}{token} {self.name}"))
            if self._resync is None and time.monotonic() >= self._next_poll:
                await self._start_resync(conn)

    async def _start_resync(self, conn: psycopg.AsyncConnection) -> None:
        cursor = await conn.execute("SELECT id, data_version FROM layers")
        snapshot: dict[str, int] = dict(await cursor.fetchall())
        token = secrets.token_hex(8)
        self._resync = _Resync(token, snapshot, time.monotonic() + self._poll_s)
        await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, MARKER + token))

    def _apply(self, payload: str, acks: list[str]) -> None:
        layer_id, colon, version = payload.rpartition(":")
        if colon:
            if self._versions is not None:
                self._versions = _changed(self._versions, layer_id, version)
            if self._resync is not None:
                self._resync.versions = _changed(self._resync.versions, layer_id, version)
        elif payload.startswith(BARRIER):
            acks.append(payload[1:])
        elif payload.startswith(ACK):
            token, _, name = payload[1:].partition(" ")
            barrier = self._barriers.get(token)
            if barrier is not None:
                barrier.acked.add(name)
                barrier.check()
        elif payload.startswith(MARKER) and self._resync and payload[1:] == self._resync.token:
            if self._versions is not None and self._versions != self._resync.versions:
                log.warning("layer versions: the periodic read found versions no notification "
                            "brought; corrected")
            self._versions, self._resync = self._resync.versions, None
            self._next_poll = time.monotonic() + self._poll_s


class _OutOfSync(Exception):
    pass


async def _discard(conn: AsyncConnection) -> None:
    """Invalidates a broken connection and gives its place back to the pool; each step on
    its own, so a failing invalidate cannot leave the pool's place taken (DataVersions'
    pool has one: the next opener would wait for the pool timeout)."""
    with contextlib.suppress(Exception):
        await conn.invalidate()
    with contextlib.suppress(Exception):
        await conn.close()


def _changed(versions: dict[str, int], layer_id: str, version: str) -> dict[str, int]:
    """A new dict with one layer's version changed (or the layer gone)."""
    changed = {key: value for key, value in versions.items() if key != layer_id}
    if version:
        changed[layer_id] = int(version)
    return changed


def announce(url: str, timeout_s: float = 5.0) -> set[str]:
    """For a writer outside twin (a loader, a script, a test), after its commit: returns
    once every twin process's listener on the database at ``url`` (libpq) has applied it,
    as ``LayerVersions.sync`` does for twin's own writes; returns the listeners that did not
    answer within ``timeout_s`` (none, normally)."""
    token = secrets.token_hex(8)
    url = url.replace("postgresql+psycopg://", "postgresql://", 1)  # a SQLAlchemy URL too
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"LISTEN {CHANNEL}")
        row = conn.execute(DataVersions._BARRIER, (CHANNEL, BARRIER + token,
                                                   LISTENER_PREFIX + "%")).fetchone()
        waiting = set(row[1]) if row else set()
        deadline = time.monotonic() + timeout_s
        while waiting and (left := deadline - time.monotonic()) > 0:
            for note in conn.notifies(timeout=left, stop_after=1):
                if note.payload.startswith(f"{ACK}{token} "):
                    waiting.discard(note.payload.partition(" ")[2])
    return waiting

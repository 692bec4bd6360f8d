"""Where the database is (managed cluster or ``TWIN_DATABASE_URL``) and engines onto it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from twin.core.cluster import ManagedCluster
from twin.core.settings import Settings

log = logging.getLogger("twin.core.db")

# SQLSTATEs of a server that is going away: admin_shutdown (pg_ctl stop/restart),
# crash_shutdown, cannot_connect_now (starting up or shutting down).
SERVER_GONE = frozenset({"57P01", "57P02", "57P03"})


def _server_gone_is_a_disconnect(context: ExceptionContext) -> None:
    """The server's last words ("terminating connection due to administrator command") reach
    psycopg before the socket closes, so neither psycopg nor SQLAlchemy sees a disconnect yet:
    the connection would go back to the pool, and the ROLLBACK on its return would fail
    outside any error handler (the client's connection dropped with no answer). Marked as a
    disconnect, it is invalidated at once with every older pooled connection, and the
    request gets its 503."""
    if getattr(context.original_exception, "sqlstate", None) in SERVER_GONE:
        context.is_disconnect = True


def database_url(settings: Settings) -> str:
    """SQLAlchemy URL (psycopg 3 driver) of the database twin works on."""
    if settings.database_url:
        return sqlalchemy_url(settings.database_url)
    return ManagedCluster(settings).url()


def sqlalchemy_url(url: str) -> str:
    """A PostgreSQL URL as SQLAlchemy with psycopg 3 reads it (password kept)."""
    made = make_url(url)
    if made.drivername in ("postgresql", "postgres", "postgresql+psycopg2"):
        made = made.set(drivername="postgresql+psycopg")
    return made.render_as_string(hide_password=False)


def libpq_url(settings: Settings) -> str:
    """The same URL for plain psycopg (COPY and admin work)."""
    return database_url(settings).replace("postgresql+psycopg://", "postgresql://", 1)


def sync_engine(settings: Settings) -> Engine:
    """For migrations, sample loads and upload ingestion: work off the request path whose
    length grows with the data (a 5 M-feature upload, a full reload), so the API's statement
    timeout does not apply here. Upload jobs bound their own transaction instead
    (TWIN_UPLOADS_STATEMENT_TIMEOUT_S, layers/jobs.py), besides the TWIN_UPLOADS_ limits."""
    engine = create_engine(database_url(settings), pool_pre_ping=True)
    event.listen(engine, "handle_error", _server_gone_is_a_disconnect)
    return engine


def async_engine(settings: Settings, pool_size: int | None = None,
                 max_overflow: int | None = None, pre_ping: bool = True,
                 server_settings: dict[str, str] | None = None,
                 application_name: str | None = None, url: str | None = None) -> AsyncEngine:
    """The API's pool. Every connection carries the statement timeout, set once at connect
    time (libpq ``options``) so it costs no round trip per request and covers every
    statement, including the tile path's autocommit connections.

    ``server_settings`` are more PostgreSQL settings for every connection of the pool.
    ``application_name`` labels a background job's connections in ``pg_stat_activity``
    (``twin escalation``, ...), so an operator, and a test, tells them from requests.
    ``pool_size``/``max_overflow`` override the settings for a pool of a special purpose:
    work a request does besides its own connection (loading the layer registry) needs a pool
    of its own, or under load every pooled connection can be held by requests that each wait
    for one more: a deadlock until the pool timeout.
    ``url``: another server with the same options (a hot standby, twin/core/replicas.py);
    by default the database of ``settings``.
    """
    db = settings.db
    connect_args: dict = {"connect_timeout": db.connect_timeout}
    if application_name:
        connect_args["application_name"] = application_name
    options = dict(server_settings or {})
    if db.statement_timeout_ms:
        options["statement_timeout"] = str(db.statement_timeout_ms)
    if options:
        connect_args["options"] = " ".join(f"-c {name}={value}"
                                           for name, value in options.items())
    engine = create_async_engine(
        sqlalchemy_url(url) if url else database_url(settings),
        pool_size=db.pool_size if pool_size is None else pool_size,
        max_overflow=db.max_overflow if max_overflow is None else max_overflow,
        # A request queues this long for a connection, then gets 503 (twin/api/errors.py).
        pool_timeout=db.pool_timeout,
        # A connection that died with the database is noticed at checkout and replaced, so
        # the app recovers by itself when PostgreSQL comes back.
        # (pre_ping=False: the tile pool, which retries a request on a fresh connection
        # instead of paying a round trip on every checkout; see tiles.cache.cached_tile.)
        pool_pre_ping=pre_ping,
        connect_args=connect_args,
    )
    event.listen(engine.sync_engine, "handle_error", _server_gone_is_a_disconnect)
    return engine


@asynccontextmanager
async def pooled_connection(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection of the pool whose release never raises.

    Release rolls back the request's transaction. When the database went away after the
    request's last statement, that ROLLBACK fails; the response is on its way by then, and an
    error raised there would cut it off (the client sees a dropped connection). SQLAlchemy
    has already invalidated the dead connection, so there is nothing left to do but log.
    """
    conn = await engine.connect()
    try:
        yield conn
    finally:
        try:
            await conn.close()
        except DBAPIError as error:
            log.warning("database connection lost on release: %s", error.orig)


class SessionLock:
    """Leadership among server processes: the one holding a session-level advisory lock
    (``pg_try_advisory_lock(key)``) on a connection of its own is the one that runs a
    background job (audit pruning, partition maintenance, the detectors).

    The lock belongs to the session, not to a transaction: it outlives every commit, so the
    holder keeps it by keeping the connection, and loses it only when that connection ends
    (the process stops, or the database drops it; another process then takes over). For the
    same reason the connection must never go back to the pool, where it would keep the lock
    for whoever checks it out next: ``release`` invalidates it (closing it for good).
    """

    def __init__(self, settings: Settings, key: int, label: str,
                 application_name: str | None = None):
        """``label`` starts the log messages ("audit log"); ``application_name`` labels the
        lock's connection in ``pg_stat_activity``. The connection comes from a pool of one
        of the lock's own (``close`` disposes of it): it is held for as long as the process
        leads, and must never be one a request or a job waits for."""
        self._engine = async_engine(settings, pool_size=1, max_overflow=0,
                                    application_name=application_name)
        self._key = key
        self._label = label
        self._conn: AsyncConnection | None = None

    async def hold(self) -> AsyncConnection | None:
        """The connection holding the lock when this process holds it (taking it when it is
        free), else None. A held connection is checked first: when the database dropped it
        (and the lock with it) this raises, and the caller ``release``s and tries later."""
        if self._conn is not None:
            await self._conn.execute(text("SELECT 1"))
            await self._conn.commit()
            return self._conn
        conn = await self._engine.connect()
        try:
            taken = (await conn.execute(text("SELECT pg_try_advisory_lock(:key)"),
                                        {"key": self._key})).scalar_one()
            await conn.commit()  # the lock outlives the transaction
        except BaseException:
            await conn.close()
            raise
        if taken:
            self._conn = conn
            return conn
        await conn.close()
        return None

    async def release(self) -> None:
        """Let go of the lock, if held: close its connection for good (never to the pool)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        for step in (conn.invalidate, conn.close):
            try:
                await step()
            except Exception as error:
                log.warning("%s: closing the lock's connection: %s", self._label, error)

    async def close(self, job: asyncio.Task | None = None) -> None:
        """Stop ``job`` (the task leading under the lock: cancelled, then awaited, for it may
        be using the lock's connection), ``release``, and close the lock's pool."""
        if job is not None:
            job.cancel()
            await asyncio.gather(job, return_exceptions=True)
        await self.release()
        await self._engine.dispose()

"""The push stream's engine: one LISTEN connection per process fanning outbox rows out to the
stream clients, the replay a reconnecting client asks for, the outbox's retention, and the
stream tickets.

Each process LISTENs on ``twin_outbox`` once (``Fanout``). On a notification, and every
``POLL_S`` as a fallback, it reads ``outbox`` rows after the last id it has read, in id
order, and puts each into the queue of every subscriber whose scope the row belongs to.
Reading "after the last id" never skips a row: ids follow commit order (a writer holds the
outbox advisory lock from taking its id until its commit is visible, twin/core/outbox.py), so
once id N is visible every id below it is visible or was rolled back.

A subscriber (``Subscription``) is registered before anything is read for it. With a last
event id it first replays the rows after that id from the table (scope-filtered in SQL), then
continues with its queue, dropping the rows the replay already gave: no gap (the queue holds
everything the listener read after the registration, the replay everything committed before
it) and no duplicate (ids only grow). Queues are bounded (``TWIN_STREAM_QUEUE_SIZE``): a
client that falls that far behind has its stream ended after what it was given, and
reconnects with ``Last-Event-ID``.

When the database goes away the listener reconnects with backoff and reads every row after
the last one it delivered: nothing is lost, only late.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any

import psycopg
from psycopg.rows import dict_row
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from twin.core.outbox import CHANNEL
from twin.core.principal import Principal, Scope, parse_scope
from twin.core.settings import StreamSettings

log = logging.getLogger("twin.live.fanout")

# The fallback poll: a notification lost (there should be none) costs at most this long.
POLL_S = 1.0
# Rows read per query, by the listener and by a replay.
PAGE = 1000
# Reconnecting to a database that went away: from the first delay, doubling up to the last.
BACKOFF_S = (0.1, 5.0)
# Outbox retention: one process at a time (a transaction-level advisory lock), this often.
PRUNE_LOCK = 7014
PRUNE_EVERY_S = 300.0
# Expired tickets are kept this long past their expiry, then deleted with the old messages.
TICKET_GRACE = timedelta(hours=1)
# The listener's application_name (pg_stat_activity) starts so, then ``<pid>-<random>``:
# one per process, told apart (a test or an operator can find one process's listener).
LISTENER_NAME = "twin push"
_COLUMNS = "id, created_at, kind, area_codes, payload"


@dataclass(frozen=True)
class Message:
    """One outbox row; ``data`` is the SSE data line, serialised once for every client."""

    id: int
    created_at: datetime
    kind: str
    area_codes: tuple[str, ...] | None
    payload: Any

    @classmethod
    def from_row(cls, row: dict) -> Message:
        codes = row["area_codes"]
        return cls(int(row["id"]), row["created_at"], row["kind"],
                   tuple(codes) if codes is not None else None, row["payload"])

    @cached_property
    def data(self) -> str:
        return json.dumps({"id": self.id, "kind": self.kind,
                           "created_at": self.created_at.isoformat(),
                           "payload": self.payload}, ensure_ascii=False, default=str)


def belongs(scope: Scope, area_codes: Sequence[str] | None) -> bool:
    """Whether a message with ``area_codes`` is for ``scope``: the city gets everything, a
    message without codes is everyone's, otherwise one of the scope's codes and one of the
    message's must be prefixes of one another (``twin.core.scope.scopes_overlap``)."""
    if scope.is_city or area_codes is None:
        return True
    return any(code.startswith(prefix) or prefix.startswith(code)
               for code in area_codes for prefix in scope.prefixes)


def scope_sql(scope: Scope) -> tuple[str, dict]:
    """``belongs`` as a predicate on ``outbox`` and its bound values."""
    if scope.is_city:
        return "TRUE", {}
    return ("(area_codes IS NULL OR EXISTS (SELECT 1 FROM unnest(area_codes) AS c, "
            "unnest(CAST(:prefixes AS text[])) AS p "
            "WHERE starts_with(c, p) OR starts_with(p, c)))",
            {"prefixes": list(scope.prefixes)})


class _End:
    """Put in a queue after its last message: the stream ends there."""


END = _End()


@dataclass(eq=False)
class Subscription:
    """One stream's messages: iterate it (``async for``), ``close()`` it when done."""

    fanout: Fanout
    scope: Scope
    # The id after which the stream starts (replayed from the table), or None: live only.
    after: int | None
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    # Why the stream ended on the server's side (overflow, shutdown), for the log.
    ended: str | None = None

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[Message]:
        last = self.after
        try:
            if last is not None:
                async for message in self.fanout.replay(self.scope, last):
                    last = message.id
                    yield message
            while True:
                item = await self.queue.get()
                if isinstance(item, _End):
                    return
                if last is None or item.id > last:
                    last = item.id
                    yield item
        finally:
            self.close()

    def close(self) -> None:
        self.fanout._subscribers.discard(self)

    def _end(self, reason: str) -> None:
        self.ended = reason
        self.close()
        self.queue.put_nowait(END)


class Fanout:
    """This process's listener and its subscribers (see the module's doc)."""

    def __init__(self, url: str, engine: AsyncEngine, settings: StreamSettings):
        self._url = url
        self._engine = engine
        self._settings = settings
        self._subscribers: set[Subscription] = set()
        # The last outbox id read (and delivered); None until the first connection.
        self.last: int | None = None
        self.listening = False
        self.name = f"{LISTENER_NAME} {os.getpid()}-{secrets.token_hex(4)}"
        self._tasks: list[asyncio.Task] = []

    @classmethod
    async def start(cls, url: str, engine: AsyncEngine, settings: StreamSettings) -> Fanout:
        fanout = cls(url, engine, settings)
        loop = asyncio.get_running_loop()
        fanout._tasks = [loop.create_task(fanout._listen(), name="twin-fanout-listen"),
                         loop.create_task(fanout._prune(), name="twin-fanout-prune")]
        return fanout

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for subscription in list(self._subscribers):
            subscription._end("the server is stopping")

    # --- subscribers --------------------------------------------------------------------

    def subscribe(self, scope: Scope, last_event_id: int | None = None) -> Subscription:
        """A stream of the messages for ``scope``: those after ``last_event_id`` (replayed,
        then live), or, without one, those read from now on. Registered at once, so nothing
        committed after this call is missed even before the first iteration."""
        subscription = Subscription(self, scope, last_event_id)
        self._subscribers.add(subscription)
        return subscription

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    async def replay(self, scope: Scope, after: int) -> AsyncIterator[Message]:
        """The rows after ``after`` for ``scope``, in id order, from the table, page by page."""
        predicate, params = scope_sql(scope)
        query = text(f"SELECT {_COLUMNS} FROM outbox WHERE id > :after AND {predicate} "
                     f"ORDER BY id LIMIT {PAGE}")
        while True:
            async with self._engine.connect() as conn:
                rows = (await conn.execute(query, {**params, "after": after})).mappings().all()
            for row in rows:
                message = Message.from_row(dict(row))
                after = message.id
                yield message
            if len(rows) < PAGE:
                return

    def _deliver(self, messages: list[Message]) -> None:
        limit = self._settings.queue_size
        # Subscribers share scopes (every street centre of a street, the city's many maps):
        # each message is matched once per scope.
        by_scope: dict[Scope, list[Subscription]] = {}
        for subscription in self._subscribers:
            by_scope.setdefault(subscription.scope, []).append(subscription)
        for scope, subscriptions in by_scope.items():
            mine = [message for message in messages if belongs(scope, message.area_codes)]
            if not mine:
                continue
            for subscription in subscriptions:
                if subscription.queue.qsize() + len(mine) > limit:
                    # Given what fits, then ended: the client resumes after the last of them.
                    for message in mine[:max(0, limit - subscription.queue.qsize())]:
                        subscription.queue.put_nowait(message)
                    log.info("push: a stream fell %d messages behind (TWIN_STREAM_QUEUE_SIZE);"
                             " ended, the client resumes with Last-Event-ID", limit)
                    subscription._end("overflow")
                    continue
                for message in mine:
                    subscription.queue.put_nowait(message)

    # --- the listener -------------------------------------------------------------------

    async def _listen(self) -> None:
        delay, failing = BACKOFF_S[0], False
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                        self._url, autocommit=True, row_factory=dict_row,
                        connect_timeout=3, application_name=self.name) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    if self.last is None:
                        cursor = await conn.execute("SELECT coalesce(max(id), 0) AS id "
                                                    "FROM outbox")
                        row = await cursor.fetchone()
                        self.last = int(row["id"]) if row else 0
                    if failing:
                        log.info("push: listening again; catching up after id %d", self.last)
                    self.listening, delay, failing = True, BACKOFF_S[0], False
                    while True:
                        # Caught up first (after a reconnect: what was missed), then wait.
                        await self._read(conn)
                        # stop_after=1 ends the generator after the packet it is in (breaking
                        # out of it mid-packet would drop the rest); the read follows at once.
                        async for _ in conn.notifies(timeout=POLL_S, stop_after=1):
                            pass
            except (psycopg.Error, OSError) as error:
                self.listening = False
                if not failing:
                    log.warning("push: listener down, reconnecting (messages wait in the "
                                "outbox): %s", error)
                failing = True
            except Exception:  # never leave the process without its listener
                self.listening, failing = False, True
                log.exception("push: listener failed; reconnecting")
            await asyncio.sleep(delay)
            delay = min(2 * delay, BACKOFF_S[1])

    async def _read(self, conn: psycopg.AsyncConnection[dict[str, Any]]) -> None:
        while True:
            assert self.last is not None
            cursor = await conn.execute(
                f"SELECT {_COLUMNS} FROM outbox WHERE id > %s ORDER BY id LIMIT {PAGE}",
                (self.last,), prepare=True)
            rows = await cursor.fetchall()
            if not rows:
                return
            messages = [Message.from_row(row) for row in rows]
            self._deliver(messages)
            self.last = messages[-1].id
            if len(rows) < PAGE:
                return

    # --- retention ----------------------------------------------------------------------

    async def _prune(self) -> None:
        hours = self._settings.retention_h
        while True:
            try:
                async with self._engine.connect() as conn:
                    deleted = await prune(conn, hours)
                    await conn.commit()
                if deleted:
                    log.info("push: %d outbox messages older than %g h pruned "
                             "(TWIN_STREAM_RETENTION_H)", deleted, hours)
            except Exception as error:  # the loop outlives any one failure
                log.warning("push: pruning the outbox failed: %s", error)
            await asyncio.sleep(PRUNE_EVERY_S)


async def prune(conn: AsyncConnection, retention_h: float) -> int:
    """Deletes outbox rows older than ``retention_h`` and tickets long expired, when no other
    process is doing it (then 0), in the caller's transaction."""
    taken = (await conn.execute(text("SELECT pg_try_advisory_xact_lock(:key)"),
                                {"key": PRUNE_LOCK})).scalar_one()
    if not taken:
        return 0
    deleted = (await conn.execute(text(
        "DELETE FROM outbox WHERE created_at < now() - make_interval(secs => :s)"),
        {"s": retention_h * 3600})).rowcount
    await conn.execute(text("DELETE FROM stream_tickets WHERE expires_at < now() - "
                            "make_interval(secs => :s)"),
                       {"s": TICKET_GRACE.total_seconds()})
    return int(deleted or 0)


async def start(ctx: Any) -> Fanout:
    return await Fanout.start(ctx.url, ctx.engine, ctx.settings.stream)


# --- tickets ----------------------------------------------------------------------------
# EventSource cannot send an Authorization header: a client trades its key or token for a
# ticket the stream URL carries. Stored hashed (sha256), like a key; usable until it expires.

def _ticket_hash(ticket: str) -> bytes:
    return hashlib.sha256(ticket.encode()).digest()


async def issue_ticket(conn: AsyncConnection, principal: Principal,
                       ttl_s: float) -> tuple[str, datetime]:
    """A new ticket for ``principal`` and its expiry, in the caller's transaction."""
    ticket = secrets.token_urlsafe(32)
    expires_at = (await conn.execute(text(
        "INSERT INTO stream_tickets (ticket_hash, principal, role, scope, expires_at) "
        "VALUES (:hash, :principal, :role, :scope, now() + make_interval(secs => :ttl)) "
        "RETURNING expires_at"),
        {"hash": _ticket_hash(ticket), "principal": principal.name, "role": principal.role,
         "scope": principal.scope.text, "ttl": ttl_s})).scalar_one()
    return ticket, expires_at


async def redeem_ticket(conn: AsyncConnection, ticket: str) -> Principal | None:
    """The principal a live ticket was issued to; None for an unknown or expired one."""
    row = (await conn.execute(text(
        "SELECT principal, role, scope FROM stream_tickets "
        "WHERE ticket_hash = :hash AND expires_at > now()"),
        {"hash": _ticket_hash(ticket)})).first()
    if row is None:
        return None
    return Principal(row.principal, row.role, parse_scope(row.scope))


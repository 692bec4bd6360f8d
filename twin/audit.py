"""The audit log: every write request (who, when, what, outcome), refused and failed ones too.

twin/api/middleware.py records; admins read with ``GET /audit``. Rows older than
``TWIN_AUDIT_RETENTION_DAYS`` are pruned by one server process (``AuditPruner``: at start-up,
then daily) and by ``twin audit prune``.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection

from twin.core.db import SessionLock, async_engine
from twin.core.settings import AuditSettings, Settings

log = logging.getLogger("twin.audit")

MAX_LIMIT = 1000


def outcome(status: int) -> str:
    """ok (done), refused (4xx: not allowed, invalid or too much), failed (5xx)."""
    return "ok" if status < 400 else "refused" if status < 500 else "failed"


async def record(conn: AsyncConnection, *, principal: str | None, role: str | None,
                 method: str, path: str, status: int, detail: dict, request_id: str) -> None:
    statement = text(
        "INSERT INTO audit_log (principal, role, method, path, status, outcome, detail, "
        "request_id) VALUES (:principal, :role, :method, :path, :status, :outcome, :detail, "
        ":request_id)").bindparams(bindparam("detail", type_=JSONB))
    await conn.execute(statement, {
        "principal": principal, "role": role, "method": method, "path": path,
        "status": status, "outcome": outcome(status), "detail": detail,
        "request_id": request_id})


async def entries(conn: AsyncConnection, since: datetime | None = None,
                  principal: str | None = None, limit: int = 100) -> list[dict]:
    """Newest first."""
    rows = await conn.execute(text(
        "SELECT id, at, principal, role, method, path, status, outcome, detail, request_id "
        "FROM audit_log "
        "WHERE (CAST(:since AS timestamptz) IS NULL OR at >= :since) "
        "AND (CAST(:principal AS text) IS NULL OR principal = :principal) "
        "ORDER BY at DESC, id DESC LIMIT :limit"),
        {"since": since, "principal": principal, "limit": limit})
    return [dict(row) for row in rows.mappings()]


# --- retention ---------------------------------------------------------------------------

# Rows deleted per transaction: each batch is a short statement (well inside the API's
# statement timeout) and holds few row locks, so pruning a year's backlog never stalls the
# writes being audited meanwhile.
PRUNE_BATCH = 5000
# The batch walks the index on ``at`` (audit_log_at, migration 0004) from the oldest row.
_PRUNE_BATCH = text("""
    DELETE FROM audit_log WHERE id IN (
        SELECT id FROM audit_log WHERE at < :cutoff ORDER BY at LIMIT :batch)
""")


async def prune(conn: AsyncConnection, retention_days: int, batch: int = PRUNE_BATCH) -> int:
    """Delete the rows older than ``retention_days`` (0: none); returns how many.

    Commits after every batch. The cutoff is the database's clock, the one ``at`` was
    stamped with, fixed once so the rows written while pruning are never candidates.
    """
    if retention_days <= 0:
        return 0
    cutoff = (await conn.execute(text("SELECT now() - make_interval(days => :days)"),
                                 {"days": retention_days})).scalar_one()
    await conn.commit()
    deleted = 0
    while True:
        result = await conn.execute(_PRUNE_BATCH, {"cutoff": cutoff, "batch": batch})
        await conn.commit()
        deleted += result.rowcount
        if result.rowcount < batch:
            return deleted


async def prune_database(settings: Settings, retention_days: int) -> int:
    """``prune`` on a connection of its own (``twin audit prune``)."""
    engine = async_engine(settings, pool_size=1, max_overflow=0)
    try:
        async with engine.connect() as conn:
            return await prune(conn, retention_days)
    finally:
        await engine.dispose()


# Held by the one server process that prunes; "twinaudt".
PRUNE_LOCK = 0x7477696E_61756474
# How often the other processes try to take over (the pruning one may have ended).
RETRY_S = 3600.0


class AuditPruner:
    """Prunes at start-up and then every ``prune_every_s``, in one server process of several.

    The process that takes ``PRUNE_LOCK`` (a session-level advisory lock) keeps it, on a
    connection of its own, for as long as it lives, and is the only one that prunes; the
    others try again every ``RETRY_S``, so when it ends another takes over (and prunes at
    once). A connection lost with the database lets go of the lock; the next try takes it
    again. Nothing runs when retention is 0.
    """

    def __init__(self, settings: Settings):
        self._settings: AuditSettings = settings.audit
        # The pruning runs on the lock's connection.
        self._lock = SessionLock(settings, PRUNE_LOCK, "audit log")
        self._task: asyncio.Task | None = None

    @classmethod
    def start(cls, settings: Settings) -> AuditPruner:
        pruner = cls(settings)
        if settings.audit.retention_days:
            pruner._task = asyncio.create_task(pruner._run(), name="twin-audit-prune")
        return pruner

    async def stop(self) -> None:
        await self._lock.close(self._task)

    async def _run(self) -> None:
        days, every = self._settings.retention_days, self._settings.prune_every_s
        while True:
            wait = min(every, RETRY_S)
            try:
                conn = await self._lock.hold()
                if conn is not None:
                    deleted = await prune(conn, days)
                    log.log(logging.INFO if deleted else logging.DEBUG,
                            "audit log: %d rows older than %d days pruned "
                            "(TWIN_AUDIT_RETENTION_DAYS)", deleted, days)
                    wait = every
            except Exception as error:  # the loop outlives any one failure
                log.warning("audit log: pruning failed, retrying in %.0f s: %s", wait, error)
                await self._lock.release()
            await asyncio.sleep(wait)

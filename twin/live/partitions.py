"""Day partitions of sensor_readings made ahead and dropped past retention (owner: ingest).

``sensor_readings`` is partitioned by UTC day (migration 0011) and registered with pg_partman
4.7. ``maintain`` brings the set in line with ``settings.readings``: ``premake_days`` day
partitions ahead of today, and with ``retention_days`` > 0 every day partition wholly older
than that dropped (and the default partition's rows that old deleted: a reading older than
every partition is kept there until retention reaches it). ``retention_days`` 0 keeps every
reading.

``start(ctx)`` runs ``maintain`` at start-up and then every ``maintenance_every_s`` in ONE
server process of several: the process that takes ``PARTITION_LOCK`` (a session-level
advisory lock, held on a connection of its own for as long as the process lives, like
twin/audit.py's AuditPruner) is the one; the others try again every ``RETRY_S``.

Making or dropping a partition takes short strong locks on ``sensor_readings``: a
``lock_timeout`` keeps maintenance from queueing behind a long reader (and everyone else
behind it); a run that times out is retried after ``RETRY_S``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from twin.core.db import SessionLock
from twin.core.settings import ReadingsSettings

log = logging.getLogger("twin.live.partitions")

# 'twinpart'
PARTITION_LOCK = 0x7477696E_70617274
RETRY_S = 60.0
LOCK_TIMEOUT = "5s"
PARENT = "public.sensor_readings"

_CHILDREN = text("""
    SELECT c.relname FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid
     WHERE i.inhparent = 'public.sensor_readings'::regclass ORDER BY c.relname
""")

_CONFIGURE = text("""
    UPDATE partman.part_config
       SET premake = :premake,
           retention = CASE WHEN :days > 0 THEN make_interval(days => :days)::text END,
           retention_keep_table = false, retention_keep_index = false,
           infinite_time_partitions = true
     WHERE parent_table = :parent
""")

_RUN = text("SELECT partman.run_maintenance(:parent, p_analyze := false, p_jobmon := false)")

_PRUNE_DEFAULT = text("""
    DELETE FROM sensor_readings_default WHERE ts < now() - make_interval(days => :days)
""")


@dataclass(frozen=True)
class MaintenanceReport:
    made: list[str]
    dropped: list[str]
    default_rows_deleted: int


async def maintain(conn: AsyncConnection, settings: ReadingsSettings) -> MaintenanceReport:
    """Premake and retention once, in a transaction of its own (``conn`` must have none
    open)."""
    async with conn.begin():
        # Partition bounds and names are UTC days (partman works in the session's zone).
        await conn.execute(text("SET LOCAL TimeZone = 'UTC'"))
        await conn.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
        before = set((await conn.execute(_CHILDREN)).scalars())
        await conn.execute(_CONFIGURE, {"premake": settings.premake_days,
                                        "days": settings.retention_days, "parent": PARENT})
        await conn.execute(_RUN, {"parent": PARENT})
        deleted = 0
        if settings.retention_days:
            deleted = (await conn.execute(_PRUNE_DEFAULT,
                                          {"days": settings.retention_days})).rowcount
        after = set((await conn.execute(_CHILDREN)).scalars())
    return MaintenanceReport(sorted(after - before), sorted(before - after), deleted)


class PartitionKeeper:
    """``maintain`` at start-up and every ``maintenance_every_s`` in one process of several."""

    def __init__(self, ctx: Any):
        self._settings: ReadingsSettings = ctx.settings.readings
        # The maintenance runs on the lock's connection.
        self._lock = SessionLock(ctx.settings, PARTITION_LOCK, "readings: partitions",
                                 application_name="twin partitions")
        self._task: asyncio.Task | None = None
        self.last: MaintenanceReport | None = None

    async def stop(self) -> None:
        await self._lock.close(self._task)

    async def _run(self) -> None:
        every = self._settings.maintenance_every_s
        while True:
            wait = min(every, RETRY_S)
            try:
                conn = await self._lock.hold()
                if conn is not None:
                    self.last = report = await maintain(conn, self._settings)
                    log.log(logging.INFO if report.made or report.dropped else logging.DEBUG,
                            "readings: partitions made %s, dropped %s, %d old rows deleted "
                            "from the default partition", report.made, report.dropped,
                            report.default_rows_deleted)
                    wait = every
            except Exception as error:  # the loop outlives any one failure
                log.warning("readings: partition maintenance failed, retrying in %.0f s: %s",
                            wait, error)
                await self._lock.release()
            await asyncio.sleep(wait)


async def start(ctx: Any) -> PartitionKeeper:
    keeper = PartitionKeeper(ctx)
    keeper._task = asyncio.create_task(keeper._run(), name="twin-readings-partitions")
    return keeper

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

Hourly rollups (migration 0017, ``sensor_readings_hourly``) are made by the same run, before
retention drops anything: ``rollup`` rolls up, in one statement, every closed UTC hour of the
day partitions not rolled up yet or changed since, then the day partitions past retention
are dropped, then rollups older than ``rollup_retention_days`` (0 keeps them all).

Late readings: which hours to recompute is decided per day partition, from PostgreSQL's
cumulative statistics (the partition's inserted + updated + deleted tuple counter), kept in
``sensor_readings_rollup_seen`` with the hour the partition was rolled up to. A partition is
rolled up again, whole (its closed hours, each replaced by the aggregate of its rows), when
its counter moved since, when it has closed hours past that mark, when the statistics were
reset since (a crash restart, ``pg_stat_reset``, ``track_counts`` off: then every partition
is), and always right before retention drops it. So a reading that arrives late for an
hour already rolled up is folded in by the next run, the ingest pays nothing (no trigger, no
extra column, no extra write per batch), and a run reads today's partition plus the few
days late readings went to, not the whole history. Why not a watermark on ingest time: the
readings carry no ingest time (8 more bytes a row, on the hottest table), and a watermark
on a default ``now()`` misses the rows of transactions still open when it is taken.

Statistics are counted when a transaction ends and reach the shared counters up to a
second or so later: the counter is read before the rollup's snapshot is taken, so every
transaction it counted is visible to the rollup; one that ended but is not counted yet
moves the counter by the next run, which rolls the partition up again. The default
partition (readings older than every day partition) is always rolled up (it is small);
its rows older than raw retention are not (they arrived after their day was dropped, and
retention deletes them in the same run). A partition's hours with no reading left (deleted
by hand) lose their rollup when it is rolled up again; hours of partitions retention
dropped keep theirs until rollup retention.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from twin.core.db import SessionLock
from twin.core.settings import ReadingsSettings

log = logging.getLogger("twin.live.partitions")

# 'twinpart'
PARTITION_LOCK = 0x7477696E_70617274
# 'twinroll': one rollup at a time (the keeper's, a benchmark's, a test's), per transaction.
ROLLUP_LOCK = 0x7477696E_726F6C6C
# Day partitions one rollup statement reads at most (oldest first): a run after the upgrade
# to 0017 rolls up the whole history, a few days a statement, each in a transaction of its
# own; a day of a busy city takes more than the app's statement timeout, so a rollup
# statement has a bound of its own.
PASS_PARTITIONS = 4
MAX_PASSES = 1000
ROLLUP_TIMEOUT = "30min"
# A pass aggregates sensors x hours groups (a million sensors: a million groups an hour); in
# the default 4 MB the hash aggregate spills to disk (benchmarks/write_ceiling.py).
ROLLUP_WORK_MEM = "256MB"
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


# --- hourly rollups ---------------------------------------------------------------------

# The first hour kept by a retention of :days days (0: none), the hour the current one
# starts, and the statistics' epoch: a counter is comparable only within one epoch (a crash
# restart or pg_stat_reset zeroes the counters).
_BOUNDS = text("""
    SELECT CASE WHEN :rollup_days > 0
                THEN date_trunc('hour', now() - make_interval(days => :rollup_days), 'UTC')
                     + interval '1 hour' END AS rollup_floor,
           CASE WHEN :raw_days > 0
                THEN date_trunc('hour', now() - make_interval(days => :raw_days), 'UTC')
                     + interval '1 hour' END AS raw_floor,
           CASE WHEN :raw_days > 0 THEN now() - make_interval(days => :raw_days) END
               AS drop_before,
           date_trunc('hour', now(), 'UTC') AS cutoff,
           current_setting('track_counts')::boolean AS counting,
           pg_postmaster_start_time()::text || ' ' || coalesce(
               (SELECT stats_reset::text FROM pg_stat_database
                 WHERE datname = current_database()), '-') AS epoch
""")

# Day partitions with closed hours (within rollup retention) to roll up: never rolled up,
# changed since, rolled up short of the closed hours, statistics reset, or about to be
# dropped by raw retention. The counter is read here, before the rollup's snapshot.
_DUE = text("""
    WITH parts AS (
        SELECT c.oid, c.relname, info.child_start_time AS lo, info.child_end_time AS hi,
               pg_stat_get_tuples_inserted(c.oid) + pg_stat_get_tuples_updated(c.oid)
               + pg_stat_get_tuples_deleted(c.oid) AS changes
          FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid
         CROSS JOIN LATERAL partman.show_partition_info(
               'public.' || c.relname, p_parent_table := 'public.sensor_readings') AS info
         WHERE i.inhparent = 'public.sensor_readings'::regclass
           AND c.relname <> 'sensor_readings_default')
    SELECT p.oid, p.relname,
           greatest(p.lo, coalesce(CAST(:floor AS timestamptz), '-infinity')) AS lo,
           least(p.hi, CAST(:cutoff AS timestamptz)) AS hi, p.changes
      FROM parts AS p LEFT JOIN sensor_readings_rollup_seen AS s ON s.partition = p.oid
     WHERE least(p.hi, CAST(:cutoff AS timestamptz))
           > greatest(p.lo, coalesce(CAST(:floor AS timestamptz), '-infinity'))
       AND (p.hi < CAST(:drop_before AS timestamptz)
            OR NOT CAST(:only_dropping AS boolean)
               AND (s.partition IS NULL OR NOT CAST(:counting AS boolean)
                    OR s.stats_epoch <> :epoch OR s.changes <> p.changes
                    OR s.rolled_until < least(p.hi, CAST(:cutoff AS timestamptz))))
     ORDER BY p.lo
     LIMIT :limit
""")

# {raw}: one SELECT of (sensor_id, ts, value) per partition range, UNION ALL'd.
_ROLLUP = """
    WITH raw AS ({raw}),
    hours AS (
        SELECT sensor_id, date_trunc('hour', ts, 'UTC') AS hour, count(*) AS count,
               min(value) AS min, max(value) AS max, sum(value) AS sum,
               min(ts) AS first_ts, max(ts) AS last_ts
          FROM raw GROUP BY 1, 2),
    ranges AS (
        SELECT lo, hi FROM unnest(CAST(:los AS timestamptz[]), CAST(:his AS timestamptz[]))
            AS r(lo, hi)),
    gone AS (
        DELETE FROM sensor_readings_hourly AS h USING ranges AS r
         WHERE h.hour >= r.lo AND h.hour < r.hi
           AND NOT EXISTS (SELECT 1 FROM hours AS x
                            WHERE x.sensor_id = h.sensor_id AND x.hour = h.hour)
        RETURNING 1),
    rolled AS (
        INSERT INTO sensor_readings_hourly AS h
               (sensor_id, hour, count, min, max, sum, first_ts, last_ts)
        SELECT sensor_id, hour, count, min, max, sum, first_ts, last_ts FROM hours
            ON CONFLICT (sensor_id, hour) DO UPDATE
           SET count = excluded.count, min = excluded.min, max = excluded.max,
               sum = excluded.sum, first_ts = excluded.first_ts, last_ts = excluded.last_ts,
               rolled_at = now()
         WHERE (h.count, h.min, h.max, h.sum, h.first_ts, h.last_ts)
               IS DISTINCT FROM (excluded.count, excluded.min, excluded.max, excluded.sum,
                                 excluded.first_ts, excluded.last_ts)
        RETURNING 1),
    seen AS (
        INSERT INTO sensor_readings_rollup_seen AS s
               (partition, name, changes, stats_epoch, rolled_until)
        SELECT o, n, c, :epoch, u
          FROM unnest(CAST(:oids AS oid[]), CAST(:names AS text[]),
                      CAST(:changes AS bigint[]), CAST(:his AS timestamptz[])) AS t(o, n, c, u)
            ON CONFLICT (partition) DO UPDATE
           SET name = excluded.name, changes = excluded.changes,
               stats_epoch = excluded.stats_epoch, rolled_until = excluded.rolled_until,
               at = now()
        RETURNING 1)
    SELECT (SELECT count(*) FROM hours) AS hours, (SELECT count(*) FROM rolled) AS written,
           (SELECT count(*) FROM gone) AS gone, (SELECT count(*) FROM seen) AS seen
"""

_RAW_PART = ("SELECT sensor_id, ts, value FROM public.{table} "
             "WHERE ts >= CAST(:lo{k} AS timestamptz) AND ts < CAST(:hi{k} AS timestamptz)")

_RAW_DEFAULT = ("SELECT sensor_id, ts, value FROM public.sensor_readings_default "
                "WHERE ts < CAST(:cutoff AS timestamptz) "
                "AND ts >= coalesce(CAST(:default_floor AS timestamptz), '-infinity')")

_ROLLUP_RETENTION = text("DELETE FROM sensor_readings_hourly WHERE hour < :floor")

_FORGET_DROPPED = text("""
    DELETE FROM sensor_readings_rollup_seen AS s
     WHERE NOT EXISTS (SELECT 1 FROM pg_inherits AS i
                        WHERE i.inhrelid = s.partition
                          AND i.inhparent = 'public.sensor_readings'::regclass)
""")


@dataclass(frozen=True)
class RollupReport:
    # The day partitions rolled up (again), oldest first.
    partitions: list[str]
    # Sensor-hours computed, rows written (new or changed), rows removed (no reading left).
    hours: int
    written: int
    removed: int
    # Rollups dropped by rollup retention (``maintain`` only).
    expired: int = 0


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def rollup(conn: AsyncConnection, settings: ReadingsSettings, *,
                 limit: int | None = PASS_PARTITIONS, only_dropping: bool = False
                 ) -> RollupReport:
    """One rollup pass (one statement) on ``conn``, inside the caller's transaction: the
    ``limit`` oldest day partitions due, and the default partition. With ``only_dropping``
    only the day partitions raw retention drops in this transaction (``maintain``: rolled up
    whatever their statistics say), not the default. Waits for any other pass to finish (a
    transaction-level advisory lock)."""
    await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ROLLUP_LOCK})
    await conn.execute(text(f"SET LOCAL statement_timeout = '{ROLLUP_TIMEOUT}'"))
    await conn.execute(text(f"SET LOCAL work_mem = '{ROLLUP_WORK_MEM}'"))
    bounds = (await conn.execute(_BOUNDS, {"rollup_days": settings.rollup_retention_days,
                                           "raw_days": settings.retention_days})).one()
    floor = bounds.rollup_floor
    due = (await conn.execute(_DUE, {
        "floor": floor, "cutoff": bounds.cutoff, "counting": bounds.counting,
        "epoch": bounds.epoch, "only_dropping": only_dropping,
        "drop_before": bounds.drop_before if only_dropping else None,
        "limit": limit})).all()
    raw = [_RAW_PART.format(table=_quoted(row.relname), k=k) for k, row in enumerate(due)]
    if not only_dropping:
        raw.append(_RAW_DEFAULT)
    elif not raw:
        await conn.execute(text("SET LOCAL statement_timeout TO DEFAULT"))
        await conn.execute(text("SET LOCAL work_mem TO DEFAULT"))
        return RollupReport([], 0, 0, 0)
    params: dict[str, Any] = {
        "cutoff": bounds.cutoff, "epoch": bounds.epoch,
        "default_floor": _latest(floor, bounds.raw_floor),
        "los": [row.lo for row in due], "his": [row.hi for row in due],
        "oids": [row.oid for row in due], "names": [row.relname for row in due],
        "changes": [row.changes for row in due]}
    for k, row in enumerate(due):
        params[f"lo{k}"], params[f"hi{k}"] = row.lo, row.hi
    result = (await conn.execute(text(_ROLLUP.format(raw=" UNION ALL ".join(raw))),
                                 params)).one()
    await conn.execute(text("SET LOCAL statement_timeout TO DEFAULT"))
    await conn.execute(text("SET LOCAL work_mem TO DEFAULT"))
    return RollupReport([row.relname for row in due], result.hours, result.written,
                        result.gone)


def _latest(*instants: datetime | None) -> datetime | None:
    known = [t for t in instants if t is not None]
    return max(known) if known else None


async def expire_rollups(conn: AsyncConnection, settings: ReadingsSettings) -> int:
    """Rollup retention: the rollups of hours before ``rollup_retention_days`` deleted."""
    if not settings.rollup_retention_days:
        return 0
    floor = (await conn.execute(_BOUNDS, {"rollup_days": settings.rollup_retention_days,
                                          "raw_days": 0})).one().rollup_floor
    return (await conn.execute(_ROLLUP_RETENTION, {"floor": floor})).rowcount


@dataclass(frozen=True)
class MaintenanceReport:
    made: list[str]
    dropped: list[str]
    default_rows_deleted: int
    rollup: RollupReport | None = None


async def roll_up_due(conn: AsyncConnection, settings: ReadingsSettings) -> RollupReport:
    """Rollup passes, each in a transaction of its own (``conn`` must have none open), until
    no day partition is due: ``PASS_PARTITIONS`` days a pass, at most ``MAX_PASSES``."""
    parts: list[str] = []
    hours = written = removed = 0
    for _ in range(MAX_PASSES):
        async with conn.begin():
            await conn.execute(text("SET LOCAL TimeZone = 'UTC'"))
            report = await rollup(conn, settings)
        parts += report.partitions
        hours, written = hours + report.hours, written + report.written
        removed += report.removed
        if len(report.partitions) < PASS_PARTITIONS:
            break
    return RollupReport(parts, hours, written, removed)


async def maintain(conn: AsyncConnection, settings: ReadingsSettings) -> MaintenanceReport:
    """Rollups, then premake and retention (``conn`` must have no transaction open). The
    rollup comes first, and the maintenance transaction rolls up again every day partition
    it drops (before partman drops it): retention never drops an hour not rolled up."""
    rolled = await roll_up_due(conn, settings)
    async with conn.begin():
        # Partition bounds and names are UTC days (partman works in the session's zone).
        await conn.execute(text("SET LOCAL TimeZone = 'UTC'"))
        await conn.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
        last = await rollup(conn, settings, limit=None, only_dropping=True)
        before = set((await conn.execute(_CHILDREN)).scalars())
        await conn.execute(_CONFIGURE, {"premake": settings.premake_days,
                                        "days": settings.retention_days, "parent": PARENT})
        await conn.execute(_RUN, {"parent": PARENT})
        deleted = 0
        if settings.retention_days:
            deleted = (await conn.execute(_PRUNE_DEFAULT,
                                          {"days": settings.retention_days})).rowcount
        after = set((await conn.execute(_CHILDREN)).scalars())
        await conn.execute(_FORGET_DROPPED)
        expired = await expire_rollups(conn, settings)
    parts = rolled.partitions + [p for p in last.partitions if p not in rolled.partitions]
    return MaintenanceReport(sorted(after - before), sorted(before - after), deleted,
                             RollupReport(parts, rolled.hours + last.hours,
                                          rolled.written + last.written,
                                          rolled.removed + last.removed, expired))


# --- reading rollups back ------------------------------------------------------------------

_HOURLY = """
    SELECT h.hour, h.count, h.min, h.max, h.avg, h.sum, h.first_ts, h.last_ts
      FROM sensor_readings_hourly AS h
     WHERE h.sensor_id = :sensor_id AND h.hour >= :start AND h.hour < :end
     ORDER BY h.hour
"""

_SENSOR = """
    SELECT s.id, s.kind, s.unit FROM sensors AS s WHERE s.id = :sensor_id{scope}
"""


async def hourly_readings(conn: AsyncConnection, scope_sql: Any, sensor_id: int,
                          start: datetime, end: datetime) -> dict | None:
    """The hourly rollups of one sensor of the scope (``scope_sql`` over ``sensors`` aliased
    ``s``) for the hours starting in [start, end); None when the sensor is not in the
    scope."""
    sensor = (await conn.execute(text(_SENSOR.format(scope=scope_sql.and_sql)),
                                 {"sensor_id": sensor_id} | scope_sql.params)).first()
    if sensor is None:
        return None
    rows = (await conn.execute(text(_HOURLY), {"sensor_id": sensor_id, "start": start,
                                               "end": end})).all()
    return {"sensor_id": sensor_id, "kind": sensor.kind, "unit": sensor.unit,
            "start": start.isoformat(), "end": end.isoformat(),
            "numberReturned": len(rows),
            "hours": [_hour_row(row) for row in rows]}


def _hour_row(row: Any) -> dict:
    return {"hour": row.hour.isoformat(), "count": row.count, "min": row.min,
            "max": row.max, "avg": row.avg, "sum": row.sum,
            "first_ts": row.first_ts.isoformat(), "last_ts": row.last_ts.isoformat()}



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
                            "from the default partition; rollups: %s", report.made,
                            report.dropped, report.default_rows_deleted, report.rollup)
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

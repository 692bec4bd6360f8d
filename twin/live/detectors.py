"""Silent sensors and the incremental pipe-anomaly detector (owner: rules).

Two looks, run by one server process of several (the one holding ``DETECTOR_LOCK``, a
session-level advisory lock kept on a connection of its own, like twin/audit.py's pruner;
the others try again every ``RETRY_S`` and take over when it ends or loses its database):

* ``check_silence`` every ``TWIN_RULES_SILENCE_CHECK_EVERY_S``: a sensor whose newest
  reading (``sensor_latest.ts``) is older than a silence rule's ``silent_minutes`` gets an
  alert (opened at the moment it fell silent) and an event; the alert closes when a newer
  reading arrives (at once in twin/live/rules.py's ``evaluate``, or at the next look here).
  Sensors silent for more than ``silence_horizon_h`` are taken as out of service.
* ``run_anomalies`` every ``TWIN_RULES_ANOMALY_EVERY_S`` when readings arrived on a network
  since the last run: twin/queries/anomalies.py's detector (robust z-scores against each
  sensor's day, persistent runs, grouped along the pipes) over the last
  ``anomaly_window_min`` minutes. A zone whose newest anomalous reading is within
  ``MAX_GAP`` of now is live. Each live zone is matched to an open ``anomaly_zones`` row of
  its network sharing a sensor or meeting its area, which is updated; a zone matching none is
  new (an event is raised at its likely source); open rows matching no live zone are closed.
  Each change is pushed as an ``anomaly`` message to the grid cells the zone covers.

Both functions take the clock as an argument, so a test runs one look at a fixed instant.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from psycopg.errors import QueryCanceled
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from twin.core import outbox
from twin.core.db import SessionLock, async_engine
from twin.core.models import NETWORKS
from twin.core.settings import RulesSettings
from twin.live import events
from twin.live.rules import OPENED_ALERTS, close_alerts, emit_changes, with_events
from twin.queries.anomalies import (
    BASELINE,
    MAX_GAP,
    fetch_readings,
    group_runs,
    persistent_runs,
    severity_level,
    zone_impacts,
)

log = logging.getLogger("twin.live.detectors")

# 'twin' 'dete': one detector process at a time.
DETECTOR_LOCK = 0x7477696E_64657465
RETRY_S = 5.0
# The longest wait before an anomaly look that failed is tried again.
MAX_BACKOFF_S = 3600.0
# The event a new anomaly zone raises, by network.
ZONE_EVENT_KIND = {"drainage": "waterlogging", "water": "pipe_burst", "gas": "gas_leak"}
ZONE_NAME_ZH = {"drainage": "排水管网异常", "water": "供水管网异常", "gas": "燃气管网异常"}


# ------------------------------------------------------------------ silence

_SILENT = text(f"""
    WITH silent AS (
        SELECT s.id AS sensor_id, r.code AS rule_code,
               l.ts + make_interval(mins => r.silent_minutes) AS opened_at
          FROM alert_rules AS r
          JOIN sensors AS s ON s.kind = r.sensor_kind
                           AND (r.network IS NULL OR r.network = s.network)
          JOIN sensor_latest AS l ON l.sensor_id = s.id
         WHERE r.enabled AND r.silent_minutes IS NOT NULL
           AND l.ts + make_interval(mins => r.silent_minutes) <= :now
           AND l.ts >= CAST(:now AS timestamptz) - make_interval(secs => :horizon_s)
           AND NOT EXISTS (SELECT 1 FROM sensor_alerts AS a
                            WHERE a.sensor_id = s.id AND a.rule_code = r.code
                              AND a.closed_at IS NULL)
    ), new AS (
        INSERT INTO sensor_alerts (sensor_id, rule_code, opened_at)
        SELECT sensor_id, rule_code, opened_at FROM silent
{OPENED_ALERTS}""")

# Open silence alerts whose sensor spoke again (a reading newer than the last one before).
_RESUMED = text("""
    SELECT a.id, l.ts, l.value
      FROM sensor_alerts AS a
      JOIN alert_rules AS r ON r.code = a.rule_code
      JOIN sensor_latest AS l ON l.sensor_id = a.sensor_id
     WHERE a.closed_at IS NULL AND r.silent_minutes IS NOT NULL
       AND l.ts > a.opened_at - make_interval(mins => r.silent_minutes)
     ORDER BY a.id
""")


async def check_silence(conn: AsyncConnection, now: datetime,
                        horizon: timedelta = timedelta(hours=24)) -> tuple[int, int]:
    """Open silence alerts (with their events) and close the ones whose sensor spoke again,
    in the caller's transaction; (opened, closed)."""
    resumed = (await conn.execute(_RESUMED)).all()
    closed = await close_alerts(conn, [(r.id, r.ts, r.value) for r in resumed])
    new_rows = (await conn.execute(_SILENT, {
        "now": now, "horizon_s": horizon.total_seconds()})).all()
    opened = await with_events(conn, new_rows)
    await emit_changes(conn, opened, closed)
    return len(opened), len(closed)


# ------------------------------------------------------------------ anomaly zones

_MATCH = text("""
    SELECT id, sensors, segments, source_segment_id, severity, event_id
      FROM anomaly_zones
     WHERE network = :network AND closed_at IS NULL AND NOT (id = ANY(CAST(:taken AS bigint[])))
       AND (sensors && CAST(:sensors AS int[])
            OR ST_Intersects(geom, ST_SetSRID(ST_GeomFromGeoJSON(:geometry), 4326)))
     ORDER BY sensors && CAST(:sensors AS int[]) DESC, opened_at, id
     LIMIT 1
""")

_ZONE_COLUMNS = """id, network, sensors, segments, source_segment_id, severity, started_at,
                   last_seen_at, opened_at, closed_at, event_id,
                   ARRAY(SELECT u.code FROM admin_units AS u
                          WHERE u.level = 'grid' AND ST_Intersects(u.geom, anomaly_zones.geom)
                          ORDER BY u.code) AS grid_codes"""

_UPDATE = text(f"""
    UPDATE anomaly_zones
       SET geom = ST_Multi(ST_SetSRID(ST_GeomFromGeoJSON(:geometry), 4326)),
           sensors = CAST(:sensors AS int[]), segments = CAST(:segments AS bigint[]),
           source_segment_id = :source, severity = :severity,
           details = CAST(:details AS jsonb), started_at = least(started_at, :started_at),
           last_seen_at = :last_seen_at, updated_at = :now
     WHERE id = :id
    RETURNING {_ZONE_COLUMNS}
""")

_INSERT = text(f"""
    INSERT INTO anomaly_zones (network, geom, sensors, segments, source_segment_id, severity,
                               details, started_at, last_seen_at, opened_at, updated_at)
    VALUES (:network, ST_Multi(ST_SetSRID(ST_GeomFromGeoJSON(:geometry), 4326)),
            CAST(:sensors AS int[]), CAST(:segments AS bigint[]), :source, :severity,
            CAST(:details AS jsonb), :started_at, :last_seen_at, :now, :now)
    RETURNING {_ZONE_COLUMNS}
""")

_CLOSE = text(f"""
    UPDATE anomaly_zones SET closed_at = :now, updated_at = :now
     WHERE network = :network AND closed_at IS NULL
       AND NOT (id = ANY(CAST(:kept AS bigint[])))
    RETURNING {_ZONE_COLUMNS}
""")

# The middle of the likely source pipe, and the grid cell holding it.
_SOURCE_PLACE = text("""
    SELECT ST_X(p.pt) AS lon, ST_Y(p.pt) AS lat,
           (SELECT u.code FROM admin_units AS u
             WHERE u.level = 'grid' AND ST_Intersects(u.geom, p.pt) LIMIT 1) AS grid_code
      FROM (SELECT ST_LineInterpolatePoint(ST_LineMerge(g.geom), 0.5) AS pt
              FROM pipe_segments AS g WHERE g.id = :segment) AS p
""")

_SET_ZONE_EVENT = text("UPDATE anomaly_zones SET event_id = :event WHERE id = :id")


def _iso(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1_000_000, tz=UTC)


def zone_message(row: Any, state: str) -> dict[str, Any]:
    return {"id": row.id, "state": state, "network": row.network,
            "severity": round(row.severity, 1), "severity_level": severity_level(row.severity),
            "sensor_ids": list(row.sensors), "segment_ids": list(row.segments),
            "source_segment_id": row.source_segment_id,
            "started_at": row.started_at.isoformat(), "last_seen_at": row.last_seen_at.isoformat(),
            "opened_at": row.opened_at.isoformat(),
            "closed_at": row.closed_at.isoformat() if row.closed_at else None,
            "event_id": row.event_id}


async def _zone_event(conn: AsyncConnection, row: Any, details: dict) -> int | None:
    place = (await conn.execute(_SOURCE_PLACE, {"segment": row.source_segment_id})).first()
    if place is None or place.grid_code is None:
        return None
    network = row.network
    codes = "、".join(s["code"] for s in details["sensors"])
    event = await events.raise_event(
        conn, kind=ZONE_EVENT_KIND[network], lon=place.lon, lat=place.lat, source="detector",
        title=f"{ZONE_NAME_ZH[network]}（{severity_level(row.severity)}）",
        description=(f"管网异常区 #{row.id}（{network}）：{len(row.sensors)} 个传感器读数异常"
                     f"（{codes}），疑似源头管段 {row.source_segment_id}，"
                     f"影响 {len(row.segments)} 段管道；自 {row.started_at.isoformat()} 起"))
    await conn.execute(_SET_ZONE_EVENT, {"event": event["id"], "id": row.id})
    return int(event["id"])


async def run_anomalies(conn: AsyncConnection, now: datetime, window: timedelta,
                        networks: tuple[str, ...] = NETWORKS) -> dict[str, int]:
    """One incremental look at ``networks`` as of ``now``, in the caller's transaction:
    counts of zones opened, updated (changed) and closed."""
    counts = {"opened": 0, "updated": 0, "closed": 0}
    messages: list[tuple[dict, list[str]]] = []
    live_after = int((now - MAX_GAP).timestamp() * 1_000_000)
    for network in networks:
        readings = await fetch_readings(conn, network, now - max(BASELINE, window), now)
        runs = persistent_runs(readings, now - window)
        zones, sensors = await group_runs(conn, network, runs)
        zones = [z for z in zones if max(r.end_us for r in z.runs) >= live_after]
        impacts = await zone_impacts(conn, zones)
        kept: list[int] = []
        for k, zone in enumerate(zones):
            peak = max((r.peak_z for r in zone.runs), key=abs)
            sensor_ids = sorted({r.sensor_id for r in zone.runs})
            details = {
                "severity_level": severity_level(peak),
                "sensors": [{"id": r.sensor_id, "code": sensors[r.sensor_id].code,
                             "kind": sensors[r.sensor_id].kind,
                             "start": _iso(r.start_us).isoformat(),
                             "end": _iso(r.end_us).isoformat(), "readings": r.readings,
                             "peak_z": round(r.peak_z, 2), "baseline": r.median}
                            for r in sorted(zone.runs, key=lambda r: r.sensor_id)],
                "communities": impacts[k].communities,
                "risk_points": impacts[k].risk_points,
                "buildings": {"count": impacts[k].buildings},
            }
            values = {"geometry": impacts[k].geometry, "sensors": sensor_ids,
                      "segments": zone.segment_ids, "source": zone.source_segment_id,
                      "severity": abs(peak), "details": json.dumps(details, ensure_ascii=False),
                      "started_at": _iso(min(r.start_us for r in zone.runs)),
                      "last_seen_at": _iso(max(r.end_us for r in zone.runs)), "now": now}
            match = (await conn.execute(_MATCH, {"network": network, "taken": kept,
                                                 "sensors": sensor_ids,
                                                 "geometry": impacts[k].geometry})).first()
            row: Any
            if match is None:
                row = SimpleNamespace(**(await conn.execute(
                    _INSERT, values | {"network": network})).one()._mapping)
                row.event_id = await _zone_event(conn, row, details)
                messages.append((zone_message(row, "opened"), list(row.grid_codes)))
                counts["opened"] += 1
            else:
                row = (await conn.execute(_UPDATE, values | {"id": match.id})).one()
                changed = (list(match.sensors) != sensor_ids
                           or list(match.segments) != zone.segment_ids
                           or match.source_segment_id != zone.source_segment_id
                           or severity_level(match.severity) != severity_level(peak))
                if changed:
                    messages.append((zone_message(row, "updated"), list(row.grid_codes)))
                    counts["updated"] += 1
            kept.append(row.id)
        for gone in (await conn.execute(_CLOSE, {"network": network, "kept": kept,
                                                 "now": now})).all():
            messages.append((zone_message(gone, "closed"), list(gone.grid_codes)))
            counts["closed"] += 1
    # Last: the outbox holds its lock from the first message to the commit.
    for payload, grids in messages:
        await outbox.emit(conn, "anomaly", payload, grids)
    return counts


# ------------------------------------------------------------------ the loop

_NEWEST = text("""
    SELECT s.network, max(l.received_at) AS received_at
      FROM sensor_latest AS l JOIN sensors AS s ON s.id = l.sensor_id
     GROUP BY s.network
""")


class AnomalyLookTimedOut(Exception):
    """The anomaly look ran past the statement timeout (the message says what to do)."""


class Detectors:
    """Both looks on their own schedules, in the process holding ``DETECTOR_LOCK``.

    Each look fails on its own. A failed silence look is retried after ``RETRY_S``. A failed
    anomaly look (on tens of millions of readings a day its statements can run past the
    statement timeout every time) is retried after a backoff that doubles from
    ``anomaly_every_s`` up to ``MAX_BACKOFF_S`` and starts over after a look that succeeds,
    so it neither burns a core nor delays the silence look. Losing the lock's connection
    (the database went away) lets go of the lock: the next try takes it again, here or in
    another process.
    """

    def __init__(self, ctx: Any, lock: int = DETECTOR_LOCK):
        self._settings: RulesSettings = ctx.settings.rules
        self._statement_timeout_ms: int = ctx.settings.db.statement_timeout_ms
        # Pools of their own, labelled: the looks are long statements, never a request's.
        self._work: AsyncEngine = async_engine(ctx.settings, pool_size=1, max_overflow=1,
                                               application_name="twin detectors")
        self._lock = SessionLock(ctx.settings, lock, "detectors",
                                 application_name="twin detectors lock")
        self._task: asyncio.Task | None = None
        # The newest received_at per network at the last anomaly run.
        self._seen: dict[str, datetime] = {}

    def start(self) -> Detectors:
        self._task = asyncio.create_task(self._run(), name="twin-detectors")
        return self

    async def stop(self) -> None:
        await self._lock.close(self._task)
        await self._work.dispose()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        every_silence = self._settings.silence_check_every_s
        every_anomaly = self._settings.anomaly_every_s
        due_silence = due_anomaly = 0.0
        backoff = 0.0  # after the last anomaly look, when it failed
        while True:
            if not await self._lead():
                await asyncio.sleep(RETRY_S)
                continue
            if loop.time() >= due_silence:
                try:
                    await self._silence()
                    due_silence = loop.time() + every_silence
                except Exception as error:  # the loop outlives any one failure
                    log.warning("detectors: the silence look failed, retrying in %.0f s: %s",
                                RETRY_S, error)
                    due_silence = loop.time() + RETRY_S
            if loop.time() >= due_anomaly:
                try:
                    await self._anomalies()
                    backoff = 0.0
                    due_anomaly = loop.time() + every_anomaly
                except Exception as error:  # the loop outlives any one failure
                    backoff = min(2 * backoff or every_anomaly,
                                  max(MAX_BACKOFF_S, every_anomaly))
                    if isinstance(error, AnomalyLookTimedOut):
                        log.warning("detectors: %s; retrying in %.0f s", error, backoff)
                    else:
                        log.warning("detectors: the anomaly look failed, retrying in %.0f s: "
                                    "%s", backoff, error)
                    due_anomaly = loop.time() + backoff
            # Back at least every RETRY_S * 12 to check that the lock is still held.
            wait = min(max(0.05, min(due_silence, due_anomaly) - loop.time()), RETRY_S * 12)
            await asyncio.sleep(wait)

    async def _lead(self) -> bool:
        """Whether this process holds its lock on a live connection (taking it when free)."""
        try:
            return await self._lock.hold() is not None
        except Exception as error:
            log.warning("detectors: the lock's connection failed, retrying in %.0f s: %s",
                        RETRY_S, error)
            await self._lock.release()
            return False

    async def _silence(self) -> None:
        async with self._work.begin() as conn:
            opened, closed = await check_silence(
                conn, datetime.now(UTC), timedelta(hours=self._settings.silence_horizon_h))
        if opened or closed:
            log.info("detectors: %d silence alerts opened, %d closed", opened, closed)

    async def _anomalies(self) -> None:
        async with self._work.connect() as conn:
            newest = {row.network: row.received_at for row in await conn.execute(_NEWEST)}
        fresh = tuple(n for n in NETWORKS
                      if newest.get(n) is not None and newest[n] != self._seen.get(n))
        if not fresh:
            return
        window = timedelta(minutes=self._settings.anomaly_window_min)
        try:
            async with self._work.begin() as conn:
                counts = await run_anomalies(conn, datetime.now(UTC), window, fresh)
        except DBAPIError as error:
            if not isinstance(error.orig, QueryCanceled):
                raise
            hours = max(BASELINE, window).total_seconds() / 3600
            raise AnomalyLookTimedOut(
                f"the anomaly look over {', '.join(fresh)} took longer than the statement "
                f"timeout ({self._statement_timeout_ms} ms, TWIN_DB_STATEMENT_TIMEOUT_MS): "
                f"too many readings in the last {hours:g} h") from error
        self._seen.update({n: newest[n] for n in fresh})
        if any(counts.values()):
            log.info("detectors: anomaly zones %s", counts)


async def start(ctx: Any) -> Detectors:
    return Detectors(ctx).start()

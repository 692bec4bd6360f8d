"""Sensor readings coming in: a batch is checked row by row and its valid rows stored at once.

Each row is ``{"sensor_id": int, "ts": ISO 8601 with offset, "value": number}``. A row is
rejected, with its index and a reason, when it is malformed, names an unknown sensor, has a
value outside the sensor's physical range (``min_value`` .. ``max_value``), a timestamp
without a UTC offset or one in the future (by the database's clock, with
``future_tolerance_s`` of slack for gateway clocks).

Duplicates, deliberately: readings are measurements, never edited in place.

* The same sensor and instant twice in one batch: the first is kept, later ones rejected.
* Already stored with the **same** value: a gateway retrying a batch whose answer it lost.
  Not stored again and not an error; counted in ``already_stored``.
* Already stored with a **different** value: rejected as a conflict; the stored reading
  stands.

All valid rows go in with one ``INSERT`` in one transaction: every valid row is stored, or,
if the database fails, none is. In the same transaction (issue 14): ``sensor_latest`` keeps
the newest reading per sensor (a newer ts wins; a late older reading leaves it alone), and
the alert rules see the rows actually inserted (``twin.live.rules.evaluate``), so an alert
opens with the readings that opened it or not at all.

``sensor_readings`` is partitioned by UTC day (migration 0011); a reading older than every
partition lands in the default partition: stored all the same.

Entry points:

* ``store_readings(conn, payload, settings)``: an HTTP body ``{"readings": [...]}``
  (``POST /sensors/readings``); 400/413 for a body that is not a batch or too big.
* ``store_batch(conn, rows, settings, source="mqtt")``: rows already taken out of their
  envelope (a list of reading objects as decoded from JSON), for the MQTT subscriber and
  ``CreateObservations``. Checks every row, stores the good ones, never raises for a bad row.
* ``store_parsed(conn, readings, settings, source=...)``: rows already parsed into
  ``Reading`` (``parse_row``), the lowest level.

Each answers ``{"received", "accepted", "already_stored", "rejected": [{"index",
"sensor_id", "reason"}, ...]}``. With no transaction open on ``conn`` the batch is a
transaction of its own, committed on return; with one open (begun by the caller, e.g. to
write dead letters beside the readings) the batch joins it and the caller commits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from twin.core.errors import InvalidParameter, TwinError
from twin.core.settings import SensorSettings
from twin.live import rules

SHAPE = 'a JSON object {"readings": [{"sensor_id": 1, "ts": "2026-11-20T08:00:00+08:00", ' \
        '"value": 0.42}, ...]}'


class BatchTooLarge(TwinError):
    status_code = 413


@dataclass(slots=True)  # not frozen: a frozen dataclass costs microseconds per reading
class Reading:
    """One well-formed reading; ``index``: its position in the batch it came in."""

    index: int
    sensor_id: int
    ts: datetime
    value: float


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _reject(index: int, row: object, reason: str) -> dict:
    sensor_id = row.get("sensor_id") if isinstance(row, dict) else None
    return {"index": index, "sensor_id": sensor_id if _is_integer(sensor_id) else None,
            "reason": reason}


def parse_row(index: int, row: object) -> Reading | dict:
    """A well-formed reading, or its rejection."""
    # The common case first, cheaply: an object with an int id, a float value and an ISO
    # string with an offset (a batch of 5,000 spends most of its Python time here).
    if type(row) is dict and len(row) == 3:
        sensor_id, ts, value = row.get("sensor_id"), row.get("ts"), row.get("value")
        if (type(sensor_id) is int and type(value) is float and type(ts) is str
                and math.isfinite(value)):
            try:
                instant = datetime.fromisoformat(ts)
            except ValueError:
                pass
            else:
                if instant.tzinfo is not None and instant.utcoffset() is not None:
                    return Reading(index, sensor_id, instant, value)
    return _parse_row_slowly(index, row)


def _parse_row_slowly(index: int, row: object) -> Reading | dict:
    if not isinstance(row, dict):
        return _reject(index, row, "malformed: a reading must be an object with sensor_id, "
                                   "ts and value")
    missing = [key for key in ("sensor_id", "ts", "value") if key not in row]
    if missing:
        return _reject(index, row, f"malformed: missing {', '.join(missing)}")
    sensor_id, ts, value = row["sensor_id"], row["ts"], row["value"]
    if not _is_integer(sensor_id):
        return _reject(index, row, "malformed: sensor_id must be an integer")
    try:
        value = float(value) if _is_number(value) else math.nan
    except OverflowError:  # an integer beyond float range
        value = math.nan
    if not math.isfinite(value):
        return _reject(index, row, "malformed: value must be a finite number")
    if not isinstance(ts, str):
        return _reject(index, row, "malformed: ts must be an ISO 8601 string")
    try:
        instant = datetime.fromisoformat(ts)
    except ValueError:
        return _reject(index, row, f"malformed: ts is not an ISO 8601 timestamp: {ts!r}")
    if instant.utcoffset() is None:
        return _reject(index, row, f"ts has no UTC offset (e.g. +08:00 or Z): {ts!r}")
    return Reading(index, int(sensor_id), instant, value)


def check_batch(payload: object, settings: SensorSettings) -> list:
    """The batch's rows; 400 when the body is not the documented shape, 413 when too big."""
    if not isinstance(payload, dict) or not isinstance(payload.get("readings"), list):
        raise InvalidParameter(f"readings: the body must be {SHAPE}")
    rows = payload["readings"]
    if len(rows) > settings.max_batch:
        raise BatchTooLarge(f"readings: at most {settings.max_batch} readings per batch "
                            f"(TWIN_SENSORS_MAX_BATCH), got {len(rows)}; split the batch")
    return rows


# The transaction's clock and the batch's sensors in one round trip (one row with a NULL id
# when no sensor matches, so the clock always comes back).
_NOW_AND_SENSORS = text("""
    SELECT now() AS now, s.id, s.min_value, s.max_value
      FROM (SELECT 1) AS one
      LEFT JOIN sensors AS s ON s.id = ANY(CAST(:ids AS int[]))
""")

# One statement per batch: the rows inserted (ON CONFLICT keeps a stored reading), the newest
# inserted reading of each sensor upserted into sensor_latest in sensor order (concurrent
# batches lock the same rows in the same order), and back only the batch positions that were
# NOT inserted (usually none), sorted out afterwards.
_INSERT = text("""
    WITH batch AS (
        SELECT * FROM unnest(CAST(:sensor_ids AS int[]), CAST(:ts AS timestamptz[]),
                             CAST(:values AS float8[])) WITH ORDINALITY
                   AS b(sensor_id, ts, value, position)
    ), inserted AS (
        INSERT INTO sensor_readings (sensor_id, ts, value)
        SELECT sensor_id, ts, value FROM batch
        ON CONFLICT (sensor_id, ts) DO NOTHING
        RETURNING sensor_id, ts, value
    ), latest AS (
        INSERT INTO sensor_latest (sensor_id, ts, value)
        SELECT DISTINCT ON (sensor_id) sensor_id, ts, value FROM inserted
         ORDER BY sensor_id, ts DESC
        ON CONFLICT (sensor_id) DO UPDATE
           SET ts = EXCLUDED.ts, value = EXCLUDED.value, received_at = now()
         WHERE sensor_latest.ts < EXCLUDED.ts
    )
    SELECT b.position FROM batch AS b
     WHERE NOT EXISTS (SELECT 1 FROM inserted AS i
                        WHERE i.sensor_id = b.sensor_id AND i.ts = b.ts)
""")

_STORED = text("""
    SELECT r.sensor_id, r.ts, r.value
      FROM unnest(CAST(:sensor_ids AS int[]), CAST(:ts AS timestamptz[])) AS k(sensor_id, ts)
      JOIN sensor_readings AS r ON r.sensor_id = k.sensor_id AND r.ts = k.ts
""")


def _check_against_sensors(readings: Sequence[Reading], sensors: dict, now: datetime,
                           tolerance: timedelta) -> tuple[list[Reading], list[dict]]:
    kept: list[Reading] = []
    rejected: list[dict] = []
    seen: dict[tuple[int, datetime], int] = {}  # (sensor, time) -> index of its first reading
    ranges = {row.id: (row.min_value, row.max_value) for row in sensors.values()}
    latest_allowed = now + tolerance
    for r in readings:
        bounds = ranges.get(r.sensor_id)
        reason = None
        if bounds is None:
            reason = f"unknown sensor {r.sensor_id}"
        elif not bounds[0] <= r.value <= bounds[1]:
            reason = f"value {r.value} outside the sensor's range [{bounds[0]}, {bounds[1]}]"
        elif r.ts > latest_allowed:
            reason = f"timestamp in the future: {r.ts.isoformat()} (now {now.isoformat()})"
        else:
            first = seen.setdefault((r.sensor_id, r.ts), r.index)
            if first != r.index:
                reason = f"duplicate of reading {first} in this batch"
        if reason is None:
            kept.append(r)
        else:
            rejected.append({"index": r.index, "sensor_id": r.sensor_id, "reason": reason})
    return kept, rejected


# Arrays go to the database as one array literal each: psycopg adapting a list of 5,000
# datetimes element by element costs more than the INSERT. Every element here is made by
# Python (int, repr of a finite float, isoformat), so none needs quoting.
def _int_array(values: Sequence[int]) -> str:
    return "{" + ",".join(map(str, values)) + "}"


def _float_array(values: Sequence[float]) -> str:
    return "{" + ",".join(map(repr, values)) + "}"


def _instant_array(values: Sequence[datetime]) -> str:
    return "{" + ",".join(t.isoformat() for t in values) + "}"


def parse_rows(rows: Sequence[object]) -> tuple[list[Reading], list[dict]]:
    """The well-formed readings of ``rows`` (index = position in ``rows``), and the
    rejections of the others."""
    readings: list[Reading] = []
    rejected: list[dict] = []
    for index, row in enumerate(rows):
        parsed = parse_row(index, row)
        if isinstance(parsed, Reading):
            readings.append(parsed)
        else:
            rejected.append(parsed)
    return readings, rejected


def _transaction(conn: AsyncConnection) -> AbstractAsyncContextManager[Any]:
    """A transaction of the batch's own, or the caller's when one is open."""
    return nullcontext() if conn.in_transaction() else conn.begin()


async def store_parsed(conn: AsyncConnection, readings: Sequence[Reading],
                       settings: SensorSettings, *, source: str = "http",
                       received: int | None = None) -> dict:
    """Check parsed readings against the sensors and the clock and store the good ones.

    ``source`` names where the batch came from ("http", "mqtt"); ``received`` is the row
    count of the original batch (default: ``len(readings)``). The answer's ``rejected``
    holds the refused readings by their ``Reading.index``.
    """
    rejected: list[dict] = []
    accepted = already = 0
    async with _transaction(conn):
        # Sensor ids are int4: a larger id names no sensor (and must not reach the cast).
        ids = sorted({r.sensor_id for r in readings if 0 < r.sensor_id < 2**31})
        found = (await conn.execute(_NOW_AND_SENSORS, {"ids": ids})).all()
        now = found[0].now
        sensors = {row.id: row for row in found if row.id is not None}
        valid, refused = _check_against_sensors(
            readings, sensors, now, timedelta(seconds=settings.future_tolerance_s))
        rejected += refused
        if valid:
            # Key order: index pages touched in order, and concurrent retries of one batch
            # take their row locks in the same order.
            valid.sort(key=lambda r: (r.sensor_id, r.ts))
            columns = {"sensor_ids": _int_array([r.sensor_id for r in valid]),
                       "ts": _instant_array([r.ts for r in valid]),
                       "values": _float_array([r.value for r in valid])}
            # Ordinality counts from 1.
            skipped = {row[0] - 1 for row in await conn.execute(_INSERT, columns)}
            late = [valid[k] for k in sorted(skipped)]
            inserted = ([r for k, r in enumerate(valid) if k not in skipped] if skipped
                        else valid)
            accepted = len(inserted)
            if late:
                stored = {(row.sensor_id, row.ts): row.value for row in await conn.execute(
                    _STORED, {"sensor_ids": _int_array([r.sensor_id for r in late]),
                              "ts": _instant_array([r.ts for r in late])})}
                for r in late:
                    if stored.get((r.sensor_id, r.ts)) == r.value:
                        already += 1
                    else:
                        rejected.append({"index": r.index, "sensor_id": r.sensor_id,
                                         "reason": "conflict: a different value is already "
                                                   f"stored for this sensor at "
                                                   f"{r.ts.isoformat()}"})
            if inserted:
                await rules.evaluate(conn, [r.sensor_id for r in inserted],
                                     [r.ts for r in inserted], [r.value for r in inserted])
    rejected.sort(key=lambda item: item["index"])
    return {"received": len(readings) if received is None else received,
            "accepted": accepted, "already_stored": already, "rejected": rejected}


async def store_batch(conn: AsyncConnection, rows: Sequence[object], settings: SensorSettings,
                      source: str = "mqtt") -> dict:
    """Check and store reading objects already taken out of their envelope (the MQTT
    subscriber's entry point): ``rows`` as decoded from JSON, each ``{"sensor_id", "ts",
    "value"}``. Every bad row is rejected with its position in ``rows`` and a reason; the
    good rows are stored. No batch-size limit here: the caller enforces its own.
    """
    readings, rejected = parse_rows(rows)
    result = await store_parsed(conn, readings, settings, source=source, received=len(rows))
    if rejected:
        result["rejected"] = sorted(rejected + result["rejected"], key=lambda r: r["index"])
    return result


async def store_readings(conn: AsyncConnection, payload: object,
                         settings: SensorSettings) -> dict:
    """Check and store an HTTP batch ``{"readings": [...]}``; ``{"received", "accepted",
    "already_stored", "rejected"}``. 400 when the body is not a batch, 413 when too big."""
    rows = check_batch(payload, settings)
    return await store_batch(conn, rows, settings, source="http")


# --- SensorThings API 1.1 CreateObservations (dataArray) ---------------------------------

STA_SHAPE = ('a JSON array [{"Datastream": {"@iot.id": 12}, "components": ["phenomenonTime", '
             '"result"], "dataArray": [["2026-11-20T08:00:00+08:00", 1.5], ...]}, ...]')


def observation_link(sensor_id: int, ts: datetime) -> str:
    """Where a stored reading is read back: ``/sensors/{id}/readings/{ts in UTC}``."""
    instant = ts.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return f"/sensors/{sensor_id}/readings/{instant}"


def observation_rows(body: object, settings: SensorSettings) -> list[dict | str]:
    """The reading rows of a CreateObservations body, one per dataArray entry in order; an
    entry that cannot be a reading at all is its ``"error: ..."`` string instead. 400 when
    the body is not the documented shape, 413 over ``max_batch`` entries in all."""
    if not isinstance(body, list):
        raise InvalidParameter(f"body: must be {STA_SHAPE}")
    groups: list[tuple[object, int, int, int, list]] = []
    total = 0
    for k, group in enumerate(body):
        where = f"body[{k}]"
        if not isinstance(group, dict):
            raise InvalidParameter(f"{where}: must be an object; send {STA_SHAPE}")
        stream = group.get("Datastream")
        stream_id = stream.get("@iot.id") if isinstance(stream, dict) else None
        if not _is_integer(stream_id):
            raise InvalidParameter(f'{where}.Datastream: must be {{"@iot.id": <integer>}}')
        components = group.get("components")
        if (not isinstance(components, list)
                or not all(isinstance(c, str) for c in components)
                or "phenomenonTime" not in components or "result" not in components
                or len(set(components)) != len(components)):
            raise InvalidParameter(f"{where}.components: must list \"phenomenonTime\" and "
                                   f"\"result\" once each, got {components!r}")
        data = group.get("dataArray")
        if not isinstance(data, list):
            raise InvalidParameter(f"{where}.dataArray: must be an array of arrays")
        total += len(data)
        if total > settings.max_batch:
            raise BatchTooLarge(f"dataArray: at most {settings.max_batch} observations per "
                                f"request (TWIN_SENSORS_MAX_BATCH), got more; split the request")
        groups.append((stream_id, components.index("phenomenonTime"),
                       components.index("result"), len(components), data))
    rows: list[dict | str] = []
    for stream_id, at_time, at_result, width, entries in groups:
        for entry in entries:
            if not isinstance(entry, list) or len(entry) != width:
                rows.append(f"error: malformed: a dataArray entry must be an array of "
                            f"{width} values in the order of components")
                continue
            when = entry[at_time]
            if isinstance(when, str) and "/" in when:
                rows.append("error: phenomenonTime intervals are not supported; send an "
                            "instant")
                continue
            rows.append({"sensor_id": stream_id, "ts": when, "value": entry[at_result]})
    return rows


async def create_observations(conn: AsyncConnection, body: object,
                              settings: SensorSettings) -> tuple[list[str], bool]:
    """CreateObservations: per entry its observation link or ``"error: <reason>"``, and
    whether every entry was stored (or was already stored with the same value)."""
    rows = observation_rows(body, settings)
    positions = [k for k, row in enumerate(rows) if isinstance(row, dict)]
    batch = [rows[k] for k in positions]
    result = await store_batch(conn, batch, settings, source="http")
    answer: list[str] = [row if isinstance(row, str) else "" for row in rows]
    for rejection in result["rejected"]:
        answer[positions[rejection["index"]]] = f"error: {rejection['reason']}"
    for k, row in zip(positions, batch, strict=True):
        if not answer[k]:
            assert isinstance(row, dict)
            answer[k] = observation_link(row["sensor_id"], datetime.fromisoformat(row["ts"]))
    return answer, all(not a.startswith("error:") for a in answer)


# --- reading back ----------------------------------------------------------------------

_LATEST = """
    SELECT s.id AS sensor_id, s.code, s.network, s.kind, s.unit, l.ts, l.value, l.received_at
      FROM sensor_latest AS l JOIN sensors AS s ON s.id = l.sensor_id
     WHERE TRUE {where}{scope}
     ORDER BY s.id
"""


def _latest_row(row: Any) -> dict:
    return {"sensor_id": row.sensor_id, "code": row.code, "network": row.network,
            "kind": row.kind, "unit": row.unit, "ts": row.ts.isoformat(), "value": row.value,
            "received_at": row.received_at.isoformat()}


async def latest_readings(conn: AsyncConnection, scope_sql: Any, *, sensor_id: int | None = None,
                          network: str | None = None, kind: str | None = None) -> list[dict]:
    """The newest reading of each sensor in the scope (``scope_sql``: a
    ``twin.core.scope.ScopeSql`` over ``sensors`` aliased ``s``), optionally one sensor, one
    network or one kind."""
    where, params = "", dict(scope_sql.params)
    for column, value in (("id", sensor_id), ("network", network), ("kind", kind)):
        if value is not None:
            where += f" AND s.{column} = :{column}"
            params[column] = value
    sql = text(_LATEST.format(where=where, scope=scope_sql.and_sql))
    return [_latest_row(row) for row in await conn.execute(sql, params)]


_ONE = """
    SELECT r.sensor_id, r.ts, r.value FROM sensor_readings AS r JOIN sensors AS s
        ON s.id = r.sensor_id
     WHERE r.sensor_id = :sensor_id AND r.ts = CAST(:ts AS timestamptz){scope}
"""


async def one_reading(conn: AsyncConnection, scope_sql: Any, sensor_id: int,
                      ts: datetime) -> dict | None:
    """One stored reading (an observation link's target), or None."""
    row = (await conn.execute(text(_ONE.format(scope=scope_sql.and_sql)),
                              {"sensor_id": sensor_id, "ts": ts} | scope_sql.params)).first()
    if row is None:
        return None
    return {"sensor_id": row.sensor_id, "ts": row.ts.isoformat(), "value": row.value}

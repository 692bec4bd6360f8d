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
if the database fails, none is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from twin.core.errors import InvalidParameter, TwinError
from twin.core.settings import SensorSettings

SHAPE = 'a JSON object {"readings": [{"sensor_id": 1, "ts": "2026-11-20T08:00:00+08:00", ' \
        '"value": 0.42}, ...]}'


class BatchTooLarge(TwinError):
    status_code = 413


@dataclass(frozen=True)
class Reading:
    index: int
    sensor_id: int
    ts: datetime
    value: float


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_row(index: int, row: object) -> Reading | dict:
    """A well-formed reading, or its rejection."""
    def reject(reason: str) -> dict:
        sensor_id = row.get("sensor_id") if isinstance(row, dict) else None
        return {"index": index, "sensor_id": sensor_id if _is_integer(sensor_id) else None,
                "reason": reason}

    if not isinstance(row, dict):
        return reject("malformed: a reading must be an object with sensor_id, ts and value")
    missing = [key for key in ("sensor_id", "ts", "value") if key not in row]
    if missing:
        return reject(f"malformed: missing {', '.join(missing)}")
    sensor_id, ts, value = row["sensor_id"], row["ts"], row["value"]
    if not _is_integer(sensor_id):
        return reject("malformed: sensor_id must be an integer")
    try:
        value = float(value) if _is_number(value) else math.nan
    except OverflowError:  # an integer beyond float range
        value = math.nan
    if not math.isfinite(value):
        return reject("malformed: value must be a finite number")
    if not isinstance(ts, str):
        return reject("malformed: ts must be an ISO 8601 string")
    try:
        instant = datetime.fromisoformat(ts)
    except ValueError:
        return reject(f"malformed: ts is not an ISO 8601 timestamp: {ts!r}")
    if instant.utcoffset() is None:
        return reject(f"ts has no UTC offset (e.g. +08:00 or Z): {ts!r}")
    return Reading(index, sensor_id, instant, value)


def check_batch(payload: object, settings: SensorSettings) -> list:
    """The batch's rows; 400 when the body is not the documented shape, 413 when too big."""
    if not isinstance(payload, dict) or not isinstance(payload.get("readings"), list):
        raise InvalidParameter(f"readings: the body must be {SHAPE}")
    rows = payload["readings"]
    if len(rows) > settings.max_batch:
        raise BatchTooLarge(f"readings: at most {settings.max_batch} readings per batch "
                            f"(TWIN_SENSORS_MAX_BATCH), got {len(rows)}; split the batch")
    return rows


_SENSORS = text("""
    SELECT id, min_value, max_value FROM sensors WHERE id = ANY(CAST(:ids AS int[]))
""")

_NOW = text("SELECT now()")

# ON CONFLICT keeps the stored reading; the rows not inserted are sorted out afterwards.
_INSERT = text("""
    INSERT INTO sensor_readings (sensor_id, ts, value)
    SELECT * FROM unnest(CAST(:sensor_ids AS int[]), CAST(:ts AS timestamptz[]),
                         CAST(:values AS float8[]))
    ON CONFLICT (sensor_id, ts) DO NOTHING
    RETURNING sensor_id, ts
""")

_STORED = text("""
    SELECT r.sensor_id, r.ts, r.value
      FROM unnest(CAST(:sensor_ids AS int[]), CAST(:ts AS timestamptz[])) AS k(sensor_id, ts)
      JOIN sensor_readings AS r ON r.sensor_id = k.sensor_id AND r.ts = k.ts
""")

def _check_against_sensors(readings: list[Reading], sensors: dict, now: datetime,
                           tolerance: timedelta) -> tuple[list[Reading], list[dict]]:
    kept: list[Reading] = []
    rejected: list[dict] = []
    seen: dict[tuple[int, datetime], int] = {}  # (sensor, time) -> index of its first reading
    for r in readings:
        sensor = sensors.get(r.sensor_id)
        reason = None
        if sensor is None:
            reason = f"unknown sensor {r.sensor_id}"
        elif not sensor.min_value <= r.value <= sensor.max_value:
            reason = (f"value {r.value} outside the sensor's range "
                      f"[{sensor.min_value}, {sensor.max_value}]")
        elif r.ts > now + tolerance:
            reason = f"timestamp in the future: {r.ts.isoformat()} (now {now.isoformat()})"
        elif (r.sensor_id, r.ts) in seen:
            reason = f"duplicate of reading {seen[(r.sensor_id, r.ts)]} in this batch"
        if reason is None:
            seen[(r.sensor_id, r.ts)] = r.index
            kept.append(r)
        else:
            rejected.append({"index": r.index, "sensor_id": r.sensor_id, "reason": reason})
    return kept, rejected


async def store_readings(conn: AsyncConnection, payload: object,
                         settings: SensorSettings) -> dict:
    """Check and store a batch; ``{"received", "accepted", "already_stored", "rejected"}``.

    Needs a connection with no transaction open: the batch is one transaction of its own.
    """
    rows = check_batch(payload, settings)
    parsed = [parse_row(k, row) for k, row in enumerate(rows)]
    rejected = [p for p in parsed if isinstance(p, dict)]
    readings = [p for p in parsed if isinstance(p, Reading)]
    accepted = already = 0
    async with conn.begin():
        now = (await conn.execute(_NOW)).scalar_one()
        # Sensor ids are int4: a larger id names no sensor (and must not reach the cast).
        ids = sorted({r.sensor_id for r in readings if 0 < r.sensor_id < 2**31})
        sensors = {row.id: row for row in await conn.execute(_SENSORS, {"ids": ids})}
        valid, refused = _check_against_sensors(
            readings, sensors, now, timedelta(seconds=settings.future_tolerance_s))
        rejected += refused
        if valid:
            columns = {"sensor_ids": [r.sensor_id for r in valid], "ts": [r.ts for r in valid],
                       "values": [r.value for r in valid]}
            inserted = {(row.sensor_id, row.ts) for row in await conn.execute(_INSERT, columns)}
            accepted = len(inserted)
            late = [r for r in valid if (r.sensor_id, r.ts) not in inserted]
            stored = {(row.sensor_id, row.ts): row.value for row in await conn.execute(
                _STORED, {"sensor_ids": [r.sensor_id for r in late], "ts": [r.ts for r in late]})}
            for r in late:
                if stored.get((r.sensor_id, r.ts)) == r.value:
                    already += 1
                else:
                    rejected.append({"index": r.index, "sensor_id": r.sensor_id,
                                     "reason": "conflict: a different value is already "
                                               f"stored for this sensor at {r.ts.isoformat()}"})
    rejected.sort(key=lambda item: item["index"])
    return {"received": len(rows), "accepted": accepted, "already_stored": already,
            "rejected": rejected}

"""Alert rules on readings as they arrive (owner: rules).

``evaluate`` runs inside the ingest's transaction, after the batch is stored, and opens and
closes ``sensor_alerts`` (migration 0013) by the enabled ``alert_rules``:

* **Threshold rules, with hysteresis.** Each sensor and rule is a two-state machine over its
  readings in time order: closed -> open on a reading above ``open_above`` (or below
  ``open_below``), open -> closed on a reading below ``close_below`` (and above
  ``close_above`` where set); readings between the bounds keep the state. A batch holding
  several readings of a sensor is walked in time order, so an alert can open and close within
  one batch (it is recorded, and raises its event, all the same).
* **Silence rules** are opened by the detector loop (twin/live/detectors.py); a reading newer
  than the silence closes them here at once.

Cost: the ingest's target is 25,000 readings/s on 2 cores, and almost every batch fires
nothing. One statement joins the batch (three arrays, unnested) with its sensors, the enabled
rules and the open alerts, and returns only the (sensor, rule) pairs that matter: a reading
past an open bound, or an alert already open. When it returns no row, that was all. Only the
hot pairs' readings come back to Python, where the state machine runs; the changes are then
written set-based (one INSERT, one UPDATE), an event is raised per opened alert
(twin.live.events.raise_event) and an ``alert`` message emitted per change, last, into the
outbox (area: the grid cell holding the sensor).

Concurrency: two ingest transactions for one sensor cannot both open an alert: the partial
unique index (one open alert per sensor and rule) makes the second INSERT wait for the first
to commit and then skip its row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from twin.core import outbox
from twin.live import events

# The hot (sensor, rule) pairs of a batch: a reading past an open bound, or an alert open. Only
# sensor ids and values go to the database (timestamps cost more to send than the rest of
# the statement); a quiet batch gets no row back, and that is all it costs. The first test
# (past the loosest bound of any rule, or an open alert) is a superset of the exact one and
# drops most readings before they are joined with their sensors (half the time).
_HOT = text("""
    SELECT DISTINCT b.sensor_id, r.code, a.id AS alert_id, a.opened_at, r.open_above,
           r.open_below, r.close_above, r.close_below, r.silent_minutes
      FROM unnest(CAST(:ids AS int[]), CAST(:vals AS float8[])) AS b(sensor_id, value)
      JOIN sensors AS s ON s.id = b.sensor_id
      JOIN alert_rules AS r ON r.enabled AND r.sensor_kind = s.kind
                           AND (r.network IS NULL OR r.network = s.network)
      LEFT JOIN sensor_alerts AS a ON a.sensor_id = b.sensor_id AND a.rule_code = r.code
                                  AND a.closed_at IS NULL
     WHERE (b.value > (SELECT min(open_above) FROM alert_rules WHERE enabled)
            OR b.value < (SELECT max(open_below) FROM alert_rules WHERE enabled)
            OR b.sensor_id IN (SELECT sensor_id FROM sensor_alerts WHERE closed_at IS NULL))
       AND (b.value > r.open_above OR b.value < r.open_below OR a.id IS NOT NULL)
""")


@dataclass(frozen=True)
class Reading:
    """One reading of a hot pair, with the pair's rule and open alert: what ``walk`` reads."""

    sensor_id: int
    code: str
    alert_id: int | None
    opened_at: datetime | None
    open_above: float | None
    open_below: float | None
    close_above: float | None
    close_below: float | None
    silent_minutes: int | None
    ts: datetime
    value: float


def hot_readings(pairs: Sequence[Any], sensor_ids: Sequence[int], ts: Sequence[datetime],
                 values: Sequence[float]) -> list[Reading]:
    """Every reading of the hot pairs, ordered by sensor, rule and time."""
    hot = {p.sensor_id for p in pairs}
    mine: dict[int, list[tuple[datetime, float]]] = {}
    for sensor_id, instant, value in zip(sensor_ids, ts, values, strict=True):
        if sensor_id in hot:
            mine.setdefault(sensor_id, []).append((instant, value))
    out = []
    for p in sorted(pairs, key=lambda p: (p.sensor_id, p.code)):
        for instant, value in sorted(mine[p.sensor_id]):
            out.append(Reading(p.sensor_id, p.code, p.alert_id, p.opened_at, p.open_above,
                               p.open_below, p.close_above, p.close_below, p.silent_minutes,
                               instant, value))
    return out


# Where a sensor is: its code, kind, point and the grid cell holding it (the message's area).
SENSOR_PLACE = """
    SELECT s.id AS sensor_id, s.code AS sensor_code, s.kind AS sensor_kind, s.unit,
           ST_X(s.geom) AS lon, ST_Y(s.geom) AS lat, g.code AS grid_code
      FROM sensors AS s
      LEFT JOIN LATERAL (SELECT u.code FROM admin_units AS u
                          WHERE u.level = 'grid' AND ST_Intersects(u.geom, s.geom)
                          ORDER BY u.code LIMIT 1) AS g ON true
"""

# The end of a statement opening alerts: it closes the CTE ``new`` (an ``INSERT INTO
# sensor_alerts`` whose conflicting rows, an alert already open, are skipped) and selects the
# alerts opened, with their sensor's place and their rule's names: the rows ``with_events``
# takes. Here and in twin/live/detectors.py (silence).
OPENED_ALERTS = f"""
        ON CONFLICT (sensor_id, rule_code) WHERE closed_at IS NULL DO NOTHING
        RETURNING id, sensor_id, rule_code, opened_at, opened_value, closed_at, closed_value
    )
    SELECT new.*, p.sensor_code, p.sensor_kind, p.unit, p.lon, p.lat, p.grid_code,
           r.name_zh, r.name_en, r.event_kind
      FROM new
      JOIN ({SENSOR_PLACE}) AS p ON p.sensor_id = new.sensor_id
      JOIN alert_rules AS r ON r.code = new.rule_code
     ORDER BY new.id
"""

_OPEN = text(f"""
    WITH new AS (
        INSERT INTO sensor_alerts (sensor_id, rule_code, opened_at, opened_value, closed_at,
                                   closed_value)
        SELECT * FROM unnest(CAST(:ids AS int[]), CAST(:rules AS text[]),
                             CAST(:opened_at AS timestamptz[]), CAST(:opened AS float8[]),
                             CAST(:closed_at AS timestamptz[]), CAST(:closed AS float8[]))
{OPENED_ALERTS}""")

CLOSE = text(f"""
    WITH closed AS (
        UPDATE sensor_alerts AS a
           SET closed_at = greatest(c.ts, a.opened_at), closed_value = c.value
          FROM unnest(CAST(:alert_ids AS bigint[]), CAST(:ts AS timestamptz[]),
                      CAST(:vals AS float8[])) AS c(id, ts, value)
         WHERE a.id = c.id AND a.closed_at IS NULL
        RETURNING a.id, a.sensor_id, a.rule_code, a.opened_at, a.opened_value, a.closed_at,
                  a.closed_value, a.event_id
    )
    SELECT closed.*, p.sensor_code, p.sensor_kind, p.grid_code
      FROM closed JOIN ({SENSOR_PLACE}) AS p ON p.sensor_id = closed.sensor_id
     ORDER BY closed.id
""")

SET_EVENTS = text("""
    UPDATE sensor_alerts AS a SET event_id = e.event_id
      FROM unnest(CAST(:alert_ids AS bigint[]), CAST(:event_ids AS bigint[]))
           AS e(id, event_id)
     WHERE a.id = e.id
""")


@dataclass
class _Episode:
    """An alert opened in this batch (and maybe closed in it too)."""

    sensor_id: int
    rule: str
    opened_at: datetime
    opened_value: float
    closed_at: datetime | None = None
    closed_value: float | None = None


@dataclass
class Changes:
    opened: list[_Episode] = field(default_factory=list)
    # (existing alert id, ts, value) of each open alert a reading closes.
    closed: list[tuple[int, datetime, float]] = field(default_factory=list)


def opens(value: float, open_above: float | None, open_below: float | None) -> bool:
    return ((open_above is not None and value > open_above)
            or (open_below is not None and value < open_below))


def closes(value: float, close_above: float | None, close_below: float | None) -> bool:
    return ((close_below is None or value < close_below)
            and (close_above is None or value > close_above))


def walk(rows: Sequence[Reading]) -> Changes:
    """The state machine over the hot readings (ordered by sensor, rule, time)."""
    changes = Changes()
    key = None
    open_alert: int | None = None  # an alert open before the batch, while it is
    episode: _Episode | None = None  # an alert this batch opened, while it is open
    for row in rows:
        if (row.sensor_id, row.code) != key:
            key = (row.sensor_id, row.code)
            open_alert, episode = row.alert_id, None
        if row.silent_minutes is not None:
            # A silence alert: any reading newer than the last one before the silence ends it.
            if open_alert is not None and row.opened_at is not None and row.ts > (
                    row.opened_at - timedelta(minutes=row.silent_minutes)):
                changes.closed.append((open_alert, row.ts, row.value))
                open_alert = None
            continue
        if open_alert is None and episode is None:
            if opens(row.value, row.open_above, row.open_below):
                episode = _Episode(row.sensor_id, row.code, row.ts, row.value)
                changes.opened.append(episode)
        elif closes(row.value, row.close_above, row.close_below):
            if open_alert is not None:
                # Only readings after the opening close it (a late older one does not).
                if row.opened_at is None or row.ts > row.opened_at:
                    changes.closed.append((open_alert, row.ts, row.value))
                    open_alert = None
            elif episode is not None:
                episode.closed_at, episode.closed_value = row.ts, row.value
                episode = None
    return changes


def alert_message(row: Any, state: str, event_id: int | None) -> dict[str, Any]:
    """The ``alert`` outbox payload of an alert row that opened or closed."""
    closed = state == "closed"
    return {
        "id": row.id, "state": state, "sensor_id": row.sensor_id,
        "sensor_code": row.sensor_code, "sensor_kind": row.sensor_kind,
        "rule": row.rule_code,
        "value": row.closed_value if closed else row.opened_value,
        "ts": (row.closed_at if closed else row.opened_at).isoformat(),
        "opened_at": row.opened_at.isoformat(),
        "closed_at": row.closed_at.isoformat() if row.closed_at is not None else None,
        "event_id": event_id, "grid_code": row.grid_code,
    }


def _area(grid_code: str | None) -> list[str]:
    # A sensor in no grid cell: the city's centre only (an empty list matches no scope code).
    return [grid_code] if grid_code else []


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


async def raise_alert_event(conn: AsyncConnection, row: Any) -> int | None:
    """The event an opened alert raises at its sensor's place; None when the rule names no
    event kind or no grid cell holds the sensor."""
    if row.event_kind is None or row.grid_code is None:
        return None
    if row.opened_value is None:  # a silence alert
        title = f"{row.name_zh}：{row.sensor_code}"
        description = (f"{row.name_zh}（{row.name_en}）：传感器 {row.sensor_code} 自 "
                       f"{row.opened_at.isoformat()} 起无数据")
    else:
        title = f"{row.name_zh}：{row.sensor_code} {_number(row.opened_value)} {row.unit}"
        description = (f"{row.name_zh}（{row.name_en}）：传感器 {row.sensor_code} 于 "
                       f"{row.opened_at.isoformat()} 读数 {_number(row.opened_value)} "
                       f"{row.unit}")
    event = await events.raise_event(
        conn, kind=row.event_kind, lon=row.lon, lat=row.lat, source="rule", title=title,
        description=description, sensor_id=row.sensor_id, rule_code=row.rule_code)
    return int(event["id"])


async def open_alerts(conn: AsyncConnection, episodes: Sequence[_Episode]
                      ) -> list[tuple[Any, int | None]]:
    """Insert alerts (skipping any a concurrent writer opened first) and raise their events;
    the rows inserted with their event ids. No outbox message yet."""
    if not episodes:
        return []
    rows = (await conn.execute(_OPEN, {
        "ids": [e.sensor_id for e in episodes], "rules": [e.rule for e in episodes],
        "opened_at": [e.opened_at for e in episodes],
        "opened": [e.opened_value for e in episodes],
        "closed_at": [e.closed_at for e in episodes],
        "closed": [e.closed_value for e in episodes]})).all()
    return await with_events(conn, rows)


async def with_events(conn: AsyncConnection, rows: Sequence[Any]
                      ) -> list[tuple[Any, int | None]]:
    """Alerts just inserted, each with the event it raised (recorded on the alert)."""
    opened = [(row, await raise_alert_event(conn, row)) for row in rows]
    with_event = [(row.id, event_id) for row, event_id in opened if event_id is not None]
    if with_event:
        await conn.execute(SET_EVENTS, {"alert_ids": [a for a, _ in with_event],
                                        "event_ids": [e for _, e in with_event]})
    return opened


async def close_alerts(conn: AsyncConnection, closing: Sequence[tuple[int, datetime, float | None]]
                       ) -> list[Any]:
    if not closing:
        return []
    return list((await conn.execute(CLOSE, {
        "alert_ids": [c[0] for c in closing], "ts": [c[1] for c in closing],
        "vals": [c[2] for c in closing]})).all())


async def emit_changes(conn: AsyncConnection, opened: Sequence[tuple[Any, int | None]],
                       closed: Sequence[Any]) -> int:
    """One ``alert`` message per change (an alert opened and closed at once: two); last."""
    count = 0
    for row, event_id in opened:
        await outbox.emit(conn, "alert", alert_message(row, "opened", event_id),
                          _area(row.grid_code))
        count += 1
        if row.closed_at is not None:
            await outbox.emit(conn, "alert", alert_message(row, "closed", event_id),
                              _area(row.grid_code))
            count += 1
    for row in closed:
        await outbox.emit(conn, "alert", alert_message(row, "closed", row.event_id),
                          _area(row.grid_code))
        count += 1
    return count


async def evaluate(conn: AsyncConnection, sensor_ids: Sequence[int], ts: Sequence[datetime],
                   values: Sequence[float]) -> int:
    """Opens and closes alerts for a batch just stored, inside the ingest's transaction;
    the number of alerts opened or closed."""
    if not sensor_ids:
        return 0
    # One array literal each: psycopg adapting 5,000 numbers one by one costs more than the
    # statement (every element is made here by int() or repr(float()), none needs quoting).
    pairs = (await conn.execute(_HOT, {
        "ids": "{" + ",".join(str(int(i)) for i in sensor_ids) + "}",
        "vals": "{" + ",".join(repr(float(v)) for v in values) + "}"})).all()
    if not pairs:
        return 0
    changes = walk(hot_readings(pairs, sensor_ids, ts, values))
    # Closing first: an alert closed and opened again in one batch needs the old one shut
    # before the new one passes the one-open-alert index.
    closed = await close_alerts(conn, changes.closed)
    opened = await open_alerts(conn, changes.opened)
    await emit_changes(conn, opened, closed)
    return len(opened) + sum(row.closed_at is not None for row, _ in opened) + len(closed)

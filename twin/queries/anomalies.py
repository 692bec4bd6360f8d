"""Pipe-network anomaly zones from the sensor readings.

1. **Score.** Each sensor is compared with its own baseline: the median and the median
   absolute deviation (MAD) of its readings over the query window, widened to at least the
   ``BASELINE`` before ``until``. A reading is anomalous when its robust z-score
   ``|value - median| / (1.4826 MAD)`` reaches ``Z_THRESHOLD``. The median and MAD barely
   move for an incident that covers well under half the baseline, and the daily swing of
   the readings stays inside the MAD, so no seasonal model is needed over a day or a week.
2. **Persist.** Anomalous readings of one sensor less than ``MAX_GAP`` apart form a run; a
   run of fewer than ``MIN_READINGS`` readings (a one-off spike) is dropped.
3. **Group along the pipes.** Two sensor runs that overlap in time belong to one zone when
   the pipe graph links them: on drainage, when their downstream paths meet within
   ``LINK_HOPS`` segments of both (a blockage backs water up the branches above it); on the
   pressurised water and gas networks, when they are within ``LINK_HOPS`` segments of each
   other in either direction. Zones are the connected groups.
4. **Describe.** The likely source: on drainage the most upstream anomalous flow meter's
   segment, or else the pipe leaving the point where the anomalous gauges' paths meet; on
   water and gas the pipe at the graph centre of the anomalous sensors. The affected
   segments join the source to every sensor; the zone is a buffer of ``BUFFER_M`` metres
   around them, and communities, risk points and buildings are counted inside it.
5. **Jurisdiction.** Zones are found over the whole network (an incident does not stop at a
   border), then a district or street principal gets the zones that meet its jurisdiction,
   with the communities, risk points and buildings counted only where they lie in it
   (twin/core/scope.py). Such a zone keeps its sensors and segments whole: they describe
   one incident, part of which may lie next door.

The readings come in one query, one row per sensor holding its readings as 16-byte records
in PostgreSQL's binary send format (``timestamptz_send``: big-endian int64 microseconds since
2000-01-01 UTC, then ``float8send``: big-endian float64) concatenated into a ``bytea``. Over
864,000 readings that is several times faster than fetching rows or arrays (which build a
Python object per value), and the scoring is then a few vectorised numpy passes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from sqlalchemy import Row, text
from sqlalchemy.ext.asyncio import AsyncConnection

from twin.core.errors import InvalidParameter
from twin.core.models import NETWORKS
from twin.core.principal import CITY, Scope
from twin.core.scope import spatial_predicate, table_predicate
from twin.queries.pipe_graph import PipeGraph, load_graph

Z_THRESHOLD = 5.0
# A floor under 1.4826 MAD, as a share of the median, so a sensor that barely moves is not
# flagged for moving a little.
MIN_SCALE_SHARE = 0.005
MIN_READINGS = 3
# A sensor with fewer readings than this in its baseline (an hour at the usual 5-minute
# cadence) has no baseline worth scoring against yet.
MIN_BASELINE_READINGS = 12
MAX_GAP = timedelta(minutes=15)
BASELINE = timedelta(hours=24)
DEFAULT_WINDOW = timedelta(hours=24)
MAX_WINDOW = timedelta(days=7)
# How far through the pipe graph one incident is assumed to be felt (segments, ~100-150 m
# each): a blockage's backwater up the branches above it; a pressure drop or gas around a
# leak.
LINK_HOPS = {"drainage": 15, "water": 12, "gas": 12}
BUFFER_M = 30.0
# Severity words by the zone's peak robust z-score.
SEVERITY_LEVELS = ((25.0, "major"), (10.0, "moderate"), (0.0, "minor"))

_UNENCODED_PLUS = re.compile(r"(\d\d:\d\d(?::\d\d(?:\.\d+)?)?) (\d\d:?\d\d)$")
_PG_EPOCH_US = int(datetime(2000, 1, 1, tzinfo=UTC).timestamp()) * 1_000_000


def parse_instant(name: str, raw: str) -> datetime:
    """An ISO 8601 timestamp with a UTC offset; a 400 naming ``name`` otherwise.

    A '+' typed into a URL unencoded arrives as a space ("...08:00:00 08:00"); it is read
    as the '+' it was.
    """
    raw = _UNENCODED_PLUS.sub(r"\1+\2", raw.strip())
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise InvalidParameter(f"{name}: not an ISO 8601 timestamp: {raw!r} "
                               f"(e.g. 2026-11-20T08:00:00+08:00)") from None
    if value.utcoffset() is None:
        raise InvalidParameter(f"{name}: needs a UTC offset (e.g. +08:00 or Z): {raw!r}")
    return value


def check_network(network: str) -> None:
    if network not in NETWORKS:
        raise InvalidParameter(f"network: {network!r} is not a pipe network; "
                               f"allowed: {', '.join(NETWORKS)}")


# ------------------------------------------------------------------ window and readings

# The newest reading of the network: one index probe per sensor on (sensor_id, ts).
_LAST_READING = text("""
    SELECT max(last.ts)
      FROM sensors AS s
     CROSS JOIN LATERAL (SELECT r.ts FROM sensor_readings AS r WHERE r.sensor_id = s.id
                          ORDER BY r.ts DESC LIMIT 1) AS last
     WHERE s.network = :network
""")

# Each sensor's readings as one bytea of 16-byte records. A lateral index scan per sensor
# reads them in (sensor_id, ts) order without a sort; the order is not relied on (string_agg
# without ORDER BY promises none), fetch_readings sorts each row by time.
_READINGS = text("""
    SELECT s.id, r.records
      FROM sensors AS s
     CROSS JOIN LATERAL (
           SELECT string_agg(timestamptz_send(x.ts) || float8send(x.value), ''::bytea)
                      AS records
             FROM (SELECT ts, value FROM sensor_readings
                    WHERE sensor_id = s.id AND ts >= :start AND ts <= :until
                    ORDER BY ts) AS x) AS r
     WHERE s.network = :network AND r.records IS NOT NULL
""")
_RECORD = np.dtype([("ts", ">i8"), ("value", ">f8")])


async def query_window(conn: AsyncConnection, network: str, since: str | None,
                       until: str | None) -> tuple[datetime, datetime] | None:
    """(since, until) from the parameters; defaults end at the newest reading.

    None when there is no reading to default to.
    """
    end = parse_instant("until", until) if until is not None else None
    start = parse_instant("since", since) if since is not None else None
    if end is None:
        end = (await conn.execute(_LAST_READING, {"network": network})).scalar()
        if end is None:
            return None
        if start is not None:
            end = max(end, start)  # since after the newest reading: an empty window
    if start is None:
        start = end - DEFAULT_WINDOW
    if start > end:
        raise InvalidParameter(f"since: must not be after until ({start.isoformat()} > "
                               f"{end.isoformat()})")
    if end - start > MAX_WINDOW:
        raise InvalidParameter(f"since, until: the window may span at most "
                               f"{MAX_WINDOW.days} days")
    return start, end


@dataclass
class Readings:
    """All readings as flat arrays, ordered by sensor and then time."""

    sensor_ids: np.ndarray  # one per sensor
    sensor: np.ndarray  # per reading: index into sensor_ids
    times_us: np.ndarray  # per reading: int64 microseconds since 1970-01-01 UTC
    values: np.ndarray


async def fetch_readings(conn: AsyncConnection, network: str, start: datetime,
                         until: datetime) -> Readings:
    rows = (await conn.execute(_READINGS, {"network": network, "start": start,
                                           "until": until})).all()
    records = np.frombuffer(b"".join(row.records for row in rows), _RECORD)
    lengths = [len(row.records) // _RECORD.itemsize for row in rows]
    sensor = np.repeat(np.arange(len(rows)), lengths)
    times = records["ts"].astype(np.int64) + _PG_EPOCH_US
    values = records["value"].astype(np.float64)
    if not np.all((np.diff(times) > 0) | (np.diff(sensor) > 0)):
        order = np.lexsort((times, sensor))
        sensor, times, values = sensor[order], times[order], values[order]
    return Readings(np.array([row.id for row in rows], dtype=np.int64), sensor, times, values)


# ------------------------------------------------------------------ scoring

@dataclass(frozen=True)
class SensorRun:
    """A persistent anomaly at one sensor."""

    sensor_id: int
    start_us: int
    end_us: int  # the last anomalous reading
    readings: int
    peak_z: float  # signed, the largest in magnitude
    median: float  # the sensor's baseline
    place: int = -1  # node index in the pipe graph, once placed


def group_medians(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The median of each group of ``values`` (consecutive, of sizes ``counts``, all > 0).

    Groups of one size are sorted together as the rows of a matrix: readings come at a
    fixed cadence, so there are few sizes, and nothing is padded.
    """
    first = np.cumsum(counts) - counts
    medians = np.empty(counts.size)
    for size in np.unique(counts):
        rows = np.flatnonzero(counts == size)
        block = np.sort(values[first[rows, None] + np.arange(size)], axis=1)
        medians[rows] = (block[:, (size - 1) // 2] + block[:, size // 2]) / 2
    return medians


def robust_z(readings: Readings) -> tuple[np.ndarray, np.ndarray]:
    """(z-score of each reading, median of each sensor): against each sensor's median/MAD."""
    counts = np.bincount(readings.sensor, minlength=readings.sensor_ids.size)
    median = group_medians(readings.values, counts)
    deviation = readings.values - median[readings.sensor]
    mad = group_medians(np.abs(deviation), counts)
    scale = np.maximum(1.4826 * mad, MIN_SCALE_SHARE * np.abs(median) + 1e-9)
    return deviation / scale[readings.sensor], median


def persistent_runs(readings: Readings, since: datetime) -> list[SensorRun]:
    """Runs of anomalous readings at or after ``since`` that last long enough to count."""
    if readings.values.size == 0:
        return []
    z, median = robust_z(readings)
    enough = np.bincount(readings.sensor) >= MIN_BASELINE_READINGS
    flagged = np.flatnonzero((np.abs(z) >= Z_THRESHOLD) & enough[readings.sensor]
                             & (readings.times_us >= int(since.timestamp() * 1_000_000)))
    sensor, times = readings.sensor[flagged], readings.times_us[flagged]
    # A new run starts at another sensor or after a quiet gap.
    starts = np.r_[True, (sensor[1:] != sensor[:-1])
                   | (np.diff(times) > MAX_GAP / timedelta(microseconds=1))]
    runs = []
    for part in np.split(np.arange(flagged.size), np.flatnonzero(starts)[1:]):
        if part.size < MIN_READINGS:
            continue
        scores = z[flagged[part]]
        row = int(sensor[part[0]])
        runs.append(SensorRun(int(readings.sensor_ids[row]), int(times[part[0]]),
                              int(times[part[-1]]), int(part.size),
                              float(scores[np.argmax(np.abs(scores))]), float(median[row])))
    return runs


# ------------------------------------------------------------------ grouping

_SENSORS = text("""
    SELECT s.id, s.code, s.kind, s.node_id, s.segment_id, g.from_node
      FROM sensors AS s
      LEFT JOIN pipe_segments AS g ON g.id = s.segment_id
     WHERE s.id = ANY(CAST(:ids AS int[]))
""")


@dataclass
class Zone:
    runs: list[SensorRun]
    source_segment_id: int
    segment_ids: list[int]  # never empty: a placed sensor's node has a pipe


def _linked_pairs(graph: PipeGraph, runs: list[SensorRun], places: np.ndarray,
                  reach: csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of runs (i, j) linked through the pipes and overlapping in time.

    ``places`` are the node indices the runs sit at; row k of ``reach`` holds 1 + the hops
    from ``places[k]`` to every node within ``LINK_HOPS`` (0 beyond).
    """
    seen = (reach > 0).astype(np.int32)
    if graph.directed:
        # Their downstream paths meet within the limit of both.
        near = (seen @ seen.T).tocoo()
    else:
        near = seen[:, places].tocoo()
    place_of = {int(p): k for k, p in enumerate(places)}
    runs_at: dict[int, list[int]] = {}
    for k, run in enumerate(runs):
        runs_at.setdefault(place_of[run.place], []).append(k)
    pairs = [(i, j) for a, b in zip(near.row.tolist(), near.col.tolist(), strict=True)
             for i in runs_at.get(a, []) for j in runs_at.get(b, [])
             if runs[i].start_us <= runs[j].end_us and runs[j].start_us <= runs[i].end_us]
    if not pairs:
        return np.zeros(0, int), np.zeros(0, int)
    first, second = zip(*pairs, strict=True)
    return np.array(first), np.array(second)


def _meeting_node(reach: csr_matrix, rows: list[int], fallback: int,
                  by_total: bool = False) -> int:
    """The node every place in ``rows`` reaches with the fewest hops from the farthest.

    Ties go to the smallest total when ``by_total`` (a graph centre).
    """
    block = reach[rows]
    everyone = np.asarray((block > 0).sum(axis=0)).ravel() == len(rows)
    if not everyone.any():
        return fallback
    worst = np.where(everyone, np.asarray(block.max(axis=0).todense()).ravel(), np.inf)
    if not by_total:
        return int(np.argmin(worst))
    total = np.where(everyone, np.asarray(block.sum(axis=0)).ravel(), np.inf)
    return int(np.lexsort((total, worst))[0])


def _drainage_zone(graph: PipeGraph, members: list[SensorRun], reach: csr_matrix,
                   row_of: dict[int, int], on_segment: dict[int, int]) -> Zone:
    """Paths down to where the members' flows meet; the source at or just below it."""
    meet = _meeting_node(reach, sorted({row_of[m.place] for m in members}), members[0].place)
    hops, pred = graph.tree_to(meet, LINK_HOPS["drainage"])
    segments: set[int] = set()
    for m in members:
        segments.update(graph.path_to_root(pred, m.place))
    meters = [m for m in members if m.sensor_id in on_segment]
    segments.update(on_segment[m.sensor_id] for m in meters)
    if meters:
        # Flow falls at and below the blocked pipe: the most upstream meter is on it.
        source = on_segment[max(meters, key=lambda m: hops[m.place]).sensor_id]
    else:
        # The levels rise above the blockage: it is in the pipe leaving their meeting point
        # (at an outfall, the last pipe into it).
        source = min(graph.segments_from(meet) or graph.segments_touching(meet))
    return Zone(members, source, sorted(segments | {source}))


def _pressure_zone(graph: PipeGraph, members: list[SensorRun], reach: csr_matrix,
                   row_of: dict[int, int], network: str) -> Zone:
    """The source at the graph centre of the members; paths from it to each member."""
    by_strength = sorted(members, key=lambda m: -abs(m.peak_z))
    centre = _meeting_node(reach, sorted({row_of[m.place] for m in members}),
                           by_strength[0].place, by_total=True)
    _, pred = graph.tree_to(centre, LINK_HOPS[network])
    segments: set[int] = set()
    for m in members:
        segments.update(graph.path_to_root(pred, m.place))
    # The pipe leaving the centre towards the strongest signal (the next strongest if the
    # centre is the strongest sensor itself).
    towards = next((m for m in by_strength if m.place != centre), None)
    path = graph.path_to_root(pred, towards.place) if towards else []
    source = path[-1] if path else min(graph.segments_touching(centre))
    return Zone(members, source, sorted(segments | {source}))


async def group_runs(conn: AsyncConnection, network: str,
                     runs: list[SensorRun]) -> tuple[list[Zone], dict]:
    """Zones of runs linked along the pipe graph, and the sensors' details by id."""
    if not runs:
        return [], {}
    sensors = {row.id: row for row in await conn.execute(
        _SENSORS, {"ids": sorted({r.sensor_id for r in runs})})}
    graph = await load_graph(conn, network)
    # A sensor sits at its node; a flow meter at the upstream end of its segment. A sensor
    # whose node no pipe of the network touches cannot be placed in a zone.
    placed = []
    for run in runs:
        sensor = sensors[run.sensor_id]
        place = graph.index(sensor.node_id if sensor.node_id is not None else sensor.from_node)
        if place is not None:
            placed.append(replace(run, place=place))
    if not placed:
        return [], sensors
    places = np.unique([r.place for r in placed])
    row_of = {int(p): k for k, p in enumerate(places)}
    reach = graph.reach(places, LINK_HOPS[network])
    first, second = _linked_pairs(graph, placed, places, reach)
    links = csr_matrix((np.ones(first.size), (first, second)), shape=(len(placed),) * 2)
    count, label = connected_components(links, directed=False)
    on_segment = {s.id: s.segment_id for s in sensors.values() if s.segment_id is not None}
    zones = []
    for k in range(count):
        members = [placed[m] for m in np.flatnonzero(label == k)]
        zones.append(_drainage_zone(graph, members, reach, row_of, on_segment)
                     if graph.directed else _pressure_zone(graph, members, reach, row_of, network))
    return zones, sensors


# ------------------------------------------------------------------ what a zone touches

# {zone_scope}, {community_scope}, {risk_scope}, {building_scope}: the caller's
# jurisdiction (twin/core/scope.py), fixed SQL with bound values.
_IMPACT = """
    WITH zone AS (
        SELECT z.zone,
               ST_Buffer(ST_Union(s.geom)::geography, :buffer_m)::geometry AS geom
          FROM unnest(CAST(:zones AS int[]), CAST(:segments AS bigint[])) AS z(zone, segment)
          JOIN pipe_segments AS s ON s.id = z.segment
         GROUP BY z.zone
    )
    SELECT z.zone, ST_AsGeoJSON(z.geom, 7) AS geometry, {zone_scope} AS in_scope,
           (SELECT coalesce(jsonb_agg(jsonb_build_object(
                       'code', a.code, 'name_zh', a.name_zh, 'name_en', a.name_en)
                       ORDER BY a.code), '[]'::jsonb)
              FROM admin_units AS a
             WHERE a.level = 'community' AND ST_Intersects(a.geom, z.geom){community_scope})
               AS communities,
           (SELECT jsonb_build_object(
                       'count', count(*),
                       'ids', coalesce(jsonb_agg(r.id ORDER BY r.id), '[]'::jsonb),
                       'by_level', jsonb_build_object(
                           '1', count(*) FILTER (WHERE r.level = 1),
                           '2', count(*) FILTER (WHERE r.level = 2),
                           '3', count(*) FILTER (WHERE r.level = 3),
                           '4', count(*) FILTER (WHERE r.level = 4)))
              FROM risk_points AS r WHERE ST_Intersects(r.geom, z.geom){risk_scope})
               AS risk_points,
           (SELECT count(*) FROM buildings AS b
             WHERE ST_Intersects(b.geom, z.geom){building_scope}) AS buildings
      FROM zone AS z
"""


async def zone_impacts(conn: AsyncConnection, zones: list[Zone],
                       scope: Scope = CITY) -> dict[int, Row[Any]]:
    zone_of, segment_of = [], []
    for k, zone in enumerate(zones):
        zone_of += [k] * len(zone.segment_ids)
        segment_of += zone.segment_ids
    if not segment_of:
        return {}
    parts = {"zone_scope": spatial_predicate(scope, "z.geom", "scope_z"),
             "community_scope": table_predicate(scope, "admin_units", "a", "scope_a"),
             "risk_scope": table_predicate(scope, "risk_points", "r", "scope_r"),
             "building_scope": table_predicate(scope, "buildings", "b", "scope_b")}
    query = _IMPACT.format(**{key: (part.sql if key == "zone_scope" else part.and_sql)
                              for key, part in parts.items()})
    params = {"zones": zone_of, "segments": segment_of, "buffer_m": BUFFER_M}
    for part in parts.values():
        params |= part.params
    rows = await conn.execute(text(query), params)
    return {row.zone: row for row in rows}


# ------------------------------------------------------------------ the answer

def _instant(us: int, tz) -> str:
    return datetime.fromtimestamp(us / 1_000_000, tz=tz).isoformat()


def severity_level(z: float) -> str:
    return next(word for floor, word in SEVERITY_LEVELS if abs(z) >= floor)


def _zone_feature(zone: Zone, impact, sensors: dict, network: str, tz) -> dict:
    peak = max((r.peak_z for r in zone.runs), key=abs)
    start = min(r.start_us for r in zone.runs)
    end = max(r.end_us for r in zone.runs)
    zone_id = f"{network}-{zone.source_segment_id}-{_instant(start, UTC)[:16]}"
    sensor_runs = [{
        "id": r.sensor_id, "code": sensors[r.sensor_id].code, "kind": sensors[r.sensor_id].kind,
        "start": _instant(r.start_us, tz), "end": _instant(r.end_us, tz),
        "readings": r.readings, "peak_z": round(r.peak_z, 2), "baseline": r.median,
    } for r in sorted(zone.runs, key=lambda r: r.sensor_id)]
    return {
        "type": "Feature",
        "id": zone_id,
        "geometry": json.loads(impact.geometry),
        "properties": {
            "id": zone_id,
            "network": network,
            "severity": round(abs(peak), 1),
            "severity_level": severity_level(peak),
            "start": _instant(start, tz),
            "end": _instant(end, tz),
            "source_segment_id": zone.source_segment_id,
            "affected_segment_ids": zone.segment_ids,
            "sensor_ids": sorted({r.sensor_id for r in zone.runs}),
            "sensors": sensor_runs,
            "communities": impact.communities,
            "risk_points": impact.risk_points,
            "buildings": {"count": impact.buildings},
        },
    }


async def pipe_anomalies(conn: AsyncConnection, network: str, since: str | None = None,
                         until: str | None = None, scope: Scope = CITY) -> dict:
    """Anomaly zones on ``network`` between ``since`` and ``until`` (ISO 8601 with offset)
    that meet the caller's scope.

    Times in the answer carry the caller's offset (``until``'s, else ``since``'s, else UTC).
    """
    check_network(network)
    window = await query_window(conn, network, since, until)
    query = {"network": network, "z_threshold": Z_THRESHOLD, "min_readings": MIN_READINGS,
             "link_hops": LINK_HOPS[network], "buffer_m": BUFFER_M}
    if window is None:
        return {"type": "FeatureCollection", "query": query | {"since": None, "until": None},
                "features": [], "numberReturned": 0}
    start, end = window
    tz = end.tzinfo if until is not None else start.tzinfo if since is not None else UTC
    readings = await fetch_readings(conn, network, min(start, end - BASELINE), end)
    runs = persistent_runs(readings, start)
    zones, sensors = await group_runs(conn, network, runs)
    impacts = await zone_impacts(conn, zones, scope)
    features = [_zone_feature(zone, impacts[k], sensors, network, tz)
                for k, zone in enumerate(zones) if impacts[k].in_scope]
    features.sort(key=lambda f: (f["properties"]["start"], f["id"]))
    return {
        "type": "FeatureCollection",
        "query": query | {"since": start.astimezone(tz).isoformat(),
                          "until": end.astimezone(tz).isoformat()},
        "features": features,
        "numberReturned": len(features),
    }

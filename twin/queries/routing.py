"""The nearest response teams to a spot by road: travel time over the pgRouting graph.

Teams drive *to* the incident, so costs are taken in that direction: one many-to-one
``pgr_dijkstra`` from every candidate team's road node to the incident's road node, over the
directed graph (``cost_s`` along an edge, ``reverse_cost_s`` against it; a negative cost
closes that direction).

Assumptions, stated because they shape the answer:

* **Snapping.** A team and the incident are each joined to the road node nearest to them
  (geodesic metres, among the KNN index's nearest few by ``<->``). That leg is covered in a
  straight line at ``SNAP_SPEED_KMH`` (15 km/h: leaving a yard or walking/driving slowly
  through a compound to the road) and is added to the travel time and network distance.
* **Candidates.** Only the ``max(4·k, 20)`` teams nearest in a straight line are routed (all
  teams of the type when there are fewer). A team further away in a straight line could in
  principle be quicker by road (an expressway, a bridge); 4·k keeps that rare at city scale
  and bounds the routing work. ``candidates_per_k`` makes the trade visible to callers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from twin.core.errors import InvalidParameter
from twin.core.principal import CITY, Scope
from twin.core.scope import team_predicate
from twin.queries.nearest import Team, check_nearest, check_point

SNAP_SPEED_KMH = 15.0
MIN_CANDIDATES = 20
CANDIDATES_PER_K = 4
MAX_MINUTES = 24 * 60
# The KNN index orders by planar degrees; the geodesic nearest node is among these.
SNAP_CANDIDATES = 16
STATUSES = ("ok", "beyond_cutoff", "unreachable")

EDGES_SQL = ("SELECT id, source, target, cost_s AS cost, reverse_cost_s AS reverse_cost "
             "FROM road_edges")


def check_max_minutes(max_minutes: float | None) -> None:
    if max_minutes is not None and not 0 < max_minutes <= MAX_MINUTES:
        raise InvalidParameter(f"max_minutes: must be a number of minutes in (0, {MAX_MINUTES}]"
                               f", got {max_minutes}")


def snap_seconds(metres: float) -> float:
    return metres / (SNAP_SPEED_KMH / 3.6)


@dataclass(frozen=True)
class RoadTeam(Team):
    # 'ok', 'beyond_cutoff' (reachable, slower than max_minutes) or 'unreachable'
    route_status: str
    travel_time_s: float | None
    network_distance_m: float | None
    road_node: int
    snap_m: float
    route: dict | None = None


_SNAP_INCIDENT = text(f"""
    SELECT n.id, ST_Distance(n.geom::geography, p.geom::geography) AS snap_m
      FROM (SELECT ST_SetSRID(ST_MakePoint(:lon, :lat), 4326) AS geom) AS p,
           LATERAL (SELECT id, geom FROM road_nodes
                     ORDER BY geom <-> p.geom LIMIT {SNAP_CANDIDATES}) AS n
     ORDER BY snap_m, n.id
     LIMIT 1
""")

# {{scope}}: the caller's teams (twin/core/scope.py), a fixed predicate with bound values.
# Teams drive over the whole road graph: a route may leave the jurisdiction.
_CANDIDATES = f"""
    WITH p AS (SELECT ST_SetSRID(ST_MakePoint(:lon, :lat), 4326) AS geom),
    candidates AS (
        SELECT t.*
          FROM response_teams AS t, p
         WHERE (CAST(:team_type AS text) IS NULL OR t.team_type = :team_type){{scope}}
         ORDER BY t.geom <-> p.geom
         LIMIT :candidates
    )
    SELECT c.id, c.code, c.name_zh, c.name_en, c.team_type, c.status, c.headcount, c.phone,
           c.district_code, ST_X(c.geom) AS lon, ST_Y(c.geom) AS lat,
           ST_Distance(c.geom::geography, p.geom::geography) AS distance_m,
           s.id AS road_node, s.snap_m
      FROM candidates AS c, p,
           LATERAL (SELECT n.id, ST_Distance(n.geom::geography, c.geom::geography) AS snap_m
                      FROM (SELECT id, geom FROM road_nodes
                             ORDER BY geom <-> c.geom LIMIT {SNAP_CANDIDATES}) AS n
                     ORDER BY snap_m, n.id
                     LIMIT 1) AS s
"""

# One many-to-one Dijkstra; a start equal to the target yields no rows (handled in Python).
_PATHS = text("""
    SELECT d.start_vid, sum(d.cost) AS travel_s, sum(e.length_m) AS length_m,
           CASE WHEN :route THEN ST_AsGeoJSON(ST_MakeLine(
               CASE WHEN e.source = d.node THEN e.geom ELSE ST_Reverse(e.geom) END
               ORDER BY d.path_seq), 7) END AS route
      FROM pgr_dijkstra(:edges_sql, CAST(:starts AS bigint[]), CAST(:target AS bigint),
                        directed => true) AS d
      JOIN road_edges AS e ON e.id = d.edge
     GROUP BY d.start_vid
""")


async def snap_to_road(conn: AsyncConnection, lon: float, lat: float):
    """The road node nearest to (lon, lat) by the rule above: a row (id, snap_m), or None."""
    return (await conn.execute(_SNAP_INCIDENT, {"lon": lon, "lat": lat})).first()


def _route_geojson(team_lonlat, path_geojson: str | None, incident_lonlat) -> dict:
    """Team -> its road node -> ... -> the incident's road node -> the incident."""
    coords = [list(team_lonlat)]
    if path_geojson:
        coords += json.loads(path_geojson)["coordinates"]
    coords.append(list(incident_lonlat))
    deduped = [c for i, c in enumerate(coords) if i == 0 or c != coords[i - 1]]
    if len(deduped) == 1:
        deduped.append(deduped[0])
    return {"type": "LineString", "coordinates": deduped}


async def nearest_teams_by_road(conn: AsyncConnection, lon: float, lat: float, k: int = 5,
                                team_type: str | None = None, max_minutes: float | None = None,
                                route: bool = False, scope: Scope = CITY) -> list[RoadTeam]:
    """The k teams quickest to reach (lon, lat) by road, quickest first.

    Teams beyond ``max_minutes`` rank after those within it (they are still quicker than
    the unreachable ones, which come last, nearest in a straight line first).
    """
    check_point(lon, lat)
    check_nearest(k, team_type, "road")
    check_max_minutes(max_minutes)
    incident = (await conn.execute(_SNAP_INCIDENT, {"lon": lon, "lat": lat})).first()
    if incident is None:
        return []  # no road graph loaded
    in_scope = team_predicate(scope, "t")
    candidates = (await conn.execute(text(_CANDIDATES.format(scope=in_scope.and_sql)), {
        "lon": lon, "lat": lat, "team_type": team_type,
        "candidates": max(CANDIDATES_PER_K * k, MIN_CANDIDATES),
    } | in_scope.params)).mappings().all()
    starts = sorted({row["road_node"] for row in candidates} - {incident.id})
    paths = {}
    if starts:
        rows = await conn.execute(_PATHS, {
            "edges_sql": EDGES_SQL, "starts": starts, "target": incident.id, "route": route,
        })
        paths = {row.start_vid: row for row in rows}

    teams = []
    for row in candidates:
        node = row["road_node"]
        travel_s = length_m = path_geojson = None
        if node == incident.id:
            travel_s, length_m = 0.0, 0.0
        elif node in paths:
            path = paths[node]
            travel_s, length_m, path_geojson = path.travel_s, path.length_m, path.route
        if travel_s is None:
            status = "unreachable"
        else:
            travel_s += snap_seconds(row["snap_m"]) + snap_seconds(incident.snap_m)
            length_m += row["snap_m"] + incident.snap_m
            status = ("beyond_cutoff" if max_minutes is not None and travel_s > max_minutes * 60
                      else "ok")
        geometry = (_route_geojson((row["lon"], row["lat"]), path_geojson, (lon, lat))
                    if route and status != "unreachable" else None)
        teams.append(RoadTeam(**row, route_status=status, travel_time_s=travel_s,
                              network_distance_m=length_m, route=geometry))
    teams.sort(key=lambda t: (STATUSES.index(t.route_status),
                              t.travel_time_s if t.travel_time_s is not None else t.distance_m,
                              t.id))
    return teams[:k]

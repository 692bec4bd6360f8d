"""Coverage gaps: the risk points that no team of a type reaches within a time budget by road.

Teams drive *to* the points (``cost_s`` along an edge, ``reverse_cost_s`` against it, negative
= closed), with the snapping rule of nearest-teams (twin/queries/routing.py): a team and a
point each join the graph at the road node nearest to them in geodesic metres, a straight leg
at ``SNAP_SPEED_KMH``. A point's time is therefore

    min over teams (team snap leg + road time team node -> point node) + point snap leg

and every team enters one ``pgr_drivingDistance`` run through a virtual source (vertex -1;
road node ids are positive) joined to each team's node by an edge costing that team's snap
leg, so the run returns, for every road node, the quickest team's arrival time.

120,000 points are snapped in Python, not by a KNN lateral join per point (seconds at full
scale): a k-d tree over earth-centred (ECEF) coordinates gives each point's 8 nearest nodes
by chord length, which orders points on the ellipsoid like geodesic distance to within a
fraction of a percent, and pyproj's geodesic (Karney) picks the nearest of those, ties to the
lower node id, as routing.py does with its 16 KNN candidates.

Teams count whatever their status (standby, dispatched, off duty): coverage is a question
about where teams are stationed, not about who is free right now.

In a district's or street's jurisdiction both sides are the caller's: its risk points (by
their grid) and its teams (stationed in it or answering for one of its streets; see
twin/core/scope.py), because a district centre plans with the teams it dispatches. The
teams still drive over the whole road graph.
"""

from __future__ import annotations

import json
import math

import numpy as np
from pyproj import Geod
from scipy.spatial import cKDTree
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from twin.core.errors import InvalidParameter
from twin.core.models import TEAM_TYPES
from twin.core.principal import CITY, Scope
from twin.core.scope import code_predicate, team_predicate
from twin.queries.routing import EDGES_SQL, MAX_MINUTES, SNAP_SPEED_KMH

SNAP_CANDIDATES = 8
DEFAULT_LIMIT = 1000
MAX_LIMIT = 200_000
VIRTUAL_SOURCE = -1
GEOD = Geod(ellps="WGS84")
# WGS84 semi-major axis and first eccentricity squared.
_A = 6_378_137.0
_E2 = (1 / 298.257223563) * (2 - 1 / 298.257223563)


def check_coverage(team_type: str, minutes: float, limit: int) -> None:
    if team_type not in TEAM_TYPES:
        raise InvalidParameter(f"team_type: unknown team type {team_type!r}; "
                               f"allowed: {', '.join(TEAM_TYPES)}")
    if not (math.isfinite(minutes) and 0 < minutes <= MAX_MINUTES):
        raise InvalidParameter(f"minutes: must be a number of minutes in (0, {MAX_MINUTES}]"
                               f", got {minutes}")
    if not 0 <= limit <= MAX_LIMIT:
        raise InvalidParameter(f"limit: must be between 0 and {MAX_LIMIT} features, got {limit}")


def _ecef(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    lam, phi = np.radians(lon), np.radians(lat)
    n = _A / np.sqrt(1 - _E2 * np.sin(phi) ** 2)
    return np.column_stack((n * np.cos(phi) * np.cos(lam), n * np.cos(phi) * np.sin(lam),
                            n * (1 - _E2) * np.sin(phi)))


class RoadSnapper:
    """Nearest road node (geodesic metres) for many points at once."""

    def __init__(self, node_ids: np.ndarray, lon: np.ndarray, lat: np.ndarray):
        self.node_ids, self.lon, self.lat = node_ids, lon, lat
        self.tree = cKDTree(_ecef(lon, lat))

    def snap(self, lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index into the nodes, metres) of the node nearest to each point."""
        k = min(SNAP_CANDIDATES, len(self.node_ids))
        _, cand = self.tree.query(_ecef(lon, lat), k=k)
        cand = cand.reshape(len(lon), k)
        _, _, metres = GEOD.inv(np.repeat(lon, k), np.repeat(lat, k),
                                self.lon[cand].ravel(), self.lat[cand].ravel())
        metres = metres.reshape(len(lon), k)
        nearest = metres == metres.min(axis=1, keepdims=True)
        ids = np.where(nearest, self.node_ids[cand], np.iinfo(np.int64).max)
        best = np.argmin(ids, axis=1)
        rows = np.arange(len(lon))
        return cand[rows, best], metres[rows, best]


_NODES = text("SELECT array_agg(id ORDER BY id) AS ids, array_agg(ST_X(geom) ORDER BY id) AS lon, "
              "array_agg(ST_Y(geom) ORDER BY id) AS lat FROM road_nodes")
# {scope}: the caller's teams or points (twin/core/scope.py), fixed SQL, bound values.
_TEAMS = ("SELECT array_agg(ST_X(geom)) AS lon, array_agg(ST_Y(geom)) AS lat "
          "FROM response_teams WHERE team_type = :team_type{scope}")
_POINTS = ("SELECT array_agg(id) AS ids, array_agg(level) AS level, "
           "array_agg(left(grid_code, 6)) AS district, array_agg(ST_X(geom)) AS lon, "
           "array_agg(ST_Y(geom)) AS lat FROM risk_points WHERE TRUE{scope}")
# Every team's snap leg is an edge out of the virtual source; format(%L) quotes the arrays.
_ARRIVALS = text("""
    SELECT node, agg_cost
      FROM pgr_drivingDistance(
               :edges_sql || format(' UNION ALL SELECT -v.ord, %s::bigint, v.node, v.cost, '
                                    '-1::float8 FROM unnest(%L::bigint[], %L::float8[]) '
                                    'WITH ORDINALITY AS v(node, cost, ord)',
                                    CAST(:source AS bigint), CAST(:nodes AS bigint[]),
                                    CAST(:costs AS float8[])),
               CAST(:source AS bigint), CAST(:budget AS float8), directed => true)
""")
_DISTRICTS = text("SELECT code, name_zh, name_en FROM admin_units WHERE level = 'district'")
_DETAILS = text("""
    SELECT id, code, name, sector_code, category, level, grid_code, ST_AsGeoJSON(geom, 7) AS geom
      FROM risk_points WHERE id = ANY(CAST(:ids AS bigint[]))
""")


def _array(values, dtype) -> np.ndarray:
    return np.asarray(values if values is not None else [], dtype=dtype)


async def _arrival_times(conn: AsyncConnection, snapper: RoadSnapper, team_type: str,
                         budget_s: float, scope: Scope = CITY) -> tuple[np.ndarray, int]:
    """Seconds from the quickest team to every road node (inf beyond the budget); team count."""
    in_scope = team_predicate(scope)
    teams = (await conn.execute(text(_TEAMS.format(scope=in_scope.and_sql)),
                                {"team_type": team_type} | in_scope.params)).one()
    times = np.full(len(snapper.node_ids), np.inf)
    if teams.lon is None:
        return times, 0
    at, metres = snapper.snap(_array(teams.lon, float), _array(teams.lat, float))
    rows = await conn.execute(_ARRIVALS, {
        "edges_sql": EDGES_SQL, "source": VIRTUAL_SOURCE, "budget": budget_s,
        "nodes": snapper.node_ids[at].tolist(),
        "costs": (metres / (SNAP_SPEED_KMH / 3.6)).tolist(),
    })
    arrivals = np.array([(node, cost) for node, cost in rows if node != VIRTUAL_SOURCE],
                        dtype=float).reshape(-1, 2)
    times[np.searchsorted(snapper.node_ids, arrivals[:, 0].astype(np.int64))] = arrivals[:, 1]
    return times, len(teams.lon)


def _by_district(district: np.ndarray, level: np.ndarray, uncovered: np.ndarray,
                 names: dict) -> list[dict]:
    codes, inverse = np.unique(district, return_inverse=True)
    totals = np.bincount(inverse, minlength=len(codes))
    counts = np.zeros((len(codes), 4), dtype=int)
    np.add.at(counts, (inverse[uncovered], level[uncovered] - 1), 1)
    return [{"code": code, **names.get(code, {"name_zh": None, "name_en": None}),
             "risk_points": int(totals[i]), "uncovered": int(counts[i].sum()),
             "uncovered_by_level": {str(lv): int(counts[i, lv - 1]) for lv in range(1, 5)}}
            for i, code in enumerate(codes.tolist())]


async def coverage(conn: AsyncConnection, team_type: str, minutes: float,
                   limit: int = DEFAULT_LIMIT, scope: Scope = CITY) -> dict:
    """Uncovered risk points of the scope, counted by district and level (over all its
    points), as GeoJSON (the first ``limit``, most severe level first)."""
    check_coverage(team_type, minutes, limit)
    budget_s = minutes * 60
    nodes = (await conn.execute(_NODES)).one()
    in_scope = code_predicate(scope, "grid_code")
    points = (await conn.execute(text(_POINTS.format(scope=in_scope.and_sql)),
                                 in_scope.params)).one()
    ids, level = _array(points.ids, np.int64), _array(points.level, np.int64)
    district = _array(points.district, object)
    uncovered = np.ones(len(ids), dtype=bool)
    point_times = np.full(len(ids), np.inf)
    teams = 0
    if nodes.ids is not None and len(ids):
        snapper = RoadSnapper(_array(nodes.ids, np.int64), _array(nodes.lon, float),
                              _array(nodes.lat, float))
        node_times, teams = await _arrival_times(conn, snapper, team_type, budget_s, scope)
        at, metres = snapper.snap(_array(points.lon, float), _array(points.lat, float))
        point_times = node_times[at] + metres / (SNAP_SPEED_KMH / 3.6)
        uncovered = ~(point_times <= budget_s)
    names = {row.code: {"name_zh": row.name_zh, "name_en": row.name_en}
             for row in await conn.execute(_DISTRICTS)}
    features = await _features(conn, ids, level, point_times, uncovered, limit)
    by_level = np.bincount(level[uncovered], minlength=5)[1:5]
    return {
        "type": "FeatureCollection",
        "query": {"team_type": team_type, "minutes": minutes, "limit": limit,
                  "direction": "teams to points", "snap_speed_kmh": SNAP_SPEED_KMH},
        "summary": {"teams": teams, "risk_points": len(ids),
                    "covered": int(len(ids) - uncovered.sum()),
                    "uncovered": int(uncovered.sum()),
                    "uncovered_by_level": {str(lv): int(by_level[lv - 1]) for lv in range(1, 5)},
                    "by_district": _by_district(district, level, uncovered, names)},
        "features": features,
        "numberMatched": int(uncovered.sum()),
        "numberReturned": len(features),
    }


async def _features(conn: AsyncConnection, ids, level, point_times, uncovered,
                    limit: int) -> list[dict]:
    order = np.lexsort((ids[uncovered], level[uncovered]))[:limit]
    chosen = ids[uncovered][order]
    if not len(chosen):
        return []
    seconds = dict(zip(chosen.tolist(), point_times[uncovered][order].tolist(), strict=True))
    rows = {row.id: row for row in await conn.execute(_DETAILS, {"ids": chosen.tolist()})}
    features = []
    for point_id in chosen.tolist():
        row = rows[point_id]
        best = seconds[point_id]
        features.append({
            "type": "Feature", "id": point_id, "geometry": json.loads(row.geom),
            "properties": {"code": row.code, "name": row.name, "sector_code": row.sector_code,
                           "category": row.category, "level": row.level,
                           "grid_code": row.grid_code, "district_code": row.grid_code[:6],
                           # null: no team of the type reaches the point's road node in time
                           "travel_time_s": best if math.isfinite(best) else None},
        })
    return features

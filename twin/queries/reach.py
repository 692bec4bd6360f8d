"""The area reachable from a spot within a time budget by road (an isochrone), and what is in it.

Direction: **outward from the incident**: a crew at the spot sets off (``cost_s`` along an
edge, ``reverse_cost_s`` against it, a negative cost closes that direction), the way a
command hall asks "what can we get to within 10 minutes from here".

The model is the one nearest-teams uses (twin/queries/routing.py): the spot joins the road
graph at its nearest road node, a straight leg at ``SNAP_SPEED_KMH``; ``pgr_drivingDistance``
then gives the arrival time ``t(n)`` at every road node within the rest of the budget ``T``.
The area is the union of

* a disc around the spot of radius ``T · v`` (leaving on foot or slowly, ``v`` = snap speed),
* a disc around every reached node of radius ``(T − t(n)) · v``: getting off the road there
  and covering the remaining time in a straight line at the same speed, and
* every reached stretch of road, partially reached edges cut with ``ST_LineSubstring`` at the
  fraction of their travel time the budget leaves (in proportion to the line's length in
  degrees, a close stand-in for metres along one edge), buffered by ``ROADSIDE_M`` on each
  side (the roadside a crew reaches from the vehicle).

Buffers are built in an azimuthal equidistant projection centred on the spot (metres; its
distortion is below 0.05 % within 300 km): discs as 32-gons (within 0.5 % of the model's
circles), road bands with octagonal caps. The summary counts what lies in the polygon as built;
the GeoJSON is rounded to 7 decimals (about 1 cm).

Nearest-teams and coverage join a *destination* to its own nearest node only; this area is a
little more generous (a spot within the remaining straight leg of *any* reached node counts),
which is what "where can we get to" means on foot from the road.
"""

from __future__ import annotations

import json
import math

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from twin.core.errors import InvalidParameter
from twin.core.principal import CITY, Scope
from twin.queries.impact import Area, area_summary
from twin.queries.nearest import check_point
from twin.queries.routing import EDGES_SQL, SNAP_SPEED_KMH, snap_seconds, snap_to_road

ROADSIDE_M = 100.0
# The area's cost grows with the roads reached: about 0.2 s at 10 minutes and 2 s at 30
# in the full sample city.
MAX_REACH_MINUTES = 60
MODES = ("road",)

_AREA = text("""
WITH dd AS (
    SELECT node, agg_cost + :snap_s AS t
      FROM pgr_drivingDistance(:edges_sql, CAST(:node AS bigint), CAST(:road_budget AS float8),
                               directed => true)
     WHERE agg_cost + :snap_s <= :budget
),
reached AS (SELECT n.id, n.geom, d.t FROM dd AS d JOIN road_nodes AS n ON n.id = d.node),
-- The share of each edge's travel time the budget still covers from either reached end
-- (a zero-cost edge is covered whole: LEAST ignores the NULL).
touched AS (
    SELECT e.geom,
           CASE WHEN e.cost_s >= 0 AND s.t IS NOT NULL
                THEN LEAST(1, (:budget - s.t) / NULLIF(e.cost_s, 0)) ELSE 0 END AS f_source,
           CASE WHEN e.reverse_cost_s >= 0 AND r.t IS NOT NULL
                THEN LEAST(1, (:budget - r.t) / NULLIF(e.reverse_cost_s, 0)) ELSE 0 END
               AS f_target
      FROM road_edges AS e
      LEFT JOIN reached AS s ON s.id = e.source
      LEFT JOIN reached AS r ON r.id = e.target
     WHERE s.id IS NOT NULL OR r.id IS NOT NULL
),
stretches AS (
    SELECT geom FROM touched WHERE f_source + f_target >= 1
    UNION ALL
    SELECT ST_LineSubstring(geom, 0, f_source) FROM touched
     WHERE f_source + f_target < 1 AND f_source > 0
    UNION ALL
    SELECT ST_LineSubstring(geom, 1 - f_target, 1) FROM touched
     WHERE f_source + f_target < 1 AND f_target > 0
),
pieces AS (
    SELECT ST_Buffer(ST_Transform(ST_SetSRID(ST_MakePoint(:lon, :lat), 4326), :proj),
                     :budget * :speed) AS geom
    UNION ALL
    SELECT ST_Buffer(ST_Transform(geom, :proj), (:budget - t) * :speed)
      FROM reached WHERE t < :budget
    UNION ALL
    -- quad_segs=2: a band's caps and joins are octagon corners; a third of the cost of
    -- round ones, and the node discs cover the junctions anyway.
    SELECT ST_Buffer(ST_Transform(ST_Collect(geom), :proj), :roadside_m, 'quad_segs=2')
      FROM stretches HAVING count(*) > 0
),
area AS (SELECT ST_Transform(ST_Union(geom), :proj, 4326) AS geom FROM pieces)
SELECT ST_AsGeoJSON(geom, 7) AS geometry, ST_AsBinary(geom) AS wkb,
       ST_Area(geom::geography) / 1e6 AS area_km2,
       (SELECT count(*) FROM reached) AS reached_nodes
  FROM area
""")


def check_reach(minutes: float, mode: str) -> None:
    if mode not in MODES:
        raise InvalidParameter(f"mode: {mode!r} is not available; allowed: {', '.join(MODES)}")
    if not (math.isfinite(minutes) and 0 < minutes <= MAX_REACH_MINUTES):
        raise InvalidParameter(f"minutes: must be a number of minutes in "
                               f"(0, {MAX_REACH_MINUTES}], got {minutes}")


def _aeqd(lon: float, lat: float) -> str:
    return f"+proj=aeqd +lat_0={float(lat)!r} +lon_0={float(lon)!r} +datum=WGS84 +units=m +no_defs"


async def reach(conn: AsyncConnection, lon: float, lat: float, minutes: float,
                mode: str = "road", scope: Scope = CITY) -> dict:
    """GeoJSON FeatureCollection: the reachable area first (over the whole road graph), and a
    ``summary`` of its contents in the caller's scope."""
    check_point(lon, lat)
    check_reach(minutes, mode)
    origin = await snap_to_road(conn, lon, lat)
    if origin is None:
        raise InvalidParameter("mode: no road network is loaded, so road reach is unavailable")
    budget_s = minutes * 60
    snap_s = snap_seconds(origin.snap_m)
    row = (await conn.execute(_AREA, {
        "edges_sql": EDGES_SQL, "node": origin.id, "snap_s": snap_s, "budget": budget_s,
        "road_budget": max(budget_s - snap_s, 0.0), "lon": lon, "lat": lat,
        "proj": _aeqd(lon, lat), "speed": SNAP_SPEED_KMH / 3.6, "roadside_m": ROADSIDE_M,
    })).one()
    summary = await area_summary(conn, Area(wkb=bytes(row.wkb)), scope)
    area = {"type": "Feature", "id": "area", "geometry": json.loads(row.geometry),
            "properties": {"layer": "area", "minutes": minutes, "area_km2": row.area_km2,
                           "origin_road_node": origin.id, "snap_m": origin.snap_m,
                           "reached_road_nodes": row.reached_nodes}}
    return {"type": "FeatureCollection",
            "query": {"lon": lon, "lat": lat, "minutes": minutes, "mode": mode,
                      "direction": "outward", "snap_speed_kmh": SNAP_SPEED_KMH,
                      "roadside_m": ROADSIDE_M},
            "summary": summary, "features": [area], "numberReturned": 1}

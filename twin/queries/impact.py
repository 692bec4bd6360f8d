"""What lies inside an area: risk points, hazard sources and buildings (``impact`` and ``reach``).

An area is either a polygon (EPSG:4326) or a geodesic circle (a centre and a radius in metres).
A circle is tested exactly on the WGS84 ellipsoid (``ST_DWithin`` on geography); its polygon
(PostGIS's geography buffer, a 32-gon) is only drawn, and a slightly larger one serves the
index lookup. Buildings count when any part of their footprint lies in the area; their floor
area is footprint area (geodesic m²) times floors. Only what lies in the caller's
jurisdiction is counted or returned (twin/core/scope.py); the area itself is drawn whole.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import shapely
from shapely.geometry import shape
from sqlalchemy import TextClause, text
from sqlalchemy.ext.asyncio import AsyncConnection

from twin.core.errors import InvalidParameter
from twin.core.principal import CITY, Scope
from twin.core.scope import table_predicate
from twin.queries.nearest import check_point

MAX_RADIUS_M = 100_000.0
# Features of each kind returned with an impact; the summary always counts every feature.
DEFAULT_FEATURE_LIMIT = 1000
MAX_FEATURE_LIMIT = 10_000
# The index search polygon around a circle: wide enough to hold the 32-gon's chord error
# (0.5 %) and the projection error of the geography buffer.
SEARCH_MARGIN = 1.05
KINDS = ("risk_points", "hazard_sources", "buildings")


@dataclass(frozen=True)
class Area:
    """A polygon (``wkb``, EPSG:4326) or a geodesic circle (``lon``, ``lat``, ``radius_m``)."""

    wkb: bytes | None = None
    lon: float | None = None
    lat: float | None = None
    radius_m: float | None = None

    @property
    def is_circle(self) -> bool:
        return self.radius_m is not None

    def params(self) -> dict:
        if self.is_circle:
            return {"lon": self.lon, "lat": self.lat, "radius_m": self.radius_m,
                    "margin": SEARCH_MARGIN}
        return {"wkb": self.wkb}


# CTEs ``area(geom)`` (drawn) and ``parts(geom, center, radius_m)`` (searched). A polygon is
# searched as ST_Subdivide pieces of at most 256 vertices: each piece's bbox narrows the
# index scan and its point-in-polygon tests are short (twice as quick as one reach polygon
# with thousands of vertices); a feature on two pieces is counted once (DISTINCT).
_POLYGON_CTE = """area AS (SELECT ST_GeomFromWKB(:wkb, 4326) AS geom),
parts AS (SELECT ST_Subdivide(geom, 256) AS geom, NULL::geography AS center,
                 NULL::float8 AS radius_m FROM area)"""
_CIRCLE_CTE = """circle AS (SELECT ST_SetSRID(ST_MakePoint(:lon, :lat), 4326)::geography AS c),
area AS (SELECT ST_Buffer(c, :radius_m)::geometry AS geom FROM circle),
parts AS (SELECT ST_Buffer(c, :radius_m * :margin)::geometry AS geom, c AS center,
                 CAST(:radius_m AS float8) AS radius_m FROM circle)"""
_IN_POLYGON = "ST_Intersects(x.geom, p.geom)"
_IN_CIRCLE = "ST_DWithin(x.geom::geography, p.center, p.radius_m)"


# A footprint's area in m²: its area in square degrees times the WGS84 ellipsoid's scale at
# its latitude (radians(1)² · M · N · cos φ, M and N the meridian and prime-vertical radii).
# Exact to 1e-6 for a building-sized polygon and ten times quicker than ST_Area(geography).
_FOOTPRINT_M2 = """(ST_Area(x.geom) * radians(1) ^ 2 * (
    SELECT 6378137.0 ^ 2 * (1 - 0.00669437999014) * cos(radians(phi))
           / (1 - 0.00669437999014 * sin(radians(phi)) ^ 2) ^ 2
      FROM (SELECT (ST_YMin(x.geom::box2d) + ST_YMax(x.geom::box2d)) / 2 AS phi) AS lat))"""


def _sql(area: Area, body: str, scope: Scope = CITY) -> tuple[TextClause, dict]:
    """Splice the fixed fragments above into ``body`` (never user input); the statement
    and its bound values (the area's and the scope's)."""
    cte = _CIRCLE_CTE if area.is_circle else _POLYGON_CTE
    inside = _IN_CIRCLE if area.is_circle else _IN_POLYGON
    body = body.replace("{inside}", inside).replace("{footprint_m2}", _FOOTPRINT_M2)
    params = area.params()
    for kind in KINDS:
        in_scope = table_predicate(scope, kind, "x", f"scope_{kind}")
        body = body.replace(f"{{in_scope_{kind}}}", in_scope.and_sql)
        params |= in_scope.params
    return text(f"WITH {cte}{body}"), params


_SUMMARY = """,
risk AS (SELECT DISTINCT x.id, x.sector_code, x.level
           FROM risk_points AS x JOIN parts AS p ON x.geom && p.geom AND {inside}
          WHERE TRUE{in_scope_risk_points}),
hazards AS (SELECT DISTINCT x.id, x.kind
              FROM hazard_sources AS x JOIN parts AS p ON x.geom && p.geom AND {inside}
             WHERE TRUE{in_scope_hazard_sources}),
blds AS (SELECT DISTINCT x.id, x.use, x.floors, {footprint_m2} AS footprint_m2
           FROM buildings AS x JOIN parts AS p ON x.geom && p.geom AND {inside}
          WHERE TRUE{in_scope_buildings})
SELECT
    (SELECT count(*) FROM risk) AS risk_total,
    (SELECT json_object_agg(s.code, (SELECT count(*) FROM risk WHERE sector_code = s.code)
                            ORDER BY s.sort_order) FROM sectors AS s) AS risk_by_sector,
    (SELECT json_object_agg(l, (SELECT count(*) FROM risk WHERE level = l) ORDER BY l)
       FROM generate_series(1, 4) AS l) AS risk_by_level,
    (SELECT count(*) FROM hazards) AS hazard_total,
    (SELECT coalesce(json_object_agg(kind, n ORDER BY kind), '{}')
       FROM (SELECT kind, count(*) AS n FROM hazards GROUP BY kind) AS k) AS hazard_by_kind,
    (SELECT count(*) FROM blds) AS building_total,
    (SELECT coalesce(sum(footprint_m2), 0) FROM blds) AS footprint_m2,
    (SELECT coalesce(sum(footprint_m2 * floors), 0) FROM blds) AS floor_area_m2,
    (SELECT coalesce(json_object_agg(use, n ORDER BY use), '{}')
       FROM (SELECT use, count(*) AS n FROM blds GROUP BY use) AS u) AS building_by_use
"""


async def area_summary(conn: AsyncConnection, area: Area, scope: Scope = CITY) -> dict:
    """Counts of what lies inside ``area`` and the scope (every feature, never truncated)."""
    row = (await conn.execute(*_sql(area, _SUMMARY, scope))).mappings().one()
    return {
        "risk_points": {"total": row["risk_total"], "by_sector": row["risk_by_sector"],
                        "by_level": row["risk_by_level"]},
        "hazard_sources": {"total": row["hazard_total"], "by_kind": row["hazard_by_kind"]},
        "buildings": {"total": row["building_total"], "by_use": row["building_by_use"],
                      "footprint_m2": round(row["footprint_m2"], 1),
                      "floor_area_m2": round(row["floor_area_m2"], 1)},
    }


_FEATURES = {
    "risk_points": """
SELECT x.id, ST_AsGeoJSON(x.geom, 7) AS geometry,
       json_build_object('code', x.code, 'name', x.name, 'sector_code', x.sector_code,
                         'category', x.category, 'level', x.level, 'address', x.address,
                         'grid_code', x.grid_code, 'plan_id', x.plan_id) AS properties
  FROM risk_points AS x
 WHERE x.id IN (SELECT x.id FROM risk_points AS x
                  JOIN parts AS p ON x.geom && p.geom AND {inside}
                 WHERE TRUE{in_scope_risk_points})
 ORDER BY x.level, x.id LIMIT :limit""",
    "hazard_sources": """
SELECT x.id, ST_AsGeoJSON(x.geom, 7) AS geometry,
       json_build_object('code', x.code, 'kind', x.kind, 'name', x.name,
                         'gas_threshold_ppm', x.gas_threshold_ppm,
                         'level_threshold_m', x.level_threshold_m,
                         'temp_threshold_c', x.temp_threshold_c) AS properties
  FROM hazard_sources AS x
 WHERE x.id IN (SELECT x.id FROM hazard_sources AS x
                  JOIN parts AS p ON x.geom && p.geom AND {inside}
                 WHERE TRUE{in_scope_hazard_sources})
 ORDER BY x.id LIMIT :limit""",
    "buildings": """
SELECT x.id, ST_AsGeoJSON(x.geom, 7) AS geometry,
       json_build_object('name', x.name, 'use', x.use, 'height_m', x.height_m,
                         'floors', x.floors, 'cim_level', x.cim_level,
                         'district_code', x.district_code) AS properties
  FROM buildings AS x
 WHERE x.id IN (SELECT x.id FROM buildings AS x
                  JOIN parts AS p ON x.geom && p.geom AND {inside}
                 WHERE TRUE{in_scope_buildings})
 ORDER BY x.id LIMIT :limit""",
}


async def area_features(conn: AsyncConnection, area: Area, kind: str, limit: int,
                        scope: Scope = CITY) -> list[dict]:
    """Up to ``limit`` GeoJSON features of one kind inside ``area`` and the scope (risk points
    worst first)."""
    query, params = _sql(area, _FEATURES[kind], scope)
    rows = await conn.execute(query, params | {"limit": limit})
    return [{"type": "Feature", "id": row.id, "geometry": json.loads(row.geometry),
             "properties": {"layer": kind, **row.properties}} for row in rows]


def check_radius(radius_m: float) -> None:
    if not (math.isfinite(radius_m) and 0 < radius_m <= MAX_RADIUS_M):
        raise InvalidParameter(f"radius_m: must be a distance in metres in (0, {MAX_RADIUS_M:g}]"
                               f", got {radius_m}")


def check_limit(limit: int) -> None:
    if not 0 <= limit <= MAX_FEATURE_LIMIT:
        raise InvalidParameter(f"limit: must be between 0 and {MAX_FEATURE_LIMIT} features "
                               f"of each kind, got {limit}")


def circle(lon: float, lat: float, radius_m: float) -> Area:
    check_point(lon, lat)
    check_radius(radius_m)
    return Area(lon=lon, lat=lat, radius_m=radius_m)


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidParameter(f"{name}: must be a number, got {value!r}")
    return float(value)


def _parse_polygon(body: dict) -> shapely.Geometry:
    kind = body.get("type")
    if kind not in ("Polygon", "MultiPolygon"):
        raise InvalidParameter(f"geometry: must be a GeoJSON Polygon or MultiPolygon "
                               f"(EPSG:4326), or {{\"point\": [lon, lat], \"radius_m\": r}}"
                               f"; got type {kind!r}")
    try:
        geometry = shapely.force_2d(shape(body))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError,
            shapely.errors.ShapelyError) as exc:
        raise InvalidParameter(f"geometry: malformed {kind} coordinates ({exc})") from None
    if geometry.is_empty:
        raise InvalidParameter(f"geometry: the {kind} is empty")
    coords = shapely.get_coordinates(geometry)
    if not (coords[:, 0].min() >= -180 and coords[:, 0].max() <= 180
            and coords[:, 1].min() >= -90 and coords[:, 1].max() <= 90):
        raise InvalidParameter("geometry: coordinates must be lon/lat in EPSG:4326 "
                               "(lon in [-180, 180], lat in [-90, 90])")
    return geometry


_CHECK_POLYGON = text("""
    SELECT ST_IsValid(g) AS valid, ST_IsValidReason(g) AS reason,
           ST_Area(g::geography) / 1e6 AS area_km2,
           (SELECT area_km2 FROM admin_units WHERE level = 'city' LIMIT 1) AS city_km2
      FROM (SELECT ST_GeomFromWKB(:wkb, 4326) AS g) AS s
""")


async def area_from_geojson(conn: AsyncConnection, body) -> Area:
    """The area a POST body names: a GeoJSON (Multi)Polygon, a Feature of one, or a circle."""
    if not isinstance(body, dict):
        raise InvalidParameter("geometry: the body must be a JSON object")
    if body.get("type") == "Feature":
        body = body.get("geometry") or {}
    if "point" in body:
        point = body["point"]
        if not (isinstance(point, list) and len(point) == 2):
            raise InvalidParameter(f"point: must be [lon, lat], got {point!r}")
        if "radius_m" not in body:
            raise InvalidParameter("radius_m: required with point")
        return circle(_number(point[0], "point"), _number(point[1], "point"),
                      _number(body["radius_m"], "radius_m"))
    wkb = shapely.to_wkb(_parse_polygon(body))
    check = (await conn.execute(_CHECK_POLYGON, {"wkb": wkb})).one()
    if not check.valid:
        raise InvalidParameter(f"geometry: invalid polygon: {check.reason}")
    if check.city_km2 is not None and check.area_km2 > check.city_km2:
        raise InvalidParameter(f"geometry: the polygon covers {check.area_km2:,.0f} km², more "
                               f"than the whole municipality ({check.city_km2:,.0f} km²)")
    return Area(wkb=wkb)


_AREA_FEATURE = """
SELECT ST_AsGeoJSON(geom, 7) AS geometry, ST_Area(geom::geography) / 1e6 AS area_km2
  FROM area
"""


async def impact(conn: AsyncConnection, area: Area,
                 limit: int = DEFAULT_FEATURE_LIMIT, scope: Scope = CITY) -> dict:
    """The area as the first feature, what lies in it (summary), then up to ``limit``
    features of each kind; ``truncated`` counts what the limit left out."""
    check_limit(limit)
    drawn = (await conn.execute(*_sql(area, _AREA_FEATURE))).one()
    properties = {"layer": "area", "area_km2": drawn.area_km2}
    if area.radius_m is not None:  # a circle
        properties |= {"center": [area.lon, area.lat], "radius_m": area.radius_m,
                       "area_km2": math.pi * area.radius_m ** 2 / 1e6}
    summary = await area_summary(conn, area, scope)
    features = [{"type": "Feature", "id": "area", "geometry": json.loads(drawn.geometry),
                 "properties": properties}]
    truncated = {}
    for kind in KINDS:
        rows = await area_features(conn, area, kind, limit, scope)
        features += rows
        truncated[kind] = summary[kind]["total"] - len(rows)
    return {"type": "FeatureCollection", "summary": summary, "truncated": truncated,
            "features": features, "numberReturned": len(features)}

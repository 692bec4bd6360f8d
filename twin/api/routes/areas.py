"""Area questions under /query: reach by road, impact of an area, team coverage gaps."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Body, Query
from fastapi.responses import JSONResponse

from twin.api.deps import ConnDep, ScopeDep
from twin.api.routes.queries import Lat, Lon, TeamType
from twin.queries.coverage import DEFAULT_LIMIT as COVERAGE_LIMIT
from twin.queries.coverage import MAX_LIMIT as COVERAGE_MAX_LIMIT
from twin.queries.coverage import coverage as uncovered_points
from twin.queries.impact import (
    DEFAULT_FEATURE_LIMIT,
    MAX_FEATURE_LIMIT,
    MAX_RADIUS_M,
    area_from_geojson,
    circle,
    impact,
)
from twin.queries.reach import MAX_REACH_MINUTES
from twin.queries.reach import MODES as REACH_MODES
from twin.queries.reach import reach as reach_area
from twin.queries.routing import MAX_MINUTES

router = APIRouter(tags=["queries"])

# Bounds: the query modules' constants (see twin/api/routes/queries.py).
ReachMode = Literal[REACH_MODES]  # type: ignore[valid-type]
ReachModeQuery = Query("road", description="'road' (the only mode)")
TeamTypeQuery = Query(..., description="team type")
Limit = Query(DEFAULT_FEATURE_LIMIT, ge=0, le=MAX_FEATURE_LIMIT,
              description=f"features of each kind returned, 0 to {MAX_FEATURE_LIMIT}; the "
              "summary always counts all")

GeometryBody = Body(..., description="a GeoJSON Polygon or MultiPolygon in EPSG:4326 (or a "
                    "Feature of one), or {\"point\": [lon, lat], \"radius_m\": r}")


def _geojson(body: dict) -> JSONResponse:
    return JSONResponse(body, media_type="application/geo+json")


@router.get("/query/reach", summary="The area reachable from a spot within a time by road, "
            "and the risk points, hazard sources and buildings in it (GeoJSON)",
            response_class=JSONResponse)
async def reach(
    conn: ConnDep, scope: ScopeDep, lon: float = Lon, lat: float = Lat,
    minutes: float = Query(..., gt=0, le=MAX_REACH_MINUTES, allow_inf_nan=False,
                           description="travel time budget, minutes in "
                           f"(0, {MAX_REACH_MINUTES}]"),
    mode: ReachMode = ReachModeQuery,
) -> JSONResponse:
    return _geojson(await reach_area(conn, lon, lat, minutes, mode, scope))


@router.get("/query/impact", summary="What lies within a geodesic circle: summary and "
            "features (GeoJSON)", response_class=JSONResponse)
async def impact_circle(
    conn: ConnDep, scope: ScopeDep, lon: float = Lon, lat: float = Lat,
    radius_m: float = Query(..., gt=0, le=MAX_RADIUS_M, allow_inf_nan=False,
                            description=f"radius in metres, (0, {MAX_RADIUS_M:g}]"),
    limit: int = Limit,
) -> JSONResponse:
    return _geojson(await impact(conn, circle(lon, lat, radius_m), limit, scope))


@router.post("/query/impact", summary="What lies within a GeoJSON (Multi)Polygon or a circle "
             "{\"point\": [lon, lat], \"radius_m\": r}: summary and features (GeoJSON)",
             response_class=JSONResponse)
async def impact_area(
    conn: ConnDep, scope: ScopeDep,
    geometry: Any = GeometryBody,
    limit: int = Limit,
) -> JSONResponse:
    return _geojson(await impact(conn, await area_from_geojson(conn, geometry), limit, scope))


@router.get("/query/coverage", summary="Risk points no team of a type reaches within a time "
            "by road, counted by district and level (GeoJSON)", response_class=JSONResponse)
async def coverage(
    conn: ConnDep, scope: ScopeDep,
    team_type: TeamType = TeamTypeQuery,
    minutes: float = Query(..., gt=0, le=MAX_MINUTES, allow_inf_nan=False,
                           description=f"travel time budget, minutes in (0, {MAX_MINUTES}]"),
    limit: int = Query(COVERAGE_LIMIT, ge=0, le=COVERAGE_MAX_LIMIT,
                       description="uncovered points returned as features (most severe "
                       f"first), 0 to {COVERAGE_MAX_LIMIT}; the counts cover every point"),
) -> JSONResponse:
    return _geojson(await uncovered_points(conn, team_type, minutes, limit, scope))

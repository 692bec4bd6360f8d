"""Area questions under /query: reach by road, impact of an area, team coverage gaps."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Query
from fastapi.responses import JSONResponse

from twin.api.deps import ConnDep, ScopeDep
from twin.queries.coverage import DEFAULT_LIMIT as COVERAGE_LIMIT
from twin.queries.coverage import coverage as uncovered_points
from twin.queries.impact import DEFAULT_FEATURE_LIMIT, area_from_geojson, circle, impact
from twin.queries.reach import reach as reach_area

router = APIRouter(tags=["queries"])

Lon = Query(description="longitude, WGS84 degrees in [-180, 180]")
Lat = Query(description="latitude, WGS84 degrees in [-90, 90]")
Limit = Query(DEFAULT_FEATURE_LIMIT, description="features of each kind returned, 0 to "
              "10000; the summary always counts all")

GeometryBody = Body(..., description="a GeoJSON Polygon or MultiPolygon in EPSG:4326 (or a "
                    "Feature of one), or {\"point\": [lon, lat], \"radius_m\": r}")


def _geojson(body: dict) -> JSONResponse:
    return JSONResponse(body, media_type="application/geo+json")


@router.get("/query/reach", summary="The area reachable from a spot within a time by road, "
            "and the risk points, hazard sources and buildings in it (GeoJSON)",
            response_class=JSONResponse)
async def reach(
    conn: ConnDep, scope: ScopeDep, lon: float = Lon, lat: float = Lat,
    minutes: float = Query(..., description="travel time budget, minutes in (0, 60]"),
    mode: str = Query("road", description="'road' (the only mode)"),
) -> JSONResponse:
    return _geojson(await reach_area(conn, lon, lat, minutes, mode, scope))


@router.get("/query/impact", summary="What lies within a geodesic circle: summary and "
            "features (GeoJSON)", response_class=JSONResponse)
async def impact_circle(
    conn: ConnDep, scope: ScopeDep, lon: float = Lon, lat: float = Lat,
    radius_m: float = Query(..., description="radius in metres, (0, 100000]"),
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
    team_type: str = Query(..., description="team type, e.g. fire or medical"),
    minutes: float = Query(..., description="travel time budget, minutes in (0, 1440]"),
    limit: int = Query(COVERAGE_LIMIT, description="uncovered points returned as features "
                       "(most severe first), 0 to 200000; the counts cover every point"),
) -> JSONResponse:
    return _geojson(await uncovered_points(conn, team_type, minutes, limit, scope))

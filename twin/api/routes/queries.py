"""Planners' questions under /query: who owns a spot, which teams are nearest."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from twin.api.deps import ConnDep
from twin.queries.locate import locate as locate_point
from twin.queries.nearest import check_nearest
from twin.queries.nearest import nearest_teams as rank_teams

router = APIRouter(tags=["queries"])

# OGC conformance classes this module implements, collected by /conformance.
CONFORMANCE: list[str] = []

Lon = Query(description="longitude, WGS84 degrees in [-180, 180]")
Lat = Query(description="latitude, WGS84 degrees in [-90, 90]")


@router.get("/query/locate", summary="The grid, community, street and district of a spot, "
            "its responsible teams and the nearest teams")
async def locate(conn: ConnDep, lon: float = Lon, lat: float = Lat,
                 k: int = Query(5, description="how many nearest teams, 1 to 100")) -> dict:
    check_nearest(k, None, "distance")
    return await locate_point(conn, lon, lat, k)


def _team_feature(rank: int, team) -> dict:
    properties = {"rank": rank, **asdict(team)}
    lon, lat = properties.pop("lon"), properties.pop("lat")
    return {"type": "Feature", "id": team.id,
            "geometry": {"type": "Point", "coordinates": [lon, lat]},
            "properties": properties}


@router.get("/query/nearest-teams", summary="Response teams nearest to a spot (GeoJSON)",
            response_class=JSONResponse)
async def nearest_teams(
    conn: ConnDep, lon: float = Lon, lat: float = Lat,
    type: str | None = Query(None, description="team type; every type when absent"),
    k: int = Query(5, description="how many teams, 1 to 100"),
    mode: str = Query("distance", description="'distance' (geodesic metres)"),
) -> JSONResponse:
    check_nearest(k, type, mode)
    teams = await rank_teams(conn, lon, lat, k, type)
    body = {
        "type": "FeatureCollection",
        "query": {"lon": lon, "lat": lat, "type": type, "k": k, "mode": mode},
        "features": [_team_feature(rank, team) for rank, team in enumerate(teams, 1)],
        "numberReturned": len(teams),
    }
    return JSONResponse(body, media_type="application/geo+json")

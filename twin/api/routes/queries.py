"""Planners' questions under /query: who owns a spot, which teams are nearest, H3 counts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Literal

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from twin.api.deps import ConnDep, ScopeDep
from twin.core.errors import InvalidParameter
from twin.core.models import TEAM_TYPES
from twin.queries.h3_stats import H3_RESOLUTIONS, h3_counts
from twin.queries.locate import locate as locate_point
from twin.queries.nearest import MAX_K, MODES, Team, check_nearest
from twin.queries.nearest import nearest_teams as rank_teams
from twin.queries.routing import (
    MAX_MINUTES,
    SNAP_SPEED_KMH,
    check_max_minutes,
    nearest_teams_by_road,
)

router = APIRouter(tags=["queries"])

# OGC conformance classes this module implements, collected by /conformance.
CONFORMANCE: list[str] = []

# Every parameter declares its bounds here, so /api shows them and FastAPI refuses a value
# outside them (400 InvalidParameter, twin/api/errors.py) before the query runs. The bounds
# are the query modules' own constants, which their checks (for callers without HTTP) use.
Lon = Query(ge=-180, le=180, allow_inf_nan=False,
            description="longitude, WGS84 degrees in [-180, 180]")
Lat = Query(ge=-90, le=90, allow_inf_nan=False,
            description="latitude, WGS84 degrees in [-90, 90]")
K = Query(5, ge=1, le=MAX_K, description=f"how many nearest teams, 1 to {MAX_K}")
# Enums as Literals built from the domain's tuples (one list of values; mypy cannot read a
# Literal built from a tuple, hence the ignores).
TeamType = Literal[TEAM_TYPES]  # type: ignore[valid-type]
TypeQuery = Query(None, description="team type; every type when absent")
Mode = Literal[MODES]  # type: ignore[valid-type]
ModeQuery = Query("distance", description="'distance' (geodesic metres) or 'road' (travel "
                  "time over the road graph)")
# Comma-separated lists are parsed (and their items checked) by the query; the length
# only keeps a pasted novel out of the parser.
LIST_MAX_LENGTH = 200


@router.get("/query/locate", summary="The grid, community, street and district of a spot, "
            "its responsible teams and the nearest teams")
async def locate(conn: ConnDep, scope: ScopeDep, lon: float = Lon, lat: float = Lat,
                 k: int = K) -> dict:
    check_nearest(k, None, "distance")
    return await locate_point(conn, lon, lat, k, scope)


def _team_feature(rank: int, team) -> dict:
    properties = {"rank": rank, **asdict(team)}
    lon, lat = properties.pop("lon"), properties.pop("lat")
    if properties.get("route", False) is None:
        del properties["route"]
    return {"type": "Feature", "id": team.id,
            "geometry": {"type": "Point", "coordinates": [lon, lat]},
            "properties": properties}


@router.get("/query/nearest-teams", summary="Response teams nearest to a spot, by geodesic "
            "distance or by road travel time (GeoJSON)", response_class=JSONResponse)
async def nearest_teams(
    conn: ConnDep, scope: ScopeDep, lon: float = Lon, lat: float = Lat,
    type: TeamType | None = TypeQuery,
    k: int = K,
    mode: Mode = ModeQuery,
    max_minutes: float | None = Query(
        None, gt=0, le=MAX_MINUTES, allow_inf_nan=False,
        description=f"road mode: teams slower than this (minutes in (0, {MAX_MINUTES}]) get "
        "route_status 'beyond_cutoff'"),
    route: bool = Query(False, description="road mode: add each team's route as a "
                        "LineString in its properties"),
) -> JSONResponse:
    check_nearest(k, type, mode)
    teams: Sequence[Team]
    if mode == "road":
        check_max_minutes(max_minutes)
        teams = await nearest_teams_by_road(conn, lon, lat, k, type, max_minutes, route,
                                            scope)
    else:
        for name, value in (("max_minutes", max_minutes), ("route", route or None)):
            if value is not None:
                raise InvalidParameter(f"{name}: only available with mode=road")
        teams = await rank_teams(conn, lon, lat, k, type, scope)
    query = {"lon": lon, "lat": lat, "type": type, "k": k, "mode": mode}
    if mode == "road":
        query |= {"max_minutes": max_minutes, "route": route,
                  "snap_speed_kmh": SNAP_SPEED_KMH}
    body = {
        "type": "FeatureCollection",
        "query": query,
        "features": [_team_feature(rank, team) for rank, team in enumerate(teams, 1)],
        "numberReturned": len(teams),
    }
    return JSONResponse(body, media_type="application/geo+json")


@router.get("/query/h3", summary="Risk points counted per H3 cell (hex cell ids)")
async def h3_cells(
    conn: ConnDep, scope: ScopeDep,
    res: int = Query(..., ge=H3_RESOLUTIONS[0], le=H3_RESOLUTIONS[-1],
                     description="H3 resolution, one of "
                     f"{', '.join(map(str, H3_RESOLUTIONS))}"),
    sector: str | None = Query(None, max_length=LIST_MAX_LENGTH,
                               description="comma-separated sector codes (GET /sectors)"),
    level: str | None = Query(None, max_length=LIST_MAX_LENGTH,
                              description="comma-separated risk levels, 1 to 4"),
    bbox: str | None = Query(None, max_length=LIST_MAX_LENGTH,
                             description="west,south,east,north in CRS84"),
) -> dict:
    return await h3_counts(conn, res, sector, level, bbox, scope)

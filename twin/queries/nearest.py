"""The nearest response teams to a spot, ranked by geodesic distance.

Candidates come from the KNN index (``geom <-> point``), which orders by planar distance in
degrees; they are re-ranked by geodesic distance on the WGS84 ellipsoid. A planar ranking is
not a geodesic one (a degree of longitude is shorter than a degree of latitude away from the
equator), so the candidate list is widened until it provably holds the true k nearest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from twin.core.errors import InvalidParameter
from twin.core.models import TEAM_TYPES
from twin.core.principal import CITY, Scope
from twin.core.scope import team_predicate

MAX_K = 100
MODES = ("distance", "road")
# The shortest degree of latitude on WGS84 (at the equator), in metres.
MIN_METRES_PER_DEGREE = 110_574.0


def check_point(lon: float, lat: float) -> None:
    if not (math.isfinite(lon) and -180 <= lon <= 180):
        raise InvalidParameter(f"lon: must be a longitude in [-180, 180] (WGS84), got {lon}")
    if not (math.isfinite(lat) and -90 <= lat <= 90):
        raise InvalidParameter(f"lat: must be a latitude in [-90, 90] (WGS84), got {lat}")


def check_nearest(k: int, team_type: str | None, mode: str) -> None:
    if not 1 <= k <= MAX_K:
        raise InvalidParameter(f"k: must be between 1 and {MAX_K}, got {k}")
    if team_type is not None and team_type not in TEAM_TYPES:
        raise InvalidParameter(f"type: unknown team type {team_type!r}; "
                               f"allowed: {', '.join(TEAM_TYPES)}")
    if mode not in MODES:
        raise InvalidParameter(f"mode: {mode!r} is not available; allowed: {', '.join(MODES)}")


@dataclass(frozen=True)
class Team:
    id: int
    code: str
    name_zh: str
    name_en: str
    team_type: str
    status: str
    headcount: int
    phone: str
    district_code: str
    lon: float
    lat: float
    distance_m: float


# {scope}: the caller's teams (twin/core/scope.py), a fixed predicate with bound values.
_CANDIDATES = """
    WITH candidates AS (
        SELECT t.*, t.geom <-> ST_SetSRID(ST_MakePoint(:lon, :lat), 4326) AS planar_deg
          FROM response_teams AS t
         WHERE (CAST(:team_type AS text) IS NULL OR t.team_type = :team_type){scope}
         ORDER BY t.geom <-> ST_SetSRID(ST_MakePoint(:lon, :lat), 4326)
         LIMIT :candidates
    )
    SELECT id, code, name_zh, name_en, team_type, status, headcount, phone, district_code,
           ST_X(geom) AS lon, ST_Y(geom) AS lat, planar_deg,
           ST_Distance(geom::geography, ST_SetSRID(ST_MakePoint(:lon, :lat), 4326)::geography)
               AS distance_m
      FROM candidates
     ORDER BY distance_m, id
"""


def _complete(rows, k: int, n: int, lat: float) -> bool:
    """True when no team beyond the n planar candidates can be nearer than the k-th."""
    if len(rows) < n:
        return True  # every team of the type is a candidate
    reach_deg = max(row.planar_deg for row in rows)
    # Any team outside the candidates is at least reach_deg away in the plane, hence at
    # least this far on the ellipsoid (a degree of longitude shrinks with cos(latitude)).
    polar_lat = min(abs(lat) + reach_deg, 89.9)
    floor_m = reach_deg * MIN_METRES_PER_DEGREE * math.cos(math.radians(polar_lat))
    return rows[k - 1].distance_m <= floor_m


async def nearest_teams(conn: AsyncConnection, lon: float, lat: float, k: int = 5,
                        team_type: str | None = None, scope: Scope = CITY) -> list[Team]:
    """The k teams of the caller's scope nearest to (lon, lat) by geodesic distance, nearest
    first."""
    check_point(lon, lat)
    check_nearest(k, team_type, "distance")
    in_scope = team_predicate(scope, "t")
    query = text(_CANDIDATES.format(scope=in_scope.and_sql))
    n = max(4 * k, 32)
    while True:
        rows = (await conn.execute(query, {
            "lon": lon, "lat": lat, "team_type": team_type, "candidates": n,
        } | in_scope.params)).all()
        if _complete(rows, k, n, lat):
            break
        n *= 4
    return [Team(**{name: value for name, value in row._mapping.items()
                    if name != "planar_deg"}) for row in rows[:k]]

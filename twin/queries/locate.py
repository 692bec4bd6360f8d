"""Which grid, community, street and district own a spot, and who answers for it.

A point outside the municipality has no owner: ``locate`` raises ``NotFound`` (HTTP 404)
with the reason, rather than answering with empty units a client might mistake for data.
A point outside the caller's jurisdiction is answered the same way (404, "outside your
jurisdiction"): its grid is not the caller's to see, so it is not found, not forbidden.
"""

from __future__ import annotations

from dataclasses import asdict

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from twin.core.errors import NotFound
from twin.core.principal import CITY, Scope
from twin.core.scope import code_in_scope, team_predicate
from twin.queries.nearest import check_point, nearest_teams

LEVELS = ("grid", "community", "street", "district")

# Grid cells partition the municipality; a point on a shared edge belongs to the lowest
# code, so the answer is deterministic.
_OWNER_UNITS = text("""
    SELECT g.code AS grid_code, g.name_zh AS grid_name_zh, g.name_en AS grid_name_en,
           c.code AS community_code, c.name_zh AS community_name_zh,
           c.name_en AS community_name_en,
           s.code AS street_code, s.name_zh AS street_name_zh, s.name_en AS street_name_en,
           d.code AS district_code, d.name_zh AS district_name_zh,
           d.name_en AS district_name_en
      FROM admin_units AS g
      JOIN admin_units AS c ON c.code = g.parent_code
      JOIN admin_units AS s ON s.code = c.parent_code
      JOIN admin_units AS d ON d.code = s.parent_code
     WHERE g.level = 'grid'
       AND ST_Intersects(g.geom, ST_SetSRID(ST_MakePoint(:lon, :lat), 4326))
     ORDER BY g.code
     LIMIT 1
""")

# Jurisdictions are kept per street: the grid's responsible teams are its street's (those
# the caller may see: {scope}, a fixed predicate with bound values).
_RESPONSIBLE_TEAMS = """
    SELECT t.id, t.code, t.name_zh, t.name_en, t.team_type, t.status, t.headcount, t.phone,
           t.district_code, ST_X(t.geom) AS lon, ST_Y(t.geom) AS lat,
           ST_Distance(t.geom::geography,
                       ST_SetSRID(ST_MakePoint(:lon, :lat), 4326)::geography) AS distance_m
      FROM team_jurisdictions AS j
      JOIN response_teams AS t ON t.id = j.team_id
     WHERE j.admin_code = :street_code{scope}
     ORDER BY t.team_type, distance_m, t.id
"""


async def owner_units(conn: AsyncConnection, lon: float, lat: float) -> dict | None:
    """``{level: {code, name_zh, name_en}}`` for the four levels, or None outside the city."""
    row = (await conn.execute(_OWNER_UNITS, {"lon": lon, "lat": lat})).mappings().first()
    if row is None:
        return None
    return {level: {key: row[f"{level}_{key}"] for key in ("code", "name_zh", "name_en")}
            for level in LEVELS}


async def locate(conn: AsyncConnection, lon: float, lat: float, k: int = 5,
                 scope: Scope = CITY) -> dict:
    check_point(lon, lat)
    units = await owner_units(conn, lon, lat)
    if units is None:
        raise NotFound(f"the point lon={lon}, lat={lat} is outside the municipality: "
                       f"no grid cell owns it")
    if not code_in_scope(scope, units["grid"]["code"]):
        raise NotFound(f"the point lon={lon}, lat={lat} is outside your jurisdiction")
    in_scope = team_predicate(scope, "t")
    responsible = (await conn.execute(text(_RESPONSIBLE_TEAMS.format(scope=in_scope.and_sql)), {
        "lon": lon, "lat": lat, "street_code": units["street"]["code"],
    } | in_scope.params)).mappings().all()
    nearest = await nearest_teams(conn, lon, lat, k, scope=scope)
    return {
        "point": {"lon": lon, "lat": lat},
        **units,
        "responsible_teams": [dict(row) for row in responsible],
        "nearest_teams": [asdict(team) for team in nearest],
    }

"""Risk points counted per H3 cell, as the hex cell strings kepler.gl and deck.gl read.

The cells are precomputed on load (``risk_points.h3_r3`` .. ``h3_r9``), so a count is one
GROUP BY over an integer column; the integers become strings only in the answer.
"""

from __future__ import annotations

import h3
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from twin.core.errors import InvalidParameter
from twin.core.principal import CITY, Scope
from twin.core.scope import code_predicate
from twin.queries.features import parse_bbox

H3_RESOLUTIONS = tuple(range(3, 10))
RISK_LEVELS = (1, 2, 3, 4)


def check_resolution(res: int) -> str:
    """The column holding cells at ``res``; a 400 naming the allowed values otherwise."""
    if res not in H3_RESOLUTIONS:
        raise InvalidParameter(f"res: H3 resolution must be one of "
                               f"{', '.join(map(str, H3_RESOLUTIONS))}, got {res}")
    return f"h3_r{res}"


def parse_levels(raw: str | None) -> list[int] | None:
    if raw is None or not raw.strip():
        return None
    levels = []
    for part in raw.split(","):
        try:
            level = int(part.strip())
        except ValueError:
            level = None
        if level not in RISK_LEVELS:
            raise InvalidParameter(f"level: risk levels are 1 to 4 "
                                   f"(comma-separated), got {part.strip()!r}")
        levels.append(level)
    return sorted(set(levels))


async def parse_sectors(conn: AsyncConnection, raw: str | None) -> list[str] | None:
    if raw is None or not raw.strip():
        return None
    sectors = sorted({part.strip() for part in raw.split(",") if part.strip()})
    known = list((await conn.execute(text(
        "SELECT code FROM sectors ORDER BY sort_order, code"))).scalars())
    unknown = [s for s in sectors if s not in known]
    if unknown:
        raise InvalidParameter(f"sector: unknown sector(s) {', '.join(unknown)}; "
                               f"allowed: {', '.join(known)}")
    return sectors


async def h3_counts(conn: AsyncConnection, res: int, sector: str | None = None,
                    level: str | None = None, bbox: str | None = None,
                    scope: Scope = CITY) -> dict:
    """``{"resolution", "cells": [{"h3", "count", "by_level"}], "total"}`` for the risk
    points in the caller's scope (by their grid).

    ``sector`` and ``level`` are comma-separated lists; ``bbox`` is west,south,east,north
    (CRS84) and keeps the points inside it or on its edge.
    """
    column = check_resolution(res)
    levels = parse_levels(level)
    sectors = await parse_sectors(conn, sector)
    envelope = parse_bbox(bbox) if bbox else None
    conditions: list[str] = []
    params: dict[str, object] = {}
    if sectors is not None:
        conditions.append("sector_code = ANY(:sectors)")
        params["sectors"] = sectors
    if levels is not None:
        conditions.append("level = ANY(:levels)")
        params["levels"] = levels
    if envelope is not None:
        conditions.append("geom && ST_MakeEnvelope(:west, :south, :east, :north, 4326)")
        params.update(zip(("west", "south", "east", "north"), envelope, strict=True))
    in_scope = code_predicate(scope, "grid_code")
    if in_scope.params:
        conditions.append(in_scope.sql)
        params.update(in_scope.params)
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    # column comes from check_resolution's fixed set, never from the client's text.
    rows = await conn.execute(text(
        f'SELECT "{column}" AS cell, level, count(*) AS n FROM risk_points {where} '
        f"GROUP BY 1, 2"
    ), params)
    cells: dict[int, dict] = {}
    for row in rows:
        cell = cells.setdefault(row.cell, {"h3": h3.int_to_str(row.cell), "count": 0,
                                           "by_level": {}})
        cell["count"] += row.n
        cell["by_level"][str(row.level)] = row.n
    ordered = sorted(cells.values(), key=lambda c: c["h3"])
    for cell in ordered:
        cell["by_level"] = dict(sorted(cell["by_level"].items()))
    return {"resolution": res, "cells": ordered,
            "total": sum(c["count"] for c in ordered)}

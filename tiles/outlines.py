"""H3 cell outlines stored in Web Mercator, so a hexagon tile is one SQL statement.

A cell's outline never changes, so each is computed once (here, with h3) and stored in
``h3_cell_outlines`` beside the centre that decides which tile owns the cell. Cells come and
go with risk points; whoever writes points need not care: the sample loader and migration
0006 store the outlines of every cell there is, and a hexagon tile that meets a cell without
one stores it on the spot and is built again (tiles.vector), so no writer can make a hexagon
vanish from the map.
"""

from __future__ import annotations

from collections.abc import Iterable

import h3
import numpy as np
import pyproj
import shapely
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncConnection

WEB_MERCATOR = 3857
_TO_MERCATOR = pyproj.Transformer.from_crs(4326, WEB_MERCATOR, always_xy=True)

# Several writers may store the same cell at once (two tiles, a loader): the first one wins,
# and they all computed the same outline.
_INSERT = text("""
    INSERT INTO h3_cell_outlines (cell, res, outline, centre)
    SELECT cell, res, ST_GeomFromEWKB(outline), ST_GeomFromEWKB(centre)
      FROM unnest(CAST(:cells AS bigint[]), CAST(:resolutions AS smallint[]),
                  CAST(:outlines AS bytea[]), CAST(:centres AS bytea[]))
           AS given(cell, res, outline, centre)
        ON CONFLICT (cell) DO NOTHING
""")

# Every cell holding a risk point at some resolution, without a stored outline.
_MISSING = text("""
    SELECT DISTINCT counts.cell
      FROM risk_point_h3_counts AS counts
     WHERE NOT EXISTS (SELECT 1 FROM h3_cell_outlines AS o WHERE o.cell = counts.cell)
""")

BATCH = 20_000


def outline_rows(cells: Iterable[int]) -> dict[str, list]:
    """The columns of ``h3_cell_outlines`` for ``cells``: outlines and centres as EWKB."""
    cells = sorted(set(cells))
    rings = [h3.cell_to_boundary(h3.int_to_str(cell)) for cell in cells]
    centres = [h3.cell_to_latlng(h3.int_to_str(cell)) for cell in cells]
    # One transformation for every vertex and centre (h3 gives lat, lng).
    lats = np.array([lat for ring in rings for lat, _ in ring] + [lat for lat, _ in centres])
    lngs = np.array([lng for ring in rings for _, lng in ring] + [lng for _, lng in centres])
    xs, ys = _TO_MERCATOR.transform(lngs, lats)
    outlines, start = [], 0
    for ring in rings:  # 6 vertices, or 5 for the twelve pentagons of each resolution
        end = start + len(ring)
        outlines.append(shapely.Polygon(np.column_stack([xs[start:end], ys[start:end]])))
        start = end
    points = shapely.points(xs[start:], ys[start:])
    return {
        "cells": cells,
        "resolutions": [h3.get_resolution(h3.int_to_str(cell)) for cell in cells],
        "outlines": _ewkb(outlines),
        "centres": _ewkb(points),
    }


def _ewkb(geometries) -> list[bytes]:
    tagged = shapely.set_srid(np.asarray(geometries, dtype=object), WEB_MERCATOR)
    return list(shapely.to_wkb(tagged, include_srid=True))


def store_missing(conn: Connection) -> int:
    """Stores the outline of every cell of the stored H3 counts that has none (the sample
    loader and migration 0006 call this). Returns how many were stored."""
    missing = conn.execute(_MISSING).scalars().all()
    for start in range(0, len(missing), BATCH):
        conn.execute(_INSERT, outline_rows(missing[start:start + BATCH]))
    return len(missing)


async def store(conn: AsyncConnection, cells: Iterable[int]) -> None:
    """Stores the outlines of ``cells`` (those a tile found without one)."""
    await conn.execute(_INSERT, outline_rows(cells))

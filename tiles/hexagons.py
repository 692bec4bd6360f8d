"""Risk points as H3 hexagons at low zoom: exact counts per sector and the worst level.

Which hexagons a tile holds, and what "exact" means at tile edges:

* A tile holds every hexagon that meets the tile (with its buffer), so the map draws whole
  hexagons across tile edges; the same hexagon therefore appears in up to a few tiles.
* Each hexagon's counts are over *all* points in the hexagon (after the filters), not only the
  points inside the tile: the points are read from the tile grown by two hexagon diameters
  (with a safety factor), and every point of a hexagon that meets the tile lies in that area.
* Each hexagon *belongs* to exactly one tile, the one holding its centre (west and north
  edges inclusive, east and south exclusive); ``centroid_in_tile`` marks it there. Summing
  ``count`` over the hexagons with ``centroid_in_tile`` over all tiles of a zoom gives the
  number of (filtered) points, each point counted once.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache

import h3
import morecantile
import shapely
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from layers.registry import Layer
from tiles.filters import TileFilters, filter_sql
from tiles.grid import lonlat_bounds

AGGREGATED_TABLE = "risk_points"
AGGREGATE_BELOW_ZOOM = 12
# The coarsest and finest resolutions risk_points stores (columns h3_r3 .. h3_r9).
COARSEST, FINEST = 3, 9
# One resolution step shrinks a hexagon's width by sqrt(7) and one zoom step doubles the map
# scale, so this keeps a hexagon ~25-55 px wide on a 256 px tile and a tile at <~250 cells.
RESOLUTION_BY_ZOOM = {6: 4, 7: 4, 8: 5, 9: 6, 10: 7, 11: 7, 12: 8, 13: 8}
# H3 cells vary in size around the globe; no edge is more than this times the average.
EDGE_SAFETY = 1.5
HEXAGON_FIELDS = {"h3": "String", "count": "Number", "worst_level": "Number",
                  "resolution": "Number", "centroid_in_tile": "Boolean"}


def aggregates(layer: Layer, z: int, below_zoom: int) -> bool:
    return layer.source_table == AGGREGATED_TABLE and z < below_zoom


def resolution_for_zoom(z: int) -> int:
    if z <= 5:
        return COARSEST
    return RESOLUTION_BY_ZOOM.get(z, FINEST)


@lru_cache(maxsize=200_000)
def cell_boundary_wkb(cell: int) -> bytes:
    """The hexagon as a lon/lat polygon; cells never change, so cache them for the process."""
    ring = [(lng, lat) for lat, lng in h3.cell_to_boundary(h3.int_to_str(cell))]
    return shapely.Polygon(ring).wkb


@lru_cache(maxsize=200_000)
def cell_centre(cell: int) -> tuple[float, float]:
    lat, lng = h3.cell_to_latlng(h3.int_to_str(cell))
    return lng, lat


def centre_in_tile(cell: int, bounds: tuple[float, float, float, float]) -> bool:
    west, south, east, north = bounds
    lng, lat = cell_centre(cell)
    return west <= lng < east and south < lat <= north


def search_bounds(tile: morecantile.Tile, res: int) -> tuple[float, float, float, float]:
    """The tile grown by two hexagon diameters: holds every point of a hexagon meeting the tile."""
    west, south, east, north = lonlat_bounds(tile)
    margin_km = 4 * h3.average_hexagon_edge_length(res, "km") * EDGE_SAFETY
    dlat = margin_km / 110.57
    north, south = min(north + dlat, 89.0), max(south - dlat, -89.0)
    dlng = margin_km / (111.32 * math.cos(math.radians(max(abs(north), abs(south)))))
    return west - dlng, south, east + dlng, north


@dataclass(frozen=True)
class HexagonRows:
    """The aggregated hexagons as parallel arrays, ready to ``unnest`` in the tile query."""

    cells: list[int]
    boundaries: list[bytes]
    counts: list[int]
    worst_levels: list[int]
    centroid_in_tile: list[bool]
    sector_counts: list[str]


_AGGREGATE = """
    SELECT cell, sum(n)::int AS count, min(worst)::int AS worst_level,
           jsonb_object_agg('count_' || sector_code, n) AS sector_counts
      FROM (SELECT {cell_column} AS cell, sector_code, count(*) AS n, min(level) AS worst
              FROM {table}
             WHERE geom && ST_MakeEnvelope(:west, :south, :east, :north, 4326)
               AND ({where}){filters}
             GROUP BY 1, 2) AS per_sector
     GROUP BY cell
"""


async def aggregate(conn: AsyncConnection, layer: Layer, tile: morecantile.Tile,
                    filters: TileFilters) -> HexagonRows:
    res = resolution_for_zoom(tile.z)
    west, south, east, north = search_bounds(tile, res)
    predicate, params = filter_sql(filters, layer, "agg")
    # The column name comes from a fixed range of integers; source_filter from the registry.
    query = _AGGREGATE.format(cell_column=f'"h3_r{res}"', table=f'"{layer.source_table}"',
                              where=layer.where, filters=predicate)
    params.update(west=west, south=south, east=east, north=north)
    rows = (await conn.execute(text(query), params)).all()
    bounds = lonlat_bounds(tile)
    return HexagonRows(
        cells=[row.cell for row in rows],
        boundaries=[cell_boundary_wkb(row.cell) for row in rows],
        counts=[row.count for row in rows],
        worst_levels=[row.worst_level for row in rows],
        centroid_in_tile=[centre_in_tile(row.cell, bounds) for row in rows],
        sector_counts=[json.dumps(row.sector_counts) for row in rows],
    )

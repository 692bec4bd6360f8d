"""Risk points as H3 hexagons at low zoom: exact counts per sector and the worst level.

Which hexagons a tile holds, and what "exact" means at tile edges:

* A tile holds every hexagon that meets the tile (with its buffer), so the map draws whole
  hexagons across tile edges; the same hexagon therefore appears in up to a few tiles.
* Each hexagon's counts are over *all* points in the hexagon (after the filters), not only the
  points inside the tile: the points are read from the tile and its buffer grown by one
  hexagon diameter (with a safety factor for H3's uneven cells), and every point of a
  hexagon that meets the tile and its buffer lies in that area.
* Each hexagon *belongs* to exactly one tile, the one holding its centre (west and north
  edges inclusive, east and south exclusive); ``centroid_in_tile`` marks it there. Summing
  ``count`` over the hexagons with ``centroid_in_tile`` over all tiles of a zoom gives the
  number of (filtered) points, each point counted once.
"""

from __future__ import annotations

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
from tiles.grid import WEB_MERCATOR, lonlat_bounds

AGGREGATED_TABLE = "risk_points"
AGGREGATE_BELOW_ZOOM = 12
# The coarsest and finest resolutions risk_points stores (columns h3_r3 .. h3_r9).
COARSEST, FINEST = 3, 9
# One resolution step shrinks a hexagon's width by sqrt(7) and one zoom step doubles the map
# scale, so this keeps a hexagon ~25-55 px wide on a 256 px tile and a tile at <~250 cells.
RESOLUTION_BY_ZOOM = {6: 4, 7: 4, 8: 5, 9: 6, 10: 7, 11: 7, 12: 8, 13: 8}
# H3 cells vary in size around the globe; no edge is more than this times the average.
EDGE_SAFETY = 1.5
EARTH_RADIUS_M = 6378137.0
# The MVT buffer (64 of 4096 tile units), as a fraction of the tile's width.
BUFFER_FRACTION = 64 / 4096
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
def cell_bbox(cell: int) -> tuple[float, float, float, float]:
    return shapely.from_wkb(cell_boundary_wkb(cell)).bounds


def meets(cell: int, bounds: tuple[float, float, float, float]) -> bool:
    """Whether the hexagon's box meets ``bounds``; PostGIS clips the rest exactly."""
    west, south, east, north = cell_bbox(cell)
    return west <= bounds[2] and east >= bounds[0] and south <= bounds[3] and north >= bounds[1]


@lru_cache(maxsize=200_000)
def cell_centre(cell: int) -> tuple[float, float]:
    lat, lng = h3.cell_to_latlng(h3.int_to_str(cell))
    return lng, lat


def centre_in_tile(cell: int, bounds: tuple[float, float, float, float]) -> bool:
    west, south, east, north = bounds
    lng, lat = cell_centre(cell)
    return west <= lng < east and south < lat <= north


def search_bounds(tile: morecantile.Tile, res: int) -> tuple[float, float, float, float]:
    """The drawn area (tile and buffer) grown by one hexagon diameter (two edges): every
    point of a hexagon that meets the drawn area lies within it."""
    west, south, east, north = buffered_bounds(tile)
    margin_km = 2 * h3.average_hexagon_edge_length(res, "km") * EDGE_SAFETY
    dlat = margin_km / 110.57
    north, south = min(north + dlat, 89.0), max(south - dlat, -89.0)
    dlng = margin_km / (111.32 * math.cos(math.radians(max(abs(north), abs(south)))))
    return west - dlng, south, east + dlng, north


@dataclass(frozen=True)
class HexagonRows:
    """The aggregated hexagons as parallel arrays, ready to ``unnest`` in the tile query.

    The boundaries travel as one MultiPolygon (the i-th polygon is the i-th cell): one
    binary value instead of an array of hundreds, which the driver would escape one by one.
    """

    cells: list[int]
    boundaries: bytes
    counts: list[int]
    worst_levels: list[int]
    centroid_in_tile: list[bool]
    # sector code -> count per cell (None where the cell has none: no property is sent).
    sector_counts: dict[str, list[int | None]]


_AGGREGATE = """
    SELECT {cell_column} AS cell, sector_code, count(*)::int AS n, min(level)::int AS worst
      FROM {table}
     WHERE geom && ST_MakeEnvelope(:west, :south, :east, :north, 4326)
       AND ({where}){filters}
     GROUP BY 1, 2
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
    per_cell: dict[int, dict[str, tuple[int, int]]] = {}
    for cell, sector, n, worst in (await conn.execute(text(query), params)).all():
        per_cell.setdefault(cell, {})[sector] = (n, worst)
    bounds, drawn = lonlat_bounds(tile), buffered_bounds(tile)
    cells = [cell for cell in per_cell if meets(cell, drawn)]
    sectors = sorted({sector for cell in cells for sector in per_cell[cell]})
    return HexagonRows(
        cells=cells,
        boundaries=shapely.MultiPolygon(
            [shapely.from_wkb(cell_boundary_wkb(cell)) for cell in cells]).wkb,
        counts=[sum(n for n, _ in per_cell[cell].values()) for cell in cells],
        worst_levels=[min(worst for _, worst in per_cell[cell].values()) for cell in cells],
        centroid_in_tile=[centre_in_tile(cell, bounds) for cell in cells],
        sector_counts={sector: [per_cell[cell].get(sector, (None, None))[0] for cell in cells]
                       for sector in sectors},
    )


def buffered_bounds(tile: morecantile.Tile) -> tuple[float, float, float, float]:
    """The tile grown by its MVT buffer, in degrees: where a hexagon is drawn at all.

    Inverse Mercator by hand: morecantile wraps longitudes past 180, which would turn the
    grown world tile inside out.
    """
    left, bottom, right, top = WEB_MERCATOR.xy_bounds(tile)
    grow = (right - left) * BUFFER_FRACTION

    def degrees(x: float, y: float) -> tuple[float, float]:
        return (math.degrees(x / EARTH_RADIUS_M),
                math.degrees(math.atan(math.sinh(y / EARTH_RADIUS_M))))

    west, south = degrees(left - grow, bottom - grow)
    east, north = degrees(right + grow, top + grow)
    return west, south, east, north

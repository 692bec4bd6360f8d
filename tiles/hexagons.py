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
import struct
from dataclasses import dataclass
from functools import lru_cache

import h3
import morecantile
import shapely
from sqlalchemy.ext.asyncio import AsyncConnection

from layers.registry import Layer
from tiles.filters import TileFilters, filter_sql
from tiles.sql import sql_text

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


def multipolygon_wkb(polygons: list[bytes]) -> bytes:
    """A MultiPolygon's WKB from its polygons' (little-endian) WKB: joined bytes, no parsing."""
    return b"\x01" + struct.pack("<II", 6, len(polygons)) + b"".join(polygons)


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


# Both queries return their rows as ONE json value: a single json.loads in C instead of
# per-row result processing, ~1 ms of Python less on a tile of a few hundred cells.
_AS_JSON = """
    SELECT json_agg(json_build_array(cell, sector_code, n, worst))
      FROM ({grouped}) AS grouped
"""

_AGGREGATE = """
    SELECT {cell_column} AS cell, sector_code, count(*)::int AS n, min(level)::int AS worst
      FROM {table}
     WHERE geom && ST_MakeEnvelope(:west, :south, :east, :north, 4326)
       AND ({where}){filters}
     GROUP BY 1, 2
"""

# The same rows from the stored counts (migration 0005): the cells whose anchor (a point
# inside the cell) lies in the search area are exactly the cells the live query finds there
# that can meet the tile, since a cell that meets the drawn area lies wholly inside it.
# ``res = {res}`` is a literal so the planner picks that resolution's partial index.
_STORED = """
    SELECT cell, sector_code, sum(n)::int AS n, min(level)::int AS worst
      FROM risk_point_h3_counts
     WHERE res = {res} AND anchor && ST_MakeEnvelope(:west, :south, :east, :north, 4326)
       {filters}
     GROUP BY 1, 2
"""


def stored_counts_apply(layer: Layer, filters: TileFilters) -> bool:
    """Whether the stored counts answer this tile: they hold every risk point by sector and
    level, so sector= and level= apply to them, but a CQL2 filter (any field) or a scope
    smaller than the city (by grid code) needs the points themselves."""
    return (layer.source_table == AGGREGATED_TABLE and not layer.source_filter
            and not filters.cql and filters.scope.is_city)


async def aggregate(conn: AsyncConnection, layer: Layer, tile: morecantile.Tile,
                    filters: TileFilters, stored: bool | None = None) -> HexagonRows:
    """The hexagons of a tile, from the stored counts where they apply (``stored=None``),
    else from the points; ``stored=False`` forces the points (tests compare both)."""
    res = resolution_for_zoom(tile.z)
    west, south, east, north = search_bounds(tile, res)
    predicate, params = filter_sql(filters, layer, "agg")
    if stored is None:
        stored = stored_counts_apply(layer, filters)
    if stored:
        # Only sector_code/level clauses here (see stored_counts_apply): columns of both tables.
        query = _STORED.format(res=int(res), filters=predicate)
    else:
        # The column name comes from a fixed range of integers; source_filter from the registry.
        query = _AGGREGATE.format(cell_column=f'"h3_r{res}"',
                                  table=f'"{layer.source_table}"', where=layer.where,
                                  filters=predicate)
    params.update(west=west, south=south, east=east, north=north)
    rows = (await conn.execute(sql_text(_AS_JSON.format(grouped=query)), params)).scalar_one()
    per_cell: dict[int, dict[str, tuple[int, int]]] = {}
    for cell, sector, n, worst in rows or ():
        per_cell.setdefault(cell, {})[sector] = (n, worst)
    return hexagon_rows(per_cell, tile)


def hexagon_rows(per_cell: dict[int, dict[str, tuple[int, int]]],
                 tile: morecantile.Tile) -> HexagonRows:
    bounds, drawn = buffered_bounds(tile, 0.0), buffered_bounds(tile)
    # Sorted, so the tile is the same bytes whichever query found the cells.
    cells = sorted(cell for cell in per_cell if meets(cell, drawn))
    sectors = sorted({sector for cell in cells for sector in per_cell[cell]})
    return HexagonRows(
        cells=cells,
        boundaries=multipolygon_wkb([cell_boundary_wkb(cell) for cell in cells]),
        counts=[sum(n for n, _ in per_cell[cell].values()) for cell in cells],
        worst_levels=[min(worst for _, worst in per_cell[cell].values()) for cell in cells],
        centroid_in_tile=[centre_in_tile(cell, bounds) for cell in cells],
        sector_counts={sector: [per_cell[cell].get(sector, (None, None))[0] for cell in cells]
                       for sector in sectors},
    )


def buffered_bounds(tile: morecantile.Tile,
                    fraction: float = BUFFER_FRACTION) -> tuple[float, float, float, float]:
    """The tile grown by its MVT buffer (or ``fraction`` of its width), in degrees: where a
    hexagon is drawn at all.

    Inverse Mercator by hand: morecantile wraps longitudes past 180, which would turn the
    grown world tile inside out (and goes through pyproj, ~50 us a call).
    """
    # Web Mercator bounds by hand too: morecantile's xy_bounds costs ~0.5 ms a call.
    # Each edge from its own index, so neighbouring tiles share their edges bit for bit.
    half, size = math.pi * EARTH_RADIUS_M, 2 * math.pi * EARTH_RADIUS_M / 2**tile.z
    left, right = -half + tile.x * size, -half + (tile.x + 1) * size
    top, bottom = half - tile.y * size, half - (tile.y + 1) * size
    grow = size * fraction

    def degrees(x: float, y: float) -> tuple[float, float]:
        return (math.degrees(x / EARTH_RADIUS_M),
                math.degrees(math.atan(math.sinh(y / EARTH_RADIUS_M))))

    west, south = degrees(left - grow, bottom - grow)
    east, north = degrees(right + grow, top + grow)
    return west, south, east, north

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
from collections.abc import Sequence

import h3
import morecantile

from tiles.filters import TileFilters, filter_sql, quote
from twin.core.layer import Layer

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


def search_bounds(tile: morecantile.Tile, res: int) -> tuple[float, float, float, float]:
    """The drawn area (tile and buffer) grown by one hexagon diameter (two edges): every
    point of a hexagon that meets the drawn area lies within it."""
    west, south, east, north = buffered_bounds(tile)
    margin_km = 2 * h3.average_hexagon_edge_length(res, "km") * EDGE_SAFETY
    dlat = margin_km / 110.57
    north, south = min(north + dlat, 89.0), max(south - dlat, -89.0)
    dlng = margin_km / (111.32 * math.cos(math.radians(max(abs(north), abs(south)))))
    return west - dlng, south, east + dlng, north


# The (filtered) points per cell, from the stored counts (migration 0005): the cells whose
# anchor (a point inside the cell) lies in the search area are exactly the cells the live
# query finds there that can meet the tile, since a cell that meets the drawn area lies
# wholly inside it. ``res = {res}`` is a literal so the planner picks that resolution's
# partial index. One column per sector (NULL where the cell has none: no property is sent),
# which is 4x cheaper than collecting them into a jsonb.
_STORED = """
    SELECT cell, sum(n)::int AS count, min(level)::int AS worst_level{sectors}
      FROM risk_point_h3_counts
     WHERE res = {res} AND anchor && ST_MakeEnvelope(:west_{i}, :south_{i}, :east_{i},
                                                     :north_{i}, 4326){filters}
     GROUP BY cell
"""
_STORED_SECTOR = "sum(n) FILTER (WHERE sector_code = :sector_{i}_{j})::int"

# The same from the points themselves (a CQL2 filter or a scope smaller than the city).
_LIVE = """
    SELECT {cell_column} AS cell, count(*)::int AS count, min(level)::int AS worst_level{sectors}
      FROM {table}
     WHERE geom && ST_MakeEnvelope(:west_{i}, :south_{i}, :east_{i}, :north_{i}, 4326)
       AND ({where}){filters}
     GROUP BY 1
"""
_LIVE_SECTOR = "NULLIF(count(*) FILTER (WHERE sector_code = :sector_{i}_{j}), 0)::int"

# One row per cell with its stored outline. A cell is drawn where its outline meets the tile
# and its buffer; it is owned (``centroid_in_tile``) by the tile holding its centre, west and
# north edges inclusive. ``missing_{i}``: cells without a stored outline (tiles.outlines).
_HEXAGONS = """
    cells_{i} AS ({grouped}),
    rows_{i} AS (
        SELECT * FROM (
            SELECT ST_AsMVTGeom(o.outline, tile.env, {extent}, {buffer}, true) AS geom,
                   c.cell, to_hex(c.cell) AS h3, c.count, c.worst_level,
                   CAST({res} AS int) AS resolution,
                   (ST_X(o.centre) >= :left_{i} AND ST_X(o.centre) < :right_{i}
                    AND ST_Y(o.centre) > :bottom_{i} AND ST_Y(o.centre) <= :top_{i})
                       AS centroid_in_tile{columns}
              FROM cells_{i} AS c
              JOIN h3_cell_outlines AS o ON o.cell = c.cell, tile
             WHERE o.outline && tile.env_drawn
        ) AS cut
         WHERE geom IS NOT NULL
         ORDER BY cell
         LIMIT :cap + 1),
    missing_{i} AS (
        SELECT array_agg(c.cell) AS cells
          FROM cells_{i} AS c
         WHERE NOT EXISTS (SELECT 1 FROM h3_cell_outlines AS o WHERE o.cell = c.cell))
"""


def stored_counts_apply(layer: Layer, filters: TileFilters) -> bool:
    """Whether the stored counts answer this tile: they hold every risk point by sector and
    level, so sector= and level= apply to them, but a CQL2 filter (any field) or a scope
    smaller than the city (by grid code) needs the points themselves."""
    return (layer.source_table == AGGREGATED_TABLE and not layer.source_filter
            and not filters.cql and filters.scope.is_city)


def hexagon_sql(i: int, layer: Layer, tile: morecantile.Tile, filters: TileFilters,
                sectors: Sequence[str], extent: int, buffer: int,
                stored: bool | None = None) -> tuple[str, dict]:
    """The CTEs (``cells_i``, ``rows_i``, ``missing_i``) of a tile's hexagons, counted per
    sector of ``sectors``, from the stored counts where they apply (``stored=None``), else
    from the points; ``stored=False`` forces the points (tests compare both)."""
    res = resolution_for_zoom(tile.z)
    predicate, params = filter_sql(filters, layer, str(i))
    if stored is None:
        stored = stored_counts_apply(layer, filters)
    per_sector = _STORED_SECTOR if stored else _LIVE_SECTOR
    # Sector codes are bound values; the column names are numbered, named in rows_i.
    counted = "".join(f", {per_sector.format(i=i, j=j)} AS s{j}" for j in range(len(sectors)))
    if stored:
        # Only sector_code/level clauses here (see stored_counts_apply): columns of both tables.
        grouped = _STORED.format(i=i, res=int(res), filters=predicate, sectors=counted)
    else:
        # The column name comes from a fixed range of integers; source_filter from the registry.
        grouped = _LIVE.format(i=i, cell_column=f'"h3_r{int(res)}"',
                               table=f'"{layer.source_table}"', where=layer.where,
                               filters=predicate, sectors=counted)
    columns = "".join(f", c.s{j} AS {quote('count_' + code)}" for j, code in enumerate(sectors))
    params.update({f"sector_{i}_{j}": code for j, code in enumerate(sectors)})
    west, south, east, north = search_bounds(tile, res)
    left, bottom, right, top = mercator_bounds(tile)
    params.update({f"west_{i}": west, f"south_{i}": south, f"east_{i}": east,
                   f"north_{i}": north, f"left_{i}": left, f"bottom_{i}": bottom,
                   f"right_{i}": right, f"top_{i}": top})
    ctes = _HEXAGONS.format(i=i, grouped=grouped, res=int(res), extent=extent, buffer=buffer,
                            columns=columns)
    return ctes, params


def mercator_bounds(tile: morecantile.Tile) -> tuple[float, float, float, float]:
    """The tile's Web Mercator bounds, each edge from its own index, so neighbouring tiles
    share their edges bit for bit and every centre has exactly one owner. (By hand:
    morecantile's xy_bounds costs ~0.5 ms a call.)"""
    half, size = math.pi * EARTH_RADIUS_M, 2 * math.pi * EARTH_RADIUS_M / 2**tile.z
    return (-half + tile.x * size, half - (tile.y + 1) * size,
            -half + (tile.x + 1) * size, half - tile.y * size)


def buffered_bounds(tile: morecantile.Tile,
                    fraction: float = BUFFER_FRACTION) -> tuple[float, float, float, float]:
    """The tile grown by its MVT buffer (or ``fraction`` of its width), in degrees: where a
    hexagon is drawn at all.

    Inverse Mercator by hand: morecantile wraps longitudes past 180, which would turn the
    grown world tile inside out (and goes through pyproj, ~50 us a call).
    """
    left, bottom, right, top = mercator_bounds(tile)
    grow = (right - left) * fraction

    def degrees(x: float, y: float) -> tuple[float, float]:
        return (math.degrees(x / EARTH_RADIUS_M),
                math.degrees(math.atan(math.sinh(y / EARTH_RADIUS_M))))

    west, south = degrees(left - grow, bottom - grow)
    east, north = degrees(right + grow, top + grow)
    return west, south, east, north

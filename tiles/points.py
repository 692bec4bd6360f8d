"""Risk points at and above the aggregation zoom, kept within a tile byte budget.

A command-hall screen over the dense core asks for tiles holding thousands of points; with
every field a point costs ~95 bytes, so a central zoom-12 tile of the full city was 830 KB.
The tile is built in one statement that first counts the (filtered) points it would hold,
then picks the cheapest form that still shows every point:

* ``detail``: at most ``DETAIL_CAP`` points (``TWIN_TILES_DETAIL_CAP``), each with every
  field of the layer;
* ``points``: at most ``POINT_CAP`` points (``TWIN_TILES_POINT_CAP``), each with its id,
  ``level`` and ``sector_code``
  (~20 bytes; the full record is one ``/collections/risk_points/items/{id}`` away);
* ``clusters``: more than that. The tile is cut into a grid of ``CLUSTER_CELL`` x
  ``CLUSTER_CELL`` tile units aligned with the tile, so each cell lies in exactly one tile.
  A cell holding one point sends that point (as in ``points``); a cell holding several sends
  one feature at the cell's centre with ``count`` (how many) and ``level`` (the worst).

Counts are exact: the points of a tile are the ``points`` features inside it plus the sum of
``count`` over the cluster features inside it. The points are read from the tile grown by
one cell, so a cell in the buffer ring is counted whole, exactly as its own tile counts it.
"""

from __future__ import annotations

from dataclasses import dataclass

from tiles.filters import TileFilters, filter_sql, quote
from twin.core.layer import Layer

DETAIL_CAP = 800
POINT_CAP = 4000
# Tile units (of 4096) per cluster cell side: 32 x 32 cells per tile, ~16 px on screen.
CLUSTER_CELL = 128
# Fields every point keeps at every budget: enough to place, identify and colour it.
THIN_FIELDS = ("id", "level", "sector_code")
CLUSTER_FIELDS = {"count": "Number"}
BUDGETED_TABLE = "risk_points"


def budgeted(layer: Layer) -> bool:
    names = {f["name"] for f in layer.fields}
    return layer.source_table == BUDGETED_TABLE and set(THIN_FIELDS) <= names


@dataclass(frozen=True)
class BudgetedSql:
    ctes: str
    params: dict


# Web Mercator by formula: through PROJ, ST_Transform costs ~6 us a point, most of the time
# of a dense tile; this is the same spherical projection (EPSG:3857) as plain arithmetic.
# Latitudes are clamped where the square world ends, as the tile grid does.
MERCATOR_X = "6378137.0 * radians(ST_X({geom}))"
MERCATOR_Y = ("6378137.0 * ln(tan(pi() / 4 + radians(LEAST(GREATEST(ST_Y({geom}), -85.06), "
              "85.06)) / 2))")


def mercator_point(geom: str) -> str:
    """SQL for the EPSG:3857 point of a lon/lat point expression ``geom``."""
    return (f"ST_SetSRID(ST_MakePoint({MERCATOR_X.format(geom=geom)}, "
            f"{MERCATOR_Y.format(geom=geom)}), 3857)")


_BUDGETED = """
    points_{i} AS MATERIALIZED (
        SELECT {x} AS x, {y} AS y{columns}
          FROM {table} AS source, tile
         WHERE source.geom && tile.ring_4326 AND ({where}){filters}
    ),
    tier_{i} AS (
        SELECT CASE WHEN count(*) <= :detail_cap THEN 'detail'
                    WHEN count(*) <= :point_cap THEN 'points' ELSE 'clusters' END AS tier
          FROM points_{i}
    ),
    cells_{i} AS (
        -- Where a cell holds one point, min() of each column is that point's value.
        SELECT floor((p.x - tile.x0) / tile.cell) AS cx, floor((tile.y0 - p.y) / tile.cell) AS cy,
               count(*) AS n, min(p.level) AS worst, min(p.id) AS id,
               min(p.sector_code) AS sector_code, min(p.x) AS x, min(p.y) AS y
          FROM points_{i} AS p, tile
         WHERE (SELECT tier FROM tier_{i}) = 'clusters'
         GROUP BY 1, 2
    ),
    rows_{i} AS (
        SELECT * FROM (
            SELECT ST_AsMVTGeom(ST_SetSRID(ST_MakePoint(p.x, p.y), 3857), tile.env, {extent},
                                {buffer}, true) AS geom,
                   p.id, p.level, p.sector_code{detail}, NULL AS count
              FROM points_{i} AS p, tile
             WHERE (SELECT tier FROM tier_{i}) <> 'clusters'
            UNION ALL
            SELECT ST_AsMVTGeom(ST_SetSRID(
                       CASE WHEN c.n = 1 THEN ST_MakePoint(c.x, c.y)
                            ELSE ST_MakePoint(tile.x0 + (c.cx + 0.5) * tile.cell,
                                              tile.y0 - (c.cy + 0.5) * tile.cell) END, 3857),
                       tile.env, {extent}, {buffer}, true),
                   CASE WHEN c.n = 1 THEN c.id END, c.worst,
                   CASE WHEN c.n = 1 THEN c.sector_code END{nulls},
                   CASE WHEN c.n > 1 THEN c.n END
              FROM cells_{i} AS c, tile
        ) AS cut
         WHERE geom IS NOT NULL
         LIMIT :cap + 1)
"""


def budgeted_sql(i: int, layer: Layer, filters: TileFilters, extent: int,
                 buffer: int) -> BudgetedSql:
    """The CTEs (``points_i`` .. ``rows_i``) of one budgeted risk-point layer."""
    others = [f["name"] for f in layer.fields if f["name"] not in THIN_FIELDS]
    columns = "".join(f", source.{quote(name)}" for name in (*THIN_FIELDS, *others))
    detail = "".join(
        f", CASE WHEN (SELECT tier FROM tier_{i}) = 'detail' THEN p.{quote(name)} END"
        f" AS {quote(name)}" for name in others)
    # Untyped NULLs take their column's type from the first branch of the UNION.
    nulls = "".join(", NULL" for _ in others)
    predicate, params = filter_sql(filters, layer, str(i))
    assert layer.source_table is not None  # only budgeted(layer)s come here: risk_points
    # source_filter is a fixed predicate from the registry, never user input.
    ctes = _BUDGETED.format(i=i, x=MERCATOR_X.format(geom="source.geom"),
                            y=MERCATOR_Y.format(geom="source.geom"), columns=columns,
                            table=quote(layer.source_table),
                            where=layer.where, filters=predicate, detail=detail, nulls=nulls,
                            extent=extent, buffer=buffer)
    return BudgetedSql(ctes, params)

"""Mapbox vector tiles made by PostGIS: one MVT layer per registry layer, in one query.

Each layer becomes a CTE of rows already cut to the tile (``ST_AsMVTGeom``); the final SELECT
returns one ``ST_AsMVT`` per layer plus its row count, so a capped layer is reported, never
silently truncated. Layers below their ``min_zoom`` (or with nothing in the tile) are sent as
empty MVT layers, so a client always finds every layer it asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import morecantile
from sqlalchemy.ext.asyncio import AsyncConnection

from tiles import hexagons, outlines, points
from tiles.filters import TileFilters, cql_sql, filter_sql, quote
from tiles.sql import fetch_row
from twin.core.errors import InvalidParameter
from twin.core.layer import Layer

EXTENT = 4096
BUFFER = 64
# More features than this in one layer of one tile are cut, and the response says so
# (the default of TWIN_TILES_FEATURE_CAP).
MAX_FEATURES_PER_LAYER = 20_000
# Lines and polygons are simplified to half a tile pixel below this zoom (points never are).
SIMPLIFY_BELOW_ZOOM = 16
WEB_MERCATOR_WIDTH_M = 2 * 20037508.342789244
INTEGER_TYPES = {"smallint", "integer", "bigint"}


@dataclass(frozen=True)
class TileOptions:
    filters: TileFilters = TileFilters()
    # False sends every risk point with every field at every zoom (as a plain PostGIS tile
    # server would): no hexagons, no byte budget.
    aggregate: bool = True
    # Risk points become H3 hexagons below this zoom (0: never) and are kept within the
    # byte budget of tiles.points from it on.
    aggregate_below: int = hexagons.AGGREGATE_BELOW_ZOOM
    feature_cap: int = MAX_FEATURES_PER_LAYER
    # Byte budget of risk-point tiles (see tiles.points).
    detail_cap: int = points.DETAIL_CAP
    point_cap: int = points.POINT_CAP
    # Hexagons from the stored counts where they apply (None), or always from the points
    # (False: tests compare both; the tile is the same).
    stored_counts: bool | None = None
    # The sector codes hexagons count separately (``count_<code>``): the sectors table.
    sectors: tuple[str, ...] = ()


@dataclass(frozen=True)
class VectorTile:
    content: bytes
    # Layer id -> features kept, for every layer that hit the feature cap.
    truncated: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _LayerPart:
    name: str
    cte: str
    params: dict
    feature_id: str | None
    # Hexagon parts also answer which of their cells have no stored outline yet.
    hexagons: bool = False


def feature_id_column(layer: Layer) -> str | None:
    """The first field (the id column) is the MVT feature id when it is an integer."""
    if layer.fields and layer.fields[0]["type"] in INTEGER_TYPES:
        return layer.fields[0]["name"]
    return None


def check_vector_layers(layers: Sequence[Layer], filters: TileFilters) -> None:
    for layer in layers:
        if layer.kind != "vector":
            raise InvalidParameter(f"layer '{layer.id}' is a {layer.kind} layer; "
                                   "vector tiles serve vector layers only")
    if filters.active and not any(
            filters.applies_to({f["name"] for f in layer.fields}) for layer in layers):
        raise InvalidParameter("the sector and level filters apply to risk_points only; "
                               "none of the requested layers has those fields")
    if filters.cql:
        # Compiled once per layer here too, so a bad filter is refused before any query runs.
        for layer in layers:
            cql_sql(filters.cql, layer, "check")


def empty_layer(name: str) -> bytes:
    """An MVT layer with no features (protobuf: Tile.layers = {version 2, name, extent})."""
    encoded = name.encode()
    body = (b"\x78\x02" + b"\x0a" + _varint(len(encoded)) + encoded
            + b"\x28" + _varint(EXTENT))
    return b"\x1a" + _varint(len(body)) + body


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_FEATURES = """
    rows_{i} AS (
        SELECT * FROM (
            SELECT ST_AsMVTGeom({geom}, tile.env, {extent}, {buffer}, true) AS geom{columns}
              FROM {table} AS source, tile
             WHERE source.geom && tile.env_4326 AND ({where}){filters}
        ) AS cut
         WHERE geom IS NOT NULL
         LIMIT :cap + 1)
"""


def _features_part(i: int, layer: Layer, z: int, filters: TileFilters) -> _LayerPart:
    geom = "ST_Transform(source.geom, 3857)"
    if layer.geometry_type == "Point":
        geom = points.mercator_point("source.geom")
    params: dict = {}
    if layer.geometry_type not in ("Point", "MultiPoint") and z < SIMPLIFY_BELOW_ZOOM:
        # Half a tile pixel: invisible after ST_AsMVTGeom snaps to the grid, but much less to clip.
        geom = f"ST_Simplify({geom}, :tolerance_{i}, true)"
        params[f"tolerance_{i}"] = WEB_MERCATOR_WIDTH_M / 2**z / EXTENT / 2
    predicate, filter_params = filter_sql(filters, layer, str(i))
    params.update(filter_params)
    columns = "".join(f", source.{quote(f['name'])}" for f in layer.fields)
    # check_vector_layers let only vector layers through, and each has a table.
    assert layer.source_table is not None, f"vector layer '{layer.id}' has no table"
    # source_filter is a fixed predicate from the registry, never user input.
    cte = _FEATURES.format(i=i, geom=geom, extent=EXTENT, buffer=BUFFER, columns=columns,
                           table=quote(layer.source_table), where=layer.where,
                           filters=predicate)
    return _LayerPart(layer.id, cte, params, feature_id_column(layer))


def _hexagons_part(i: int, layer: Layer, tile: morecantile.Tile,
                   options: TileOptions) -> _LayerPart:
    ctes, params = hexagons.hexagon_sql(i, layer, tile, options.filters, options.sectors,
                                        EXTENT, BUFFER, options.stored_counts)
    return _LayerPart(layer.id, ctes, params, "cell", hexagons=True)


def _budgeted_part(i: int, layer: Layer, filters: TileFilters) -> _LayerPart:
    made = points.budgeted_sql(i, layer, filters, EXTENT, BUFFER)
    return _LayerPart(layer.id, made.ctes, made.params, feature_id_column(layer))


def _composite_query(parts: Sequence[_LayerPart], options: TileOptions) -> tuple[str, dict]:
    ctes = ",".join(part.cte for part in parts)
    outputs = ",\n".join(
        f"(SELECT ST_AsMVT(r, :name_{i}, {EXTENT}, 'geom', :fid_{i}) "
        f"FROM (SELECT * FROM rows_{i} LIMIT :cap) AS r) AS mvt_{i}, "
        f"(SELECT count(*) FROM rows_{i}) AS n_{i}, "
        + (f"(SELECT cells FROM missing_{i})" if part.hexagons else "NULL::bigint[]")
        + f" AS missing_{i}"
        for i, part in enumerate(parts))
    query = f"""
        WITH tile AS (
            SELECT ST_TileEnvelope(:z, :x, :y) AS env,
                   ST_TileEnvelope(:z, :x, :y, margin => :margin) AS env_drawn,
                   ST_Transform(ST_TileEnvelope(:z, :x, :y, margin => :margin), 4326) AS env_4326,
                   ST_Transform(ST_TileEnvelope(:z, :x, :y, margin => :ring), 4326) AS ring_4326,
                   CAST(:cell AS float8) AS cell,
                   ST_XMin(ST_TileEnvelope(:z, :x, :y)) AS x0,
                   ST_YMax(ST_TileEnvelope(:z, :x, :y)) AS y0
        ),{ctes}
        SELECT {outputs}
    """
    params: dict = {"margin": BUFFER / EXTENT, "ring": points.CLUSTER_CELL / EXTENT,
                    "cap": options.feature_cap, "detail_cap": options.detail_cap,
                    "point_cap": options.point_cap}
    for i, part in enumerate(parts):
        params.update(part.params)
        params[f"name_{i}"] = part.name
        params[f"fid_{i}"] = part.feature_id
    return query, params


def _parts(layers: Sequence[Layer], tile: morecantile.Tile,
           options: TileOptions) -> list[_LayerPart]:
    parts: list[_LayerPart] = []
    for layer in layers:
        if tile.z < layer.min_zoom:
            continue
        i = len(parts)
        if options.aggregate and hexagons.aggregates(layer, tile.z, options.aggregate_below):
            parts.append(_hexagons_part(i, layer, tile, options))
        elif options.aggregate and points.budgeted(layer):
            parts.append(_budgeted_part(i, layer, options.filters))
        else:
            parts.append(_features_part(i, layer, tile.z, options.filters))
    return parts


async def _run(conn: AsyncConnection, parts: Sequence[_LayerPart], tile: morecantile.Tile,
               options: TileOptions) -> tuple:
    query, params = _composite_query(parts, options)
    width = WEB_MERCATOR_WIDTH_M / 2**tile.z
    params.update(z=tile.z, x=tile.x, y=tile.y, cell=width * points.CLUSTER_CELL / EXTENT)
    return await fetch_row(conn, query, params)


async def render_tile(conn: AsyncConnection, layers: Sequence[Layer], tile: morecantile.Tile,
                      options: TileOptions = TileOptions()) -> VectorTile:
    """One MVT holding one layer per requested layer, in the order asked."""
    check_vector_layers(layers, options.filters)
    parts = _parts(layers, tile, options)
    made: dict[str, tuple[bytes, int]] = {}
    if parts:
        row = await _run(conn, parts, tile, options)
        missing = {cell for i in range(len(parts)) for cell in row[3 * i + 2] or ()}
        if missing:
            # Cells no outline was stored for (points written since): store them, draw again.
            await outlines.store(conn, missing)
            row = await _run(conn, parts, tile, options)
        made = {part.name: (row[3 * i], row[3 * i + 1]) for i, part in enumerate(parts)}
    content, truncated = b"", {}
    for layer in layers:
        mvt, count = made.get(layer.id, (b"", 0))
        content += mvt or empty_layer(layer.id)
        if count > options.feature_cap:
            truncated[layer.id] = options.feature_cap
    return VectorTile(content, truncated)

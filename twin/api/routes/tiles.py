"""Vector tiles: OGC API - Tiles and XYZ/TileJSON. Parsing and HTTP only; tiles/ builds them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tiles import metadata
from tiles.cache import cached_tile
from tiles.filters import read_filters
from tiles.grid import tile_address, tile_matrix_set
from tiles.style import risk_map_style
from tiles.vector import TileOptions
from twin.api.deps import RegistryDep, ScopeDep, SettingsDep
from twin.core.principal import Scope
from twin.core.scope import visible_layer

router = APIRouter(tags=["tiles"])

# OGC conformance classes this module implements, collected by /conformance.
CONFORMANCE: list[str] = [
    "http://www.opengis.net/spec/ogcapi-tiles-1/1.0/conf/core",
    "http://www.opengis.net/spec/ogcapi-tiles-1/1.0/conf/tileset",
    "http://www.opengis.net/spec/ogcapi-tiles-1/1.0/conf/tilesets-list",
    "http://www.opengis.net/spec/ogcapi-tiles-1/1.0/conf/geodata-tilesets",
    "http://www.opengis.net/spec/ogcapi-tiles-1/1.0/conf/mvt",
    "http://www.opengis.net/spec/tms/2.0/conf/tilematrixset",
    "http://www.opengis.net/spec/tms/2.0/conf/json-tilematrixset",
]


class _TileConnection:
    """A connection of the tile pool, checked out on first use: a cached tile needs none.

    Autocommit: a tile only reads, one statement at a time, so no transaction is opened and
    none is rolled back when the connection goes back to the pool. ``fresh=True`` replaces a
    connection that broke (the tile pool has no pre-ping; tiles.cache retries once).
    """

    def __init__(self, engine: AsyncEngine):
        self._engine = engine
        self._conn: AsyncConnection | None = None

    async def __call__(self, fresh: bool = False) -> AsyncConnection:
        if fresh:
            await self.close()
        if self._conn is None:
            conn = await self._engine.connect()
            self._conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        return self._conn

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()


SectorQuery = Annotated[str | None, Query(description="comma list of sector codes")]
LevelQuery = Annotated[str | None, Query(description="comma list of risk levels, 1-4")]
AggregateQuery = Annotated[bool, Query(
    description="risk points as H3 hexagons at low zoom and within a byte budget above; "
    "false sends every point with every field")]
FilterQuery = Annotated[str | None, Query(
    alias="filter", description="CQL2-text over the fields of every requested layer")]


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


async def _tile_response(request: Request, layer_ids: Sequence[str], z: int, x: int, y: int,
                         sector: str | None, level: str | None, cql: str | None,
                         aggregate: bool, scope: Scope) -> Response:
    """The hot path of the command hall. No dependency but the scope: a cached tile costs
    one (shared) version query and no pooled connection (see tiles.cache.DataVersions)."""
    state = request.app.state
    tile = tile_address(z, x, y)
    versions = await state.tile_versions.read()
    registry = await state.registry.current(layer_ids, versions)
    # Only what lies in the caller's jurisdiction; the cache keeps each scope's tiles apart.
    layers = [visible_layer(scope, registry, layer_id) for layer_id in layer_ids]
    settings = state.settings.tiles
    connect = _TileConnection(state.tile_engine)
    try:
        filters = await read_filters(state.sector_codes, connect, sector, level, cql, scope)
        options = TileOptions(filters, aggregate, settings.aggregate_below_zoom,
                              settings.feature_cap, settings.detail_cap, settings.point_cap,
                              sectors=await state.sector_codes.get(connect))
        made = await cached_tile(versions, connect, state.tile_cache, layers, tile, options,
                                 scope.key)
    finally:
        await connect.close()
    if made.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=made.headers)
    if "gzip" in request.headers.get("accept-encoding", ""):
        return Response(made.gzipped, media_type=metadata.MVT_MEDIA_TYPE,
                        headers=made.gzip_headers)
    return Response(made.tile.content, media_type=metadata.MVT_MEDIA_TYPE,
                    headers=made.headers)


@router.get("/tileMatrixSets", summary="Tile matrix sets")
async def list_tile_matrix_sets(request: Request) -> dict:
    return metadata.tile_matrix_sets(_base(request))


@router.get("/tileMatrixSets/{tms_id}", summary="A tile matrix set definition")
async def get_tile_matrix_set(tms_id: str) -> dict:
    tile_matrix_set(tms_id)
    return metadata.tile_matrix_set_document()


@router.get("/collections/{collection_id}/tiles", summary="Tilesets of a collection")
async def list_tilesets(collection_id: str, request: Request, registry: RegistryDep,
                        scope: ScopeDep) -> dict:
    layer = visible_layer(scope, registry, collection_id)
    return metadata.tilesets_list(layer, _base(request))


@router.get("/collections/{collection_id}/tiles/{tms_id}", summary="Tileset metadata")
async def get_tileset(collection_id: str, tms_id: str, request: Request,
                      registry: RegistryDep, scope: ScopeDep) -> dict:
    layer = visible_layer(scope, registry, collection_id)
    tile_matrix_set(tms_id)
    return metadata.tileset(layer, _base(request))


@router.get("/collections/{collection_id}/tiles/{tms_id}/{tile_matrix}/{tile_row}/{tile_col}",
            summary="A vector tile of a collection (OGC order: z/row/col)",
            response_class=Response)
async def get_collection_tile(collection_id: str, tms_id: str, tile_matrix: int, tile_row: int,
                              tile_col: int, request: Request, scope: ScopeDep,
                              sector: SectorQuery = None, level: LevelQuery = None,
                              cql: FilterQuery = None,
                              aggregate: AggregateQuery = True) -> Response:
    tile_matrix_set(tms_id)
    return await _tile_response(request, [collection_id], tile_matrix, tile_col, tile_row,
                                sector, level, cql, aggregate, scope)


@router.get("/tiles/{layer_ids}/tilejson.json", summary="TileJSON 3.0.0 of one or more layers")
async def get_tilejson(layer_ids: str, request: Request, registry: RegistryDep,
                       settings: SettingsDep, scope: ScopeDep) -> dict:
    layers = [visible_layer(scope, registry, layer_id)
              for layer_id in metadata.split_layer_ids(layer_ids)]
    url = f"{_base(request)}/tiles/{','.join(layer.id for layer in layers)}/{{z}}/{{x}}/{{y}}.mvt"
    return metadata.tilejson(layers, url, settings.tiles.aggregate_below_zoom)


@router.get("/tiles/{layer_ids}/{z}/{x}/{y}.mvt", response_class=Response,
            summary="An XYZ vector tile; several comma-separated layers give one composite tile")
async def get_xyz_tile(layer_ids: str, z: int, x: int, y: int, request: Request,
                       scope: ScopeDep, sector: SectorQuery = None, level: LevelQuery = None,
                       cql: FilterQuery = None,
                       aggregate: AggregateQuery = True) -> Response:
    return await _tile_response(request, metadata.split_layer_ids(layer_ids), z, x, y, sector,
                                level, cql, aggregate, scope)


@router.get("/styles/risk-map.json", summary="MapLibre style of the one map, over twin's tiles")
async def get_risk_map_style(request: Request, registry: RegistryDep,
                             settings: SettingsDep) -> dict:
    return risk_map_style(registry, _base(request), settings.tiles.aggregate_below_zoom)

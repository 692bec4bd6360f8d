"""Vector tiles: OGC API - Tiles and XYZ/TileJSON. Parsing and HTTP only; tiles/ builds them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from sqlalchemy.ext.asyncio import AsyncConnection

from layers.registry import Layer
from tiles import metadata
from tiles.cache import TileCache, cached_tile
from tiles.filters import parse_filters
from tiles.grid import tile_address, tile_matrix_set
from tiles.style import risk_map_style
from tiles.vector import TileOptions
from twin.api.deps import RegistryDep, SettingsDep

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

# Every screen revalidates (the ETag changes exactly when the data does), but may store.
CACHE_CONTROL = "public, no-cache"


def get_tile_cache(request: Request) -> TileCache | None:
    """The app's tile cache, made in its lifespan; None when TWIN_TILES_CACHE is off."""
    return request.app.state.tile_cache


async def get_tile_connection(request: Request) -> AsyncIterator[AsyncConnection]:
    """A pooled connection in autocommit: a tile only reads, one statement at a time, so no
    transaction is opened and none is rolled back when the connection goes back to the pool
    (one round trip less on every tile, which matters most for cached ones)."""
    async with request.app.state.engine.connect() as conn:
        yield await conn.execution_options(isolation_level="AUTOCOMMIT")


TileCacheDep = Annotated[TileCache | None, Depends(get_tile_cache)]
TileConnDep = Annotated[AsyncConnection, Depends(get_tile_connection)]
SectorQuery = Annotated[str | None, Query(description="comma list of sector codes")]
LevelQuery = Annotated[str | None, Query(description="comma list of risk levels, 1-4")]
AggregateQuery = Annotated[bool, Query(
    description="risk points as H3 hexagons at low zoom and within a byte budget above; "
    "false sends every point with every field")]
FilterQuery = Annotated[str | None, Query(
    alias="filter", description="CQL2-text over the fields of every requested layer")]


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


async def _tile_response(request: Request, conn: AsyncConnection, registry: RegistryDep,
                         cache: TileCache | None, layers: Sequence[Layer], z: int, x: int,
                         y: int, sector: str | None, level: str | None, cql: str | None,
                         aggregate: bool) -> Response:
    tile = tile_address(z, x, y)
    filters = await parse_filters(conn, sector, level, cql)
    settings = request.app.state.settings.tiles
    options = TileOptions(filters, aggregate, settings.aggregate_below_zoom,
                          settings.feature_cap, settings.detail_cap, settings.point_cap)
    made = await cached_tile(conn, registry, cache, layers, tile, options)
    headers = {"ETag": made.etag, "Cache-Control": CACHE_CONTROL, "Vary": "Accept-Encoding"}
    if made.tile.truncated:
        headers["X-Tile-Truncated"] = ", ".join(
            f"{layer}={kept}" for layer, kept in made.tile.truncated.items())
    if made.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    content = made.tile.content
    if "gzip" in request.headers.get("accept-encoding", ""):
        content, headers["Content-Encoding"] = made.gzipped, "gzip"
    return Response(content, media_type=metadata.MVT_MEDIA_TYPE, headers=headers)


@router.get("/tileMatrixSets", summary="Tile matrix sets")
async def list_tile_matrix_sets(request: Request) -> dict:
    return metadata.tile_matrix_sets(_base(request))


@router.get("/tileMatrixSets/{tms_id}", summary="A tile matrix set definition")
async def get_tile_matrix_set(tms_id: str) -> dict:
    tile_matrix_set(tms_id)
    return metadata.tile_matrix_set_document()


@router.get("/collections/{collection_id}/tiles", summary="Tilesets of a collection")
async def list_tilesets(collection_id: str, request: Request, registry: RegistryDep) -> dict:
    layer = registry.get(collection_id)
    return metadata.tilesets_list(layer, _base(request))


@router.get("/collections/{collection_id}/tiles/{tms_id}", summary="Tileset metadata")
async def get_tileset(collection_id: str, tms_id: str, request: Request,
                      registry: RegistryDep) -> dict:
    layer = registry.get(collection_id)
    tile_matrix_set(tms_id)
    return metadata.tileset(layer, _base(request))


@router.get("/collections/{collection_id}/tiles/{tms_id}/{tile_matrix}/{tile_row}/{tile_col}",
            summary="A vector tile of a collection (OGC order: z/row/col)",
            response_class=Response)
async def get_collection_tile(collection_id: str, tms_id: str, tile_matrix: int, tile_row: int,
                              tile_col: int, request: Request, conn: TileConnDep,
                              registry: RegistryDep, cache: TileCacheDep,
                              sector: SectorQuery = None, level: LevelQuery = None,
                              cql: FilterQuery = None,
                              aggregate: AggregateQuery = True) -> Response:
    layers = [registry.get(collection_id)]
    tile_matrix_set(tms_id)
    return await _tile_response(request, conn, registry, cache, layers, tile_matrix, tile_col,
                                tile_row, sector, level, cql, aggregate)


@router.get("/tiles/{layer_ids}/tilejson.json", summary="TileJSON 3.0.0 of one or more layers")
async def get_tilejson(layer_ids: str, request: Request, registry: RegistryDep,
                       settings: SettingsDep) -> dict:
    layers = metadata.resolve_layers(registry, layer_ids)
    url = f"{_base(request)}/tiles/{','.join(layer.id for layer in layers)}/{{z}}/{{x}}/{{y}}.mvt"
    return metadata.tilejson(layers, url, settings.tiles.aggregate_below_zoom)


@router.get("/tiles/{layer_ids}/{z}/{x}/{y}.mvt", response_class=Response,
            summary="An XYZ vector tile; several comma-separated layers give one composite tile")
async def get_xyz_tile(layer_ids: str, z: int, x: int, y: int, request: Request,
                       conn: TileConnDep, registry: RegistryDep, cache: TileCacheDep,
                       sector: SectorQuery = None, level: LevelQuery = None,
                       cql: FilterQuery = None,
                       aggregate: AggregateQuery = True) -> Response:
    layers = metadata.resolve_layers(registry, layer_ids)
    return await _tile_response(request, conn, registry, cache, layers, z, x, y,
                                sector, level, cql, aggregate)


@router.get("/styles/risk-map.json", summary="MapLibre style of the one map, over twin's tiles")
async def get_risk_map_style(request: Request, registry: RegistryDep,
                             settings: SettingsDep) -> dict:
    return risk_map_style(registry, _base(request), settings.tiles.aggregate_below_zoom)

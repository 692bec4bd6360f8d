"""Vector tiles: OGC API - Tiles and XYZ/TileJSON. Parsing and HTTP only; tiles/ builds them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response

from layers.registry import Layer
from tiles import metadata
from tiles.cache import TileCache, cached_tile
from tiles.filters import parse_filters
from tiles.grid import tile_address, tile_matrix_set
from tiles.hexagons import AGGREGATE_BELOW_ZOOM
from tiles.style import risk_map_style
from tiles.vector import TileOptions
from twin.api.deps import ConnDep, RegistryDep

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


def get_tile_cache(request: Request) -> TileCache:
    # One cache per app; made on first use (move to the lifespan with a TWIN_TILES_ setting).
    if getattr(request.app.state, "tile_cache", None) is None:
        request.app.state.tile_cache = TileCache()
    return request.app.state.tile_cache


TileCacheDep = Annotated[TileCache, Depends(get_tile_cache)]
SectorQuery = Annotated[str | None, Query(description="comma list of sector codes")]
LevelQuery = Annotated[str | None, Query(description="comma list of risk levels, 1-4")]
AggregateQuery = Annotated[bool, Query(description="risk points as H3 hexagons at low zoom")]
FilterQuery = Annotated[str | None, Query(
    alias="filter", description="CQL2-text over the fields of every requested layer")]


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


async def _tile_response(request: Request, conn: ConnDep, registry: RegistryDep,
                         cache: TileCache, layers: Sequence[Layer], z: int, x: int, y: int,
                         sector: str | None, level: str | None, cql: str | None,
                         aggregate: bool) -> Response:
    tile = tile_address(z, x, y)
    filters = await parse_filters(conn, sector, level, cql)
    options = TileOptions(filters, AGGREGATE_BELOW_ZOOM if aggregate else 0)
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
                              tile_col: int, request: Request, conn: ConnDep,
                              registry: RegistryDep, cache: TileCacheDep,
                              sector: SectorQuery = None, level: LevelQuery = None,
                              cql: FilterQuery = None,
                              aggregate: AggregateQuery = True) -> Response:
    layers = [registry.get(collection_id)]
    tile_matrix_set(tms_id)
    return await _tile_response(request, conn, registry, cache, layers, tile_matrix, tile_col,
                                tile_row, sector, level, cql, aggregate)


@router.get("/tiles/{layer_ids}/tilejson.json", summary="TileJSON 3.0.0 of one or more layers")
async def get_tilejson(layer_ids: str, request: Request, registry: RegistryDep) -> dict:
    layers = metadata.resolve_layers(registry, layer_ids)
    url = f"{_base(request)}/tiles/{','.join(layer.id for layer in layers)}/{{z}}/{{x}}/{{y}}.mvt"
    return metadata.tilejson(layers, url)


@router.get("/tiles/{layer_ids}/{z}/{x}/{y}.mvt", response_class=Response,
            summary="An XYZ vector tile; several comma-separated layers give one composite tile")
async def get_xyz_tile(layer_ids: str, z: int, x: int, y: int, request: Request,
                       conn: ConnDep, registry: RegistryDep, cache: TileCacheDep,
                       sector: SectorQuery = None, level: LevelQuery = None,
                       cql: FilterQuery = None,
                       aggregate: AggregateQuery = True) -> Response:
    layers = metadata.resolve_layers(registry, layer_ids)
    return await _tile_response(request, conn, registry, cache, layers, z, x, y,
                                sector, level, cql, aggregate)


@router.get("/styles/risk-map.json", summary="MapLibre style of the one map, over twin's tiles")
async def get_risk_map_style(request: Request, registry: RegistryDep) -> dict:
    return risk_map_style(registry, _base(request))

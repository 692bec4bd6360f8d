"""Raster and terrain tiles of raster layers, and their TileJSON. tiles/ renders them.

Suffixes differ from the vector tiles' ``.mvt`` so both share the ``/tiles/{layer}/…`` space;
``.terrain.png`` is declared before ``.png`` so it is matched first.

A raster layer outside the caller's jurisdiction (an unshared upload of another centre) is
404 on every route, as a hidden vector collection is, and before the ETag is compared, so a
304 never tells a caller that the layer exists.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from tiles import raster, terrain
from tiles.grid import tile_address
from twin.api.deps import ConnDep, RegistryDep, ScopeDep
from twin.core.scope import visible_layer

router = APIRouter(tags=["tiles"])

CACHE_CONTROL = "public, no-cache"
EncodingQuery = Annotated[Literal["mapbox", "terrarium"], Query(
    description="terrain-RGB packing: Mapbox terrain-RGB or Mapzen Terrarium")]


async def _etag(conn: ConnDep, registry: RegistryDep, layer_id: str, *parts) -> str:
    version = (await registry.data_versions(conn)).get(layer_id, 0)
    return '"' + "-".join(str(p) for p in (layer_id, version, *parts)) + '"'


def _respond(content: bytes | None, media_type: str, etag: str) -> Response:
    headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL}
    if content is None:
        return Response(status_code=304, headers=headers)
    return Response(content, media_type=media_type, headers=headers)


@router.get("/tiles/{layer_id}/{z}/{x}/{y}.terrain.png", response_class=Response,
            summary="Terrain-RGB/Terrarium tile of a DEM layer (MapLibre raster-dem)")
async def get_terrain_tile(layer_id: str, z: int, x: int, y: int, request: Request,
                           conn: ConnDep, registry: RegistryDep, scope: ScopeDep,
                           encoding: EncodingQuery = "mapbox") -> Response:
    tile_address(z, x, y)  # 400 for an address off the grid, before rasterio sees it
    layer = visible_layer(scope, registry, layer_id)
    etag = await _etag(conn, registry, layer_id, z, x, y, encoding)
    if etag in request.headers.get("if-none-match", ""):
        return _respond(None, "image/png", etag)
    content = await run_in_threadpool(terrain.terrain_tile, layer, z, x, y, encoding)
    return _respond(content, "image/png", etag)


async def _raster(request: Request, conn: ConnDep, registry: RegistryDep, scope: ScopeDep,
                  layer_id: str, z: int, x: int, y: int, fmt: str) -> Response:
    tile_address(z, x, y)  # 400 for an address off the grid, before rasterio sees it
    layer = visible_layer(scope, registry, layer_id)
    raster.raster_layer(layer)
    etag = await _etag(conn, registry, layer_id, z, x, y, fmt)
    media_type = raster.FORMATS[fmt][1]
    if etag in request.headers.get("if-none-match", ""):
        return _respond(None, media_type, etag)
    tile = await run_in_threadpool(raster.render_tile, layer, z, x, y, fmt)
    return _respond(tile.content, tile.media_type, etag)


@router.get("/tiles/{layer_id}/{z}/{x}/{y}.png", response_class=Response,
            summary="PNG tile of a raster layer")
async def get_png_tile(layer_id: str, z: int, x: int, y: int, request: Request, conn: ConnDep,
                       registry: RegistryDep, scope: ScopeDep) -> Response:
    return await _raster(request, conn, registry, scope, layer_id, z, x, y, "png")


@router.get("/tiles/{layer_id}/{z}/{x}/{y}.webp", response_class=Response,
            summary="WebP tile of a raster layer")
async def get_webp_tile(layer_id: str, z: int, x: int, y: int, request: Request,
                        conn: ConnDep, registry: RegistryDep, scope: ScopeDep) -> Response:
    return await _raster(request, conn, registry, scope, layer_id, z, x, y, "webp")


@router.get("/tiles/{layer_id}/raster-tilejson.json",
            summary="TileJSON 3.0.0 of a raster layer (?terrain=mapbox|terrarium for raster-dem)")
async def get_raster_tilejson(layer_id: str, request: Request, registry: RegistryDep,
                              scope: ScopeDep, terrain_encoding: Annotated[
                                  Literal["mapbox", "terrarium"] | None,
                                  Query(alias="terrain")] = None,
                              fmt: Annotated[Literal["png", "webp"],
                                             Query(alias="format")] = "png") -> dict:
    layer = visible_layer(scope, registry, layer_id)
    raster.raster_layer(layer)
    base = f"{str(request.base_url).rstrip('/')}/tiles/{layer_id}/{{z}}/{{x}}/{{y}}"
    url = (f"{base}.terrain.png?encoding={terrain_encoding}" if terrain_encoding
           else f"{base}.{fmt}")
    west, south, east, north = layer.bbox or (-180.0, -85.0511, 180.0, 85.0511)
    document = {
        "tilejson": "3.0.0", "name": layer.title_en, "description": layer.title_zh,
        "tiles": [url], "minzoom": layer.min_zoom, "maxzoom": layer.max_zoom,
        "bounds": [west, south, east, north], "tileSize": raster.TILE_SIZE,
        "center": [(west + east) / 2, (south + north) / 2, min(layer.max_zoom, 10)],
    }
    if terrain_encoding:
        document["encoding"] = terrain_encoding
    return document

"""Raster and terrain tiles of raster layers, and their TileJSON. The tile service
(tiles/service.py) renders them, with the vector tiles' ETag and Cache-Control.

Suffixes differ from the vector tiles' ``.mvt`` so both share the ``/tiles/{layer}/…`` space;
``.terrain.png`` is declared before ``.png`` so it is matched first.

A raster layer outside the caller's jurisdiction (an unshared upload of another centre) is
404 on every route, as a hidden vector collection is, and before the ETag is compared, so a
304 never tells a caller that the layer exists.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response

from tiles import raster
from tiles.metadata import tiles_version
from tiles.service import RasterRequest
from twin.api.deps import RegistryDep, ScopeDep, VersionsDep
from twin.api.routes.tiles import DOCUMENTS, VersionQuery, tile_answer
from twin.core.principal import Scope
from twin.core.scope import visible_layer

router = APIRouter(tags=["tiles"])

EncodingQuery = Annotated[Literal["mapbox", "terrarium"], Query(
    description="terrain-RGB packing: Mapbox terrain-RGB or Mapzen Terrarium")]


async def _raster(request: Request, scope: Scope, layer_id: str, z: int, x: int, y: int,
                  fmt: str, version: str | None, encoding: str = "mapbox") -> Response:
    return tile_answer(await request.app.state.tiles.raster_tile(RasterRequest(
        layer_id, z, x, y, scope, fmt, encoding, request.headers.get("if-none-match"),
        version)))


@router.get("/tiles/{layer_id}/{z}/{x}/{y}.terrain.png", response_class=Response,
            summary="Terrain-RGB/Terrarium tile of a DEM layer (MapLibre raster-dem)")
async def get_terrain_tile(layer_id: str, z: int, x: int, y: int, request: Request,
                           scope: ScopeDep, encoding: EncodingQuery = "mapbox",
                           version: VersionQuery = None) -> Response:
    return await _raster(request, scope, layer_id, z, x, y, "terrain", version, encoding)


@router.get("/tiles/{layer_id}/{z}/{x}/{y}.png", response_class=Response,
            summary="PNG tile of a raster layer")
async def get_png_tile(layer_id: str, z: int, x: int, y: int, request: Request,
                       scope: ScopeDep, version: VersionQuery = None) -> Response:
    return await _raster(request, scope, layer_id, z, x, y, "png", version)


@router.get("/tiles/{layer_id}/{z}/{x}/{y}.webp", response_class=Response,
            summary="WebP tile of a raster layer")
async def get_webp_tile(layer_id: str, z: int, x: int, y: int, request: Request,
                        scope: ScopeDep, version: VersionQuery = None) -> Response:
    return await _raster(request, scope, layer_id, z, x, y, "webp", version)


@router.get("/tiles/{layer_id}/raster-tilejson.json",
            summary="TileJSON 3.0.0 of a raster layer (?terrain=mapbox|terrarium for raster-dem)")
async def get_raster_tilejson(layer_id: str, request: Request, response: Response,
                              registry: RegistryDep, versions: VersionsDep, scope: ScopeDep,
                              terrain_encoding: Annotated[
                                  Literal["mapbox", "terrarium"] | None,
                                  Query(alias="terrain")] = None,
                              fmt: Annotated[Literal["png", "webp"],
                                             Query(alias="format")] = "png") -> dict:
    layer = visible_layer(scope, registry, layer_id)
    raster.check_raster(layer)
    response.headers["Cache-Control"] = DOCUMENTS
    base = f"{str(request.base_url).rstrip('/')}/tiles/{layer_id}/{{z}}/{{x}}/{{y}}"
    # The layer's data version now (``v=``): those tiles are sent immutable.
    version = f"v={tiles_version(registry, [layer], versions)}"
    url = (f"{base}.terrain.png?encoding={terrain_encoding}&{version}" if terrain_encoding
           else f"{base}.{fmt}?{version}")
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

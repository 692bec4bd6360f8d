"""quantized-mesh-1.0 terrain of DEM layers. Parsing and HTTP only; tiles/ builds it.

Cesium's ``CesiumTerrainProvider.fromUrl('/collections/{id}/quantized-mesh/')`` reads
``layer.json`` there and then the ``.terrain`` tiles its ``tiles`` template names (relative
to the layer.json URL, with the data version as ``v=``). tiles/quantized_mesh.py says what
the tiles hold; a layer outside the caller's jurisdiction is 404 as its raster tiles are.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from tiles import quantized_mesh
from twin.api.deps import ScopeDep
from twin.api.routes.tiles import tile_answer

router = APIRouter(tags=["3d"])


@router.get("/collections/{collection_id}/quantized-mesh/layer.json",
            summary="Cesium layer.json of a DEM layer's quantized-mesh terrain",
            response_model=None)
async def get_layer_json(collection_id: str, request: Request,
                         scope: ScopeDep) -> Response:
    document, headers = await quantized_mesh.layer_json(
        request.app.state.tiles, collection_id, scope, request.headers.get("if-none-match"))
    if document is None:
        return Response(status_code=304, headers=headers)
    return JSONResponse(document, headers=headers)


@router.get("/collections/{collection_id}/quantized-mesh/{z}/{x}/{y}.terrain",
            response_class=Response,
            summary="A quantized-mesh-1.0 terrain tile (geographic, TMS rows; "
                    "octvertexnormals when Accept asks)")
async def get_terrain_tile(collection_id: str, z: int, x: int, y: int, request: Request,
                           scope: ScopeDep) -> Response:
    headers = request.headers
    return tile_answer(await quantized_mesh.terrain_tile(
        request.app.state.tiles, quantized_mesh.MeshRequest(
            collection_id, z, x, y, scope, headers.get("accept"),
            "gzip" in headers.get("accept-encoding", ""), headers.get("if-none-match"),
            request.query_params.get("v"))))

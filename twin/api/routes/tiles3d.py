"""3D Tiles 1.1 of 3D layers (buildings, CIM models). Parsing and HTTP only; tiles/ builds them.

URIs inside a tileset are relative to its ``tileset.json``, so a proxy in front of twin (or
a client that adds query parameters, as CesiumJS adds ``v=``) needs no rewriting.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from tiles.tiles3d import Request3D, Tiles3D
from twin.api.deps import ScopeDep
from twin.api.routes.tiles import tile_answer

router = APIRouter(tags=["3d"])

CimQuery = Annotated[str | None, Query(
    description="comma list of CIM grades to draw: 2 LOD1 blocks, 3 LOD2 roofs, 4-6 models "
                "(default all; CIM1 is the quantized-mesh terrain)", max_length=32)]


def _tiles3d(request: Request) -> Tiles3D:
    return request.app.state.tiles3d


def _request(request: Request, collection_id: str, scope, cim: str | None) -> Request3D:
    # ``v``: what CesiumJS appends from ``asset.tilesetVersion`` (immutable when current).
    return Request3D(collection_id, scope, cim, request.headers.get("if-none-match"),
                     request.query_params.get("v"))


@router.get("/collections/{collection_id}/3dtiles/tileset.json", response_class=Response,
            summary="3D Tiles 1.1 tileset of a 3D layer (implicit quadtree, glTF content)")
async def get_tileset(collection_id: str, request: Request, scope: ScopeDep,
                      cim: CimQuery = None) -> Response:
    return tile_answer(await _tiles3d(request).tileset(
        _request(request, collection_id, scope, cim), "."))


@router.get("/collections/{collection_id}/3dtiles/subtrees/{level}/{x}/{y}.subtree",
            response_class=Response, summary="An implicit-tiling subtree (availability)")
async def get_subtree(collection_id: str, level: int, x: int, y: int, request: Request,
                      scope: ScopeDep, cim: CimQuery = None) -> Response:
    return tile_answer(await _tiles3d(request).subtree(
        _request(request, collection_id, scope, cim), level, x, y))


@router.get("/collections/{collection_id}/3dtiles/content/{level}/{x}/{y}.glb",
            response_class=Response, summary="The buildings of one tile as glTF (GLB)")
async def get_content(collection_id: str, level: int, x: int, y: int, request: Request,
                      scope: ScopeDep, cim: CimQuery = None) -> Response:
    return tile_answer(await _tiles3d(request).content(
        _request(request, collection_id, scope, cim), level, x, y))


@router.get("/collections/{collection_id}/3dtiles/blocks/{building_id}.glb",
            response_class=Response,
            summary="The block of a building whose model replaces it near the camera")
async def get_block(collection_id: str, building_id: int, request: Request, scope: ScopeDep,
                    cim: CimQuery = None) -> Response:
    return tile_answer(await _tiles3d(request).block(
        _request(request, collection_id, scope, cim), building_id))


@router.get("/collections/{collection_id}/3dtiles/models/{model_id}.glb",
            response_class=Response, summary="A CIM4-6 model placed in a tileset")
async def get_model(collection_id: str, model_id: str, request: Request, scope: ScopeDep,
                    cim: CimQuery = None) -> Response:
    return tile_answer(await _tiles3d(request).model(
        _request(request, collection_id, scope, cim), model_id))

"""Vector tiles: OGC API - Tiles and XYZ/TileJSON. Parsing and HTTP only; tiles/ builds them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated
from urllib.parse import parse_qsl

from fastapi import APIRouter, FastAPI, Query, Request, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Send
from starlette.types import Scope as ASGIScope

from tiles import metadata
from tiles.buildings3d import is_buildings_layer
from tiles.grid import tile_matrix_set
from tiles.service import TileAnswer, TileRequest
from tiles.style import risk_map_style
from twin.api import access
from twin.api.deps import RegistryDep, ScopeDep, SettingsDep, VersionsDep, get_scope
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


SectorQuery = Annotated[str | None, Query(description="comma list of sector codes")]
LevelQuery = Annotated[str | None, Query(description="comma list of risk levels, 1-4")]
AggregateQuery = Annotated[bool, Query(
    description="risk points as H3 hexagons at low zoom and within a byte budget above; "
    "false sends every point with every field")]
FilterQuery = Annotated[str | None, Query(
    alias="filter", description="CQL2-text over the fields of every requested layer")]
VersionQuery = Annotated[str | None, Query(
    alias="v", description="the data versions the tile URL was made for, as TileJSON and "
    "tileset documents name it: a tile of exactly those versions is sent immutable "
    "(cacheable for a year); any other value gets the current tile, revalidated")]


# Documents that name tile URLs (and so the data versions): asked again every time, never
# kept by a shared cache (the cluster's nginx keeps tiles only).
DOCUMENTS = "no-cache"


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def tile_answer(answer: TileAnswer) -> Response:
    """The service's answer as it is: a 304 carries the validators, a tile its headers."""
    if answer.content is None:
        return Response(status_code=304, headers=answer.headers)
    return Response(answer.content, media_type=answer.media_type, headers=answer.headers)


async def _tile_response(request: Request, layer_ids: Sequence[str], z: int, x: int, y: int,
                         sector: str | None, level: str | None, cql: str | None,
                         aggregate: bool, scope: Scope, version: str | None) -> Response:
    headers = request.headers
    return tile_answer(await request.app.state.tiles.vector_tile(TileRequest(
        tuple(layer_ids), z, x, y, scope, sector, level, cql, aggregate,
        headers.get("if-none-match"), "gzip" in headers.get("accept-encoding", ""),
        version)))


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
async def get_tileset(collection_id: str, tms_id: str, request: Request, response: Response,
                      registry: RegistryDep, versions: VersionsDep, scope: ScopeDep) -> dict:
    layer = visible_layer(scope, registry, collection_id)
    response.headers["Cache-Control"] = DOCUMENTS
    tile_matrix_set(tms_id)
    return metadata.tileset(layer, _base(request),
                            metadata.tiles_version(registry, [layer], versions))


@router.get("/collections/{collection_id}/tiles/{tms_id}/{tile_matrix}/{tile_row}/{tile_col}",
            summary="A vector tile of a collection (OGC order: z/row/col)",
            response_class=Response)
async def get_collection_tile(collection_id: str, tms_id: str, tile_matrix: int, tile_row: int,
                              tile_col: int, request: Request, scope: ScopeDep,
                              sector: SectorQuery = None, level: LevelQuery = None,
                              cql: FilterQuery = None,
                              aggregate: AggregateQuery = True,
                              version: VersionQuery = None) -> Response:
    tile_matrix_set(tms_id)
    return await _tile_response(request, [collection_id], tile_matrix, tile_col, tile_row,
                                sector, level, cql, aggregate, scope, version)


@router.get("/tiles/{layer_ids}/tilejson.json", summary="TileJSON 3.0.0 of one or more layers")
async def get_tilejson(layer_ids: str, request: Request, response: Response,
                       registry: RegistryDep, versions: VersionsDep, settings: SettingsDep,
                       scope: ScopeDep) -> dict:
    """Its tile URL names the layers' data versions now (``v=``): tiles of that URL are
    immutable, and the next TileJSON after a write names the next URL."""
    response.headers["Cache-Control"] = DOCUMENTS
    layers = [visible_layer(scope, registry, layer_id)
              for layer_id in metadata.split_layer_ids(layer_ids)]
    url = (f"{_base(request)}/tiles/{','.join(layer.id for layer in layers)}/{{z}}/{{x}}/{{y}}"
           f".mvt?v={metadata.tiles_version(registry, layers, versions)}")
    document = metadata.tilejson(layers, url, settings.tiles.aggregate_below_zoom)
    # The same buildings in 3D: a 3D client finds its tileset here (issue 13).
    tilesets = [f"{_base(request)}/collections/{layer.id}/3dtiles/tileset.json"
                for layer in layers if is_buildings_layer(layer)]
    if tilesets:
        document["tiles3d"] = tilesets
    return document


@router.get("/tiles/{layer_ids}/{z}/{x}/{y}.mvt", response_class=Response,
            summary="An XYZ vector tile; several comma-separated layers give one composite tile")
async def get_xyz_tile(layer_ids: str, z: int, x: int, y: int, request: Request,
                       scope: ScopeDep, sector: SectorQuery = None, level: LevelQuery = None,
                       cql: FilterQuery = None,
                       aggregate: AggregateQuery = True,
                       version: VersionQuery = None) -> Response:
    return await _tile_response(request, metadata.split_layer_ids(layer_ids), z, x, y, sector,
                                level, cql, aggregate, scope, version)


@router.get("/styles/risk-map.json", summary="MapLibre style of the one map, over twin's tiles")
async def get_risk_map_style(request: Request, response: Response, registry: RegistryDep,
                             settings: SettingsDep) -> dict:
    response.headers["Cache-Control"] = DOCUMENTS
    return risk_map_style(registry, _base(request), settings.tiles.aggregate_below_zoom)


# --- the XYZ tile without FastAPI's parameter machinery ------------------------------------
# The command hall's hot path. Routing through every router and solving the route's
# dependencies (five query parameters, the scope, the access guard) cost more than half of
# a cached tile's CPU; this route answers the same requests first, with the same guard
# (access.enforce: authentication, rate limit, role), the same scope and the same service,
# and sends the tile's headers made once. What it does not parse simply (a HEAD, a query it
# does not know, a repeated or odd parameter) goes on to the declared route above, which
# also stays the one in the OpenAPI document.

_QUERY_NAMES = frozenset({"sector", "level", "filter", "aggregate", "v"})
_BOOLEANS = {"true": True, "false": False, "1": True, "0": False}


def _simple_query(query_string: bytes) -> dict[str, str] | None:
    """The query's parameters when each is known and given once (else None)."""
    if not query_string:
        return {}
    params: dict[str, str] = {}
    for name, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if name not in _QUERY_NAMES or name in params:
            return None
        params[name] = value
    if "aggregate" in params and params["aggregate"].lower() not in _BOOLEANS:
        return None
    return params


class _XYZTiles:
    def __init__(self, declared: ASGIApp):
        self._declared = declared
        self.route: Route | None = None

    async def __call__(self, scope: ASGIScope, receive: Receive, send: Send) -> None:
        params = _simple_query(scope["query_string"]) if scope["method"] == "GET" else None
        if params is None:
            await self._declared(scope, receive, send)
            return
        scope["route"] = self.route  # the guard finds the rule by the route's template
        request = Request(scope, receive)
        await access.enforce(request)
        path = scope["path_params"]
        headers = request.headers
        answer = await scope["app"].state.tiles.vector_tile(TileRequest(
            tuple(metadata.split_layer_ids(path["layer_ids"])), path["z"], path["x"],
            path["y"], await get_scope(request), params.get("sector"), params.get("level"),
            params.get("filter"),
            _BOOLEANS[params.get("aggregate", "true").lower()],
            headers.get("if-none-match"), "gzip" in headers.get("accept-encoding", ""),
            params.get("v")))
        await send({"type": "http.response.start",
                    "status": 304 if answer.content is None else 200,
                    "headers": answer.raw_headers()})
        await send({"type": "http.response.body", "body": answer.content or b""})


def install_xyz_route(app: FastAPI) -> None:
    """Puts the XYZ tile route first among the app's routes (after every router is
    included, with the access guard): the declared route answers what it passes on."""
    declared = APIRouter()
    declared.add_api_route("/tiles/{layer_ids}/{z}/{x}/{y}.mvt", get_xyz_tile,
                           methods=["GET"], response_class=Response, dependencies=access.GUARD)
    endpoint = _XYZTiles(declared)
    route = Route("/tiles/{layer_ids}/{z:int}/{x:int}/{y:int}.mvt", endpoint,
                  methods=["GET"], include_in_schema=False)
    endpoint.route = route
    app.router.routes.insert(0, route)

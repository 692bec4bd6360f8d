"""Layer uploads and the layer catalogue. Parsing and HTTP only: layers.uploads.UploadService
(built once in the lifespan) does the writing, layers.catalog the reading."""

from __future__ import annotations

from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse

from layers import catalog
from layers.crs import DATUMS, MUNICIPALITY_BBOX
from layers.ingest_model import CIM_LEVELS
from layers.receive import MAX_FIELD_BYTES
from layers.uploads import IncomingUpload, UploadService
from layers.versions import LAYER_ID
from twin.api.deps import ConnDep, EditorDep, RegistryDep, ScopeDep
from twin.core.errors import InvalidParameter, NotFound
from twin.core.scope import visible_layer

router = APIRouter(tags=["layers"])


def get_uploads(request: Request) -> UploadService:
    return request.app.state.uploads


UploadsDep = Annotated[UploadService, Depends(get_uploads)]
LayerId = Annotated[str, Path(max_length=64, description="a layer id, as GET /layers lists")]

# A model's anchor lies in the municipality (layers.ingest_model.parse_anchor).
WEST, SOUTH, EAST, NORTH = MUNICIPALITY_BBOX
# The form is streamed (layers.receive), not parsed by FastAPI: its schema is declared here.
_FORM_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {
        "file": {"type": "string", "format": "binary",
                 "description": ".geojson .zip(Shapefile) .gpkg .kml .kmz .csv .tif .glb .gltf "
                                "and CityJSON buildings (.city.json, or .json)"},
        "title": {"type": "string", "maxLength": MAX_FIELD_BYTES // 4,
                  "description": f"the layer's name on the map (at most {MAX_FIELD_BYTES} "
                                 "bytes of UTF-8); required on POST"},
        "id": {"type": "string", "pattern": LAYER_ID.pattern,
               "description": "layer id (POST; default: from the title)"},
        "source_crs": {"type": "string", "pattern": r"^(?:[Ee][Pp][Ss][Gg]:)?\d{4,6}$",
                       "example": "EPSG:4524",
                       "description": "EPSG code of the coordinates when the file names none "
                                      "or a wrong one (a Gauss-Krüger zone: EPSG:4523-4525, "
                                      "4544-4546 over Chongqing)"},
        "datum": {"type": "string", "enum": list(DATUMS), "default": "wgs84",
                  "description": "offset datum of coordinates taken from a commercial map"},
        "layer": {"type": "string", "description": "layer of a multi-layer file"},
        "lon": {"type": "number", "minimum": WEST, "maximum": EAST,
                "description": "3D models: longitude of the model's origin"},
        "lat": {"type": "number", "minimum": SOUTH, "maximum": NORTH,
                "description": "3D models: latitude of the model's origin"},
        "height": {"type": "number", "minimum": -500, "maximum": 9000, "default": 0,
                   "description": "3D models: height of the origin, metres"},
        "heading": {"type": "number", "minimum": -360, "maximum": 360, "default": 0,
                    "description": "3D models: degrees clockwise from north"},
        "cim_level": {"type": "integer", "minimum": CIM_LEVELS.start,
                      "maximum": CIM_LEVELS.stop - 1, "default": 3,
                      "description": "3D models: CIM level (1 ground surface … 7 parts)"},
        "building_id": {"type": "integer", "minimum": 1,
                        "description": "3D models: the building (buildings layer id, in your "
                                       "jurisdiction) the model replaces when the camera is "
                                       "close"}}}}}}}


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _incoming(request: Request) -> IncomingUpload:
    return IncomingUpload(request.stream(), request.headers.get("content-type", ""),
                          request.headers.get("content-length"))


def _accepted(request: Request, job: dict) -> JSONResponse:
    body = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in job.items()}
    return JSONResponse(body, status_code=202,
                        headers={"Location": f"{_base(request)}/jobs/{job['id']}"})


@router.post("/layers", status_code=202, openapi_extra=_FORM_SCHEMA,
             summary="Upload a file as a new layer (gis-editor); 202 with the job")
async def upload_layer(request: Request, who: EditorDep, conn: ConnDep,
                       uploads: UploadsDep) -> JSONResponse:
    return _accepted(request, await uploads.create(conn, _incoming(request), who))


@router.put("/layers/{layer_id}", status_code=202, openapi_extra=_FORM_SCHEMA,
            summary="Upload a new version of an uploaded layer (gis-editor); 202 with the job")
async def replace_layer(layer_id: LayerId, request: Request, who: EditorDep, conn: ConnDep,
                        registry: RegistryDep, uploads: UploadsDep) -> JSONResponse:
    job = await uploads.replace(conn, layer_id, _incoming(request), who, registry)
    return _accepted(request, job)


@router.get("/layers", summary="Every layer, built-in and uploaded, the caller may see")
async def list_layers(request: Request, conn: ConnDep, registry: RegistryDep,
                      scope: ScopeDep) -> dict:
    return {"layers": await catalog.list_layers(conn, registry, _base(request), scope)}


@router.get("/layers/{layer_id}", summary="One layer with its versions")
async def get_layer(layer_id: LayerId, request: Request, conn: ConnDep,
                    registry: RegistryDep, scope: ScopeDep) -> dict:
    return await catalog.layer_detail(conn, registry, layer_id, _base(request), scope)


@router.post("/layers/{layer_id}/rollback", summary="Publish an earlier version (gis-editor)")
async def rollback_layer(layer_id: LayerId, request: Request, who: EditorDep, conn: ConnDep,
                         registry: RegistryDep, uploads: UploadsDep,
                         version: int | None = Query(
                             None, ge=1, le=2**31 - 1,
                             description="the version to publish (or a JSON body "
                                         "{\"version\": n})")) -> dict:
    if version is None and request.headers.get("content-type", "").startswith("application/json"):
        try:
            body = await request.json()
        except ValueError:
            raise InvalidParameter("the body is not JSON; send {\"version\": n} or "
                                   "?version=n") from None
        version = body.get("version") if isinstance(body, dict) else None
    return await uploads.rollback(conn, layer_id, version, who, registry)


@router.delete("/layers/{layer_id}", status_code=204, response_class=Response,
               summary="Delete an uploaded layer and all its versions (gis-editor)")
async def delete_layer(layer_id: LayerId, who: EditorDep, conn: ConnDep, registry: RegistryDep,
                       uploads: UploadsDep) -> Response:
    await uploads.delete(conn, layer_id, who, registry)
    return Response(status_code=204)


@router.get("/layers/{layer_id}/model", response_class=FileResponse,
            summary="The glTF/GLB file of a 3D layer")
async def get_model(layer_id: LayerId, registry: RegistryDep, scope: ScopeDep,
                    uploads: UploadsDep) -> FileResponse:
    layer = visible_layer(scope, registry, layer_id)
    if layer.kind != "3d" or not layer.file_path:
        raise NotFound(f"layer '{layer_id}' is a {layer.kind} layer and has no 3D model")
    glb = layer.file_path.endswith(".glb")
    # This node's copy: fetched from the database first when another node published it.
    path = await anyio.to_thread.run_sync(uploads.local_path, layer)
    return FileResponse(path, filename=f"{layer_id}.{'glb' if glb else 'gltf'}",
                        media_type="model/gltf-binary" if glb else "model/gltf+json")

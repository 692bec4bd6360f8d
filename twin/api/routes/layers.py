"""Layer uploads and the layer catalogue. Parsing and HTTP only; layers/ does the work."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from layers import catalog, intake, versions
from layers.jobs import create_job, job_document
from layers.receive import Received, boundary_of, content_length_check, receive_upload
from layers.versions import job_dir
from twin.api.deps import ConnDep, EditorDep, RegistryDep, ScopeDep, SettingsDep
from twin.core.errors import InvalidParameter, NotFound
from twin.core.principal import Principal
from twin.core.scope import check_layer_writable, visible_layer
from twin.core.settings import Settings

router = APIRouter(tags=["layers"])

_FORM_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {
        "file": {"type": "string", "format": "binary",
                 "description": ".geojson .zip(Shapefile) .gpkg .kml .kmz .csv .tif .glb .gltf"},
        "title": {"type": "string", "description": "required on POST"},
        "id": {"type": "string", "description": "layer id (POST; default: from the title)"},
        "source_crs": {"type": "string", "example": "EPSG:4524"},
        "datum": {"type": "string", "enum": ["wgs84", "gcj02", "bd09"]},
        "layer": {"type": "string", "description": "layer of a multi-layer file"},
        "lon": {"type": "number"}, "lat": {"type": "number"}, "height": {"type": "number"},
        "heading": {"type": "number"}, "cim_level": {"type": "integer"}}}}}}}


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


@asynccontextmanager
async def _received(request: Request, settings: Settings) -> AsyncIterator[tuple[str, Received]]:
    """The upload streamed into a fresh job folder (limits counted as it arrives); the folder
    goes again when anything after it fails. Auth ran before: not a byte is read for a
    caller without a gis-editor key."""
    content_type = request.headers.get("content-type", "")
    boundary_of(content_type)
    content_length_check(request.headers.get("content-length"), settings.uploads)
    job_id = uuid.uuid4().hex
    folder = job_dir(settings.uploads_dir, job_id)
    folder.mkdir(parents=True)
    try:
        received = await receive_upload(request.stream(), content_type, folder,
                                        intake.FORM_FIELDS, settings.uploads, intake.stored_name)
        yield job_id, received
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


async def _start_job(request: Request, conn: ConnDep, settings: Settings, who: Principal,
                     layer_id: str, action: str, job_id: str, upload: Received,
                     kind: str | None = None) -> JSONResponse:
    folder = job_dir(settings.uploads_dir, job_id)
    params = await run_in_threadpool(intake.prepare, folder, upload.file_name, upload.fields,
                                     settings.uploads)
    if kind is not None and params["_kind"] != kind:
        raise InvalidParameter(f"file: layer '{layer_id}' is a {kind} layer; a new version "
                               f"must be {kind} too, got a {params['_kind']} file")
    # A layer is seen where its uploader's jurisdiction reaches; a city upload by everyone.
    params |= {"_owner_scope": who.scope.key, "_shared": who.scope.is_city}
    await create_job(conn, job_id, layer_id, action, upload.file_name, params, who.name)
    request.app.state.upload_jobs.submit(job_id, layer_id)
    document = await job_document(conn, job_id)
    return JSONResponse(_jsonable(document), status_code=202,
                        headers={"Location": f"{_base(request)}/jobs/{job_id}"})


def _jsonable(document: dict) -> dict:
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in document.items()}


@router.post("/layers", status_code=202, openapi_extra=_FORM_SCHEMA,
             summary="Upload a file as a new layer (gis-editor); 202 with the job")
async def upload_layer(request: Request, who: EditorDep, conn: ConnDep,
                       settings: SettingsDep) -> JSONResponse:
    async with _received(request, settings) as (job_id, upload):
        fields = upload.fields
        if not fields["title"]:
            raise InvalidParameter("title: required (the layer's name as shown on the map)")
        taken = set((await conn.execute(text("SELECT id FROM layers"))).scalars().all())
        if fields["id"]:
            layer_id = versions.check_layer_id(fields["id"])
            if layer_id in taken:
                raise versions.Conflict(f"id: layer '{layer_id}' exists; PUT "
                                        f"/layers/{layer_id} uploads a new version of it")
        else:
            layer_id = intake.suggested_id(fields["title"], upload.file_name, taken)
        return await _start_job(request, conn, settings, who, layer_id, "create", job_id,
                                upload)


@router.put("/layers/{layer_id}", status_code=202, openapi_extra=_FORM_SCHEMA,
            summary="Upload a new version of an uploaded layer (gis-editor); 202 with the job")
async def replace_layer(layer_id: str, request: Request, who: EditorDep, conn: ConnDep,
                        settings: SettingsDep, registry: RegistryDep) -> JSONResponse:
    check_layer_writable(who.scope, visible_layer(who.scope, registry, layer_id))
    kind = (await conn.execute(text("SELECT kind FROM layers WHERE id = :id AND origin = "
                                    "'upload'"), {"id": layer_id})).scalar()
    await conn.rollback()
    if kind is None:
        await conn.run_sync(versions.uploaded_layer, layer_id)  # names why: 404 or built-in
    async with _received(request, settings) as (job_id, upload):
        return await _start_job(request, conn, settings, who, layer_id, "replace", job_id,
                                upload, kind)


@router.get("/layers", summary="Every layer, built-in and uploaded, the caller may see")
async def list_layers(request: Request, conn: ConnDep, registry: RegistryDep,
                      scope: ScopeDep) -> dict:
    return {"layers": await catalog.list_layers(conn, registry, _base(request), scope)}


@router.get("/layers/{layer_id}", summary="One layer with its versions")
async def get_layer(layer_id: str, request: Request, conn: ConnDep,
                    registry: RegistryDep, scope: ScopeDep) -> dict:
    return await catalog.layer_detail(conn, registry, layer_id, _base(request), scope)


@router.post("/layers/{layer_id}/rollback", summary="Publish an earlier version (gis-editor)")
async def rollback_layer(layer_id: str, request: Request, who: EditorDep, conn: ConnDep,
                         registry: RegistryDep,
                         version: int | None = Query(None, description="the version to publish")
                         ) -> dict:
    check_layer_writable(who.scope, visible_layer(who.scope, registry, layer_id))
    if version is None and request.headers.get("content-type", "").startswith("application/json"):
        body = await request.json()
        version = body.get("version") if isinstance(body, dict) else None
    if not isinstance(version, int):
        raise InvalidParameter("version: required, the integer version to publish again "
                               "(query ?version= or JSON body {\"version\": n})")
    result = await conn.run_sync(versions.rollback, layer_id, version)
    await conn.commit()
    request.app.state.registry.invalidate()
    return result


@router.delete("/layers/{layer_id}", status_code=204, response_class=Response,
               summary="Delete an uploaded layer and all its versions (gis-editor)")
async def delete_layer(layer_id: str, request: Request, who: EditorDep, conn: ConnDep,
                       settings: SettingsDep, registry: RegistryDep) -> Response:
    check_layer_writable(who.scope, visible_layer(who.scope, registry, layer_id))
    folders = await conn.run_sync(versions.delete, layer_id, settings.uploads_dir)
    await conn.commit()
    request.app.state.registry.invalidate()
    await run_in_threadpool(versions.remove_paths, folders)
    return Response(status_code=204)


@router.get("/layers/{layer_id}/model", response_class=FileResponse,
            summary="The glTF/GLB file of a 3D layer")
async def get_model(layer_id: str, registry: RegistryDep, scope: ScopeDep) -> FileResponse:
    layer = visible_layer(scope, registry, layer_id)
    if layer.kind != "3d" or not layer.file_path:
        raise NotFound(f"layer '{layer_id}' is a {layer.kind} layer and has no 3D model")
    glb = layer.file_path.endswith(".glb")
    return FileResponse(layer.file_path, filename=f"{layer_id}.{'glb' if glb else 'gltf'}",
                        media_type="model/gltf-binary" if glb else "model/gltf+json")

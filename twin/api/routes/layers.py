"""Layer uploads and the layer catalogue. Parsing and HTTP only; layers/ does the work."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path, PurePosixPath

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from layers import catalog, intake, versions
from layers.jobs import create_job, job_dir, job_document
from layers.safety import TooLarge, UnsupportedFormat, check_size
from twin.api.deps import ConnDep, EditorDep, RegistryDep, SettingsDep
from twin.auth import Principal
from twin.errors import InvalidParameter, NotFound, TwinError
from twin.settings import Settings

router = APIRouter(tags=["layers"])

# Multipart framing and the small form fields around the file.
FORM_OVERHEAD_BYTES = 64 * 1024
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


class LengthRequired(TwinError):
    status_code = 411


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


async def _read_form(request: Request, settings: Settings) -> tuple[UploadFile, dict]:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise UnsupportedFormat("uploads are multipart/form-data with the file in 'file'")
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        raise LengthRequired("uploads need a Content-Length header")
    if int(length) > settings.uploads.max_file_bytes + FORM_OVERHEAD_BYTES:
        raise TooLarge(f"file: the upload ({length} bytes) is over the limit of "
                       f"{settings.uploads.max_file_bytes} bytes (TWIN_UPLOADS_MAX_FILE_BYTES)")
    form = await request.form(max_files=1, max_fields=len(intake.FORM_FIELDS))
    upload = form.get("file")
    if not isinstance(upload, UploadFile) or not upload.filename:
        raise InvalidParameter("file: required (the layer's file, as a multipart file part)")
    fields = {name: (str(form[name]).strip() if name in form else None)
              for name in intake.FORM_FIELDS}
    return upload, fields


def _spool(upload: UploadFile, target: Path, settings: Settings) -> None:
    with target.open("wb") as sink:
        shutil.copyfileobj(upload.file, sink, 1024 * 1024)
    check_size(target.stat().st_size, settings.uploads)


async def _start_job(request: Request, conn: ConnDep, settings: Settings, who: Principal,
                     layer_id: str, action: str, upload: UploadFile, fields: dict,
                     kind: str | None = None) -> JSONResponse:
    job_id = uuid.uuid4().hex
    folder = job_dir(settings.uploads_dir, job_id)
    file_name = PurePosixPath(upload.filename.replace("\\", "/")).name
    folder.mkdir(parents=True)
    try:
        await run_in_threadpool(_spool, upload, folder / intake.stored_name(file_name), settings)
        params = await run_in_threadpool(intake.prepare, folder, file_name, fields,
                                         settings.uploads)
        if kind is not None and params["_kind"] != kind:
            raise InvalidParameter(f"file: layer '{layer_id}' is a {kind} layer; a new version "
                                   f"must be {kind} too, got a {params['_kind']} file")
        await create_job(conn, job_id, layer_id, action, file_name, params, who.name)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
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
    upload, fields = await _read_form(request, settings)
    if not fields["title"]:
        raise InvalidParameter("title: required (the layer's name as shown on the map)")
    taken = set((await conn.execute(text("SELECT id FROM layers"))).scalars().all())
    if fields["id"]:
        layer_id = versions.check_layer_id(fields["id"])
        if layer_id in taken:
            raise versions.Conflict(f"id: layer '{layer_id}' exists; PUT /layers/{layer_id} "
                                    "uploads a new version of it")
    else:
        layer_id = intake.suggested_id(fields["title"], upload.filename, taken)
    return await _start_job(request, conn, settings, who, layer_id, "create", upload, fields)


@router.put("/layers/{layer_id}", status_code=202, openapi_extra=_FORM_SCHEMA,
            summary="Upload a new version of an uploaded layer (gis-editor); 202 with the job")
async def replace_layer(layer_id: str, request: Request, who: EditorDep, conn: ConnDep,
                        settings: SettingsDep) -> JSONResponse:
    kind = (await conn.execute(text("SELECT kind FROM layers WHERE id = :id AND origin = "
                                    "'upload'"), {"id": layer_id})).scalar()
    await conn.rollback()
    if kind is None:
        await conn.run_sync(versions.uploaded_layer, layer_id)  # names why: 404 or built-in
    upload, fields = await _read_form(request, settings)
    return await _start_job(request, conn, settings, who, layer_id, "replace", upload, fields,
                            kind)


@router.get("/layers", summary="Every layer, built-in and uploaded")
async def list_layers(request: Request, conn: ConnDep, registry: RegistryDep) -> dict:
    return {"layers": await catalog.list_layers(conn, registry, _base(request))}


@router.get("/layers/{layer_id}", summary="One layer with its versions")
async def get_layer(layer_id: str, request: Request, conn: ConnDep,
                    registry: RegistryDep) -> dict:
    return await catalog.layer_detail(conn, registry, layer_id, _base(request))


@router.post("/layers/{layer_id}/rollback", summary="Publish an earlier version (gis-editor)")
async def rollback_layer(layer_id: str, request: Request, who: EditorDep, conn: ConnDep,
                         version: int | None = Query(None, description="the version to publish")
                         ) -> dict:
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
                       settings: SettingsDep) -> Response:
    folders = await conn.run_sync(versions.delete, layer_id, settings.uploads_dir)
    await conn.commit()
    request.app.state.registry.invalidate()
    await run_in_threadpool(versions.remove_paths, folders)
    return Response(status_code=204)


@router.get("/layers/{layer_id}/model", response_class=FileResponse,
            summary="The glTF/GLB file of a 3D layer")
async def get_model(layer_id: str, registry: RegistryDep) -> FileResponse:
    layer = registry.get(layer_id)
    if layer.kind != "3d" or not layer.file_path:
        raise NotFound(f"layer '{layer_id}' is a {layer.kind} layer and has no 3D model")
    glb = layer.file_path.endswith(".glb")
    return FileResponse(layer.file_path, filename=f"{layer_id}.{'glb' if glb else 'gltf'}",
                        media_type="model/gltf-binary" if glb else "model/gltf+json")

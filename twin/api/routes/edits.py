"""Risk points edited through OGC API - Features Part 4 (create, replace, update, delete).

``POST /collections/risk_points/items`` (a GeoJSON Feature: 201, Location, ETag),
``PUT .../items/{id}`` (replace), ``PATCH .../items/{id}`` (``application/merge-patch+json``),
``DELETE .../items/{id}`` (204). gis-editor and up (twin/api/access.py), within the editor's
jurisdiction. ``If-Match`` is optional; sent, it must equal the item's ETag (the item GET and
every write answer it), else 412. The rules are twin/live/risk_edits.py's; this module reads
the request and answers. A write answers once every server process has the layer's new data
version (twin/api/sync.py: these are writes).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.ext.asyncio import AsyncConnection

from twin.api.deps import ConnDep, EditorDep
from twin.core import crs_ref
from twin.core.errors import InvalidParameter, TwinError
from twin.core.principal import Principal
from twin.live import risk_edits

router = APIRouter(tags=["edits"])

ITEMS = f"/collections/{risk_edits.COLLECTION}/items"
ITEM = ITEMS + "/{feature_id}"
GEOJSON = "application/geo+json"
MERGE_PATCH = "application/merge-patch+json"
FEATURE_TYPES = (GEOJSON, "application/json")
PATCH_TYPES = (MERGE_PATCH, "application/json", GEOJSON)


class UnsupportedMediaType(TwinError):
    status_code = 415


_POINT_SCHEMA = {
    "type": "object", "required": ["type", "coordinates"],
    "properties": {"type": {"type": "string", "enum": ["Point"]},
                   "coordinates": {"type": "array", "minItems": 2, "maxItems": 3,
                                   "items": {"type": "number"}}},
}
_PROPERTIES_SCHEMA = {
    "type": "object",
    "properties": {
        "code": {"type": "string", "maxLength": risk_edits.MAX_CODE},
        "name": {"type": "string"}, "sector_code": {"type": "string"},
        "category": {"type": "string"}, "level": {"type": "integer", "minimum": 1, "maximum": 4},
        "address": {"type": "string"}, "plan_id": {"type": ["integer", "null"]},
    },
}
_FEATURE_SCHEMA = {
    "type": "object", "required": ["type", "geometry", "properties"],
    "properties": {"type": {"type": "string", "enum": ["Feature"]}, "geometry": _POINT_SCHEMA,
                   "properties": {**_PROPERTIES_SCHEMA,
                                  "required": list(risk_edits.REQUIRED)}},
}
_PATCH_SCHEMA = {
    "type": "object",
    "properties": {"geometry": _POINT_SCHEMA, "properties": _PROPERTIES_SCHEMA},
}


def _body(schema: dict, types: tuple[str, ...]) -> dict:
    return {"requestBody": {"required": True,
                            "content": {media: {"schema": schema} for media in types}}}


CONTENT_CRS = Header(None, alias="Content-Crs", description=(
    "CRS of the body's coordinates, by URI (default CRS84, lon/lat); any CRS the features are "
    "served in, in its axis order (EPSG:4326: lat/lon)."))
IF_MATCH = Header(None, alias="If-Match", description=(
    "The item's ETag as last read; another one gives 412. Optional: without it the last "
    "writer wins."))


async def _json(request: Request, types: tuple[str, ...]) -> Any:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in types:
        raise UnsupportedMediaType(f"Content-Type: expected {' or '.join(types)}, got "
                                   f"{media[:60] or 'none'}")
    raw = await request.body()

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    try:
        return json.loads(raw, parse_constant=refuse)
    except (ValueError, RecursionError) as error:
        raise InvalidParameter(f"the body is not valid JSON: {str(error)[:120]}") from error


def _item_url(request: Request, point_id: int) -> str:
    return f"{str(request.base_url).rstrip('/')}{ITEMS}/{point_id}"


def _answer(request: Request, written: risk_edits.Written, status: int) -> JSONResponse:
    """The item as stored (CRS84, whatever the request's Content-Crs), its ETag and links."""
    assert written.feature is not None and written.etag is not None
    url = _item_url(request, written.id)
    feature = written.feature | {"links": [
        {"href": url, "rel": "self", "type": GEOJSON},
        {"href": url.removesuffix(f"/items/{written.id}"), "rel": "collection",
         "type": "application/json"}]}
    headers = {"ETag": written.etag, "Content-Crs": f"<{crs_ref.CRS84}>"}
    if status == 201:
        headers["Location"] = url
    return JSONResponse(feature, status_code=status, media_type=GEOJSON, headers=headers)


# risk_edits.replace or risk_edits.update: (conn, principal, feature_id, body, crs, if_match).
_Edit = Callable[[AsyncConnection, Principal, str, Any, crs_ref.CrsRef, str | None],
                 Awaitable[risk_edits.Written]]


async def _edit(edit: _Edit, types: tuple[str, ...], request: Request, conn: AsyncConnection,
                principal: Principal, feature_id: str, content_crs: str | None,
                if_match: str | None) -> JSONResponse:
    """PUT and PATCH: the body (of one of ``types``) in its CRS, written by ``edit``."""
    crs = crs_ref.resolve(content_crs, "Content-Crs")
    body = await _json(request, types)
    written = await edit(conn, principal, feature_id, body, crs, if_match)
    return _answer(request, written, 200)


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Not JSON, not a GeoJSON Feature with a Point, or an unknown CRS"},
    403: {"description": "The point lies (or would move) outside the editor's jurisdiction"},
    409: {"description": "The code is another risk point's"},
    415: {"description": "Another Content-Type"},
    422: {"description": "Outside the municipality, an unknown sector or plan, a level not "
                         "in 1..4, a missing or unknown property"},
}
_ITEM_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS, 404: {"description": "No such point in the editor's jurisdiction"},
    412: {"description": "If-Match does not match the item's ETag"}}


@router.post(ITEMS, status_code=201, summary="Create a risk point (OGC API - Features Part 4)",
             response_class=JSONResponse, responses=_ERRORS,
             openapi_extra=_body(_FEATURE_SCHEMA, FEATURE_TYPES))
async def create_item(request: Request, conn: ConnDep, principal: EditorDep,
                      content_crs: str | None = CONTENT_CRS) -> JSONResponse:
    crs = crs_ref.resolve(content_crs, "Content-Crs")
    body = await _json(request, FEATURE_TYPES)
    written = await risk_edits.create(conn, principal, body, crs)
    return _answer(request, written, 201)


@router.put(ITEM, summary="Replace a risk point (OGC API - Features Part 4)",
            response_class=JSONResponse, responses=_ITEM_ERRORS,
            openapi_extra=_body(_FEATURE_SCHEMA, FEATURE_TYPES))
async def replace_item(feature_id: str, request: Request, conn: ConnDep, principal: EditorDep,
                       content_crs: str | None = CONTENT_CRS,
                       if_match: str | None = IF_MATCH) -> JSONResponse:
    return await _edit(risk_edits.replace, FEATURE_TYPES, request, conn, principal, feature_id,
                       content_crs, if_match)


@router.patch(ITEM, summary="Update a risk point by a JSON merge patch (OGC API - Features "
              "Part 4)", response_class=JSONResponse, responses=_ITEM_ERRORS,
              openapi_extra=_body(_PATCH_SCHEMA, PATCH_TYPES))
async def update_item(feature_id: str, request: Request, conn: ConnDep, principal: EditorDep,
                      content_crs: str | None = CONTENT_CRS,
                      if_match: str | None = IF_MATCH) -> JSONResponse:
    return await _edit(risk_edits.update, PATCH_TYPES, request, conn, principal, feature_id,
                       content_crs, if_match)


@router.delete(ITEM, status_code=204, summary="Delete a risk point (OGC API - Features Part 4)",
               response_class=Response, responses={
                   404: _ITEM_ERRORS[404], 412: _ITEM_ERRORS[412]})
async def delete_item(feature_id: str, conn: ConnDep, principal: EditorDep,
                      if_match: str | None = IF_MATCH) -> Response:
    await risk_edits.delete(conn, principal, feature_id, if_match)
    return Response(status_code=204)

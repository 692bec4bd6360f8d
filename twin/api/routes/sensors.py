"""Sensor readings coming in: ``POST /sensors/readings``."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from twin.api.deps import ConnDep, SettingsDep
from twin.core.errors import InvalidParameter
from twin.queries.readings import SHAPE, BatchTooLarge, store_readings

router = APIRouter(tags=["sensors"])


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    too_big = BatchTooLarge(f"body: at most {limit} bytes per request "
                            f"(TWIN_SENSORS_MAX_BODY_BYTES); split the batch")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


# Needs a gis-editor key or token: twin/api/access.py.
# The body is read by hand (to refuse an oversized one while it streams in), so FastAPI does
# not see it: its shape is declared here for /api.
READINGS_BODY = {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["readings"], "properties": {"readings": {
        "type": "array", "description": "at most TWIN_SENSORS_MAX_BATCH readings",
        "items": {"type": "object", "required": ["sensor_id", "ts", "value"], "properties": {
            "sensor_id": {"type": "integer", "minimum": 1},
            "ts": {"type": "string", "format": "date-time",
                   "description": "ISO 8601 with a UTC offset, not in the future"},
            "value": {"type": "number",
                      "description": "within the sensor's physical range"}}}}}}}}}


@router.post("/sensors/readings", summary="Store a batch of sensor readings; rows that fail "
             "a check are rejected one by one with a reason, the valid rows are stored "
             "together", response_class=JSONResponse,
             openapi_extra={"requestBody": READINGS_BODY},
             responses={207: {"description": "some rows were rejected, the others stored"},
                        400: {"description": "the body is not JSON or not a batch"},
                        413: {"description": "the batch or the body is too big"}})
async def post_readings(request: Request, conn: ConnDep, settings: SettingsDep) -> JSONResponse:
    body = await _read_body(request, settings.sensors.max_body_bytes)
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InvalidParameter(f"body: not JSON; send {SHAPE}") from None
    result = await store_readings(conn, payload, settings.sensors)
    return JSONResponse(result, status_code=207 if result["rejected"] else 200)

"""Sensor readings coming in (``POST /sensors/readings``, SensorThings ``POST
/sensors/CreateObservations``) and read back (the latest per sensor, one stored reading, a
sensor's hourly rollups)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse

from twin.api.deps import ConnDep, ScopeDep, SettingsDep
from twin.core.errors import InvalidParameter, NotFound
from twin.core.models import NETWORKS, SENSOR_KINDS
from twin.core.scope import table_predicate
from twin.live.partitions import hourly_readings
from twin.live.readings import (
    SHAPE,
    STA_SHAPE,
    BatchTooLarge,
    create_observations,
    latest_readings,
    one_reading,
    store_readings,
)

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
    payload = await _read_json(request, settings.sensors.max_body_bytes, SHAPE)
    result = await store_readings(conn, payload, settings.sensors)
    return JSONResponse(result, status_code=207 if result["rejected"] else 200)


async def _read_json(request: Request, limit: int, shape: str) -> Any:
    body = await _read_body(request, limit)
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InvalidParameter(f"body: not JSON; send {shape}") from None


# SensorThings API 1.1, "Create multiple Observations with dataArray": a Datastream is a
# twin sensor (its @iot.id is the sensor id); phenomenonTime is the reading's instant.
OBSERVATIONS_BODY = {"required": True, "content": {"application/json": {"schema": {
    "type": "array", "description": "at most TWIN_SENSORS_MAX_BATCH dataArray entries in all",
    "items": {"type": "object", "required": ["Datastream", "components", "dataArray"],
              "properties": {
                  "Datastream": {"type": "object", "required": ["@iot.id"], "properties": {
                      "@iot.id": {"type": "integer", "description": "the sensor id"}}},
                  "components": {"type": "array", "items": {"type": "string"},
                                 "description": 'must hold "phenomenonTime" and "result"; '
                                                "other components are ignored",
                                 "example": ["phenomenonTime", "result"]},
                  "dataArray": {"type": "array", "items": {"type": "array", "items": {}},
                                "description": "one array per observation, its values in "
                                               "the order of components; phenomenonTime "
                                               "ISO 8601 with a UTC offset",
                                "example": [["2026-11-20T08:00:00+08:00", 1.5]]}}}}}}}


@router.post("/sensors/CreateObservations", summary="Store observations in the SensorThings "
             "API 1.1 dataArray form; the answer lists, per observation in order, its link or "
             "\"error: <reason>\"", response_class=JSONResponse, status_code=201,
             openapi_extra={"requestBody": OBSERVATIONS_BODY},
             responses={201: {"description": "every observation stored (or already stored "
                                             "with the same value)",
                              "content": {"application/json": {"schema": {
                                  "type": "array", "items": {"type": "string"}}}}},
                        207: {"description": "some observations failed: their entries read "
                                             "\"error: <reason>\""},
                        400: {"description": "the body is not JSON or not dataArray groups"},
                        413: {"description": "too many observations or too big a body"}})
async def post_observations(request: Request, conn: ConnDep,
                            settings: SettingsDep) -> JSONResponse:
    body = await _read_json(request, settings.sensors.max_body_bytes, STA_SHAPE)
    answer, all_stored = await create_observations(conn, body, settings.sensors)
    return JSONResponse(answer, status_code=201 if all_stored else 207)


def _sensors_in(scope: Any) -> Any:
    return table_predicate(scope, "sensors", "s")


SensorId = Annotated[int, Path(ge=1, le=2**31 - 1, description="the sensor id")]
NetworkQuery = Annotated[str | None, Query(description="only this network",
                                           json_schema_extra={"enum": list(NETWORKS)})]
KindQuery = Annotated[str | None, Query(description="only this kind of sensor",
                                        json_schema_extra={"enum": list(SENSOR_KINDS)})]


@router.get("/sensors/latest", summary="The newest reading of every sensor in the caller's "
            "jurisdiction", response_class=JSONResponse)
async def get_latest(conn: ConnDep, scope: ScopeDep, network: NetworkQuery = None,
                     kind: KindQuery = None) -> JSONResponse:
    if network is not None and network not in NETWORKS:
        raise InvalidParameter(f"network: one of {', '.join(NETWORKS)}, got {network!r}")
    if kind is not None and kind not in SENSOR_KINDS:
        raise InvalidParameter(f"kind: one of {', '.join(SENSOR_KINDS)}, got {kind!r}")
    rows = await latest_readings(conn, _sensors_in(scope), network=network, kind=kind)
    return JSONResponse({"numberReturned": len(rows), "sensors": rows})


@router.get("/sensors/{sensor_id}/latest", summary="The newest reading of one sensor",
            response_class=JSONResponse,
            responses={404: {"description": "no such sensor in the caller's jurisdiction, "
                                            "or no reading yet"}})
async def get_sensor_latest(sensor_id: SensorId, conn: ConnDep,
                            scope: ScopeDep) -> JSONResponse:
    rows = await latest_readings(conn, _sensors_in(scope), sensor_id=sensor_id)
    if not rows:
        raise NotFound(f"sensor_id: no reading of sensor {sensor_id} (unknown, outside your "
                       "jurisdiction, or nothing received yet)")
    return JSONResponse(rows[0])


def _instant(name: str, value: str) -> datetime:
    try:
        instant = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidParameter(f"{name}: not an ISO 8601 timestamp: {value!r}") from None
    if instant.utcoffset() is None:
        raise InvalidParameter(f"{name}: needs a UTC offset (e.g. Z): {value!r}")
    return instant


HOURLY_DEFAULT = timedelta(days=7)
HOURLY_MAX = timedelta(days=366)


# Before /sensors/{sensor_id}/readings/{ts}: "hourly" is not an instant.
@router.get("/sensors/{sensor_id}/readings/hourly", summary="A sensor's hourly rollups "
            "(count, min, max, avg, sum, first and last reading per UTC hour) for the hours "
            "starting in [start, end); closed hours only, rolled up by the partition keeper "
            "(up to TWIN_READINGS_MAINTENANCE_EVERY_S after the hour ends)",
            response_class=JSONResponse,
            responses={400: {"description": "start or end not an instant with an offset, "
                                            "end not after start, or more than 366 days"},
                       404: {"description": "no such sensor in the caller's jurisdiction"}})
async def get_hourly(sensor_id: SensorId, conn: ConnDep, scope: ScopeDep,
                     start: Annotated[str | None, Query(
                         description="ISO 8601 with a UTC offset; default: end - 7 days",
                         json_schema_extra={"format": "date-time"})] = None,
                     end: Annotated[str | None, Query(
                         description="ISO 8601 with a UTC offset; default: now",
                         json_schema_extra={"format": "date-time"})] = None) -> JSONResponse:
    until = datetime.now(UTC) if end is None else _instant("end", end)
    try:
        since = until - HOURLY_DEFAULT if start is None else _instant("start", start)
    except OverflowError:
        raise InvalidParameter("start: before the year 1; give start") from None
    if until <= since:
        raise InvalidParameter(f"end: must be after start ({since.isoformat()})")
    if until - since > HOURLY_MAX:
        raise InvalidParameter("start, end: at most 366 days at once")
    answer = await hourly_readings(conn, _sensors_in(scope), sensor_id, since, until)
    if answer is None:
        raise NotFound(f"sensor_id: no sensor {sensor_id} in your jurisdiction")
    return JSONResponse(answer)


@router.get("/sensors/{sensor_id}/readings/{ts}", summary="One stored reading (the link "
            "CreateObservations answers with)", response_class=JSONResponse,
            responses={404: {"description": "no such reading in the caller's jurisdiction"}})
async def get_reading(sensor_id: SensorId, ts: str, conn: ConnDep,
                      scope: ScopeDep) -> JSONResponse:
    instant = _instant("ts", ts)
    row = await one_reading(conn, _sensors_in(scope), sensor_id, instant)
    if row is None:
        raise NotFound(f"no reading of sensor {sensor_id} at {ts} in your jurisdiction")
    return JSONResponse(row)

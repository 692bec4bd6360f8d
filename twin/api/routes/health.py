from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

router = APIRouter(tags=["health"])


def _mqtt_detail(request: Request) -> dict[str, Any] | None:
    """This process's MQTT subscriber (twin/live/mqtt.py) when TWIN_MQTT_URL names a broker:
    connected or not, and its counters (messages, readings stored, dead letters). Detail only:
    the status code follows the database alone."""
    live = getattr(request.app.state, "live", None)
    subscriber = getattr(live, "parts", {}).get("mqtt") if live is not None else None
    detail = getattr(subscriber, "detail", None)
    return detail() if callable(detail) else None


def _standbys_detail(request: Request) -> list[dict[str, Any]] | None:
    """Each hot standby this process reads on (TWIN_DB_STANDBY_URLS, twin/core/replicas.py)
    as its last check found it: healthy (answering, in recovery) or not, serving reads (healthy
    and within TWIN_DB_MAX_LAG_S) or not, its lag in seconds and its replay position. Detail
    only: a standby down costs no request (reads go to the primary), so the status code
    follows the primary alone."""
    reads = getattr(request.app.state, "reads", None)
    if reads is None or not reads.active:
        return None
    return reads.details()


@router.get("/healthz", summary="Liveness and database reachability")
async def healthz(request: Request) -> JSONResponse:
    mqtt = _mqtt_detail(request)
    extra: dict[str, Any] = {"mqtt": mqtt} if mqtt is not None else {}
    standbys = _standbys_detail(request)
    if standbys is not None:
        extra["standbys"] = standbys
    try:
        async with request.app.state.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except (DBAPIError, OSError) as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        return JSONResponse({"status": "unavailable", "database": reason, **extra},
                            status_code=503, headers={"Retry-After": "5"})
    return JSONResponse({"status": "ok", "database": "ok", **extra})

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


@router.get("/healthz", summary="Liveness and database reachability")
async def healthz(request: Request) -> JSONResponse:
    mqtt = _mqtt_detail(request)
    extra = {"mqtt": mqtt} if mqtt is not None else {}
    try:
        async with request.app.state.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except (DBAPIError, OSError) as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        return JSONResponse({"status": "unavailable", "database": reason, **extra},
                            status_code=503, headers={"Retry-After": "5"})
    return JSONResponse({"status": "ok", "database": "ok", **extra})

"""Events: report, read, move through their states (owner: events).

Access (twin/api/access.py): reads ``GET /events*`` need the viewer role, writes the planner
role. Jurisdiction and states: twin/live/events.py (403 reporting outside one's jurisdiction,
404 for an event outside it, 409 naming the allowed next state, 412 on a stale If-Match,
422 outside the municipality or for an unknown kind).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from twin.api.deps import ConnDep, ScopeDep, SettingsDep, get_principal
from twin.api.fields import Text
from twin.core.errors import InvalidParameter
from twin.core.models import EVENT_LEVELS, EVENT_STATES
from twin.core.principal import Principal, Unauthenticated
from twin.live import events

router = APIRouter(tags=["events"])

State = Literal[EVENT_STATES]  # type: ignore[valid-type]
Level = Literal[EVENT_LEVELS]  # type: ignore[valid-type]
ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such event in your jurisdiction"},
}


class NewEvent(BaseModel):
    lon: float = Field(ge=-180, le=180, description="longitude, WGS84 degrees")
    lat: float = Field(ge=-90, le=90, description="latitude, WGS84 degrees")
    kind: Text = Field(min_length=1, max_length=40,
                      description="an event kind code (GET /events/kinds)")
    description: Text = Field(min_length=1, max_length=events.MAX_TEXT)
    title: Text | None = Field(None, max_length=events.TITLE_MAX,
                              description="defaults to the kind's Chinese name")


class Transition(BaseModel):
    to: State = Field(description="the next state: reported -> responded -> verified -> "
                                  "handled -> closed")
    note: Text | None = Field(None, max_length=events.MAX_TEXT)


class EventKind(BaseModel):
    code: str
    sector_code: str
    name_zh: str
    name_en: str
    respond_s: int = Field(description="seconds from the report to respond")
    verify_s: int = Field(description="seconds from the report to verify")
    handle_s: int = Field(description="seconds from the report to handle")


class EventKinds(BaseModel):
    kinds: list[EventKind]


class Deadline(BaseModel):
    step: Literal["respond", "verify", "handle"]
    due_at: str
    met_at: str | None
    fired_at: str | None


class HistoryEntry(BaseModel):
    id: int
    at: str
    action: Literal["reported", "raised", "transitioned", "escalated"]
    from_status: str | None
    to_status: str | None
    from_level: str | None
    to_level: str | None
    step: str | None
    principal: str | None
    note: str | None
    version: int


class EventOut(BaseModel):
    """An event with its deadlines, history and links (risk points, teams, plan)."""

    model_config = ConfigDict(extra="allow")

    id: int
    kind: str
    sector_code: str
    title: str
    description: str
    source: Literal["report", "rule", "detector"]
    status: State
    level: Level
    grid_code: str
    community_code: str
    street_code: str
    district_code: str
    lon: float
    lat: float
    reported_by: str
    reported_at: str
    updated_at: str
    version: int
    etag: str
    sensor_id: int | None = None
    rule_code: str | None = None
    closed_at: str | None = None
    deadlines: list[Deadline] = []
    history: list[HistoryEntry] = []
    links: dict[str, Any] = Field(default_factory=dict, description=(
        "radius_m, risk_points (nearest first), teams_by ('road' or 'distance'), teams, "
        "plan (of the most severe linked risk point), plans"))


class EventFeature(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["Feature"]
    id: int
    geometry: dict[str, Any]
    properties: dict[str, Any]


class EventCollection(BaseModel):
    type: Literal["FeatureCollection"]
    numberReturned: int
    features: list[EventFeature]


async def _principal(request: Request) -> Principal:
    principal = await get_principal(request)
    if principal is None:
        raise Unauthenticated("this endpoint needs a bearer key or token")
    return principal


def _list(value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    return items or None


def _bbox(value: str | None) -> tuple[float, float, float, float] | None:
    if value is None:
        return None
    try:
        parts = [float(v) for v in value.split(",")]
    except ValueError:
        parts = []
    if len(parts) != 4:
        raise InvalidParameter(f"bbox: expected minLon,minLat,maxLon,maxLat, got {value!r}")
    return parts[0], parts[1], parts[2], parts[3]


@router.post("/events", status_code=201, response_model=EventOut,
             summary="Report an event at a spot: located to its grid, linked to risk points, "
                     "teams and plan, with deadlines from its kind (planner)",
             responses={403: {"description": "the spot is outside your jurisdiction"},
                        422: {"description": "outside the municipality, or unknown kind"}})
async def post_event(body: NewEvent, request: Request, conn: ConnDep,
                     settings: SettingsDep) -> JSONResponse:
    principal = await _principal(request)
    event = await events.report(conn, principal, body.model_dump(), settings.events)
    await conn.commit()
    live = getattr(request.app.state, "live", None)
    escalation = getattr(live, "escalation", None) if live is not None else None
    if escalation is not None and hasattr(escalation, "wake"):
        escalation.wake()
    event.pop("units", None)
    event = await events.read(conn, principal.scope, event["id"])
    await conn.rollback()
    return JSONResponse(event, status_code=201, headers={
        "Location": f"/events/{event['id']}", "ETag": event["etag"]})


@router.get("/events", response_model=EventCollection,
            summary="Events in your jurisdiction as GeoJSON, newest first (viewer)")
async def get_events(
    conn: ConnDep, scope: ScopeDep,
    status: str | None = Query(None, max_length=200, description=(
        "comma-separated states: " + ", ".join(EVENT_STATES))),
    level: str | None = Query(None, max_length=200, description=(
        "comma-separated levels: " + ", ".join(EVENT_LEVELS))),
    kind: str | None = Query(None, max_length=1000, description="comma-separated kind codes"),
    bbox: str | None = Query(None, max_length=200, description="minLon,minLat,maxLon,maxLat"),
    limit: int = Query(100, ge=1, le=events.MAX_LIST),
) -> JSONResponse:
    collection = await events.list_events(
        conn, scope, status=_list(status), level=_list(level), kind=_list(kind),
        bbox=_bbox(bbox), limit=limit)
    return JSONResponse(collection, media_type="application/geo+json")


# Before /events/{event_id}, so "kinds" is not taken for an id.
@router.get("/events/kinds", response_model=EventKinds,
            summary="Event kinds with their sector and deadlines (viewer)")
async def get_event_kinds(conn: ConnDep) -> dict[str, Any]:
    return {"kinds": await events.kinds(conn)}


@router.get("/events/{event_id}", response_model=EventOut, responses=ERRORS,
            summary="One event with its history, deadlines and links; ETag (viewer)")
async def get_event(conn: ConnDep, scope: ScopeDep,
                    event_id: int = Path(ge=1, le=2**63 - 1)) -> JSONResponse:
    event = await events.read(conn, scope, event_id)
    return JSONResponse(event, headers={"ETag": event["etag"]})


@router.post("/events/{event_id}/transitions", response_model=EventOut,
             summary="Move an event to its next state (planner); If-Match optional",
             responses={**ERRORS,
                        409: {"description": "not the allowed next state (named)"},
                        412: {"description": "If-Match names another version"}})
async def post_transition(body: Transition, request: Request, conn: ConnDep,
                          event_id: int = Path(ge=1, le=2**63 - 1),
                          if_match: str | None = Header(None, description=(
                              "the ETag of GET /events/{id}; another version: 412"))
                          ) -> Response:
    principal = await _principal(request)
    event = await events.transition(conn, principal, event_id, body.to, body.note, if_match)
    await conn.commit()
    return JSONResponse(event, headers={"ETag": event["etag"]})

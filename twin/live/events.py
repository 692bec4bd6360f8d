"""Events: located, linked, moved through their states, escalated (owner: events).

An event (事件) is reported by a grid worker (``report``, by a principal) or raised by a rule
or detector (``raise_event``, no principal). Either way it is:

* **located** by PostGIS: the grid cell that holds the spot (twin.queries.locate's rule: on a
  shared edge the lowest code), and that grid's community, street and district. A spot no grid
  holds is outside the municipality: 422 ``OutsideMunicipality``.
* **owned** by that grid: it starts at level ``grid`` and rises one level (street, district,
  city) per missed deadline (twin/live/escalation.py).
* **linked** to the risk points within ``TWIN_EVENTS_LINK_RADIUS_M`` (geodesic metres,
  nearest first), the nearest response teams, and the emergency plans of the linked risk
  points, the most severe first (``links.plan``). Teams of a report are ranked by road over
  the pgRouting graph (``TWIN_EVENTS_TEAMS_BY``, ~65-250 ms an event on the small sample);
  those of a raised event by geodesic distance (``TWIN_EVENTS_RAISED_TEAMS_BY``, ~10 ms:
  it is written inside the ingest's transaction, after its first outbox message may hold
  the outbox lock). ``links.teams_by`` says which was used; "road" falls back to
  "distance" when the road graph reaches no team.
* **given deadlines** from its kind (``event_kinds.respond_s/verify_s/handle_s``, counted from
  the report).

Jurisdiction (the rule this module documents):

* Reporting a spot the reporter's scope does not hold: 403 ``OutsideJurisdiction``, naming the
  reporter's jurisdiction and the street and district of the spot. The spot is not secret
  (the reporter chose it), the refusal is about who may act there.
* Reading or moving an event the principal's scope does not hold: 404, exactly as for an
  event that does not exist (its existence is not the caller's to learn).

States: reported -> responded -> verified -> handled -> closed, one step at a time; any other
move is 409 ``TransitionNotAllowed`` naming the allowed next state. ``If-Match`` (optional)
against the event's ETag: a mismatch is 412.

Every change is written in the caller's transaction (nothing here commits): the event row, a
history row, deadlines met, and the outbox ``event`` message (area codes ``[grid_code]``)
LAST, as twin/core/outbox.py asks.
"""

from __future__ import annotations

import json
import logging
import math
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from twin.core import outbox
from twin.core.errors import InvalidParameter, NotFound, PreconditionFailed, TwinError
from twin.core.models import EVENT_LEVELS, EVENT_SOURCES, EVENT_STATES
from twin.core.principal import CITY, Principal, Scope
from twin.core.scope import code_in_scope, code_predicate
from twin.core.settings import EventsSettings
from twin.queries.locate import owner_units
from twin.queries.nearest import check_point, nearest_teams
from twin.queries.routing import nearest_teams_by_road

log = logging.getLogger("twin.live.events")

# The one next state of each state (closed is final).
NEXT_STATE = {"reported": "responded", "responded": "verified", "verified": "handled",
              "handled": "closed"}
# The deadline a state meets when the event enters it.
STEP_MET_BY = {"responded": "respond", "verified": "verify", "handled": "handle"}
STEPS = ("respond", "verify", "handle")
MAX_LIST = 1000
MAX_TEXT = 4000
TITLE_MAX = 200

# Set by twin/live/escalation.py's start (every server process) from the app's settings, so
# raise_event, whose signature carries no settings, links as the server is configured.
_settings = EventsSettings()


def configure(settings: EventsSettings) -> None:
    global _settings
    _settings = settings


class OutsideMunicipality(TwinError):
    status_code = 422


class UnknownKind(TwinError):
    status_code = 422


class OutsideJurisdiction(TwinError):
    """Not the auth layer's Forbidden: the caller's credentials are fine, the place is not
    theirs (no WWW-Authenticate challenge)."""

    status_code = 403


class TransitionNotAllowed(TwinError):
    status_code = 409



def etag(event_id: int, version: int) -> str:
    return f'"event-{event_id}-v{version}"'


def _matches(if_match: str, current: str) -> bool:
    tags = [t.strip() for t in if_match.split(",")]
    return any(t == "*" or t.removeprefix("W/") == current for t in tags)


# --- reading -------------------------------------------------------------------------------

_SUMMARY_COLUMNS = """
    e.id, e.kind, k.name_zh AS kind_name_zh, k.name_en AS kind_name_en, e.sector_code,
    e.title, e.description, e.source, e.status, e.level, e.grid_code, e.community_code,
    e.street_code, e.district_code, ST_X(e.geom) AS lon, ST_Y(e.geom) AS lat,
    e.reported_by, e.reported_at, e.updated_at, e.version, e.sensor_id, e.rule_code,
    e.closed_at
"""

_DEADLINES_JSON = """
    (SELECT coalesce(json_agg(json_build_object(
                'step', d.step, 'due_at', d.due_at, 'met_at', d.met_at,
                'fired_at', d.fired_at)
            ORDER BY array_position(ARRAY['respond', 'verify', 'handle'], d.step::text)),
            '[]'::json)
       FROM event_deadlines AS d WHERE d.event_id = e.id) AS deadlines
"""


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _record(row: Any) -> dict[str, Any]:
    record = {key: _iso(value) for key, value in dict(row).items()}
    if isinstance(record.get("deadlines"), str):
        record["deadlines"] = json.loads(record["deadlines"])
    if "version" in record:
        record["etag"] = etag(record["id"], record["version"])
    return record


def _summary(event: dict[str, Any], action: str, **extra: Any) -> dict[str, Any]:
    """The outbox payload of a change: enough for a map to redraw the event."""
    keys = ("id", "kind", "title", "status", "level", "grid_code", "street_code",
            "district_code", "lon", "lat", "version", "reported_at", "updated_at")
    return {"action": action, **{key: _iso(event.get(key)) for key in keys}, **extra}


async def read(conn: AsyncConnection, scope: Scope, event_id: int) -> dict[str, Any]:
    """The event with its deadlines, history and links; 404 when absent or not the scope's."""
    row = (await conn.execute(text(f"""
        SELECT {_SUMMARY_COLUMNS}, e.links, {_DEADLINES_JSON}
          FROM events AS e JOIN event_kinds AS k ON k.code = e.kind
         WHERE e.id = :id
    """), {"id": event_id})).mappings().first()
    if row is None or not code_in_scope(scope, row["grid_code"]):
        raise NotFound(f"event {event_id} not found")
    event = _record(row)
    history = (await conn.execute(text("""
        SELECT id, at, action, from_status, to_status, from_level, to_level, step, principal,
               note, version
          FROM event_history WHERE event_id = :id ORDER BY id
    """), {"id": event_id})).mappings().all()
    event["history"] = [{key: _iso(value) for key, value in dict(h).items()} for h in history]
    return event


def _check_bbox(bbox: tuple[float, float, float, float] | None) -> None:
    if bbox is None:
        return
    minx, miny, maxx, maxy = bbox
    if not all(math.isfinite(v) for v in bbox) or minx > maxx or miny > maxy:
        raise InvalidParameter(f"bbox: expected minLon,minLat,maxLon,maxLat with min <= max, "
                               f"got {','.join(str(v) for v in bbox)}")


async def list_events(conn: AsyncConnection, scope: Scope, *, status: list[str] | None = None,
                      level: list[str] | None = None, kind: list[str] | None = None,
                      bbox: tuple[float, float, float, float] | None = None,
                      limit: int = 100) -> dict[str, Any]:
    """A GeoJSON FeatureCollection of the scope's events, newest report first."""
    for name, values, allowed in (("status", status, EVENT_STATES),
                                  ("level", level, EVENT_LEVELS)):
        unknown = sorted(set(values or ()) - set(allowed))
        if unknown:
            raise InvalidParameter(f"{name}: unknown {', '.join(unknown)}; allowed: "
                                   f"{', '.join(allowed)}")
    if not 1 <= limit <= MAX_LIST:
        raise InvalidParameter(f"limit: must be between 1 and {MAX_LIST}, got {limit}")
    _check_bbox(bbox)
    in_scope = code_predicate(scope, "e.grid_code")
    params: dict[str, Any] = {"status": status, "level": level, "kind": kind,
                              "limit": limit, **in_scope.params}
    where = ["TRUE"]
    if status:
        where.append("e.status = ANY(CAST(:status AS text[]))")
    if level:
        where.append("e.level = ANY(CAST(:level AS text[]))")
    if kind:
        where.append("e.kind = ANY(CAST(:kind AS text[]))")
    if bbox is not None:
        where.append("e.geom && ST_MakeEnvelope(:minx, :miny, :maxx, :maxy, 4326)")
        params.update(zip(("minx", "miny", "maxx", "maxy"), bbox, strict=True))
    rows = (await conn.execute(text(f"""
        SELECT {_SUMMARY_COLUMNS}, {_DEADLINES_JSON}
          FROM events AS e JOIN event_kinds AS k ON k.code = e.kind
         WHERE {' AND '.join(where)}{in_scope.and_sql}
         ORDER BY e.reported_at DESC, e.id DESC
         LIMIT :limit
    """), params)).mappings().all()
    features = []
    for row in rows:
        record = _record(row)
        lon, lat = record.pop("lon"), record.pop("lat")
        features.append({"type": "Feature", "id": record["id"],
                         "geometry": {"type": "Point", "coordinates": [lon, lat]},
                         "properties": record})
    return {"type": "FeatureCollection", "numberReturned": len(features),
            "features": features}


async def kinds(conn: AsyncConnection) -> list[dict[str, Any]]:
    rows = (await conn.execute(text("""
        SELECT code, sector_code, name_zh, name_en, respond_s, verify_s, handle_s
          FROM event_kinds ORDER BY sector_code, code
    """))).mappings().all()
    return [dict(row) for row in rows]


# --- links ---------------------------------------------------------------------------------

# Candidates by the GiST index on a box a little larger than the circle (degrees), then the
# geodesic distance on the ellipsoid decides.
_NEAR_RISK_POINTS = text("""
    WITH p AS (SELECT ST_SetSRID(ST_MakePoint(:lon, :lat), 4326) AS geom)
    SELECT r.id, r.code, r.name, r.sector_code, r.category, r.level, r.grid_code, r.plan_id,
           ST_Distance(r.geom::geography, p.geom::geography) AS distance_m
      FROM risk_points AS r, p
     WHERE r.geom && ST_Expand(p.geom, :dx, :dy)
       AND ST_DWithin(r.geom::geography, p.geom::geography, :radius)
     ORDER BY distance_m, r.id
     LIMIT :limit
""")

_PLANS = text("""
    SELECT id, code, title_zh, title_en, sector_code, response_level, issuer_code
      FROM emergency_plans WHERE id = ANY(CAST(:ids AS integer[]))
""")


async def _links(conn: AsyncConnection, lon: float, lat: float,
                 settings: EventsSettings, teams_by: str) -> dict[str, Any]:
    radius = settings.link_radius_m
    # Metres per degree: >= 110,574 of latitude; of longitude >= 111,320 * cos(lat) (a
    # 1 % margin covers the ellipsoid's flattening).
    dy = radius / 110_574.0 * 1.01
    dx = radius / (111_320.0 * max(math.cos(math.radians(abs(lat) + dy)), 1e-6)) * 1.01
    points = [dict(row) for row in (await conn.execute(_NEAR_RISK_POINTS, {
        "lon": lon, "lat": lat, "dx": dx, "dy": dy, "radius": radius,
        "limit": settings.max_linked_risk_points})).mappings()]
    for point in points:
        point["distance_m"] = round(float(point["distance_m"]), 1)
    # The plans of the linked points, the most severe point's first (level 1 is major),
    # then the nearest's.
    order = [p["plan_id"] for p in sorted(points, key=lambda p: (p["level"], p["distance_m"]))
             if p["plan_id"] is not None]
    plan_ids = list(dict.fromkeys(order))
    plans_by_id = {row["id"]: dict(row) for row in
                   (await conn.execute(_PLANS, {"ids": plan_ids})).mappings()} if plan_ids else {}
    plans = [plans_by_id[i] for i in plan_ids if i in plans_by_id]

    teams: list[dict[str, Any]] = []
    if settings.nearest_teams > 0:
        k = settings.nearest_teams
        if teams_by == "road":
            found = await nearest_teams_by_road(conn, lon, lat, k=k, scope=CITY)
            teams = [{"id": t.id, "code": t.code, "name_zh": t.name_zh, "name_en": t.name_en,
                      "team_type": t.team_type, "status": t.status, "phone": t.phone,
                      "distance_m": round(t.distance_m, 1),
                      "travel_time_s": None if t.travel_time_s is None
                      else round(t.travel_time_s, 1),
                      "network_distance_m": None if t.network_distance_m is None
                      else round(t.network_distance_m, 1),
                      "route_status": t.route_status} for t in found]
            if not any(t["route_status"] == "ok" for t in teams):
                teams_by = "distance"  # no road graph (or nothing reachable on it)
        if teams_by == "distance":
            teams = [{"id": t.id, "code": t.code, "name_zh": t.name_zh, "name_en": t.name_en,
                      "team_type": t.team_type, "status": t.status, "phone": t.phone,
                      "distance_m": round(t.distance_m, 1)}
                     for t in await nearest_teams(conn, lon, lat, k=k, scope=CITY)]
    return {"radius_m": radius, "risk_points": points, "teams_by": teams_by, "teams": teams,
            "plan": plans[0] if plans else None, "plans": plans}


# --- writing -------------------------------------------------------------------------------

def _text(name: str, value: Any, limit: int, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise InvalidParameter(f"{name}: must be a non-empty string")
    if len(value) > limit:
        raise InvalidParameter(f"{name}: must be at most {limit} characters")
    return value.strip()


async def _kind(conn: AsyncConnection, kind: str) -> Any:
    row = (await conn.execute(text(
        "SELECT code, sector_code, name_zh, name_en, respond_s, verify_s, handle_s "
        "FROM event_kinds WHERE code = :code"), {"code": kind})).mappings().first()
    if row is None:
        known = (await conn.execute(text("SELECT code FROM event_kinds ORDER BY code"))
                 ).scalars().all()
        raise UnknownKind(f"kind: unknown event kind {kind!r}; allowed: {', '.join(known)}")
    return row


async def _create(conn: AsyncConnection, *, kind: str, lon: float, lat: float, source: str,
                  title: str | None, description: str, reported_by: str,
                  scope: Scope | None, sensor_id: int | None = None,
                  rule_code: str | None = None,
                  settings: EventsSettings | None = None) -> dict[str, Any]:
    settings = settings or _settings
    if source not in EVENT_SOURCES:
        raise InvalidParameter(f"source: must be one of {', '.join(EVENT_SOURCES)}")
    check_point(lon, lat)
    description = _text("description", description, MAX_TEXT)
    kind_row = await _kind(conn, kind)
    title = _text("title", title, TITLE_MAX, required=False) or kind_row["name_zh"]
    units = await owner_units(conn, lon, lat)
    if units is None:
        raise OutsideMunicipality(f"the point lon={lon}, lat={lat} is outside the "
                                  f"municipality: no grid cell holds it")
    grid = units["grid"]["code"]
    if scope is not None and not code_in_scope(scope, grid):
        street, district = units["street"], units["district"]
        raise OutsideJurisdiction(
            f"the point lon={lon}, lat={lat} lies in {street['name_zh']} ({street['code']}), "
            f"{district['name_zh']} ({district['code']}), outside your jurisdiction "
            f"({scope.text}); report it to that street's centre")
    links = await _links(conn, lon, lat, settings,
                         settings.teams_by if source == "report" else settings.raised_teams_by)
    row = (await conn.execute(text("""
        INSERT INTO events (kind, sector_code, title, description, source, grid_code,
                            community_code, street_code, district_code, geom, reported_by,
                            reported_at, updated_at, sensor_id, rule_code, links)
        VALUES (:kind, :sector, :title, :description, :source, :grid, :community, :street,
                :district, ST_SetSRID(ST_MakePoint(:lon, :lat), 4326), :by,
                clock_timestamp(), clock_timestamp(), :sensor_id, :rule_code,
                CAST(:links AS jsonb))
        RETURNING id, reported_at
    """), {"kind": kind, "sector": kind_row["sector_code"], "title": title,
           "description": description, "source": source, "grid": grid,
           "community": units["community"]["code"], "street": units["street"]["code"],
           "district": units["district"]["code"], "lon": lon, "lat": lat, "by": reported_by,
           "sensor_id": sensor_id, "rule_code": rule_code,
           "links": json.dumps(links, ensure_ascii=False, default=str)})).one()
    event_id, reported_at = row.id, row.reported_at
    await conn.execute(text("""
        INSERT INTO event_deadlines (event_id, step, due_at)
        SELECT :id, step, CAST(:at AS timestamptz) + make_interval(secs => s)
          FROM unnest(CAST(:steps AS text[]), CAST(:secs AS integer[])) AS t(step, s)
    """), {"id": event_id, "at": reported_at, "steps": list(STEPS),
           "secs": [kind_row["respond_s"], kind_row["verify_s"], kind_row["handle_s"]]})
    action = "reported" if source == "report" else "raised"
    await conn.execute(text("""
        INSERT INTO event_history (event_id, at, action, to_status, to_level, principal, note,
                                   version)
        VALUES (:id, :at, :action, 'reported', 'grid', :by, :note, 1)
    """), {"id": event_id, "at": reported_at, "action": action, "by": reported_by,
           "note": description})
    event = {"id": event_id, "kind": kind, "sector_code": kind_row["sector_code"],
             "title": title, "description": description, "source": source,
             "status": "reported", "level": "grid", "grid_code": grid,
             "community_code": units["community"]["code"],
             "street_code": units["street"]["code"], "district_code": units["district"]["code"],
             "lon": lon, "lat": lat, "reported_by": reported_by,
             "reported_at": reported_at.isoformat(), "updated_at": reported_at.isoformat(),
             "version": 1, "sensor_id": sensor_id, "rule_code": rule_code, "links": links,
             "etag": etag(event_id, 1), "units": units}
    # Last: the outbox holds its lock from here to the commit.
    await outbox.emit(conn, "event", _summary(event, action), [grid])
    return event


async def report(conn: AsyncConnection, principal: Principal, body: dict[str, Any],
                 settings: EventsSettings | None = None) -> dict[str, Any]:
    """An event reported by ``principal`` at ``body`` {lon, lat, kind, description, title?}.

    422 outside the municipality or for an unknown kind; 403 outside the principal's
    jurisdiction. In the caller's transaction (no commit).
    """
    for key in ("lon", "lat"):
        value = body.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidParameter(f"{key}: must be a number (WGS84 degrees)")
    kind = body.get("kind")
    if not isinstance(kind, str):
        raise InvalidParameter("kind: must be an event kind code (GET /events/kinds)")
    return await _create(conn, kind=kind, lon=float(body["lon"]), lat=float(body["lat"]),
                         source="report", title=body.get("title"),
                         description=body.get("description"),  # type: ignore[arg-type]
                         reported_by=principal.name, scope=principal.scope,
                         settings=settings)


async def raise_event(conn: AsyncConnection, *, kind: str, lon: float, lat: float,
                      source: str, title: str, description: str,
                      sensor_id: int | None = None, rule_code: str | None = None
                      ) -> dict[str, Any]:
    """An event raised by a rule or detector, inside the caller's transaction (no commit).

    ``source``: 'rule' or 'detector'. No jurisdiction check (the spot is the city's). Raises
    OutsideMunicipality (422) when no grid holds the spot and UnknownKind (422) for a kind
    not in ``event_kinds``.
    """
    # Never refused for its length: a detector's text must not fail the ingest.
    short_title = (title or "").strip()[:TITLE_MAX]
    text_ = (description or "").strip()[:MAX_TEXT] or short_title or kind
    return await _create(conn, kind=kind, lon=lon, lat=lat, source=source,
                         title=short_title or None, description=text_,
                         reported_by=f"{source}:{rule_code or kind}", scope=None,
                         sensor_id=sensor_id, rule_code=rule_code)


async def transition(conn: AsyncConnection, principal: Principal, event_id: int, to: str,
                     note: str | None = None, if_match: str | None = None) -> dict[str, Any]:
    """Move the event to ``to``; the event as read afterwards. In the caller's transaction.

    404 when absent or outside the principal's scope; 412 when ``if_match`` (an If-Match
    header) names another version; 409 naming the allowed next state.
    """
    if to not in EVENT_STATES:
        raise InvalidParameter(f"to: unknown state {to!r}; states: {', '.join(EVENT_STATES)}")
    if note is not None:
        note = _text("note", note, MAX_TEXT, required=False) or None
    row = (await conn.execute(text("""
        SELECT id, status, level, version, grid_code FROM events WHERE id = :id FOR UPDATE
    """), {"id": event_id})).mappings().first()
    if row is None or not code_in_scope(principal.scope, row["grid_code"]):
        raise NotFound(f"event {event_id} not found")
    current = etag(event_id, row["version"])
    if if_match is not None and not _matches(if_match, current):
        raise PreconditionFailed(f"If-Match: event {event_id} is at {current}, not "
                                 f"{if_match}; read it again and retry")
    allowed = NEXT_STATE.get(row["status"])
    if to != allowed:
        raise TransitionNotAllowed(
            f"event {event_id} is '{row['status']}': "
            + (f"the allowed next state is '{allowed}', not '{to}'" if allowed
               else f"it is final, no state follows (asked for '{to}')"))
    updated = (await conn.execute(text("""
        UPDATE events SET status = :to, version = version + 1, updated_at = clock_timestamp(),
                          closed_at = CASE WHEN :closing THEN clock_timestamp() END
         WHERE id = :id
        RETURNING version, updated_at
    """), {"id": event_id, "to": to, "closing": to == "closed"})).one()
    step = STEP_MET_BY.get(to)
    late = False
    if step is not None:
        met = (await conn.execute(text("""
            UPDATE event_deadlines SET met_at = :at
             WHERE event_id = :id AND step = :step AND met_at IS NULL
            RETURNING due_at < met_at AS late
        """), {"id": event_id, "step": step, "at": updated.updated_at})).first()
        late = bool(met and met.late)
    await conn.execute(text("""
        INSERT INTO event_history (event_id, at, action, from_status, to_status, from_level,
                                   to_level, step, principal, note, version)
        VALUES (:id, :at, 'transitioned', :from, :to, :level, :level, :step, :by, :note,
                :version)
    """), {"id": event_id, "at": updated.updated_at, "from": row["status"], "to": to,
           "level": row["level"], "step": step, "by": principal.name, "note": note,
           "version": updated.version})
    event = await read(conn, CITY, event_id)
    # Last: the outbox holds its lock from here to the commit.
    await outbox.emit(conn, "event", _summary(event, "transitioned", step=step, late=late,
                                              by=principal.name), [row["grid_code"]])
    return event


# --- escalation (called by twin/live/escalation.py) ---------------------------------------

# Claims the due deadlines and their events together, or skips both: a transition holds its
# event's row while it meets a deadline, so the two never wait on each other crosswise.
# The due deadlines this transaction can claim, their events locked too (SKIP LOCKED: a
# deadline another process is firing is left to it).
_CLAIM_DUE = text("""
    SELECT d.event_id, d.step, d.due_at, e.level, e.version
      FROM event_deadlines AS d JOIN events AS e ON e.id = d.event_id
     WHERE d.met_at IS NULL AND d.fired_at IS NULL AND d.due_at <= clock_timestamp()
     ORDER BY d.due_at, d.event_id,
              array_position(ARRAY['respond', 'verify', 'handle'], d.step::text)
     LIMIT :batch
       FOR UPDATE OF d, e SKIP LOCKED
""")

# One statement fires the claimed batch (given in firing order): each event one level up
# per fired step (the city stays the city), the deadlines marked fired, one history row per
# step. The n-th step of an event goes from the level n - 1 steps above the claimed one.
# (Run only when something was claimed: the statement trigger on events bumps the layer's
# data version even for an update of no rows.)
_FIRE = text("""
    WITH steps AS MATERIALIZED (
        SELECT c.event_id, c.step, c.due_at, c.version,
               row_number() OVER (PARTITION BY c.event_id ORDER BY c.k) AS n,
               array_position(ARRAY['grid', 'street', 'district', 'city'], c.level) AS at
          FROM unnest(CAST(:ids AS bigint[]), CAST(:steps AS text[]),
                      CAST(:due AS timestamptz[]), CAST(:levels AS text[]),
                      CAST(:versions AS int[]))
               WITH ORDINALITY AS c(event_id, step, due_at, level, version, k)
    ), bumped AS (
        UPDATE events AS e
           SET level = (ARRAY['grid', 'street', 'district', 'city'])[least(s.at + s.k, 4)],
               version = e.version + s.k, updated_at = clock_timestamp()
          FROM (SELECT event_id, min(at) AS at, count(*) AS k FROM steps GROUP BY event_id) AS s
         WHERE e.id = s.event_id
        RETURNING e.id, e.updated_at, e.status
    ), fired AS (
        UPDATE event_deadlines AS d SET fired_at = b.updated_at
          FROM steps AS s JOIN bumped AS b ON b.id = s.event_id
         WHERE d.event_id = s.event_id AND d.step = s.step
    )
    INSERT INTO event_history (event_id, at, action, from_status, to_status, from_level,
                               to_level, step, principal, note, version)
    SELECT s.event_id, b.updated_at, 'escalated', b.status, b.status,
           (ARRAY['grid', 'street', 'district', 'city'])[least(s.at + s.n - 1, 4)],
           (ARRAY['grid', 'street', 'district', 'city'])[least(s.at + s.n, 4)],
           s.step, 'escalation',
           'deadline to ' || s.step || ' passed at ' || (to_json(s.due_at) #>> '{}'),
           s.version + s.n
      FROM steps AS s JOIN bumped AS b ON b.id = s.event_id
""")


async def escalate_due(conn: AsyncConnection, batch: int = 100) -> int:
    """Fire the due deadlines this transaction can claim (at most ``batch``); how many.

    Each fired step raises its event one level (the city stays the city), marks the deadline
    fired, and writes history: one statement for the batch, so a busy database delays a
    deadline by a few round trips, not a few per deadline. The outbox messages come last.
    The caller commits.
    """
    fired = (await conn.execute(_CLAIM_DUE, {"batch": batch})).all()
    if not fired:
        return 0
    await conn.execute(_FIRE, {
        "ids": [row.event_id for row in fired], "steps": [row.step for row in fired],
        "due": [row.due_at for row in fired], "levels": [row.level for row in fired],
        "versions": [row.version for row in fired]})
    ids = sorted({row.event_id for row in fired})
    rows = (await conn.execute(text(f"""
        SELECT {_SUMMARY_COLUMNS} FROM events AS e JOIN event_kinds AS k ON k.code = e.kind
         WHERE e.id = ANY(CAST(:ids AS bigint[]))
    """), {"ids": ids})).mappings().all()
    current = {row["id"]: _record(row) for row in rows}
    # Last: the outbox messages, one per fired step.
    await outbox.emit_many(conn, [
        ("event", _summary(current[event_id], "escalated", step=step,
                           due_at=due_at.isoformat()), [current[event_id]["grid_code"]])
        for event_id, step, due_at, _, _ in fired])
    return len(fired)


_NEXT_DUE = text("""
    SELECT extract(epoch FROM min(due_at) - clock_timestamp())
      FROM event_deadlines WHERE met_at IS NULL AND fired_at IS NULL
""")


async def seconds_to_next_due(conn: AsyncConnection) -> float | None:
    """Seconds until the next open deadline (negative: overdue); None when none is open."""
    value = (await conn.execute(_NEXT_DUE)).scalar()
    return None if value is None else float(value)

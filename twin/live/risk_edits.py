"""Risk points edited by grid workers: OGC API - Features Part 4 (create, replace, update,
delete) on ``/collections/risk_points/items`` (issue 14). The routes (twin/api/routes/edits.py)
parse the request and answer; everything else is here.

* **Where a point belongs** is found by PostGIS, never taken from the client: the grid cell
  (``admin_units`` level ``grid``) that covers the point (on a shared edge, the lowest code);
  none: 422 "outside the municipality". ``h3_r3`` .. ``h3_r9`` are computed here with h3 v4
  (``latlng_to_cell`` as 64-bit integers, as the sample loader does); the statement triggers
  of migration 0005 keep ``risk_point_h3_counts`` exact, and those of 0001 bump the layer's
  data version (whose deferred trigger pushes the ``layer`` message, migration 0010).
* **Jurisdiction.** The editor's scope must hold the point's grid code, where it is and where
  it goes: creating outside it or moving a point out of it is 403, naming the jurisdiction. A
  point outside the scope does not exist for PUT, PATCH and DELETE (404), as for reads.
* **Optimistic concurrency.** An item's ETag is a strong validator of its stored content (an
  md5 over every stored column but the derived H3 cells; ``updated_at`` moves on every edit),
  the same one the item GET sends (twin/api/routes/features.py). ``If-Match`` with another
  value: 412. ``If-Match`` is optional: without it the last writer wins (clients that care
  send it). The row is locked (``FOR UPDATE``) before the comparison, so of two writers
  holding one ETag exactly one succeeds.
* **Audit and push.** Every edit writes a ``risk_point_edits`` row (before and after) and,
  last before the commit, an outbox ``feature`` message ``{collection, id, action}`` for the
  point's grid (and the grid it left, when moved). Each function here commits.

The properties a client sets: ``name``, ``sector_code``, ``category``, ``level`` (1..4),
``address`` (all required for POST and PUT), ``plan_id`` (optional, an emergency plan's id or
null) and ``code`` (optional: generated ``RP<id>`` on create; kept by a PUT without it).
``id``, ``grid_code``, ``updated_at`` and the H3 cells are the server's: sent, they are
ignored (a feature read with GET can be sent back). Any other property: 422.
Coordinates are CRS84 (lon/lat) unless the ``Content-Crs`` header names another CRS twin
serves (Part 4 / Part 2): e.g. EPSG:4326 in its own lat/lon order.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from h3.api import basic_int as h3
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from twin.core import outbox
from twin.core.crs_ref import CrsRef, resolve
from twin.core.errors import (
    Conflict,
    InvalidParameter,
    NotFound,
    PreconditionFailed,
    Unprocessable,
)
from twin.core.principal import Forbidden, Principal
from twin.core.scope import code_in_scope, table_predicate

COLLECTION = "risk_points"
H3_RESOLUTIONS = (3, 4, 5, 6, 7, 8, 9)
LEVELS = {1: "major (red)", 2: "large (orange)", 3: "general (yellow)", 4: "low (blue)"}
REQUIRED = ("name", "sector_code", "category", "level", "address")
OPTIONAL = ("code", "plan_id")
EDITABLE = REQUIRED + OPTIONAL
# The server's: ignored when a client sends them back.
READ_ONLY = ("id", "grid_code", "updated_at", *(f"h3_r{res}" for res in H3_RESOLUTIONS))
MAX_TEXT = 500
MAX_CODE = 24  # risk_points.code is varchar(24)
MAX_BIGINT = 2**63 - 1


# --- the ETag ----------------------------------------------------------------------------

# Every stored column but the H3 cells (derived from geom); the epoch of updated_at, not its
# text, which would follow the session's TimeZone.
_ETAG_SQL = ("md5(jsonb_build_array(t.id, t.code, t.name, t.sector_code, t.category, t.level, "
             "t.address, t.grid_code, t.plan_id, encode(ST_AsEWKB(t.geom), 'hex'), "
             "extract(epoch FROM t.updated_at))::text)")


def _quoted(digest: str) -> str:
    return f'"{digest}"'


def _point_id(feature_id: str | int) -> int | None:
    """The integer id a path names, or None (no such point)."""
    if isinstance(feature_id, int):
        value = feature_id
    else:
        text_id = feature_id.strip()
        if not text_id.isascii() or not text_id.isdigit() or len(text_id) > 19:
            return None
        value = int(text_id)
    return value if 0 < value <= MAX_BIGINT else None


async def etag(conn: AsyncConnection, feature_id: str | int) -> str | None:
    """The item's ETag (a quoted strong validator), or None when there is no such point.

    For the item GET: read it BEFORE the feature, so a write in between can only make the
    client's If-Match fail (412), never pass with an older body."""
    point_id = _point_id(feature_id)
    if point_id is None:
        return None
    digest = (await conn.execute(text(f"SELECT {_ETAG_SQL} FROM risk_points AS t "
                                      "WHERE t.id = :id"), {"id": point_id})).scalar()
    return None if digest is None else _quoted(digest)


def if_match_holds(if_match: str | None, current: str) -> bool:
    """RFC 9110 If-Match with strong comparison: absent, ``*`` or a listed strong ETag equal
    to ``current``; a weak one (``W/"..."``) never matches."""
    if if_match is None:
        return True
    tags = [tag.strip() for tag in if_match.split(",") if tag.strip()]
    return "*" in tags or current in tags


# --- what a client sends -----------------------------------------------------------------

@dataclass
class Draft:
    """A parsed Feature (or merge patch): properties set, and the point in its CRS."""

    properties: dict[str, Any] = field(default_factory=dict)
    # (first, second) coordinate in the body's CRS; None: not given (a patch).
    coordinates: tuple[float, float] | None = None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_geometry(geometry: Any, crs: CrsRef) -> tuple[float, float]:
    """A GeoJSON Point's two coordinates (a third, height, is dropped); 400 otherwise."""
    if not isinstance(geometry, dict):
        raise InvalidParameter("geometry: expected a GeoJSON Point object "
                               '{"type": "Point", "coordinates": [lon, lat]}')
    if geometry.get("type") != "Point":
        raise InvalidParameter(f"geometry: a risk point is a GeoJSON Point, got type "
                               f"{str(geometry.get('type'))[:40]!r}")
    coordinates = geometry.get("coordinates")
    if (not isinstance(coordinates, list) or len(coordinates) not in (2, 3)
            or not all(_number(c) and math.isfinite(c) for c in coordinates)):
        raise InvalidParameter("geometry: coordinates must be 2 (or 3) finite numbers, "
                               f"{crs.axis_names()} in {crs.uri}")
    first, second = float(coordinates[0]), float(coordinates[1])
    if crs.geographic:
        lat, lon = (first, second) if crs.north_first else (second, first)
        if not (-180 <= lon <= 180 and -90 <= lat <= 90):
            raise InvalidParameter(f"geometry: ({first}, {second}) is not a {crs.axis_names()} "
                                   f"position in {crs.uri}: longitudes lie in [-180, 180], "
                                   "latitudes in [-90, 90]")
    return first, second


def _text_value(name: str, value: Any, limit: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Unprocessable(f"property '{name}': expected a non-empty string")
    value = value.strip()
    if len(value) > limit:
        raise Unprocessable(f"property '{name}': at most {limit} characters, got {len(value)}")
    if "\x00" in value:
        raise Unprocessable(f"property '{name}': must not contain NUL characters")
    return value


def _property(name: str, value: Any) -> Any:
    """One property's value, checked for its type and bounds (422); sector and plan are
    checked against the database later."""
    if name == "level":
        if not _number(value) or value != int(value) or int(value) not in LEVELS:
            allowed = ", ".join(f"{k} {v}" for k, v in LEVELS.items())
            raise Unprocessable(f"property 'level': must be one of {allowed}; got "
                                f"{json.dumps(value, ensure_ascii=False)[:40]}")
        return int(value)
    if name == "plan_id":
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_BIGINT:
            raise Unprocessable("property 'plan_id': expected the id of an emergency plan "
                                "(a positive integer) or null")
        return value
    if name == "code":
        if value is None:
            return None
        return _text_value(name, value, MAX_CODE)
    if name == "sector_code":
        return _text_value(name, value, 40)
    return _text_value(name, value, MAX_TEXT)


def _properties(raw: Any, *, patch: bool) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise InvalidParameter("properties: expected a JSON object")
    unknown = sorted(set(raw) - set(EDITABLE) - set(READ_ONLY))
    if unknown:
        raise Unprocessable(f"unknown properties {', '.join(unknown)}; a risk point has "
                            f"{', '.join(EDITABLE)} (and the server's "
                            f"{', '.join(READ_ONLY[:3])}, ignored when sent)")
    values: dict[str, Any] = {}
    for name in EDITABLE:
        if name not in raw:
            continue
        if raw[name] is None and name in REQUIRED:
            what = "cannot be removed" if patch else "is required"
            raise Unprocessable(f"property '{name}' {what}")
        values[name] = _property(name, raw[name])
    return values


def parse_feature(body: Any, crs: CrsRef, *, patch: bool = False) -> Draft:
    """A GeoJSON Feature (POST, PUT) or a JSON merge patch of one (PATCH, RFC 7396).

    Structure (not a Feature, no Point, wrong CRS): 400; values a risk point cannot take: 422.
    """
    if not isinstance(body, dict):
        raise InvalidParameter("expected a GeoJSON Feature (a JSON object)")
    if body.get("type") != "Feature" and (not patch or "type" in body):
        raise InvalidParameter(f"expected a GeoJSON Feature (\"type\": \"Feature\"), got type "
                               f"{str(body.get('type'))[:40]!r}")
    if "crs" in body and body["crs"] is not None:
        # The 2008 GeoJSON crs member: only the CRS the request declares (Content-Crs).
        named = body["crs"].get("properties", {}).get("name") if isinstance(
            body["crs"], dict) else None
        try:
            same = isinstance(named, str) and resolve(named, "crs").uri == crs.uri
        except InvalidParameter:
            same = False
        if not same:
            raise InvalidParameter(f"crs: the body's coordinates must be in {crs.uri} (the "
                                   "Content-Crs header; default CRS84, lon/lat)")
    draft = Draft()
    if patch:
        if "geometry" in body:
            if body["geometry"] is None:
                raise Unprocessable("geometry cannot be removed: a risk point is a Point")
            draft.coordinates = parse_geometry(body["geometry"], crs)
        if "properties" in body and body["properties"] is not None:
            draft.properties = _properties(body["properties"], patch=True)
        return draft
    if body.get("geometry") is None:
        raise InvalidParameter("geometry: a risk point needs a GeoJSON Point")
    draft.coordinates = parse_geometry(body["geometry"], crs)
    properties = body.get("properties")
    draft.properties = _properties(properties if properties is not None else {}, patch=False)
    missing = [name for name in REQUIRED if name not in draft.properties]
    if missing:
        raise Unprocessable(f"missing properties {', '.join(missing)}; required: "
                            f"{', '.join(REQUIRED)} (optional: {', '.join(OPTIONAL)})")
    return draft


# --- reading and checking against the database --------------------------------------------

_SNAPSHOT = f"""
    SELECT t.id, t.code, t.grid_code, ST_X(t.geom) AS lon, ST_Y(t.geom) AS lat,
           {_ETAG_SQL} AS etag,
           jsonb_build_object(
               'id', t.id, 'code', t.code, 'name', t.name, 'sector_code', t.sector_code,
               'category', t.category, 'level', t.level, 'address', t.address,
               'grid_code', t.grid_code, 'plan_id', t.plan_id, 'updated_at', t.updated_at,
               'geometry', ST_AsGeoJSON(t.geom, 9, 0)::jsonb) AS snapshot
      FROM risk_points AS t
"""


@dataclass(frozen=True)
class Stored:
    id: int
    code: str
    grid_code: str
    lon: float
    lat: float
    etag: str
    snapshot: dict


async def _stored(conn: AsyncConnection, point_id: int, principal: Principal | None = None,
                  lock: bool = False) -> Stored | None:
    """The point (in the principal's scope, when given), locked for the edit."""
    scope = table_predicate(principal.scope, "risk_points", "t", "edit_scope") \
        if principal is not None else None
    where = scope.and_sql if scope else ""
    row = (await conn.execute(
        text(f"{_SNAPSHOT} WHERE t.id = :id{where}{' FOR UPDATE OF t' if lock else ''}"),
        {"id": point_id} | (scope.params if scope else {}))).first()
    if row is None:
        return None
    return Stored(row.id, row.code, row.grid_code, row.lon, row.lat, _quoted(row.etag),
                  row.snapshot)


async def _check_references(conn: AsyncConnection, properties: dict) -> None:
    sector = properties.get("sector_code")
    if sector is not None:
        known = (await conn.execute(text("SELECT code FROM sectors ORDER BY sort_order, code"))
                 ).scalars().all()
        if sector not in known:
            raise Unprocessable(f"property 'sector_code': unknown sector {sector[:40]!r}; "
                                f"known sectors: {', '.join(known)}")
    plan = properties.get("plan_id")
    if plan is not None:
        found = (await conn.execute(text("SELECT 1 FROM emergency_plans WHERE id = :id"),
                                    {"id": plan})).first()
        if found is None:
            raise Unprocessable(f"property 'plan_id': there is no emergency plan {plan}")


@dataclass(frozen=True)
class Place:
    lon: float
    lat: float
    grid_code: str


async def locate(conn: AsyncConnection, coordinates: tuple[float, float],
                 crs: CrsRef) -> Place:
    """The point in lon/lat and the grid cell that covers it (422 outside every grid)."""
    first, second = coordinates
    if crs.is_storage:
        point, params = "ST_SetSRID(ST_MakePoint(:x, :y), 4326)", {"x": first, "y": second}
    else:
        east, north = (second, first) if crs.north_first else (first, second)
        point = ("ST_Transform(ST_SetSRID(ST_MakePoint(:x, :y), CAST(:srid AS integer)), "
                 "4326)")
        params = {"x": east, "y": north, "srid": crs.srid}
    row = (await conn.execute(text(f"""
        WITH p AS (SELECT {point} AS g)
        SELECT ST_X(p.g) AS lon, ST_Y(p.g) AS lat,
               (SELECT u.code FROM admin_units AS u
                 WHERE u.level = 'grid' AND ST_Covers(u.geom, p.g)
                 ORDER BY u.code LIMIT 1) AS grid_code
          FROM p"""), params)).one()
    lon, lat = float(row.lon), float(row.lat)
    if not (math.isfinite(lon) and math.isfinite(lat)) or row.grid_code is None:
        raise Unprocessable(f"the point ({first}, {second}) in {crs.uri} lies outside the "
                            "municipality: no grid cell covers it")
    return Place(lon, lat, row.grid_code)


def _check_jurisdiction(principal: Principal, place: Place, moving_from: str | None = None
                        ) -> None:
    if code_in_scope(principal.scope, place.grid_code):
        return
    where = f"grid {place.grid_code}"
    if moving_from is not None:
        raise Forbidden(f"the new position lies in {where}, outside your jurisdiction "
                        f"({principal.scope.text}); a risk point cannot be moved out of it")
    raise Forbidden(f"the point lies in {where}, outside your jurisdiction "
                    f"({principal.scope.text})")


def h3_cells(lon: float, lat: float) -> dict[str, int]:
    """The point's H3 cell at every stored resolution, as data_samples/risk.py computes it."""
    return {f"h3_r{res}": h3.latlng_to_cell(lat, lon, res) for res in H3_RESOLUTIONS}


async def _last_edit(conn: AsyncConnection, point_id: int) -> str:
    row = (await conn.execute(text(
        "SELECT principal, action, at FROM risk_point_edits WHERE risk_point_id = :id "
        "ORDER BY at DESC, id DESC LIMIT 1"), {"id": point_id})).first()
    if row is None:
        return ""
    return f" (last {row.action} by {row.principal} at {row.at.isoformat()})"


async def _check_if_match(conn: AsyncConnection, stored: Stored, if_match: str | None) -> None:
    if not if_match_holds(if_match, stored.etag):
        last = await _last_edit(conn, stored.id)
        raise PreconditionFailed(
            f"risk point {stored.id} has changed since you read it{last}: "
            f"If-Match {if_match[:100] if if_match else ''} does not match its ETag "
            f"{stored.etag}; read it again (GET) and reapply your change")


# --- writing -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Written:
    id: int
    etag: str | None
    feature: dict | None


def _feature(snapshot: dict) -> dict:
    properties = {key: value for key, value in snapshot.items() if key not in ("geometry",)}
    properties.pop("id")
    return {"type": "Feature", "id": snapshot["id"], "geometry": snapshot["geometry"],
            "properties": properties}


async def _record(conn: AsyncConnection, principal: Principal, action: str, point_id: int,
                  before: dict | None, after: dict | None, areas: set[str]) -> None:
    """The audit row, then (last before the commit) the outbox message; commits."""
    await conn.execute(text(
        "INSERT INTO risk_point_edits (risk_point_id, principal, action, before, after) "
        "VALUES (:id, :principal, :action, CAST(:before AS jsonb), CAST(:after AS jsonb))"),
        {"id": point_id, "principal": principal.name, "action": action,
         "before": None if before is None else json.dumps(before, ensure_ascii=False),
         "after": None if after is None else json.dumps(after, ensure_ascii=False)})
    await outbox.emit(conn, "feature", {"collection": COLLECTION, "id": point_id,
                                        "action": action}, sorted(areas))
    await conn.commit()


_COLUMNS = ("code", "name", "sector_code", "category", "level", "address", "grid_code",
            "plan_id", *(f"h3_r{res}" for res in H3_RESOLUTIONS))


def _row_values(properties: dict, place: Place) -> dict:
    values = {name: properties.get(name) for name in EDITABLE}
    return values | {"grid_code": place.grid_code, "lon": place.lon, "lat": place.lat} \
        | h3_cells(place.lon, place.lat)


async def _code_free(conn: AsyncConnection, code: str, point_id: int | None = None) -> None:
    row = (await conn.execute(text("SELECT id FROM risk_points WHERE code = :code"),
                              {"code": code})).first()
    if row is not None and row.id != point_id:
        raise Conflict(f"code {code!r} is risk point {row.id}'s; codes are unique (leave "
                       "code out to have one generated)")


async def create(conn: AsyncConnection, principal: Principal, body: Any,
                 crs: CrsRef) -> Written:
    """POST: a new point from a Feature; commits. 400/403/409/422 as the module says."""
    draft = parse_feature(body, crs)
    await _check_references(conn, draft.properties)
    assert draft.coordinates is not None
    place = await locate(conn, draft.coordinates, crs)
    _check_jurisdiction(principal, place)
    values = _row_values(draft.properties, place)
    point_id = (await conn.execute(text(
        "SELECT nextval(pg_get_serial_sequence('risk_points', 'id'))"))).scalar_one()
    if values["code"] is not None:
        await _code_free(conn, values["code"])
        candidates = [values["code"]]
    else:
        base = f"RP{point_id:08d}"
        candidates = [base] + [f"{base}-{n}" for n in range(1, 10)]
    columns = ", ".join(_COLUMNS)
    placeholders = ", ".join(f":{name}" for name in _COLUMNS)
    for code in candidates:
        inserted = (await conn.execute(text(
            f"INSERT INTO risk_points (id, {columns}, updated_at, geom) "
            f"VALUES (:id, {placeholders}, now(), ST_SetSRID(ST_MakePoint(:lon, :lat), 4326)) "
            "ON CONFLICT (code) DO NOTHING RETURNING id"),
            values | {"id": point_id, "code": code})).first()
        if inserted is not None:
            break
    else:
        raise Conflict(f"code {candidates[0]!r} is another risk point's; codes are unique")
    after = await _stored(conn, point_id)
    assert after is not None
    await _record(conn, principal, "create", point_id, None, after.snapshot, {place.grid_code})
    return Written(point_id, after.etag, _feature(after.snapshot))


async def _existing(conn: AsyncConnection, principal: Principal, feature_id: str,
                    if_match: str | None) -> Stored:
    point_id = _point_id(feature_id)
    stored = None if point_id is None else await _stored(conn, point_id, principal, lock=True)
    if stored is None:
        raise NotFound(f"layer '{COLLECTION}' has no feature '{feature_id[:40]}'")
    await _check_if_match(conn, stored, if_match)
    return stored


async def _rewrite(conn: AsyncConnection, principal: Principal, stored: Stored, draft: Draft,
                   crs: CrsRef, action: str) -> Written:
    """PUT and PATCH once the draft holds every property."""
    await _check_references(conn, draft.properties)
    if draft.coordinates is None:
        place = Place(stored.lon, stored.lat, stored.grid_code)
    else:
        place = await locate(conn, draft.coordinates, crs)
        _check_jurisdiction(principal, place, moving_from=stored.grid_code)
    properties = dict(draft.properties)
    if properties.get("code") is None:
        properties["code"] = stored.code
    elif properties["code"] != stored.code:
        await _code_free(conn, properties["code"], stored.id)
    values = _row_values(properties, place)
    assignments = ", ".join(f"{name} = :{name}" for name in _COLUMNS)
    try:
        async with conn.begin_nested():
            await conn.execute(text(
                f"UPDATE risk_points SET {assignments}, updated_at = now(), "
                "geom = ST_SetSRID(ST_MakePoint(:lon, :lat), 4326) WHERE id = :id"),
                values | {"id": stored.id})
    except IntegrityError as error:  # a concurrent writer took the code meanwhile
        raise Conflict(f"code {properties['code']!r} is another risk point's; codes are "
                       "unique") from error
    after = await _stored(conn, stored.id)
    assert after is not None
    await _record(conn, principal, action, stored.id, stored.snapshot, after.snapshot,
                  {stored.grid_code, place.grid_code})
    return Written(stored.id, after.etag, _feature(after.snapshot))


async def replace(conn: AsyncConnection, principal: Principal, feature_id: str, body: Any,
                  crs: CrsRef, if_match: str | None = None) -> Written:
    """PUT: every property and the geometry anew (``code`` kept when left out); commits."""
    stored = await _existing(conn, principal, feature_id, if_match)
    draft = parse_feature(body, crs)
    _check_body_id(body, stored.id)
    return await _rewrite(conn, principal, stored, draft, crs, "replace")


async def update(conn: AsyncConnection, principal: Principal, feature_id: str, patch: Any,
                 crs: CrsRef, if_match: str | None = None) -> Written:
    """PATCH: a JSON merge patch (RFC 7396) of the Feature: the properties it names (null
    removes ``plan_id``; a required one cannot be removed) and/or the geometry; commits."""
    stored = await _existing(conn, principal, feature_id, if_match)
    changes = parse_feature(patch, crs, patch=True)
    _check_body_id(patch, stored.id)
    current = {name: stored.snapshot[name] for name in EDITABLE}
    draft = Draft({**current, **changes.properties}, changes.coordinates)
    return await _rewrite(conn, principal, stored, draft, crs, "update")


async def delete(conn: AsyncConnection, principal: Principal, feature_id: str,
                 if_match: str | None = None) -> Written:
    """DELETE; commits."""
    stored = await _existing(conn, principal, feature_id, if_match)
    await conn.execute(text("DELETE FROM risk_points WHERE id = :id"), {"id": stored.id})
    await _record(conn, principal, "delete", stored.id, stored.snapshot, None,
                  {stored.grid_code})
    return Written(stored.id, None, None)


def _check_body_id(body: Any, point_id: int) -> None:
    if isinstance(body, dict) and body.get("id") is not None and str(body["id"]) != str(point_id):
        raise InvalidParameter(f"id: the body names feature {str(body['id'])[:40]!r}, the path "
                               f"{point_id}")


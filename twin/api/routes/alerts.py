"""Alert rules, the alerts they opened and the live anomaly zones (owner: rules).

* ``GET /alerts``: sensor alerts whose sensor lies in the caller's jurisdiction (by place),
  open ones by default, as GeoJSON points at the sensors.
* ``GET /alerts/rules``: every rule. ``PUT /alerts/rules/{code}`` (admin, twin/api/access.py):
  replace or create a rule; inconsistent bounds are refused with 422 naming the bound.
  Disabling a rule closes its open alerts (pushed as ``alert`` messages).
* ``GET /alerts/anomaly-zones``: the incremental detector's zones (live by default) that
  meet the caller's jurisdiction, as GeoJSON.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Literal

from fastapi import APIRouter, Path, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import text

from twin.api.deps import ConnDep, ScopeDep
from twin.api.fields import Text
from twin.core.errors import InvalidParameter, NotFound
from twin.core.models import NETWORKS, SENSOR_KINDS
from twin.core.scope import spatial_predicate, table_predicate
from twin.live.rules import close_alerts, emit_changes

router = APIRouter(tags=["alerts"])

MAX_LIMIT = 10_000

SensorKind = Literal[SENSOR_KINDS]  # type: ignore[valid-type]
Network = Literal[NETWORKS]  # type: ignore[valid-type]


class InvalidRule(InvalidParameter):
    """A rule whose bounds contradict each other."""

    status_code = 422


def _jsonable(value):
    return value.isoformat() if isinstance(value, datetime) else value


# ------------------------------------------------------------------ alerts

_ALERTS = """
    SELECT a.id, a.sensor_id, s.code AS sensor_code, s.kind AS sensor_kind, s.network, s.unit,
           a.rule_code, r.name_zh AS rule_name_zh, r.name_en AS rule_name_en, a.opened_at,
           a.opened_value, a.closed_at, a.closed_value, a.event_id,
           ST_AsGeoJSON(s.geom, 7) AS geometry
      FROM sensor_alerts AS a
      JOIN sensors AS s ON s.id = a.sensor_id
      JOIN alert_rules AS r ON r.code = a.rule_code
     WHERE {state}{scope}
     ORDER BY a.opened_at DESC, a.id DESC
     LIMIT :limit
"""
_STATES = {"open": "a.closed_at IS NULL", "closed": "a.closed_at IS NOT NULL", "all": "TRUE"}


@router.get("/alerts", summary="Sensor alerts in your jurisdiction (open ones by default), "
            "as GeoJSON points at their sensors")
async def list_alerts(
    conn: ConnDep, scope: ScopeDep,
    state: Literal["open", "closed", "all"] = Query("open", description="open, closed or all"),
    limit: int = Query(1000, ge=1, le=MAX_LIMIT, description="newest first, at most this many"),
) -> JSONResponse:
    where = table_predicate(scope, "sensors", "s")
    rows = (await conn.execute(text(_ALERTS.format(state=_STATES[state], scope=where.and_sql)),
                               {"limit": limit, **where.params})).mappings().all()
    features = [{"type": "Feature", "id": row["id"], "geometry": json.loads(row["geometry"]),
                 "properties": {k: _jsonable(v) for k, v in row.items() if k != "geometry"}
                 | {"state": "open" if row["closed_at"] is None else "closed"}}
                for row in rows]
    return JSONResponse({"type": "FeatureCollection", "features": features,
                         "numberReturned": len(features)})


# ------------------------------------------------------------------ rules

_RULE_COLUMNS = ("code, sensor_kind, network, name_zh, name_en, open_above, open_below, "
                 "close_above, close_below, silent_minutes, event_kind, enabled, updated_at")


def _rule(row) -> dict:
    return {k: _jsonable(v) for k, v in row.items()}


@router.get("/alerts/rules", summary="Every alert rule: thresholds with hysteresis, or "
            "silence")
async def list_rules(conn: ConnDep) -> dict:
    rows = (await conn.execute(text(f"SELECT {_RULE_COLUMNS} FROM alert_rules ORDER BY code"))
            ).mappings().all()
    return {"rules": [_rule(row) for row in rows]}


Bound = Field(None, allow_inf_nan=False)


class RuleBody(BaseModel):
    """A rule as a whole (PUT replaces it). Threshold: open when a reading is above
    ``open_above`` or below ``open_below``; close when below ``close_below`` and above
    ``close_above``. Silence: open after ``silent_minutes`` without a reading."""

    sensor_kind: SensorKind
    network: Network | None = None
    name_zh: Text | None = Field(None, min_length=1, max_length=200)
    name_en: Text | None = Field(None, min_length=1, max_length=200)
    open_above: float | None = Bound
    open_below: float | None = Bound
    close_above: float | None = Bound
    close_below: float | None = Bound
    silent_minutes: int | None = Field(None, ge=1, le=7 * 24 * 60)
    event_kind: Text | None = Field(None, max_length=40,
                                   description="the kind of event an opened alert raises "
                                   "(GET /event-kinds); none: the alert raises no event")
    enabled: bool = True


def check_rule(rule: RuleBody) -> None:
    """The bounds must make a hysteresis: InvalidRule (422) naming what is wrong."""
    thresholds = rule.open_above is not None or rule.open_below is not None
    if rule.silent_minutes is not None and (
            thresholds or rule.close_above is not None or rule.close_below is not None):
        raise InvalidRule("a rule tests either thresholds (open_above/open_below with "
                          "close_below/close_above) or silence (silent_minutes), not both")
    if rule.silent_minutes is None and not thresholds:
        raise InvalidRule("a rule needs open_above or open_below (a threshold rule) or "
                          "silent_minutes (a silence rule)")
    pairs = (("open_above", rule.open_above, "close_below", rule.close_below),
             ("open_below", rule.open_below, "close_above", rule.close_above))
    for open_name, open_value, close_name, close_value in pairs:
        if (open_value is None) != (close_value is None):
            missing = close_name if close_value is None else open_name
            given = open_name if close_value is None else close_name
            raise InvalidRule(f"{given} needs {missing}: each open bound comes with the bound "
                              f"its alert closes at")
    if rule.open_above is not None and rule.close_below is not None \
            and rule.close_below > rule.open_above:
        raise InvalidRule(f"close_below ({rule.close_below:g}) must not be above open_above "
                          f"({rule.open_above:g}): an alert opened above {rule.open_above:g} "
                          f"closes once readings fall below close_below")
    if rule.open_below is not None and rule.close_above is not None \
            and rule.close_above < rule.open_below:
        raise InvalidRule(f"close_above ({rule.close_above:g}) must not be below open_below "
                          f"({rule.open_below:g}): an alert opened below {rule.open_below:g} "
                          f"closes once readings rise above close_above")
    if rule.close_above is not None and rule.close_below is not None \
            and not rule.close_above < rule.close_below:
        raise InvalidRule(f"close_above ({rule.close_above:g}) must be below close_below "
                          f"({rule.close_below:g}): an alert closes between the two")
    for name in ("open_above", "open_below", "close_above", "close_below"):
        value = getattr(rule, name)
        if value is not None and not math.isfinite(value):
            raise InvalidRule(f"{name}: must be a finite number")


_UPSERT = text(f"""
    INSERT INTO alert_rules (code, sensor_kind, network, name_zh, name_en, open_above,
                             open_below, close_above, close_below, silent_minutes, event_kind,
                             enabled, updated_at)
    VALUES (:code, :sensor_kind, :network, :name_zh, :name_en, :open_above, :open_below,
            :close_above, :close_below, :silent_minutes, :event_kind, :enabled, now())
    ON CONFLICT (code) DO UPDATE SET
        sensor_kind = EXCLUDED.sensor_kind, network = EXCLUDED.network,
        name_zh = EXCLUDED.name_zh, name_en = EXCLUDED.name_en,
        open_above = EXCLUDED.open_above, open_below = EXCLUDED.open_below,
        close_above = EXCLUDED.close_above, close_below = EXCLUDED.close_below,
        silent_minutes = EXCLUDED.silent_minutes, event_kind = EXCLUDED.event_kind,
        enabled = EXCLUDED.enabled, updated_at = now()
    RETURNING {_RULE_COLUMNS}, (xmax = 0) AS created
""")

# A rule's open alerts, closed by hand (disabled, or now about another kind of sensor).
_OPEN_OF_RULE = text("""
    SELECT a.id FROM sensor_alerts AS a
      JOIN sensors AS s ON s.id = a.sensor_id
      JOIN alert_rules AS r ON r.code = a.rule_code
     WHERE a.rule_code = :code AND a.closed_at IS NULL
       AND (NOT r.enabled OR s.kind <> r.sensor_kind
            OR (r.network IS NOT NULL AND s.network <> r.network)
            OR (r.silent_minutes IS NULL) <> :was_threshold)
""")


@router.put("/alerts/rules/{code}", summary="Replace or create an alert rule (admin); "
            "disabling a rule closes its open alerts",
            responses={201: {"description": "the rule was created"},
                       422: {"description": "the bounds do not make a hysteresis, or the "
                             "event kind is unknown"}})
async def put_rule(
    body: RuleBody, conn: ConnDep,
    code: str = Path(pattern=r"^[a-z][a-z0-9_]{0,39}$",
                     description="lower-case letters, digits and _ (at most 40)"),
) -> JSONResponse:
    check_rule(body)
    if body.event_kind is not None:
        kinds = (await conn.execute(text("SELECT code FROM event_kinds ORDER BY code"))
                 ).scalars().all()
        if body.event_kind not in kinds:
            raise InvalidRule(f"event_kind: unknown kind {body.event_kind!r}; known: "
                              f"{', '.join(kinds)}")
    before = (await conn.execute(text(
        "SELECT name_zh, name_en, silent_minutes IS NULL AS threshold FROM alert_rules "
        "WHERE code = :code FOR UPDATE"), {"code": code})).first()
    values = body.model_dump() | {"code": code}
    values["name_zh"] = body.name_zh or (before.name_zh if before else code)
    values["name_en"] = body.name_en or (before.name_en if before else code)
    row = (await conn.execute(_UPSERT, values)).mappings().one()
    was_threshold = before.threshold if before else body.silent_minutes is None
    stale = (await conn.execute(_OPEN_OF_RULE, {"code": code, "was_threshold": was_threshold})
             ).scalars().all()
    now = datetime.now(UTC)
    closed = await close_alerts(conn, [(alert_id, now, None) for alert_id in stale])
    await emit_changes(conn, [], closed)
    await conn.commit()
    rule = _rule({k: v for k, v in row.items() if k != "created"})
    return JSONResponse(rule | {"closed_alerts": len(closed)},
                        status_code=201 if row["created"] else 200)


@router.get("/alerts/rules/{code}", summary="One alert rule")
async def get_rule(conn: ConnDep, code: str = Path(max_length=40)) -> dict:
    row = (await conn.execute(text(f"SELECT {_RULE_COLUMNS} FROM alert_rules WHERE code = :c"),
                              {"c": code})).mappings().first()
    if row is None:
        raise NotFound(f"alert rule {code!r} not found (GET /alerts/rules lists them)")
    return _rule(row)


# ------------------------------------------------------------------ anomaly zones

_ZONES = """
    SELECT z.id, z.network, z.severity, z.details, z.sensors, z.segments, z.source_segment_id,
           z.started_at, z.last_seen_at, z.opened_at, z.updated_at, z.closed_at, z.event_id,
           ST_AsGeoJSON(z.geom, 7) AS geometry
      FROM anomaly_zones AS z
     WHERE {state}{network}{scope}
     ORDER BY z.opened_at DESC, z.id DESC
     LIMIT :limit
"""
NetworkQuery = Query(None, description="one pipe network; all when absent")
_ZONE_STATES = {"live": "z.closed_at IS NULL", "closed": "z.closed_at IS NOT NULL",
                "all": "TRUE"}


@router.get("/alerts/anomaly-zones", summary="Pipe-anomaly zones of the live detector that "
            "meet your jurisdiction (live ones by default), as GeoJSON")
async def list_anomaly_zones(
    conn: ConnDep, scope: ScopeDep,
    state: Literal["live", "closed", "all"] = Query("live", description="live, closed or all"),
    network: Network | None = NetworkQuery,
    limit: int = Query(1000, ge=1, le=MAX_LIMIT, description="newest first, at most this many"),
) -> JSONResponse:
    where = spatial_predicate(scope, "z.geom")
    params: dict = {"limit": limit, **where.params}
    network_sql = ""
    if network is not None:
        network_sql, params["network"] = " AND z.network = :network", network
    rows = (await conn.execute(text(_ZONES.format(state=_ZONE_STATES[state], network=network_sql,
                                                  scope=where.and_sql)), params)).mappings().all()
    features = []
    for row in rows:
        props = {k: _jsonable(v) for k, v in row.items() if k not in ("geometry", "details",
                                                                        "sensors", "segments")}
        props |= row["details"] | {"sensor_ids": list(row["sensors"]),
                                   "affected_segment_ids": list(row["segments"]),
                                   "severity": round(row["severity"], 1),
                                   "state": "live" if row["closed_at"] is None else "closed"}
        features.append({"type": "Feature", "id": row["id"],
                         "geometry": json.loads(row["geometry"]), "properties": props})
    return JSONResponse({"type": "FeatureCollection", "features": features,
                         "numberReturned": len(features)})

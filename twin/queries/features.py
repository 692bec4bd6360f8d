"""OGC API – Features over the registry's vector layers: pages of GeoJSON features.

Identifiers in the SQL come only from the registry (table, fields, the trusted
``source_filter``) and are quoted; everything a client sends is a bound parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from twin.core.cql2 import GEOMETRY_PROPERTIES, compile_filter, quote_identifier, value_kind
from twin.core.errors import InvalidParameter, NotFound
from twin.core.layer import Layer
from twin.core.principal import CITY, Scope
from twin.core.scope import table_predicate

MAX_LIMIT = 10_000
_INTEGER_TYPES = {"smallint", "integer", "bigint"}


@dataclass(frozen=True)
class ItemsQuery:
    bbox: tuple[float, float, float, float] | None = None
    limit: int = 10
    offset: int = 0
    # None publishes every field; an empty tuple publishes none.
    properties: tuple[str, ...] | None = None
    # (field, descending) pairs; the id column always breaks ties so pages are stable.
    sortby: tuple[tuple[str, bool], ...] = ()
    filter: str | None = None


@dataclass(frozen=True)
class FeaturePage:
    features: list[dict]
    number_matched: int


def vector_layer(layer: Layer) -> Layer:
    if layer.kind != "vector":
        raise NotFound(f"layer '{layer.id}' is a {layer.kind} layer and has no features")
    return layer


def field_types(layer: Layer) -> dict[str, str]:
    return {f["name"]: f["type"] for f in layer.fields}


def id_column(layer: Layer) -> str:
    """``id`` where the table has one; admin units are identified by their ``code``."""
    names = [f["name"] for f in layer.fields]
    return "id" if "id" in names else names[0]


# --- parameter parsing (pure, so it is tested without a database) --------------------------

def parse_bbox(raw: str) -> tuple[float, float, float, float]:
    parts = raw.split(",")
    try:
        values = [float(part) for part in parts]
    except ValueError:
        values = []
    if len(values) not in (4, 6) or not all(math.isfinite(v) for v in values):
        raise InvalidParameter(f"bbox: expected 4 (or 6) comma-separated numbers "
                               f"west,south,east,north in CRS84, got {raw!r}")
    # A 6-number bbox carries heights, which 2D layers ignore.
    west, south, east, north = values if len(values) == 4 else values[:2] + values[3:5]
    if not (-180 <= west <= 180 and -180 <= east <= 180):
        raise InvalidParameter(f"bbox: longitudes must lie in [-180, 180], got {raw!r}")
    if not (-90 <= south <= north <= 90):
        raise InvalidParameter(f"bbox: latitudes must lie in [-90, 90] with south <= north, "
                               f"got {raw!r}")
    return west, south, east, north


def parse_properties(raw: str, layer: Layer) -> tuple[str, ...]:
    names = tuple(name.strip() for name in raw.split(",") if name.strip())
    known = field_types(layer)
    for name in names:
        if name not in known:
            raise InvalidParameter(f"properties: unknown property '{name}'; "
                                   f"available: {', '.join(known)}")
    return names


def parse_sortby(raw: str, layer: Layer) -> tuple[tuple[str, bool], ...]:
    keys, known = [], field_types(layer)
    for item in (part.strip() for part in raw.split(",")):
        name = item.lstrip("+-").strip()
        if name not in known:
            raise InvalidParameter(f"sortby: unknown property '{name}'; sortable properties "
                                   f"are: {', '.join(known)} (prefix '-' for descending)")
        keys.append((name, item.startswith("-")))
    return tuple(keys)


def check_paging(limit: int, offset: int) -> None:
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidParameter(f"limit: must be between 1 and {MAX_LIMIT}, got {limit}")
    if offset < 0:
        raise InvalidParameter(f"offset: must be 0 or more, got {offset}")


# --- SQL ---------------------------------------------------------------------------------

def _where(layer: Layer, query: ItemsQuery, scope: Scope = CITY) -> tuple[str, dict]:
    # source_filter is the registry's trusted predicate that selects the layer's rows.
    in_scope = table_predicate(scope, layer.source_table, "t")
    clauses, params = [f"({layer.where})", in_scope.sql], dict(in_scope.params)
    if query.bbox is not None:
        west, south, east, north = query.bbox
        # A west edge east of the east edge crosses the antimeridian: two boxes.
        boxes = [(west, east)] if west <= east else [(west, 180.0), (-180.0, east)]
        parts = []
        for i, (w, e) in enumerate(boxes):
            parts.append(f"ST_Intersects(t.geom, ST_MakeEnvelope(:w{i}, :s, :e{i}, :n, 4326))")
            params |= {f"w{i}": w, f"e{i}": e}
        params |= {"s": south, "n": north}
        clauses.append("(" + " OR ".join(parts) + ")")
    if query.filter:
        sql, filter_params = compile_filter(query.filter, field_types(layer))
        clauses.append(sql)
        params |= filter_params
    return " AND ".join(clauses), params


def _order_by(layer: Layer, query: ItemsQuery) -> str:
    keys = [f"t.{quote_identifier(name)} {'DESC' if desc else 'ASC'}"
            for name, desc in query.sortby]
    keys.append(f"t.{quote_identifier(id_column(layer))}")
    return ", ".join(keys)


def _feature_select(layer: Layer, properties: tuple[str, ...] | None) -> str:
    names = [f["name"] for f in layer.fields] if properties is None else list(properties)
    columns = ", ".join(f"t.{quote_identifier(name)}" for name in names)
    # to_json of a one-row subselect names the properties after the columns and lets
    # PostgreSQL render numerics and timestamps as JSON.
    props = f"(SELECT to_json(p) FROM (SELECT {columns}) AS p)" if names else "'{}'::json"
    return (f"SELECT t.{quote_identifier(id_column(layer))} AS feature_id, "
            f"ST_AsGeoJSON(t.geom)::json AS geometry, {props} AS properties "
            f"FROM {quote_identifier(layer.source_table)} AS t")


def _feature(row) -> dict:
    return {"type": "Feature", "id": row.feature_id, "geometry": row.geometry,
            "properties": row.properties}


async def feature_page(conn: AsyncConnection, layer: Layer, query: ItemsQuery,
                       scope: Scope = CITY) -> FeaturePage:
    """One page of the layer's features in the caller's scope and how many match in all."""
    check_paging(query.limit, query.offset)
    where, params = _where(layer, query, scope)
    table = quote_identifier(layer.source_table)
    matched = (await conn.execute(
        text(f"SELECT count(*) FROM {table} AS t WHERE {where}"), params)).scalar_one()
    rows = await conn.execute(text(
        f"{_feature_select(layer, query.properties)} WHERE {where} "
        f"ORDER BY {_order_by(layer, query)} LIMIT :limit OFFSET :offset"
    ), params | {"limit": query.limit, "offset": query.offset})
    return FeaturePage([_feature(row) for row in rows], matched)


async def feature_by_id(conn: AsyncConnection, layer: Layer, feature_id: str,
                        scope: Scope = CITY) -> dict:
    """One feature; outside the caller's scope it does not exist for them (NotFound)."""
    key = id_column(layer)
    in_scope = table_predicate(scope, layer.source_table, "t")
    value: int | str = feature_id
    if field_types(layer)[key] in _INTEGER_TYPES:
        try:
            value = int(feature_id)
        except ValueError:
            value = None
    row = None if value is None else (await conn.execute(text(
        f"{_feature_select(layer, None)} WHERE ({layer.where}) "
        f"AND t.{quote_identifier(key)} = :feature_id{in_scope.and_sql}"
    ), {"feature_id": value} | in_scope.params)).first()
    if row is None:
        raise NotFound(f"layer '{layer.id}' has no feature '{feature_id}'")
    return _feature(row)


_JSON_TYPES = {"number": "number", "string": "string", "boolean": "boolean",
               "date": "string", "timestamp": "string"}


def queryables(layer: Layer) -> dict:
    """The layer's queryable properties as a JSON Schema (OGC API – Features Part 3)."""
    properties = {}
    for name, sql_type in field_types(layer).items():
        kind = value_kind(sql_type)
        schema = {"title": name, "type": _JSON_TYPES[kind]}
        if sql_type in _INTEGER_TYPES:
            schema["type"] = "integer"
        if kind in ("date", "timestamp"):
            schema["format"] = "date" if kind == "date" else "date-time"
        if name == id_column(layer):
            schema["x-ogc-role"] = "id"
        properties[name] = schema
    geometry_type = (layer.geometry_type or "Geometry")
    properties[GEOMETRY_PROPERTIES[0]] = {
        "title": "geometry", "format": f"geometry-{geometry_type.lower()}",
        "$ref": f"https://geojson.org/schema/{geometry_type}.json",
        "x-ogc-role": "primary-geometry",
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "title": layer.title_en,
        "properties": properties,
        "additionalProperties": False,
    }

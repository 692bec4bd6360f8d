"""OGC API – Features over the registry's vector layers: pages of GeoJSON features.

Identifiers in the SQL come only from the registry (table, fields, the trusted
``source_filter``) and are quoted; everything a client sends is a bound parameter.
Features are stored in CRS84 and served in any CRS of ``twin.core.crs_ref`` (Part 2): PostGIS
transforms them (``ST_Transform``) and flips the axes where the CRS puts north first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from twin.core.cql2 import GEOMETRY_PROPERTIES, compile_filter, quote_identifier, value_kind
from twin.core.crs_ref import CRS84, CrsRef, lonlat_bounds, served
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
    # The CRS of the bbox (None: CRS84); the bbox itself is kept east/north (lon/lat).
    bbox_crs: CrsRef | None = None
    # The CRS the features are served in (None: CRS84, the storage CRS).
    crs: CrsRef | None = None


@dataclass(frozen=True)
class FeaturePage:
    features: list[dict]
    number_matched: int


def vector_layer(layer: Layer, base: str = "") -> Layer:
    """The layer if it has features; for a raster or 3D layer, NotFound saying where its data
    is instead (``base``: the API's root URL)."""
    if layer.kind == "raster":
        tiles = f"{base}/tiles/{layer.id}"
        raise NotFound(f"collection '{layer.id}' is a raster collection (a coverage, not "
                       f"features) and has no items; its tiles are {tiles}/{{z}}/{{x}}/{{y}}.png "
                       f"(or .webp), described by the TileJSON {tiles}/raster-tilejson.json")
    if layer.kind != "vector":
        raise NotFound(f"collection '{layer.id}' is a {layer.kind} layer and has no items; "
                       f"its model is {base}/layers/{layer.id}/model")
    return layer


def _table(layer: Layer) -> str:
    """The layer's table, quoted for SQL."""
    # Only vector layers get here (vector_layer turns the others away), and each has a table.
    assert layer.source_table is not None, f"vector layer '{layer.id}' has no table"
    return quote_identifier(layer.source_table)


def field_types(layer: Layer) -> dict[str, str]:
    return {f["name"]: f["type"] for f in layer.fields}


def id_column(layer: Layer) -> str:
    """``id`` where the table has one; admin units are identified by their ``code``."""
    names = [f["name"] for f in layer.fields]
    return "id" if "id" in names else names[0]


# --- parameter parsing (pure, so it is tested without a database) --------------------------

def parse_bbox(raw: str, crs: CrsRef | None = None) -> tuple[float, float, float, float]:
    """The bbox as (west, south, east, north) in ``crs`` (None: CRS84), given in that CRS's
    axis order: latitude first for EPSG:4326 and EPSG:4490, northing first for the
    Gauss-Krüger zones."""
    crs = crs or served()[CRS84]
    parts = raw.split(",")
    try:
        values = [float(part) for part in parts]
    except ValueError:
        values = []
    order = crs.axis_names()
    low, high = order.split(",")
    if len(values) not in (4, 6) or not all(math.isfinite(v) for v in values):
        raise InvalidParameter(f"bbox: expected 4 (or 6) comma-separated numbers "
                               f"min {low}, min {high}, max {low}, max {high} in {crs.uri}, "
                               f"got {raw!r}")
    # A 6-number bbox carries heights, which 2D layers ignore.
    first_min, second_min, first_max, second_max = (
        values if len(values) == 4 else values[:2] + values[3:5])
    if crs.north_first:
        west, south, east, north = second_min, first_min, second_max, first_max
    else:
        west, south, east, north = first_min, second_min, first_max, second_max
    if not crs.geographic:
        if not (west <= east and south <= north):
            raise InvalidParameter(f"bbox: in {crs.uri} ({order}) each minimum must not exceed "
                                   f"its maximum, got {raw!r}")
        return west, south, east, north
    if not (-180 <= west <= 180 and -180 <= east <= 180):
        raise InvalidParameter(f"bbox: longitudes must lie in [-180, 180] ({crs.uri}, "
                               f"{order}), got {raw!r}")
    if not (-90 <= south <= north <= 90):
        raise InvalidParameter(f"bbox: latitudes must lie in [-90, 90] with south <= north "
                               f"({crs.uri}, {order}), got {raw!r}")
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
        sql, bbox_params = _bbox_clause(query.bbox, query.bbox_crs or served()[CRS84])
        clauses.append(sql)
        params |= bbox_params
    if query.filter:
        sql, filter_params = compile_filter(query.filter, field_types(layer))
        clauses.append(sql)
        params |= filter_params
    return " AND ".join(clauses), params


def _bbox_clause(bbox: tuple[float, float, float, float], crs: CrsRef) -> tuple[str, dict]:
    west, south, east, north = bbox
    params: dict = {"s": south, "n": north, "bbox_srid": crs.srid}
    if crs.geographic:
        # A west edge east of the east edge crosses the antimeridian: two boxes. A box in
        # another datum (CGCS2000) is moved into storage's by ST_Transform.
        boxes = [(west, east)] if west <= east else [(west, 180.0), (-180.0, east)]
        parts = []
        for i, (w, e) in enumerate(boxes):
            parts.append(f"ST_Intersects(t.geom, ST_Transform(ST_MakeEnvelope("
                         f":w{i}, :s, :e{i}, :n, CAST(:bbox_srid AS integer)), 4326))")
            params |= {f"w{i}": w, f"e{i}": e}
        return "(" + " OR ".join(parts) + ")", params
    # A projected box is a rectangle in its CRS, not in lon/lat: a feature matches when its
    # geometry in that CRS meets the rectangle, i.e. what the client sees served in it. The
    # lon/lat box around the rectangle lets the spatial index pick the candidates.
    lon_min, lat_min, lon_max, lat_max = lonlat_bounds(crs, bbox)
    params |= {"w0": west, "e0": east, "lon_min": lon_min, "lat_min": lat_min,
               "lon_max": lon_max, "lat_max": lat_max}
    return ("(t.geom && ST_MakeEnvelope(:lon_min, :lat_min, :lon_max, :lat_max, 4326) "
            "AND ST_Intersects(ST_Transform(t.geom, CAST(:bbox_srid AS integer)), "
            "ST_MakeEnvelope(:w0, :s, :e0, :n, CAST(:bbox_srid AS integer))))"), params


def _order_by(layer: Layer, query: ItemsQuery) -> str:
    keys = [f"t.{quote_identifier(name)} {'DESC' if desc else 'ASC'}"
            for name, desc in query.sortby]
    keys.append(f"t.{quote_identifier(id_column(layer))}")
    return ", ".join(keys)


def _geometry_sql(crs: CrsRef | None) -> str:
    """GeoJSON of ``t.geom`` in ``crs``, in the CRS's axis order."""
    geometry = "t.geom"
    if crs is not None and not crs.is_storage:
        geometry = f"ST_Transform({geometry}, CAST(:out_srid AS integer))"
        if crs.north_first:
            geometry = f"ST_FlipCoordinates({geometry})"
    # Options 0: no "crs" member (PostGIS adds one for SRIDs other than 4326); the CRS is
    # said once, by the Content-Crs header.
    return f"ST_AsGeoJSON({geometry}, 9, 0)::json"


def _crs_params(crs: CrsRef | None) -> dict:
    return {} if crs is None or crs.is_storage else {"out_srid": crs.srid}


def _feature_select(layer: Layer, properties: tuple[str, ...] | None,
                    crs: CrsRef | None = None) -> str:
    names = [f["name"] for f in layer.fields] if properties is None else list(properties)
    columns = ", ".join(f"t.{quote_identifier(name)}" for name in names)
    # to_json of a one-row subselect names the properties after the columns and lets
    # PostgreSQL render numerics and timestamps as JSON.
    props = f"(SELECT to_json(p) FROM (SELECT {columns}) AS p)" if names else "'{}'::json"
    return (f"SELECT t.{quote_identifier(id_column(layer))} AS feature_id, "
            f"{_geometry_sql(crs)} AS geometry, {props} AS properties "
            f"FROM {_table(layer)} AS t")


def _feature(row) -> dict:
    return {"type": "Feature", "id": row.feature_id, "geometry": row.geometry,
            "properties": row.properties}


async def feature_page(conn: AsyncConnection, layer: Layer, query: ItemsQuery,
                       scope: Scope = CITY) -> FeaturePage:
    """One page of the layer's features in the caller's scope and how many match in all."""
    check_paging(query.limit, query.offset)
    where, params = _where(layer, query, scope)
    table = _table(layer)
    matched = (await conn.execute(
        text(f"SELECT count(*) FROM {table} AS t WHERE {where}"), params)).scalar_one()
    rows = await conn.execute(text(
        f"{_feature_select(layer, query.properties, query.crs)} WHERE {where} "
        f"ORDER BY {_order_by(layer, query)} LIMIT :limit OFFSET :offset"
    ), params | _crs_params(query.crs) | {"limit": query.limit, "offset": query.offset})
    return FeaturePage([_feature(row) for row in rows], matched)


async def feature_by_id(conn: AsyncConnection, layer: Layer, feature_id: str,
                        scope: Scope = CITY, crs: CrsRef | None = None) -> dict:
    """One feature (in ``crs``; None: CRS84); outside the caller's scope it does not exist
    for them (NotFound)."""
    key = id_column(layer)
    in_scope = table_predicate(scope, layer.source_table, "t")
    value: int | str | None = feature_id
    if field_types(layer)[key] in _INTEGER_TYPES:
        try:
            value = int(feature_id)
        except ValueError:
            value = None
    row = None if value is None else (await conn.execute(text(
        f"{_feature_select(layer, None, crs)} WHERE ({layer.where}) "
        f"AND t.{quote_identifier(key)} = :feature_id{in_scope.and_sql}"
    ), {"feature_id": value} | in_scope.params | _crs_params(crs))).first()
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

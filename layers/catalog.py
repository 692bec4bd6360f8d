"""GET /layers and /layers/{id}: every layer with what GIS staff ask about it.

Built-in layers are listed too (origin 'builtin', no versions); uploaded layers add their
versions (those not dropped yet: layers/blobs.py), uploader and the published version's
report. A caller sees the layers their jurisdiction may see (twin/core/scope.py), built-in
feature counts within it.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from twin.core.errors import NotFound
from twin.core.layer import LayerRegistry
from twin.core.principal import CITY, Scope
from twin.core.scope import feature_count, layer_visible

_LAYERS = """
    SELECT l.id, l.title_zh, l.title_en, l.kind, l.geometry_type, l.fields, l.bbox,
           l.source_crs, l.source_datum, l.origin, l.current_version, l.uploaded_by,
           l.owner_scope, l.shared, l.meta, l.min_zoom, l.max_zoom, l.data_version,
           l.created_at, l.updated_at, v.feature_count, v.source_file_name, v.report
      FROM layers AS l
      LEFT JOIN layer_versions AS v ON v.layer_id = l.id AND v.version = l.current_version
"""

_VERSIONS = text("""
    SELECT version, geometry_type, feature_count, source_file_name, source_crs, source_datum,
           bbox, fields, created_by, created_at, report
      FROM layer_versions AS v
     WHERE layer_id = :id AND NOT EXISTS (
           SELECT 1 FROM upload_drops AS d WHERE d.layer_id = v.layer_id
              AND d.version = v.version AND d.dropped_at IS NOT NULL)
     ORDER BY version
""")


def _document(row: dict, base: str) -> dict:
    layer = {k: v for k, v in row.items() if k not in ("report", "source_file_name")}
    layer["links"] = _links(row, base)
    return layer


def _links(row: dict, base: str) -> list[dict]:
    here = f"{base}/layers/{row['id']}"
    links: list[dict] = [{"href": here, "rel": "self", "type": "application/json"}]
    if row["kind"] == "vector":
        links += [{"href": f"{base}/collections/{row['id']}/items", "rel": "items",
                   "type": "application/geo+json"},
                  {"href": f"{base}/tiles/{row['id']}/{{z}}/{{x}}/{{y}}.mvt", "rel": "tiles",
                   "type": "application/vnd.mapbox-vector-tile", "templated": True}]
    elif row["kind"] == "raster":
        links += [{"href": f"{base}/tiles/{row['id']}/{{z}}/{{x}}/{{y}}.png", "rel": "tiles",
                   "type": "image/png", "templated": True},
                  {"href": f"{base}/tiles/{row['id']}/raster-tilejson.json", "rel": "describedby",
                   "type": "application/json"}]
    else:
        links.append({"href": f"{here}/model", "rel": "enclosure", "type": "model/gltf-binary"})
    return links


async def list_layers(conn: AsyncConnection, registry: LayerRegistry, base: str,
                      scope: Scope = CITY) -> list[dict]:
    rows = (await conn.execute(text(_LAYERS + " ORDER BY l.origin DESC, l.id"))).mappings().all()
    out = []
    for found in rows:
        row = dict(found)
        if not layer_visible(scope, row["owner_scope"], row["shared"]):
            continue
        if row["origin"] == "builtin" and row["kind"] == "vector":
            row["feature_count"] = await _builtin_count(conn, registry, row, scope)
        out.append(_document(row, base))
    return out


async def layer_detail(conn: AsyncConnection, registry: LayerRegistry, layer_id: str,
                       base: str, scope: Scope = CITY) -> dict:
    found = (await conn.execute(text(_LAYERS + " WHERE l.id = :id"), {"id": layer_id})
             ).mappings().first()
    if found is None or not layer_visible(scope, found["owner_scope"], found["shared"]):
        raise NotFound(f"unknown layer '{layer_id}'")
    row = dict(found)
    if row["origin"] == "builtin" and row["kind"] == "vector":
        row["feature_count"] = await _builtin_count(conn, registry, row, scope)
    document = _document(row, base)
    document["source_file_name"] = row["source_file_name"]
    document["report"] = row["report"]
    versions = (await conn.execute(_VERSIONS, {"id": layer_id})).mappings().all()
    document["versions"] = [dict(v) for v in versions]
    return document


async def _builtin_count(conn: AsyncConnection, registry: LayerRegistry, row: dict,
                         scope: Scope) -> int | None:
    try:
        layer = registry.get(row["id"])
    except NotFound:
        return None
    return await feature_count(conn, registry, layer, row["data_version"], scope)

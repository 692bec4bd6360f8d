"""Registration of the built-in layers in the ``layers`` table (sync: the sample loader runs it).

The record type and the read side (``Layer``, ``LayerRegistry``) are the floor's:
twin/core/layer.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import rasterio
from sqlalchemy import Connection, text

from layers.builtin import BUILTIN_LAYERS, BuiltinLayer
from twin.core.raster_facts import describe_raster, raster_meta

# The sample's CIM4-6 models (data_samples/models.py writes it beside their GLB files):
# {"models": [{"id", "title_zh", "title_en", "file", "meta"}]}.
MODELS_FILE = "models.json"

_UPSERT_LAYER = text("""
    INSERT INTO layers (id, title_zh, title_en, kind, geometry_type, source_table, source_filter,
                        fields, bbox, file_path, min_zoom, max_zoom, origin, source_crs,
                        source_datum, meta)
    VALUES (:id, :title_zh, :title_en, :kind, :geometry_type, :source_table, :source_filter,
            CAST(:fields AS jsonb), :bbox, :file_path, :min_zoom, :max_zoom, 'builtin',
            'EPSG:4326', 'wgs84', CAST(:meta AS jsonb))
    ON CONFLICT (id) DO UPDATE SET
        title_zh = EXCLUDED.title_zh, title_en = EXCLUDED.title_en, kind = EXCLUDED.kind,
        geometry_type = EXCLUDED.geometry_type, source_table = EXCLUDED.source_table,
        source_filter = EXCLUDED.source_filter, fields = EXCLUDED.fields, bbox = EXCLUDED.bbox,
        file_path = EXCLUDED.file_path, min_zoom = EXCLUDED.min_zoom,
        max_zoom = EXCLUDED.max_zoom, meta = EXCLUDED.meta,
        data_version = layers.data_version + 1, updated_at = now()
    WHERE (layers.title_zh, layers.title_en, layers.kind, layers.geometry_type,
           layers.source_table, layers.source_filter, layers.fields, layers.bbox,
           layers.file_path, layers.min_zoom, layers.max_zoom, layers.meta)
          IS DISTINCT FROM
          (EXCLUDED.title_zh, EXCLUDED.title_en, EXCLUDED.kind, EXCLUDED.geometry_type,
           EXCLUDED.source_table, EXCLUDED.source_filter, EXCLUDED.fields, EXCLUDED.bbox,
           EXCLUDED.file_path, EXCLUDED.min_zoom, EXCLUDED.max_zoom, EXCLUDED.meta)
""")

# Built-in layers that a newer twin no longer defines (renamed or dropped).
_DELETE_STALE_BUILTINS = text(
    "DELETE FROM layers WHERE origin = 'builtin' AND NOT (id = ANY(:ids))"
)

_COLUMN_TYPES = text("""
    SELECT column_name, data_type
      FROM information_schema.columns
     WHERE table_schema = current_schema() AND table_name = :table
""")


def _vector_fields(conn: Connection, layer: BuiltinLayer) -> list[dict]:
    types: dict[str, str] = {name: kind for name, kind in conn.execute(
        _COLUMN_TYPES, {"table": layer.source_table})}
    return [{"name": name, "type": types[name]} for name in layer.fields]


def _vector_bbox(conn: Connection, layer: BuiltinLayer) -> list[float] | None:
    # source_filter is a fixed predicate from BUILTIN_LAYERS, never user input.
    row = conn.execute(text(
        f"SELECT ST_XMin(e), ST_YMin(e), ST_XMax(e), ST_YMax(e) "
        f'FROM (SELECT ST_Extent(geom) AS e FROM "{layer.source_table}" '
        f"WHERE {layer.source_filter or 'TRUE'}) AS extent"
    )).one()
    return None if row[0] is None else [float(v) for v in row]


def _raster_bbox(path: Path) -> list[float]:
    with rasterio.open(path) as dataset:
        return list(dataset.bounds)


def sample_models(samples_dir: Path) -> list[dict]:
    """The model layers the sample directory ships (none when it has no models file)."""
    path = samples_dir / MODELS_FILE
    if not path.exists():
        return []
    return list(json.loads(path.read_text(encoding="utf-8"))["models"])


def _register_models(conn: Connection, samples_dir: Path, models: list[dict]) -> None:
    """A 3D layer per sample model, with the facts an uploaded model carries (its meta)."""
    for model in models:
        anchor = model["meta"]["anchor"]
        conn.execute(_UPSERT_LAYER, {
            "id": model["id"], "title_zh": model["title_zh"], "title_en": model["title_en"],
            "kind": "3d", "geometry_type": "Point", "source_table": None,
            "source_filter": None, "fields": "[]",
            "bbox": [anchor["lon"], anchor["lat"], anchor["lon"], anchor["lat"]],
            "file_path": str(samples_dir / model["file"]), "min_zoom": 0, "max_zoom": 22,
            "meta": json.dumps(model["meta"], ensure_ascii=False),
        })


def register_builtin_layers(conn: Connection, samples_dir: Path) -> int:
    """Insert or refresh every built-in layer (and the sample's model layers); returns how
    many were registered.

    Idempotent: a layer whose definition is unchanged keeps its data version (and so its
    cached tiles); one that changed gets a new version.
    """
    models = sample_models(samples_dir)
    conn.execute(_DELETE_STALE_BUILTINS, {"ids": [layer.id for layer in BUILTIN_LAYERS]
                                          + [model["id"] for model in models]})
    for layer in BUILTIN_LAYERS:
        meta: dict = {}
        bbox: list[float] | None
        if layer.kind == "raster":
            path = samples_dir / str(layer.file_name)
            fields, bbox, file_path = [], _raster_bbox(path), str(path)
            # As an uploaded raster's: the web map draws a hillshade for a DEM.
            meta = raster_meta(describe_raster(path))
        else:
            fields, bbox, file_path = _vector_fields(conn, layer), _vector_bbox(conn, layer), None
        conn.execute(_UPSERT_LAYER, {
            "id": layer.id, "title_zh": layer.title_zh, "title_en": layer.title_en,
            "kind": layer.kind, "geometry_type": layer.geometry_type,
            "source_table": layer.source_table, "source_filter": layer.source_filter,
            "fields": json.dumps(fields), "bbox": bbox, "file_path": file_path,
            "min_zoom": layer.min_zoom, "max_zoom": layer.max_zoom, "meta": json.dumps(meta),
        })
    _register_models(conn, samples_dir, models)
    return len(BUILTIN_LAYERS) + len(models)

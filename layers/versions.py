"""Publishing, rolling back and deleting uploaded layers: each one statement group in one
transaction, so readers see the old version or the new one and never anything in between.

A version no longer published (superseded by a newer one or a rollback, or of a deleted
layer) keeps its table and files for the drop grace (layers/blobs.py): a deleted layer is gone
from the API at once, its tables a grace later.

Every publish bumps ``layers.data_version``; the caller then resolves the registry again
(``RegistryCache.invalidate``), and tile caches keyed by the data version go stale at once.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Connection, text

from layers import blobs
from layers.blobs import version_dir as version_dir  # its callers import it from here
from twin.core.errors import Conflict, InvalidParameter, NotFound, TwinError

LAYER_ID = re.compile(r"^[a-z][a-z0-9_]{0,39}$")

class BuiltinLayerError(TwinError):
    status_code = 403


@dataclass
class Version:
    layer_id: str
    version: int
    kind: str
    source_file_name: str
    source_crs: str
    source_crs_name: str
    source_datum: str
    created_by: str
    geometry_type: str | None = None
    fields: list[dict] = field(default_factory=list)
    bbox: list[float] | None = None
    feature_count: int | None = None
    table_name: str | None = None
    file_path: str | None = None
    max_zoom: int = 22
    meta: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)


def table_name(layer_id: str, version: int) -> str:
    return f"upload_{layer_id}_v{version}"


def job_dir(uploads_dir: Path, job_id: str) -> Path:
    """Where an upload is spooled while its job runs."""
    return uploads_dir / "jobs" / job_id


def check_layer_id(layer_id: str) -> str:
    if not LAYER_ID.match(layer_id):
        raise InvalidParameter(f"id: {layer_id!r} is not a usable layer id; use 1-40 lower-case "
                               "letters, digits and '_', starting with a letter")
    return layer_id


def next_version(conn: Connection, layer_id: str) -> int:
    current = conn.execute(text("SELECT max(version) FROM layer_versions WHERE layer_id = :id"),
                           {"id": layer_id}).scalar()
    return (current or 0) + 1


_INSERT_VERSION = text("""
    INSERT INTO layer_versions (layer_id, version, table_name, file_path, geometry_type, fields,
                                bbox, feature_count, source_file_name, source_crs, source_datum,
                                meta, report, created_by)
    VALUES (:layer_id, :version, :table_name, :file_path, :geometry_type,
            CAST(:fields AS jsonb), :bbox, :feature_count, :source_file_name, :source_crs,
            :source_datum, CAST(:meta AS jsonb), CAST(:report AS jsonb), :created_by)
""")

# A new layer's data version starts at this transaction's id, not at 1: a layer deleted and
# uploaded again under the same id must never repeat a version the deleted one had (caches
# and other workers' registries tell layers apart by it). Each of the deleted layer's
# publishes (+1) ran in an earlier transaction, so its last version is below this id.
_CREATE_LAYER = text("""
    INSERT INTO layers (id, title_zh, title_en, kind, geometry_type, source_table, fields, bbox,
                        source_crs, source_datum, file_path, min_zoom, max_zoom, origin,
                        current_version, uploaded_by, meta, owner_scope, shared, data_version)
    VALUES (:layer_id, :title, :title, :kind, :geometry_type, :table_name,
            CAST(:fields AS jsonb), :bbox, :source_crs_name, :source_datum, :file_path, 0,
            :max_zoom, 'upload', :version, :created_by, CAST(:meta AS jsonb), :owner_scope,
            :shared, CAST(CAST(pg_current_xact_id() AS text) AS bigint))
""")

# Points the layer at one of its versions; the data version moves on, so every cached tile
# of the layer is stale from this commit on.
_POINT_AT_VERSION = text("""
    UPDATE layers AS l
       SET geometry_type = v.geometry_type, source_table = v.table_name, fields = v.fields,
           bbox = v.bbox, file_path = v.file_path, current_version = v.version,
           source_crs = left(v.source_crs, 32), source_datum = v.source_datum,
           uploaded_by = v.created_by, meta = v.meta, max_zoom = :max_zoom,
           data_version = l.data_version + 1, updated_at = now()
      FROM layer_versions AS v
     WHERE l.id = :layer_id AND v.layer_id = l.id AND v.version = :version
           AND l.origin = 'upload'
""")


def publish(conn: Connection, version: Version, title: str | None, create: bool,
            owner_scope: str | None = None, shared: bool = True, grace_s: float = 0.0
            ) -> None:
    """Record ``version`` and make it the layer's published one (``create``: a new layer).

    A new layer belongs to its uploader's scope (``Scope.key``; None for the city); unless
    ``shared`` it is only visible to principals whose scope overlaps that one. A new version
    keeps the layer's owner; the version it supersedes is dropped ``grace_s`` later.
    """
    params = {**version.__dict__, "title": title, "owner_scope": owner_scope, "shared": shared,
              "fields": json.dumps(version.fields, ensure_ascii=False),
              "meta": json.dumps(version.meta, ensure_ascii=False),
              "report": json.dumps(version.report, ensure_ascii=False)}
    layer = conn.execute(text("SELECT origin, current_version FROM layers WHERE id = :id "
                              "FOR UPDATE"), {"id": version.layer_id}).first()
    origin, superseded = (None, None) if layer is None else tuple(layer)
    if create:
        if origin is not None:
            raise Conflict(f"layer '{version.layer_id}' already exists; PUT /layers/"
                           f"{version.layer_id} uploads a new version of it")
        conn.execute(_CREATE_LAYER, params)
        conn.execute(_INSERT_VERSION, params)
        return
    if origin != "upload":
        raise Conflict(f"layer '{version.layer_id}' was deleted while this version was being "
                       "ingested")
    conn.execute(_INSERT_VERSION, params)
    conn.execute(_POINT_AT_VERSION, {"layer_id": version.layer_id, "version": version.version,
                                     "max_zoom": version.max_zoom})
    if superseded is not None:
        _supersede(conn, version.layer_id, superseded, grace_s)


def _supersede(conn: Connection, layer_id: str, version: int, grace_s: float) -> None:
    table = conn.execute(text("SELECT table_name FROM layer_versions WHERE layer_id = :id "
                              "AND version = :version"),
                         {"id": layer_id, "version": version}).scalar()
    blobs.schedule_drop(conn, layer_id, version, table, grace_s)


def uploaded_layer(conn: Connection, layer_id: str) -> dict:
    row = conn.execute(text("SELECT id, origin, current_version, max_zoom FROM layers "
                            "WHERE id = :id FOR UPDATE"), {"id": layer_id}).mappings().first()
    if row is None:
        raise NotFound(f"unknown layer '{layer_id}'")
    if row["origin"] != "upload":
        raise BuiltinLayerError(f"layer '{layer_id}' is a built-in layer; only uploaded "
                                "layers can be changed or deleted")
    return dict(row)


def rollback(conn: Connection, layer_id: str, version: int, grace_s: float = 0.0) -> dict:
    """Publish an earlier version again (as the current one), while it is kept: a version
    superseded longer than the drop grace ago is gone. The version it replaces is dropped
    ``grace_s`` later."""
    _refuse_if_busy(conn, layer_id, "rolled back")
    layer = uploaded_layer(conn, layer_id)
    known = conn.execute(text(
        "SELECT v.version FROM layer_versions AS v WHERE v.layer_id = :id AND NOT EXISTS ("
        "SELECT 1 FROM upload_drops AS d WHERE d.layer_id = v.layer_id AND d.version = "
        "v.version AND d.dropped_at IS NOT NULL) ORDER BY v.version"),
        {"id": layer_id}).scalars().all()
    if version not in known:
        if conn.execute(text("SELECT 1 FROM layer_versions WHERE layer_id = :id AND version = "
                             ":version"), {"id": layer_id, "version": version}).first():
            blobs.revive(conn, layer_id, version)  # dropped: says so
        raise InvalidParameter(f"version: layer '{layer_id}' has versions "
                               f"{', '.join(map(str, known))}; got {version}")
    blobs.revive(conn, layer_id, version)
    conn.execute(_POINT_AT_VERSION, {"layer_id": layer_id, "version": version,
                                     "max_zoom": layer["max_zoom"]})
    if layer["current_version"] != version:
        _supersede(conn, layer_id, layer["current_version"], grace_s)
    return {"layer": layer_id, "version": version, "previous_version": layer["current_version"]}


def delete(conn: Connection, layer_id: str, uploads_dir: Path, grace_s: float = 0.0
           ) -> list[Path]:
    """Delete the layer and its version rows: gone from every listing and tile at once, its
    id free for a new layer; its version tables and files are dropped ``grace_s`` later
    (layers/blobs.py ``bury_layer``). Returns this node's build folders of the layer, to
    remove after the commit (the nodes' copies go with the grace)."""
    _refuse_if_busy(conn, layer_id, "deleted")
    uploaded_layer(conn, layer_id)
    blobs.bury_layer(conn, layer_id, grace_s)
    conn.execute(text("DELETE FROM layers WHERE id = :id"), {"id": layer_id})
    return [uploads_dir / "layers" / layer_id]


def remove_paths(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def _refuse_if_busy(conn: Connection, layer_id: str, what: str) -> None:
    busy = conn.execute(text("SELECT id FROM upload_jobs WHERE layer_id = :id "
                             "AND state IN ('queued', 'running')"), {"id": layer_id}).scalar()
    if busy:
        raise Conflict(f"layer '{layer_id}' has an upload in progress (job {busy}); it can be "
                       f"{what} when that job has finished")


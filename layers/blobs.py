"""Uploaded versions' files in the database, each node's copies of them, and old versions
dropped after a grace (issue 15; tables of migration 0016).

A version's files (its COG, its 3D model) are written by the node that ran its job into
``<uploads>/layers/<layer>/v<n>/``. ``store_version`` keeps them in ``upload_blobs`` (by
SHA-256, in 1 MiB chunks) and ``upload_files`` inside the job's publishing transaction, so no
node ever sees a version whose files are not there. Every reader asks twin.core.local_files
for a file; ``LocalFiles`` (the resolver the upload service installs) answers with the node's
own copy, ``<uploads>/cache/<layer>/d<data version>/``, and fetches it first when it is
missing: into a temporary file beside it, checked against its SHA-256, then renamed into
place, so a reader never sees half a file and any number of threads and processes may fetch
at once (the last rename wins; the bytes are the same). A blob whose bytes do not hash to its
name is refused (``CorruptFile``), never served. The node that built a version keeps its
files as its copy (``keep_published``: hard links) instead of fetching them back.

Versions are not dropped at once. A version superseded by a newer one or a rollback, and
every version of a deleted layer, is recorded in ``upload_drops`` with ``drop_after`` =
now + the grace (``TWIN_UPLOADS_DROP_GRACE_S``): until then a standby's query, another node's
registry of a moment ago or a rollback may still read it. ``drop_due`` (every few seconds in
each process's job runner; one process at a time does it, under an advisory lock) drops the
tables and file rows of the versions that are due; ``sweep_local`` removes what this node
keeps and no longer needs. A deleted layer is gone from the API at once; its tables and files
are moved out of its id's way (``bury_layer``) and dropped after the grace.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path, PurePosixPath

from sqlalchemy import Connection, Engine, text

from twin.core.errors import InvalidParameter, NotFound, TwinError
from twin.core.layer import Layer
from twin.core.local_files import stored_path
from twin.core.settings import Settings

log = logging.getLogger("twin.uploads")

CHUNK_BYTES = 1024 * 1024
# Chunks a fetch holds in memory at once (a server-side cursor streams the rest).
FETCH_CHUNKS = 4
# Only one process at a time drops what is due (a transaction-level advisory lock).
DROP_LOCK = 0x7477_6472_6F70  # "twdrop"


def version_dir(uploads_dir: Path, layer_id: str, version: int) -> Path:
    """Where a job builds version ``version``'s files (on the node that runs it)."""
    return uploads_dir / "layers" / layer_id / f"v{version}"


def cache_dir(uploads_dir: Path, layer_id: str, data_version: int) -> Path:
    """Where a node keeps its copy of the files a layer serves at ``data_version``. Keyed by
    the data version, never by the version number: a layer deleted and uploaded again under
    its id starts at version 1 again, but its data versions never repeat (layers/versions.py),
    so a copy is never taken for another incarnation's."""
    return uploads_dir / "cache" / layer_id / f"d{data_version}"


class CorruptFile(TwinError):
    """A stored file whose bytes do not match its checksum: refused, not served."""

    status_code = 500


def drop_grace_s(settings: Settings) -> float:
    """How long a superseded version is kept (TWIN_UPLOADS_DROP_GRACE_S)."""
    return settings.uploads.drop_grace_s


# --- storing at publish time --------------------------------------------------------------

_INSERT_BLOB = text("""
    INSERT INTO upload_blobs (sha256, size, chunks) VALUES (:sha256, :size, :chunks)
    ON CONFLICT (sha256) DO NOTHING RETURNING sha256
""")
_INSERT_CHUNK = text("INSERT INTO upload_blob_chunks (sha256, seq, data) "
                     "VALUES (:sha256, :seq, :data)")
_INSERT_FILE = text("""
    INSERT INTO upload_files (layer_id, version, path, sha256, size)
    VALUES (:layer_id, :version, :path, :sha256, :size)
""")


def _digest(path: Path) -> tuple[bytes, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as source:
        while block := source.read(CHUNK_BYTES):
            digest.update(block)
            size += len(block)
    return digest.digest(), size


def store_version(conn: Connection, layer_id: str, version: int, folder: Path) -> list[str]:
    """Keep every file under ``folder`` as version ``version``'s, in the caller's (the
    publishing) transaction; returns their relative paths. Content stored before (the same
    file published again) is not stored twice."""
    stored = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        sha256, size = _digest(path)
        chunks = -(-size // CHUNK_BYTES)
        if conn.execute(_INSERT_BLOB, {"sha256": sha256, "size": size, "chunks": chunks}
                        ).first() is not None:
            with path.open("rb") as source:
                for seq in range(chunks):
                    conn.execute(_INSERT_CHUNK, {"sha256": sha256, "seq": seq,
                                                 "data": source.read(CHUNK_BYTES)})
        conn.execute(_INSERT_FILE, {"layer_id": layer_id, "version": version,
                                    "path": relative, "sha256": sha256, "size": size})
        stored.append(relative)
    return stored


_UNSTORED = text("""
    SELECT v.layer_id, v.version, v.file_path FROM layer_versions AS v
     WHERE v.file_path IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM upload_files AS f
                        WHERE f.layer_id = v.layer_id AND f.version = v.version)
       AND NOT EXISTS (SELECT 1 FROM upload_drops AS d WHERE d.layer_id = v.layer_id
                          AND d.version = v.version AND d.dropped_at IS NOT NULL)
     ORDER BY v.layer_id, v.version
""")
_STORE_LOCK = 0x74776266  # "twbf": one process stores a version's files at a time


def backfill(engine: Engine) -> list[tuple[str, int]]:
    """Store the files of versions published before their files were kept (migration 0016)
    that lie on this node, so every node can serve them; returns those stored. Run once when
    a process's job runner starts (in its background thread)."""
    with engine.connect() as conn:
        unstored = conn.execute(_UNSTORED).all()
    stored = []
    for layer_id, version, file_path in unstored:
        path = Path(file_path)
        if not path.is_file() or path.parent.name != f"v{version}":
            continue  # on another node, or gone
        with engine.begin() as conn:
            if not conn.execute(text("SELECT pg_try_advisory_xact_lock(:lock, hashtext(:key))"),
                                {"lock": _STORE_LOCK, "key": f"{layer_id}/{version}"}
                                ).scalar_one():
                continue
            if conn.execute(text("SELECT 1 FROM upload_files WHERE layer_id = :id AND "
                                 "version = :version"),
                            {"id": layer_id, "version": version}).first():
                continue
            store_version(conn, layer_id, version, path.parent)
        stored.append((layer_id, version))
    if stored:
        log.info("stored the files of %d earlier upload versions in the database: %s",
                 len(stored), stored)
    return stored


def keep_published(engine: Engine, uploads_dir: Path, layer_id: str, version: int,
                   folder: Path) -> None:
    """After a job published version ``version`` from ``folder``: the node that built the
    files keeps them as its copies (hard links), so it does not fetch them back. Best effort:
    anything missing is fetched on first use."""
    try:
        _keep(engine, uploads_dir, layer_id, version, folder)
    except Exception as error:
        log.warning("upload %s v%d: could not keep its files here (%s)", layer_id, version,
                    error)


def _keep(engine: Engine, uploads_dir: Path, layer_id: str, version: int, folder: Path
          ) -> None:
    with engine.connect() as conn:
        data_version = conn.execute(text(
            "SELECT data_version FROM layers WHERE id = :id AND current_version = :version"),
            {"id": layer_id, "version": version}).scalar()
    if data_version is None:
        return  # already superseded or deleted
    copies = cache_dir(uploads_dir, layer_id, data_version)
    for path in (p for p in folder.rglob("*") if p.is_file()):
        target = copies / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
        try:
            os.link(path, partial)
            os.replace(partial, target)
        except OSError as error:  # fetched on first use instead
            log.warning("upload %s v%d: could not keep %s (%s)", layer_id, version, path, error)
            partial.unlink(missing_ok=True)


# --- fetching on first use --------------------------------------------------------------------

_FILES = text("""
    SELECT path, sha256, size FROM upload_files
     WHERE layer_id = :layer_id AND version = :version
     ORDER BY path = :main, path
""")
_CHUNKS = text("SELECT data FROM upload_blob_chunks WHERE sha256 = :sha256 ORDER BY seq")


def relative_path(layer: Layer, version: int) -> str:
    """The layer's file relative to its version's folder, from the path its row records
    (``…/layers/<layer>/v<n>/<relative>``, written on whichever node ran the job)."""
    parts = PurePosixPath(stored_path(layer).as_posix()).parts
    for i in range(len(parts) - 3, -1, -1):
        if parts[i:i + 3] == ("layers", layer.id, f"v{version}"):
            return "/".join(parts[i + 3:])
    return parts[-1]


def fetch_version(engine: Engine, layer_id: str, version: int, folder: Path,
                  main: str = "") -> int:
    """Copy version ``version``'s files that are missing here into ``folder`` (``main``
    last: once it is in place, so is everything beside it); returns how many files the
    version has (0: none stored, e.g. published before the files were kept)."""
    with engine.connect() as conn:
        files = conn.execute(_FILES, {"layer_id": layer_id, "version": version,
                                      "main": main}).all()
        for relative, sha256, size in files:
            target = folder / relative
            if not target.is_file():
                _fetch_file(conn, bytes(sha256), size, target, f"{layer_id} v{version}")
        conn.rollback()
    return len(files)


def _fetch_file(conn: Connection, sha256: bytes, size: int, target: Path, what: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
    digest, written = hashlib.sha256(), 0
    try:
        with partial.open("wb") as out:
            rows = conn.execution_options(stream_results=True, yield_per=FETCH_CHUNKS
                                          ).execute(_CHUNKS, {"sha256": sha256})
            for (data,) in rows:
                digest.update(data)
                written += len(data)
                out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if digest.digest() != sha256 or written != size:
            log.error("stored file %s of %s is corrupt: %d bytes hashing to %s, expected %d "
                      "bytes hashing to %s", target.name, what, written, digest.hexdigest(),
                      size, sha256.hex())
            raise CorruptFile(f"the stored file '{target.name}' of layer {what} is corrupt "
                              "(its checksum does not match); it is not served")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


class LocalFiles:
    """This node's copies of uploaded versions' files (twin.core.local_files' resolver)."""

    def __init__(self, engine: Engine, uploads_dir: Path):
        self._engine, self._uploads_dir = engine, uploads_dir
        # One fetch per version at a time in this process; other processes may fetch too.
        self._locks: defaultdict[tuple[str, int], threading.Lock] = defaultdict(threading.Lock)
        self._guard = threading.Lock()

    def __call__(self, layer: Layer) -> Path:
        version = layer.current_version
        if version is None or not layer.file_path:
            return stored_path(layer)
        relative = relative_path(layer, version)
        folder = cache_dir(self._uploads_dir, layer.id, layer.data_version)
        target = folder / relative
        if target.is_file():
            return target
        with self._guard:
            lock = self._locks[(layer.id, version)]
        with lock:
            if target.is_file():
                return target
            fetch_version(self._engine, layer.id, version, folder, relative)
        if target.is_file():
            return target
        # Never the recorded path, though it may lie on this machine: it is another node's
        # folder (a version from before its files were kept is stored by ``backfill`` on the
        # node that has it).
        raise NotFound(f"the file of layer '{layer.id}' version {version} is not stored "
                       "(upload the layer again)")


# --- dropping after the grace ---------------------------------------------------------------

_SCHEDULE = text("""
    INSERT INTO upload_drops (layer_id, version, table_name, drop_after)
    VALUES (:layer_id, :version, :table_name, now() + make_interval(secs => :grace))
    ON CONFLICT (layer_id, version) DO UPDATE
       SET drop_after = LEAST(upload_drops.drop_after, EXCLUDED.drop_after)
     WHERE upload_drops.dropped_at IS NULL
""")


def schedule_drop(conn: Connection, layer_id: str, version: int, table_name: str | None,
                  grace_s: float) -> None:
    """Version ``version`` is no longer published: drop it after ``grace_s``."""
    conn.execute(_SCHEDULE, {"layer_id": layer_id, "version": version,
                             "table_name": table_name, "grace": grace_s})


def bury_layer(conn: Connection, layer_id: str, grace_s: float) -> str:
    """Every version of a layer being deleted (before its rows go), dropped ``grace_s``
    later under a name of its own, so the id is free at once for a new layer whose versions
    start at 1 again: tables ``upload_<layer>_v<n>`` are renamed ``gone_<token>_v<n>``, their
    file rows and drop records move to the id ``<layer>~<token>``. Returns that id."""
    token = uuid.uuid4().hex[:12]
    grave = f"{layer_id}~{token}"
    moved = {"id": layer_id, "grave": grave}
    conn.execute(text("UPDATE upload_drops SET layer_id = :grave WHERE layer_id = :id"), moved)
    conn.execute(text("UPDATE upload_files SET layer_id = :grave WHERE layer_id = :id"), moved)
    rows = conn.execute(text("SELECT version, table_name FROM layer_versions "
                             "WHERE layer_id = :id"), {"id": layer_id}).all()
    for version, table_name in rows:
        if dropped_at(conn, grave, version):
            continue
        buried = None
        if table_name:
            buried = f"gone_{token}_v{version}"
            _rename_table(conn, table_name, buried)
        conn.execute(text("""
            INSERT INTO upload_drops (layer_id, version, table_name, drop_after)
            VALUES (:grave, :version, :table_name, now() + make_interval(secs => :grace))
            ON CONFLICT (layer_id, version) DO UPDATE
               SET table_name = EXCLUDED.table_name,
                   drop_after = LEAST(upload_drops.drop_after, EXCLUDED.drop_after)
        """), {"grave": grave, "version": version, "table_name": buried, "grace": grace_s})
    return grave


def _rename_table(conn: Connection, table: str, to: str) -> None:
    """Rename a version's table and the indexes named after it (its primary key's, its
    geometry's), which would otherwise be in the way of the new layer's."""
    if conn.execute(text("SELECT to_regclass(:table)"), {"table": f'"{table}"'}).scalar() is None:
        return
    indexes = conn.execute(text(
        "SELECT c.relname FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indexrelid "
        "WHERE i.indrelid = CAST(:table AS regclass)"), {"table": f'"{table}"'}).scalars().all()
    conn.execute(text(f'ALTER TABLE "{table}" RENAME TO "{to}"'))
    for index in indexes:
        if index.startswith(table):
            conn.execute(text(f'ALTER INDEX "{index}" RENAME TO "{to}{index[len(table):]}"'))


def revive(conn: Connection, layer_id: str, version: int) -> None:
    """Version ``version`` is published again (a rollback): keep it; 400 when it is gone."""
    dropped = conn.execute(text(
        "DELETE FROM upload_drops WHERE layer_id = :id AND version = :version "
        "AND dropped_at IS NULL RETURNING version"), {"id": layer_id, "version": version})
    if dropped.first() is None and dropped_at(conn, layer_id, version):
        raise InvalidParameter(f"version: version {version} of layer '{layer_id}' was dropped "
                               "(a superseded version is kept TWIN_UPLOADS_DROP_GRACE_S)")


def dropped_at(conn: Connection, layer_id: str, version: int) -> bool:
    return conn.execute(text("SELECT 1 FROM upload_drops WHERE layer_id = :id AND version = "
                             ":version AND dropped_at IS NOT NULL"),
                        {"id": layer_id, "version": version}).first() is not None


_DUE = text("""
    SELECT d.layer_id, d.version, d.table_name FROM upload_drops AS d
     WHERE d.dropped_at IS NULL AND d.drop_after <= now()
     ORDER BY d.drop_after LIMIT 20
       FOR UPDATE SKIP LOCKED
""")
_SERVED = text("SELECT 1 FROM layers WHERE id = :id AND current_version = :version "
               "AND origin = 'upload'")
_UNUSED_BLOBS = text("""
    DELETE FROM upload_blobs AS b
     WHERE b.sha256 = ANY(:candidates)
       AND NOT EXISTS (SELECT 1 FROM upload_files AS f WHERE f.sha256 = b.sha256)
""")


def drop_due(engine: Engine) -> list[tuple[str, int]]:
    """Drop the versions whose grace is over (their table and file rows; blobs no version
    uses any more); returns them. Safe in any process at any time: one does it at once."""
    with engine.begin() as conn:
        if not conn.execute(text("SELECT pg_try_advisory_xact_lock(:key)"),
                            {"key": DROP_LOCK}).scalar_one():
            return []
        dropped: list[tuple[str, int]] = []
        candidates: list[bytes] = []
        for layer_id, version, table_name in conn.execute(_DUE).all():
            if conn.execute(_SERVED, {"id": layer_id, "version": version}).first():
                conn.execute(text("DELETE FROM upload_drops WHERE layer_id = :id AND "
                                  "version = :version"), {"id": layer_id, "version": version})
                continue  # published again meanwhile
            if table_name:
                conn.execute(text(f'DROP TABLE IF EXISTS "{table_name}"'))
            candidates += conn.execute(text(
                "DELETE FROM upload_files WHERE layer_id = :id AND version = :version "
                "RETURNING sha256"), {"id": layer_id, "version": version}).scalars().all()
            conn.execute(text("UPDATE upload_drops SET dropped_at = now() WHERE layer_id = :id "
                              "AND version = :version"), {"id": layer_id, "version": version})
            dropped.append((layer_id, version))
    if candidates:
        # A transaction of its own: a publish that took one of these blobs meanwhile makes
        # the delete fail on its foreign key, and the drops above stand.
        try:
            with engine.begin() as conn:
                conn.execute(_UNUSED_BLOBS, {"candidates": list(set(candidates))})
        except Exception as error:
            log.warning("upload blobs: could not remove unused blobs (next pass): %s", error)
    if dropped:
        log.info("dropped %d superseded upload versions: %s", len(dropped), dropped)
    return dropped


def sweep_local(engine: Engine, uploads_dir: Path, grace_s: float) -> list[Path]:
    """Remove what this node keeps and no longer needs (every node has its own): copies of
    data versions a layer no longer serves, once unused for the grace, and the build folders
    of versions that are dropped, deleted or never published (no job of the layer running)."""
    copies = [(folder.parent.name, int(folder.name[1:]), folder)
              for folder in (uploads_dir / "cache").glob("*/d*")
              if folder.is_dir() and folder.name[1:].isdigit()]
    builds = [(folder.parent.name, int(folder.name[1:]), folder)
              for folder in (uploads_dir / "layers").glob("*/v*")
              if folder.is_dir() and folder.name[1:].isdigit()]
    if not copies and not builds:
        return []
    ids = list({layer for layer, _, _ in copies + builds})
    with engine.connect() as conn:
        # Running jobs first: one that ends meanwhile has its version row committed before
        # it stops being running (one transaction), so the next query sees the version.
        busy = set(conn.execute(text(
            "SELECT layer_id FROM upload_jobs WHERE layer_id = ANY(:ids) "
            "AND state IN ('queued', 'running')"), {"ids": ids}).scalars().all())
        serving: dict[str, int] = dict(conn.execute(text(
            "SELECT id, data_version FROM layers WHERE id = ANY(:ids)"), {"ids": ids}).all())
        kept = set(conn.execute(text("""
            SELECT v.layer_id, v.version FROM layer_versions AS v
             WHERE v.layer_id = ANY(:ids) AND NOT EXISTS (
                   SELECT 1 FROM upload_drops AS d WHERE d.layer_id = v.layer_id
                      AND d.version = v.version AND d.dropped_at IS NOT NULL)
        """), {"ids": ids}).all())
    now = time.time()
    removed = [folder for layer, data_version, folder in copies
               if serving.get(layer) != data_version
               and now - folder.stat().st_mtime > grace_s]
    removed += [folder for layer, version, folder in builds
                if (layer, version) not in kept and layer not in busy]
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
        try:
            folder.parent.rmdir()  # the layer's folder, once its last one is gone
        except OSError:
            pass
    return removed

"""Upload jobs: a row in ``upload_jobs`` per upload, ingested by a background thread.

A job builds its version (table, COG or model file) and publishes it inside ONE database
transaction, and marks itself succeeded in that same transaction. A failure, or a kill at any
point, rolls the transaction back: no table, no version row, no half-published layer. Files are
written to the version's own folder and removed on failure; ``recover_interrupted`` (run at
start-up) fails the jobs a killed server left behind and sweeps their folders.

Every statement of that transaction is bounded by ``TWIN_UPLOADS_STATEMENT_TIMEOUT_S`` (set
for the transaction only, so a pathological file cannot hold the database for ever); a job
that exceeds it fails like any other, and names the bound and the step it was at.

Run one job by hand: ``python -m layers.jobs <job id>``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from layers import crs as crs_mod
from layers import ingest_model, ingest_raster, ingest_vector
from layers.crs import SourceError
from layers.versions import (
    Conflict,
    Version,
    next_version,
    publish,
    table_name,
    version_dir,
)
from twin.db import sync_engine
from twin.errors import NotFound, TwinError
from twin.settings import Settings

log = logging.getLogger("twin.uploads")

INTERRUPTED = "the server stopped while this job was running; nothing was published"
NEVER_RAN = "the server stopped before this job ran; nothing was published, upload again"
INTERNAL = "internal error while ingesting (see the server log); nothing was published"
# SQLSTATE query_canceled: the statement timeout (or an administrator's cancel).
QUERY_CANCELED = "57014"


def job_dir(uploads_dir: Path, job_id: str) -> Path:
    return uploads_dir / "jobs" / job_id


# --- rows --------------------------------------------------------------------------------

_INSERT_JOB = text("""
    INSERT INTO upload_jobs (id, layer_id, action, state, progress, step, reasons, report,
                             params, file_name, created_by)
    VALUES (:id, :layer_id, :action, 'queued', 0, 'queued', '[]', '{}', CAST(:params AS jsonb),
            :file_name, :created_by)
""")


async def create_job(conn: AsyncConnection, job_id: str, layer_id: str, action: str,
                     file_name: str, params: dict, created_by: str) -> None:
    """Queue a job; a second active job for the same layer is refused (409)."""
    try:
        await conn.execute(_INSERT_JOB, {
            "id": job_id, "layer_id": layer_id, "action": action, "file_name": file_name,
            "params": json.dumps(params, ensure_ascii=False), "created_by": created_by})
        await conn.commit()
    except IntegrityError:
        await conn.rollback()
        raise Conflict(f"layer '{layer_id}' already has an upload in progress; wait for it "
                       "to finish (GET /jobs/…) and try again") from None


_SELECT_JOB = text("""
    SELECT id, layer_id, action, state, progress, step, reasons, report, params, file_name,
           version, created_by, created_at, updated_at
      FROM upload_jobs WHERE id = :id
""")


async def job_document(conn: AsyncConnection, job_id: str) -> dict:
    row = (await conn.execute(_SELECT_JOB, {"id": job_id})).mappings().first()
    if row is None:
        raise NotFound(f"unknown job '{job_id}'")
    job = dict(row)
    job["params"] = {k: v for k, v in job["params"].items() if not k.startswith("_")}
    return job


def _set(engine: Engine, job_id: str, **values) -> None:
    """Progress and state, committed at once (outside the job's publishing transaction)."""
    columns = ", ".join(f"{name} = :{name}" for name in values)
    for name in ("reasons", "report"):
        if name in values:
            values[name] = json.dumps(values[name], ensure_ascii=False)
            columns = columns.replace(f"{name} = :{name}", f"{name} = CAST(:{name} AS jsonb)")
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE upload_jobs SET {columns}, updated_at = now() "
                          "WHERE id = :job_id"), {**values, "job_id": job_id})


# --- running -----------------------------------------------------------------------------

def run_job(engine: Engine, settings: Settings, job_id: str) -> bool:
    """Ingest and publish one queued job; True when a version was published."""
    with engine.connect() as conn:
        job = conn.execute(_SELECT_JOB, {"id": job_id}).mappings().one()
    if job["state"] != "queued":
        return False
    _set(engine, job_id, state="running", progress=2, step="starting")
    folder = None
    try:
        with engine.begin() as conn:
            _bound_statements(conn, settings.uploads.statement_timeout_s)
            version = next_version(conn, job["layer_id"])
            # Recorded before any file exists, so recovery knows which folder to sweep.
            _set(engine, job_id, version=version, progress=5, step="reading")
            folder = version_dir(settings.uploads_dir, job["layer_id"], version)
            shutil.rmtree(folder, ignore_errors=True)  # left by a killed job, never published
            folder.mkdir(parents=True)
            built = _build(conn, engine, settings, dict(job), version, folder)
            _set(engine, job_id, progress=95, step="publishing")
            publish(conn, built, job["params"].get("title"), job["action"] == "create",
                    owner_scope=job["params"].get("_owner_scope"),
                    shared=job["params"].get("_shared", True))
            conn.execute(text(
                "UPDATE upload_jobs SET state = 'succeeded', progress = 100, step = 'published', "
                "report = CAST(:report AS jsonb), version = :version, updated_at = now() "
                "WHERE id = :id"),
                {"id": job_id, "version": version,
                 "report": json.dumps(built.report, ensure_ascii=False)})
        return True
    except (SourceError, TwinError) as error:
        needs = {"needs": ["source_crs"]} if isinstance(error, crs_mod.MissingCrs) else {}
        _fail(engine, job_id, [str(error)], folder, needs)
    except Exception as error:
        if not _timed_out(error):
            log.exception("upload job %s failed", job_id)
            _fail(engine, job_id, [INTERNAL], folder)
        else:
            _fail(engine, job_id, [_timeout_reason(engine, job_id, settings)], folder)
    finally:
        shutil.rmtree(job_dir(settings.uploads_dir, job_id), ignore_errors=True)
    return False


def _bound_statements(conn: Connection, seconds: float) -> None:
    """Cancel any statement of this transaction that runs longer than ``seconds`` (0: never).

    ``SET LOCAL`` (set_config's third argument): the job's progress updates and its failure,
    which run on other connections, are never cut short by it.
    """
    if seconds > 0:
        conn.execute(text("SELECT set_config('statement_timeout', :ms, true)"),
                     {"ms": str(max(1, round(seconds * 1000)))})


def _timed_out(error: BaseException) -> bool:
    """Whether PostgreSQL cancelled a statement for its timeout. SQLAlchemy wraps the driver's
    error (``orig``); the COPY of ingest_vector runs on the driver's cursor, unwrapped."""
    cause = getattr(error, "orig", None) or error
    return (getattr(cause, "sqlstate", None) == QUERY_CANCELED
            and "statement timeout" in str(cause))


def _timeout_reason(engine: Engine, job_id: str, settings: Settings) -> str:
    with engine.connect() as conn:
        step = conn.execute(text("SELECT step FROM upload_jobs WHERE id = :id"),
                            {"id": job_id}).scalar()
    return (f"the upload's database work exceeded {settings.uploads.statement_timeout_s:g} s "
            f"(one statement, while {step}; TWIN_UPLOADS_STATEMENT_TIMEOUT_S); nothing was "
            "published")


def _fail(engine: Engine, job_id: str, reasons: list[str], folder: Path | None,
          report: dict | None = None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    _set(engine, job_id, state="failed", step="failed", reasons=reasons, report=report or {})


def _build(conn: Connection, engine: Engine, settings: Settings, job: dict, version: int,
           folder: Path) -> Version:
    params = job["params"]
    source = job_dir(settings.uploads_dir, job["id"]) / params["_main"]
    declared = crs_mod.parse_source_crs(params.get("source_crs"))
    datum = crs_mod.parse_datum(params.get("datum"))
    common = {"layer_id": job["layer_id"], "version": version, "kind": params["_kind"],
              "source_file_name": job["file_name"], "source_datum": datum,
              "created_by": job["created_by"]}

    def progress(percent: int, step: str) -> None:
        _set(engine, job["id"], progress=percent, step=step)

    if params["_kind"] == "vector":
        return _build_vector(conn, settings, params, source, declared, datum, common, progress)
    if params["_kind"] == "raster":
        return _build_raster(settings, source, declared, datum, folder, common, progress)
    progress(20, "storing the model")
    anchor = ingest_model.Anchor(**params["_anchor"])
    stored = ingest_model.store_model(source, params["_format"], folder, anchor, datum)
    report = {"model": stored["meta"]} | _far_outside(stored["bbox"], settings)
    return Version(**common, source_crs="EPSG:4326", source_crs_name="EPSG:4326",
                   geometry_type="Point", bbox=stored["bbox"], file_path=str(stored["path"]),
                   meta=stored["meta"], report=report)


def _build_raster(settings: Settings, source: Path, declared, datum: str, folder: Path,
                  common: dict, progress: Callable[[int, str], None]) -> Version:
    ingest_raster.check_raster(source, settings.uploads)
    facts = ingest_raster.to_cog(source, folder / "raster.tif", declared, datum, progress)
    meta = {k: facts[k] for k in ("width", "height", "bands", "dtype", "nodata", "min",
                                  "max", "dem")}
    report = {"raster": meta, "source_crs": facts["crs_name"], "datum": datum}
    return Version(**common, source_crs=facts["crs"], source_crs_name=facts["crs_name"],
                   bbox=facts["bbox"], file_path=str(folder / "raster.tif"),
                   max_zoom=facts["max_zoom"], meta=meta,
                   report=report | _far_outside(facts["bbox"], settings))


def _far_outside(bbox: list[float], settings: Settings) -> dict:
    """A warning for the report when a raster or model lies far outside the municipality."""
    margin = settings.uploads.far_outside_margin_deg
    if not crs_mod.bbox_far_outside(bbox, margin):
        return {}
    return {"warnings": [f"the layer lies more than {margin}° outside Chongqing: check "
                         "source_crs and datum"]}


def _build_vector(conn: Connection, settings: Settings, params: dict, source: Path, declared,
                  datum: str, common: dict, progress: Callable[[int, str], None]) -> Version:
    limits = settings.uploads
    frame, crs, notes = ingest_vector.read_frame(source, params["_format"], params.get("layer"),
                                                 declared, limits)
    progress(30, "reprojecting to EPSG:4326")
    frame = crs_mod.to_wgs84(frame, crs, datum)
    progress(45, "validating geometries")
    frame, geometry_type, report = ingest_vector.clean(frame)
    if frame.empty:
        raise SourceError("no feature is left after dropping empty or broken geometries: "
                          + "; ".join(report["dropped_reasons"]))
    report |= notes | {"features": len(frame), "source_crs": crs_mod.describe(crs),
                       "datum": datum,
                       "far_outside_municipality": crs_mod.far_outside(
                           frame, limits.far_outside_margin_deg)}
    if report["far_outside_municipality"]:
        report["warnings"] = [f"{report['far_outside_municipality']} features lie more than "
                              f"{limits.far_outside_margin_deg}° outside Chongqing: check "
                              "source_crs and datum"]
    progress(60, "writing the table")
    table = table_name(common["layer_id"], common["version"])
    fields = ingest_vector.write_table(conn, table, frame, geometry_type)
    report["columns"] = {f["source"]: f["name"] for f in fields[1:]}
    return Version(**common, source_crs=crs.to_wkt() if declared is None else crs.srs,
                   source_crs_name=crs_mod.describe(crs), geometry_type=geometry_type,
                   fields=[{"name": f["name"], "type": f["type"]} for f in fields],
                   bbox=ingest_vector.table_bbox(conn, table), feature_count=len(frame),
                   table_name=table, report=report)


# --- start-up ----------------------------------------------------------------------------

_FAIL_LEFTOVERS = text("""
    UPDATE upload_jobs AS j
       SET state = 'failed', step = 'failed', updated_at = now(),
           reasons = CASE j.state WHEN 'running' THEN CAST(:interrupted AS jsonb)
                                  ELSE CAST(:never_ran AS jsonb) END
     WHERE j.state IN ('queued', 'running')
 RETURNING j.id, j.layer_id, j.version,
           EXISTS (SELECT 1 FROM layer_versions AS v
                    WHERE v.layer_id = j.layer_id AND v.version = j.version) AS published
""")


def recover_interrupted(engine: Engine, uploads_dir: Path) -> list[str]:
    """Fail the jobs a stopped server left queued or running, and remove their files.

    Only the folders those jobs own are touched (their spool folder and the folder of the
    version they were building, unless it got published), never a sweep of the whole tree.
    """
    with engine.begin() as conn:
        failed = conn.execute(_FAIL_LEFTOVERS, {"interrupted": json.dumps([INTERRUPTED]),
                                                "never_ran": json.dumps([NEVER_RAN])}).all()
    for job_id, layer_id, version, published in failed:
        shutil.rmtree(job_dir(uploads_dir, job_id), ignore_errors=True)
        if version is not None and not published:
            shutil.rmtree(version_dir(uploads_dir, layer_id, version), ignore_errors=True)
    if failed:
        log.warning("marked %d interrupted upload jobs failed", len(failed))
    return [row[0] for row in failed]


class JobRunner:
    """A small thread pool that runs queued jobs; ``on_published`` refreshes the registry."""

    def __init__(self, engine: Engine, settings: Settings, on_published: Callable[[str], None],
                 alive: Connection | None = None):
        self._engine, self._settings, self._on_published = engine, settings, on_published
        self._alive = alive  # holds ALIVE_LOCK while this process lives
        self._pool = ThreadPoolExecutor(settings.uploads.workers,
                                        thread_name_prefix="twin-upload")

    def submit(self, job_id: str, layer_id: str) -> None:
        self._pool.submit(self._run, job_id, layer_id)

    def _run(self, job_id: str, layer_id: str) -> None:
        if run_job(self._engine, self._settings, job_id):
            self._on_published(layer_id)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._alive is not None:
            self._alive.invalidate()
        self._engine.dispose()


# Held (shared) by every live server process. A process runs the jobs it accepted, so with
# several worker processes (TWIN_WORKERS) a starting one may fail 'running' jobs as
# interrupted only when it can take this lock exclusively: when no other process is alive.
ALIVE_LOCK = 0x7477696E_6A6F6273  # "twinjobs"


# A killed server's database sessions end a moment after it (PostgreSQL notices the closed
# socket); a restart may come sooner, so the exclusive lock is tried for this long.
ALIVE_WAIT_S = 2.0


def _try_lock_for(conn: Connection, lock: dict, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not conn.execute(text("SELECT pg_try_advisory_lock(:key)"), lock).scalar_one():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _recover_if_alone(engine: Engine, uploads_dir: Path) -> Connection:
    """Recover when no other server process is alive; returns the connection that holds this
    process's shared lock for as long as it lives (``invalidate()`` it to let go: a
    connection merely closed goes back to the pool, lock and all)."""
    conn = engine.connect()
    try:
        lock = {"key": ALIVE_LOCK}
        if _try_lock_for(conn, lock, ALIVE_WAIT_S):
            recover_interrupted(engine, uploads_dir)
            conn.execute(text("SELECT pg_advisory_lock_shared(:key)"), lock)
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), lock)
        else:
            # Waits while a starting sibling recovers, then lives alongside it.
            conn.execute(text("SELECT pg_advisory_lock_shared(:key)"), lock)
        conn.commit()  # session-level locks outlive the transaction
    except BaseException:
        conn.invalidate()
        raise
    return conn


async def start_runner(settings: Settings, on_published: Callable[[str], None]) -> JobRunner:
    """The app's job runner, after failing what a killed server left (if the DB answers)."""
    engine = sync_engine(settings)
    alive = None
    try:
        alive = await asyncio.to_thread(_recover_if_alone, engine, settings.uploads_dir)
    except DBAPIError as error:
        # The app starts without its database (/healthz says 503) or before its migrations;
        # recovery then waits for the next start.
        log.warning("could not check for interrupted upload jobs: %s", error.orig)
    return JobRunner(engine, settings, on_published, alive)


def main(argv: list[str]) -> int:
    settings = Settings()
    engine = sync_engine(settings)
    published = run_job(engine, settings, argv[1])
    engine.dispose()
    return 0 if published else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""Upload jobs: a row in ``upload_jobs`` per upload, ingested by a background thread.

A job builds its version (table, COG or model file) and publishes it inside ONE database
transaction, and marks itself succeeded in that same transaction. A failure, or a kill at any
point, rolls the transaction back: no table, no version row, no half-published layer. Files are
written to the version's own folder and removed on failure.

Whether a job is still alive (its process may die while its siblings live) is asked of
PostgreSQL: the connection that runs a job holds the job's advisory lock until its end is
committed, and layers/job_liveness.py fails the jobs of dead processes.

The version's files are stored in the database in that same transaction (layers/blobs.py),
so every node serves them. The job runs in the process that received the upload: only it
has the spooled file (``<uploads>/jobs/<id>``, on its node's disk), so only it claims the job
(``run_job`` refuses a job whose spool is not here). Spools stay local rather than in the
database: the body streams to disk as it arrives, is read once by the same process, and a
job whose process dies is failed by the reaper (layers/job_liveness.py) whatever node looks;
the uploader sends the file again.

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
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from layers import blobs, coordinates, ingest_cityjson, ingest_model, ingest_raster, ingest_vector
from layers import crs as crs_mod
from layers.crs import Datum, SourceError
from layers.job_liveness import (
    JOB_LOCK,
    OWNER_LOCK,
    REAP_EVERY_S,
    hold_process_locks,
    process_owner,
    reap_dead_jobs,
    start_process_locks,
)
from layers.plan import JobPlan, sent_form
from layers.versions import (
    Conflict,
    Version,
    job_dir,
    next_version,
    publish,
    table_name,
    version_dir,
)
from twin.core.db import sync_engine
from twin.core.errors import NotFound, TwinError
from twin.core.raster_facts import raster_meta
from twin.core.settings import Settings

log = logging.getLogger("twin.uploads")

INTERNAL = "internal error while ingesting (see the server log); nothing was published"
# SQLSTATE query_canceled: the statement timeout (or an administrator's cancel).
QUERY_CANCELED = "57014"

# A backend busy with a long statement notices its client died only when it next talks to it;
# checking this often, a killed process's job lets go of its lock within a second, not at the
# end of its CREATE INDEX.
CLIENT_CHECK_MS = 1000
RUNNING = ("running",)
NOT_SUCCEEDED = ("queued", "running", "failed")

# --- rows --------------------------------------------------------------------------------

# The queuing process is recorded as the job's owner (params.runner.owner) only while it holds
# its OWNER_LOCK (its runner takes it at start-up, again after losing the database): a job with
# no owner is never taken for a dead process's; a start with no other process alive fails it.
_INSERT_JOB = text("""
    INSERT INTO upload_jobs (id, layer_id, action, state, progress, step, reasons, report,
                             params, file_name, created_by)
    VALUES (:id, :layer_id, :action, 'queued', 0, 'queued', '[]', '{}',
            CAST(:params AS jsonb) || CASE WHEN EXISTS (
                SELECT 1 FROM pg_locks
                 WHERE locktype = 'advisory' AND granted AND objsubid = 2
                   AND database = (SELECT oid FROM pg_database
                                    WHERE datname = current_database())
                   AND classid = CAST(:owner_lock AS oid) AND objid = CAST(:owner_key AS oid))
                THEN jsonb_build_object('runner', jsonb_build_object(
                         'owner', CAST(:owner AS integer)))
                ELSE CAST('{}' AS jsonb) END,
            :file_name, :created_by)
""")


async def create_job(conn: AsyncConnection, job_id: str, layer_id: str, action: str,
                     file_name: str, plan: JobPlan | None, created_by: str) -> None:
    """Queue a job; a second active job for the same layer is refused (409)."""
    params = {} if plan is None else plan.to_row()
    try:
        await conn.execute(_INSERT_JOB, {
            "id": job_id, "layer_id": layer_id, "action": action, "file_name": file_name,
            "params": json.dumps(params, ensure_ascii=False), "created_by": created_by,
            "owner_lock": OWNER_LOCK, "owner_key": process_owner(), "owner": process_owner()})
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
    job["params"] = sent_form(job["params"])
    return job


def _set(engine: Engine, job_id: str, states: tuple[str, ...], **values) -> None:
    """Progress and state, committed at once (outside the job's publishing transaction), of
    a job in one of ``states``: a failure never overwrites a success, progress never a
    failure."""
    columns = ", ".join(f"{name} = :{name}" for name in values)
    for name in ("reasons", "report"):
        if name in values:
            values[name] = json.dumps(values[name], ensure_ascii=False)
            columns = columns.replace(f"{name} = :{name}", f"{name} = CAST(:{name} AS jsonb)")
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE upload_jobs SET {columns}, updated_at = now() "
                          "WHERE id = :job_id AND state = ANY(:states)"),
                     {**values, "job_id": job_id, "states": list(states)})


# --- running -----------------------------------------------------------------------------

_LOCK_JOB = text("SELECT pg_advisory_lock(CAST(:lock AS integer), hashtext(:id))")
_UNLOCK_JOB = text("SELECT pg_advisory_unlock(CAST(:lock AS integer), hashtext(:id))")
# Claimed under the job's lock: a 'running' job is alive exactly while its lock is held. The
# mark (params.runner.claimed) tells reapers that it is (rows from before the locks, or
# written by hand, are not).
_CLAIM = text("""
    UPDATE upload_jobs
       SET state = 'running', progress = 2, step = 'starting', updated_at = now(),
           params = params || jsonb_build_object('runner', COALESCE(
               params -> 'runner', CAST('{}' AS jsonb)) || jsonb_build_object('claimed', true))
     WHERE id = :id AND state = 'queued'
 RETURNING id, layer_id, action, params, file_name, created_by
""")


def run_job(engine: Engine, settings: Settings, job_id: str) -> bool:
    """Claim, ingest and publish one queued job; True when a version was published.

    One connection, the job's, holds its lock (session-level) from the claim until its end
    is committed, and runs its publishing transaction: the lock is free only once that
    transaction is over, committed or rolled back (a dead connection's backend rolls back
    before it lets go of its locks).
    """
    if not job_dir(settings.uploads_dir, job_id).is_dir():
        # Another node's (or a finished) job: its spool is on the node that received it.
        log.warning("upload job %s: its spooled file is not in %s; only the process that "
                    "received it runs it", job_id, settings.uploads_dir)
        return False
    conn = engine.connect()
    try:
        conn.execute(_LOCK_JOB, {"lock": JOB_LOCK, "id": job_id})
        job = conn.execute(_CLAIM, {"id": job_id}).mappings().first()
        conn.commit()  # a session-level lock outlives the transaction
        return job is not None and _run_claimed(conn, engine, settings, dict(job))
    finally:
        _let_go(conn, job_id)


def _let_go(conn: Connection, job_id: str) -> None:
    """Release the job's lock. A connection that cannot is closed for good: back in the pool
    it would keep the lock, and the job would look alive for ever."""
    try:
        conn.rollback()
        conn.execute(_UNLOCK_JOB, {"lock": JOB_LOCK, "id": job_id})
        conn.commit()
    except Exception:
        conn.invalidate()
    finally:
        conn.close()


def _run_claimed(conn: Connection, engine: Engine, settings: Settings, job: dict) -> bool:
    job_id = job["id"]
    folder = None
    try:
        plan = JobPlan.from_row(job["params"])
        with conn.begin():
            _bound_statements(conn, settings.uploads.statement_timeout_s)
            conn.execute(text("SELECT set_config('client_connection_check_interval', :ms, "
                              "true)"), {"ms": str(CLIENT_CHECK_MS)})
            version = next_version(conn, job["layer_id"])
            # Recorded before any file exists, so recovery knows which folder to sweep.
            _set(engine, job_id, RUNNING, version=version, progress=5, step="reading")
            folder = version_dir(settings.uploads_dir, job["layer_id"], version)
            shutil.rmtree(folder, ignore_errors=True)  # left by a killed job, never published
            folder.mkdir(parents=True)
            built = _build(conn, engine, settings, job, plan, version, folder)
            _set(engine, job_id, RUNNING, progress=95, step="publishing")
            # In the publishing transaction: no node sees the version without its files.
            blobs.store_version(conn, job["layer_id"], version, folder)
            publish(conn, built, plan.title, job["action"] == "create",
                    owner_scope=plan.owner_scope, shared=plan.shared,
                    grace_s=blobs.drop_grace_s(settings))
            _succeed(conn, job_id, version, built.report)
        blobs.keep_published(engine, settings.uploads_dir, job["layer_id"], version, folder)
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


def _succeed(conn: Connection, job_id: str, version: int, report: dict) -> None:
    """In the publishing transaction; only a job still running (recovery at a lone start
    fails every unfinished job, even one a ``python -m layers.jobs`` runs) publishes."""
    marked = conn.execute(text(
        "UPDATE upload_jobs SET state = 'succeeded', progress = 100, step = 'published', "
        "report = CAST(:report AS jsonb), version = :version, updated_at = now() "
        "WHERE id = :id AND state = 'running'"),
        {"id": job_id, "version": version, "report": json.dumps(report, ensure_ascii=False)})
    if marked.rowcount != 1:
        raise RuntimeError(f"upload job {job_id} was failed by recovery while it ran")


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
    _set(engine, job_id, NOT_SUCCEEDED, state="failed", step="failed", reasons=reasons,
         report=report or {})


def _build(conn: Connection, engine: Engine, settings: Settings, job: dict, plan: JobPlan,
           version: int, folder: Path) -> Version:
    source = job_dir(settings.uploads_dir, job["id"]) / plan.main
    common = {"layer_id": job["layer_id"], "version": version, "kind": plan.kind,
              "source_file_name": job["file_name"], "source_datum": plan.datum.value,
              "created_by": job["created_by"]}

    def progress(percent: int, step: str) -> None:
        _set(engine, job["id"], RUNNING, progress=percent, step=step)

    if plan.format == "cityjson":  # 3D buildings, published as a vector layer of footprints
        return ingest_cityjson.build_version(conn, common, source, plan.source_crs, plan.datum,
                                             settings.uploads, progress)
    if plan.kind == "vector":
        return _build_vector(conn, settings, plan, source, common, progress)
    if plan.kind == "raster":
        return _build_raster(settings, source, plan.source_crs, plan.datum, folder, common,
                             progress)
    if plan.anchor is None:  # intake gives every 3D plan its anchor
        raise SourceError("a 3D model needs its anchor (lon=, lat=); upload it again")
    progress(20, "storing the model")
    stored = ingest_model.store_model(source, plan.format, folder, plan.anchor, plan.datum)
    report = {"model": stored["meta"]} | _far_outside(stored["bbox"], settings)
    return Version(**common, source_crs="EPSG:4326", source_crs_name="EPSG:4326",
                   geometry_type="Point", bbox=stored["bbox"], file_path=str(stored["path"]),
                   meta=stored["meta"], report=report)


def _build_raster(settings: Settings, source: Path, declared, datum: Datum, folder: Path,
                  common: dict, progress: Callable[[int, str], None]) -> Version:
    ingest_raster.check_raster(source, settings.uploads)
    facts = ingest_raster.to_cog(source, folder / "raster.tif", declared, datum, progress)
    meta = raster_meta(facts)
    report = {"raster": meta, "source_crs": facts["crs_name"], "datum": datum.value}
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


def _build_vector(conn: Connection, settings: Settings, plan: JobPlan, source: Path,
                  common: dict, progress: Callable[[int, str], None]) -> Version:
    limits, declared, datum = settings.uploads, plan.source_crs, plan.datum
    frame, crs, notes = ingest_vector.read_frame(source, plan.format, plan.layer, declared,
                                                 limits)
    # Impossible coordinates (NaN, beyond the CRS's range, swapped columns) refuse the file:
    # published, they would sit on the map somewhere absurd with only a warning.
    places = coordinates.Places.of(frame, plan.format, notes.get("coordinates"))
    coordinates.check_source(places, crs)
    progress(30, "reprojecting to EPSG:4326")
    frame = crs_mod.to_wgs84(frame, crs, datum)
    coordinates.check_reprojected(places, frame, crs)
    progress(45, "validating geometries")
    frame, geometry_type, report = ingest_vector.clean(frame)
    if frame.empty:
        raise SourceError("no feature is left after dropping empty or broken geometries: "
                          + "; ".join(report["dropped_reasons"]))
    report |= notes | {"features": len(frame), "source_crs": crs_mod.describe(crs),
                       "datum": datum.value,
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


# --- the runner ------------------------------------------------------------------------------

class JobRunner:
    """A small thread pool that runs queued jobs (``on_published`` refreshes the registry),
    and a thread that keeps this process's locks and, every REAP_EVERY_S, fails the jobs of
    dead processes, drops the versions whose grace is over and removes this node's copies
    of dropped ones (layers/blobs.py). ``local_files`` resolves this node's copies of
    uploaded files."""

    def __init__(self, engine: Engine, settings: Settings, on_published: Callable[[str], None],
                 alive: Connection | None = None):
        self._engine, self._settings, self._on_published = engine, settings, on_published
        # Holds ALIVE_LOCK and this process's OWNER_LOCK while it lives; None while the
        # database is away (the watcher takes them again).
        self._alive = alive
        self._pool = ThreadPoolExecutor(settings.uploads.workers,
                                        thread_name_prefix="twin-upload")
        self.local_files = blobs.LocalFiles(engine, settings.uploads_dir)
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="twin-upload-reaper",
                                         daemon=True)
        self._watcher.start()

    def submit(self, job_id: str, layer_id: str) -> None:
        self._pool.submit(self._run, job_id, layer_id)

    def _run(self, job_id: str, layer_id: str) -> None:
        if run_job(self._engine, self._settings, job_id):
            self._on_published(layer_id)

    def _watch(self) -> None:
        failing, backfilled = False, False
        while not self._stopping.wait(REAP_EVERY_S):
            try:
                self._keep_locks()
                if not backfilled:  # files of versions from before migration 0016
                    blobs.backfill(self._engine)
                    backfilled = True
                reap_dead_jobs(self._engine, self._settings.uploads_dir)
                blobs.drop_due(self._engine)
                blobs.sweep_local(self._engine, self._settings.uploads_dir,
                                  blobs.drop_grace_s(self._settings))
                failing = False
            except Exception as error:  # the loop outlives any one failure (database away)
                if not failing:  # once per outage, not every REAP_EVERY_S
                    log.warning("upload jobs: could not look for jobs of dead processes "
                                "(trying again every %g s): %s", REAP_EVERY_S, error)
                failing = True

    def _keep_locks(self) -> None:
        """Take this process's locks again, on a new connection, when theirs was lost."""
        if self._alive is not None:
            try:
                self._alive.execute(text("SELECT 1"))
                self._alive.rollback()
                return
            except DBAPIError:
                self._alive.invalidate()
                self._alive = None
        self._alive = hold_process_locks(self._engine)

    def shutdown(self) -> None:
        self._stopping.set()
        self._watcher.join(timeout=10)
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._alive is not None:
            self._alive.invalidate()
        self._engine.dispose()


async def start_runner(settings: Settings, on_published: Callable[[str], None]) -> JobRunner:
    """The app's job runner, after failing what a killed server (or worker) left, if the
    database answers."""
    engine = sync_engine(settings)
    alive = None
    try:
        alive = await asyncio.to_thread(start_process_locks, engine, settings.uploads_dir)
    except DBAPIError as error:
        # The app starts without its database (/healthz says 503) or before its migrations;
        # the runner's watcher takes its locks and looks for dead jobs once it answers.
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

"""Which upload jobs are alive, asked of PostgreSQL rather than of any process.

``twin serve`` runs several worker processes and uvicorn restarts one that dies, so a job's
process may be gone while its siblings live. The connection that runs a job holds a session
advisory lock keyed by the job (``JOB_LOCK``) from the moment it claims it until its end is
committed, and each process holds a lock keyed by a token of its own (``OWNER_LOCK``),
recorded on the jobs it queues. A lock is let go when its connection dies, which is also when
the job's transaction can no longer commit.

``reap_dead_jobs`` (at start-up, every ``REAP_EVERY_S`` in every process, and when
GET /jobs/{id} reads an unfinished job) fails a running job whose lock it can take
(interrupted) and a queued job whose owner's lock it can take (never ran), and sweeps their
folders. ``recover_interrupted`` fails every unfinished job at a start with no other server
process alive (``ALIVE_LOCK``; rows from before the locks, or inserted by hand, included).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from layers.versions import job_dir, version_dir

log = logging.getLogger("twin.uploads")

INTERRUPTED = "the server stopped while this job was running; nothing was published"
NEVER_RAN = "the server stopped before this job ran; nothing was published, upload again"
# Advisory locks of two int4 keys (apart from ALIVE_LOCK's single bigint): a namespace, then
# hashtext(job id) for the lock of the connection running a job, or the token of the process
# that queued it (``process_owner``).
JOB_LOCK = 0x74776A62  # "twjb"
OWNER_LOCK = 0x74776F77  # "twow"
# How often every process looks for the jobs of dead ones (GET /jobs/{id} looks at once).
REAP_EVERY_S = 5.0
_process: tuple[int, int] = (0, 0)
_process_lock = threading.Lock()


def process_owner() -> int:
    """This process's token, the key of its OWNER_LOCK (a forked child gets one of its own)."""
    global _process
    with _process_lock:
        if _process[0] != os.getpid():
            _process = (os.getpid(), secrets.randbelow(2**31 - 2) + 1)
        return _process[1]



_FAILED = """
           reasons = CASE j.state WHEN 'running' THEN CAST(:interrupted AS jsonb)
                                  ELSE CAST(:never_ran AS jsonb) END
"""
_RETURNING = """
 RETURNING j.id, j.layer_id, j.version,
           EXISTS (SELECT 1 FROM layer_versions AS v
                    WHERE v.layer_id = j.layer_id AND v.version = j.version) AS published
"""

# The unfinished jobs nobody runs: a running one whose lock this transaction can take, a
# queued one whose owner's lock it can take (held shared by every live runner of that
# process); layers/jobs.py marks both in the row's params.runner. The locks are kept until
# the commit; the CTE is a fence, so only unfinished jobs' locks are tried. A job is failed
# only in the state it was judged dead in.
_DEAD = text("""
    WITH unfinished AS MATERIALIZED (
        SELECT id, state, params #>> '{runner,claimed}' IS NOT NULL AS locked,
               CAST(params #>> '{runner,owner}' AS integer) AS owner
          FROM upload_jobs
         WHERE state IN ('queued', 'running') AND id = COALESCE(CAST(:id AS varchar), id))
    SELECT id, state FROM unfinished
     WHERE CASE WHEN state = 'running' AND locked
                THEN pg_try_advisory_xact_lock(CAST(:job_lock AS integer), hashtext(id))
                WHEN state = 'queued' AND owner IS NOT NULL
                THEN pg_try_advisory_xact_lock(CAST(:owner_lock AS integer), owner)
                ELSE false END
""")

# A statement of its own, so its snapshot is younger than the locks: a job that committed
# its success just before letting go of its lock is seen succeeded, and left alone.
_FAIL_DEAD = text(f"""
    UPDATE upload_jobs AS j
       SET state = 'failed', step = 'failed', updated_at = now(), {_FAILED}
     WHERE (j.state = 'running' AND j.id = ANY(:running))
        OR (j.state = 'queued' AND j.id = ANY(:queued))
    {_RETURNING}
""")

_FAIL_LEFTOVERS = text(f"""
    UPDATE upload_jobs AS j
       SET state = 'failed', step = 'failed', updated_at = now(), {_FAILED}
     WHERE j.state IN ('queued', 'running')
    {_RETURNING}
""")

_REASONS = {"interrupted": json.dumps([INTERRUPTED]), "never_ran": json.dumps([NEVER_RAN])}


def _dead_params(job_id: str | None) -> dict:
    return {"id": job_id, "job_lock": JOB_LOCK, "owner_lock": OWNER_LOCK}


def _fail_params(dead: Sequence) -> dict:
    return {"running": [job_id for job_id, state in dead if state == "running"],
            "queued": [job_id for job_id, state in dead if state == "queued"], **_REASONS}


def _sweep(uploads_dir: Path, failed: Sequence) -> None:
    """Remove the folders failed jobs own: their spool folder and the folder of the version
    they were building, unless it got published; never a sweep of the whole tree. Done before
    the failure commits: until then no new job of the layer can start (one unfinished job
    per layer) and make the same version folder."""
    for job_id, layer_id, version, published in failed:
        shutil.rmtree(job_dir(uploads_dir, job_id), ignore_errors=True)
        if version is not None and not published:
            shutil.rmtree(version_dir(uploads_dir, layer_id, version), ignore_errors=True)


def reap_dead_jobs(engine: Engine, uploads_dir: Path, job_id: str | None = None) -> list[str]:
    """Fail the unfinished jobs (or the one ``job_id``) whose process is gone, and remove
    their files; safe at any time in any process."""
    with engine.begin() as conn:
        dead = conn.execute(_DEAD, _dead_params(job_id)).all()
        failed = conn.execute(_FAIL_DEAD, _fail_params(dead)).all() if dead else []
        _sweep(uploads_dir, failed)
    if failed:
        log.warning("marked %d upload jobs of dead processes failed", len(failed))
    return [row[0] for row in failed]


async def reap_if_dead(conn: AsyncConnection, job_id: str, uploads_dir: Path) -> bool:
    """``reap_dead_jobs`` for one job, on the API's connection (its transaction commits):
    whoever polls a job learns that its process died at once."""
    dead = (await conn.execute(_DEAD, _dead_params(job_id))).all()
    failed = (await conn.execute(_FAIL_DEAD, _fail_params(dead))).all() if dead else []
    await asyncio.to_thread(_sweep, uploads_dir, failed)
    await conn.commit()
    if failed:
        log.warning("marked upload job %s of a dead process failed", job_id)
    return bool(failed)


def recover_interrupted(engine: Engine, uploads_dir: Path) -> list[str]:
    """Fail every job a stopped server left queued or running, and remove their files: for a
    start with no other server process alive (see ``_recover_if_alone``)."""
    with engine.begin() as conn:
        failed = conn.execute(_FAIL_LEFTOVERS, _REASONS).all()
        _sweep(uploads_dir, failed)
    if failed:
        log.warning("marked %d interrupted upload jobs failed", len(failed))
    return [row[0] for row in failed]


# Held (shared) by every live server process. A starting one fails every unfinished job
# (``recover_interrupted``: rows without the locks that ``reap_dead_jobs`` asks, too) only
# when it can take this lock exclusively: when no other process is alive.
ALIVE_LOCK = 0x7477696E_6A6F6273  # "twinjobs"


# A killed server's database sessions end a moment after it (PostgreSQL notices the closed
# socket); a restart may come sooner, so the exclusive lock is tried for this long.
ALIVE_WAIT_S = 2.0

_LOCK_OWNER = text("SELECT pg_advisory_lock_shared(CAST(:lock AS integer), "
                   "CAST(:owner AS integer))")


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


def hold_process_locks(engine: Engine, conn: Connection | None = None) -> Connection:
    """This process's OWNER_LOCK (and ALIVE_LOCK, on a new connection) for as long as it
    lives."""
    fresh = conn is None
    if conn is None:
        conn = engine.connect()
    try:
        if fresh:
            conn.execute(text("SELECT pg_advisory_lock_shared(:key)"), {"key": ALIVE_LOCK})
        conn.execute(_LOCK_OWNER, {"lock": OWNER_LOCK, "owner": process_owner()})
        conn.commit()
    except BaseException:
        conn.invalidate()
        raise
    return conn


def start_process_locks(engine: Engine, uploads_dir: Path) -> Connection:
    alive = hold_process_locks(engine, _recover_if_alone(engine, uploads_dir))
    try:
        reap_dead_jobs(engine, uploads_dir)  # e.g. a worker replacing a dead one: its jobs
    except DBAPIError as error:
        log.warning("could not look for upload jobs of dead processes: %s", error.orig)
    return alive

"""One worker process of ``twin serve`` dies (SIGKILL) while its sibling lives: the jobs it
ran or held in its queue are failed (interrupted / never ran) within seconds, seen through
GET /jobs/{id} without restarting the server; nothing of them is left (no layer, version,
table or folder) and the same uploads then succeed. A job running in a live process is never
failed, however often every process looks. Which process runs a job is read from the
operating system (/proc: the owner of the socket its upload arrived on); the oracle for a
retried layer is the generated file's own row count and extent.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlalchemy import Engine, create_engine, text

from layers.job_liveness import (
    _FAIL_DEAD,
    INTERRUPTED,
    JOB_LOCK,
    NEVER_RAN,
    OWNER_LOCK,
    REAP_EVERY_S,
    _fail_params,
    process_owner,
    reap_dead_jobs,
)
from layers.jobs import create_job, start_runner
from layers.versions import job_dir, version_dir
from tests.servers import EDITOR, ServerProcess, sibling_database
from tests.uploads import points_csv, poll_job
from tests.workers import descendants, one_per_worker, owner, socket_inode
from twin.core.db import async_engine
from twin.core.settings import Settings, UploadSettings

BIG, SMALL = "dead_worker_big", "dead_worker_small"
POINTS = 200_000


@pytest.fixture(scope="module")
def big() -> tuple[bytes, np.ndarray]:
    return points_csv(POINTS, seed=11)


@pytest.fixture(scope="module")
def own_db(database_url: str) -> Iterator[tuple[str, Engine]]:
    """A database of this module's own: a server of the suite on the shared one would fail a
    dead worker's job too, but sweep its own uploads folder, not this test's."""
    with sibling_database(database_url, "deadjobs") as url:
        engine = create_engine(url)
        yield url, engine
        engine.dispose()


@pytest.fixture()
def uploads(tmp_path: Path) -> Path:
    return tmp_path / "uploads"


@pytest.fixture()
def two_workers(own_db, uploads: Path, monkeypatch) -> Iterator[ServerProcess]:
    """``twin serve`` with two worker processes, one ingestion thread each (a second upload
    to a worker waits in its queue)."""
    monkeypatch.setenv("TWIN_WORKERS", "2")
    monkeypatch.setenv("TWIN_UPLOADS_WORKERS", "1")
    monkeypatch.setenv("TWIN_UPLOADS_DIR", str(uploads))
    with ServerProcess(own_db[0]) as server:
        yield server


class Pinned:
    """One HTTP connection, so every request on it reaches the same worker process;
    ``worker`` is that process (known once it has answered; checked at every answer)."""

    def __init__(self, server: ServerProcess):
        self.server = server
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        self.conn.connect()
        self.worker: int | None = None

    def send(self, request: httpx.Request) -> tuple[int, dict]:
        self.conn.request(request.method, request.url.raw_path.decode(), body=request.read(),
                          headers=dict(request.headers))
        response = self.conn.getresponse()
        body = json.loads(response.read())
        inode = socket_inode(self.server.port, self.conn.sock.getsockname()[1])
        answered = owner(descendants(self.server.process.pid), inode)
        assert self.worker in (None, answered), "the connection moved to another worker"
        self.worker = answered
        return response.status, body

    def upload(self, layer_id: str, content: bytes) -> dict:
        status, job = self.send(upload_request(self.server.url, layer_id, content))
        assert status == 202, job
        return job

    def close(self) -> None:
        self.conn.close()


def upload_request(url: str, layer_id: str, content: bytes) -> httpx.Request:
    return httpx.Request("POST", f"{url}/layers", headers=EDITOR,
                         files={"file": (f"{layer_id}.csv", content)},
                         data={"title": layer_id, "id": layer_id})


def job_row(engine: Engine, job_id: str) -> dict:
    with engine.connect() as conn:
        return dict(conn.execute(text("SELECT state, step, reasons FROM upload_jobs "
                                      "WHERE id = :id"), {"id": job_id}).mappings().one())


def wait_for_step(engine: Engine, job_id: str, step: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while (seen := job_row(engine, job_id)["step"]) != step:
        assert seen not in ("published", "failed"), f"job reached {seen!r} first"
        assert time.monotonic() < deadline, f"job never reached {step!r} (at {seen!r})"
        time.sleep(0.02)


def leftovers(engine: Engine, uploads: Path, layer_id: str, job_ids: list[str]) -> dict:
    with engine.connect() as conn:
        facts = dict(conn.execute(text(
            "SELECT (SELECT count(*) FROM layers WHERE id = :id) AS layers, "
            "(SELECT count(*) FROM layer_versions WHERE layer_id = :id) AS versions, "
            "(SELECT count(*) FROM pg_tables WHERE tablename LIKE :tables) AS tables"),
            {"id": layer_id, "tables": f"upload_{layer_id}%"}).mappings().one())
    folders = [str(p.relative_to(uploads)) for p in (uploads / "layers" / layer_id).glob("v*")]
    folders += [f"jobs/{j}" for j in job_ids if job_dir(uploads, j).exists()]
    return facts | {"folders": folders}


NOTHING = {"layers": 0, "versions": 0, "tables": 0, "folders": []}


def test_a_killed_worker_s_jobs_fail_and_retries_succeed(two_workers: ServerProcess, own_db,
                                                          uploads: Path, big):
    server, engine = two_workers, own_db[1]
    content, points = big
    small, _ = points_csv(25, seed=12)
    pinned = Pinned(server)
    running = pinned.upload(BIG, content)
    queued = pinned.upload(SMALL, small)  # behind the big one, in the same worker's queue
    victim = pinned.worker
    sibling = descendants(server.process.pid) - {victim}
    # Mid-transaction: the version's table is being written, nothing committed yet.
    wait_for_step(engine, running["id"], "writing the table")
    assert job_row(engine, queued["id"])["state"] == "queued"
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)

    failed = poll_job(server.url, running["id"], 15, EDITOR)
    seconds = time.monotonic() - killed_at
    print(f"\nkilled worker's running job reported failed {seconds:.2f} s after the kill")
    assert failed["state"] == "failed" and failed["reasons"] == [INTERRUPTED], failed
    assert seconds < 15
    never_ran = poll_job(server.url, queued["id"], 15, EDITOR)
    assert never_ran["state"] == "failed" and never_ran["reasons"] == [NEVER_RAN], never_ran
    # The server was not restarted: the same supervisor, the sibling still serving.
    assert server.process.poll() is None and sibling <= descendants(server.process.pid)
    assert leftovers(engine, uploads, BIG, [running["id"]]) == NOTHING
    assert leftovers(engine, uploads, SMALL, [queued["id"]]) == NOTHING
    assert httpx.get(f"{server.url}/layers/{BIG}", headers=EDITOR).status_code == 404

    for layer_id, data in ((BIG, content), (SMALL, small)):
        with httpx.Client(timeout=60) as http:
            response = http.send(upload_request(server.url, layer_id, data))
        assert response.status_code == 202, response.text
        assert poll_job(server.url, response.json()["id"], 180, EDITOR)["state"] == "succeeded"
    layer = httpx.get(f"{server.url}/layers/{BIG}", headers=EDITOR).json()
    assert layer["feature_count"] == POINTS and layer["current_version"] == 1
    assert layer["bbox"] == pytest.approx([*points.min(axis=0), *points.max(axis=0)], abs=1e-6)
    with engine.connect() as conn:
        assert conn.execute(text(f'SELECT count(*) FROM "upload_{BIG}_v1"')).scalar() == POINTS
    for layer_id in (BIG, SMALL):
        assert httpx.delete(f"{server.url}/layers/{layer_id}", headers=EDITOR).status_code == 204


def one_pinned_to_each_worker(server: ServerProcess) -> dict[int, Pinned]:
    """A kept-alive connection to each worker process (tests/workers.py: new connections
    until both have answered, bounded in time, since which one accepts is the kernel's choice
    and on a busy machine one worker can take hundreds in a row)."""
    def answered() -> Pinned:
        fresh = Pinned(server)
        assert fresh.send(httpx.Request("GET", f"{server.url}/healthz"))[0] == 200
        return fresh

    return one_per_worker(server, answered)


def test_a_live_sibling_s_job_is_never_failed(two_workers: ServerProcess, own_db,
                                              uploads: Path, big):
    """Every look there is, as often as possible, for the whole life of a job: GET
    /jobs/{id} answered by the worker running it and by its sibling in turn, and a reaper in
    this test's own process."""
    server, engine = two_workers, own_db[1]
    pinned = one_pinned_to_each_worker(server)
    runs_it = next(iter(pinned))
    job = pinned[runs_it].upload(BIG, big[0])
    looks = dict.fromkeys(pinned, 0)
    state = "queued"
    while state != "succeeded":
        for worker, conn in pinned.items():
            assert reap_dead_jobs(engine, uploads) == []
            status, seen = conn.send(httpx.Request("GET", f"{server.url}/jobs/{job['id']}",
                                                   headers=EDITOR))
            assert status == 200 and seen["state"] != "failed", seen
            looks[worker] += 1
            state = seen["state"]
    print(f"\nlooks while the job ran, by worker: {looks}")
    assert min(looks.values()) >= 10, looks
    for conn in pinned.values():
        conn.close()
    layer = httpx.get(f"{server.url}/layers/{BIG}", headers=EDITOR).json()
    assert layer["feature_count"] == POINTS
    assert httpx.delete(f"{server.url}/layers/{BIG}", headers=EDITOR).status_code == 204


# --- the liveness signals, one at a time ---------------------------------------------------

# The mark a runner puts on the row of a job it claimed (layers/jobs.py, _CLAIM).
CLAIMED = {"runner": {"claimed": True}}


def insert_job(engine: Engine, state: str, params: dict, version: int | None = None) -> str:
    job_id = uuid.uuid4().hex
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO upload_jobs (id, layer_id, action, state, progress, step, reasons, "
            "report, params, file_name, version, created_by) VALUES (:id, :layer, 'create', "
            ":state, 50, 'writing the table', '[]', '{}', CAST(:params AS jsonb), 'x.csv', "
            ":version, 'test')"),
            {"id": job_id, "layer": f"probe_{job_id[:8]}", "state": state,
             "params": json.dumps(params), "version": version})
    return job_id


def hold(engine: Engine, sql: str, **keys):
    """A connection holding a session-level lock, as a live process's does."""
    conn = engine.connect()
    conn.execute(text(sql), keys)
    conn.commit()
    return conn


def reap_once_gone(engine: Engine, uploads: Path) -> list[str]:
    """Reaps until a job is failed: a closed connection's backend (and its locks) ends a
    moment after the socket closes."""
    deadline = time.monotonic() + 5
    while not (failed := reap_dead_jobs(engine, uploads)):
        assert time.monotonic() < deadline, "nothing was reaped"
        time.sleep(0.05)
    return failed


def test_a_running_job_fails_once_its_lock_is_free_and_only_its_folders_go(own_db,
                                                                             uploads: Path):
    engine = own_db[1]
    job_id = insert_job(engine, "running", CLAIMED, version=1)
    layer_id = f"probe_{job_id[:8]}"
    spool, version = job_dir(uploads, job_id), version_dir(uploads, layer_id, 1)
    other = version_dir(uploads, layer_id, 2)  # not this job's
    for folder in (spool, version, other):
        folder.mkdir(parents=True)
    unmarked = insert_job(engine, "running", {})  # from before the locks: left to restarts
    lock = hold(engine, "SELECT pg_advisory_lock(CAST(:ns AS integer), hashtext(:id))",
                ns=JOB_LOCK, id=job_id)
    try:
        for _ in range(20):
            assert reap_dead_jobs(engine, uploads) == []
        assert job_row(engine, job_id)["state"] == "running" and spool.exists()
    finally:
        lock.invalidate()  # the process dies: its connection, and the lock, with it
    assert reap_once_gone(engine, uploads) == [job_id]
    assert job_row(engine, job_id) == {"state": "failed", "step": "failed",
                                       "reasons": [INTERRUPTED]}
    assert not spool.exists() and not version.exists() and other.exists()
    assert job_row(engine, unmarked)["state"] == "running"


def test_a_failure_never_overwrites_a_committed_success(own_db):
    """A reaper that judged the job dead on a stale view waits for the job's row and then
    sees its success."""
    engine = own_db[1]
    job_id = insert_job(engine, "running", CLAIMED)
    results: list = []
    with engine.connect() as job:
        job.execute(text("UPDATE upload_jobs SET state = 'succeeded' WHERE id = :id"),
                    {"id": job_id})

        def reap() -> None:
            with engine.begin() as conn:
                results.extend(conn.execute(_FAIL_DEAD,
                                            _fail_params([(job_id, "running")])).all())

        reaper = threading.Thread(target=reap)
        reaper.start()
        reaper.join(timeout=1)
        assert reaper.is_alive()  # waiting for the job's transaction
        job.commit()
    reaper.join(timeout=10)
    assert results == [] and job_row(engine, job_id)["state"] == "succeeded"


async def queue(url: str, job_id: str) -> None:
    """As POST /layers does, on the API's kind of connection."""
    engine = async_engine(Settings(database_url=url))
    try:
        async with engine.connect() as conn:
            await create_job(conn, job_id, f"probe_{job_id[:8]}", "create", "x.csv", None,
                             "test")
    finally:
        await engine.dispose()


def test_a_queued_job_fails_when_the_process_that_queued_it_is_gone(own_db, uploads: Path):
    url, engine = own_db
    owned, unowned = uuid.uuid4().hex, uuid.uuid4().hex
    lock = hold(engine, "SELECT pg_advisory_lock_shared(CAST(:ns AS integer), "
                "CAST(:token AS integer))", ns=OWNER_LOCK, token=process_owner())
    try:
        asyncio.run(queue(url, owned))
        job_dir(uploads, owned).mkdir(parents=True)
        for _ in range(20):
            assert reap_dead_jobs(engine, uploads) == []
    finally:
        lock.invalidate()
    asyncio.run(queue(url, unowned))  # queued while this process held no lock: no owner
    assert reap_once_gone(engine, uploads) == [owned]
    assert job_row(engine, owned)["reasons"] == [NEVER_RAN]
    assert not job_dir(uploads, owned).exists()
    assert job_row(engine, unowned)["state"] == "queued"


def owner_lock_holders(engine: Engine) -> list[int]:
    """The backends holding this process's lock on this database (a server of the suite, in
    this process too, holds it on the shared one)."""
    with engine.connect() as conn:
        return conn.execute(text(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND objsubid = 2 AND classid = CAST(:ns AS oid) AND objid = CAST(:token AS oid) "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"),
            {"ns": OWNER_LOCK, "token": process_owner()}).scalars().all()


def test_a_runner_takes_its_lock_again_after_losing_its_connection(own_db, uploads: Path):
    """The database ended the connection that held this process's lock (a restart, an
    administrator): the runner's watcher takes it again, so what the process queues next is
    recorded as its own."""
    url, engine = own_db
    settings = Settings(database_url=url, uploads=UploadSettings(dir=uploads))
    runner = asyncio.run(start_runner(settings, lambda layer_id: None))
    try:
        [first] = owner_lock_holders(engine)
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": first})
        # pg_terminate_backend only signals: the backend (and its lock) ends a moment later.
        deadline = time.monotonic() + 3 * REAP_EVERY_S
        while (holders := owner_lock_holders(engine)) in ([], [first]):
            assert time.monotonic() < deadline, "the lock was never taken again"
            time.sleep(0.1)
        assert len(holders) == 1
    finally:
        runner.shutdown()
    deadline = time.monotonic() + 5  # (the closed connection's backend ends a moment later)
    while owner_lock_holders(engine):
        assert time.monotonic() < deadline, "the lock outlived the runner"
        time.sleep(0.05)

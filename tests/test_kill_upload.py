"""SIGKILL the server in the middle of an upload, start it again: nothing of the upload is
left (no table, no layer, no version, no files), the job says it failed and why, and the same
upload then succeeds. Oracle for the retry: the generated file's own row count and extent."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from sqlalchemy import Engine, create_engine, text

from tests.servers import ServerProcess, sibling_database
from tests.uploads import points_csv, poll_job

KEY = "kill-upload-editor-key-0123456789"
EDITOR = {"Authorization": f"Bearer {KEY}"}
LAYER = "killed_upload"
POINTS = 200_000


@pytest.fixture(scope="module")
def big_csv() -> tuple[bytes, np.ndarray]:
    return points_csv(POINTS, seed=7)


@pytest.fixture()
def own_db(database_url: str) -> Iterator[tuple[str, Engine]]:
    """A database of this test's own: a starting server fails the jobs left 'running' only
    when no other server process is alive on its database (layers/jobs.py), and the suite
    keeps servers alive on the shared one."""
    with sibling_database(database_url, "kill") as url:
        engine = create_engine(url)
        yield url, engine
        engine.dispose()


@pytest.fixture()
def editor_env(monkeypatch, tmp_path):
    """``twin serve`` reads its settings from the environment: a gis-editor key and uploads
    folder of this test's own."""
    uploads = tmp_path / "uploads"
    monkeypatch.setenv("TWIN_AUTH_KEYS", json.dumps({KEY: "gis-editor:kill-test"}))
    monkeypatch.setenv("TWIN_UPLOADS_DIR", str(uploads))
    return uploads


def upload(base_url: str, content: bytes) -> dict:
    response = httpx.post(f"{base_url}/layers", headers=EDITOR, timeout=60,
                          files={"file": ("points.csv", content)},
                          data={"title": "killed upload", "id": LAYER})
    assert response.status_code == 202, response.text
    return response.json()


def job_step(engine: Engine, job_id: str) -> str | None:
    with engine.connect() as conn:
        return conn.execute(text("SELECT step FROM upload_jobs WHERE id = :id"),
                            {"id": job_id}).scalar()


def wait_for_step(engine: Engine, job_id: str, step: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (seen := job_step(engine, job_id)) != step:
        assert seen not in ("published", "failed"), f"job reached {seen!r} before the kill"
        assert time.monotonic() < deadline, f"job never reached {step!r} (at {seen!r})"
        time.sleep(0.02)


def leftovers(engine: Engine) -> dict:
    with engine.connect() as conn:
        return {
            "tables": conn.execute(text(
                "SELECT tablename FROM pg_tables WHERE tablename LIKE :p"),
                {"p": f"upload_{LAYER}%"}).scalars().all(),
            "layers": conn.execute(text("SELECT count(*) FROM layers WHERE id = :id"),
                                   {"id": LAYER}).scalar(),
            "versions": conn.execute(text(
                "SELECT count(*) FROM layer_versions WHERE layer_id = :id"),
                {"id": LAYER}).scalar(),
        }


def test_server_killed_mid_upload(own_db, editor_env, big_csv):
    database_url, engine = own_db
    content, points = big_csv
    with ServerProcess(database_url) as first:
        job = upload(first.url, content)
        # Mid-transaction: the version's table is being written, nothing committed yet.
        wait_for_step(engine, job["id"], "writing the table")
        first.process.kill()
        first.process.wait()
    assert job_step(engine, job["id"]) == "writing the table"  # nobody could mark it
    assert leftovers(engine) == {"tables": [], "layers": 0, "versions": 0}

    with ServerProcess(database_url) as second:
        failed = httpx.get(f"{second.url}/jobs/{job['id']}", headers=EDITOR).json()
        assert failed["state"] == "failed", failed
        assert "server stopped" in failed["reasons"][0]
        assert "nothing was published" in failed["reasons"][0]
        assert leftovers(engine) == {"tables": [], "layers": 0, "versions": 0}
        assert not (editor_env / "jobs" / job["id"]).exists()
        assert not any((editor_env / "layers" / LAYER).glob("v*"))
        assert httpx.get(f"{second.url}/layers/{LAYER}", headers=EDITOR).status_code == 404

        retried = poll_job(second.url, upload(second.url, content)["id"], 120, EDITOR)
        assert retried["state"] == "succeeded", retried
        layer = httpx.get(f"{second.url}/layers/{LAYER}", headers=EDITOR).json()
    assert layer["feature_count"] == POINTS and layer["current_version"] == 1
    assert layer["bbox"] == pytest.approx([*points.min(axis=0), *points.max(axis=0)], abs=1e-6)
    assert leftovers(engine) == {"tables": [f"upload_{LAYER}_v1"], "layers": 1, "versions": 1}
    with engine.connect() as conn:
        assert conn.execute(text(f'SELECT count(*) FROM "upload_{LAYER}_v1"')).scalar() == POINTS

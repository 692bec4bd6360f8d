"""Versions: a new version changes the tiles at once, a rollback restores them, a failed or
killed upload leaves nothing behind and the previous version serving; keys and roles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import mapbox_vector_tile
import morecantile
import pytest
from sqlalchemy import Engine, text

from layers.intake import prepare, stored_name
from layers.job_liveness import recover_interrupted
from layers.plan import FORM_FIELDS, UploadForm
from layers.versions import job_dir
from tests.uploads import (
    EDITOR,
    LIMITS,
    PLACES,
    VIEWER,
    geojson_points,
    put_layer,
    upload_ok,
    wait,
)

# The upload server and its client (fixtures shared by the upload tests).


TMS = morecantile.tms.get("WebMercatorQuad")
TILE = TMS.tile(*PLACES[0], 12)
V2_PLACES = [(106.5300, 29.5400), (106.5310, 29.5410)]


def tile_of(api, layer_id: str) -> tuple[str, set[str]]:
    response = api.get(f"/tiles/{layer_id}/{TILE.z}/{TILE.x}/{TILE.y}.mvt")
    assert response.status_code == 200
    decoded = mapbox_vector_tile.decode(response.content).get(layer_id, {"features": []})
    return response.headers["etag"], {f["properties"]["name"] for f in decoded["features"]}


def tables(engine: Engine, layer_id: str) -> list[str]:
    with engine.connect() as conn:
        return conn.execute(text("SELECT tablename FROM pg_tables WHERE tablename LIKE :p "
                                 "ORDER BY 1"), {"p": f"upload_{layer_id}_v%"}).scalars().all()


@pytest.fixture()
def published(api) -> str:
    """A fresh layer at version 1 (three named points in TILE)."""
    job = upload_ok(api, "v1.geojson", geojson_points(), title="versioned")
    return job["layer_id"]


def test_new_version_changes_tiles_and_rollback_restores_them(api, published, engine):
    etag1, names1 = tile_of(api, published)
    assert names1 == {"解放碑", "朝天门", "重庆大剧院"}
    response = put_layer(api, published, "v2.geojson",
                         geojson_points(V2_PLACES, ["新甲", "新乙"]))
    assert response.status_code == 202
    assert wait(api, response.json())["state"] == "succeeded"
    etag2, names2 = tile_of(api, published)
    assert names2 == {"新甲", "新乙"} and etag2 != etag1
    layer = api.get(f"/layers/{published}").json()
    assert layer["current_version"] == 2 and [v["version"] for v in layer["versions"]] == [1, 2]
    assert api.get(f"/collections/{published}").json()["featureCount"] == 2
    assert tables(engine, published) == [f"upload_{published}_v1", f"upload_{published}_v2"]

    rolled = api.post(f"/layers/{published}/rollback", json={"version": 1}, headers=EDITOR)
    assert rolled.status_code == 200 and rolled.json()["previous_version"] == 2
    etag3, names3 = tile_of(api, published)
    assert names3 == names1 and etag3 not in (etag1, etag2)
    assert api.get(f"/layers/{published}").json()["current_version"] == 1
    bad = api.post(f"/layers/{published}/rollback", params={"version": 7}, headers=EDITOR)
    assert bad.status_code == 400 and "1, 2" in bad.json()["description"]


def test_failed_new_version_leaves_the_old_one_serving(api, published, engine, uploads_dir):
    etag1, names1 = tile_of(api, published)
    response = put_layer(api, published, "broken.csv", b"name,lon,lat\na,106.5,x\n")
    job = wait(api, response.json())
    assert job["state"] == "failed" and "non-numeric" in job["reasons"][0]
    assert tile_of(api, published) == (etag1, names1)
    assert api.get(f"/layers/{published}").json()["current_version"] == 1
    assert tables(engine, published) == [f"upload_{published}_v1"]
    assert not (uploads_dir / "layers" / published / "v2").exists()
    assert not (uploads_dir / "jobs" / job["id"]).exists()


def test_killed_job_leaves_nothing_behind(api, published, engine, database_url, uploads_dir):
    """Kill -9 a job process while it holds its version table, uncommitted; then start-up
    recovery. The old version keeps serving throughout."""
    etag1, names1 = tile_of(api, published)
    with engine.connect() as lock:
        # Hold the layer's row so the job stops at its publishing step, table written.
        lock.execute(text("SELECT 1 FROM layers WHERE id = :id FOR UPDATE"), {"id": published})
        response = _queue_directly(engine, uploads_dir, published)
        env = {**os.environ, "TWIN_DATABASE_URL": database_url,
               "TWIN_UPLOADS_DIR": str(uploads_dir)}
        worker = subprocess.Popen([sys.executable, "-m", "layers.jobs", response],
                                  env=env, cwd=os.getcwd())
        _wait_for_step(engine, response, "publishing")
        assert (uploads_dir / "layers" / published / "v2").exists()
        # While the new version waits to publish, the old one serves.
        assert tile_of(api, published) == (etag1, names1)
        worker.kill()
        worker.wait()
        lock.rollback()
    assert tile_of(api, published) == (etag1, names1)
    recover_interrupted(engine, uploads_dir)
    job = api.get(f"/jobs/{response}").json()
    assert job["state"] == "failed" and "server stopped" in job["reasons"][0]
    assert tables(engine, published) == [f"upload_{published}_v1"]
    assert not (uploads_dir / "layers" / published / "v2").exists()
    assert not (uploads_dir / "jobs" / response).exists()
    assert api.get(f"/layers/{published}").json()["current_version"] == 1


def _queue_directly(engine: Engine, uploads_dir, layer_id: str) -> str:
    """Queue a PUT job the way the route does, but for a worker process of our own."""
    job_id = uuid.uuid4().hex
    folder = job_dir(uploads_dir, job_id)
    folder.mkdir(parents=True)
    (folder / stored_name("v2.geojson")).write_bytes(geojson_points(V2_PLACES, ["甲", "乙"]))
    plan = prepare(folder, "v2.geojson", UploadForm.parse(dict.fromkeys(FORM_FIELDS)), LIMITS)
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO upload_jobs (id, layer_id, action, state, progress, step, reasons, "
            "report, params, file_name, created_by) VALUES (:id, :layer, 'replace', 'queued', "
            "0, 'queued', '[]', '{}', CAST(:params AS jsonb), 'v2.geojson', 'test')"),
            {"id": job_id, "layer": layer_id, "params": json.dumps(plan.to_row())})
    return job_id


def _wait_for_step(engine: Engine, job_id: str, step: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            if conn.execute(text("SELECT step FROM upload_jobs WHERE id = :id"),
                            {"id": job_id}).scalar() == step:
                return
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {step!r}")


def test_concurrent_uploads_of_one_layer_one_wins(api, published, engine):
    with engine.connect() as lock:
        lock.execute(text("SELECT 1 FROM layers WHERE id = :id FOR UPDATE"), {"id": published})
        first = put_layer(api, published, "v2.geojson", geojson_points(V2_PLACES, ["甲", "乙"]))
        second = put_layer(api, published, "v3.geojson", geojson_points())
        assert first.status_code == 202
        assert second.status_code == 409 and "in progress" in second.json()["description"]
        assert api.delete(f"/layers/{published}", headers=EDITOR).status_code == 409
        lock.rollback()
    assert wait(api, first.json())["state"] == "succeeded"


def test_delete_removes_tables_files_and_the_layer(api, published, engine, uploads_dir):
    response = put_layer(api, published, "v2.geojson", geojson_points())
    assert wait(api, response.json())["state"] == "succeeded"
    assert api.delete(f"/layers/{published}", headers=EDITOR).status_code == 204
    assert api.get(f"/layers/{published}").status_code == 404
    assert api.get(f"/collections/{published}").status_code == 404
    assert tables(engine, published) == []
    assert not (uploads_dir / "layers" / published).exists()


def test_a_layer_uploaded_again_under_a_deleted_id_never_repeats_its_versions(api, engine):
    """Caches and other workers' registries tell layers apart by (id, data version): a new
    layer under a deleted one's id must not start where the deleted one stood."""
    layer_id = f"again_{uuid.uuid4().hex[:8]}"

    def data_version() -> int:
        with engine.connect() as conn:
            return conn.execute(text("SELECT data_version FROM layers WHERE id = :id"),
                                {"id": layer_id}).scalar_one()

    upload_ok(api, "first.geojson", geojson_points(), id=layer_id, title="again")
    first_etag, first_names = tile_of(api, layer_id)
    first_version = data_version()
    assert api.delete(f"/layers/{layer_id}", headers=EDITOR).status_code == 204
    renamed = geojson_points(names=["重建一", "重建二", "重建三"])
    upload_ok(api, "second.geojson", renamed, id=layer_id, title="again")
    second_etag, second_names = tile_of(api, layer_id)
    assert data_version() > first_version
    assert second_etag != first_etag
    assert second_names == {"重建一", "重建二", "重建三"} != first_names
    assert api.delete(f"/layers/{layer_id}", headers=EDITOR).status_code == 204


def test_builtin_layers_cannot_be_changed(api):
    assert api.delete("/layers/risk_points", headers=EDITOR).status_code == 403
    response = put_layer(api, "risk_points", "x.geojson", geojson_points())
    assert response.status_code == 403 and "built-in" in response.json()["description"]
    assert api.post("/layers/districts/rollback", params={"version": 1},
                    headers=EDITOR).status_code == 403
    assert api.get("/collections/risk_points").status_code == 200


def test_write_endpoints_need_a_gis_editor_key(api, published):
    files = {"file": ("a.geojson", geojson_points())}
    anonymous = api.post("/layers", files=files, data={"title": "x"})
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"].startswith("Bearer")
    wrong = api.post("/layers", files=files, data={"title": "x"},
                     headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    viewer = api.post("/layers", files=files, data={"title": "x"}, headers=VIEWER)
    assert viewer.status_code == 403 and "gis-editor" in viewer.json()["description"]
    assert api.delete(f"/layers/{published}", headers=VIEWER).status_code == 403
    assert api.delete(f"/layers/{published}").status_code == 401
    assert api.post(f"/layers/{published}/rollback", json={"version": 1}).status_code == 401
    assert api.get(f"/layers/{published}").status_code == 200  # reading is open

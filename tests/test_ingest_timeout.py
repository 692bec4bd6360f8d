"""Upload ingestion has a statement timeout of its own (TWIN_UPLOADS_STATEMENT_TIMEOUT_S): a
real upload whose table takes longer to write than a tiny bound fails with the reason, and
leaves nothing behind (no layer, no version row, no table, no files); the same file goes
through under the default bound, and small uploads go through under the tiny one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlalchemy import Engine, text

from tests.servers import EDITOR, LiveServer
from tests.uploads import geojson_points, wait
from twin.core.settings import Settings, UploadSettings

TIGHT_S = 0.1
# Enough points that writing their table (COPY, then the spatial index) takes far longer
# than TIGHT_S, while the job's other statements take a few milliseconds.
POINTS = 200_000
LAYER = "timeout_test_points"


def many_points_csv(count: int = POINTS) -> bytes:
    rng = np.random.default_rng(7)
    lon = rng.uniform(106.4, 106.7, count)
    lat = rng.uniform(29.4, 29.7, count)
    rows = "\n".join(f"{x:.6f},{y:.6f},{i}" for i, (x, y) in enumerate(zip(lon, lat,
                                                                           strict=True)))
    return ("lon,lat,n\n" + rows + "\n").encode()


def post_layer(api: httpx.Client, name: str, content: bytes, **data) -> httpx.Response:
    """As the suite's fixture editor (the client carries its key)."""
    return api.post("/layers", files={"file": (name, content)}, data=data)


def serve(database_url: str, uploads_dir: Path, timeout_s: float) -> LiveServer:
    uploads = UploadSettings(dir=uploads_dir, statement_timeout_s=timeout_s)
    return LiveServer(Settings(database_url=database_url, uploads=uploads))


@pytest.fixture(scope="module")
def uploads_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("timeout-uploads")


@pytest.fixture(scope="module")
def tight(engine: Engine, database_url: str, uploads_dir: Path) -> Iterator[httpx.Client]:
    with serve(database_url, uploads_dir, TIGHT_S) as live, \
            httpx.Client(base_url=live.url, timeout=120, headers=EDITOR) as client:
        yield client


def left_behind(engine: Engine, uploads_dir: Path, layer_id: str) -> dict:
    with engine.connect() as conn:
        facts = conn.execute(text(
            "SELECT (SELECT count(*) FROM layers WHERE id = :id) AS layers, "
            "(SELECT count(*) FROM layer_versions WHERE layer_id = :id) AS versions, "
            "to_regclass(:table) IS NOT NULL AS table"),
            {"id": layer_id, "table": f'"upload_{layer_id}_v1"'}).mappings().one()
    files = sorted(str(p.relative_to(uploads_dir)) for p in uploads_dir.rglob("*")
                   if layer_id in str(p) and p.is_file())
    return {**facts, "files": files}


NOTHING = {"layers": 0, "versions": 0, "table": False, "files": []}


def test_an_upload_over_the_bound_fails_and_leaves_nothing(tight: httpx.Client,
                                                            engine: Engine, uploads_dir: Path):
    response = post_layer(tight, "many.csv", many_points_csv(), title="too slow", id=LAYER)
    assert response.status_code == 202, response.text
    job = wait(tight, response.json(), timeout=180)
    assert job["state"] == "failed", job
    assert job["reasons"] == [
        f"the upload's database work exceeded {TIGHT_S:g} s (one statement, while writing "
        "the table; TWIN_UPLOADS_STATEMENT_TIMEOUT_S); nothing was published"]
    assert left_behind(engine, uploads_dir, LAYER) == NOTHING
    assert not (uploads_dir / "jobs" / job["id"]).exists()
    assert tight.get(f"/layers/{LAYER}").status_code == 404


def test_small_uploads_fit_the_bound(tight: httpx.Client, engine: Engine, uploads_dir: Path):
    job = wait(tight, post_layer(tight, "few.geojson", geojson_points(), title="few",
                                 id="timeout_test_few").json())
    try:
        assert job["state"] == "succeeded", job
        assert tight.get("/collections/timeout_test_few/items").json()["numberMatched"] == 3
    finally:
        tight.delete("/layers/timeout_test_few")


def test_the_same_upload_goes_through_under_the_default_bound(
        tight: httpx.Client, engine: Engine, database_url: str, uploads_dir: Path):
    assert Settings().uploads.statement_timeout_s == 600
    test_an_upload_over_the_bound_fails_and_leaves_nothing(tight, engine, uploads_dir)
    with serve(database_url, uploads_dir, 600) as live, \
            httpx.Client(base_url=live.url, timeout=120, headers=EDITOR) as client:
        job = wait(client, post_layer(client, "many.csv", many_points_csv(),
                                      title="in time", id=LAYER).json(), timeout=180)
        try:
            assert job["state"] == "succeeded", job
            assert job["report"]["features"] == POINTS
            facts = left_behind(engine, uploads_dir, LAYER)
            assert (facts["layers"], facts["versions"], facts["table"]) == (1, 1, True)
        finally:
            client.delete(f"/layers/{LAYER}")

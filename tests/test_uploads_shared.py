"""Uploads usable from every node (issue 15): two twin servers, each with a TWIN_HOME and an
uploads folder of its own, over one database. What node A received, node B (its folder empty)
lists, tiles and serves byte for byte, from the files kept in the database (layers/blobs.py);
old versions are dropped only after the grace; a stored file whose checksum is wrong is
refused.

Oracles: decoded vector tiles (mapbox_vector_tile), terrain tiles decoded to metres and
compared with the source DEM cell by cell (tests/test_raster_tiles.py's oracle), the source
bytes of the uploaded model, and PostgreSQL's catalogue for the tables.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import mapbox_vector_tile
import morecantile
import pytest
from sqlalchemy import Engine, text

from layers.blobs import LocalFiles, backfill
from layers.jobs import run_job
from tests.servers import LiveServer
from tests.test_raster_tiles import assert_matches, dem_at, pixel_centres, read_png
from tests.uploads import (
    EDITOR,
    PLACES,
    dem_values,
    geojson_points,
    geotiff,
    minimal_glb,
    node_settings,
    put_layer,
    upload_ok,
    wait,
)
from twin.core.layer import Layer
from twin.core.local_files import local_path

TMS = morecantile.tms.get("WebMercatorQuad")
VECTOR_TILE = TMS.tile(*PLACES[0], 12)
DEM_TILE = TMS.tile(106.55, 29.55, 15)
# Short, so a test sees a version kept and then dropped; the drop pass runs every 5 s
# (layers/job_liveness.REAP_EVERY_S) in each server's job runner.
GRACE_S = 6.0
DROP_WAIT_S = GRACE_S + 20


class Node:
    def __init__(self, server: LiveServer, home: Path):
        self.server, self.home = server, home
        self.uploads = home / "uploads"
        self.api = server.client(timeout=60)

    def files(self) -> list[Path]:
        """Every file this node keeps of the layers: build folders and copies."""
        return sorted(p for part in ("layers", "cache")
                      for p in (self.uploads / part).rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def nodes(engine: Engine, database_url: str, tmp_path_factory: pytest.TempPathFactory):
    homes = [tmp_path_factory.mktemp(f"node{n}") for n in (1, 2)]
    with LiveServer(node_settings(database_url, homes[0], GRACE_S)) as a, \
            LiveServer(node_settings(database_url, homes[1], GRACE_S)) as b:
        yield Node(a, homes[0]), Node(b, homes[1])


def unique_glb() -> bytes:
    """A model no other test stores (blobs are shared by content)."""
    return minimal_glb({"extras": {"nonce": uuid.uuid4().hex}})


def vector_names(api: httpx.Client, layer_id: str) -> set[str]:
    tile = VECTOR_TILE
    response = api.get(f"/tiles/{layer_id}/{tile.z}/{tile.x}/{tile.y}.mvt")
    assert response.status_code == 200, response.text
    decoded = mapbox_vector_tile.decode(response.content).get(layer_id, {"features": []})
    return {f["properties"]["name"] for f in decoded["features"]}


def tables(engine: Engine, layer_id: str) -> list[str]:
    with engine.connect() as conn:
        return conn.execute(text("SELECT tablename FROM pg_tables WHERE tablename LIKE :p "
                                 "ORDER BY 1"), {"p": f"upload_{layer_id}_v%"}).scalars().all()


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.25)


def test_vector_upload_through_a_is_listed_and_tiled_through_b(nodes):
    a, b = nodes
    job = upload_ok(a.api, "shared.geojson", geojson_points(), title="shared points")
    layer_id = job["layer_id"]
    listed = {layer["id"] for layer in b.api.get("/layers").json()["layers"]}
    assert layer_id in listed
    assert vector_names(b.api, layer_id) == {"解放碑", "朝天门", "重庆大剧院"}
    assert b.api.get(f"/collections/{layer_id}").json()["featureCount"] == 3


def test_raster_upload_through_a_is_tiled_through_b_from_an_empty_folder(nodes, engine):
    a, b = nodes
    values, transform = dem_values()
    job = upload_ok(a.api, "dem.tif", geotiff(values, transform, "EPSG:4326"),
                    title="shared DEM")
    layer_id = job["layer_id"]
    assert not any(layer_id in str(p) for p in b.files())  # nothing of it on B yet
    tile = DEM_TILE
    served = b.api.get(f"/tiles/{layer_id}/{tile.z}/{tile.x}/{tile.y}.terrain.png")
    assert served.status_code == 200, served.text
    from tiles.terrain import decode

    metres = decode(read_png(served.content), "mapbox")
    assert_matches(metres, dem_at(values, transform, None, *pixel_centres(tile)), 0.1)
    colour_b = b.api.get(f"/tiles/{layer_id}/{tile.z}/{tile.x}/{tile.y}.png")
    colour_a = a.api.get(f"/tiles/{layer_id}/{tile.z}/{tile.x}/{tile.y}.png")
    assert colour_b.status_code == colour_a.status_code == 200
    assert (read_png(colour_b.content) == read_png(colour_a.content)).all()
    # B now holds its own copy, byte for byte A's COG, in its own folder.
    with engine.connect() as conn:
        a_path = Path(conn.execute(text("SELECT file_path FROM layers WHERE id = :id"),
                                   {"id": layer_id}).scalar_one())
    copies = [p for p in b.files() if layer_id in p.parts]
    assert a_path.is_relative_to(a.uploads) and [p.name for p in copies] == [a_path.name]
    assert copies[0].read_bytes() == a_path.read_bytes()
    assert not [p for p in b.files() if p.name.endswith(".part")]
    # Each server reads its own folder: A, its copy gone, fetches it again into its own.
    a_copies = [p for p in a.files() if "cache" in p.parts and layer_id in p.parts]
    assert [p.name for p in a_copies] == [a_path.name]  # kept when A published it
    a_copies[0].unlink()
    again = a.api.get(f"/tiles/{layer_id}/{tile.z}/{tile.x}/{tile.y}.terrain.png")
    assert again.status_code == 200 and again.content == served.content
    assert a_copies[0].read_bytes() == a_path.read_bytes()


def test_model_upload_through_a_downloads_byte_identical_through_b(nodes):
    a, b = nodes
    content = unique_glb()
    job = upload_ok(a.api, "tower.glb", content, title="shared model", lon="106.5785",
                    lat="29.5690", height="12", cim_level="4")
    layer_id = job["layer_id"]
    from_b = b.api.get(f"/layers/{layer_id}/model")
    from_a = a.api.get(f"/layers/{layer_id}/model")
    assert from_b.status_code == from_a.status_code == 200
    assert from_b.content == from_a.content == content
    assert from_b.headers["content-type"] == "model/gltf-binary"
    tileset = b.api.get(f"/collections/{layer_id}/3dtiles/tileset.json")
    assert tileset.status_code == 200, tileset.text


def test_a_corrupt_stored_file_is_refused_not_served(nodes, engine):
    a, b = nodes
    content = unique_glb()
    job = upload_ok(a.api, "corrupt.glb", content, title="corrupt model", lon="106.5785",
                    lat="29.5690")
    layer_id = job["layer_id"]
    digest = hashlib.sha256(content).digest()
    with engine.begin() as conn:
        stored = conn.execute(text("SELECT sha256 FROM upload_files WHERE layer_id = :id"),
                              {"id": layer_id}).scalar_one()
        assert bytes(stored) == digest
        flipped = conn.execute(text(
            "UPDATE upload_blob_chunks SET data = set_byte(data, 20, get_byte(data, 20) # 1) "
            "WHERE sha256 = :sha AND seq = 0"), {"sha": digest})
        assert flipped.rowcount == 1
    refused = b.api.get(f"/layers/{layer_id}/model")
    assert refused.status_code == 500
    assert "corrupt" in refused.json()["description"]
    assert not [p for p in b.files() if layer_id in str(p)]  # nothing left, not even a part
    # A serves its own copy, written before it was stored.
    assert a.api.get(f"/layers/{layer_id}/model").content == content


def test_a_superseded_version_is_kept_for_the_grace_then_dropped(nodes, engine):
    a, b = nodes
    job = upload_ok(a.api, "v1.geojson", geojson_points(), title="graced")
    layer_id = job["layer_id"]
    # The new version through B: any node receives and runs an upload.
    response = put_layer(b.api, layer_id, "v2.geojson",
                         geojson_points(PLACES[:2], ["新甲", "新乙"]))
    assert response.status_code == 202
    assert wait(b.api, response.json())["state"] == "succeeded"
    assert vector_names(a.api, layer_id) == {"新甲", "新乙"}
    with engine.connect() as conn:
        due = conn.execute(text("SELECT drop_after - now() FROM upload_drops WHERE layer_id = "
                                ":id AND version = 1"), {"id": layer_id}).scalar_one()
    assert 0 < due.total_seconds() <= GRACE_S
    assert tables(engine, layer_id) == [f"upload_{layer_id}_v1", f"upload_{layer_id}_v2"]
    versions = [v["version"] for v in a.api.get(f"/layers/{layer_id}").json()["versions"]]
    assert versions == [1, 2]
    wait_until(lambda: tables(engine, layer_id) == [f"upload_{layer_id}_v2"], DROP_WAIT_S,
               "the superseded version's table dropped")
    versions = [v["version"] for v in a.api.get(f"/layers/{layer_id}").json()["versions"]]
    assert versions == [2]
    gone = a.api.post(f"/layers/{layer_id}/rollback", json={"version": 1}, headers=EDITOR)
    assert gone.status_code == 400 and "dropped" in gone.json()["description"]
    assert vector_names(b.api, layer_id) == {"新甲", "新乙"}


def test_a_rollback_within_the_grace_keeps_the_version(nodes, engine):
    a, b = nodes
    job = upload_ok(a.api, "r1.geojson", geojson_points(), title="rolled")
    layer_id = job["layer_id"]
    response = put_layer(a.api, layer_id, "r2.geojson", geojson_points(PLACES[:1], ["独"]))
    assert wait(a.api, response.json())["state"] == "succeeded"
    rolled = b.api.post(f"/layers/{layer_id}/rollback", json={"version": 1}, headers=EDITOR)
    assert rolled.status_code == 200
    # Version 2 is now the superseded one; version 1 stays past the grace.
    wait_until(lambda: tables(engine, layer_id) == [f"upload_{layer_id}_v1"], DROP_WAIT_S,
               "version 2 dropped after the rollback")
    assert vector_names(a.api, layer_id) == {"解放碑", "朝天门", "重庆大剧院"}


def test_a_deleted_layer_goes_at_once_its_tables_and_files_after_the_grace(nodes, engine):
    a, b = nodes
    values, transform = dem_values(60, 60)
    job = upload_ok(a.api, "gone.tif", geotiff(values, transform, "EPSG:4326"), title="gone")
    layer_id = job["layer_id"]
    tile = TMS.tile(106.51, 29.59, 13)
    assert b.api.get(f"/tiles/{layer_id}/{tile.z}/{tile.x}/{tile.y}.png").status_code == 200
    assert (b.uploads / "cache" / layer_id).is_dir()  # B's copy
    vector = upload_ok(a.api, "gone.geojson", geojson_points(), title="gone too")["layer_id"]
    for deleted in (layer_id, vector):
        assert b.api.delete(f"/layers/{deleted}", headers=EDITOR).status_code == 204
        assert a.api.get(f"/layers/{deleted}").status_code == 404
        assert b.api.get(f"/layers/{deleted}").status_code == 404
    # Out of the id's way at once (renamed; its files under another id), kept for the grace.
    assert tables(engine, vector) == [] and not (b.uploads / "layers" / layer_id).exists()
    with engine.connect() as conn:
        buried = conn.execute(text(
            "SELECT d.layer_id, d.table_name, t.tablename IS NOT NULL FROM upload_drops AS d "
            "LEFT JOIN pg_tables AS t ON t.tablename = d.table_name "
            "WHERE d.layer_id LIKE :id AND d.dropped_at IS NULL"),
            {"id": f"{vector}~%"}).one()
        files = conn.execute(text("SELECT count(*) FROM upload_files WHERE layer_id LIKE :id"),
                             {"id": f"{layer_id}~%"}).scalar_one()
    assert buried[1].startswith("gone_") and buried[2] and files == 1
    # The id can be used again at once, from version 1, while the old one waits.
    again = upload_ok(a.api, "again.geojson", geojson_points(PLACES[:1], ["再"]), id=vector,
                      title="again")
    assert again["version"] == 1 and vector_names(b.api, vector) == {"再"}

    def gone() -> bool:
        with engine.connect() as conn:
            return conn.execute(text(
                "SELECT count(*) FROM upload_files WHERE layer_id LIKE :raster"),
                {"raster": f"{layer_id}~%"}).scalar_one() == 0 and conn.execute(text(
                    "SELECT to_regclass(:table) IS NULL"), {"table": buried[1]}).scalar_one()
    wait_until(gone, DROP_WAIT_S, "the deleted layers' tables and files dropped")
    wait_until(lambda: not (a.uploads / "cache" / layer_id).exists()
               and not (b.uploads / "cache" / layer_id).exists(), DROP_WAIT_S,
               "both nodes' copies removed")
    assert vector_names(a.api, vector) == {"再"}


def test_a_node_never_runs_a_job_whose_spool_it_lacks(nodes, engine):
    a, b = nodes
    job_id = uuid.uuid4().hex
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO upload_jobs (id, layer_id, action, state, progress, step, reasons, "
            "report, params, file_name, created_by) VALUES (:id, :layer, 'create', 'queued', "
            "0, 'queued', '[]', '{}', '{}', 'x.geojson', 'test')"),
            {"id": job_id, "layer": f"spool_{job_id[:8]}"})
    (a.uploads / "jobs" / job_id).mkdir(parents=True)  # spooled on A
    try:
        assert run_job(engine, b.server.settings, job_id) is False
        with engine.connect() as conn:
            state = conn.execute(text("SELECT state FROM upload_jobs WHERE id = :id"),
                                 {"id": job_id}).scalar_one()
        assert state == "queued"  # left to the node that has its file
    finally:
        with engine.begin() as conn:
            conn.execute(text("UPDATE upload_jobs SET state = 'failed' WHERE id = :id"),
                         {"id": job_id})


def test_without_an_app_the_recorded_path_is_the_file():
    layer = Layer(id="dem", title_zh="", title_en="", kind="raster", geometry_type=None,
                  source_table=None, source_filter=None, file_path="/data/dem.tif")
    assert local_path(layer) == Path("/data/dem.tif")


def test_concurrent_fetches_into_one_folder_agree(nodes, engine, tmp_path):
    """Eight threads of two resolvers (two processes of one node) fetch one model into an
    empty folder at once: each gets the whole file, and nothing half-written is left."""
    a, _ = nodes
    content = unique_glb()
    job = upload_ok(a.api, "many.glb", content, title="fetched at once", lon="106.5785",
                    lat="29.5690")
    with engine.connect() as conn:
        row = conn.execute(text(
            "SELECT id, title_zh, title_en, kind, geometry_type, source_table, source_filter, "
            "fields, bbox, source_crs, source_datum, file_path, min_zoom, max_zoom, origin, "
            "current_version, data_version, meta, owner_scope, shared FROM layers "
            "WHERE id = :id"), {"id": job["layer_id"]}).mappings().one()
    layer = Layer(**row)
    resolvers = [LocalFiles(engine, tmp_path), LocalFiles(engine, tmp_path)]
    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(lambda i: resolvers[i % 2](layer), range(8)))
    assert len(set(paths)) == 1 and paths[0].is_relative_to(tmp_path)
    assert paths[0].read_bytes() == content
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["model.glb"]


def test_files_of_versions_from_before_the_blob_store_are_stored_from_their_node(nodes,
                                                                                   engine):
    """A version published before migration 0016 has its file on one node only: until that
    node stores it, another node cannot serve it (404, not a wrong file); then it can."""
    a, b = nodes
    content = unique_glb()
    layer_id = upload_ok(a.api, "old.glb", content, title="from before", lon="106.5785",
                         lat="29.5690")["layer_id"]
    with engine.begin() as conn:  # as if published before its files were kept
        conn.execute(text("DELETE FROM upload_files WHERE layer_id = :id"), {"id": layer_id})
    assert b.api.get(f"/layers/{layer_id}/model").status_code == 404
    assert (layer_id, 1) in backfill(engine)  # what A's runner does when it starts
    assert backfill(engine) == []
    assert b.api.get(f"/layers/{layer_id}/model").content == content

"""Layer data versions pushed by LISTEN/NOTIFY (twin/core/versions.py, migration 0008).

On a real 2-worker server: a change made through one worker is seen by the very next request
to the other, every time (the oracle: the CSV each version was made from, and the tiles
decoded). On the database: the listener's versions equal the table's after every kind of
change, a change no notification announced is corrected by the periodic read, and while the
listener cannot connect every read goes to the database.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import closing, suppress

import httpx
import mapbox_vector_tile
import morecantile
import numpy as np
import psycopg
import pytest
from sqlalchemy import Engine, text

from tests.databases import libpq
from tests.servers import ServerProcess
from tests.workers import EDITOR, KEY, Fresh, pinned_connections, points_csv, wait_for_job
from tiles.vector import BUFFER, EXTENT
from twin.core.db import async_engine
from twin.core.settings import Settings
from twin.core.versions import LISTENER_PREFIX, DataVersions, LayerVersions, announce

LAYER = "versions_probe"
ROUNDS = 40  # write through one worker, read through the other, this many times each way
TILE = morecantile.tms.get("WebMercatorQuad").tile(106.55, 29.55, 8)


def points_in_tile(csv: bytes) -> int:
    """The oracle: the CSV's points inside TILE's bounds and its buffer (BUFFER of EXTENT
    tile units on each side), in Web Mercator."""
    tms = morecantile.tms.get("WebMercatorQuad")
    rows = [line.split(",")[2:] for line in csv.decode().splitlines()[1:]]
    xy = np.array([tms.xy(float(lon), float(lat)) for lon, lat in rows])
    left, bottom, right, top = tms.xy_bounds(TILE)
    margin = (right - left) * BUFFER / EXTENT
    inside = ((xy[:, 0] >= left - margin) & (xy[:, 0] <= right + margin)
              & (xy[:, 1] >= bottom - margin) & (xy[:, 1] <= top + margin))
    return int(inside.sum())


def listeners(database_url: str) -> list[str]:
    with psycopg.connect(libpq(database_url)) as conn:
        return [name for (name,) in conn.execute(
            "SELECT application_name FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name LIKE %s", (LISTENER_PREFIX + "%",))]


@pytest.fixture()
def two_workers(engine, database_url: str, monkeypatch, tmp_path):
    monkeypatch.setenv("TWIN_WORKERS", "2")
    monkeypatch.setenv("TWIN_AUTH_KEYS", json.dumps({KEY: "gis-editor:versions-test"}))
    monkeypatch.setenv("TWIN_UPLOADS_DIR", str(tmp_path / "uploads"))
    with ServerProcess(database_url) as server:
        try:
            yield server
        finally:
            with suppress(httpx.HTTPError):
                httpx.delete(f"{server.url}/layers/{LAYER}", headers=EDITOR, timeout=30)


def seen(fresh: Fresh) -> tuple[int, int, int]:
    """What one worker shows of the layer: its collection's count and version, and the
    features of its tile."""
    status, collection = fresh.get(f"/collections/{LAYER}")
    assert status == 200, collection
    fresh.conn.request("GET", f"/tiles/{LAYER}/{TILE.z}/{TILE.x}/{TILE.y}.mvt",
                       headers={"Accept-Encoding": "identity"})
    response = fresh.conn.getresponse()
    body = response.read()
    assert response.status == 200, body
    features = mapbox_vector_tile.decode(body).get(LAYER, {"features": []})["features"]
    return collection["featureCount"], collection["dataVersion"], len(features)


def test_a_change_through_one_worker_is_seen_by_the_next_request_to_the_other(
        two_workers: ServerProcess, database_url: str, engine: Engine):
    url = two_workers.url
    first, second = points_csv(30, seed=11), points_csv(55, seed=12)
    wait_for_job(url, httpx.post(f"{url}/layers", headers=EDITOR, timeout=60,
                                 files={"file": ("probe.csv", first)},
                                 data={"id": LAYER, "title": "versions probe"}))
    wait_for_job(url, httpx.put(f"{url}/layers/{LAYER}", headers=EDITOR, timeout=60,
                                files={"file": ("probe.csv", second)}))
    # One listener per worker (and any other server on this database), each in sync.
    assert len(listeners(database_url)) >= 2
    versions = {1: first, 2: second}
    one, other = pinned_connections(two_workers)
    with closing(one), closing(other):
        for n in range(2 * ROUNDS):
            writer, reader = (one, other) if n % 2 == 0 else (other, one)
            version = 1 if n % 4 < 2 else 2
            writer.conn.request("POST", f"/layers/{LAYER}/rollback?version={version}",
                                headers=EDITOR)
            answer = writer.conn.getresponse()
            assert answer.status == 200, answer.read()
            answer.read()
            csv = versions[version]
            count, data_version, features = seen(reader)
            assert (count, features) == (csv.count(b"\n") - 1, points_in_tile(csv)), (
                f"round {n}: worker {reader.worker} still showed the other version")
            assert data_version == table_versions(engine)[LAYER]


# --- the listener on the database ---------------------------------------------------------

def table_versions(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return dict(conn.execute(text("SELECT id, data_version FROM layers")).all())


def write(engine: Engine, sql: str) -> None:
    with engine.begin() as conn:
        conn.execute(text(sql))


# An uploaded layer as another process publishes it: a copy of a built-in one's definition.
COPIED = ("id, title_zh, title_en, kind, geometry_type, source_table, source_filter, fields, "
          "bbox, source_crs, source_datum, file_path, min_zoom, max_zoom")
PROBE_INSERT = (f"INSERT INTO layers ({COPIED}, origin, current_version) SELECT 'push_probe', "
                f"{COPIED[4:]}, 'upload', 1 FROM layers WHERE id = 'districts'")


async def until(condition, seconds: float = 20.0) -> None:
    """Waits for ``condition()`` (a bound in time for a test that cannot hang, not a
    measurement)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        assert loop.time() < deadline, "the listener never got there"
        await asyncio.sleep(0.02)


async def listener_follows_every_change(database_url: str, engine: Engine) -> None:
    settings = Settings(database_url=database_url)
    url = libpq(database_url)
    versions = LayerVersions(url, DataVersions(async_engine(settings, 1, 0)), poll_s=0.5)
    versions.start()
    try:
        await until(lambda: versions.current() is not None)
        assert versions.current() == table_versions(engine)
        # A write to a layer's table, a new layer, a new version of it, its deletion: each
        # one is in memory once sync() returns (what twin's writes wait for).
        for sql in ("UPDATE risk_points SET name = name WHERE id = 1", PROBE_INSERT,
                    "UPDATE layers SET data_version = 7 WHERE id = 'push_probe'",
                    "DELETE FROM layers WHERE id = 'push_probe'"):
            write(engine, sql)
            await versions.sync()
            assert versions.current() == table_versions(engine), sql
        # A change no notification announced (the trigger off for it) is corrected by the
        # periodic full read. (The outbox's trigger is off too: its events, deferred to the
        # commit, would be pending when the table is altered back.)
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE layers DISABLE TRIGGER layers_notify_version, "
                              "DISABLE TRIGGER layers_outbox"))
            conn.execute(text("UPDATE layers SET data_version = data_version + 100 "
                              "WHERE id = 'roads'"))
            conn.execute(text("ALTER TABLE layers ENABLE TRIGGER layers_notify_version, "
                              "ENABLE TRIGGER layers_outbox"))
        expected = table_versions(engine)
        await until(lambda: versions.current() == expected)
        # Its connection killed (a database restart): reads go to the database until it is
        # back, then it is in sync again.
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE application_name = %s", (versions.name,))
        await until(lambda: versions.current() is None)
        write(engine, "UPDATE risk_points SET name = name WHERE id = 1")
        assert await versions.read() == table_versions(engine)
        await until(lambda: versions.current() == table_versions(engine))
    finally:
        write(engine, "DELETE FROM layers WHERE id = 'push_probe'")
        await versions.close()


def test_the_listener_follows_every_change_and_recovers(database_url: str, engine: Engine):
    asyncio.run(listener_follows_every_change(database_url, engine))


async def reads_while_down(database_url: str, engine: Engine) -> None:
    settings = Settings(database_url=database_url)
    # A listener that can never connect: every read is a read of the table.
    versions = LayerVersions("postgresql://twin@127.0.0.1:1/nowhere",
                             DataVersions(async_engine(settings, 1, 0)), poll_s=0.2)
    versions.start()
    try:
        for _ in range(3):
            assert versions.current() is None
            before = await versions.read()
            write(engine, "UPDATE risk_points SET name = name WHERE id = 1")
            after = await versions.read()
            assert after["risk_points"] == before["risk_points"] + 1
            assert after == table_versions(engine)
            await asyncio.sleep(0.1)
        await versions.sync()  # a writer whose listener is down answers without waiting
    finally:
        await versions.close()


def test_while_the_listener_is_down_every_read_goes_to_the_database(database_url: str,
                                                                    engine: Engine):
    asyncio.run(reads_while_down(database_url, engine))


def test_a_writer_outside_twin_is_acknowledged_by_every_listener(database_url: str,
                                                                 engine: Engine):
    async def scenario() -> tuple[set[str], dict, dict]:
        settings = Settings(database_url=database_url)
        url = libpq(database_url)
        processes = [LayerVersions(url, DataVersions(async_engine(settings, 1, 0)))
                     for _ in range(2)]
        for versions in processes:
            versions.start()
        try:
            await until(lambda: all(v.current() is not None for v in processes))
            write(engine, "UPDATE risk_points SET name = name WHERE id = 1")
            # announce blocks: in a thread, so this loop's listeners can acknowledge.
            late = await asyncio.to_thread(announce, database_url)
            return late, processes[0].current(), processes[1].current()
        finally:
            for versions in processes:
                await versions.close()

    late, first, second = asyncio.run(scenario())
    assert late == set()
    assert first == second == table_versions(engine)

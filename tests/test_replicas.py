"""Reads on a hot standby, writes on the primary, read-your-writes (issue 15;
twin/core/replicas.py, twin/api/readroute.py), on a home of the test's own: a fresh managed
primary, migrated, a few risk points inserted here, one standby made from it by
pg_basebackup, and a twin server pointing at both.

Oracles: the answers' content against what the test wrote, PostgreSQL's own counters
(``pg_stat_database`` on each server: where the read transactions ran), the standby's own
log (a query cancelled by a conflict with recovery), the standby read directly (its rows
still old while its replay is paused), and the decoded vector tile.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h3
import httpx
import mapbox_vector_tile
import morecantile
import psycopg
import pytest
from sqlalchemy import Engine, text

from layers.builtin import BUILTIN_LAYERS
from layers.registry import _UPSERT_LAYER, _vector_bbox, _vector_fields
from tests.databases import libpq
from tests.servers import EDITOR, LiveServer, free_port_run
from twin.core.cluster import ManagedCluster
from twin.core.db import sync_engine
from twin.core.settings import DatabaseSettings, EventsSettings, Settings
from twin.core.standby import ManagedStandby, wait_for_lsn
from twin.migrate import upgrade

K = 1
GRID = "500112002001001"
POINTS = 12
LON, LAT = 106.52, 29.60
ITEMS = "/collections/risk_points/items"
MERGE = {"Content-Type": "application/merge-patch+json"}
WEB_MERCATOR = morecantile.tms.get("WebMercatorQuad")
# Backends send their counters to pg_stat_database at most once a second while busy, and an
# idle one within 10 s (PGSTAT_IDLE_INTERVAL): wait that long before reading them.
STATS_SETTLE_S = 11.0
# The server's TWIN_DB_MAX_LAG_S: short, so a lagging standby is skipped within the test.
MAX_LAG_S = 2.0


@dataclass
class Replicated:
    settings: Settings
    cluster: ManagedCluster
    standby: ManagedStandby
    engine: Engine

    def primary_url(self) -> str:
        return libpq(self.cluster.url())

    def standby_url(self) -> str:
        return libpq(self.standby.url())


def _seed(engine: Engine) -> None:
    """One sector, one grid cell around the points, ``POINTS`` risk points in it."""
    box = f"MULTIPOLYGON((({LON - 0.05} {LAT - 0.05}, {LON + 0.05} {LAT - 0.05}, " \
          f"{LON + 0.05} {LAT + 0.05}, {LON - 0.05} {LAT + 0.05}, {LON - 0.05} {LAT - 0.05})))"
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO sectors (code, name_zh, name_en, sort_order) "
                          "VALUES ('facility_operation', '设施运行', 'facility operation', 1)"))
        conn.execute(text(
            "INSERT INTO admin_units (code, level, parent_code, name_zh, name_en, kind, "
            "population, area_km2, geom) VALUES (:code, 'grid', NULL, '测试网格', 'test grid', "
            "'grid', 100, 1.0, ST_GeomFromText(:box, 4326))"), {"code": GRID, "box": box})
        for n in range(1, POINTS + 1):
            lon, lat = LON + n * 0.001, LAT + n * 0.0005
            cells = {f"h3_r{res}": h3.str_to_int(h3.latlng_to_cell(lat, lon, res))
                     for res in range(3, 10)}
            conn.execute(text(
                "INSERT INTO risk_points (id, code, name, sector_code, category, level, "
                "address, grid_code, plan_id, h3_r3, h3_r4, h3_r5, h3_r6, h3_r7, h3_r8, "
                "h3_r9, geom) VALUES (:id, :code, :name, 'facility_operation', '燃气调压设施', "
                "2, '测试街道', :grid, NULL, :h3_r3, :h3_r4, :h3_r5, :h3_r6, :h3_r7, :h3_r8, "
                ":h3_r9, ST_SetSRID(ST_MakePoint(:lon, :lat), 4326))"),
                {"id": n, "code": f"RP-TEST-{n:04d}", "name": f"测试点 {n}", "grid": GRID,
                 "lon": lon, "lat": lat, **cells})
        # The built-in vector layers, as the sample loader registers them (layers/registry.py;
        # the raster ones need the sample's files, which this home does not have).
        for layer in BUILTIN_LAYERS:
            if layer.kind == "raster":
                continue
            conn.execute(_UPSERT_LAYER, {
                "id": layer.id, "title_zh": layer.title_zh, "title_en": layer.title_en,
                "kind": layer.kind, "geometry_type": layer.geometry_type,
                "source_table": layer.source_table, "source_filter": layer.source_filter,
                "fields": json.dumps(_vector_fields(conn, layer)),
                "bbox": _vector_bbox(conn, layer), "file_path": None,
                "min_zoom": layer.min_zoom, "max_zoom": layer.max_zoom, "meta": "{}"})


@pytest.fixture(scope="module")
def replicated() -> Iterator[Replicated]:
    if os.environ.get("TWIN_TEST_DATABASE_URL"):
        pytest.skip("the standby is made from a managed primary of the test's own")
    # Not under pytest's temporary folder: the database user must reach it.
    home = Path(tempfile.mkdtemp(prefix="twin-replicas-test-"))
    db_port = free_port_run(1 + 10 + K)
    settings = Settings(home=home, db=DatabaseSettings(port=db_port))
    cluster = ManagedCluster(settings)
    standby = ManagedStandby(settings, K)
    engine = None
    try:
        cluster.up()
        engine = sync_engine(settings)
        upgrade(engine)
        _seed(engine)
        started = time.monotonic()
        standby.up()
        print(f"primary and standby made in {time.monotonic() - started:.1f} s")
        yield Replicated(settings, cluster, standby, engine)
    finally:
        if engine is not None:
            engine.dispose()
        try:
            standby.destroy()
        finally:
            cluster.down()
            shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def server(replicated: Replicated) -> Iterator[LiveServer]:
    db = DatabaseSettings(port=replicated.settings.db.port,
                          standby_urls=[replicated.standby.url()], max_lag_s=MAX_LAG_S)
    # The escalation worker looks for passed deadlines on the primary every half second (two
    # transactions each): background work, not reads, and most of the primary's count over
    # a test's window. Looking every minute, it stays out of the measure.
    settings = Settings(home=replicated.settings.home, database_url=replicated.cluster.url(),
                        db=db, events=EventsSettings(escalation_poll_s=60))
    with LiveServer(settings) as live:
        deadline = time.monotonic() + 10
        while not _standby_healthy(live):
            assert time.monotonic() < deadline, "the server never found the standby healthy"
            time.sleep(0.1)
        yield live


@pytest.fixture()
def other_node(replicated: Replicated, server: LiveServer) -> Iterator[LiveServer]:
    """A second server on the same primary and standby: another node of the cluster."""
    with LiveServer(server.settings) as live:
        deadline = time.monotonic() + 10
        while not _standby_healthy(live):
            assert time.monotonic() < deadline, "the second node never found the standby"
            time.sleep(0.1)
        yield live


def _standby_detail(live: LiveServer) -> dict:
    answer = httpx.get(f"{live.url}/healthz", timeout=5).json()
    (standby,) = answer["standbys"]
    return standby


def _standby_healthy(live: LiveServer) -> bool:
    return bool(_standby_detail(live)["serving"])


def _pause_replay(replicated: Replicated) -> None:
    standby_sql(replicated, "SELECT pg_wal_replay_pause()")
    deadline = time.monotonic() + 5
    while standby_sql(replicated, "SELECT pg_get_wal_replay_pause_state()") != ("paused",):
        assert time.monotonic() < deadline, "the standby's replay did not pause"
        time.sleep(0.02)


def transactions(url: str) -> int:
    """Transactions the server's database has ended (committed or rolled back: a pooled
    read ends with the pool's ROLLBACK) as pg_stat_database counts them."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database "
                           "WHERE datname = current_database()").fetchone()
    assert row is not None
    return int(row[0])


def counters(replicated: Replicated) -> tuple[int, int]:
    return transactions(replicated.primary_url()), transactions(replicated.standby_url())


def point_scans(url: str) -> int:
    """Scans of risk_points on the server (pg_stat_user_tables counts each server's own):
    only requests read that table, never the standby checks or the replay polls."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) "
                           "FROM pg_stat_user_tables WHERE relname = 'risk_points'").fetchone()
    assert row is not None
    return int(row[0])


def primary_name(replicated: Replicated, point_id: int) -> str:
    with replicated.engine.connect() as conn:
        return conn.execute(text("SELECT name FROM risk_points WHERE id = :id"),
                            {"id": point_id}).scalar_one()


def standby_sql(replicated: Replicated, sql: str, params: tuple = ()) -> tuple | None:
    with psycopg.connect(replicated.standby_url(), autocommit=True) as conn:
        return conn.execute(sql, params).fetchone()


def read_load(live: LiveServer, count: int, workers: int = 4) -> list[int]:
    """``count`` GETs of items, single items and collections (no read-your-writes token)."""
    paths = [f"{ITEMS}/{n}" for n in range(1, POINTS + 1)] + [ITEMS, "/collections"]

    with httpx.Client(base_url=live.url, timeout=30) as client:
        def get(i: int) -> int:
            try:
                return client.get(paths[i % len(paths)]).status_code
            except httpx.HTTPError as error:
                return -len(str(error))  # a failed read, never a status

        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(get, range(count)))


def caught_up(replicated: Replicated) -> None:
    with replicated.engine.connect() as conn:
        lsn = conn.execute(text("SELECT pg_current_wal_lsn()::text")).scalar_one()
    with psycopg.connect(replicated.standby_url(), autocommit=True) as conn:
        assert wait_for_lsn(conn, lsn, 10.0)


def test_200_writes_each_read_back_through_the_standby_never_stale(
        replicated: Replicated, server: LiveServer, other_node: LiveServer):
    """Each trial writes through one node and reads through the other (turn about), one
    client carrying the cookie as a browser does (cookies do not name a port)."""
    point = 1
    before = point_scans(replicated.standby_url())
    stale = []
    nodes = (server.url, other_node.url)
    with httpx.Client(timeout=30) as client:
        for trial in range(200):
            name = f"读写一致 {trial}"
            writer, reader = nodes[trial % 2], nodes[1 - trial % 2]
            wrote = client.patch(f"{writer}{ITEMS}/{point}",
                                 json={"properties": {"name": name}},
                                 headers={**EDITOR, **MERGE})
            assert wrote.status_code // 100 == 2, wrote.text
            assert wrote.headers["Twin-LSN"] == client.cookies["twin_lsn"]
            read = client.get(f"{reader}{ITEMS}/{point}", headers=EDITOR)
            assert read.status_code == 200, read.text
            if read.json()["properties"]["name"] != name:
                stale.append((trial, read.json()["properties"]["name"]))
        cookie = wrote.headers["set-cookie"]
    assert stale == []
    assert "Path=/" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    time.sleep(STATS_SETTLE_S)
    scans = point_scans(replicated.standby_url()) - before
    print(f"200 trials: {scans} scans of risk_points on the standby")
    # The reads did not all go to the primary: most waited for the standby's replay (each
    # read of a point scans risk_points at least once).
    assert scans >= 150


def test_most_read_transactions_run_on_the_standby(replicated: Replicated, server: LiveServer):
    caught_up(replicated)
    time.sleep(STATS_SETTLE_S)  # the counters of the work before, out of the window
    before = counters(replicated)
    statuses = read_load(server, 600)
    assert statuses.count(200) == len(statuses), sorted(set(statuses))
    time.sleep(STATS_SETTLE_S)
    after = counters(replicated)
    on_primary, on_standby = after[0] - before[0], after[1] - before[1]
    share = on_standby / (on_primary + on_standby)
    print(f"600 reads: {on_standby} transactions on the standby, {on_primary} on the primary "
          f"(background work included): {share:.0%} on the standby")
    assert share >= 0.8


def _tile_of(lon: float, lat: float, z: int = 15) -> morecantile.Tile:
    return WEB_MERCATOR.tile(lon, lat, z)


def _names_in_tile(content: bytes) -> set[str]:
    decoded = mapbox_vector_tile.decode(content)
    return {feature["properties"].get("name")
            for layer in decoded.values() for feature in layer["features"]}


def test_a_tile_built_while_the_standby_lags_is_of_the_new_version(
        replicated: Replicated, server: LiveServer):
    """Replay paused on the standby, a point renamed on the primary: the tile of the new
    version (its key, from the primary's pushed versions) holds the new name, though the
    standby, healthy and within the lag bound, still holds the old one; a read with the
    write's token sees the new name too, one without it (served by the standby) the old."""
    point = 3
    lon, lat = LON + point * 0.001, LAT + point * 0.0005
    tile = _tile_of(lon, lat)
    url = f"/tiles/risk_points/{tile.z}/{tile.x}/{tile.y}.mvt"
    caught_up(replicated)
    old = primary_name(replicated, point)
    with server.client() as client:
        first = client.get(url)
        assert first.status_code == 200
        assert old in _names_in_tile(first.content)
        _pause_replay(replicated)
        try:
            new = "暂停回放时改名"
            wrote = client.patch(f"{ITEMS}/{point}", json={"properties": {"name": new}},
                                 headers={**EDITOR, **MERGE})
            assert wrote.status_code // 100 == 2, wrote.text
            # The standby lags: it still has the old name, yet counts as healthy.
            assert standby_sql(replicated, "SELECT name FROM risk_points WHERE id = %s",
                               (point,)) == (old,)
            assert _standby_healthy(server)
            built = client.get(url)
            assert built.status_code == 200
            names = _names_in_tile(built.content)
            assert new in names and old not in names
            assert built.headers["etag"] != first.headers["etag"]
            # Read-your-writes: with the token, the new name (from the primary, after the
            # wait); without it, the standby's old one.
            assert client.get(f"{ITEMS}/{point}").json()["properties"]["name"] == new
            tokenless = httpx.get(f"{server.url}{ITEMS}/{point}", timeout=30)
            assert tokenless.json()["properties"]["name"] == old
        finally:
            standby_sql(replicated, "SELECT pg_wal_replay_resume()")
        caught_up(replicated)
        again = client.get(url)
        assert again.headers["etag"] == built.headers["etag"]
        assert new in _names_in_tile(again.content)


def test_a_standby_lagging_past_the_bound_is_skipped_though_the_primary_is_idle(
        replicated: Replicated, server: LiveServer):
    """One write, then nothing: the primary idle, the standby's replay paused. Its lag (the
    age of the first primary position it misses) grows past TWIN_DB_MAX_LAG_S although no
    transaction follows, and reads without a token leave it for the primary; replay resumed,
    it serves again."""
    point = 7
    caught_up(replicated)
    _pause_replay(replicated)
    try:
        new = "滞后备库被跳过"
        with replicated.engine.begin() as conn:  # a writer outside twin: no token anywhere
            conn.execute(text("UPDATE risk_points SET name = :name WHERE id = :id"),
                         {"name": new, "id": point})
        written = time.monotonic()
        deadline = written + MAX_LAG_S + 5
        while _standby_healthy(server):
            assert time.monotonic() < deadline, "the lagging standby was never skipped"
            time.sleep(0.1)
        skipped_after = time.monotonic() - written
        detail = _standby_detail(server)
        print(f"skipped {skipped_after:.1f} s after the write: {detail}")
        assert detail["healthy"] and detail["lag_s"] > MAX_LAG_S
        assert skipped_after >= MAX_LAG_S - 0.1
        assert standby_sql(replicated, "SELECT name FROM risk_points WHERE id = %s",
                           (point,)) != (new,)
        for _ in range(20):
            answer = httpx.get(f"{server.url}{ITEMS}/{point}", timeout=30)
            assert answer.json()["properties"]["name"] == new
    finally:
        standby_sql(replicated, "SELECT pg_wal_replay_resume()")
    caught_up(replicated)
    deadline = time.monotonic() + 10
    while not _standby_healthy(server):
        assert time.monotonic() < deadline, "the standby never served again"
        time.sleep(0.1)
    assert _standby_detail(server)["lag_s"] < MAX_LAG_S


def _standby_setting(replicated: Replicated, name: str, value: str | None) -> None:
    """Set (None: remove) a setting in the standby's postgresql.auto.conf and reload."""
    conf = replicated.standby.pgdata / "postgresql.auto.conf"
    lines = [line for line in conf.read_text().splitlines()
             if not line.startswith(f"{name} =")]
    if value is not None:
        lines.append(f"{name} = {value}")
    conf.write_text("\n".join(lines) + "\n")
    with psycopg.connect(replicated.standby_url(), autocommit=True) as conn:
        conn.execute("SELECT pg_reload_conf()")
    shown = "0" if value == "0" else None
    deadline = time.monotonic() + 10
    while shown is not None:
        row = standby_sql(replicated, f"SHOW {name}")
        if row is not None and row[0] == shown:
            break
        assert time.monotonic() < deadline, f"the standby did not take {name} = {value}"
        time.sleep(0.05)


def test_a_recovery_conflict_on_the_standby_is_retried_on_the_primary(
        replicated: Replicated, server: LiveServer, caplog: pytest.LogCaptureFixture):
    """A real conflict: the standby cancels a request's query when it replays an exclusive
    lock on a table the query holds (``max_standby_streaming_delay = 0``: at once).

    The primary locks risk_points (a transaction left open: the standby's replay takes the
    lock too), so the GET of a point, on the standby, reads the layers' versions and then
    waits for risk_points while holding its lock on ``layers``. The primary then locks
    ``layers`` exclusively: its replay conflicts with the waiting query, which PostgreSQL
    cancels. The client still gets its point: read again on the primary once the test lets
    go of risk_points there."""
    point = 5
    log = replicated.standby.log_file
    logged = log.stat().st_size
    _standby_setting(replicated, "max_standby_streaming_delay", "0")
    caught_up(replicated)
    holder = psycopg.connect(replicated.primary_url())
    answer: dict = {}
    try:
        holder.execute("LOCK TABLE risk_points IN ACCESS EXCLUSIVE MODE")
        deadline = time.monotonic() + 10
        while standby_sql(replicated, "SELECT count(*) FROM pg_locks WHERE mode = "
                          "'AccessExclusiveLock' AND relation = 'risk_points'::regclass") \
                != (1,):
            assert time.monotonic() < deadline, "the standby never replayed the lock"
            time.sleep(0.02)

        def get() -> None:
            try:
                answer["response"] = httpx.get(f"{server.url}{ITEMS}/{point}", timeout=60)
            except httpx.HTTPError as error:
                answer["error"] = error

        with caplog.at_level(logging.INFO, logger="twin.api"):
            reader = threading.Thread(target=get)
            reader.start()
            deadline = time.monotonic() + 10
            while standby_sql(replicated, "SELECT count(*) FROM pg_stat_activity WHERE "
                              "application_name = 'twin reads' AND wait_event_type = 'Lock'") \
                    != (1,):
                assert time.monotonic() < deadline, "the read never waited on the standby"
                time.sleep(0.02)
            with psycopg.connect(replicated.primary_url()) as locker:
                locker.execute("LOCK TABLE layers IN ACCESS EXCLUSIVE MODE")
            deadline = time.monotonic() + 10
            while "conflict with recovery" not in log.read_text(errors="replace")[logged:]:
                assert time.monotonic() < deadline, "the standby cancelled nothing"
                time.sleep(0.05)
            holder.commit()  # the primary's risk_points free again: the retry reads it
            reader.join(60)
    finally:
        holder.close()
        _standby_setting(replicated, "max_standby_streaming_delay", None)
    assert "error" not in answer, answer
    response = answer["response"]
    assert response.status_code == 200, response.text
    assert response.json()["properties"]["name"] == primary_name(replicated, point)
    said = log.read_text(errors="replace")[logged:]
    assert "canceling statement due to conflict with recovery" in said
    assert "relation lock" in said
    assert any("recovery conflict on standby, read again on the primary" in record.message
               for record in caplog.records)


def test_a_stopped_standby_costs_no_read_and_reads_return_when_it_is_back(
        replicated: Replicated, server: LiveServer):
    """The standby stopped (fast: its open queries cancelled) under a bounded read load:
    every read answered 200 (reads caught on the standby are read again on the primary,
    new ones go there); started again, the reads go back to it (its counters)."""
    caught_up(replicated)
    answered: list[tuple[float, int]] = []
    paths = [f"{ITEMS}/{n}" for n in range(1, POINTS + 1)] + [ITEMS, "/collections"]

    def get(i: int) -> None:
        try:
            status = httpx.get(server.url + paths[i % len(paths)], timeout=30).status_code
        except httpx.HTTPError:
            status = -1  # a failed read, never a status
        answered.append((time.monotonic(), status))

    with ThreadPoolExecutor(4) as pool:
        load = [pool.submit(get, i) for i in range(800)]
        time.sleep(1.0)
        stopping = time.monotonic()
        replicated.standby.down()
        stopped = time.monotonic()
        for future in load:
            future.result()
    statuses = [status for _at, status in answered]
    during = sum(1 for at, _status in answered if stopping <= at <= stopped)
    after = sum(1 for at, _status in answered if at > stopped)
    print(f"standby stopped: {len(answered)} reads, {during} answered while it stopped, "
          f"{after} after")
    assert statuses.count(200) == len(statuses), sorted(set(statuses))
    assert after >= 100  # the load outlasted the stop
    assert not _standby_healthy(server)
    # Reads without the standby go to the primary.
    assert read_load(server, 50).count(200) == 50

    replicated.standby.up()
    deadline = time.monotonic() + 20
    while not _standby_healthy(server):
        assert time.monotonic() < deadline, "the server never took the standby back"
        time.sleep(0.1)
    caught_up(replicated)
    time.sleep(STATS_SETTLE_S)  # the counters of the reads before
    before = counters(replicated)
    statuses = read_load(server, 200)
    assert statuses.count(200) == len(statuses)
    time.sleep(STATS_SETTLE_S)
    after = counters(replicated)
    on_primary, on_standby = after[0] - before[0], after[1] - before[1]
    print(f"back: {on_standby} transactions on the standby, {on_primary} on the primary")
    assert on_standby / (on_primary + on_standby) >= 0.8

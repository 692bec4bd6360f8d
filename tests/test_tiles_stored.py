"""Stored H3 counts (migration 0005) and the lean cached-tile path.

The stored counts are checked against a pandas + h3 oracle (cells computed from lon/lat here,
not read from the database) and against the live aggregation over the points, after inserts,
updates and deletes of risk points.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import os
import pickle
from pathlib import Path

import h3
import mapbox_vector_tile
import morecantile
import pandas as pd
import psycopg
import pytest
import shapely
from httpx import Client
from sqlalchemy import Engine, text
from sqlalchemy.ext.asyncio import create_async_engine

from layers.job_liveness import _recover_if_alone
from tests.databases import libpq
from tiles import hexagons
from tiles.filters import SectorCodes, TileFilters
from tiles.vector import TileOptions, render_tile
from twin import cli
from twin.core.layer import LayerRegistry
from twin.core.principal import Scope
from twin.core.settings import Settings
from twin.core.versions import DataVersions, announce

WEB_MERCATOR = morecantile.tms.get("WebMercatorQuad")
RESOLUTIONS = range(3, 10)
NEW_IDS = (990001, 990002, 990003)


@pytest.fixture(scope="module")
def sample_points(sample_dir: Path) -> pd.DataFrame:
    frame = pd.read_csv(sample_dir / "risk_points.csv", dtype={"grid_code": str})
    points = shapely.from_wkb(frame["geom"])
    return frame.assign(lon=shapely.get_x(points), lat=shapely.get_y(points))[
        ["id", "sector_code", "level", "grid_code", "lon", "lat"]]


def oracle_counts(points: pd.DataFrame) -> dict[tuple, int]:
    """(res, cell, sector, level) -> points, from lon/lat with h3 (not the stored columns)."""
    rows = [(res, h3.str_to_int(h3.latlng_to_cell(lat, lon, res)), sector, level)
            for lon, lat, sector, level in zip(points.lon, points.lat, points.sector_code,
                                               points.level, strict=True)
            for res in RESOLUTIONS]
    return pd.Series(1, index=pd.MultiIndex.from_tuples(rows)).groupby(level=[0, 1, 2, 3]) \
        .sum().to_dict()


def stored_counts(conn) -> dict[tuple, int]:
    rows = conn.execute(text("SELECT res, cell, sector_code, level, n FROM risk_point_h3_counts"))
    return {(res, cell, sector, level): n for res, cell, sector, level, n in rows}


def cells_of(lon: float, lat: float) -> dict[str, int]:
    return {f"h3_r{res}": h3.str_to_int(h3.latlng_to_cell(lat, lon, res)) for res in RESOLUTIONS}


INSERT = text(f"""
    INSERT INTO risk_points (id, code, name, sector_code, category, level, address, grid_code,
                             {", ".join(f"h3_r{res}" for res in RESOLUTIONS)}, geom)
    VALUES (:id, :code, 'stored counts test', :sector_code, 'test', :level, 'test', :grid_code,
            {", ".join(f":h3_r{res}" for res in RESOLUTIONS)},
            ST_SetSRID(ST_MakePoint(:lon, :lat), 4326))
""")
MOVE = text(f"""
    UPDATE risk_points
       SET geom = ST_SetSRID(ST_MakePoint(:lon, :lat), 4326), level = :level,
           {", ".join(f"h3_r{res} = :h3_r{res}" for res in RESOLUTIONS)}
     WHERE id = :id
""")


def write_points(conn, points: pd.DataFrame) -> pd.DataFrame:
    """Inserts three points (one statement), moves and re-levels two, re-sectors a few in one
    statement, renames some (no count changes), deletes two: returns the oracle's frame."""
    sectors = sorted(points.sector_code.unique())
    grid = str(points.grid_code.iloc[0])
    new = [{"id": point_id, "sector_code": sector, "level": level, "grid_code": grid,
            "lon": lon, "lat": lat}
           for point_id, sector, level, lon, lat in zip(
               NEW_IDS, [sectors[0], sectors[-1], sectors[0]], [1, 4, 2],
               [106.5501, 106.5502, 107.9], [29.5601, 29.5602, 30.1], strict=True)]
    conn.execute(INSERT, [{**row, "code": f"RP-STORED-{row['id']}",
                           **cells_of(row["lon"], row["lat"])} for row in new])
    points = pd.concat([points, pd.DataFrame(new)], ignore_index=True)
    moved = [int(i) for i in points.id.iloc[[5, 6]]]
    for point_id, (lon, lat) in zip(moved, [(106.6, 29.6), (108.3, 30.7)], strict=True):
        conn.execute(MOVE, {"id": point_id, "lon": lon, "lat": lat, "level": 3,
                            **cells_of(lon, lat)})
        points.loc[points.id == point_id, ["lon", "lat", "level"]] = [lon, lat, 3]
    resectored = [int(i) for i in points.id.iloc[10:20]]
    conn.execute(text("UPDATE risk_points SET sector_code = :sector WHERE id = ANY(:ids)"),
                 {"sector": sectors[-1], "ids": resectored})
    points.loc[points.id.isin(resectored), "sector_code"] = sectors[-1]
    conn.execute(text("UPDATE risk_points SET name = name || ' (renamed)' WHERE id < 50"))
    deleted = [int(i) for i in points.id.iloc[[30, 31]]] + [NEW_IDS[2]]
    conn.execute(text("DELETE FROM risk_points WHERE id = ANY(:ids)"), {"ids": deleted})
    return points[~points.id.isin(deleted)]


def test_stored_counts_match_an_h3_oracle_after_writes(engine: Engine, sample_points):
    with engine.connect() as conn:
        assert stored_counts(conn) == oracle_counts(sample_points)
    with engine.connect() as conn, conn.begin() as transaction:
        after = write_points(conn, sample_points)
        assert stored_counts(conn) == oracle_counts(after)
        # No empty rows are left behind.
        assert conn.execute(text(
            "SELECT count(*) FROM risk_point_h3_counts WHERE n = 0")).scalar_one() == 0
        transaction.rollback()
    with engine.connect() as conn:
        assert stored_counts(conn) == oracle_counts(sample_points)


def test_truncate_and_reload_keep_the_counts(engine: Engine, sample_points):
    with engine.connect() as conn, conn.begin() as transaction:
        conn.execute(text("CREATE TEMP TABLE saved_points ON COMMIT DROP AS "
                          "SELECT * FROM risk_points"))
        conn.execute(text("TRUNCATE risk_points CASCADE"))
        assert stored_counts(conn) == {}
        conn.execute(text("INSERT INTO risk_points SELECT * FROM saved_points"))
        assert stored_counts(conn) == oracle_counts(sample_points)
        transaction.rollback()


def occupied_tiles(points: pd.DataFrame, z: int) -> list[morecantile.Tile]:
    return sorted({WEB_MERCATOR.tile(lon, lat, z)
                   for lon, lat in zip(points.lon, points.lat, strict=True)})


async def _ready(conn):
    return conn


async def compare_stored_and_live(database_url: str, points: pd.DataFrame) -> int:
    """Every third occupied tile z3-z11: the tile drawn from the stored counts is the same
    bytes as the one drawn from the points, plain and filtered. Returns how many tiles were
    compared."""
    engine = create_async_engine(database_url)
    compared = 0
    try:
        async with engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            layer = (await LayerRegistry.load(conn)).get("risk_points")
            codes = await SectorCodes().get(lambda: _ready(conn))
            sector = sorted(points.sector_code.unique())[0]
            for z in range(3, 12):
                for tile in occupied_tiles(points, z)[::3]:
                    for filters in (TileFilters(), TileFilters(levels=(1, 2)),
                                    TileFilters(sectors=(sector,), levels=(3,))):
                        assert hexagons.stored_counts_apply(layer, filters)
                        stored, live = [
                            await render_tile(conn, [layer], tile,
                                              TileOptions(filters, stored_counts=choice,
                                                          sectors=codes))
                            for choice in (True, False)]
                        assert stored.content == live.content, (tile, filters)
                    compared += 1
    finally:
        await engine.dispose()
    return compared


def test_hexagons_from_stored_counts_equal_the_live_aggregation(database_url: str, engine,
                                                                sample_points):
    assert asyncio.run(compare_stored_and_live(database_url, sample_points)) > 50


def test_stored_and_live_hexagons_stay_equal_after_writes(database_url: str, engine: Engine,
                                                          sample_points):
    saved = text("CREATE TABLE IF NOT EXISTS stored_test_backup AS SELECT * FROM risk_points")
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS stored_test_backup"))
        conn.execute(saved)
        after = write_points(conn, sample_points)
    try:
        assert asyncio.run(compare_stored_and_live(database_url, after)) > 50
        with engine.connect() as conn:
            assert stored_counts(conn) == oracle_counts(after)
    finally:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM risk_points"))
            conn.execute(text("INSERT INTO risk_points SELECT * FROM stored_test_backup"))
            conn.execute(text("DROP TABLE stored_test_backup"))
    with engine.connect() as conn:
        assert stored_counts(conn) == oracle_counts(sample_points)


def test_cql_filters_and_smaller_scopes_use_the_points():
    layer = type("L", (), {"source_table": "risk_points", "source_filter": None})()
    assert hexagons.stored_counts_apply(layer, TileFilters(levels=(1,)))
    assert not hexagons.stored_counts_apply(layer, TileFilters(cql="level = 1"))
    district = Scope(districts=frozenset({"500103"}))
    assert not hexagons.stored_counts_apply(layer, TileFilters(scope=district))


def test_a_new_point_shows_in_the_next_hexagon_tile(client: Client, engine: Engine,
                                                    sample_points):
    lon, lat = 106.5512, 29.5611
    tile = WEB_MERCATOR.tile(lon, lat, 8)
    path = f"/tiles/risk_points/8/{tile.x}/{tile.y}.mvt"
    cell = h3.str_to_int(h3.latlng_to_cell(lat, lon, hexagons.resolution_for_zoom(8)))

    def count_in_cell() -> tuple[int, str]:
        response = client.get(path)
        layer = mapbox_vector_tile.decode(response.content)["risk_points"]
        counts = {f["id"]: f["properties"]["count"] for f in layer["features"]}
        return counts.get(cell, 0), response.headers["etag"]

    before, etag = count_in_cell()
    row = {"id": NEW_IDS[0], "code": "RP-STORED-HEX", "sector_code": "facility_operation",
           "level": 1, "grid_code": str(sample_points.grid_code.iloc[0]), "lon": lon, "lat": lat,
           **cells_of(lon, lat)}
    with engine.begin() as conn:
        conn.execute(INSERT, row)
    # Outside twin: wait for the server to have the new version (twin's own writes do).
    assert announce(engine.url.render_as_string(hide_password=False)) == set()
    try:
        assert client.get(path, headers={"If-None-Match": etag}).status_code == 200
        after, new_etag = count_in_cell()
        assert after == before + 1 and new_etag != etag
    finally:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM risk_points WHERE id = :id"), {"id": NEW_IDS[0]})
        assert announce(engine.url.render_as_string(hide_password=False)) == set()
    assert count_in_cell()[0] == before


def test_a_cell_without_a_stored_outline_is_drawn_and_stored(client: Client, engine: Engine,
                                                             sample_points):
    """Points written by anyone may bring cells no outline was stored for: the tile stores
    the outline (as h3 draws it) and still shows the hexagon with its whole count."""
    lon, lat = 106.5512, 29.5611
    z = 9
    tile = WEB_MERCATOR.tile(lon, lat, z)
    cell = h3.str_to_int(h3.latlng_to_cell(lat, lon, hexagons.resolution_for_zoom(z)))
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM h3_cell_outlines WHERE cell = :cell"), {"cell": cell})
    # Every level, asked for explicitly: a cache key no other test has used.
    response = client.get(f"/tiles/risk_points/{z}/{tile.x}/{tile.y}.mvt?level=4,3,2,1")
    layer = mapbox_vector_tile.decode(response.content)["risk_points"]
    counts = {f["id"]: f["properties"]["count"] for f in layer["features"]}
    res = hexagons.resolution_for_zoom(z)
    expected = sum(1 for x, y in zip(sample_points.lon, sample_points.lat, strict=True)
                   if h3.str_to_int(h3.latlng_to_cell(y, x, res)) == cell)
    assert counts[cell] == expected > 0
    with engine.connect() as conn:
        stored = conn.execute(text(
            "SELECT ST_AsBinary(ST_Transform(outline, 4326)) FROM h3_cell_outlines "
            "WHERE cell = :cell"), {"cell": cell}).scalar_one()
    oracle = shapely.Polygon([(x, y) for y, x in h3.cell_to_boundary(h3.int_to_str(cell))])
    assert shapely.from_wkb(stored).equals_exact(oracle, 1e-9)


def test_cached_tile_revalidates_and_gzips(client: Client):
    """The precomputed headers: the same ETag plain, gzipped and on a 304."""
    path = "/tiles/risk_points/8/207/107.mvt"
    first = client.get(path, headers={"Accept-Encoding": "identity"})
    assert first.status_code == 200 and "content-encoding" not in first.headers
    cached = client.get(path, headers={"If-None-Match": first.headers["etag"]})
    assert cached.status_code == 304 and cached.headers["etag"] == first.headers["etag"]
    assert "no-cache" in cached.headers["cache-control"]
    with client.stream("GET", path, headers={"Accept-Encoding": "gzip"}) as zipped:
        raw = b"".join(zipped.iter_raw())
    assert zipped.headers["content-encoding"] == "gzip"
    assert zipped.headers["etag"] == first.headers["etag"]
    assert gzip.decompress(raw) == first.content


async def versions_after_a_write(database_url: str, engine: Engine) -> tuple[int, int, int]:
    """A read already on its way returns the old version; a read that starts after the write
    (while that one is still pending) gets the new one."""
    async_engine = create_async_engine(database_url)
    versions = DataVersions(async_engine)
    try:
        before = (await versions.read())["risk_points"]
        in_flight = asyncio.ensure_future(versions.read())
        await asyncio.sleep(0)  # its query is on its way
        with engine.begin() as conn:
            conn.execute(text("UPDATE risk_points SET name = name WHERE id = 1"))
        after = await versions.read()
        await in_flight
        together = await asyncio.gather(*(versions.read() for _ in range(20)))
        assert all(found == together[0] for found in together)
        return before, after["risk_points"], together[0]["risk_points"]
    finally:
        await versions.close()
        await async_engine.dispose()


def test_data_versions_are_never_older_than_the_request(database_url: str, engine: Engine):
    before, after, later = asyncio.run(versions_after_a_write(database_url, engine))
    assert after == before + 1 and later == after


def test_a_live_sibling_process_keeps_its_running_jobs(engine: Engine, tmp_path: Path):
    job = text("""
        INSERT INTO upload_jobs (id, layer_id, action, state, progress, step, reasons, report,
                                 params, file_name, created_by)
        VALUES ('stored-test-job', 'risk_points', 'create', 'running', 50, 'writing', '[]',
                '{}', '{}', 'x.geojson', 'test')
    """)
    first = _recover_if_alone(engine, tmp_path)  # a live server process
    try:
        with engine.begin() as conn:
            conn.execute(job)
        second = _recover_if_alone(engine, tmp_path)  # a sibling worker starting
        second.invalidate()
        with engine.connect() as conn:
            state = conn.execute(text(
                "SELECT state FROM upload_jobs WHERE id = 'stored-test-job'")).scalar_one()
        assert state == "running"
    finally:
        first.invalidate()
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM upload_jobs WHERE id = 'stored-test-job'"))


def test_worker_processes_get_the_settings_serve_was_given(monkeypatch):
    settings = cli.demo_access(Settings(workers=2))
    monkeypatch.setenv(cli.WORKER_SETTINGS_ENV,
                       base64.b64encode(pickle.dumps(settings)).decode())
    app = cli.worker_app()
    assert app.state.settings == settings
    assert app.state.settings.auth.anonymous_role == "planner"
    assert os.environ[cli.WORKER_SETTINGS_ENV]


def test_tiles_survive_their_connections_being_dropped(client: Client, database_url: str):
    """What a PostgreSQL restart leaves behind: every pooled connection dead. The tile pool
    has no pre-ping and the version reader holds its own connection; both retry once."""
    paths = [f"/tiles/risk_points/8/207/107.mvt?level={level}" for level in (1, 2, 3)]
    assert client.get(paths[0]).status_code == 200
    with psycopg.connect(libpq(database_url), autocommit=True) as admin:
        killed = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchone()[0]
    assert killed >= 2
    # A tile built afresh (a new filter) and one from the cache: both need the versions.
    for path in (paths[1], paths[0], paths[2]):
        response = client.get(path)
        assert response.status_code == 200, response.text

"""Staying up: a statement timeout on every API query, a full pool that answers instead of
hanging, a connection terminated mid-query. A PostGIS stop and start under load is
tests/test_fault_recovery.py."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import morecantile
import psycopg
import pytest
from sqlalchemy import Engine, create_engine, text

from data_samples.load import load_sample
from tests.databases import libpq
from tests.servers import LiveServer
from twin.core.cluster import ManagedCluster
from twin.core.db import async_engine
from twin.core.settings import AuthSettings, DatabaseSettings, Settings
from twin.migrate import upgrade

KEY = "resilience-editor-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
TMS = morecantile.tms.get("WebMercatorQuad")


def api_settings(database_url: str, **db) -> Settings:
    return Settings(database_url=database_url, db=DatabaseSettings(**db),
                    auth=AuthSettings(keys={KEY: "gis-editor:resilience"}))


@contextmanager
def table_locked(database_url: str, table: str) -> Iterator[None]:
    """Holds an ACCESS EXCLUSIVE lock on ``table``: every query that reads it waits, as long
    as the lock is held, like a runaway query would run on (and PostgreSQL counts lock waits
    against statement_timeout)."""
    with psycopg.connect(libpq(database_url)) as conn:
        conn.execute(f'LOCK TABLE "{table}" IN ACCESS EXCLUSIVE MODE')
        try:
            yield
        finally:
            conn.rollback()


def busy_backends(database_url: str) -> list[tuple]:
    """Statements still running in the database, other than this check's own and those of
    the servers' background jobs (escalation, detectors, push listeners: labelled ``twin
    ...`` by twin.core.db.async_engine), which run whenever they are due."""
    with psycopg.connect(libpq(database_url), autocommit=True) as conn:
        return conn.execute(
            "SELECT pid, state, wait_event_type, query FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND state = 'active' AND application_name NOT LIKE 'twin %'").fetchall()


@pytest.fixture(scope="module")
def spot(engine: Engine) -> tuple[float, float]:
    """A point inside the sample city (on a grid cell), for /query/locate."""
    with engine.connect() as conn:
        lon, lat = conn.execute(text(
            "SELECT ST_X(p), ST_Y(p) FROM (SELECT ST_PointOnSurface(geom) AS p FROM admin_units "
            "WHERE level = 'grid' ORDER BY code LIMIT 1) AS s")).one()
    return lon, lat


def test_a_runaway_query_gets_504_and_leaves_the_database_clean(engine, database_url, spot):
    h3 = "/query/h3?res=7"
    locate = f"/query/locate?lon={spot[0]}&lat={spot[1]}"
    with LiveServer(api_settings(database_url, statement_timeout_ms=800)) as live, \
            httpx.Client(base_url=live.url, headers=AUTH, timeout=30) as client:
        before = client.get(h3)
        assert before.status_code == 200, before.text
        with table_locked(database_url, "risk_points"):
            started = time.monotonic()
            stuck = client.get(h3)
            waited = time.monotonic() - started
            assert stuck.status_code == 504, stuck.text
            assert stuck.json()["code"] == "StatementTimeout"
            assert "800 ms" in stuck.json()["description"]
            assert "TWIN_DB_STATEMENT_TIMEOUT_MS" in stuck.json()["description"]
            assert 0.7 < waited < 10
            # Nothing of the cancelled statement is left running, and the server goes on
            # serving what does not need the locked table.
            assert busy_backends(database_url) == []
            assert client.get(locate).status_code == 200
        after = client.get(h3)
        assert after.status_code == 200 and after.json() == before.json()
    assert busy_backends(database_url) == []


def test_a_full_pool_answers_503_instead_of_hanging(engine, database_url, spot):
    """One connection, held by a stuck query: the next request gets 503 with Retry-After
    after the pool timeout rather than waiting its turn behind the stuck one."""
    settings = api_settings(database_url, pool_size=1, max_overflow=0, pool_timeout=0.5,
                            statement_timeout_ms=4000)
    locate = f"/query/locate?lon={spot[0]}&lat={spot[1]}"
    with LiveServer(settings) as live, \
            httpx.Client(base_url=live.url, headers=AUTH, timeout=30) as client:
        assert client.get(locate).status_code == 200
        stuck: list[httpx.Response] = []
        with table_locked(database_url, "risk_points"):
            holder = threading.Thread(target=lambda: stuck.append(client.get("/query/h3?res=6")))
            holder.start()
            time.sleep(0.5)
            started = time.monotonic()
            queued = client.get(locate)
            waited = time.monotonic() - started
            holder.join()
        assert queued.status_code == 503, queued.text
        assert queued.headers["retry-after"] and "busy" in queued.json()["description"]
        assert waited < 3
        assert stuck[0].status_code == 504
        assert client.get(locate).status_code == 200


def test_a_connection_terminated_mid_query_gets_503(engine, database_url, spot):
    """What each in-flight query meets when PostGIS shuts down: "terminating connection due
    to administrator command". The request answers 503 with Retry-After, the dead connection
    leaves the pool, and the same client's next requests are answered."""
    h3 = "/query/h3?res=5"
    with LiveServer(api_settings(database_url, pool_size=2, max_overflow=0)) as live, \
            httpx.Client(base_url=live.url, headers=AUTH, timeout=30) as client:
        assert client.get(h3).status_code == 200
        answers: list[httpx.Response] = []
        with table_locked(database_url, "risk_points"):
            waiting = threading.Thread(target=lambda: answers.append(client.get(h3)))
            waiting.start()
            waiter = None
            while waiter is None and waiting.is_alive():
                waiter = next((row[0] for row in busy_backends(database_url)
                               if row[2] == "Lock"), None)
            with psycopg.connect(libpq(database_url), autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (waiter,))
            waiting.join()
        assert answers[0].status_code == 503, answers[0].text
        assert answers[0].headers["retry-after"]
        for _ in range(3):
            assert client.get(h3).status_code == 200
        assert client.get(f"/query/locate?lon={spot[0]}&lat={spot[1]}").status_code == 200


def test_a_cold_start_under_load_does_not_starve_the_pool(engine, database_url, spot):
    """Many tile requests at once on a fresh server: each holds a pooled connection and needs
    the layer registry, which is loaded on first use. Loaded from the same pool, that was a
    deadlock until the pool timeout (every request 503); it has a connection of its own."""
    settings = api_settings(database_url, pool_size=2, max_overflow=0, pool_timeout=10)
    tile = TMS.tile(spot[0], spot[1], 12)
    paths = [f"/tiles/{layer}/{tile.z}/{tile.x}/{tile.y}.mvt" for layer in
             ("risk_points", "districts", "roads", "response_teams")] * 3
    with LiveServer(settings) as live, \
            httpx.Client(base_url=live.url, headers=AUTH, timeout=30) as client:
        with ThreadPoolExecutor(len(paths)) as pool:
            statuses = list(pool.map(lambda path: client.get(path).status_code, paths))
    assert statuses == [200] * len(paths)


# --- a cluster of a test's own (tests/test_fault_recovery.py stops and starts it) --------

def loaded_cluster(cluster: ManagedCluster, sample_dir: Path) -> str:
    cluster.up()
    url = cluster.url()
    engine = create_engine(url)
    upgrade(engine)
    load_sample(engine, sample_dir)
    engine.dispose()
    return url


def test_a_stuck_tile_gets_504_and_the_next_one_is_served(engine, database_url):
    """Tiles run on the driver directly (tiles/sql.py): its cancelled statement must still
    be a 504 naming the timeout, not a 500, and the connection must serve the next tile."""
    tile = TMS.tile(106.55, 29.56, 14)
    path = f"/tiles/risk_points/14/{tile.x}/{tile.y}.mvt?aggregate=false&level=1,2"
    with LiveServer(api_settings(database_url, statement_timeout_ms=800)) as live, \
            httpx.Client(base_url=live.url, headers=AUTH, timeout=30) as client:
        with table_locked(database_url, "risk_points"):
            stuck = client.get(path)
            assert stuck.status_code == 504, stuck.text
            assert stuck.json()["code"] == "StatementTimeout"
            assert "TWIN_DB_STATEMENT_TIMEOUT_MS" in stuck.json()["description"]
        served = client.get(path)
        assert served.status_code == 200 and served.content
    assert busy_backends(database_url) == []


def test_pool_connections_carry_their_server_settings(database_url):
    """The tile pool's connections run no parallel workers, and keep the statement timeout."""

    async def show() -> tuple[str, str]:
        pool = async_engine(api_settings(database_url, statement_timeout_ms=1234),
                            server_settings={"max_parallel_workers_per_gather": "0"})
        try:
            async with pool.connect() as conn:
                workers = (await conn.execute(text("SHOW max_parallel_workers_per_gather")))
                timeout = (await conn.execute(text("SHOW statement_timeout")))
                return workers.scalar_one(), timeout.scalar_one()
        finally:
            await pool.dispose()

    assert asyncio.run(show()) == ("0", "1234ms")

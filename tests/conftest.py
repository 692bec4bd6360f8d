"""Fixtures: a real PostGIS (twin's managed cluster), the small sample city, a live server.

The suite works on its own database (``twin_test``) in the managed cluster, created fresh
for each run, or on ``TWIN_TEST_DATABASE_URL`` when that is set.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pandas as pd
import psycopg
import pyogrio
import pytest
from sqlalchemy import Engine, create_engine, text

from data_samples.load import load_sample
from tests.databases import libpq
from tests.sensors import SUB_SECOND, forget_readings
from tests.servers import LiveServer, ServerProcess, free_port
from tests.uploads import upload_settings
from twin.core.cluster import ManagedCluster
from twin.core.settings import DatabaseSettings, Settings
from twin.migrate import upgrade

# Parallel runs (several working copies on one cluster) each set their own database name.
TEST_DATABASE = os.environ.get("TWIN_TEST_DATABASE", "twin_test")


def _fresh_test_database(cluster: ManagedCluster) -> str:
    with psycopg.connect(libpq(cluster.url("postgres")), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {TEST_DATABASE} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {TEST_DATABASE}")
    return cluster.url(TEST_DATABASE)


@pytest.fixture(scope="session")
def database_url() -> str:
    external = os.environ.get("TWIN_TEST_DATABASE_URL")
    if external:
        return external
    cluster = ManagedCluster(Settings())
    cluster.up()
    return _fresh_test_database(cluster)


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small sample city, generated afresh so generator changes are always tested."""
    from data_samples.generate import generate

    out = tmp_path_factory.mktemp("sample") / "small"
    generate(out, "small")
    return out


@pytest.fixture(scope="session")
def engine(database_url: str, sample_dir: Path) -> Iterator[Engine]:
    engine = create_engine(database_url, pool_pre_ping=True)
    upgrade(engine)
    load_sample(engine, sample_dir)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def server(engine: Engine, database_url: str) -> Iterator[LiveServer]:
    with LiveServer(Settings(database_url=database_url)) as live:
        yield live


@pytest.fixture()
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


@pytest.fixture(scope="session")
def server_process(engine: Engine, database_url: str) -> Iterator[ServerProcess]:
    with ServerProcess(database_url) as live:
        yield live


# --- sensors, and the readings a module posts (tests/sensors.py) ----------------------------

@pytest.fixture(scope="module")
def sensors(engine: Engine) -> pd.DataFrame:
    """Every sensor's kind and value range, by id."""
    return pd.read_sql(text("SELECT id, kind, min_value, max_value FROM sensors ORDER BY id"),
                       engine).set_index("id")


@pytest.fixture(scope="module")
def forget_posted_readings(engine: Engine) -> Iterator[None]:
    """After the module, the readings it posted (those with a sub-second mark) are gone again,
    and the latest reading of each sensor they touched is again the newest one left. A module
    asks for it with ``pytestmark = pytest.mark.usefixtures("forget_posted_readings")``."""
    yield
    with engine.begin() as conn:
        forget_readings(conn, SUB_SECOND)


# --- a cluster of a test's own, and the upload server ------------------------------------

@pytest.fixture()
def own_cluster(tmp_path) -> ManagedCluster:
    """A cluster of this test's own, so stopping it does not disturb the rest of the suite."""
    settings = Settings(home=tmp_path / "home", db=DatabaseSettings(port=free_port()))
    cluster = ManagedCluster(settings)
    yield cluster
    cluster.down()


@pytest.fixture(scope="session")
def uploads_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("uploads")


@pytest.fixture(scope="session")
def upload_server(engine: Engine, database_url: str, uploads_dir: Path) -> Iterator[LiveServer]:
    with LiveServer(upload_settings(database_url, uploads_dir)) as live:
        yield live


@pytest.fixture()
def api(upload_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=upload_server.url, timeout=60) as client:
        yield client


# --- GDAL as a client (its OAPIF driver, through pyogrio) -----------------------------------

@pytest.fixture(scope="module")
def oapif(server_process: ServerProcess) -> str:
    return f"OAPIF:{server_process.url}"


@pytest.fixture()
def gdal_waits_for_the_server() -> Iterator[None]:
    """layers/ingest_vector.py gives this process's GDAL a 1 s HTTP timeout (an upload never
    waits on the network); a page of features can take longer on a busy machine."""
    before = pyogrio.get_gdal_config_option("GDAL_HTTP_TIMEOUT")
    pyogrio.set_gdal_config_options({"GDAL_HTTP_TIMEOUT": "60"})
    yield
    pyogrio.set_gdal_config_options({"GDAL_HTTP_TIMEOUT": None if before is None else str(before)})

"""Fixtures: a real PostGIS (twin's managed cluster), the small sample city, a live server.

The suite works on its own database (``twin_test``) in the managed cluster, created fresh
for each run, or on ``TWIN_TEST_DATABASE_URL`` when that is set.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg
import pytest
import uvicorn
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url

from data_samples.load import load_sample
from twin.api.app import create_app
from twin.core.cluster import ManagedCluster
from twin.core.settings import Settings
from twin.migrate import upgrade

# Parallel runs (several working copies on one cluster) each set their own database name.
TEST_DATABASE = os.environ.get("TWIN_TEST_DATABASE", "twin_test")


def _fresh_test_database(cluster: ManagedCluster) -> str:
    admin = cluster.url("postgres").replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(admin, autocommit=True) as conn:
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


# Issue 7: anonymous access is off by default. Test servers read anonymously as a planner (like
# `make run`'s demo) unless a test's settings say otherwise, and know these keys.
EDITOR_KEY = "fixture-editor-key-0123456789"
ADMIN_KEY = "fixture-admin-key-0123456789"
EDITOR = {"Authorization": f"Bearer {EDITOR_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
FIXTURE_KEYS = {EDITOR_KEY: "gis-editor:fixture-editor", ADMIN_KEY: "admin:fixture-admin"}


def with_test_access(settings: Settings) -> Settings:
    """Anonymous planner unless ``settings.auth`` sets ``anonymous_role``; the fixture keys
    besides the test's own."""
    auth = settings.auth
    update: dict = {"keys": {**FIXTURE_KEYS, **auth.keys}}
    if "anonymous_role" not in auth.model_fields_set:
        update["anonymous_role"] = "planner"
    return settings.model_copy(update={"auth": auth.model_copy(update=update)})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """A real uvicorn server on loopback, in a thread of the test process."""

    def __init__(self, settings: Settings):
        self.port = free_port()
        self.settings = settings = with_test_access(settings)
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port,
                                log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def server(engine: Engine, database_url: str) -> Iterator[LiveServer]:
    with LiveServer(Settings(database_url=database_url)) as live:
        yield live


@pytest.fixture()
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


class ServerProcess:
    """``twin serve`` in a process of its own, for clients that hold the GIL while they wait
    on the network (GDAL through pyogrio would deadlock an in-process server thread)."""

    def __init__(self, database_url: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {"TWIN_AUTH_ANONYMOUS_ROLE": "planner", "TWIN_AUTH_KEYS": json.dumps(FIXTURE_KEYS),
               **os.environ, "TWIN_DATABASE_URL": database_url, "TWIN_PORT": str(self.port)}
        self.process = subprocess.Popen([sys.executable, "-m", "twin.cli", "serve"], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def __enter__(self) -> ServerProcess:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"twin serve did not start: {self.process.stderr.read()!r}")
            time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="session")
def server_process(engine: Engine, database_url: str) -> Iterator[ServerProcess]:
    with ServerProcess(database_url) as live:
        yield live


@contextmanager
def sibling_database(database_url: str, suffix: str) -> Iterator[str]:
    """A fresh, migrated database beside the suite's (same server), dropped afterwards: for
    tests whose random writes, or whose server processes, must not meet the shared one's."""
    url = make_url(database_url)
    name = f"{url.database}_{suffix}"
    admin = url.set(drivername="postgresql", database="postgres").render_as_string(
        hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    sibling = url.set(database=name).render_as_string(hide_password=False)
    engine = create_engine(sibling)
    upgrade(engine)
    engine.dispose()
    try:
        yield sibling
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

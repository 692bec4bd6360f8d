"""Test servers and their keys: a uvicorn server in a thread of the test process
(``LiveServer``), ``twin serve`` in a process of its own (``ServerProcess``), and a fresh
database beside the suite's (``sibling_database``). conftest.py builds the shared fixtures from
these; test modules import them from here.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import psycopg
import uvicorn
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from twin.api.app import create_app
from twin.core.settings import AuthSettings, Settings
from twin.migrate import upgrade

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


def free_port_run(count: int = 1) -> int:
    """The first of ``count`` consecutive free ports below Linux's ephemeral range
    (32768-60999), so a service restarted on one cannot find it taken meanwhile as the source
    port of some client's connection."""
    for base in random.sample(range(20000, 32000 - count), 200):
        socks = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        return base
    raise RuntimeError(f"no {count} free consecutive ports between 20000 and 32000")


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

    def client(self, **options) -> httpx.Client:
        """An HTTP client of this server (30 s timeout unless ``options`` say otherwise)."""
        return httpx.Client(**{"base_url": self.url, "timeout": 30, **options})


def closed_settings(database_url: str, **auth) -> Settings:
    """Anonymous access off, as twin ships; ``auth`` the rest of the access settings."""
    return Settings(database_url=database_url, auth=AuthSettings(anonymous_role="", **auth))


class ServerProcess:
    """``twin serve`` in a process of its own, for clients that hold the GIL while they wait
    on the network (GDAL through pyogrio would deadlock an in-process server thread)."""

    def __init__(self, database_url: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {"TWIN_AUTH_ANONYMOUS_ROLE": "planner", "TWIN_AUTH_KEYS": json.dumps(FIXTURE_KEYS),
               **os.environ, "TWIN_DATABASE_URL": database_url, "TWIN_PORT": str(self.port)}
        # The log goes to a file, never a pipe: a pipe nobody reads fills up and a worker
        # that logs then blocks in the middle of a request.
        self._log = tempfile.TemporaryFile()
        self.process = subprocess.Popen([sys.executable, "-m", "twin.cli", "serve"], env=env,
                                        stdout=subprocess.DEVNULL, stderr=self._log)

    def log(self) -> str:
        """What the server has written to its log (stderr) so far."""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def __enter__(self) -> ServerProcess:
        # Generous: on a busy 2-core machine two uvicorn workers take a while to come up.
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"twin serve did not start: {self.log()!r}")
            time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


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

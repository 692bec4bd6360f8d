"""The managed cluster: idempotent start, and an API that rides out a database restart."""

from __future__ import annotations

import time

import httpx

from tests.servers import LiveServer
from twin.core.cluster import ManagedCluster
from twin.core.settings import Settings


def wait_for_status(client: httpx.Client, status: int, timeout_s: float = 15.0) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.get("/healthz")
        if response.status_code == status or time.monotonic() > deadline:
            return response
        time.sleep(0.2)


def test_db_up_twice_is_harmless(own_cluster: ManagedCluster):
    own_cluster.up()
    first = own_cluster.status()
    own_cluster.up()
    second = own_cluster.status()
    assert first.running and second.running
    assert first == second
    # The data folder and the generated password survive the second call.
    assert (own_cluster.pgdata / "PG_VERSION").exists()
    assert own_cluster.url() == ManagedCluster(own_cluster.settings).url()


def test_healthz_follows_the_database_without_restarting_the_app(own_cluster: ManagedCluster):
    own_cluster.up()
    settings = Settings(home=own_cluster.settings.home, database_url=own_cluster.url())
    with LiveServer(settings) as live, httpx.Client(base_url=live.url, timeout=20) as client:
        assert client.get("/healthz").status_code == 200

        own_cluster.down()
        down = wait_for_status(client, 503)
        assert down.status_code == 503
        assert down.headers["retry-after"]
        assert down.json()["status"] == "unavailable"

        own_cluster.up()
        back = wait_for_status(client, 200)
        assert back.status_code == 200, back.text
        assert back.json() == {"status": "ok", "database": "ok"}

"""`twin cluster up|status|down` (issue 15): the primary, a hot standby, two `twin serve`
nodes and nginx, started from the project's own files on a home of the test's own, driven
through the real CLI.

Oracles: the processes themselves (pids alive or gone), PostgreSQL (the standby reports
itself in recovery), and HTTP through nginx and to each node.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg
import pytest

from tests.clusters import ClusterHome, cluster_home, twin
from tests.databases import libpq
from twin.core.cluster import process_alive

NODES, STANDBYS = 2, 1


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterHome]:
    with cluster_home(NODES, STANDBYS, "twin-topology-test-",
                      {"TWIN_AUTH_ANONYMOUS_ROLE": "planner"}) as made:
        yield made


def test_every_part_runs_and_nginx_serves_from_both_nodes(cluster: ClusterHome):
    topology = cluster.topology()
    status = topology.status()
    assert [node.healthy for node in status.nodes] == [True] * NODES
    assert "running" in status.proxy
    # Each node answers on its own port, and through nginx.
    for n in range(1, NODES + 1):
        assert httpx.get(f"http://127.0.0.1:{cluster.port + n}/healthz").status_code == 200
    with httpx.Client(base_url=cluster.url, timeout=30) as client:
        answers = [client.get("/collections") for _ in range(20)]
    assert {answer.status_code for answer in answers} == {200}
    assert "collections" in answers[0].json()
    # The nodes use the primary, and their limits are shared through it.
    env = topology.node_env(1)
    assert env["TWIN_DATABASE_URL"] == topology.cluster.url()
    assert env["TWIN_LIMITS_SHARED"] == "postgres"
    # `twin cluster status` says as much.
    said = twin(cluster.env, "cluster", "status")
    assert said.returncode == 0
    assert said.stderr.count("healthy") == NODES, said.stderr


def test_the_standby_replays_the_primary(cluster: ClusterHome):
    topology = cluster.topology()
    (standby,) = topology.standbys()
    with psycopg.connect(libpq(standby.url("twin")), autocommit=True) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        tables = {row[0] for row in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"risk_points", "layers", "outbox", "rate_buckets"} <= tables


def test_a_node_killed_under_load_costs_no_get(cluster: ClusterHome):
    """SIGKILL of node 2 (its whole process group) while GETs go through nginx: none fails
    (nginx retries a GET on the next node), then `cluster up` brings the node back."""
    topology = cluster.topology()
    pid = topology.status().nodes[1].pid
    assert pid is not None

    def get(i: int) -> int:
        with httpx.Client(base_url=cluster.url, timeout=30) as client:
            return client.get("/collections").status_code

    with ThreadPoolExecutor(4) as pool:
        first = list(pool.map(get, range(40)))
        os.killpg(pid, signal.SIGKILL)
        after = list(pool.map(get, range(200)))
    assert first.count(200) == len(first)
    assert after.count(200) == len(after), sorted(set(after))
    assert not process_alive(pid)
    again = twin(cluster.env, "cluster", "up", "--nodes", str(NODES),
                 "--standbys", str(STANDBYS))
    assert again.returncode == 0, again.stderr
    assert [node.healthy for node in topology.status().nodes] == [True] * NODES


def test_down_stops_every_process(cluster: ClusterHome):
    topology = cluster.topology()
    status = topology.status()
    pids = [node.pid for node in status.nodes]
    proxy_pid = topology.proxy.status().pid
    broker_pid = topology.broker.status().pid
    down = twin(cluster.env, "cluster", "down")
    assert down.returncode == 0, down.stderr
    assert not any(process_alive(pid) for pid in pids if pid)
    assert proxy_pid is not None and not process_alive(proxy_pid)
    assert broker_pid is not None and not process_alive(broker_pid)
    after = topology.status()
    assert not topology.cluster.status().running
    assert all("stopped" in text or "not running" in text for text in after.standbys), \
        after.standbys
    with pytest.raises(httpx.TransportError):
        httpx.get(cluster.url + "/healthz", timeout=2)

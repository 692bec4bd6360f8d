"""`twin cluster` on a home of a test module's own (tests/test_topology.py,
tests/test_scaleout.py): the environment its commands run with, its addresses, and the
fixture body that brings it up and always down again."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.servers import free_port, free_port_run
from twin.core.cluster import ManagedCluster
from twin.core.settings import PROJECT_ROOT, DatabaseSettings, Settings
from twin.core.topology import ManagedTopology


def twin(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real CLI, in a process of its own."""
    return subprocess.run([sys.executable, "-m", "twin.cli", *args], env=env, cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=timeout)


class ClusterHome:
    """A cluster's home, ports and environment (``env``: this one's, the cluster's
    addresses, one worker per node, and ``extra``)."""

    def __init__(self, home: Path, db_port: int, port: int, extra: dict[str, str]):
        self.home, self.db_port, self.port = home, db_port, port
        self.env = {**os.environ, "TWIN_HOME": str(home), "TWIN_DB_PORT": str(db_port),
                    "TWIN_PORT": str(port), "TWIN_HOST": "127.0.0.1", "TWIN_WORKERS": "1",
                    "TWIN_MQTT_PORT": str(free_port()), **extra}
        for name in ("TWIN_DATABASE_URL", "TWIN_MQTT_URL"):
            self.env.pop(name, None)
        self.settings = Settings(home=home, db=DatabaseSettings(port=db_port), port=port,
                                 host="127.0.0.1")
        self.url = f"http://127.0.0.1:{port}"
        self.mqtt_url = f"mqtt://127.0.0.1:{self.env['TWIN_MQTT_PORT']}"

    def topology(self) -> ManagedTopology:
        return ManagedTopology(self.settings)

    def node_url(self, n: int) -> str:
        return f"http://127.0.0.1:{self.port + n}"

    def up(self, nodes: int, standbys: int) -> subprocess.CompletedProcess:
        return twin(self.env, "cluster", "up", "--nodes", str(nodes), "--standbys", str(standbys))


@contextmanager
def cluster_home(nodes: int, standbys: int, prefix: str,
                 extra: dict[str, str] | None = None) -> Iterator[ClusterHome]:
    """A cluster up on a fresh home (not under pytest's temporary folder: the database's OS
    user must reach it), brought down and removed afterwards whatever happened."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    made = ClusterHome(home, free_port_run(1 + 10 + standbys), free_port_run(1 + nodes),
                       extra or {})
    try:
        up = made.up(nodes, standbys)
        assert up.returncode == 0, up.stdout + up.stderr
        yield made
    finally:
        twin(made.env, "cluster", "down")
        ManagedCluster(made.settings).down()  # were `down` itself broken
        shutil.rmtree(home, ignore_errors=True)

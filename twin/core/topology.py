"""Several twin nodes on one machine (issue 15): `twin cluster up --nodes N --standbys M`.

What runs, all on loopback, all under one ``TWIN_HOME``:

* the managed PostGIS **primary** (twin/core/cluster.py), made ready for replication
  (twin/core/standby.py ``prepare_primary``);
* ``M`` hot **standbys** by streaming replication (``ManagedStandby``), on
  ``TWIN_DB_PORT + TWIN_STANDBY_PORT_OFFSET + k``;
* ``N`` **nodes**: ``twin serve`` processes, node n on ``TWIN_PORT + n`` with
  ``TWIN_HOME/nodes/<n>`` as its own home (its tile cache, upload spool, locks and shared
  memory are its own), the primary as its database (``TWIN_DATABASE_URL``) and the rate
  limits shared through it (``TWIN_LIMITS_SHARED=postgres``), and the standbys to read on
  (``TWIN_DB_STANDBY_URLS``, twin/core/replicas.py);
* **nginx** in front on ``TWIN_HOST:TWIN_PORT`` (twin/core/proxy.py): the address clients
  know, balancing the nodes, retrying a failed GET on the next one, and the shared cache;
* the MQTT **broker** (twin/core/broker.py, unless ``TWIN_MQTT_URL`` names one): every node
  is pointed at it, and one of them subscribes (``TWIN_MQTT_LEADER=database``: the holder of
  an advisory lock on the primary, twin/live/mqtt.py); the others take over when it ends.

Each node is a process group of its own whose pid is kept in ``nodes/<n>/node.pid``, so
``down`` (another `twin` invocation) stops them, and ``status`` finds them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from twin.core.broker import ManagedBroker
from twin.core.cluster import ManagedCluster, process_alive
from twin.core.errors import ClusterError
from twin.core.proxy import ManagedProxy
from twin.core.settings import PROJECT_ROOT, Settings
from twin.core.standby import ManagedStandby, prepare_primary

log = logging.getLogger("twin.core.topology")

# Seconds a node may take to answer /healthz after it was started.
NODE_START_S = 120.0
# Seconds a node may take to stop after SIGTERM before it is killed.
NODE_STOP_S = 30.0


@dataclass(frozen=True)
class NodeStatus:
    n: int
    port: int
    pid: int | None
    healthy: bool


@dataclass(frozen=True)
class TopologyStatus:
    primary: str
    standbys: list[str]
    nodes: list[NodeStatus]
    proxy: str
    broker: str

    def describe(self) -> str:
        lines = [f"primary: {self.primary}"]
        lines += [f"standby {k}: {text}" for k, text in enumerate(self.standbys, start=1)]
        lines += [f"node {node.n}: port {node.port}, "
                  + (f"pid {node.pid}, {'healthy' if node.healthy else 'not answering'}"
                     if node.pid else "stopped") for node in self.nodes]
        lines.append(f"proxy: {self.proxy}")
        lines.append(f"broker: {self.broker}")
        return "\n".join(lines)


class ManagedTopology:
    def __init__(self, settings: Settings, nodes: int | None = None,
                 standbys: int | None = None):
        if not settings.managed:
            raise ClusterError("twin cluster runs the managed primary: unset "
                               "TWIN_DATABASE_URL")
        self.settings = settings
        self.folder = settings.home / "nodes"
        self.cluster = ManagedCluster(settings)
        # Without counts (down, status): whatever a previous `up` left.
        self.nodes = nodes if nodes is not None else self._found("nodes")
        self.standby_count = standbys if standbys is not None else self._found("standbys")
        # Readings over MQTT: TWIN_MQTT_URL's broker, else the managed one of this home; one
        # node of all subscribes (an advisory lock on the primary), the others stand by.
        self.broker = ManagedBroker(settings)
        self.proxy = ManagedProxy(settings.home, settings.port, self.upstreams(),
                                  settings.proxy.cache_mb, settings.host, settings.proxy)

    def _found(self, kind: str) -> int:
        folder = self.settings.home / kind
        numbers = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] \
            if folder.is_dir() else []
        return max(numbers, default=0)

    def upstreams(self) -> list[str]:
        return [f"127.0.0.1:{self.node_port(n)}" for n in range(1, self.nodes + 1)]

    def node_port(self, n: int) -> int:
        return self.settings.port + n

    def standbys(self) -> list[ManagedStandby]:
        return [ManagedStandby(self.settings, k) for k in range(1, self.standby_count + 1)]

    # -- up / down ------------------------------------------------------------------------
    def up(self) -> TopologyStatus:
        """Start what is not running: primary, standbys, the broker, nodes, then nginx."""
        if self.nodes < 1:
            raise ClusterError("twin cluster up needs at least one node (--nodes)")
        self.cluster.up()
        prepare_primary(self.cluster)
        for standby in self.standbys():
            standby.up()
        if not self.settings.mqtt.url:
            self.broker.up()
        for n in range(1, self.nodes + 1):
            self._start_node(n)
        self.proxy.up()
        return self.status()

    def down(self) -> None:
        """Stop nginx, the nodes, the standbys and the primary (their data stays)."""
        self.proxy.down()
        for n in range(1, self.nodes + 1):
            self._stop_node(n)
        for standby in self.standbys():
            standby.down()
        if not self.settings.mqtt.url:
            self.broker.down()
        self.cluster.down()

    def status(self) -> TopologyStatus:
        return TopologyStatus(
            primary=self.cluster.status().describe(),
            standbys=[standby.status().describe() for standby in self.standbys()],
            nodes=[self._node_status(n) for n in range(1, self.nodes + 1)],
            proxy=self.proxy.status().describe(),
            broker=self.broker.status().describe())

    # -- nodes ----------------------------------------------------------------------------
    def node_home(self, n: int) -> Path:
        return self.folder / str(n)

    def node_env(self, n: int) -> dict[str, str]:
        """Node n's environment: this one's, with its own home and port, the primary as its
        database, limits shared through it, the standbys to read on, and no broker."""
        env = {key: value for key, value in os.environ.items()
               if key not in ("TWIN_UPLOADS_DIR",)}
        env.update({
            "TWIN_HOME": str(self.node_home(n)),
            "TWIN_HOST": "127.0.0.1",
            "TWIN_PORT": str(self.node_port(n)),
            "TWIN_DATABASE_URL": self.cluster.url(),
            "TWIN_LIMITS_SHARED": "postgres",
            # Proves to the node that a request came through this cluster's nginx.
            "TWIN_PROXY_SECRET": self.proxy.secret(),
            "TWIN_MQTT_URL": (self.settings.mqtt.url
                              or f"mqtt://127.0.0.1:{self.settings.mqtt.port}"),
            "TWIN_MQTT_LEADER": "database",
            "TWIN_DB_STANDBY_URLS": json.dumps([standby.url() for standby in self.standbys()]),
        })
        return env

    def _pid_file(self, n: int) -> Path:
        return self.node_home(n) / "node.pid"

    def _pid(self, n: int) -> int | None:
        try:
            pid = int(self._pid_file(n).read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if process_alive(pid) else None

    def _healthy(self, n: int) -> bool:
        try:
            answer = httpx.get(f"http://127.0.0.1:{self.node_port(n)}/healthz", timeout=2)
        except httpx.HTTPError:
            return False
        return answer.status_code == 200

    def _node_status(self, n: int) -> NodeStatus:
        pid = self._pid(n)
        return NodeStatus(n, self.node_port(n), pid, pid is not None and self._healthy(n))

    def _start_node(self, n: int) -> None:
        if self._pid(n) is not None:
            log.info("node %d already runs (pid %d)", n, self._pid(n))
            return
        home = self.node_home(n)
        home.mkdir(parents=True, exist_ok=True)
        with (home / "node.log").open("ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "twin.cli", "serve"], env=self.node_env(n),
                cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        self._pid_file(n).write_text(f"{process.pid}\n")
        deadline = time.monotonic() + NODE_START_S
        while not self._healthy(n):
            if process.poll() is not None or time.monotonic() > deadline:
                raise ClusterError(f"node {n} did not start on port {self.node_port(n)}; "
                                   f"see {home / 'node.log'}")
            time.sleep(0.2)
        log.info("node %d serves on 127.0.0.1:%d (pid %d)", n, self.node_port(n),
                 process.pid)

    def _stop_node(self, n: int) -> None:
        pid = self._pid(n)
        if pid is None:
            return
        # The node's process group: `twin serve` and its worker processes.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + NODE_STOP_S
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if process_alive(pid):
            log.warning("node %d did not stop within %.0f s: killed", n, NODE_STOP_S)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        self._pid_file(n).unlink(missing_ok=True)
        log.info("node %d stopped", n)


"""A ``twin serve`` with two worker processes, seen from outside: which process holds a
connection (the socket's owner in /proc, not anything the API says), a kept-alive connection
to each worker, and the probe layer's key, CSV and job waiting shared by the multi-worker tests.
"""

from __future__ import annotations

import http.client
import json
import os
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tests.servers import ServerProcess

KEY = "workers-test-editor-key-0123456789"
EDITOR = {"Authorization": f"Bearer {KEY}"}
LAYER = "workers_probe"
SAMPLES = 40  # fresh connections per check (at least; more until both workers answered)
PIN_S = 120  # seconds to find both workers among new connections (the kernel picks)


def points_csv(count: int, seed: int) -> bytes:
    """``count`` points over central Chongqing."""
    rng = np.random.default_rng(seed)
    lines = ["id,name,lon,lat"] + [
        f"{i},p{i},{lon:.6f},{lat:.6f}" for i, (lon, lat) in
        enumerate(zip(rng.uniform(106.4, 106.7, count), rng.uniform(29.4, 29.7, count),
                      strict=True))]
    return ("\n".join(lines) + "\n").encode()


# --- which process owns a connection --------------------------------------------------------

def descendants(pid: int) -> set[int]:
    children = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        children |= {int(c) for c in (task / "children").read_text().split()}
    return children.union(*(descendants(child) for child in children))


def socket_inode(server_port: int, client_port: int) -> str:
    """The inode of the server's end of the loopback connection from ``client_port``."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(address.split(":")[1], 16) for address in fields[1:3])
        if (local, remote) == (server_port, client_port):
            return fields[9]
    raise AssertionError(f"no server socket for client port {client_port}")


def owner(pids: set[int], inode: str) -> int:
    target = f"socket:[{inode}]"
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == target:
                    return pid
            except OSError:  # closed while listed
                continue
    raise AssertionError(f"no process of the server holds {target}")


class Fresh:
    """One new HTTP connection; ``worker`` is the process that accepted it (known once it
    has answered a request, i.e. after accept)."""

    def __init__(self, server: ServerProcess):
        self.server = server
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        self.conn.connect()
        self.worker: int | None = None

    def get(self, path: str, headers: dict | None = None) -> tuple[int, dict | None]:
        self.conn.request("GET", path, headers=headers or {})
        response = self.conn.getresponse()
        body = response.read()
        if self.worker is None:
            inode = socket_inode(self.server.port, self.conn.sock.getsockname()[1])
            self.worker = owner(descendants(self.server.process.pid), inode)
        is_json = response.getheader("content-type", "").endswith("json")
        return response.status, json.loads(body) if is_json else None

    def close(self) -> None:
        self.conn.close()


def on_fresh_connections(server: ServerProcess, check) -> set[int]:
    """Runs ``check(fresh)`` on at least SAMPLES new connections, and on more until two
    different processes have answered; returns the processes that answered.

    Which worker accepts a connection is the kernel's choice: on a busy machine one worker
    can take hundreds in a row. So the bound is in time, not in count."""
    workers: set[int] = set()
    deadline = time.monotonic() + PIN_S
    n = 0
    while n < SAMPLES or len(workers) < 2:
        assert time.monotonic() < deadline, f"only {workers} answered {n} connections"
        with closing(Fresh(server)) as fresh:
            check(fresh)
            workers.add(fresh.worker)
        n += 1
    assert server.process.pid not in workers  # the supervisor accepts nothing itself
    assert len(workers) == 2
    return workers


def one_per_worker(server: ServerProcess, connect: Callable[[], Any] | None = None
                   ) -> dict[int, Any]:
    """A kept-alive connection to each worker process, by its pid: new connections from
    ``connect()`` (one that has answered a request, so its ``worker`` is known; default a
    ``Fresh`` that asked for /healthz) until both workers have one, within PIN_S (which
    worker accepts is the kernel's choice; on a busy machine one can take hundreds in a
    row). The others are closed."""
    def fresh() -> Fresh:
        opened = Fresh(server)
        opened.get("/healthz")
        return opened

    connect = connect or fresh
    found: dict[int, Any] = {}
    deadline = time.monotonic() + PIN_S
    while len(found) < 2:
        assert time.monotonic() < deadline, f"only {set(found)} accepted connections"
        opened = connect()
        if opened.worker in found:
            opened.close()
        else:
            found[opened.worker] = opened
    assert server.process.pid not in found  # the supervisor accepts nothing itself
    return found


def pinned_connections(server: ServerProcess) -> tuple[Fresh, Fresh]:
    """Two open connections, each to a different worker process."""
    first, second = one_per_worker(server).values()
    return first, second


def wait_for_job(url: str, response: httpx.Response) -> None:
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    deadline = time.monotonic() + 120
    while (job := httpx.get(f"{url}/jobs/{job_id}", headers=EDITOR, timeout=30).json()
           )["state"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    assert job["state"] == "succeeded", job

"""``twin serve`` with two worker processes: a layer published, re-published, rolled back or
deleted through one of them is seen at once by every route of the other, on a fresh
connection. Which process answered a connection is read from the operating system (the
socket's owner in /proc), not from anything the API says; the oracle for the feature counts
is the CSV each version was made from."""

from __future__ import annotations

import http.client
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import closing, suppress
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

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


# --- what each route must show -------------------------------------------------------------

def collection_ids(fresh: Fresh) -> list[str]:
    status, body = fresh.get("/collections")
    assert status == 200, body
    return [c["id"] for c in body["collections"]]


def expect_published(count: int, version: int):
    def check(fresh: Fresh) -> None:
        assert LAYER in collection_ids(fresh), f"worker {fresh.worker}: /collections"
        status, layers = fresh.get("/layers")
        assert status == 200 and LAYER in [layer["id"] for layer in layers["layers"]]
        status, collection = fresh.get(f"/collections/{LAYER}")
        assert status == 200, (fresh.worker, collection)
        # Counted in the table the worker's registry points the layer at: the version's own.
        assert collection["featureCount"] == count, (fresh.worker, collection)
        status, items = fresh.get(f"/collections/{LAYER}/items?limit=1")
        assert status == 200 and items["numberMatched"] == count, (fresh.worker, items)
        status, tilejson = fresh.get(f"/tiles/{LAYER}/tilejson.json")
        assert status == 200, (fresh.worker, tilejson)
        status, _ = fresh.get(f"/tiles/{LAYER}/10/815/423.mvt")
        assert status in (200, 204), fresh.worker
        status, detail = fresh.get(f"/layers/{LAYER}", EDITOR)
        assert status == 200 and detail["current_version"] == version
    return check


def expect_deleted(fresh: Fresh) -> None:
    assert LAYER not in collection_ids(fresh), f"worker {fresh.worker}: /collections"
    status, layers = fresh.get("/layers")
    assert status == 200 and LAYER not in [layer["id"] for layer in layers["layers"]]
    for path in (f"/collections/{LAYER}", f"/collections/{LAYER}/items",
                 f"/tiles/{LAYER}/tilejson.json", f"/tiles/{LAYER}/10/815/423.mvt"):
        status, body = fresh.get(path)
        assert status == 404, (fresh.worker, path, status, body)


def warm(fresh: Fresh) -> None:
    """Every worker resolves its registry before the change under test."""
    assert LAYER not in collection_ids(fresh)


# --- the server ----------------------------------------------------------------------------

@pytest.fixture()
def two_workers(engine, database_url: str, monkeypatch, tmp_path) -> Iterator[ServerProcess]:
    monkeypatch.setenv("TWIN_WORKERS", "2")
    monkeypatch.setenv("TWIN_AUTH_KEYS", json.dumps({KEY: "gis-editor:workers-test"}))
    monkeypatch.setenv("TWIN_UPLOADS_DIR", str(tmp_path / "uploads"))
    with ServerProcess(database_url) as server:
        try:
            yield server
        finally:  # nothing left in the suite's database, whatever failed
            with suppress(httpx.HTTPError):  # (a test may have killed the server)
                httpx.delete(f"{server.url}/layers/{LAYER}", headers=EDITOR, timeout=30)


def wait_for_job(url: str, response: httpx.Response) -> None:
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    deadline = time.monotonic() + 120
    while (job := httpx.get(f"{url}/jobs/{job_id}", headers=EDITOR, timeout=30).json()
           )["state"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    assert job["state"] == "succeeded", job


def test_two_workers_see_every_change_of_the_other_at_once(two_workers: ServerProcess):
    url = two_workers.url
    first, second = points_csv(30, seed=1), points_csv(55, seed=2)
    on_fresh_connections(two_workers, warm)

    wait_for_job(url, httpx.post(f"{url}/layers", headers=EDITOR, timeout=60,
                                 files={"file": ("probe.csv", first)},
                                 data={"id": LAYER, "title": "workers probe"}))
    on_fresh_connections(two_workers, expect_published(first.count(b"\n") - 1, 1))

    wait_for_job(url, httpx.put(f"{url}/layers/{LAYER}", headers=EDITOR, timeout=60,
                                files={"file": ("probe.csv", second)}))
    on_fresh_connections(two_workers, expect_published(second.count(b"\n") - 1, 2))

    rolled = httpx.post(f"{url}/layers/{LAYER}/rollback?version=1", headers=EDITOR, timeout=30)
    assert rolled.status_code == 200, rolled.text
    on_fresh_connections(two_workers, expect_published(first.count(b"\n") - 1, 1))

    deleted = httpx.delete(f"{url}/layers/{LAYER}", headers=EDITOR, timeout=30)
    assert deleted.status_code == 204, deleted.text
    on_fresh_connections(two_workers, expect_deleted)


def test_workers_die_with_a_killed_server(two_workers: ServerProcess):
    """SIGKILL to ``twin serve`` takes its workers along: nothing keeps serving on the port
    or running the killed server's upload jobs. Its log said how many workers there were."""
    workers = on_fresh_connections(two_workers, warm)
    two_workers.process.kill()
    two_workers.process.wait()
    deadline = time.monotonic() + 10
    while not all(gone(pid) for pid in workers):
        assert time.monotonic() < deadline, f"workers {workers} outlived their server"
        time.sleep(0.05)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{two_workers.url}/healthz", timeout=2)
    # What the start-up log told the operator, once (the workers log nothing of it).
    log = two_workers.process.stderr.read().decode()
    assert log.count("with 2 worker processes (TWIN_WORKERS)") == 1, log
    assert log.count("are shared by the 2 worker processes through") == 1, log


def gone(pid: int) -> bool:
    """Reaped, or a zombie whose every thread has exited (the main thread turns zombie first;
    the others hold the process's sockets until they are gone too)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state == "Z" and len(list(Path(f"/proc/{pid}/task").iterdir())) <= 1
    except OSError:
        return True

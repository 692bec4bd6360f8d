"""``twin serve`` with two worker processes: a layer published, re-published, rolled back or
deleted through one of them is seen at once by every route of the other, on a fresh
connection. Which process answered a connection is read from the operating system (the
socket's owner in /proc), not from anything the API says; the oracle for the feature counts
is the CSV each version was made from."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import httpx
import pytest

from tests.servers import ServerProcess
from tests.workers import (
    EDITOR,
    KEY,
    LAYER,
    Fresh,
    on_fresh_connections,
    points_csv,
    wait_for_job,
)

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
    log = two_workers.log()
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

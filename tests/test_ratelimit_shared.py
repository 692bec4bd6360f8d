"""Rate-limit buckets shared by the worker processes of one server.

The bucket rules (burst, refill, Retry-After wait) are checked on both stores, in-process and
the shared table, with a clock the test moves; then several processes hammer one key through
one table (what they were granted, against burst + rate x elapsed); then a real ``twin serve``
with two workers, whose answers on fresh connections come from both processes (told apart
through /proc, as in tests/test_workers.py) and grant the burst once, not once per worker;
and the demo's own limits (``twin run``'s), which never throttle a hall of screens behind one
address reading tiles as fast as the server serves them.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import morecantile
import pytest

from benchmarks.bare_http import HttpConnection
from tests.servers import ServerProcess, free_port
from tests.workers import Fresh, descendants, one_per_worker, owner, socket_inode
from twin import ratelimit
from twin.core.settings import Settings
from twin.ratelimit import SharedTokenBuckets, TokenBuckets


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def table(tmp_path: Path) -> Iterator[Path]:
    """A table as ``twin serve`` makes one (in /dev/shm where there is one)."""
    path = ratelimit.create_table(tmp_path, port=1)
    assert path is not None
    yield path
    ratelimit.remove_table(path)


@pytest.fixture(params=["in-process", "shared"])
def make_buckets(request, table: Path) -> Iterator:
    """A factory of buckets of one kind over one clock."""
    opened: list[SharedTokenBuckets] = []

    def make(rate: float, burst: int, clock: Clock):
        if request.param == "in-process":
            return TokenBuckets(rate, burst, clock=clock)
        opened.append(SharedTokenBuckets(table, rate, burst, clock=clock))
        return opened[-1]

    yield make
    for buckets in opened:
        buckets.close()


# --- the bucket rules, on both stores ---------------------------------------------------------

def test_a_burst_then_a_wait_until_the_next_token(make_buckets):
    clock = Clock()
    buckets = make_buckets(rate=2.0, burst=3, clock=clock)
    assert [buckets.take("key:a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("key:a") == pytest.approx(0.5)  # one token at 2/s
    clock.now += 0.2
    assert buckets.take("key:a") == pytest.approx(0.3)  # 0.4 of a token refilled
    clock.now += 0.35
    assert buckets.take("key:a") == 0.0  # 1.1 tokens: refused takes cost nothing
    assert buckets.take("key:a") == pytest.approx(0.45)  # 0.1 left


def test_refill_stops_at_the_burst(make_buckets):
    clock = Clock()
    buckets = make_buckets(rate=10.0, burst=4, clock=clock)
    assert buckets.take("key:a") == 0.0
    clock.now += 3600  # idle for an hour: 4 tokens, not 36,000
    assert [buckets.take("key:a") for _ in range(5)] == [0.0] * 4 + [pytest.approx(0.1)]


def test_keys_have_buckets_of_their_own(make_buckets):
    clock = Clock()
    buckets = make_buckets(rate=1.0, burst=2, clock=clock)
    assert [buckets.take("key:a") for _ in range(3)] == [0.0, 0.0, pytest.approx(1.0)]
    assert [buckets.take("ip:127.0.0.1") for _ in range(2)] == [0.0, 0.0]
    assert buckets.take("key:b") == 0.0


def test_rate_zero_limits_nothing(make_buckets):
    buckets = make_buckets(rate=0.0, burst=1, clock=Clock())
    assert {buckets.take("key:a") for _ in range(100)} == {0.0}


def test_a_steady_caller_gets_the_rate(make_buckets):
    """A caller retrying every 10 ms for 10 s at 5/s: the burst, then 5 a second."""
    clock = Clock()
    buckets = make_buckets(rate=5.0, burst=10, clock=clock)
    granted = 0
    for _ in range(1000):
        granted += buckets.take("key:a") == 0.0
        clock.now += 0.01
    assert granted == 10 + 49  # 49.95 tokens refilled by the last call, at 9.99 s


# --- the shared table ------------------------------------------------------------------------

def test_processes_opening_one_table_share_its_buckets(table: Path):
    clock = Clock()
    first = SharedTokenBuckets(table, 1.0, 3, clock=clock)
    second = SharedTokenBuckets(table, 1.0, 3, clock=clock)
    try:
        assert [first.take("key:a"), second.take("key:a"), first.take("key:a")] == [0.0] * 3
        assert second.take("key:a") == pytest.approx(1.0)
        clock.now += 1
        assert first.take("key:a") == 0.0
        assert second.take("key:a") == pytest.approx(1.0)
    finally:
        first.close()
        second.close()


def test_a_full_table_falls_back_to_the_process_and_says_so_once(tmp_path: Path, caplog):
    """One home slot and two probes: room for two keys. A third key is limited in-process
    (the other opener does not see its takes) until a bucket is full again, i.e. no different
    from no bucket; then it takes that slot over and is shared again."""
    path = ratelimit.create_table(tmp_path, port=1, slots=1, probe=2)
    clock = Clock()
    first = SharedTokenBuckets(path, 1.0, 2, clock=clock)
    second = SharedTokenBuckets(path, 1.0, 2, clock=clock)
    try:
        with caplog.at_level(logging.WARNING, logger="twin.ratelimit"):
            assert [first.take(key) for key in ("key:a", "key:b", "key:c", "key:c")] == [0.0] * 4
            assert first.take("key:d") == 0.0
        assert [r.message for r in caplog.records].count(
            f"rate-limit table {path}: no free slot for a key; keys without one are limited "
            "per worker process until slots free up") == 1
        assert len(caplog.records) == 1
        assert [second.take("key:c") for _ in range(2)] == [0.0, 0.0]  # not the same bucket
        assert second.take("key:a") == 0.0  # key a is shared: its last token
        assert first.take("key:a") == pytest.approx(1.0)
        clock.now += 1  # b refilled to 2 = burst; a has 1 token
        assert [first.take("key:c"), first.take("key:c")] == [0.0, 0.0]  # b's slot now
        assert second.take("key:c") == pytest.approx(1.0)  # shared: c spent both
        assert second.take("key:a") == 0.0 and first.take("key:a") > 0
    finally:
        first.close()
        second.close()
        ratelimit.remove_table(path)


def test_tables_of_dead_servers_are_removed_and_live_ones_kept(tmp_path: Path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    run = tmp_path / "run"
    run.mkdir()
    stale = run / ratelimit.TABLE_NAME.format(pid=int(dead.stdout), port=8000)
    live = run / ratelimit.TABLE_NAME.format(pid=os.getpid(), port=8000)
    other = run / "twin-ratelimit-notes.txt"
    for path in (stale, live, other):
        path.write_bytes(b"x")
    ratelimit.remove_stale_tables(run)
    assert not stale.exists()
    assert live.exists() and other.exists()


def test_a_file_that_is_no_table_leaves_in_process_buckets(tmp_path: Path, caplog):
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a table" * 100)
    with caplog.at_level(logging.WARNING, logger="twin.ratelimit"):
        buckets = ratelimit.open_buckets(junk, 1.0, 2)
        missing = ratelimit.open_buckets(tmp_path / "missing", 1.0, 2)
    assert type(buckets) is TokenBuckets and type(missing) is TokenBuckets
    assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING"]
    assert "this worker process keeps its own buckets" in caplog.records[0].message
    assert type(ratelimit.open_buckets(None, 1.0, 2)) is TokenBuckets


# --- several processes, one key --------------------------------------------------------------

HAMMER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from twin.ratelimit import SharedTokenBuckets
    path, rate, burst, start, end, until_refused = sys.argv[1:]
    reads = []

    def clock():  # the bucket's own clock, read under the table's lock
        reads.append(time.monotonic())
        return reads[-1]

    buckets = SharedTokenBuckets(Path(path), float(rate), int(burst), clock=clock)
    granted = 0
    time.sleep(max(0.0, float(start) - time.monotonic()))
    while time.monotonic() < float(end):
        refused = buckets.take("key:hammered") > 0
        if refused and until_refused == "1":
            break
        granted += not refused
    print(granted, reads[0], reads[-1])
""")
PROCESSES = 3


class RecordingClock:
    """time.monotonic, remembering each reading (a bucket reads it under the table's lock)."""

    def __init__(self) -> None:
        self.reads: list[float] = []

    def __call__(self) -> float:
        self.reads.append(time.monotonic())
        return self.reads[-1]


def hammer(table: Path, rate: float, burst: int, seconds: float, until_refused: bool = False
           ) -> list[tuple[int, float, float]]:
    """PROCESSES processes taking from one key as fast as they can, from one moment on, for
    ``seconds`` (or until refused): each one's (granted, first take, last take), the times
    being those the bucket was updated at."""
    start = time.monotonic() + 1.5  # after every interpreter has started
    children = [subprocess.Popen(
        [sys.executable, "-c", HAMMER, str(table), str(rate), str(burst), str(start),
         str(start + seconds), str(int(until_refused))], stdout=subprocess.PIPE, text=True)
        for _ in range(PROCESSES)]
    results = []
    for child in children:
        out, _ = child.communicate(timeout=60)
        assert child.returncode == 0
        granted, first, last = out.split()
        results.append((int(granted), float(first), float(last)))
    return results


def test_processes_hammering_one_key_get_burst_plus_rate_times_elapsed(table: Path):
    rate, burst = 200.0, 100
    results = hammer(table, rate, burst, seconds=1.0)
    assert all(r[0] > 0 for r in results), results  # every process got its share of turns
    # Then this process takes what is left, until refused: less than a token remains.
    clock = RecordingClock()
    rest = SharedTokenBuckets(table, rate, burst, clock=clock)
    try:
        while rest.take("key:hammered") == 0:
            pass
    finally:
        rest.close()
    granted = sum(r[0] for r in results) + len(clock.reads) - 1
    available = burst + rate * (clock.reads[-1] - min(r[1] for r in results))
    # Tokens are granted whole from a bucket full at the first take and never full again
    # (it would take a pause of burst / rate = 0.5 s).
    assert available - 1 < granted <= available + 1e-6, (available, results, clock.reads)


def test_no_update_is_lost(table: Path):
    """No refill to speak of: exactly ``burst`` grants between processes taking at once.
    An unlocked read-modify-write would hand out the same token twice."""
    burst = 50_000
    results = hammer(table, 1e-9, burst, seconds=30.0, until_refused=True)
    assert sum(r[0] for r in results) == burst, results
    # They did take at once: each one's takes began before another's ended.
    assert all(r[0] > 0 for r in results), results
    assert max(r[1] for r in results) < min(r[2] for r in results), results


# --- a real server with two workers ----------------------------------------------------------

KEY = "ratelimit-shared-key-0123456789"
BURST, RATE = 6, 0.05  # a token every 20 s: none refills while the test runs
LOCATE = "/query/locate?lon=106.55&lat=29.56"
CLIENTS = 4


@pytest.fixture()
def limited_env(monkeypatch) -> None:
    monkeypatch.setenv("TWIN_WORKERS", "2")
    monkeypatch.setenv("TWIN_AUTH_KEYS", json.dumps({KEY: "planner:shared-limit"}))
    monkeypatch.setenv("TWIN_LIMITS_RATE_PER_S", str(RATE))
    monkeypatch.setenv("TWIN_LIMITS_BURST", str(BURST))


def table_of(server: ServerProcess) -> Path:
    """The server's table, where ``twin serve`` makes it (the first directory that takes it)."""
    names = [directory / ratelimit.TABLE_NAME.format(pid=server.process.pid, port=server.port)
             for directory in ratelimit.table_dirs(Settings().home)]
    existing = [path for path in names if path.exists()]
    return existing[0] if existing else names[0]


def fresh_get(server: ServerProcess, path: str) -> tuple[int, int, str | None]:
    """(status, worker process that answered, Retry-After) of one request on a new connection."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {KEY}"})
        response = conn.getresponse()
        response.read()
        inode = socket_inode(server.port, conn.sock.getsockname()[1])
        worker = owner(descendants(server.process.pid), inode)
        return response.status, worker, response.getheader("retry-after")
    finally:
        conn.close()


def pinned_get(fresh: Fresh, path: str) -> tuple[int, int, str | None]:
    """(status, worker process, Retry-After) of one request on a connection kept to a worker."""
    fresh.conn.request("GET", path, headers={"Authorization": f"Bearer {KEY}"})
    response = fresh.conn.getresponse()
    response.read()
    return response.status, fresh.worker, response.getheader("retry-after")


def test_two_workers_grant_a_key_its_burst_once(engine, database_url: str, limited_env):
    with ServerProcess(database_url) as server:
        table = table_of(server)
        assert table.exists()
        # A kept-alive connection to each worker (found through /healthz, which is public and
        # costs no token; bounded in time, whichever worker the kernel hands connections to).
        pinned = list(one_per_worker(server).values())
        started = time.monotonic()
        # Each worker is asked more than the burst: buckets per process would grant 2 x BURST.
        answers = [pinned_get(fresh, LOCATE) for _ in range(BURST + 2) for fresh in pinned]
        per_worker = Counter(worker for _, worker, _ in answers)
        assert len(per_worker) == 2 and min(per_worker.values()) > BURST, per_worker
        elapsed = time.monotonic() - started
        assert elapsed < 1 / RATE, "too slow: the bucket refilled a token"
        assert Counter(status for status, _, _ in answers) == {
            200: BURST, 429: len(answers) - BURST}, answers
        refused = [answer for answer in answers if answer[0] == 429]
        assert {worker for _, worker, _ in refused} == set(per_worker), answers
        assert all(1 <= int(wait) <= 1 / RATE for _, _, wait in refused), refused
    # Stopped (SIGTERM): the table went with the server, and the log named it.
    assert not table.exists()
    log = server.log()
    assert log.count("are shared by the 2 worker processes through") == 1, log
    assert "per worker process" not in log, log


def test_a_killed_servers_table_does_not_stop_the_next_start(engine, database_url: str,
                                                             limited_env):
    with ServerProcess(database_url) as killed:
        table = table_of(killed)
        assert fresh_get(killed, LOCATE)[0] == 200
        killed.process.send_signal(signal.SIGKILL)
        killed.process.wait()
    assert table.exists()  # nobody was left to remove it
    with ServerProcess(database_url) as server:
        assert not table.exists()  # swept by the next start
        assert table_of(server).exists()
        assert [fresh_get(server, LOCATE)[0] for _ in range(BURST + 1)] == [200] * BURST + [429]


# --- the demo's defaults: a hall behind one address -------------------------------------------

HALL_CONNECTIONS = 16  # a wall of screens, each loading tiles, all behind one NAT address
HALL_SECONDS = 5.0
REQUEST_TIMEOUT_S = 60.0  # a stuck server fails the test instead of hanging it
CITY = (106.55, 29.56)


@contextmanager
def demo_server(database_url: str, log: Path) -> Iterator[str]:
    """``twin serve`` with the settings ``twin run`` gives it (``demo_access`` over the
    defaults: anonymous planner, the default rate limits), two workers; its URL. Its log
    goes to a file: a pipe nobody reads would fill and stop the server mid-request."""
    port = free_port()
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("TWIN_LIMITS_", "TWIN_AUTH_"))}
    env |= {"TWIN_DATABASE_URL": database_url, "TWIN_PORT": str(port), "TWIN_WORKERS": "2"}
    demo = "from twin.cli import demo_access, serve; from twin.core.settings import " \
           "get_settings; serve(demo_access(get_settings()))"
    with log.open("wb") as stderr:
        process = subprocess.Popen([sys.executable, "-c", demo], env=env,
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"the demo server did not start: {log.read_text()}")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def city_tiles() -> list[str]:
    """The tiles a screen of the city map shows at z10-z13 (risk points and districts)."""
    tms = morecantile.tms.get("WebMercatorQuad")
    paths = []
    for z in (10, 11, 12, 13):
        centre = tms.tile(*CITY, z)
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                paths.append(f"/tiles/risk_points,districts/{z}/{centre.x + dx}/"
                             f"{centre.y + dy}.mvt")
    return paths


async def hall(port: int, paths: list[str], seconds: float) -> Counter:
    """HALL_CONNECTIONS keep-alive connections from one address, each requesting the tiles
    round and round without pause for ``seconds``; the statuses answered."""
    statuses: Counter = Counter()

    async def screen(offset: int) -> None:
        conn = HttpConnection("127.0.0.1", port, "gzip")

        async def get(path: str) -> None:
            statuses[(await asyncio.wait_for(conn.get(path), REQUEST_TIMEOUT_S))[0]] += 1

        try:
            for path in paths:  # warm both workers' caches: every connection asks for each
                await get(path)
            stop = time.monotonic() + seconds
            n = offset
            while time.monotonic() < stop:
                await get(paths[n % len(paths)])
                n += 1
        finally:
            await conn.close()

    await asyncio.gather(*(screen(i) for i in range(HALL_CONNECTIONS)))
    return statuses


def test_the_demo_never_throttles_a_hall_behind_one_address(engine, database_url: str,
                                                           tmp_path: Path):
    with demo_server(database_url, tmp_path / "demo.log") as url:
        statuses = asyncio.run(hall(int(url.rsplit(":", 1)[1]), city_tiles(), HALL_SECONDS))
    assert statuses[429] == 0, statuses
    # A cold tile may meet a database busy with the other suites' work (503, which says
    # retry): overload, not throttling. Nothing else.
    assert statuses[200] > 0 and set(statuses) <= {200, 503}, statuses

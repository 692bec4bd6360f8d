"""Rate limits shared by several twin nodes through the database (``rate_buckets``).

The bucket rules on the database's clock (a burst, then a wait; refill capped at the burst),
the row read back (hashed key, never the raw one); exactness between two pools taking one key
at once (exactly the burst granted, counted by the test, not by the limiter); the sweep of
full buckets; the fallback to local buckets when the database cannot be reached. Then two
real HTTP servers on one database (two nodes): one key gets exactly its burst across both,
from sequential and concurrent clients, then 429 with Retry-After; another key is untouched;
and a server whose limiter loses its database (connections terminated, or a closed port)
answers every request with its local limits, never a 5xx.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from tests.servers import LiveServer, free_port
from twin.core.settings import AuthSettings, LimitsSettings, Settings
from twin.ratelimit import (
    POOL_LABEL,
    PostgresTokenBuckets,
    TokenBuckets,
    open_postgres_buckets,
    row_key,
)

LOCATE = "/query/locate?lon=106.55&lat=29.56"
LIMITER = POOL_LABEL  # the limiter pool's application_name


def limits(database_url: str, rate: float, burst: int, shared: str = "memory",
           **auth) -> Settings:
    return Settings(database_url=database_url, auth=AuthSettings(**auth),
                    limits=LimitsSettings(rate_per_s=rate, burst=burst, shared=shared))


def unique(prefix: str) -> str:
    """A bucket name no other test (nor an earlier run on the same database) uses."""
    return f"{prefix}:{uuid.uuid4().hex}"


def row(engine: Engine, key: str) -> tuple[float, float] | None:
    """(tokens, seconds since ``at``) of the key's row, read directly."""
    with engine.connect() as conn:
        found = conn.execute(text(
            "SELECT tokens, extract(epoch FROM clock_timestamp() - at)::float8 "
            "FROM rate_buckets WHERE key = :key"), {"key": row_key(key)}).one_or_none()
    return None if found is None else (found[0], found[1])


# --- the bucket rules, on the database -------------------------------------------------------

def test_a_burst_then_a_wait_and_the_key_is_stored_hashed(engine: Engine, database_url: str):
    key = unique("key:planner:burst")

    async def run() -> list[float]:
        buckets = open_postgres_buckets(limits(database_url, 0.001, 3))
        try:
            return [await buckets.take(key) for _ in range(5)]
        finally:
            await buckets.close()

    waits = asyncio.run(run())
    assert waits[:3] == [0.0, 0.0, 0.0]
    # Under a thousandth of a token refilled since the first take: about 1000 s to the next.
    assert 999 < waits[3] <= 1000 and 999 < waits[4] <= waits[3], waits
    with engine.connect() as conn:
        raw = conn.execute(text("SELECT count(*) FROM rate_buckets WHERE key LIKE :raw"),
                           {"raw": f"%{key.split(':')[-1]}%"}).scalar_one()
    assert raw == 0
    stored = row(engine, key)
    assert stored is not None
    tokens, idle_s = stored
    # Refused: 1 short of a token by the wait times the rate (stored as tokens - 1, < 0).
    assert -1 <= tokens < 0 and tokens == pytest.approx(-waits[4] * 0.001, abs=1e-6)
    assert 0 <= idle_s < 60


def test_refill_at_the_rate_and_up_to_the_burst(engine: Engine, database_url: str):
    key = unique("key:planner:refill")

    async def run() -> tuple[list[float], list[float], list[float]]:
        buckets = open_postgres_buckets(limits(database_url, 20.0, 2))
        try:
            first = [await buckets.take(key) for _ in range(3)]
            await asyncio.sleep(0.08)  # 1.6 tokens
            second = [await buckets.take(key) for _ in range(2)]
            await asyncio.sleep(0.5)  # 10 tokens' worth: the bucket holds 2
            third = [await buckets.take(key) for _ in range(3)]
            return first, second, third
        finally:
            await buckets.close()

    first, second, third = asyncio.run(run())
    assert first[:2] == [0.0, 0.0] and 0 < first[2] <= 0.05, first
    assert second[0] == 0.0, second
    assert third[:2] == [0.0, 0.0] and 0 < third[2] <= 0.05, third


def test_two_pools_taking_one_key_at_once_get_exactly_the_burst(engine: Engine,
                                                                database_url: str):
    """Two nodes' pools (four connections each), 300 takes at once, no refill to speak of:
    exactly the burst is granted. A read-modify-write without the row lock would grant
    the same token twice."""
    key = unique("key:planner:race")
    burst, takes = 100, 150

    async def run() -> tuple[list[float], list[float], bool]:
        settings = limits(database_url, 1e-6, burst)
        nodes = [open_postgres_buckets(settings, pool_size=4, max_overflow=0)
                 for _ in range(2)]
        try:
            answers = await asyncio.gather(*(
                asyncio.gather(*(node.take(key) for _ in range(takes))) for node in nodes))
            return answers[0], answers[1], any(node.falling_back for node in nodes)
        finally:
            for node in nodes:
                await node.close()

    first, second, fell_back = asyncio.run(run())
    assert not fell_back
    granted = [wait == 0.0 for wait in first + second]
    assert sum(granted) == burst
    assert all(wait > 0 for wait in first + second if wait != 0.0)
    # Both nodes were granted some: their takes really interleaved.
    assert 0 in first and 0 in second


def test_full_buckets_are_swept(engine: Engine, database_url: str):
    fast, slow = unique("key:planner:fast"), unique("key:planner:slow")

    async def run() -> int:
        quick = open_postgres_buckets(limits(database_url, 1000.0, 1))  # full after 1 ms
        patient = open_postgres_buckets(limits(database_url, 0.001, 5))  # after 5,000 s
        try:
            await quick.take(fast)
            await patient.take(slow)
            await asyncio.sleep(0.05)
            await patient.sweep()  # rows idle 5,000 s: neither of these
            assert row(engine, fast) is not None and row(engine, slow) is not None
            # (Every node sweeps with the same limits; a node with other limits would sweep
            # what it thinks full: the slow key's row here.)
            return await quick.sweep()
        finally:
            await quick.close()
            await patient.close()

    swept = asyncio.run(run())
    assert swept >= 1
    assert row(engine, fast) is None


def test_takes_start_the_sweep_in_the_background(engine: Engine, database_url: str):
    """Every ``sweep_every_s`` a take starts a sweep of its own (not waited for): a bucket
    idle past burst / rate (1 s) goes, one just taken stays."""
    idle, busy = unique("key:planner:idle"), unique("key:planner:busy")

    async def run() -> None:
        buckets = open_postgres_buckets(limits(database_url, 1.0, 1), sweep_every_s=0.5)
        try:
            await buckets.take(idle)
            await asyncio.sleep(1.3)
            await buckets.take(busy)  # due: starts the sweep
        finally:
            await buckets.close()  # waits for it

    asyncio.run(run())
    assert row(engine, idle) is None
    assert row(engine, busy) is not None


def closed_port_url(database_url: str) -> str:
    """The test database's URL on a loopback port nobody listens on."""
    return make_url(database_url).set(host="127.0.0.1", port=free_port()).render_as_string(
        hide_password=False)


def test_an_unreachable_database_falls_back_to_local_buckets_and_says_so_once(
        database_url: str, caplog):
    key = unique("key:planner:down")

    async def run() -> tuple[list[float], bool]:
        buckets = open_postgres_buckets(limits(closed_port_url(database_url), 0.001, 3),
                                        fallback=TokenBuckets(0.001, 3), retry_after_s=0.05)
        try:
            waits = [await buckets.take(key) for _ in range(2)]
            await asyncio.sleep(0.1)  # past the retry interval: tried again, still down
            waits += [await buckets.take(key) for _ in range(2)]
            return waits, buckets.falling_back
        finally:
            await buckets.close()

    with caplog.at_level(logging.INFO, logger="twin.ratelimit"):
        waits, falling_back = asyncio.run(run())
    assert waits[:3] == [0.0, 0.0, 0.0] and 999 < waits[3] <= 1000, waits
    assert falling_back
    messages = [r.message for r in caplog.records]
    assert len(messages) == 1 and messages[0].startswith(
        "rate limits: the database does not answer ("), messages
    assert caplog.records[0].levelname == "WARNING"


# --- two real servers (nodes) on one database ------------------------------------------------

BURST, RATE = 20, 0.001  # a token every 1,000 s: none refills while a test runs
KEYS = {"pg-limits-a-0123456789": "planner:pg-limits-a",
        "pg-limits-b-0123456789": "planner:pg-limits-b"}
KEY_A = {"Authorization": "Bearer pg-limits-a-0123456789"}
KEY_B = {"Authorization": "Bearer pg-limits-b-0123456789"}
NAMES = ("pg-limits-a", "pg-limits-b")  # the keys' principals' names (role:name:scope)


@contextmanager
def node(settings: Settings, **options) -> Iterator[tuple[LiveServer, PostgresTokenBuckets]]:
    """A live server whose limiter is the database's, as a cluster node is wired: the buckets
    set on ``app.state.rate_buckets`` before start, closed by the app's lifespan (on the
    server's own event loop, which their pool's connections belong to)."""
    live = LiveServer(settings)
    app = live.server.config.app
    buckets = app.state.rate_buckets = open_postgres_buckets(live.settings, **options)
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app) -> AsyncIterator[None]:
        async with inner(app):
            try:
                yield
            finally:
                await buckets.close()

    app.router.lifespan_context = lifespan
    with live:
        yield live, buckets


def clear(engine: Engine, *names: str) -> None:
    """Forget these keys' buckets (an earlier test, or run, on the same database)."""
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM rate_buckets WHERE key = ANY(:keys)"),
                     {"keys": [row_key("key:" + name) for name in names]})



@pytest.fixture()
def two_nodes(engine: Engine, database_url: str
              ) -> Iterator[list[tuple[LiveServer, PostgresTokenBuckets]]]:
    """Two nodes as a cluster runs them: TWIN_LIMITS_SHARED=postgres, the app's lifespan
    opens the database limiter."""
    clear(engine, *NAMES)
    settings = limits(database_url, RATE, BURST, shared="postgres", keys=KEYS)
    with LiveServer(settings) as first, LiveServer(settings) as second:
        nodes = [(server, server.server.config.app.state.rate_buckets)
                 for server in (first, second)]
        assert all(isinstance(buckets, PostgresTokenBuckets) for _, buckets in nodes)
        yield nodes
    clear(engine, *NAMES)


def test_a_key_gets_its_burst_once_across_two_nodes(two_nodes, engine: Engine):
    servers = [server for server, _ in two_nodes]
    clients = [server.client() for server in servers]
    answers: list[tuple[int, int, str | None]] = []  # (node, status, Retry-After)
    lock = threading.Lock()

    def fire(count: int, offset: int) -> None:
        own = [server.client() for server in servers]  # a thread's own connections
        try:
            for i in range(count):
                n = (i + offset) % 2
                response = own[n].get(LOCATE, headers=KEY_A)
                with lock:
                    answers.append((n, response.status_code, response.headers.get("retry-after")))
        finally:
            for client in own:
                client.close()

    try:
        started = time.monotonic()
        fire(BURST // 2, 0)  # sequential, alternating between the nodes
        threads = [threading.Thread(target=fire, args=(BURST // 2, t)) for t in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert time.monotonic() - started < 1 / RATE
        assert len(answers) == 2 * BURST
        statuses = Counter(status for _, status, _ in answers)
        assert statuses == {200: BURST, 429: BURST}, answers
        assert {n for n, _, _ in answers} == {0, 1}
        # Each node granted some and refused some: the burst is the cluster's, not a node's.
        assert {n for n, status, _ in answers if status == 429} == {0, 1}, answers
        assert all(1 <= int(wait) <= 1 / RATE for _, status, wait in answers
                   if status == 429 and wait is not None)
        assert all(wait is not None for _, status, wait in answers if status == 429)
        # Another key (and the anonymous callers, by address) are untouched, on both nodes.
        assert [client.get(LOCATE, headers=KEY_B).status_code for client in clients] == [200] * 2
        assert not any(buckets.falling_back for _, buckets in two_nodes)
        # The limiters took on pools of their own (labelled), not on the requests' pools.
        with engine.connect() as conn:
            pooled = conn.execute(text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE application_name = :name AND datname = current_database()"),
                {"name": LIMITER}).scalar_one()
        assert pooled >= 2
    finally:
        for client in clients:
            client.close()
    # The oracle: the key's row, read directly: the burst spent, 20 refusals not counted.
    stored = row(engine, "key:" + NAMES[0])
    assert stored is not None and -1 <= stored[0] < 0, stored


def terminate_limiters(engine: Engine) -> int:
    """Ends the limiter pools' connections to the test database (an administrator, a failover,
    a restart would); how many."""
    with engine.connect() as conn:
        return conn.execute(text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = :name AND datname = current_database()"),
            {"name": LIMITER}).scalar_one()


def test_a_limiter_losing_its_database_keeps_limiting_locally_without_5xx(
        engine: Engine, database_url: str, caplog):
    clear(engine, *NAMES)
    settings = limits(database_url, RATE, BURST, keys=KEYS)
    try:
        with caplog.at_level(logging.INFO, logger="twin.ratelimit"), \
                node(settings, retry_after_s=3.0) as (server, buckets), server.client() as api:
            assert [api.get(LOCATE, headers=KEY_A).status_code for _ in range(5)] == [200] * 5
            assert terminate_limiters(engine) >= 1
            # The next take meets a dead connection: this process's own buckets (full) answer.
            statuses = [api.get(LOCATE, headers=KEY_A).status_code for _ in range(BURST + 2)]
            assert buckets.falling_back
            assert statuses == [200] * BURST + [429] * 2, statuses
            # Back on the database after the retry interval: its row still has 15 tokens.
            time.sleep(3.3)
            statuses = [api.get(LOCATE, headers=KEY_A).status_code for _ in range(BURST - 5 + 1)]
            assert statuses == [200] * (BURST - 5) + [429], statuses
            assert not buckets.falling_back
        messages = [r.message for r in caplog.records]
        assert sum(m.startswith("rate limits: the database does not answer") for m in messages) \
            == 1, messages
        assert "rate limits: the database answers again; the buckets are shared again" \
            in messages
    finally:
        clear(engine, *NAMES)


def test_a_limiter_whose_database_never_answers_limits_locally_without_5xx(
        engine: Engine, database_url: str):
    """The node's own database works; the limiter's is a closed port: every request is
    answered (200 within the burst, then 429), none with a 5xx."""
    settings = limits(database_url, RATE, BURST, keys=KEYS)
    live = LiveServer(settings)
    app = live.server.config.app
    buckets = app.state.rate_buckets = open_postgres_buckets(
        limits(closed_port_url(database_url), RATE, BURST), retry_after_s=0.2)
    with live, live.client() as api:
        statuses = []
        for _ in range(BURST + 5):
            statuses.append(api.get(LOCATE, headers=KEY_B).status_code)
            time.sleep(0.02)  # spans several retry intervals: each retry fails fast
        assert statuses == [200] * BURST + [429] * 5, statuses
        assert buckets.falling_back

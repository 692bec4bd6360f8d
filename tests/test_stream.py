"""The push stream (issue 14): ``GET /events/stream`` against a real server, read by a
Server-Sent Events client of the tests' own (tests/sse.py).

Messages are written the way twin's writers write them: ``twin.core.outbox.emit`` in a
committed SQL transaction (several connections at once where the order matters). The oracle
is the tests' own bookkeeping (which message went to which area) and the ``outbox`` table
read directly; the scope rule is restated here from the design (a message is a scope's when
one of its codes and one of the scope's are prefixes of one another; no codes: everyone's).

The suite's database is not quiet while these tests run: events reported by earlier tests
escalate when their deadlines pass (``event`` and ``layer`` messages), sensors fall silent
(``alert`` messages). So a test checks its own messages by their tag, and everything a stream
delivered against the ``outbox`` table (in the stream's scope), never a count of "all
messages" it assumes were its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tests.databases import async_url, libpq
from tests.servers import LiveServer, ServerProcess
from tests.sse import Event, EventStream
from twin.core.outbox import emit
from twin.core.principal import CITY, parse_scope
from twin.core.settings import AuthSettings, Settings, StreamSettings
from twin.live.fanout import Fanout, prune

DISTRICT, STREET, SIBLING, FAR_STREET = "500112", "500112002", "500112001", "500103001"
KEYS = {
    "city": ("push-city-key-0123456789", "city"),
    "district": ("push-district-key-0123456789", f"district={DISTRICT}"),
    "street": ("push-street-key-0123456789", f"street={STREET}"),
    "sibling": ("push-sibling-key-0123456789", f"street={SIBLING}"),
    "far": ("push-far-key-0123456789", f"street={FAR_STREET}"),
}
HEADERS = {name: {"Authorization": f"Bearer {key}"} for name, (key, _) in KEYS.items()}
TICKET_TTL_S = 1.5


@pytest.fixture(scope="module")
def push_server(engine: Engine, database_url: str) -> Iterator[LiveServer]:
    keys = {key: f"viewer:push-{name}:{scope}" for name, (key, scope) in KEYS.items()}
    settings = Settings(database_url=database_url,
                        auth=AuthSettings(keys=keys, anonymous_role=""),
                        stream=StreamSettings(keepalive_s=0.2, ticket_ttl_s=TICKET_TTL_S,
                                              retry_ms=500))
    with LiveServer(settings) as live:
        yield live


@pytest.fixture()
def http(push_server: LiveServer) -> Iterator[httpx.Client]:
    with push_server.client() as client:
        yield client


class Writer:
    """Commits outbox messages through ``emit`` on an AsyncEngine, from a loop of its own."""

    def __init__(self, database_url: str):
        self.url = async_url(database_url)
        self.runner = asyncio.Runner()
        self.engine: AsyncEngine = self.runner.run(self._engine())

    async def _engine(self) -> AsyncEngine:
        return create_async_engine(self.url, pool_size=8)

    def emit(self, codes: list[list[str] | None], tag: str, kind: str = "event",
             rollback: bool = False) -> list[int]:
        """One committed transaction per message (rolled back with ``rollback``)."""
        return self.runner.run(self._emit(codes, tag, kind, rollback))

    async def _emit(self, codes, tag, kind, rollback) -> list[int]:
        ids = []
        for n, area in enumerate(codes):
            async with self.engine.connect() as conn:
                ids.append(await emit(conn, kind, {"tag": tag, "n": n, "area": area}, area))
                await (conn.rollback() if rollback else conn.commit())
        return ids

    def concurrently(self, writers: int, each: int, tag: str) -> list[int]:
        """``writers`` connections committing ``each`` messages at once."""
        async def write_all() -> list[int]:
            batches = await asyncio.gather(*(
                self._emit([None] * each, f"{tag}-{w}", "event", False)
                for w in range(writers)))
            return [i for batch in batches for i in batch]

        return self.runner.run(write_all())

    def close(self) -> None:
        self.runner.run(self.engine.dispose())
        self.runner.close()


@pytest.fixture(scope="module")
def writer(engine: Engine, database_url: str) -> Iterator[Writer]:
    writer = Writer(database_url)
    yield writer
    writer.close()


def last_id(database_url: str) -> int:
    with psycopg.connect(libpq(database_url)) as conn:
        row = conn.execute("SELECT coalesce(max(id), 0) FROM outbox").fetchone()
    return int(row[0]) if row else 0


def in_scope(codes: list[str] | None, scope: str | None) -> bool:
    """The design's rule: no codes, everyone's; else one code and the scope's code are
    prefixes of one another. ``scope`` None is the city."""
    return scope is None or codes is None or any(
        code.startswith(scope) or scope.startswith(code) for code in codes)


def outbox_ids(database_url: str, after: int, upto: int, scope: str | None = None
               ) -> list[int]:
    """The outbox's messages in (after, upto] that ``scope`` (a district or street code, None
    for the city) may see, in id order."""
    with psycopg.connect(libpq(database_url)) as conn:
        return [row[0] for row in conn.execute(
            "SELECT id, area_codes FROM outbox WHERE id > %s AND id <= %s ORDER BY id",
            (after, upto)) if in_scope(row[1], scope)]


def ids(events: list[Event], after: int = 0) -> list[int]:
    return [int(event.id) for event in events if event.id is not None and int(event.id) > after]


def tag_of(event: Event) -> str | None:
    payload = event.json().get("payload")
    return payload.get("tag") if isinstance(payload, dict) else None


def of_run(events: list[Event], run: str) -> list[Event]:
    """The events this test wrote (its writers tag them ``run`` or ``run-<n>``)."""
    return [event for event in events
            if (tag_of(event) or "").split("-")[0] == run]


def ended_by(marker: int):
    return lambda event: event.id is not None and int(event.id) >= marker


def tag() -> str:
    return secrets.token_hex(4)


# --- scope --------------------------------------------------------------------------------

def test_each_jurisdiction_gets_exactly_its_messages(http: httpx.Client, writer: Writer,
                                                     database_url: str):
    run = tag()
    scopes = {"city": None, "district": DISTRICT, "street": STREET, "sibling": SIBLING,
              "far": FAR_STREET}
    streams = {name: EventStream(http, "/events/stream", headers=HEADERS[name])
               for name in KEYS}
    for stream in streams.values():
        stream.__enter__()
        assert stream.response is not None and stream.response.status_code == 200
    # Every message after this one reaches the open streams (those before may, too).
    start = last_id(database_url)
    try:
        grid = {name: f"{code}{i:03d}{i:03d}" for i, (name, code) in enumerate(
            (("street", STREET), ("sibling", SIBLING), ("far", FAR_STREET)), start=1)}
        sent = {
            "street": writer.emit([[grid["street"]]] * 30, run),
            "sibling": writer.emit([[grid["sibling"]]] * 20, run),
            "far": writer.emit([[grid["far"]]] * 20, run),
            # A district-wide message is its streets' too; one naming two places is each's.
            "district": writer.emit([[DISTRICT]] * 5, run),
            "two": writer.emit([[grid["street"], grid["far"]]] * 3, run),
            "everyone": writer.emit([None] * 5, run),
        }
        marker = writer.emit([None], run)[0]
        expected = {
            "street": sent["street"] + sent["district"] + sent["two"] + sent["everyone"],
            "sibling": sent["sibling"] + sent["district"] + sent["everyone"],
            "far": sent["far"] + sent["two"] + sent["everyone"],
            "district": (sent["street"] + sent["sibling"] + sent["district"] + sent["two"]
                         + sent["everyone"]),
            "city": [i for batch in sent.values() for i in batch],
        }
        for name, stream in streams.items():
            got = stream.until(ended_by(marker))
            assert ids(got, start) == outbox_ids(database_url, start, marker, scopes[name])
            mine = of_run(got, run)
            assert ids(mine) == sorted(expected[name]) + [marker], name
            assert all(event.event == "event" for event in mine), name
            first = mine[0].json()
            assert set(first) == {"id", "kind", "created_at", "payload"}
            assert first["id"] == int(mine[0].id or 0) and first["kind"] == "event"
    finally:
        for stream in streams.values():
            stream.__exit__(None, None, None)


def test_a_rolled_back_message_never_arrives(http: httpx.Client, writer: Writer):
    run = tag()
    with EventStream(http, "/events/stream", headers=HEADERS["city"]) as stream:
        rolled_back = writer.emit([None, [STREET]], run, rollback=True)
        marker = writer.emit([None], run)[0]
        got = stream.until(ended_by(marker))
    assert ids(of_run(got, run)) == [marker]
    assert not set(rolled_back) & set(ids(got))


# --- replay ------------------------------------------------------------------------------

def test_a_reconnecting_client_gets_every_missed_message_once_in_order(
        http: httpx.Client, writer: Writer, database_url: str):
    run = tag()
    with EventStream(http, "/events/stream", headers=HEADERS["street"]) as stream:
        first = writer.emit([[STREET + "001001"], [FAR_STREET + "001001"]] * 5, run)
        seen = stream.until(ended_by(first[-2]))
    assert ids(of_run(seen, run)) == first[0::2]
    missed = writer.emit([[STREET + "001001"], [FAR_STREET + "001001"], None] * 10, run)
    marker = writer.emit([None], run)[0]
    # The header, as an EventSource sends it; the street's own messages only, in order.
    with EventStream(http, "/events/stream", headers={
            **HEADERS["street"], "Last-Event-ID": seen[-1].id or ""}) as again:
        got = again.until(ended_by(marker))
    assert ids(got) == outbox_ids(database_url, int(seen[-1].id or 0), marker, STREET)
    mine = [i for n, i in enumerate(missed) if n % 3 != 1]
    assert ids(of_run(got, run)) == mine + [marker]
    # Replayed from the table, a message reads as it did live.
    assert [event.json()["payload"]["n"] for event in of_run(got, run)[:3]] == [0, 2, 3]
    # The query parameter does the same; the city gets everything.
    with EventStream(http, "/events/stream", headers=HEADERS["city"],
                     params={"last_event_id": first[-1]}) as again:
        got = again.until(ended_by(marker))
    assert ids(got) == outbox_ids(database_url, first[-1], marker)
    assert ids(of_run(got, run)) == missed + [marker]


def test_concurrent_writers_arrive_in_id_order_live_and_on_replay(
        http: httpx.Client, writer: Writer, database_url: str):
    run = tag()
    with EventStream(http, "/events/stream", headers=HEADERS["city"]) as live:
        start = last_id(database_url)
        written = writer.concurrently(writers=4, each=50, tag=run)
        marker = writer.emit([None], run)[0]
        events = live.until(ended_by(marker))
    got = ids(events, start)
    assert got == outbox_ids(database_url, start, marker)
    assert ids(of_run(events, run)) == sorted(written) + [marker]
    with EventStream(http, "/events/stream", headers=HEADERS["city"],
                     params={"last_event_id": start}) as replay:
        assert ids(replay.until(ended_by(marker))) == got


def test_a_replay_that_overlaps_live_writing_has_no_gap_and_no_duplicate(
        http: httpx.Client, writer: Writer, database_url: str):
    """The client resumes while writers are committing: the switch from the table to the
    live queue happens mid-stream."""
    run = tag()
    start = last_id(database_url)
    background = Writer(database_url)
    done: list[int] = []

    def write() -> None:
        done.extend(background.concurrently(writers=3, each=60, tag=run))
        done.append(background.emit([None], run + "-end")[0])

    thread = threading.Thread(target=write)
    thread.start()
    try:
        time.sleep(0.2)
        with EventStream(http, "/events/stream", headers=HEADERS["city"],
                         params={"last_event_id": start}) as stream:
            got = stream.until(lambda event: tag_of(event) == run + "-end", timeout=30)
    finally:
        thread.join()
        background.close()
    assert ids(got) == outbox_ids(database_url, start, done[-1])
    assert ids(of_run(got, run)) == sorted(done)


# --- the listener ------------------------------------------------------------------------

def test_messages_committed_while_the_listener_is_down_arrive_after_it_reconnects(
        http: httpx.Client, writer: Writer, database_url: str, push_server: LiveServer):
    run = tag()
    with EventStream(http, "/events/stream", headers=HEADERS["city"]) as stream:
        before = writer.emit([None], run)
        assert ids(of_run(stream.until(ended_by(before[0])), run)) == before
        with psycopg.connect(libpq(database_url), autocommit=True) as admin:
            # This server's listener (the suite's other servers listen too).
            name = push_server.server.config.app.state.live.fanout.name
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = %s", (name,)
            ).fetchone()
            assert killed is not None and killed[0] == 1
            sent = writer.emit([None] * 10, run)
        got = stream.until(ended_by(sent[-1]), timeout=15)
    assert ids(got) == outbox_ids(database_url, before[0], sent[-1])
    assert ids(of_run(got, run)) == sent


def test_every_server_process_listens_once_and_streams_everything(
        server_process: ServerProcess, writer: Writer, database_url: str):
    """``twin serve`` (worker processes, anonymous planner as in the demo): whichever process
    a client lands on, it gets every message, in order."""
    # One listener per worker process of `twin serve` (named by its pid; the suite's other
    # servers listen too).
    # (Its children are the workers and multiprocessing's resource tracker; a worker's
    # listener may still be connecting when the first one answers /healthz.)
    pid = server_process.process.pid
    deadline = time.monotonic() + 30
    while True:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        with psycopg.connect(libpq(database_url)) as conn:
            names = [row[0] for row in conn.execute(
                "SELECT application_name FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name LIKE 'twin push %'")]
        per_child = [sum(name.split()[2].startswith(f"{child}-") for name in names)
                     for child in children]
        if sum(per_child) == Settings().workers or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sorted(per_child, reverse=True)[:Settings().workers] == [1] * Settings().workers
    assert sum(per_child) == Settings().workers, (children, names)
    run = tag()
    with httpx.Client(base_url=server_process.url, timeout=30) as client:
        streams = [EventStream(client, "/events/stream") for _ in range(4)]
        for stream in streams:
            stream.__enter__()
        try:
            sent = writer.emit([[STREET], None, [FAR_STREET]] * 5, run)
            for stream in streams:  # anonymous callers see the city
                assert ids(of_run(stream.until(ended_by(sent[-1])), run)) == sent
        finally:
            for stream in streams:
                stream.__exit__(None, None, None)


# --- authentication ----------------------------------------------------------------------

def test_a_ticket_opens_the_stream_until_it_expires(http: httpx.Client, writer: Writer,
                                                   database_url: str):
    issued = http.post("/events/stream/tickets", headers=HEADERS["street"])
    assert issued.status_code == 201, issued.text
    body = issued.json()
    assert set(body) == {"ticket", "expires_at", "stream"}
    assert body["stream"] == f"/events/stream?ticket={body['ticket']}"
    run = tag()
    for _ in range(2):  # open, and reopen with the same ticket
        with EventStream(http, body["stream"]) as stream:
            assert stream.response is not None and stream.response.status_code == 200
            sent = writer.emit([[FAR_STREET], [STREET]], run)
            got = stream.until(ended_by(sent[1]))
            assert ids(of_run(got, run)) == sent[1:]  # the ticket carries the street's scope
            assert stream.retry_ms == 500
    # Stored hashed, like a key: the ticket itself is nowhere in the database.
    with psycopg.connect(libpq(database_url)) as conn:
        stored = conn.execute("SELECT ticket_hash, principal, role, scope FROM stream_tickets "
                              "WHERE ticket_hash = %s",
                              (hashlib.sha256(body["ticket"].encode()).digest(),)).fetchall()
    assert [row[1:] for row in stored] == [("push-street", "viewer", f"street={STREET}")]
    time.sleep(TICKET_TTL_S + 0.2)
    with EventStream(http, body["stream"]) as expired:
        assert_401(expired, "unknown or expired stream ticket")


def assert_401(stream: EventStream, description: str) -> None:
    response = stream.response
    assert response is not None and response.status_code == 401
    assert response.headers["www-authenticate"].startswith('Bearer realm="twin"')
    assert response.json()["code"] == "Unauthenticated"
    assert description in response.json()["description"]


def test_no_or_unknown_credentials_are_401(http: httpx.Client):
    with EventStream(http, "/events/stream", params={"ticket": "nope"}) as unknown:
        assert_401(unknown, "unknown or expired stream ticket")
    with EventStream(http, "/events/stream") as nobody:
        assert_401(nobody, "anonymous access is off")
    with EventStream(http, "/events/stream",
                     headers={"Authorization": "Bearer not-a-key"}) as wrong:
        assert_401(wrong, "unknown API key")
    assert http.post("/events/stream/tickets").status_code == 401


def test_a_bad_last_event_id_is_400(http: httpx.Client):
    with EventStream(http, "/events/stream", headers={
            **HEADERS["city"], "Last-Event-ID": "yesterday"}) as stream:
        response = stream.response
        assert response is not None and response.status_code == 400
        assert "Last-Event-ID" in response.json()["description"]


# --- what twin pushes ---------------------------------------------------------------------

def test_a_layer_data_version_change_arrives_as_a_layer_message(
        http: httpx.Client, database_url: str):
    with EventStream(http, "/events/stream", headers=HEADERS["street"]) as stream:
        with psycopg.connect(libpq(database_url)) as conn:
            conn.execute("UPDATE risk_points SET name = name WHERE id = 1")
        with psycopg.connect(libpq(database_url)) as conn:
            row = conn.execute("SELECT data_version FROM layers WHERE id = 'risk_points'"
                               ).fetchone()
        got = stream.until(lambda event: event.event == "layer"
                           and event.json()["payload"]["id"] == "risk_points")
    assert row is not None
    assert got[-1].json()["payload"] == {"id": "risk_points", "data_version": row[0],
                                         "deleted": False}


def test_latency_from_commit_to_client(http: httpx.Client, database_url: str):
    """Commit -> SSE client, one message at a time (the issue's figure is under load)."""
    latencies = []
    with EventStream(http, "/events/stream", headers=HEADERS["city"]) as stream, \
            psycopg.connect(libpq(database_url)) as conn:
        for n in range(200):
            with conn.transaction():
                message = conn.execute(
                    "WITH locked AS (SELECT pg_advisory_xact_lock(7013)) "
                    "INSERT INTO outbox (kind, payload) SELECT 'event', %s FROM locked "
                    "RETURNING id", (f'{{"n": {n}}}',)).fetchone()
                conn.execute("SELECT pg_notify('twin_outbox', '')")
            committed = time.perf_counter()
            assert message is not None
            got = stream.until(ended_by(message[0]))
            latencies.append(time.perf_counter() - committed)
            assert ids(got)[-1] == message[0]
    p50 = statistics.median(latencies)
    p95 = statistics.quantiles(latencies, n=20)[-1]
    print(f"push latency commit -> client over {len(latencies)} messages: "
          f"p50 {p50 * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms")
    assert p95 < 1.0


# --- the library: overflow, shutdown, retention ------------------------------------------

async def _drain(subscription, timeout: float = 5.0) -> list[int]:
    """Every message until the stream ends (AssertionError if it does not within timeout)."""
    got: list[int] = []

    async def read() -> None:
        async for message in subscription:
            got.append(message.id)

    await asyncio.wait_for(read(), timeout)
    return got


async def _until_read(fanout: Fanout, upto: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while (fanout.last or 0) < upto:
        assert time.monotonic() < deadline, "the listener did not read the outbox"
        await asyncio.sleep(0.02)


def test_a_client_that_falls_behind_is_ended_and_resumes_by_replay(
        writer: Writer, database_url: str):
    async def scenario() -> None:
        fanout = await Fanout.start(libpq(database_url), writer.engine,
                                    StreamSettings(queue_size=5))
        try:
            await _until_read(fanout, last_id(database_url))
            start = fanout.last or 0  # the subscription gets what is read after it
            slow = fanout.subscribe(CITY)
            sent = await writer._emit([None] * 12, tag(), "event", False)
            await _until_read(fanout, sent[-1])
            expected = outbox_ids(database_url, start, sent[-1])
            # Ended after the 5 it could hold; nothing after them reached it.
            first = await _drain(slow)
            assert first == expected[:5] and fanout.subscribers == 0
            resumed = fanout.subscribe(CITY, first[-1])
            rest: list[int] = []
            async for message in resumed:
                rest.append(message.id)
                if message.id == sent[-1]:
                    break
            assert rest == expected[5:]
        finally:
            await fanout.stop()

    writer.runner.run(scenario())


def test_stopping_the_fanout_ends_open_streams(writer: Writer, database_url: str):
    async def scenario() -> None:
        fanout = await Fanout.start(libpq(database_url), writer.engine, StreamSettings())
        await _until_read(fanout, last_id(database_url))
        start = fanout.last or 0
        street = fanout.subscribe(parse_scope(f"street={STREET}"))
        sent = await writer._emit([[STREET], [FAR_STREET]], tag(), "event", False)
        await _until_read(fanout, sent[-1])
        await fanout.stop()
        got = await _drain(street)  # ended, holding what was read before the stop
        assert sent[0] in got and sent[1] not in got
        assert [i for i in got if i <= sent[-1]] == outbox_ids(database_url, start, sent[-1],
                                                               STREET)

    writer.runner.run(scenario())


def test_retention_deletes_old_messages_in_one_process_at_a_time(
        writer: Writer, database_url: str):
    with psycopg.connect(libpq(database_url)) as conn:
        old, recent = [conn.execute(
            "WITH locked AS (SELECT pg_advisory_xact_lock(7013)) "
            "INSERT INTO outbox (kind, payload, created_at) "
            "SELECT 'event', '{}', now() - make_interval(hours => %s) FROM locked "
            "RETURNING id", (hours,)).fetchone()[0] for hours in (3, 0)]
        conn.commit()

    async def prune_once(holder: bool) -> int:
        async with writer.engine.connect() as conn, writer.engine.connect() as other:
            if holder:  # another process is pruning right now
                await other.execute(text("SELECT pg_advisory_xact_lock(7014)"))
            deleted = await prune(conn, retention_h=1.0)
            await conn.commit()
            await other.rollback()
            return deleted

    assert writer.runner.run(prune_once(holder=True)) == 0
    assert writer.runner.run(prune_once(holder=False)) >= 1
    with psycopg.connect(libpq(database_url)) as conn:
        left = {row[0] for row in conn.execute("SELECT id FROM outbox WHERE id = ANY(%s)",
                                               ([old, recent],))}
    assert left == {recent}

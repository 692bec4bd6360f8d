"""The living twin under load (issue 14): ingest, alerts to the maps, escalation, scope.

Run on demand (2 cores: the load generator shares the machine with twin and PostgreSQL):

    TWIN_HOME=/tmp/twin-live-bench TWIN_DB_PORT=55488 \\
        .venv/bin/python benchmarks/live.py [--seconds 120] [--parts ingest,mqtt,...]

Parts, each printed with its figures and the target from the issue:

* ``ingest``: readings/s over HTTP batches (``POST /sensors/readings``, several clients at
  once, bodies encoded before the clock starts) for ``--seconds``, beside raw ``COPY`` of
  as many rows into the same table in the same run (the ceiling; the ratio is printed).
  While it runs, threshold-crossing readings are posted twice a second and an SSE client
  times each one's ``alert`` message: the latency from the reading's send to the alert's
  arrival (p50/p95/p99).
* ``mqtt``: readings/s over MQTT QoS 1 (publishers wait for PUBACK, messages of
  ``--mqtt-batch`` readings) until every published reading is stored.
* ``escalation``: 1,000 events of a kind with short deadlines; how late each escalation
  fired after its deadline (p50/p99), none before it, none twice.
* ``scope``: events reported across two streets of one district; a street's stream gets
  all of its street's events and none of the other's; the district's gets both.
* ``faults``: under HTTP, MQTT and event load with a reconnecting SSE client: ``kill -9``
  of twin, a restart of mosquitto, a restart of PostgreSQL. Every acknowledged reading is
  stored once, every stream message arrives once, deadlines overdue while twin was down fire
  within 5 s of its start. Needs a throwaway TWIN_HOME/TWIN_DB_PORT (the cluster restarts).

The server is ``twin serve`` (2 workers) on a managed broker of the same TWIN_HOME. A
throwaway TWIN_HOME/TWIN_DB_PORT is advised: the run stores millions of readings. Run
``escalation`` and ``scope`` in a run of their own (``--parts escalation,scope``): after the
ingest parts the live pipe-anomaly detector scores the millions of fresh readings every
minute and takes a core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.prerequisites import ROOT, prepare  # noqa: E402
from benchmarks.serving import serving  # noqa: E402
from twin.core.settings import Settings  # noqa: E402

EDITOR_KEY = "bench-live-editor-key-0123456789"
KEYS = {EDITOR_KEY: "admin:bench-admin"}
PARTS = ("ingest", "mqtt", "escalation", "scope", "faults")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


# --- readings ------------------------------------------------------------------------------

class Readings:
    """Unique (sensor, ts) rows with ordinary values: each sensor's median from the sample,
    at instants 1 ms apart from ``start`` (so no two rows of a run collide)."""

    def __init__(self, url: str, start: datetime):
        with psycopg.connect(libpq(url)) as conn:
            rows = conn.execute("""
                SELECT s.id, coalesce(percentile_cont(0.5) WITHIN GROUP (ORDER BY r.value),
                                      (s.min_value + s.max_value) / 2)
                  FROM sensors AS s LEFT JOIN sensor_readings AS r ON r.sensor_id = s.id
                 GROUP BY s.id ORDER BY s.id""").fetchall()
        self.sensors = [(int(i), float(v)) for i, v in rows]
        self.start = start
        self.next = 0

    def take(self, n: int) -> list[tuple[int, datetime, float]]:
        out = []
        count = len(self.sensors)
        for k in range(self.next, self.next + n):
            sensor, value = self.sensors[k % count]
            out.append((sensor, self.start + timedelta(milliseconds=k // count), value))
        self.next += n
        return out


def body(rows: list[tuple[int, datetime, float]]) -> bytes:
    return json.dumps({"readings": [{"sensor_id": s, "ts": t.isoformat(), "value": v}
                                    for s, t, v in rows]}).encode()


# --- SSE ------------------------------------------------------------------------------------

class StreamClient(threading.Thread):
    """An SSE client in a thread: every message's (receive time, kind, data)."""

    def __init__(self, base: str, key: str, name: str):
        super().__init__(daemon=True, name=name)
        self.base, self.key = base, key
        self.messages: list[tuple[float, str, dict]] = []
        self.ready = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}", "Accept": "text/event-stream"}
        with httpx.Client(timeout=httpx.Timeout(10, read=None)) as client, \
                client.stream("GET", self.base + "/events/stream", headers=headers) as answer:
            answer.raise_for_status()
            self.ready.set()
            kind, data = "message", []
            for line in answer.iter_lines():
                if self.stop.is_set():
                    return
                if not line:
                    if data:
                        self.messages.append((time.time(), kind, json.loads("\n".join(data))))
                    kind, data = "message", []
                elif line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())


# --- parts ----------------------------------------------------------------------------------

async def post_batches(base: str, bodies: list[bytes], clients: int) -> tuple[int, float]:
    """Posts every body, ``clients`` at a time; (readings accepted, seconds)."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for item in bodies:
        queue.put_nowait(item)
    accepted = 0
    headers = {"Authorization": f"Bearer {EDITOR_KEY}", "Content-Type": "application/json"}

    async def client() -> None:
        nonlocal accepted
        async with httpx.AsyncClient(base_url=base, timeout=120, headers=headers) as http:
            while not queue.empty():
                payload = queue.get_nowait()
                for _attempt in range(20):  # a gateway retries until it is answered
                    answer = await http.post("/sensors/readings", content=payload)
                    if answer.status_code in (200, 207):
                        result = answer.json()
                        accepted += result["accepted"] + result.get("already_stored", 0)
                        break
                    await asyncio.sleep(0.5)

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return accepted, time.perf_counter() - began


def copy_ceiling(url: str, rows: list[tuple[int, datetime, float]]) -> float:
    """Seconds to COPY ``rows`` into sensor_readings (and their newest into sensor_latest,
    as the ingest keeps it), one transaction."""
    began = time.perf_counter()
    with psycopg.connect(libpq(url)) as conn:
        with conn.cursor().copy("COPY sensor_readings (sensor_id, ts, value) FROM STDIN") as cp:
            for row in rows:
                cp.write_row(row)
    return time.perf_counter() - began


def alert_rule(url: str) -> tuple[int, float, float]:
    """A sensor with an 'above' rule: (sensor id, a value that opens, a value that closes)."""
    with psycopg.connect(libpq(url)) as conn:
        row = conn.execute("""
            SELECT s.id, r.open_above, coalesce(r.close_below, r.open_above),
                   s.min_value, s.max_value
              FROM alert_rules AS r JOIN sensors AS s ON s.kind = r.sensor_kind
                   AND (r.network IS NULL OR r.network = s.network)
             WHERE r.enabled AND r.open_above IS NOT NULL
             ORDER BY s.id LIMIT 1""").fetchone()
    if row is None:
        raise SystemExit("no sensor has an 'open above' alert rule: is migration 0013 applied?")
    sensor, above, below, low, high = row
    return int(sensor), min(high, above + max(1.0, 0.1 * abs(above))), max(low, below * 0.5)


async def crossings(base: str, sensor: int, high: float, low: float, until: float,
                    sent: dict[str, float]) -> None:
    """Twice a second: a reading over the threshold (then one under it, to close the alert)."""
    headers = {"Authorization": f"Bearer {EDITOR_KEY}"}
    async with httpx.AsyncClient(base_url=base, timeout=30, headers=headers) as http:
        while time.monotonic() < until:
            now = datetime.now(UTC)
            for value, at in ((high, now), (low, now + timedelta(milliseconds=1))):
                stamp = at.isoformat()
                sent.setdefault(stamp, time.time()) if value == high else None
                await http.post("/sensors/readings", json={"readings": [
                    {"sensor_id": sensor, "ts": stamp, "value": value}]})
                await asyncio.sleep(0.25)


def alert_latencies(stream: StreamClient, sent: dict[str, float]) -> list[float]:
    out = []
    for received, kind, data in stream.messages:
        payload = data.get("payload", {})
        if kind != "alert" or payload.get("state") != "opened":
            continue
        stamp = payload.get("ts")
        if stamp is None:
            continue
        key = datetime.fromisoformat(stamp).astimezone(UTC).isoformat()
        if key in sent:
            out.append(received - sent[key])
    return out


def part_ingest(base: str, url: str, seconds: float, batch: int, clients: int) -> None:
    rate_guess = 30_000
    readings = Readings(url, datetime.now(UTC) - timedelta(hours=2))
    rows = readings.take(int(rate_guess * seconds))
    bodies = [body(rows[i:i + batch]) for i in range(0, len(rows), batch)]
    stream = StreamClient(base, EDITOR_KEY, "alerts")
    stream.start()
    stream.ready.wait(30)
    sensor, high, low = alert_rule(url)
    sent: dict[str, float] = {}

    async def both() -> tuple[int, float]:
        stop_at = time.monotonic() + seconds
        crossing = asyncio.create_task(crossings(base, sensor, high, low, stop_at, sent))
        result = await post_batches(base, bodies, clients)
        crossing.cancel()
        return result

    accepted, took = asyncio.run(both())
    time.sleep(2)
    stream.stop.set()
    latencies = alert_latencies(stream, sent)
    copy_rows = [(s, t + timedelta(microseconds=500), v) for s, t, v in rows]
    copy_s = copy_ceiling(url, copy_rows)
    http_rate, copy_rate = accepted / took, len(copy_rows) / copy_s
    print(f"ingest over HTTP: {accepted:,} readings in {took:.1f} s = {http_rate:,.0f}/s "
          f"({clients} clients, batches of {batch:,}); target >= 25,000/s")
    print(f"raw COPY of the same rows: {len(copy_rows):,} in {copy_s:.1f} s = "
          f"{copy_rate:,.0f}/s; HTTP/COPY = {http_rate / copy_rate:.2f}")
    print(f"alert latency under that load ({len(latencies)} of {len(sent)} crossings): "
          f"p50 {1000 * pct(latencies, 50):.0f} ms, p95 {1000 * pct(latencies, 95):.0f} ms, "
          f"p99 {1000 * pct(latencies, 99):.0f} ms; target p95 <= 1 s, p99 <= 2 s")


def part_mqtt(url: str, mqtt_url: str, seconds: float, batch: int) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    readings = Readings(url, datetime.now(UTC) - timedelta(hours=1))
    host, _, port = mqtt_url.removeprefix("mqtt://").partition(":")
    published = 0
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-publisher",
                         protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(200)
    client.connect(host, int(port or 1883))
    client.loop_start()
    first = readings.start
    began = time.perf_counter()
    infos = []
    while time.perf_counter() - began < seconds:
        rows = readings.take(batch)
        infos.append(client.publish("twin/readings/bench", body(rows), qos=1))
        published += len(rows)
        if len(infos) > 400:
            infos.pop(0).wait_for_publish(60)
    for info in infos:
        info.wait_for_publish(60)
    client.loop_stop()
    client.disconnect()
    last = first + timedelta(milliseconds=(readings.next - 1) // len(readings.sensors))
    with psycopg.connect(libpq(url), autocommit=True) as conn:
        while True:
            stored = conn.execute("SELECT count(*) FROM sensor_readings WHERE ts BETWEEN %s AND %s",
                                  (first, last)).fetchone()[0]
            if stored >= published or time.perf_counter() - began > seconds * 5 + 60:
                break
            time.sleep(0.5)
    took = time.perf_counter() - began
    print(f"ingest over MQTT QoS 1: {stored:,} of {published:,} readings stored in {took:.1f} s"
          f" = {stored / took:,.0f}/s (messages of {batch:,}); target >= 10,000/s")


def event_kind_and_spots(url: str, code: str, deadlines_s: tuple[int, int, int],
                         spots: int) -> list[tuple[float, float]]:
    """A benchmark event kind with these respond/verify/handle seconds (made or reset), and
    a point in each of the first ``spots`` grid cells."""
    with psycopg.connect(libpq(url), autocommit=True) as conn:
        conn.execute("""
            INSERT INTO event_kinds (code, sector_code, name_zh, name_en, respond_s, verify_s,
                                     handle_s)
            SELECT %(code)s, code, '测试', 'Benchmark', %(r)s, %(v)s, %(h)s FROM sectors
             ORDER BY sort_order LIMIT 1
            ON CONFLICT (code) DO UPDATE SET respond_s = %(r)s, verify_s = %(v)s,
                                             handle_s = %(h)s""",
                     {"code": code, "r": deadlines_s[0], "v": deadlines_s[1],
                      "h": deadlines_s[2]})
        return conn.execute("""
            SELECT ST_X(p), ST_Y(p) FROM (
                SELECT ST_PointOnSurface(geom) AS p FROM admin_units WHERE level = 'grid'
                 ORDER BY code LIMIT %s) AS g""", (spots,)).fetchall()


def part_escalation(base: str, url: str, events: int) -> None:
    """1,000 events whose respond deadline is 5 s after the report."""
    spots = event_kind_and_spots(url, "bench_fast", (5, 10, 15), events)
    headers = {"Authorization": f"Bearer {EDITOR_KEY}"}

    async def report() -> list[int]:
        """Four reporters at once (a report routes to the nearest teams by road: tens to
        hundreds of ms; fifty at once exhausted the pools)."""
        queue = list(spots)
        ids: list[int] = []

        async def reporter(http: httpx.AsyncClient) -> None:
            while queue:
                x, y = queue.pop()
                answer = await http.post("/events", json={
                    "lon": x, "lat": y, "kind": "bench_fast", "description": "benchmark"})
                if answer.status_code == 201:
                    ids.append(answer.json()["id"])

        async with httpx.AsyncClient(base_url=base, timeout=60, headers=headers) as http:
            await asyncio.gather(*(reporter(http) for _ in range(4)))
        return ids

    ids = asyncio.run(report())
    time.sleep(20)  # every step's deadline (15 s at most) passes, plus the 2 s allowed
    with psycopg.connect(libpq(url)) as conn:
        rows = conn.execute("""
            SELECT extract(epoch FROM d.fired_at - d.due_at)
              FROM event_deadlines AS d
             WHERE d.event_id = ANY(%s) AND d.fired_at IS NOT NULL""", (ids,)).fetchall()
        twice = conn.execute("""
            SELECT count(*) FROM (
                SELECT event_id, to_level FROM event_history
                 WHERE event_id = ANY(%s) AND action = 'escalated'
                 GROUP BY 1, 2 HAVING count(*) > 1) AS t""", (ids,)).fetchone()[0]
    late = [float(r[0]) for r in rows]
    early = sum(v < 0 for v in late)
    print(f"escalation: {len(late)} escalations of {len(ids)} events; late by p50 "
          f"{1000 * pct(late, 50):.0f} ms, p99 {1000 * pct(late, 99):.0f} ms, max "
          f"{1000 * max(late, default=0):.0f} ms; {early} early, {twice} twice; target p99 "
          "<= 2 s, none early, none twice")


def scope_streets(url: str) -> tuple[str, str, str]:
    """Two streets of one district (the district with the most grids in two streets)."""
    with psycopg.connect(libpq(url)) as conn:
        row = conn.execute("""
            SELECT left(code, 6), min(left(code, 9)), max(left(code, 9))
              FROM admin_units WHERE level = 'grid'
             GROUP BY 1 HAVING count(DISTINCT left(code, 9)) >= 2
             ORDER BY count(*) DESC LIMIT 1""").fetchone()
    return row[0], row[1], row[2]


def scope_keys(district: str, a: str, b: str) -> dict[str, str]:
    return {f"bench-street-a-{a}": f"viewer:street-a:street={a}",
            f"bench-street-b-{b}": f"viewer:street-b:street={b}",
            f"bench-district-{district}": f"viewer:district:district={district}"}


def part_scope(base: str, url: str, district: str, a: str, b: str, per_street: int) -> None:
    keys = list(scope_keys(district, a, b))
    streams = [StreamClient(base, key, key) for key in keys]
    for stream in streams:
        stream.start()
        stream.ready.wait(30)
    with psycopg.connect(libpq(url)) as conn:
        spots = {street: conn.execute("""
            SELECT ST_X(p), ST_Y(p) FROM (
                SELECT ST_PointOnSurface(geom) AS p FROM admin_units
                 WHERE level = 'grid' AND left(code, 9) = %s ORDER BY code) AS g""",
            (street,)).fetchall() for street in (a, b)}
        kind = conn.execute("SELECT code FROM event_kinds ORDER BY code LIMIT 1").fetchone()[0]
    headers = {"Authorization": f"Bearer {EDITOR_KEY}"}
    made: dict[str, set[int]] = {a: set(), b: set()}
    with httpx.Client(base_url=base, timeout=60, headers=headers) as http:
        for k in range(per_street):
            for street in (a, b):
                x, y = spots[street][k % len(spots[street])]
                answer = http.post("/events", json={"lon": x, "lat": y, "kind": kind,
                                                    "description": "scope benchmark"})
                if answer.status_code == 201:
                    made[street].add(answer.json()["id"])
    time.sleep(3)
    for stream in streams:
        stream.stop.set()

    def seen(stream: StreamClient) -> set[int]:
        return {data["payload"].get("id") for _, kind, data in stream.messages
                if kind == "event" and data.get("payload", {}).get("action") == "reported"}

    got_a, got_b, got_d = (seen(s) for s in streams)
    every = made[a] | made[b]
    print(f"scope: street {a} got {len(got_a & made[a])}/{len(made[a])} of its events and "
          f"{len(got_a & made[b])} of street {b}'s; street {b} got "
          f"{len(got_b & made[b])}/{len(made[b])} and {len(got_b & made[a])} of {a}'s; "
          f"district {district} got {len(got_d & every)}/{len(every)}; target 100% and none")


# --- faults ---------------------------------------------------------------------------------

class Server:
    """``twin serve`` in a process group of its own, so it can be killed with SIGKILL whole
    (the server and its workers), as a crash would."""

    def __init__(self, env: dict[str, str], port: int):
        self.env = {**env, "TWIN_HOST": "127.0.0.1", "TWIN_PORT": str(port)}
        self.base = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="bench-live-", suffix=".log",
                                               delete=False)

    def start(self) -> float:
        """Starts it; the time it answered /healthz."""
        self.process = subprocess.Popen([sys.executable, "-m", "twin.cli", "serve"],
                                        env=self.env, cwd=ROOT, stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.base + "/healthz", timeout=2).status_code == 200:
                    return time.time()
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"twin did not start; see {self.log.name}")

    def kill(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


class Resilient:
    """The fault run's load: an HTTP gateway that retries each batch until answered (and
    remembers the rows acknowledged), an MQTT publisher (rows whose PUBACK came back), a
    reporter of events, and an SSE client that reconnects with Last-Event-ID."""

    def __init__(self, base: str, url: str, mqtt_url: str):
        self.base, self.url, self.mqtt_url = base, url, mqtt_url
        self.http_acked: list[tuple[int, datetime, float]] = []
        self.mqtt_acked: list[tuple[int, datetime, float]] = []
        self.reported: set[int] = set()
        self.received: list[int] = []  # outbox ids, duplicates kept
        self.event_messages: list[int] = []  # event ids of 'reported' messages
        self.stop = threading.Event()
        self.listening = threading.Event()
        self.listening.set()
        self.readings = Readings(url, datetime.now(UTC) - timedelta(hours=3))
        self.lock = threading.Lock()

    def take(self, n: int) -> list[tuple[int, datetime, float]]:
        with self.lock:
            return self.readings.take(n)

    def gateway(self) -> None:
        headers = {"Authorization": f"Bearer {EDITOR_KEY}", "Content-Type": "application/json"}
        with httpx.Client(base_url=self.base, timeout=30, headers=headers) as http:
            while not self.stop.is_set():
                rows = self.take(2000)
                payload = body(rows)
                while True:  # until answered, as OneNET-style platforms retry
                    try:
                        answer = http.post("/sensors/readings", content=payload)
                        if answer.status_code in (200, 207):
                            self.http_acked += rows
                            break
                    except httpx.TransportError:
                        pass
                    time.sleep(0.2)

    def publisher(self) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        host, _, port = self.mqtt_url.removeprefix("mqtt://").partition(":")
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-fault-publisher",
                             protocol=mqtt.MQTTv311, clean_session=False)
        client.reconnect_delay_set(0.1, 1)
        client.connect(host, int(port))
        client.loop_start()
        began, sent = time.monotonic(), 0
        while not self.stop.is_set():
            # A steady 5,000 readings/s (a platform's feed, not a flood the broker queues).
            time.sleep(max(0.0, began + sent / 5000 - time.monotonic()))
            rows = self.take(500)
            sent += len(rows)
            info = client.publish("twin/readings/faults", body(rows), qos=1)
            try:
                info.wait_for_publish(30)
            except (RuntimeError, ValueError):
                pass
            if info.is_published():
                self.mqtt_acked += rows
            else:
                time.sleep(0.2)
        client.loop_stop()
        client.disconnect()

    def reporter(self, spots: list[tuple[float, float]], kind: str) -> None:
        headers = {"Authorization": f"Bearer {EDITOR_KEY}"}
        k = 0
        with httpx.Client(base_url=self.base, timeout=30, headers=headers) as http:
            while not self.stop.is_set():
                x, y = spots[k % len(spots)]
                k += 1
                try:
                    answer = http.post("/events", json={"lon": x, "lat": y, "kind": kind,
                                                        "description": "fault run"})
                    if answer.status_code == 201:
                        self.reported.add(answer.json()["id"])
                except httpx.TransportError:
                    pass
                time.sleep(0.2)

    def listener(self) -> None:
        last: str | None = None
        while self.listening.is_set():
            headers = {"Authorization": f"Bearer {EDITOR_KEY}",
                       **({"Last-Event-ID": last} if last else {})}
            try:
                with httpx.Client(timeout=httpx.Timeout(5, read=30)) as client, \
                        client.stream("GET", self.base + "/events/stream",
                                      headers=headers) as answer:
                    if answer.status_code != 200:
                        time.sleep(0.5)
                        continue
                    kind, data, ident = "message", [], None
                    for line in answer.iter_lines():
                        if not self.listening.is_set():
                            return
                        if not line:
                            if data and ident is not None:
                                self.received.append(int(ident))
                                last = ident
                                payload = json.loads("\n".join(data)).get("payload", {})
                                if kind == "event" and payload.get("action") == "reported":
                                    self.event_messages.append(payload.get("id"))
                            kind, data, ident = "message", [], None
                        elif line.startswith("id:"):
                            ident = line[3:].strip()
                        elif line.startswith("event:"):
                            kind = line[6:].strip()
                        elif line.startswith("data:"):
                            data.append(line[5:].strip())
            except (httpx.TransportError, httpx.HTTPError):
                time.sleep(0.5)


def stored_once(url: str, rows: list[tuple[int, datetime, float]]) -> tuple[int, int]:
    """(rows found, rows missing) of ``rows`` in sensor_readings."""
    with psycopg.connect(libpq(url)) as conn:
        found = conn.execute("""
            SELECT count(*) FROM unnest(%s::int[], %s::timestamptz[]) AS k(sensor_id, ts)
              JOIN sensor_readings AS r USING (sensor_id, ts)""",
                             ([r[0] for r in rows], [r[1] for r in rows])).fetchone()[0]
    return found, len(rows) - found


def part_faults(env: dict[str, str], url: str, settings: Settings, mqtt_url: str) -> None:
    from benchmarks.serving import free_port

    server = Server(env, free_port())
    server.start()
    try:
        _faults(server, url, settings)
    finally:
        server.stop()


def _faults(server: Server, url: str, settings: Settings) -> None:
    from twin.core.broker import ManagedBroker
    from twin.core.cluster import ManagedCluster

    mqtt_url = server.env["TWIN_MQTT_URL"]
    spots = event_kind_and_spots(url, "bench_fault", (3, 600, 900), 200)
    load = Resilient(server.base, url, mqtt_url)
    threads = [threading.Thread(target=load.gateway, daemon=True),
               threading.Thread(target=load.publisher, daemon=True),
               threading.Thread(target=load.reporter, args=(spots, "bench_fault"), daemon=True),
               threading.Thread(target=load.listener, daemon=True)]
    for thread in threads:
        thread.start()
    time.sleep(8)
    print("faults: kill -9 of twin (server and workers)", flush=True)
    server.kill()
    time.sleep(5)  # the reporter's events of the last seconds become overdue while down
    began = server.start()
    with psycopg.connect(libpq(url)) as conn:
        time.sleep(6)
        overdue = conn.execute("""
            SELECT extract(epoch FROM d.fired_at) - %s FROM event_deadlines AS d
             WHERE d.due_at < to_timestamp(%s)
               AND d.fired_at >= to_timestamp(%s) - interval '1 second'""",
                               (began, began, began)).fetchall()
    late = [float(r[0]) for r in overdue]
    time.sleep(5)
    for name, service, settle_s in (("mosquitto", ManagedBroker(settings), 8),
                                    ("PostgreSQL", ManagedCluster(settings), 10)):
        print(f"faults: {name} restarted", flush=True)
        service.down()
        time.sleep(2)
        service.up()
        time.sleep(settle_s)
    # The writers stop first; the listener keeps reading until their last messages are in,
    # and the server runs until the broker's backlog (messages PUBACKed to the publisher,
    # not yet stored) is drained: "missing" means lost, not late.
    load.stop.set()
    for thread in threads[:3]:
        thread.join(timeout=60)
    deadline = time.monotonic() + 180
    while stored_once(url, load.mqtt_acked)[1] and time.monotonic() < deadline:
        time.sleep(2)
    time.sleep(3)
    load.listening.clear()
    threads[3].join(timeout=60)
    server.stop()
    http_found, http_missing = stored_once(url, load.http_acked)
    mqtt_found, mqtt_missing = stored_once(url, load.mqtt_acked)
    duplicates = len(load.received) - len(set(load.received))
    seen = set(load.event_messages)
    print(f"faults: HTTP {http_found:,} acknowledged readings stored, {http_missing} missing; "
          f"MQTT {mqtt_found:,} acknowledged (PUBACK) stored, {mqtt_missing} missing "
          "(target: none missing; the primary key stores each once)")
    print(f"faults: stream {len(load.received):,} messages, {duplicates} duplicates; "
          f"{len(seen & load.reported)}/{len(load.reported)} reported events seen "
          "(target: each exactly once)")
    print(f"faults: {len(late)} deadlines overdue at start-up fired {pct(late, 50):.1f} s "
          f"(p50) / {max(late, default=float('nan')):.1f} s (max) after it answered; "
          "target <= 5 s")


@contextmanager
def managed_broker(settings: Settings) -> Iterator[str]:
    from twin.core.broker import ManagedBroker

    broker = ManagedBroker(settings)
    started = not broker.status().running
    broker.up()
    try:
        yield f"mqtt://127.0.0.1:{settings.mqtt.port}"
    finally:
        if started:
            broker.down()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--scale", default="small")
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--mqtt-batch", type=int, default=1000)
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--scope-events", type=int, default=100,
                        help="events reported in each of the two streets")
    options = parser.parse_args()
    parts = [p for p in options.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    settings = Settings()
    url = prepare(settings, options.scale)
    district, street_a, street_b = scope_streets(url)
    keys = {**KEYS, **scope_keys(district, street_a, street_b)}
    with managed_broker(settings) as mqtt_url:
        env = {**os.environ, "TWIN_DATABASE_URL": url, "TWIN_WORKERS": "2",
               "TWIN_MQTT_URL": mqtt_url, "TWIN_AUTH_KEYS": json.dumps(keys)}
        argv = [sys.executable, "-m", "twin.cli", "serve"]
        with serving("twin", argv, env, "/healthz", ROOT, uvicorn_cli=False) as base:
            print(f"twin serve, 2 workers, on {url.rpartition('@')[2]}; broker {mqtt_url}")
            if "ingest" in parts:
                part_ingest(base, url, options.seconds, options.batch, options.clients)
            if "mqtt" in parts:
                part_mqtt(url, mqtt_url, options.seconds, options.mqtt_batch)
            if "escalation" in parts:
                part_escalation(base, url, options.events)
            if "scope" in parts:
                part_scope(base, url, district, street_a, street_b, options.scope_events)
        if "faults" in parts:
            if not settings.managed or settings.db.port == 55432:
                raise SystemExit("--parts faults restarts the managed cluster: use a throwaway "
                                 "TWIN_HOME and TWIN_DB_PORT")
            part_faults(env, url, settings, mqtt_url)


if __name__ == "__main__":
    main()

"""Readings over MQTT: a real mosquitto run by twin (ManagedBroker), a real server subscribed to
it, a paho publisher. What the publisher got a PUBACK for is counted back in the database:
stored once, nothing lost across a broker restart, bad payloads dead-lettered with a reason
while the subscriber keeps storing."""

from __future__ import annotations

import json
import os
import pwd
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from tests.brokers import CuttableProxy, Publisher, own_broker
from tests.sensors import forget_readings
from tests.servers import LiveServer, free_port
from twin.core.broker import BrokerError, ManagedBroker
from twin.core.settings import MqttSettings, Settings

TOPIC = "twin/readings/test"
MAX_PAYLOAD = 64 * 1024
# Every reading published here has 7 microseconds past the millisecond (the sample's readings
# are on whole minutes, tests/test_sensor_readings.py's carry another mark): deleted afterwards.
MARK_US = 7


class Clock:
    """Distinct instants, 1 ms apart, in the last hour (never in the future)."""

    def __init__(self) -> None:
        start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=50)
        self.next = start + timedelta(microseconds=MARK_US)

    def take(self) -> str:
        ts, self.next = self.next, self.next + timedelta(milliseconds=1)
        return ts.isoformat()


@pytest.fixture(scope="module")
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="module")
def sensors(engine: Engine) -> list[tuple[int, float, float]]:
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(text(
            "SELECT id, min_value, max_value FROM sensors ORDER BY id LIMIT 40"))]


@pytest.fixture(scope="module", autouse=True)
def forget_published(engine: Engine) -> Iterator[None]:
    yield
    with engine.begin() as conn:
        forget_readings(conn, "ts > now() - interval '2 hours' "
                        "AND extract(microseconds FROM ts)::int % 1000 = :mark", {"mark": MARK_US})
        conn.execute(text("DELETE FROM reading_dead_letters "
                          "WHERE topic LIKE 'twin/readings/test%'"))


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mqtt") / "home"


@pytest.fixture(scope="module")
def broker(home: Path) -> Iterator[ManagedBroker]:
    with own_broker(home) as broker:
        yield broker


@pytest.fixture(scope="module")
def server(engine: Engine, database_url: str, broker: ManagedBroker,
           home: Path) -> Iterator[LiveServer]:
    mqtt = MqttSettings(url=broker.url, max_payload_bytes=MAX_PAYLOAD,
                        client_prefix=f"twin-test-{free_port()}")
    with LiveServer(Settings(database_url=database_url, home=home, mqtt=mqtt)) as live:
        wait_until(lambda: health(live)["mqtt"]["connected"], "the subscriber connects")
        yield live


@pytest.fixture()
def publisher(broker: ManagedBroker) -> Iterator[Publisher]:
    publisher = Publisher(broker.url)
    yield publisher
    publisher.close()


def health(server: LiveServer) -> dict:
    return httpx.get(f"{server.url}/healthz", timeout=10).json()


def wait_until(check: Callable[[], object], what: str, timeout_s: float = 30,
               state: Callable[[], object] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}"
                                 + (f": {state()}" if state else ""))
        time.sleep(0.1)


def batch(clock: Clock, sensors: list, n: int) -> list[dict]:
    return [{"sensor_id": sensors[k % len(sensors)][0], "ts": clock.take(),
             "value": (sensors[k % len(sensors)][1] + sensors[k % len(sensors)][2]) / 2}
            for k in range(n)]


def stored(engine: Engine, readings: list[dict]) -> int:
    """How many rows the database holds at these readings' (sensor, time) keys."""
    with engine.connect() as conn:
        return conn.execute(text(
            "SELECT count(*) FROM sensor_readings r JOIN unnest(CAST(:ids AS int[]), "
            "CAST(:ts AS timestamptz[])) AS k(sensor_id, ts) "
            "ON k.sensor_id = r.sensor_id AND k.ts = r.ts"),
            {"ids": [r["sensor_id"] for r in readings],
             "ts": [r["ts"] for r in readings]}).scalar_one()


def dead_letters(engine: Engine, topic: str) -> list[dict]:
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(text(
            "SELECT source, topic, payload, reason FROM reading_dead_letters "
            "WHERE topic = :topic ORDER BY id"), {"topic": topic})]


# -- the broker ----------------------------------------------------------------------------

def test_managed_broker_up_down_status(tmp_path: Path):
    broker = ManagedBroker(Settings(home=tmp_path / "home", mqtt=MqttSettings(port=free_port())))
    assert not broker.status().configured and not broker.status().running
    try:
        first = broker.up()
        again = broker.up()  # idempotent: the same process
        assert first.running and again.pid == first.pid
        assert broker.status().describe().startswith(f"running on 127.0.0.1:{broker.port}")
        config = broker.config_file.read_text()
        for line in (f"listener {broker.port} 127.0.0.1", "persistence true",
                     "allow_anonymous true"):
            assert line in config.splitlines()
        if os.geteuid() == 0:  # mosquitto dropped root for the unprivileged user
            owner = Path(f"/proc/{first.pid}").stat().st_uid
            assert pwd.getpwuid(owner).pw_name == broker.settings.mqtt.os_user
        # Only loopback: the port answers on 127.0.0.1, not on another address of the host.
        with socket.create_connection(("127.0.0.1", broker.port), timeout=2):
            pass
    finally:
        broker.down()
    assert not broker.status().running
    assert not broker.pid_file.exists()
    broker.down()  # stopping a stopped broker is harmless
    assert (broker.data / "mosquitto.db").exists()  # saved at shutdown


def test_managed_broker_on_a_taken_port_says_so(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker = ManagedBroker(Settings(home=tmp_path / "home", mqtt=MqttSettings(port=port)))
        with pytest.raises(BrokerError, match="TWIN_MQTT_PORT"):
            broker.up()


def test_twin_broker_cli(tmp_path: Path):
    from twin.cli import main

    env = {"TWIN_HOME": str(tmp_path / "home"), "TWIN_MQTT_PORT": str(free_port())}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        from twin.core.settings import get_settings

        get_settings.cache_clear()
        assert main(["broker", "up"]) == 0
        broker = ManagedBroker(get_settings())
        assert broker.status().running
        assert main(["broker", "status"]) == 0
        assert main(["broker", "down"]) == 0
        assert not broker.status().running
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        get_settings.cache_clear()


def test_twin_run_uses_the_managed_broker_and_stops_what_it_started(tmp_path: Path):
    from twin.cli import with_broker

    settings = Settings(home=tmp_path / "home", mqtt=MqttSettings(port=free_port()))
    serving, started = with_broker(settings)
    try:
        assert started is not None and started.status().running
        assert serving.mqtt.url == f"mqtt://127.0.0.1:{settings.mqtt.port}"
        # Already running (say `twin broker up`): used, and left running afterwards.
        again, second = with_broker(settings)
        assert second is None and again.mqtt.url == serving.mqtt.url
        # TWIN_MQTT_URL set: that broker, nothing started.
        external = settings.model_copy(update={"mqtt": MqttSettings(url="mqtt://10.0.0.1:1883")})
        assert with_broker(external) == (external, None)
    finally:
        if started is not None:
            started.down()
    assert not ManagedBroker(settings).status().running


# -- the subscriber ------------------------------------------------------------------------

def test_published_readings_are_stored_once(server: LiveServer, publisher: Publisher,
                                            engine: Engine, clock: Clock, sensors: list):
    messages = [batch(clock, sensors, 500) for _ in range(20)]
    single = batch(clock, sensors, 1)[0]
    publisher.send_many(f"{TOPIC}/batches", [{"readings": m} for m in messages])
    publisher.send(f"{TOPIC}/one", single)  # one reading object, not a batch
    published = [r for m in messages for r in m] + [single]
    wait_until(lambda: stored(engine, published) == len(published), "every reading is stored")
    assert stored(engine, published) == 10_001
    detail = health(server)["mqtt"]
    assert detail["connected"] and detail["client_id"].startswith("twin-test-")


def test_a_message_published_twice_is_stored_once(server: LiveServer, publisher: Publisher,
                                                   engine: Engine, clock: Clock,
                                                   sensors: list):
    before = health(server)["mqtt"]["already_stored"]
    readings = batch(clock, sensors, 300)
    for _ in range(2):
        publisher.send(f"{TOPIC}/twice", {"readings": readings})
    # Both copies in flight together too (one transaction must not see them as duplicates).
    more = batch(clock, sensors, 200)
    publisher.send_many(f"{TOPIC}/twice", [{"readings": more}] * 3)
    wait_until(lambda: health(server)["mqtt"]["already_stored"] - before >= 700,
               "the repeats are recognised")
    assert stored(engine, readings + more) == 500
    assert dead_letters(engine, f"{TOPIC}/twice") == []


def test_bad_payloads_are_dead_lettered_and_the_subscriber_goes_on(
        server: LiveServer, publisher: Publisher, engine: Engine, clock: Clock,
        sensors: list):
    topic = f"{TOPIC}/bad"
    good = batch(clock, sensors, 3)
    unknown = {"sensor_id": 2_000_000_000, "ts": clock.take(), "value": 1.0}
    no_offset = {"sensor_id": sensors[0][0], "ts": "2026-11-20T08:00:00", "value": 1.0}
    publisher.send(topic, b'{"readings": [ not json')
    publisher.send(topic, b"x" * (MAX_PAYLOAD + 1))
    publisher.send(topic, b"[1, 2, 3]")
    publisher.send(topic, b'{"readings": [' + json.dumps(good[0]).encode()
                   + b', {"sensor_id": 1, "ts": "2026-11-20T08:00:00+08:00", "value": NaN}]}')
    publisher.send(topic, {"readings": [unknown, good[1], no_offset]})
    after = batch(clock, sensors, 50)
    publisher.send(topic, {"readings": after})
    publisher.send(topic, good[2])
    wait_until(lambda: stored(engine, good + after) == 53, "the good rows are stored")
    wait_until(lambda: len(dead_letters(engine, topic)) == 6, "six dead letters")
    letters = dead_letters(engine, topic)
    reasons = [d["reason"] for d in letters]
    assert reasons[0].startswith("malformed: the payload is not JSON")
    assert reasons[1].startswith(f"oversized: {MAX_PAYLOAD + 1} bytes")
    assert reasons[2].startswith("malformed: the payload must be")
    assert "finite" in reasons[3]
    assert reasons[4] == "unknown sensor 2000000000"
    assert "no UTC offset" in reasons[5]
    assert {d["source"] for d in letters} == {"mqtt"}
    assert bytes(letters[0]["payload"]) == b'{"readings": [ not json'
    assert len(bytes(letters[1]["payload"])) < MAX_PAYLOAD  # truncated
    assert json.loads(bytes(letters[4]["payload"])) == unknown
    detail = health(server)
    assert detail["status"] == "ok" and detail["mqtt"]["dead_letters"] >= 6
    assert detail["mqtt"]["connected"]


def test_a_broker_restart_loses_no_acknowledged_reading(
        server: LiveServer, broker: ManagedBroker, engine: Engine, clock: Clock,
        sensors: list):
    messages = [batch(clock, sensors, 200) for _ in range(60)]
    publisher = Publisher(broker.url)
    sent: list[list[dict]] = []
    failure: list[BaseException] = []

    def publish() -> None:
        try:
            for m in messages:
                publisher.send(f"{TOPIC}/restart", {"readings": m})
                sent.append(m)
                time.sleep(0.01)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            failure.append(exc)

    thread = threading.Thread(target=publish)
    thread.start()
    try:
        wait_until(lambda: len(sent) >= 15, "a quarter is published")
        broker.down()  # SIGTERM: mosquitto saves sessions and queued messages
        assert not broker.status().running
        time.sleep(0.5)
        broker.up()
        thread.join(timeout=120)
    finally:
        publisher.close()
    assert not failure, failure
    assert len(sent) == 60
    published = [r for m in messages for r in m]
    wait_until(lambda: stored(engine, published) == len(published),
               "every acknowledged reading is stored", timeout_s=60,
               state=lambda: (stored(engine, published), health(server)))
    assert stored(engine, published) == 12_000
    wait_until(lambda: health(server)["mqtt"]["connected"], "the subscriber is back")


# -- restarts and outages of the server and the database -----------------------------------

def test_a_restarted_server_finds_its_session_and_what_was_queued(
        engine: Engine, database_url: str, clock: Clock, sensors: list, tmp_path: Path):
    """The client id is the slot's, not the pid's: the session, and the messages published
    while no server ran, are there for the restarted process."""
    home = tmp_path / "home"
    with own_broker(home) as broker:
        settings = Settings(database_url=database_url, home=home,
                            mqtt=MqttSettings(url=broker.url))
        publisher = Publisher(broker.url)
        try:
            first = batch(clock, sensors, 100)
            with LiveServer(settings) as live:
                wait_until(lambda: health(live)["mqtt"]["connected"], "connected")
                before = health(live)["mqtt"]["client_id"]
                publisher.send(f"{TOPIC}/restart-server", {"readings": first})
                wait_until(lambda: stored(engine, first) == 100, "the first batch is stored")
            queued = [batch(clock, sensors, 100) for _ in range(5)]
            publisher.send_many(f"{TOPIC}/restart-server", [{"readings": m} for m in queued])
            time.sleep(0.5)
            waiting = [r for m in queued for r in m]
            assert stored(engine, waiting) == 0  # nobody subscribed: the broker keeps them
            with LiveServer(settings) as live:
                wait_until(lambda: stored(engine, waiting) == 500,
                           "the queued messages are stored after the restart")
                detail = health(live)["mqtt"]
                assert detail["client_id"] == before
        finally:
            publisher.close()


def test_a_database_outage_acknowledges_nothing_and_loses_nothing(
        engine: Engine, database_url: str, clock: Clock, sensors: list, tmp_path: Path):
    url = make_url(database_url)
    proxy = CuttableProxy(url.host or "127.0.0.1", url.port or 5432)
    through_proxy = url.set(port=proxy.port).render_as_string(hide_password=False)
    home = tmp_path / "home"
    try:
        with own_broker(home) as broker:
            settings = Settings(database_url=through_proxy, home=home,
                                mqtt=MqttSettings(url=broker.url, reconnect_max_s=1.0))
            publisher = Publisher(broker.url)
            with LiveServer(settings) as live:
                wait_until(lambda: health(live)["mqtt"]["connected"], "connected")
                first = batch(clock, sensors, 100)
                publisher.send(f"{TOPIC}/outage", {"readings": first})
                wait_until(lambda: stored(engine, first) == 100, "stored before the outage")
                acked = health(live)["mqtt"]["acknowledged"]

                proxy.cut()
                during = [batch(clock, sensors, 100) for _ in range(3)]
                publisher.send_many(f"{TOPIC}/outage", [{"readings": m} for m in during])
                wait_until(lambda: health(live)["mqtt"]["database_retries"] >= 2,
                           "the subscriber retries")
                detail = health(live)
                assert detail["status"] == "unavailable"  # 503: the database is away
                assert detail["mqtt"]["acknowledged"] == acked  # nothing acked meanwhile
                assert detail["mqtt"]["connected"]

                proxy.restore()
                waiting = [r for m in during for r in m]
                wait_until(lambda: stored(engine, waiting) == 300, "stored after the outage")
                wait_until(lambda: health(live)["mqtt"]["acknowledged"] == acked + 3,
                           "acknowledged after the commit")
            publisher.close()
    finally:
        proxy.close()


def test_one_process_subscribes_and_another_takes_over(
        engine: Engine, database_url: str, clock: Clock, sensors: list, tmp_path: Path):
    """Two server processes of one home (two servers in this process hold the lock file
    apart alike): one subscribes, the other stands by and takes the same session over when
    the first ends, with what was published meanwhile."""
    home = tmp_path / "home"
    host = socket.gethostname().split(".")[0]
    with own_broker(home) as broker:
        settings = Settings(database_url=database_url, home=home,
                            mqtt=MqttSettings(url=broker.url))
        publisher = Publisher(broker.url)
        first: LiveServer | None = LiveServer(settings).__enter__()
        try:
            assert first is not None
            wait_until(lambda: health(first)["mqtt"]["connected"], "the first connects")
            assert health(first)["mqtt"]["role"] == "subscriber"
            with LiveServer(settings) as second:
                assert health(second)["mqtt"]["role"] == "standby"
                assert not health(second)["mqtt"]["connected"]
                readings = batch(clock, sensors, 100)
                publisher.send(f"{TOPIC}/takeover", {"readings": readings})
                wait_until(lambda: stored(engine, readings) == 100, "stored by the first")
                assert health(second)["mqtt"]["messages"] == 0
                first.__exit__(None, None, None)  # the first process ends
                first = None
                queued = batch(clock, sensors, 100)
                publisher.send(f"{TOPIC}/takeover", {"readings": queued})
                wait_until(lambda: stored(engine, queued) == 100, "stored by the second")
                detail = health(second)["mqtt"]
                assert detail["role"] == "subscriber" and detail["messages"] >= 1
                assert detail["client_id"] == f"twin-{host}"
        finally:
            if first is not None:
                first.__exit__(None, None, None)
            publisher.close()


def test_shared_subscription_spreads_messages_over_processes(
        engine: Engine, database_url: str, clock: Clock, sensors: list, tmp_path: Path):
    home = tmp_path / "home"
    with own_broker(home) as broker:
        settings = Settings(database_url=database_url, home=home,
                            mqtt=MqttSettings(url=broker.url, shared=True))
        publisher = Publisher(broker.url)
        try:
            with LiveServer(settings) as one, LiveServer(settings) as two:
                ids = {health(s)["mqtt"]["client_id"] for s in (one, two)}
                assert len(ids) == 2 and all(i.rsplit("-", 1)[1] in "01" for i in ids)
                for s in (one, two):
                    wait_until(lambda s=s: health(s)["mqtt"]["connected"], "connected")
                messages = [batch(clock, sensors, 50) for _ in range(20)]
                publisher.send_many(f"{TOPIC}/shared", [{"readings": m} for m in messages])
                published = [r for m in messages for r in m]
                wait_until(lambda: stored(engine, published) == 1000, "every reading stored")
                counts = [health(s)["mqtt"]["messages"] for s in (one, two)]
                assert sum(counts) == 20 and min(counts) > 0, counts
        finally:
            publisher.close()

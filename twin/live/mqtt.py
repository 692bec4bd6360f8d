"""The MQTT subscriber: sensor readings from a broker, acknowledged only after they are committed.

When ``TWIN_MQTT_URL`` names a broker (``mqtt://host:port``; `twin run` points it at the
broker it manages), twin subscribes to ``TWIN_MQTT_TOPIC`` (default ``twin/readings/#``). A
message's payload is the HTTP batch, ``{"readings": [{"sensor_id": 12, "ts":
"2026-11-20T08:00:00+08:00", "value": 1.5}, ...]}``, or one reading object.

Delivery: MQTT 5, QoS 1, a persistent session (clean start off, a session expiry), manual
acknowledgements. A message is acknowledged (PUBACK) only once its rows are committed: the
good readings stored (idempotent on sensor + time, so a message delivered again after a crash
or a reconnection is not stored twice) and, in the same transaction, its rejected rows, or
the whole message when it is malformed or over ``TWIN_MQTT_MAX_PAYLOAD_BYTES``, written to
``reading_dead_letters`` with the reason. While the database is down nothing is acknowledged:
the batch is retried with backoff and the broker keeps the rest queued for the session.

Who subscribes (``TWIN_MQTT_SHARED``):

* default: one server process of this TWIN_HOME, the one holding the lock file
  ``TWIN_HOME/mqtt-slots/subscriber.lock``, as ``<prefix>-<host>`` with a plain
  subscription; the other processes stand by and take the lock (and the same client id and
  session) when it ends. mosquitto 2.0.11 restores plain subscriptions from its persistence
  file but not shared ones: with a shared subscription, messages published after a broker
  restart and before the subscribers reconnect reach nobody (tests/test_mqtt.py shows the
  plain one loses none).
* shared: every process subscribes to ``$share/twin/<topic>`` and the broker hands each
  message to one of them; the client id is ``<prefix>-<host>-<slot>``, the slot the lowest
  number whose lock file (``TWIN_HOME/mqtt-slots/<n>.lock``) no live process holds.

* ``TWIN_MQTT_LEADER=database`` (the nodes of ``twin cluster up``, each with a home of its
  own): the one subscriber is the process of any node holding an advisory lock on the
  primary (``twin.core.db.SessionLock``), as ``<prefix>-subscriber``; the others stand by.
  The holder checks its lock every second and disconnects when it lost it (its database
  connection dropped), so two nodes never fight over the client id for long; a node killed
  loses the lock with its connection, and another resumes the same session.

Either way the client id is stable across a restart, so the restarted process finds its
persistent session (and what was queued for it) again, where a pid would strand it.

Several small messages share one transaction (up to ``batch_messages`` messages and
``batch_readings`` readings); each is acknowledged after that commit, in the order received.
The paho network loop runs in a thread of its own; storing runs on the app's event loop.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from twin.core.db import SessionLock
from twin.core.errors import DatabaseUnavailable, StatementTimeout
from twin.core.settings import Settings
from twin.live.readings import store_batch

log = logging.getLogger("twin.live.mqtt")

SHARE_GROUP = "twin"
# The advisory lock of the one subscriber among a cluster's nodes (TWIN_MQTT_LEADER=database).
SUBSCRIBER_LOCK = 0x7477696E_6D717474
# Bytes of a dead-lettered payload kept in reading_dead_letters.
DEAD_LETTER_BYTES = 4096
# Errors that mean "the database is not there right now": retry, never acknowledge.
TRANSIENT = (DBAPIError, OSError, asyncio.TimeoutError, DatabaseUnavailable, StatementTimeout)
# Times a message that fails for an unexpected reason is retried before it is dead-lettered.
MAX_UNEXPECTED_FAILURES = 3

_DEAD_LETTERS = text("""
    INSERT INTO reading_dead_letters (source, topic, payload, reason)
    SELECT 'mqtt', * FROM unnest(CAST(:topics AS text[]), CAST(:payloads AS bytea[]),
                                 CAST(:reasons AS text[]))
""")


# -- messages ------------------------------------------------------------------------------

@dataclass
class Message:
    """One PUBLISH from the broker, as the paho thread handed it over."""

    generation: int  # the broker connection it came on (acks go only on that one)
    mid: int
    qos: int
    topic: str
    payload: bytes
    rows: list = field(default_factory=list)
    # Set when the whole message is dead-lettered: the reason.
    dead: str | None = None
    failures: int = 0


def parse(message: Message, max_payload_bytes: int, max_batch: int) -> None:
    """Fill ``message.rows`` from the payload, or ``message.dead`` with why it cannot be read."""
    size = len(message.payload)
    if size > max_payload_bytes:
        message.dead = (f"oversized: {size} bytes, over TWIN_MQTT_MAX_PAYLOAD_BYTES "
                        f"({max_payload_bytes})")
        return
    try:
        body = json.loads(message.payload)
    except (UnicodeDecodeError, ValueError) as exc:
        message.dead = f"malformed: the payload is not JSON ({exc})"
        return
    if isinstance(body, dict) and "readings" in body:
        rows = body["readings"]
        if not isinstance(rows, list):
            message.dead = 'malformed: "readings" must be a list of readings'
            return
    elif isinstance(body, dict):
        rows = [body]
    else:
        message.dead = ('malformed: the payload must be {"readings": [...]} or one reading '
                        '{"sensor_id": 12, "ts": "2026-11-20T08:00:00+08:00", "value": 1.5}')
        return
    if len(rows) > max_batch:
        message.dead = (f"batch over the limit: {len(rows)} readings, at most {max_batch} per "
                        "message (TWIN_SENSORS_MAX_BATCH); split it")
        return
    message.rows = rows


def _key(row: object) -> object:
    if isinstance(row, dict):
        try:
            return hash((row.get("sensor_id"), row.get("ts")))
        except TypeError:
            return None
    return None


def group(messages: list[Message], max_readings: int) -> list[list[Message]]:
    """Consecutive messages in transactions of at most ``max_readings`` readings, a new one
    started where a message repeats a (sensor, time) of the group: within one batch the
    ingest would reject the repeat as a duplicate, across transactions it is recognised
    as already stored (a publisher's retry, the same message published twice)."""
    groups: list[list[Message]] = []
    current: list[Message] = []
    keys: set = set()
    count = 0
    for message in messages:
        mine = {k for k in map(_key, message.rows) if k is not None}
        if current and (count + len(message.rows) > max_readings or keys & mine):
            groups.append(current)
            current, keys, count = [], set(), 0
        current.append(message)
        keys |= mine
        count += len(message.rows)
    if current:
        groups.append(current)
    return groups


# -- the stable client id -----------------------------------------------------------------

def claim_slot(folder: Path, limit: int = 1024) -> tuple[int, IO[bytes] | None]:
    """The lowest slot no live process holds, and its lock file (kept open while it is ours)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("mqtt: cannot make %s (%s): the client id is per process", folder, exc)
        return -1, None
    for slot in range(limit):
        handle = (folder / f"{slot}.lock").open("ab")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        return slot, handle
    return -1, None


def try_lock(path: Path) -> IO[bytes] | None:
    """The lock file, held (kept open while it is ours), or None when another process has it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("ab")
    except OSError as exc:
        log.warning("mqtt: cannot open %s (%s)", path, exc)
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


def client_id(settings: Settings, slot: int | None) -> str:
    """``<prefix>-<host>`` for the one subscriber of this home, ``<prefix>-<host>-<slot>`` for
    each process of a shared subscription."""
    host = socket.gethostname().split(".")[0] or "host"
    base = f"{settings.mqtt.client_prefix}-{host}"
    if slot is None:
        return base
    return f"{base}-{slot if slot >= 0 else f'pid{os.getpid()}'}"


# -- the subscriber ------------------------------------------------------------------------

@dataclass
class Counters:
    connected: bool = False
    session_present: bool | None = None
    connects: int = 0
    messages: int = 0           # PUBLISHes received (redeliveries included)
    acknowledged: int = 0       # PUBACKs sent after a commit
    readings: int = 0           # readings received in readable messages
    stored: int = 0             # readings inserted
    already_stored: int = 0     # readings a redelivery or a duplicate brought again
    dead_letters: int = 0       # rows written to reading_dead_letters
    dead_messages: int = 0      # whole messages dead-lettered (malformed, oversized)
    transactions: int = 0
    database_retries: int = 0
    last_error: str | None = None


class Subscriber:
    def __init__(self, settings: Settings, engine: AsyncEngine):
        self.settings = settings
        self.mqtt = settings.mqtt
        self.engine = engine
        self.counters = Counters()
        self.shared = self.mqtt.shared
        self._slot_lock: IO[bytes] | None = None
        self.slot: int | None
        if self.shared:
            self.slot, self._slot_lock = claim_slot(settings.home / "mqtt-slots")
            self.client_id = client_id(settings, self.slot)
            self.topic = f"$share/{SHARE_GROUP}/{self.mqtt.topic}"
        else:
            self.slot = None
            self.client_id = (f"{self.mqtt.client_prefix}-subscriber"
                              if self.mqtt.leader == "database" else client_id(settings, None))
            self.topic = self.mqtt.topic
        self._db_lock: SessionLock | None = None
        self._leading = False
        self._leader_file = settings.home / "mqtt-slots" / "subscriber.lock"
        self._standby: asyncio.Task | None = None
        self._generation = 0
        self._lock = threading.Lock()
        self._queue: asyncio.Queue[Message] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._busy = False
        self.client = self._client()

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> Subscriber:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._consume(), name="twin-mqtt-consumer")
        if not self.shared and self.mqtt.leader == "database":
            self._db_lock = SessionLock(self.settings, SUBSCRIBER_LOCK, "mqtt subscriber",
                                        application_name="twin mqtt leader")
            self._standby = asyncio.create_task(self._lead_by_database(),
                                                name="twin-mqtt-leader")
            return self
        if not self.shared:
            self._slot_lock = try_lock(self._leader_file)
            if self._slot_lock is None:
                # Another process of this home subscribes; this one takes over when it ends.
                self._standby = asyncio.create_task(self._stand_by(), name="twin-mqtt-standby")
                return self
        self._connect()
        return self

    async def _stand_by(self) -> None:
        while self._slot_lock is None:
            await asyncio.sleep(1.0)
            self._slot_lock = try_lock(self._leader_file)
        log.info("mqtt: the subscribing process of this home ended: this one takes over")
        self._connect()

    async def _lead_by_database(self) -> None:
        """Subscribe while this process holds the subscriber lock; stand by otherwise."""
        assert self._db_lock is not None
        while True:
            try:
                held = await self._db_lock.hold() is not None
            except Exception as error:  # the database went away: so did the lock
                log.warning("mqtt: the subscriber lock's connection failed (%s)", error)
                await self._db_lock.release()
                held = False
            if held and not self._leading:
                log.info("mqtt: this process holds the subscriber lock: subscribing")
                self._leading = True
                self.client = self._client()
                self._connect()
            elif not held and self._leading:
                log.warning("mqtt: the subscriber lock is lost: standing by")
                self._leading = False
                await asyncio.to_thread(self._disconnect)
            await asyncio.sleep(1.0)

    @property
    def role(self) -> str:
        if self.shared:
            return "shared"
        if self._db_lock is not None:
            return "subscriber" if self._leading else "standby"
        return "subscriber" if self._slot_lock is not None else "standby"

    def _connect(self) -> None:
        url = urlsplit(self.mqtt.url or "")
        host, port = url.hostname or "127.0.0.1", url.port or (8883 if url.scheme == "mqtts"
                                                               else 1883)
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = self.mqtt.session_expiry_s
        properties.ReceiveMaximum = self.mqtt.receive_maximum
        # Never the first connection's failure to stop the server: the loop retries.
        self.client.connect_async(host, port, keepalive=30, clean_start=False,
                                  properties=properties)
        self.client.loop_start()
        log.info("mqtt: subscribing to %s on %s:%d as %s", self.topic, host, port,
                 self.client_id)

    async def stop(self) -> None:
        self._stopping = True
        if self._standby is not None:
            self._standby.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._standby
        if self._task is not None:
            # The batch being stored finishes (and is acknowledged) if it can within 5 s;
            # anything not acknowledged is delivered again to this session.
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._drained(), timeout=5)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await asyncio.to_thread(self._disconnect)
        if self._slot_lock is not None:
            self._slot_lock.close()
            self._slot_lock = None
        if self._db_lock is not None:
            await self._db_lock.close()
            self._leading = False

    async def _drained(self) -> None:
        while self._busy:
            await asyncio.sleep(0.02)

    def _disconnect(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        with contextlib.suppress(Exception):
            self.client.loop_stop()
        self.counters.connected = False

    def detail(self) -> dict:
        c = self.counters
        return {"connected": c.connected, "role": self.role, "client_id": self.client_id,
                "topic": self.topic,
                "messages": c.messages, "acknowledged": c.acknowledged,
                "readings": c.readings, "stored": c.stored,
                "already_stored": c.already_stored, "dead_letters": c.dead_letters,
                "transactions": c.transactions, "database_retries": c.database_retries,
                "last_error": c.last_error}

    # -- paho (its own thread) ----------------------------------------------------------
    def _client(self) -> paho.Client:
        client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=self.client_id, protocol=paho.MQTTv5,
                             manual_ack=True)
        url = urlsplit(self.mqtt.url or "")
        if url.username:
            client.username_pw_set(unquote(url.username),
                                   unquote(url.password) if url.password else None)
        if url.scheme == "mqtts":
            client.tls_set()
        client.reconnect_delay_set(max(1, int(self.mqtt.reconnect_min_s)),
                                   max(1, int(self.mqtt.reconnect_max_s)))
        client.max_inflight_messages_set(self.mqtt.receive_maximum)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if reason.is_failure:
            self.counters.last_error = f"broker refused the connection: {reason}"
            log.warning("mqtt: %s", self.counters.last_error)
            return
        with self._lock:
            self._generation += 1
        self.counters.connected = True
        self.counters.connects += 1
        self.counters.session_present = bool(flags.session_present)
        # Subscribing again is harmless when the session kept the subscription.
        client.subscribe(self.topic, qos=self.mqtt.qos)
        log.info("mqtt: connected as %s (session %s)", self.client_id,
                 "resumed" if flags.session_present else "new")

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        was = self.counters.connected
        self.counters.connected = False
        if was and not self._stopping:
            self.counters.last_error = f"disconnected from the broker: {reason}"
            log.warning("mqtt: %s; reconnecting", self.counters.last_error)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            generation = self._generation
        message = Message(generation, msg.mid, msg.qos, msg.topic, bytes(msg.payload))
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the app's loop closed: shutting down
                self._loop.call_soon_threadsafe(self._queue.put_nowait, message)

    def _ack(self, message: Message) -> None:
        """PUBACK after the commit; never on a later connection than the message came on (its
        packet id may mean another message there: the broker delivers it again instead)."""
        if message.qos == 0:
            return
        with self._lock:
            current = self._generation
        if message.generation == current and self.counters.connected:
            self.client.ack(message.mid, message.qos)
            self.counters.acknowledged += 1

    # -- storing (the event loop) -------------------------------------------------------
    async def _consume(self) -> None:
        while True:
            first = await self._queue.get()
            self._busy = True
            try:
                batch = [first]
                while len(batch) < self.mqtt.batch_messages and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                await self._handle(batch)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one batch end the subscriber
                log.exception("mqtt: unexpected failure handling %d messages", len(batch))
            finally:
                self._busy = False

    async def _handle(self, batch: list[Message]) -> None:
        for message in batch:
            self.counters.messages += 1
            parse(message, self.mqtt.max_payload_bytes, self.settings.sensors.max_batch)
            if message.dead is None:
                self.counters.readings += len(message.rows)
        for messages in group(batch, self.mqtt.batch_readings):
            await self._commit_with_retry(messages)

    async def _commit_with_retry(self, messages: list[Message]) -> None:
        delay = self.mqtt.reconnect_min_s
        while True:
            if self._stale(messages):
                return  # the connection they came on is gone: the broker delivers them again
            try:
                await self._commit(messages)
            except TRANSIENT as exc:
                self.counters.database_retries += 1
                self.counters.last_error = f"database: {_first_line(exc)}"
                log.warning("mqtt: storing %d messages failed (%s); retrying in %.1f s",
                            len(messages), self.counters.last_error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.mqtt.reconnect_max_s)
                continue
            except Exception as exc:
                if len(messages) > 1:  # find the one that fails, store the others
                    for message in messages:
                        await self._commit_with_retry([message])
                    return
                message = messages[0]
                message.failures += 1
                self.counters.last_error = f"{type(exc).__name__}: {_first_line(exc)}"
                log.exception("mqtt: message on %s failed (%d of %d)", message.topic,
                              message.failures, MAX_UNEXPECTED_FAILURES)
                if message.failures >= MAX_UNEXPECTED_FAILURES:
                    message.rows, message.dead = [], f"not stored: {self.counters.last_error}"
                await asyncio.sleep(delay)
                continue
            for message in messages:
                self._ack(message)
            return

    def _stale(self, messages: list[Message]) -> bool:
        with self._lock:
            current = self._generation
        acked = [m for m in messages if m.qos]
        return bool(acked) and all(m.generation != current for m in acked)

    async def _commit(self, messages: list[Message]) -> None:
        """Store the readable messages' rows and write the dead letters (rejected rows,
        unreadable messages) in one transaction, committed before any message is acked."""
        live = [m for m in messages if m.dead is None and m.rows]
        dead: list[tuple[str, bytes, str]] = [
            (m.topic, m.payload[:DEAD_LETTER_BYTES], m.dead) for m in messages if m.dead]
        result = None
        async with self.engine.begin() as conn:
            if live:
                rows: list = []
                starts: list[int] = []
                for m in live:
                    starts.append(len(rows))
                    rows.extend(m.rows)
                result = await self._store(conn, rows)
                for rejection in result["rejected"]:
                    index = rejection["index"]
                    m = live[bisect.bisect_right(starts, index) - 1]
                    dead.append((m.topic, _row_bytes(rows[index]), rejection["reason"]))
            if dead:
                await conn.execute(_DEAD_LETTERS, {"topics": [d[0] for d in dead],
                                                   "payloads": [d[1] for d in dead],
                                                   "reasons": [d[2] for d in dead]})
        self.counters.transactions += 1
        if result is not None:
            self.counters.stored += result["accepted"]
            self.counters.already_stored += result["already_stored"]
        self.counters.dead_letters += len(dead)
        self.counters.dead_messages += sum(1 for m in messages if m.dead)

    async def _store(self, conn: AsyncConnection, rows: list) -> dict:
        """The ingest's entry point for rows out of their envelope: it joins the transaction
        the dead letters are written in."""
        return await store_batch(conn, rows, self.settings.sensors, source="mqtt")


def _row_bytes(row: object) -> bytes:
    try:
        body = json.dumps(row, allow_nan=True).encode()
    except (TypeError, ValueError):
        body = repr(row).encode()
    return body[:DEAD_LETTER_BYTES]


def _first_line(exc: BaseException) -> str:
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class Idle:
    """No broker configured (``TWIN_MQTT_URL`` unset): nothing to subscribe to."""

    def detail(self) -> None:
        return None

    async def stop(self) -> None:
        return None


async def start(ctx: Any) -> Subscriber | Idle:
    settings: Settings = ctx.settings
    if settings.mqtt.url is None:
        return Idle()
    return await Subscriber(settings, ctx.engine).start()


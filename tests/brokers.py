"""A managed mosquitto of a test's own and a QoS 1 publisher that knows what was acknowledged."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.servers import free_port
from twin.core.broker import ManagedBroker
from twin.core.settings import MqttSettings, Settings


@contextmanager
def own_broker(home: Path) -> Iterator[ManagedBroker]:
    """mosquitto on a free loopback port with its folder in ``home``; stopped afterwards."""
    broker = ManagedBroker(Settings(home=home, mqtt=MqttSettings(port=free_port())))
    broker.up()
    try:
        yield broker
    finally:
        broker.down()


class Publisher:
    """A paho client publishing QoS 1: ``send`` returns once the broker acknowledged (PUBACK),
    publishing again after a timeout or a lost connection (the broker restarting)."""

    def __init__(self, url: str):
        port = int(url.rsplit(":", 1)[1])
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=f"test-pub-{uuid.uuid4().hex[:8]}",
                                  protocol=paho.MQTTv5)
        self.client.reconnect_delay_set(1, 2)
        self.connected = threading.Event()
        self.client.on_connect = lambda *a: self.connected.set()
        self.client.on_disconnect = lambda *a: self.connected.clear()
        self.client.connect_async("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        assert self.connected.wait(10), "the publisher could not connect"
        self.acknowledged = 0
        self.attempts = 0

    def send(self, topic: str, payload: bytes | str | dict, timeout_s: float = 60) -> None:
        body = json.dumps(payload) if isinstance(payload, dict) else payload
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.connected.wait(timeout=max(0.0, deadline - time.monotonic()))
            self.attempts += 1
            info = self.client.publish(topic, body, qos=1)
            try:
                info.wait_for_publish(timeout=3)
            except (RuntimeError, ValueError):
                time.sleep(0.1)
                continue
            if info.is_published():
                self.acknowledged += 1
                return
        raise TimeoutError(f"no PUBACK for a message on {topic} within {timeout_s} s")

    def send_many(self, topic: str, payloads: list, window: int = 50) -> None:
        """Publish with up to ``window`` messages in flight; every one acknowledged."""
        pending: list = []
        for payload in payloads:
            body = json.dumps(payload) if isinstance(payload, dict) else payload
            pending.append((self.client.publish(topic, body, qos=1), body))
            if len(pending) >= window:
                self._settle(topic, pending)
                pending = []
        self._settle(topic, pending)

    def _settle(self, topic: str, pending: list) -> None:
        for info, body in pending:
            try:
                info.wait_for_publish(timeout=10)
            except (RuntimeError, ValueError):
                pass
            if info.is_published():
                self.acknowledged += 1
            else:
                self.send(topic, body)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class CuttableProxy:
    """A TCP relay to ``host:port`` on a free loopback port, which a test can cut (every
    connection closed, new ones refused) and restore: a database outage as the server sees it."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open = True
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.pairs.append((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.open = False
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for s in pair:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def restore(self) -> None:
        self.open = True

    def close(self) -> None:
        self.cut()
        self.listener.close()

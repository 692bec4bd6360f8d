"""twin's managed MQTT broker: Debian's mosquitto, with its configuration and its persistence
in a folder that twin owns (``TWIN_HOME/mosquitto``), like the PostGIS cluster (cluster.py).

It listens on 127.0.0.1 only (anonymous clients are allowed: loopback, the sensor gateways'
bridge or a local relay publish there), keeps QoS 1 messages and persistent sessions across
a restart (``persistence true``, saved every few seconds and at shutdown), and runs as a
daemon with a pid file. mosquitto drops root privileges to the user its configuration names,
so when twin runs as root the folder is handed to that unprivileged user (``TWIN_MQTT_OS_USER``,
Debian's ``mosquitto`` by default, created on first use if missing).
"""

from __future__ import annotations

import logging
import os
import pwd
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from twin.core.cluster import (
    hand_over,
    log_tail,
    port_open,
    process_alive,
    running_pid,
    system_user,
)
from twin.core.errors import TwinError
from twin.core.settings import Settings

log = logging.getLogger("twin.core.broker")


class BrokerError(TwinError):
    """The managed MQTT broker could not be set up, started or stopped."""


# Sized for 10,000 readings a second: a subscriber acknowledges each message only after its
# rows are committed, so a few hundred may be in flight to it at once; while twin is down
# (a restart, a database outage) the broker queues for its persistent session.
CONFIG = """\
# Written by twin (twin/core/broker.py) on every `twin broker up`: edits are overwritten.
pid_file {pid_file}
{user_line}
listener {port} 127.0.0.1
allow_anonymous true
persistence true
persistence_location {data}/
persistence_file mosquitto.db
# Saved every 5 s and at shutdown: a restart keeps queued QoS 1 messages and sessions.
autosave_interval 5
autosave_on_changes false
# Persistent sessions of subscribers that stay away are dropped after this long.
persistent_client_expiration 14d
# QoS 1 messages in flight to one client (its MQTT 5 receive maximum may lower it) and
# queued for it beyond those (while it is busy or offline), bounded in bytes too.
max_inflight_messages 1000
max_queued_messages 1000000
max_queued_bytes 2147483648
# Bigger packets are refused by the broker; twin dead-letters payloads over
# TWIN_MQTT_MAX_PAYLOAD_BYTES, which stays below this.
max_packet_size 67108864
set_tcp_nodelay true
log_dest file {log_file}
log_type error
log_type warning
log_type notice
log_type information
connection_messages true
log_timestamp_format %Y-%m-%dT%H:%M:%S
"""


@dataclass(frozen=True)
class BrokerStatus:
    configured: bool
    running: bool
    port: int
    folder: Path
    pid: int | None = None

    def describe(self) -> str:
        if not self.configured:
            return f"not set up ({self.folder})"
        if not self.running:
            return f"stopped ({self.folder})"
        return f"running on 127.0.0.1:{self.port}, pid {self.pid} ({self.folder})"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


class ManagedBroker:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.port = settings.mqtt.port
        self.binary = Path(settings.mqtt.broker_bin)
        self.folder = settings.home / "mosquitto"
        self.config_file = self.folder / "mosquitto.conf"
        self.data = self.folder / "data"
        self.pid_file = self.data / "mosquitto.pid"
        self.log_file = self.data / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    # -- public -------------------------------------------------------------------------
    def up(self, timeout_s: float = 15.0) -> BrokerStatus:
        """Write the configuration and start the broker unless it is running (idempotent)."""
        if not self.binary.exists():
            raise BrokerError(f"mosquitto not found at {self.binary}: install Debian's "
                              "mosquitto package (make run does this)")
        current = self.status()
        if current.running:
            return current
        self._write_config()
        self.pid_file.unlink(missing_ok=True)
        if port_open(self.port):
            raise BrokerError(f"127.0.0.1:{self.port} is taken by another program: set "
                              "TWIN_MQTT_PORT to a free port, or TWIN_MQTT_URL to use a "
                              "running broker")
        log_start = self.log_file.stat().st_size if self.log_file.exists() else 0
        done = subprocess.run([str(self.binary), "-c", str(self.config_file), "-d"],
                              capture_output=True, text=True, cwd="/")
        if done.returncode != 0:
            said = (done.stderr or done.stdout).strip() or self._log_tail(log_start)
            raise BrokerError(f"mosquitto did not start (exit {done.returncode}): {said}")
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status()
            if status.running and port_open(self.port):
                log.info("managed MQTT broker started on 127.0.0.1:%d", self.port)
                return status
            if time.monotonic() > deadline:
                raise BrokerError(f"mosquitto did not come up on 127.0.0.1:{self.port} within "
                                  f"{timeout_s:g} s: {self._log_tail(log_start)}")
            time.sleep(0.05)

    def down(self, timeout_s: float = 15.0) -> None:
        """Stop the broker if it runs (SIGTERM: it saves its persistence file first)."""
        pid = self._pid()
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            self.pid_file.unlink(missing_ok=True)
            return
        deadline = time.monotonic() + timeout_s
        while process_alive(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                log.warning("mosquitto (pid %d) ignored SIGTERM for %g s: killed", pid,
                            timeout_s)
                break
            time.sleep(0.05)
        self.pid_file.unlink(missing_ok=True)
        log.info("managed MQTT broker stopped")

    def status(self) -> BrokerStatus:
        pid = self._pid()
        return BrokerStatus(self.config_file.exists(), pid is not None, self.port, self.folder,
                            pid)

    # -- internals ----------------------------------------------------------------------
    def _pid(self) -> int | None:
        """The broker's pid when its pid file names a live mosquitto of this folder."""
        return running_pid(self.pid_file, str(self.config_file))

    def _write_config(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        user = self._os_user()
        text = CONFIG.format(pid_file=self.pid_file, port=self.port, data=self.data,
                             log_file=self.log_file,
                             user_line=f"user {user.pw_name}" if user else "")
        self.config_file.write_text(text)
        if user is None:
            return
        # mosquitto reads its configuration as root, then works as the user: it writes its
        # persistence, log and (removes its) pid file in the data folder.
        hand_over(self.data, (self.data, *self.data.iterdir()), user, "the broker's user")

    def _os_user(self) -> pwd.struct_passwd | None:
        """The user the broker runs as when twin runs as root; None otherwise."""
        if os.geteuid() != 0:
            return None
        return system_user(self.settings.mqtt.os_user)

    def _log_tail(self, start: int) -> str:
        return log_tail(self.log_file, start)

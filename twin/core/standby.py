"""Hot standbys of the managed PostGIS primary, by PostgreSQL's own streaming replication.

Standby k lives in ``TWIN_HOME/standbys/<k>/pgdata`` and listens on 127.0.0.1 at
``TWIN_DB_PORT + 10 + k``. It is made once by ``pg_basebackup -X stream -R -C -S
twin_standby_<k>`` from the primary: a physical replication slot on the primary keeps the WAL
the standby has not received yet (so a stopped standby catches up when it starts again, and
``destroy`` must drop the slot, or the primary keeps WAL forever). It runs as the cluster's
OS user, as the primary does (twin/core/cluster.py), with ``hot_standby`` (read-only queries)
and ``hot_standby_feedback`` (the primary's vacuum keeps rows a standby query still reads, so
fewer standby queries are cancelled by recovery conflicts).

``wait_for_lsn`` is the read-your-writes primitive: after a write on the primary, read
``pg_current_wal_lsn()`` there, and a standby connection serves a read that sees the write
once ``wait_for_lsn`` returned True on it.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg.pq import TransactionStatus
from sqlalchemy.engine import make_url

from twin.core.cluster import ManagedCluster, hand_over, system_user
from twin.core.errors import ClusterError
from twin.core.settings import Settings, StandbySettings

log = logging.getLogger("twin.core.standby")

LOOPBACK = ipaddress.ip_address("127.0.0.1")


@dataclass(frozen=True)
class StandbyStatus:
    initialised: bool
    running: bool
    port: int
    pgdata: Path
    # None when the standby (or, for the lags, the primary) does not answer.
    in_recovery: bool | None = None
    replay_lsn: str | None = None
    # Bytes of WAL the primary wrote that the standby has not replayed yet.
    lag_bytes: int | None = None
    # Seconds since the standby replayed the last transaction, while it has WAL left to
    # replay; None when it has replayed everything (idle) or never replayed a transaction.
    lag_s: float | None = None

    def describe(self) -> str:
        if not self.initialised:
            return f"not initialised ({self.pgdata})"
        if not self.running:
            return f"stopped ({self.pgdata})"
        lag = "lag unknown" if self.lag_bytes is None else f"{self.lag_bytes} bytes behind"
        if self.lag_s is not None:
            lag += f", {self.lag_s:.1f} s"
        role = "standby" if self.in_recovery else "NOT in recovery"
        return f"running on 127.0.0.1:{self.port}, {role}, {lag} ({self.pgdata})"


def _libpq(url: str) -> str:
    """A SQLAlchemy URL as libpq reads it (password kept)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _hba_rule_admits(rule: tuple, role: str) -> bool:
    """Whether a row of pg_hba_file_rules matches a replication connection of ``role`` from
    127.0.0.1 over TCP without SSL (how pg_basebackup and the standby connect)."""
    _line, kind, databases, users, address, netmask, _method, error = rule
    if error is not None or kind not in ("host", "hostnossl"):
        return False
    if "replication" not in (databases or []):
        return False
    if not ({"all", role} & set(users or [])):
        return False
    if address in ("all", "samehost", "samenet"):
        return True
    try:
        network = ipaddress.ip_network(f"{address}/{netmask}" if netmask else address,
                                       strict=False)
    except ValueError:  # a host name: not ours to resolve
        return False
    return LOOPBACK in network


def prepare_primary(cluster: ManagedCluster) -> None:
    """Make the primary accept streaming replication of twin's role from loopback; idempotent.

    Checks that its WAL carries what a standby needs (``wal_level`` replica, the PostgreSQL 15
    default), gives the role REPLICATION if it lacks it, and adds ``host replication <role>
    127.0.0.1/32 scram-sha-256`` to pg_hba.conf (then reloads) when no line admits it yet
    (initdb's default file has one for every role)."""
    role = cluster.settings.db.user
    with psycopg.connect(_libpq(cluster.url("postgres")), autocommit=True) as conn:
        wal_level = conn.execute("SHOW wal_level").fetchone()
        if not wal_level or wal_level[0] not in ("replica", "logical"):
            raise ClusterError(
                f"the primary's wal_level is {wal_level[0] if wal_level else '?'}: a standby "
                "needs 'replica' (the default); set wal_level = replica in "
                f"{cluster.pgdata / 'postgresql.conf'} and restart the cluster")
        for setting in ("max_wal_senders", "max_replication_slots"):
            value = conn.execute(f"SHOW {setting}").fetchone()
            if not value or int(value[0]) < 1:
                raise ClusterError(f"the primary's {setting} is 0: a standby needs at least 1 "
                                   "(PostgreSQL 15's default is 10); raise it and restart")
        row = conn.execute("SELECT rolsuper, rolreplication FROM pg_roles "
                           "WHERE rolname = current_user").fetchone()
        if row and not row[1]:
            try:
                conn.execute(f'ALTER ROLE "{role}" REPLICATION')
            except psycopg.errors.InsufficientPrivilege:
                raise ClusterError(f"role {role} lacks REPLICATION and may not grant it: run "
                                   f'ALTER ROLE "{role}" REPLICATION as a superuser') from None
            log.info("gave role %s REPLICATION", role)

        rules = conn.execute(
            "SELECT line_number, type, database, user_name, address, netmask, auth_method, "
            "error FROM pg_hba_file_rules ORDER BY line_number").fetchall()
        # pg_hba.conf is read top down and the first matching line decides.
        first = next((rule for rule in rules if _hba_rule_admits(rule, role)), None)
        if first is not None:
            if first[6] == "reject":
                raise ClusterError(f"line {first[0]} of the primary's pg_hba.conf rejects "
                                   f"replication connections of {role} from 127.0.0.1")
            return
        hba_row = conn.execute("SHOW hba_file").fetchone()
        hba = Path(hba_row[0]) if hba_row else cluster.pgdata / "pg_hba.conf"
        with hba.open("a") as file:
            file.write("\n# twin standbys (twin/core/standby.py): streaming replication "
                       "from loopback\n"
                       f"host    replication     {role}    127.0.0.1/32    scram-sha-256\n")
        conn.execute("SELECT pg_reload_conf()")
        log.info("the primary's pg_hba.conf admits replication of %s from 127.0.0.1", role)
    _wait_for_replication_access(cluster)


def _wait_for_replication_access(cluster: ManagedCluster, timeout_s: float = 10.0) -> None:
    """pg_reload_conf() only signals the postmaster: wait until a replication connection
    is admitted."""
    url = _libpq(cluster.url("postgres"))
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            psycopg.connect(url, replication="true").close()
            return
        except psycopg.OperationalError as error:
            if time.monotonic() > deadline:
                raise ClusterError(f"the primary refuses replication connections: {error}"
                                   ) from None
            time.sleep(0.1)


# True once the server has the WAL up to %(lsn)s: replayed on a standby, written on a primary.
REACHED = ("SELECT CASE WHEN pg_is_in_recovery() "
           "THEN pg_last_wal_replay_lsn() >= %(lsn)s::pg_lsn "
           "ELSE pg_current_wal_lsn() >= %(lsn)s::pg_lsn END")
FIRST_PAUSE_S, LAST_PAUSE_S = 0.002, 0.05


def wait_for_lsn(conn: psycopg.Connection, lsn: str, timeout_s: float) -> bool:
    """Wait until the server of ``conn`` has replayed the WAL up to ``lsn`` (a primary's
    ``pg_current_wal_lsn()`` after a commit); True when it has, False after ``timeout_s``
    (never raises for a timeout). On a server not in recovery (the primary) it compares
    with the server's own WAL position.

    A connection not in autocommit is left as it was found: when it was idle, the
    transaction the polls opened is ended, so the caller's next read takes a snapshot from
    after the replay."""
    was_idle = (not conn.autocommit
                and conn.info.transaction_status == TransactionStatus.IDLE)
    deadline = time.monotonic() + max(timeout_s, 0.0)
    pause = FIRST_PAUSE_S
    try:
        while True:
            row = conn.execute(REACHED, {"lsn": lsn}).fetchone()
            if row and row[0]:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(pause, left))
            pause = min(pause * 2, LAST_PAUSE_S)
    finally:
        if was_idle and conn.info.transaction_status == TransactionStatus.INTRANS:
            conn.rollback()


class ManagedStandby:
    """Hot standby ``k`` (1, 2, ...) of the managed primary of ``settings``."""

    def __init__(self, settings: Settings, k: int, config: StandbySettings | None = None):
        if k < 1:
            raise ValueError(f"standbys are numbered from 1, not {k}")
        self.settings = settings
        self.config = config or settings.standby
        self.k = k
        self.primary = ManagedCluster(settings)
        self.folder = settings.home / "standbys" / str(k)
        self.pgdata = self.folder / "pgdata"
        self.log_file = self.folder / "postgres.log"
        self.port = settings.db.port + self.config.port_offset + k
        self.slot = f"twin_standby_{k}"
        self.bin = settings.db.pg_bin

    # -- public -------------------------------------------------------------------------
    def up(self) -> None:
        """Make the standby if it has no data folder yet, start it if stopped, and wait until
        it answers queries in recovery. Does nothing to a running standby."""
        if not (self.bin / "pg_basebackup").exists():
            raise ClusterError(f"PostgreSQL binaries not found in {self.bin}: install "
                               "postgresql-15 (make run does this)")
        if self._running():
            return
        if not self._initialised():
            if not self.primary.status().running:
                raise ClusterError("the managed primary is not running: run `twin db up` "
                                   "first")
            prepare_primary(self.primary)
            self._base_backup()
        # An existing standby starts without its primary too: it serves what it has
        # replayed and streams again once the primary is back.
        timeout = str(int(self.config.start_timeout_s))
        started = time.monotonic()
        self._run(self._pg_ctl("start", "-w", "-t", timeout, "-l", str(self.log_file),
                               "-o", f"-p {self.port}"))
        self._wait_in_recovery(self.config.start_timeout_s - (time.monotonic() - started))
        log.info("standby %d started on 127.0.0.1:%d", self.k, self.port)

    def down(self) -> None:
        """Stop the standby (fast: its open queries are cancelled). Its slot stays, so the
        primary keeps the WAL it will need to catch up."""
        self._stop("fast")

    def destroy(self) -> None:
        """Stop the standby, remove its folder and drop its replication slot on the primary."""
        # Immediate: its data is thrown away, so no shutdown restartpoint writes it first.
        self._stop("immediate")
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self._drop_slot(self.config.slot_release_timeout_s)
        log.info("standby %d destroyed", self.k)

    def status(self) -> StandbyStatus:
        initialised, running = self._initialised(), self._running()
        if not running:
            return StandbyStatus(initialised, False, self.port, self.pgdata)
        try:
            with psycopg.connect(self._libpq("postgres"), autocommit=True,
                                 connect_timeout=3) as conn:
                row = conn.execute(
                    "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text, "
                    "extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8"
                ).fetchone()
        except psycopg.Error:
            return StandbyStatus(initialised, True, self.port, self.pgdata)
        assert row is not None
        in_recovery, replay_lsn, since_replay = row
        lag_bytes = self._lag_bytes(replay_lsn)
        lag_s = since_replay if lag_bytes and since_replay is not None else None
        return StandbyStatus(initialised, True, self.port, self.pgdata, in_recovery,
                             replay_lsn, lag_bytes, lag_s)

    def url(self, database: str | None = None) -> str:
        """SQLAlchemy URL (psycopg 3) of ``database`` (default: twin's) on this standby, with
        the primary's role and password."""
        return make_url(self.primary.url(database)).set(port=self.port).render_as_string(
            hide_password=False)

    def _stop(self, mode: str) -> None:
        if self._running():
            self._run(self._pg_ctl("stop", "-w", "-t", "60", "-m", mode))
            log.info("standby %d stopped (%s)", self.k, mode)

    # -- making it ------------------------------------------------------------------------
    def _base_backup(self) -> None:
        # A slot left by an earlier attempt that failed before its data folder was complete
        # would hold WAL for nothing, and -C fails on it.
        self._drop_slot(self.config.slot_release_timeout_s)
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        if self._as_root():
            hand_over(self.folder, [self.folder], system_user(self.settings.db.os_user),
                      "the database user")
        # -R writes the connection, password included, into primary_conninfo in the copy's
        # postgresql.auto.conf: the folder is the OS user's alone (0700), as the primary's.
        password = self.primary.password_file.read_text().strip()
        started = time.monotonic()
        log.info("standby %d: copying the primary (pg_basebackup)", self.k)
        try:
            self._run([str(self.bin / "pg_basebackup"), "-h", "127.0.0.1",
                       "-p", str(self.primary.port), "-U", self.settings.db.user,
                       "-D", str(self.pgdata), "-X", "stream", "-R", "-C", "-S", self.slot,
                       "-c", "fast", "-w"],
                      env={"PGPASSWORD": password})
        except ClusterError:
            shutil.rmtree(self.folder, ignore_errors=True)
            self._drop_slot(self.config.slot_release_timeout_s)
            raise
        # The primary's log came along; the standby logs next to its data folder instead.
        (self.pgdata / "postgres.log").unlink(missing_ok=True)
        feedback = "on" if self.config.hot_standby_feedback else "off"
        with (self.pgdata / "postgresql.auto.conf").open("a") as conf:
            conf.write(f"# twin standby {self.k} (twin/core/standby.py)\n"
                       f"port = {self.port}\n"
                       "hot_standby = on\n"
                       f"hot_standby_feedback = {feedback}\n")
        log.info("standby %d: copied in %.1f s", self.k, time.monotonic() - started)

    def _wait_in_recovery(self, timeout_s: float) -> None:
        deadline = time.monotonic() + max(timeout_s, 1.0)
        last: object = None
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(self._libpq("postgres"), autocommit=True,
                                     connect_timeout=3) as conn:
                    row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                if row and row[0]:
                    return
                raise ClusterError(f"standby {self.k} on port {self.port} is not in recovery "
                                   f"(promoted?): see {self.log_file}")
            except psycopg.OperationalError as error:  # still starting
                last = error
                time.sleep(0.2)
        raise ClusterError(f"standby {self.k} does not answer on port {self.port}: {last} "
                           f"(see {self.log_file})")

    # -- the primary's side -------------------------------------------------------------
    def _drop_slot(self, timeout_s: float) -> None:
        """Drop this standby's slot on the primary, waiting for its WAL sender to let go."""
        try:
            conn = psycopg.connect(_libpq(self.primary.url("postgres")), autocommit=True,
                                   connect_timeout=5)
        except psycopg.OperationalError as error:
            raise ClusterError(f"cannot reach the primary to drop slot {self.slot}: {error}"
                               ) from None
        deadline = time.monotonic() + timeout_s
        with conn:
            while True:
                row = conn.execute("SELECT active FROM pg_replication_slots "
                                   "WHERE slot_name = %s", (self.slot,)).fetchone()
                if row is None:
                    return
                if not row[0]:
                    try:
                        conn.execute("SELECT pg_drop_replication_slot(%s)", (self.slot,))
                        log.info("dropped replication slot %s", self.slot)
                        return
                    except psycopg.errors.ObjectInUse:  # taken again meanwhile
                        pass
                if time.monotonic() > deadline:
                    raise ClusterError(f"replication slot {self.slot} is still in use on the "
                                       "primary: is another standby using it?")
                time.sleep(0.1)

    def _lag_bytes(self, replay_lsn: str | None) -> int | None:
        if replay_lsn is None:
            return None
        try:
            with psycopg.connect(_libpq(self.primary.url("postgres")), autocommit=True,
                                 connect_timeout=3) as conn:
                row = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn)"
                                   "::bigint", (replay_lsn,)).fetchone()
        except psycopg.Error:
            return None
        return max(int(row[0]), 0) if row else None

    # -- running as the unprivileged user ------------------------------------------------
    def _libpq(self, database: str) -> str:
        return _libpq(self.url(database))

    def _initialised(self) -> bool:
        return (self.pgdata / "PG_VERSION").exists()

    def _running(self) -> bool:
        if not self._initialised():
            return False
        return self._run(self._pg_ctl("status"), check=False).returncode == 0

    def _as_root(self) -> bool:
        return os.geteuid() == 0

    def _pg_ctl(self, *args: str) -> list[str]:
        return [str(self.bin / "pg_ctl"), "-D", str(self.pgdata), *args]

    def _run(self, cmd: list[str], check: bool = True,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        if self._as_root():
            cmd = ["runuser", "-u", self.settings.db.os_user, "--", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd="/",
                                env={**os.environ, **(env or {})})
        if check and result.returncode != 0:
            shown = " ".join(cmd)
            raise ClusterError(f"{shown} failed: {result.stderr.strip() or result.stdout}")
        return result

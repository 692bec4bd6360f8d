"""twin's managed PostGIS: a PostgreSQL cluster in a data folder that twin owns.

PostgreSQL refuses to run as root, so when twin runs as root the cluster runs as an
unprivileged system user (``TWIN_DB_OS_USER``, created on first use). The cluster listens
on 127.0.0.1 only, on a port that is not 5432, and has no Unix socket (its path could
exceed the 107-byte limit inside a deep checkout).
"""

from __future__ import annotations

import logging
import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import psycopg

from twin.core.errors import ClusterError
from twin.core.settings import Settings

log = logging.getLogger("twin.core.cluster")

# Tuned for a 2-core, 24 GiB machine serving tiles: JIT only adds latency to short queries.
SERVER_CONFIG = """
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
max_connections = 200
shared_buffers = 1GB
effective_cache_size = 8GB
work_mem = 32MB
maintenance_work_mem = 1GB
max_wal_size = 8GB
random_page_cost = 1.1
jit = off
logging_collector = off
"""


def running_pid(pid_file: Path, marker: str) -> int | None:
    """The pid ``pid_file`` names when that process runs and its command line holds
    ``marker`` (its configuration file's path: a stale pid file may name a pid that some
    other process has now). nginx rewrites its title, mosquitto keeps its arguments: the
    marker is looked for in the raw command line either way."""
    try:
        pid = int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if marker.encode() not in cmdline:
        return None
    return pid if process_alive(pid) else None


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, a child not reaped yet, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port`` (half a second to say)."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def log_tail(path: Path, start: int, lines: int = 5) -> str:
    """The last ``lines`` lines a service wrote to its log ``path`` after byte ``start``,
    on one line: what an error message quotes when the service would not start."""
    try:
        with path.open("rb") as f:
            f.seek(start)
            written = f.read().decode(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return f"no log at {path}"
    return " | ".join(written[-lines:]) or f"nothing in {path}"


def system_user(name: str) -> pwd.struct_passwd:
    """The OS user ``name``, created (a system user without a home or a shell) if missing."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", name], check=True)
        return pwd.getpwnam(name)


def hand_over(folder: Path, paths: Iterable[Path], user: pwd.struct_passwd, who: str) -> None:
    """Give ``paths`` to ``user``, make ``folder`` (one of them) theirs alone, and let them
    reach it: a service that drops root privileges (PostgreSQL, mosquitto) works in a folder
    twin made as root. ``who`` names the user in the log ("the database user")."""
    for path in paths:
        shutil.chown(path, user.pw_uid, user.pw_gid)
    folder.chmod(0o700)
    # The user must traverse every parent folder; add search (x) permission only,
    # never read, where a parent lacks it (e.g. a checkout under /root).
    for parent in folder.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            log.warning("adding o+x to %s so %s can reach its data", parent, who)
            parent.chmod(mode | stat.S_IXOTH)


@dataclass(frozen=True)
class ClusterStatus:
    initialised: bool
    running: bool
    port: int
    pgdata: Path

    def describe(self) -> str:
        if not self.initialised:
            return f"not initialised ({self.pgdata})"
        state = "running" if self.running else "stopped"
        return f"{state} on 127.0.0.1:{self.port} ({self.pgdata})"


class ManagedCluster:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.pgdata = settings.pgdata
        self.port = settings.db.port
        self.bin = settings.db.pg_bin
        self.password_file = settings.home / "db_password"
        self.log_file = self.pgdata / "postgres.log"

    # -- public -------------------------------------------------------------------------
    def up(self) -> None:
        """Initialise if needed, start if stopped, and make sure the database exists."""
        self._check_binaries()
        if not self._initialised():
            self._initdb()
        if not self.status().running:
            self._run(self._pg_ctl("start", "-w", "-t", "60", "-l", str(self.log_file),
                                   "-o", f"-p {self.port}"))
            log.info("managed PostGIS started on 127.0.0.1:%d", self.port)
        self._ensure_database()

    def down(self) -> None:
        if self.status().running:
            self._run(self._pg_ctl("stop", "-w", "-t", "60", "-m", "fast"))
            log.info("managed PostGIS stopped")

    def status(self) -> ClusterStatus:
        running = False
        if self._initialised():
            result = self._run(self._pg_ctl("status"), check=False)
            running = result.returncode == 0
        return ClusterStatus(self._initialised(), running, self.port, self.pgdata)

    def url(self, database: str | None = None) -> str:
        """The database's URL; the password is the one ``twin db up`` wrote when it
        initialised the cluster, so an uninitialised home has no URL yet."""
        try:
            password = self.password_file.read_text().strip()
        except FileNotFoundError:
            raise ClusterError(
                f"no managed cluster in {self.settings.home} (no {self.password_file.name}): "
                "run `twin db up` with this TWIN_HOME first, or set TWIN_DATABASE_URL"
            ) from None
        name = database or self.settings.db.name
        return (f"postgresql+psycopg://{self.settings.db.user}:{password}"
                f"@127.0.0.1:{self.port}/{name}")

    # -- set-up -------------------------------------------------------------------------
    def _initialised(self) -> bool:
        return (self.pgdata / "PG_VERSION").exists()

    def _check_binaries(self) -> None:
        if not (self.bin / "initdb").exists():
            raise ClusterError(
                f"PostgreSQL binaries not found in {self.bin}: install postgresql-15, "
                "postgresql-15-postgis-3 and postgresql-15-pgrouting (make run does this)"
            )

    def _initdb(self) -> None:
        self.settings.home.mkdir(parents=True, exist_ok=True)
        self.pgdata.mkdir(parents=True, exist_ok=True)
        password = secrets.token_urlsafe(24)
        pwfile = self.pgdata.parent / ".initdb_pw"
        pwfile.write_text(password + "\n")
        self._hand_over(self.pgdata, pwfile)
        try:
            self._run([str(self.bin / "initdb"), "-D", str(self.pgdata), "-U",
                       self.settings.db.user, "--pwfile", str(pwfile), "-E", "UTF8",
                       "--locale", "C.UTF-8", "--auth", "scram-sha-256"])
        finally:
            pwfile.unlink(missing_ok=True)
        with (self.pgdata / "postgresql.conf").open("a") as conf:
            conf.write(SERVER_CONFIG)
        self.password_file.write_text(password + "\n")
        self.password_file.chmod(0o600)
        log.info("initialised managed PostGIS cluster in %s", self.pgdata)

    def _ensure_database(self) -> None:
        url = self.url("postgres").replace("postgresql+psycopg", "postgresql")
        with psycopg.connect(url, autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                  (self.settings.db.name,)).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{self.settings.db.name}"')

    # -- running as the unprivileged user ------------------------------------------------
    def _as_root(self) -> bool:
        return os.geteuid() == 0

    def _hand_over(self, *paths: Path) -> None:
        """Give the data folder to the cluster's OS user and let it reach that folder."""
        if self._as_root():
            hand_over(self.pgdata, paths, system_user(self.settings.db.os_user),
                      "the database user")

    def _pg_ctl(self, *args: str) -> list[str]:
        return [str(self.bin / "pg_ctl"), "-D", str(self.pgdata), *args]

    def _run(self, cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
        if self._as_root():
            cmd = ["runuser", "-u", self.settings.db.os_user, "--", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd="/")
        if check and result.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed: {result.stderr.strip() or result.stdout}")
        return result


"""twin's managed proxy: Debian's nginx in front of several twin nodes, as load balancer and
shared HTTP cache (issue 15), with its configuration, cache, temporary files, logs and pid
file in a folder that twin owns (``TWIN_HOME/nginx``), like the PostGIS cluster (cluster.py)
and the MQTT broker (broker.py).

nginx is started with ``-p <folder> -c <folder>/nginx.conf -e <error log>`` and every path
its configuration names lies in that folder, so it never reads ``/etc/nginx`` nor writes
``/var/log/nginx``, ``/var/lib/nginx`` or ``/run/nginx.pid``.

What it does with a request (see ``render_config``):

- Only tiles are cached (vector, raster, terrain, quantized-mesh, 3D Tiles subtrees and
  contents), and only those the node marks cacheable: with the current data versions in
  their URL (``v=``) a node sends them ``public, max-age=31536000, immutable``
  (tiles/validators.py); nginx never stores ``no-cache``, ``private``, ``no-store`` or an
  answer that sets a cookie. Every other path passes through uncached.
- Every tile request, a cache hit too, is first put to a node (``auth_request`` to
  ``/_twin/auth``, twin/api/proxy_auth.py), which authenticates the caller, charges its rate
  limit, checks its role and answers a hash of its jurisdiction. That hash, never the
  credentials, is in the cache key: a tile cached for one jurisdiction is served only to
  callers of the same jurisdiction, a revoked key stops at once, and no key is written to
  disk. A caller the node refuses (401, 403, 429) passes through uncached, and the node
  answers it in twin's own error shape.
- A GET that fails on one node (refused, reset, timed out, 502/503/504) is passed to the next
  node; a POST, PATCH or LOCK already sent never is (nginx's rule, kept).
- The push stream (``/events/stream``) passes through unbuffered and uncached.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import pwd
import re
import secrets
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
from twin.core.settings import ProxySettings

log = logging.getLogger("twin.core.proxy")


class ProxyError(TwinError):
    """The managed proxy could not be set up, started, reloaded or stopped."""


# nginx answers this path itself (never a node): `up` and `reload` wait on it, and its
# X-Twin-Proxy-Config header names the configuration the answering worker runs.
ALIVE_PATH = "/_proxy/alive"

CONFIG = """\
# Written by twin (twin/core/proxy.py) on every `up` and `reload`: edits are overwritten.
{user_line}worker_processes {workers};
pid {folder}/nginx.pid;
error_log {folder}/logs/error.log warn;
# A graceful stop or reload waits this long for open requests (push streams stay open for
# hours: their clients reconnect with Last-Event-ID), then closes them.
worker_shutdown_timeout 5s;

events {{
    worker_connections 4096;
}}

http {{
    log_format twin '$remote_addr [$time_iso8601] "$request" $status $body_bytes_sent '
                    '$request_time upstream="$upstream_addr" status="$upstream_status" '
                    'time="$upstream_response_time" cache=$upstream_cache_status';
    access_log {folder}/logs/access.log twin;
    # Every temporary file in the folder too (the built-in defaults are under /var/lib/nginx).
    client_body_temp_path {folder}/temp/body;
    proxy_temp_path {folder}/temp/proxy;
    fastcgi_temp_path {folder}/temp/fastcgi;
    uwsgi_temp_path {folder}/temp/uwsgi;
    scgi_temp_path {folder}/temp/scgi;
    server_tokens off;
    tcp_nodelay on;
    keepalive_timeout 65s;
    # twin compresses its own answers (and says Vary: Accept-Encoding): nginx passes the
    # client's Accept-Encoding on and the answer back untouched, and caches each variant.
    gzip off;

    proxy_cache_path {folder}/cache levels=1:2 keys_zone=twin:32m max_size={cache_mb}m
                     inactive=1d use_temp_path=off;

    # The jurisdiction the node's answer to /_twin/auth named; none: refused, pass through.
    map $twin_scope $twin_uncached {{
        "" 1;
        default 0;
    }}
    # Told to the node with a tile request whose rate limit /_twin/auth charged already.
    map $twin_scope $twin_charged {{
        "" "";
        default "1";
    }}

    upstream twin {{
        # Shared by the workers: a node one of them found dead is left out by all.
        zone twin_nodes 1m;
{servers}        # Idle connections kept open to the nodes, per worker. nginx closes them after
        # 60 s idle (its default), before `twin serve` does (75 s), so it never sends a
        # request on a connection the node is closing.
        keepalive 32;
    }}

    server {{
        listen {host}:{port};
        client_max_body_size {max_body_mb}m;

        proxy_http_version 1.1;
        # Not "close": the connections to the nodes are kept alive.
        proxy_set_header Connection "";
        # The Host the client asked for, port included: twin builds its links from it.
        proxy_set_header Host $http_host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        # What only this nginx can say (a client's own headers of these names are replaced,
        # or dropped when empty): the request came through it (the node then takes the
        # client's address from X-Real-IP), and its rate limit was charged.
        proxy_set_header X-Real-IP $remote_addr;
        proxy_set_header X-Twin-Proxy "{secret}";
        proxy_set_header X-Twin-Charged $twin_charged;
        proxy_connect_timeout {connect_timeout};
        # GET and HEAD go to the next node on these; a request of a non-idempotent method
        # (POST, PATCH, LOCK) that reached a node never does (nginx's default, kept).
        proxy_next_upstream error timeout http_502 http_503 http_504;

        # The shared cache (in the tile location below): only what the node marks
        # cacheable (nginx honours Cache-Control and Expires, and stores nothing private,
        # no-store, no-cache or with Set-Cookie: there is no proxy_cache_valid).
        proxy_cache_methods GET HEAD;
        # One request per key fills the cache. Others missing the same key meanwhile go to
        # a node (uncached) instead of waiting for it: a waiter polls the lock every 500 ms,
        # and nginx has no "hit-for-pass", so for an answer the node does not let it cache
        # (most of twin's) waiting queues identical concurrent requests one behind another.
        # Measured here, 6 at once for a 50 ms answer: no-store, up to 2.6 s with waiting
        # (0.06 s without); cacheable, the 5 waiters got their HIT after 0.5 s (0.1 s).
        proxy_cache_lock on;
        proxy_cache_lock_timeout 0s;
        # An expired entry with an ETag is revalidated (If-None-Match), not fetched whole.
        proxy_cache_revalidate on;
        add_header X-Cache-Status $upstream_cache_status always;

        location / {{
            proxy_pass http://twin;
        }}

        # Tiles: asked of a node first (/_twin/auth: authentication, rate limit, role), then
        # from the cache by the caller's jurisdiction (never by its key; $request_uri holds
        # the layers, the tile, the data versions and any filter), else from a node.
        location ~ "{tile_paths}" {{
            auth_request /_twin/auth;
            auth_request_set $twin_scope $upstream_http_x_twin_scope;
            proxy_cache twin;
            proxy_cache_key "$request_method|$host|$request_uri|$twin_scope";
            proxy_cache_bypass $twin_uncached;
            proxy_no_cache $twin_uncached;
            proxy_pass http://twin;
        }}

        location = /_twin/auth {{
            internal;
            access_log off;
            proxy_pass http://twin;
            proxy_pass_request_body off;
            # proxy_set_header here replaces the server's list: all of it again.
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Twin-Proxy "{secret}";
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-URI $request_uri;
            proxy_set_header X-Original-Method $request_method;
            # Refused or not, the node answers 204 (a refusal names no scope): auth_request
            # turns any other status but 401/403 into a 500.
            proxy_next_upstream error timeout http_502 http_503 http_504;
        }}

        # Server-Sent Events: each message reaches the client as the node writes it.
        location = /events/stream {{
            proxy_pass http://twin;
            proxy_buffering off;
            proxy_cache off;
            proxy_read_timeout 1h;
        }}

        # Uploads stream to the node as they arrive (twin spools them itself), not first into
        # a temporary file here.
        location /layers {{
            proxy_pass http://twin;
            proxy_request_buffering off;
        }}

        location = {alive_path} {{
            access_log off;
            add_header X-Twin-Proxy-Config {digest};
            return 204;
        }}
    }}
}}
"""

# The paths of tiles (cached by jurisdiction), and nothing else: documents naming tiles
# (TileJSON, tileset.json, layer.json) are never kept.
TILE_PATHS = (r"^/(tiles/[^/]+/\d+/\d+/\d+\."
              r"|collections/[^/]+/(tiles/[^/]+/\d+/\d+/\d+$|quantized-mesh/\d+/\d+/\d+\.terrain$"
              r"|3dtiles/(subtrees|content|blocks|models)/))")

_DIGEST_SLOT = "@DIGEST@"
_UPSTREAM = re.compile(r"^\s*server (\S+) max_fails=", re.MULTILINE)
_LISTEN = re.compile(r"^\s*listen \S+:(\d+);", re.MULTILINE)
_DIGEST = re.compile(r"X-Twin-Proxy-Config (\w+);")


def render_config(folder: Path, listen_port: int, upstreams: list[str], cache_mb: int = 512,
                  user: str | None = None, host: str = "127.0.0.1",
                  settings: ProxySettings | None = None, secret: str = "") -> str:
    """nginx.conf for a proxy whose files live in ``folder``, listening on
    ``host:listen_port`` in front of ``upstreams`` ("127.0.0.1:8001", ...); ``user``: the OS
    user of its worker processes (only when the master runs as root); ``secret``: what it
    tells the nodes to prove a request came through it (none: the nodes trust nothing)."""
    if not re.fullmatch(r"[\w-]*", secret):
        raise ProxyError("the proxy secret (TWIN_PROXY_SECRET) may hold only letters, digits, "
                         "'_' and '-'")
    settings = settings or ProxySettings()
    if not upstreams:
        raise ProxyError("the proxy needs at least one node to send requests to")
    for upstream in upstreams:
        if not re.fullmatch(r"[\w.\-\[\]:]+:\d+", upstream):
            raise ProxyError(f"not a node address (host:port): {upstream!r}")
    fail_timeout = f"{settings.fail_timeout_s:g}s"
    servers = "".join(f"        server {upstream} max_fails=1 fail_timeout={fail_timeout};\n"
                      for upstream in upstreams)
    text = CONFIG.format(
        user_line=f"user {user};\n" if user else "", folder=folder, host=host,
        port=listen_port, servers=servers, cache_mb=cache_mb,
        workers=settings.workers or "auto", max_body_mb=settings.max_body_mb,
        connect_timeout=f"{int(settings.connect_timeout_s * 1000)}ms",
        alive_path=ALIVE_PATH, digest=_DIGEST_SLOT, tile_paths=TILE_PATHS, secret=secret)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return text.replace(_DIGEST_SLOT, digest)


@dataclass(frozen=True)
class ProxyStatus:
    configured: bool
    running: bool
    pid: int | None
    port: int
    upstreams: list[str]
    folder: Path

    def describe(self) -> str:
        if not self.configured:
            return f"not set up ({self.folder})"
        if not self.running:
            return f"stopped ({self.folder})"
        return (f"running on port {self.port}, pid {self.pid}, in front of "
                f"{', '.join(self.upstreams)} ({self.folder})")


class ManagedProxy:
    """nginx in ``home/nginx``, listening on ``listen_port`` in front of ``upstreams``."""

    def __init__(self, home: Path, listen_port: int, upstreams: list[str], cache_mb: int = 512,
                 host: str = "127.0.0.1", settings: ProxySettings | None = None):
        self.settings = settings or ProxySettings()
        self.port = listen_port
        self.host = host
        self.upstreams = list(upstreams)
        self.cache_mb = cache_mb
        self.binary = self.settings.nginx_bin
        self.folder = home / "nginx"
        self.config_file = self.folder / "nginx.conf"
        self.pid_file = self.folder / "nginx.pid"
        self.error_log = self.folder / "logs" / "error.log"
        self.access_log = self.folder / "logs" / "access.log"

    # -- public -------------------------------------------------------------------------
    def up(self, timeout_s: float = 15.0) -> ProxyStatus:
        """Write the configuration and start nginx unless it runs; a running one is reloaded
        when its configuration differs (idempotent). Returns once nginx answers."""
        if not self.binary.exists():
            raise ProxyError(f"nginx not found at {self.binary}: install Debian's nginx-light "
                             "package (the Makefile does this)")
        if self.status().running:
            if self._render() != self._written():
                self.reload(self.upstreams, timeout_s)
            return self.status()
        self._write_config()
        self.pid_file.unlink(missing_ok=True)
        if port_open(self.port, self.host):
            raise ProxyError(f"{self.host}:{self.port} is taken by another program: choose "
                             "another port for the proxy (TWIN_PORT)")
        log_start = _size(self.error_log)
        done = subprocess.run([*self._command(), "-g", "daemon on;"], capture_output=True,
                              text=True, cwd="/")
        if done.returncode != 0:
            said = (done.stderr or done.stdout).strip() or self._log_tail(log_start)
            raise ProxyError(f"nginx did not start (exit {done.returncode}): {said}")
        self._wait_for(self._render_digest(), timeout_s, log_start)
        log.info("managed proxy started on %s:%d in front of %s", self.host, self.port,
                 ", ".join(self.upstreams))
        return self.status()

    def reload(self, upstreams: list[str], timeout_s: float = 15.0) -> ProxyStatus:
        """Send requests to ``upstreams`` from now on: rewrite the configuration and reload
        the running nginx (open requests finish on the old workers). Returns once nginx
        answers with the new configuration."""
        self.upstreams = list(upstreams)
        pid = self._pid()
        if pid is None:
            raise ProxyError(f"the proxy is not running ({self.folder}): nothing to reload")
        # Checked before it replaces the running one's (a node name that does not resolve,
        # say): a refused configuration leaves nginx and its file as they were.
        candidate = self.config_file.with_name("nginx.conf.new")
        candidate.write_text(self._render())
        command = [*self._command(), "-t", "-q"]
        command[command.index(str(self.config_file))] = str(candidate)
        checked = subprocess.run(command, capture_output=True, text=True, cwd="/")
        if checked.returncode != 0:
            candidate.unlink()
            self.upstreams = _UPSTREAM.findall(self._written()) or self.upstreams
            raise ProxyError(f"nginx refused the new configuration: "
                             f"{(checked.stderr or checked.stdout).strip()}")
        candidate.replace(self.config_file)
        log_start = _size(self.error_log)
        old_workers = [child for child in _children(pid)
                       if _title(child) == "nginx: worker process"]
        os.kill(pid, signal.SIGHUP)
        self._wait_for(self._render_digest(), timeout_s, log_start, old_workers)
        log.info("managed proxy now in front of %s", ", ".join(self.upstreams))
        return self.status()

    def down(self, timeout_s: float = 15.0) -> None:
        """Stop nginx if it runs: SIGQUIT (graceful: open requests finish, push streams are
        closed after worker_shutdown_timeout), then SIGTERM, then SIGKILL past ``timeout_s``."""
        pid = self._pid()
        if pid is None:
            return
        workers = _children(pid)
        try:
            os.kill(pid, signal.SIGQUIT)
        except ProcessLookupError:
            self.pid_file.unlink(missing_ok=True)
            return
        deadline = time.monotonic() + timeout_s
        escalation = [signal.SIGTERM, signal.SIGKILL]
        while any(process_alive(p) for p in (pid, *workers)):
            if time.monotonic() > deadline and escalation:
                sig = escalation.pop(0)
                log.warning("nginx (pid %d) still running %g s after SIGQUIT: sending %s",
                            pid, timeout_s, sig.name)
                for p in (pid, *workers):
                    try:
                        os.kill(p, sig)
                    except ProcessLookupError:
                        pass
                deadline = time.monotonic() + 5
            elif time.monotonic() > deadline:
                raise ProxyError(f"nginx (pid {pid}) did not stop")
            time.sleep(0.02)
        self.pid_file.unlink(missing_ok=True)
        log.info("managed proxy stopped")

    def status(self) -> ProxyStatus:
        """What runs: the port and nodes of the configuration written last (which a running
        nginx serves), else this object's."""
        pid = self._pid()
        port, upstreams = self.port, self.upstreams
        written = self._written()
        if written:
            listen = _LISTEN.search(written)
            port = int(listen.group(1)) if listen else port
            upstreams = _UPSTREAM.findall(written) or upstreams
        return ProxyStatus(bool(written), pid is not None, pid, port, upstreams, self.folder)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- internals ----------------------------------------------------------------------
    def _command(self) -> list[str]:
        return [str(self.binary), "-p", f"{self.folder}/", "-c", str(self.config_file),
                "-e", str(self.error_log)]

    def secret(self) -> str:
        """What this nginx tells its nodes (TWIN_PROXY_SECRET when set, else made once per
        home and kept in ``secret``, readable by its owner only); the nodes are given it."""
        if self.settings.secret is not None:
            return self.settings.secret.get_secret_value()
        secret_file = self.folder / "secret"
        try:
            return secret_file.read_text().strip()
        except FileNotFoundError:
            pass
        self.folder.mkdir(parents=True, exist_ok=True)
        made = secrets.token_hex(24)
        descriptor = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(made)
        return made

    def _render(self) -> str:
        user = self._os_user()
        return render_config(self.folder, self.port, self.upstreams, self.cache_mb,
                             user.pw_name if user else None, self.host, self.settings,
                             self.secret())

    def _render_digest(self) -> str:
        found = _DIGEST.search(self._render())
        assert found is not None
        return found.group(1)

    def _written(self) -> str:
        try:
            return self.config_file.read_text()
        except FileNotFoundError:
            return ""

    def _write_config(self) -> None:
        folders = [self.folder / name for name in
                   ("logs", "cache", "temp", "temp/body", "temp/proxy", "temp/fastcgi",
                    "temp/uwsgi", "temp/scgi")]
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(self._render())
        user = self._os_user()
        if user is None:
            self.folder.chmod(0o700)  # cached answers of keyed callers are in it
            return
        # The master (root) reads the configuration and opens the logs and the pid file;
        # the workers, as the user, write the cache and the temporary files. The folder is
        # the user's alone: cached answers of keyed callers are in it.
        hand_over(self.folder, (self.folder, *folders), user, "the proxy's user")

    def _os_user(self) -> pwd.struct_passwd | None:
        """The user of the worker processes when twin runs as root; None otherwise (nginx
        then runs wholly as the calling user, which owns the folder)."""
        if os.geteuid() != 0:
            return None
        return system_user(self.settings.os_user)

    def _pid(self) -> int | None:
        """The master's pid when the pid file names a live nginx of this configuration."""
        return running_pid(self.pid_file, str(self.config_file))

    def _wait_for(self, digest: str, timeout_s: float, log_start: int,
                  old_workers: list[int] | None = None) -> None:
        """Until nginx answers ALIVE_PATH with configuration ``digest`` and every one of
        ``old_workers`` (a reload's) has gone or is shutting down: such a worker has closed
        its listening sockets and idle connections, so no new request reaches it."""
        deadline = time.monotonic() + timeout_s
        while True:
            retired = all(not process_alive(worker) or "shutting down" in _title(worker)
                          for worker in old_workers or ())
            if retired and _alive_digest(self.host, self.port) == digest:
                return
            if time.monotonic() > deadline:
                raise ProxyError(f"nginx did not answer on {self.host}:{self.port} with its "
                                 f"new configuration within {timeout_s:g} s: "
                                 f"{self._log_tail(log_start)}")
            time.sleep(0.02)

    def _log_tail(self, start: int) -> str:
        return log_tail(self.error_log, start)


def _alive_digest(host: str, port: int) -> str | None:
    """The configuration digest nginx on ``host:port`` answers with; None when it does not."""
    conn = http.client.HTTPConnection(host, port, timeout=1)
    try:
        conn.request("GET", ALIVE_PATH)
        response = conn.getresponse()
        response.read()
        return response.getheader("X-Twin-Proxy-Config")
    except OSError:
        return None
    finally:
        conn.close()


def _title(pid: int) -> str:
    """A process's title ("nginx: worker process", "... is shutting down"); '' when gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode().strip()
    except OSError:
        return ""


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (nginx's workers, cache manager and loader)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0

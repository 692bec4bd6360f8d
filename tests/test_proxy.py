"""The managed proxy (issue 15): Debian's nginx started by twin/core/proxy.py in front of
real twin nodes (``LiveServer``s on the test database) and of a tiny upstream of the tests'
own, whose answers say exactly what may be cached.

Oracles: nginx's own access log (which node answered each request), the upstream's own
request counter (whether nginx asked it or answered from its cache), the Authorization each
answer echoes (whose answer a caller got), the outbox message a test wrote, and /proc (which
processes run).
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from tests.servers import ADMIN, LiveServer, free_port
from tests.sse import EventStream
from twin.core.outbox import emit
from twin.core.proxy import ManagedProxy, ProxyError, render_config
from twin.core.settings import ProxySettings, Settings, StreamSettings
from twin.migrate import upgrade

NGINX = ProxySettings().nginx_bin
pytestmark = pytest.mark.skipif(not NGINX.exists(),
                                reason=f"{NGINX} missing: `make` installs nginx-light")


# --- twin nodes and the proxy --------------------------------------------------------------

@pytest.fixture(scope="module")
def migrated(database_url: str) -> str:
    """The test database with twin's schema (the sample city is not needed here)."""
    engine = create_engine(database_url)
    upgrade(engine)
    engine.dispose()
    return database_url


def node_settings(database_url: str) -> Settings:
    # Keep-alive comments every 0.2 s wake the SSE reader up to check its deadline.
    return Settings(database_url=database_url, stream=StreamSettings(keepalive_s=0.2))


@pytest.fixture(scope="module")
def nodes(migrated: str) -> Iterator[list[LiveServer]]:
    with LiveServer(node_settings(migrated)) as one, LiveServer(node_settings(migrated)) as two:
        yield [one, two]


def address(node: LiveServer) -> str:
    return f"127.0.0.1:{node.port}"


ProxyFactory = Callable[[list[str]], ManagedProxy]


@pytest.fixture()
def proxy_for(tmp_path: Path) -> Iterator[ProxyFactory]:
    """Makes a proxy of this test's own in front of the given nodes (the test calls up());
    each is stopped afterwards."""
    made: list[ManagedProxy] = []

    def make(upstreams: list[str]) -> ManagedProxy:
        made.append(ManagedProxy(tmp_path / f"home{len(made)}", free_port(), upstreams))
        return made[-1]

    yield make
    for proxy in made:
        proxy.down()


def logged_upstreams(proxy: ManagedProxy, requests: int, start: int = 0) -> list[str]:
    """The node (the last one tried) of each of ``requests`` requests nginx logged after
    line ``start`` of its access log. nginx logs a request once it has answered it, so this
    waits for the lines to appear."""
    deadline = time.monotonic() + 5
    while True:
        lines = proxy.access_log.read_text().splitlines()[start:]
        if len(lines) >= requests or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert len(lines) == requests, lines
    # "upstream" lists every node tried, the one that answered last ("a, b").
    return [re.findall(r'upstream="([^"]*)"', line)[0].split(",")[-1].strip()
            for line in lines]


def log_lines(proxy: ManagedProxy) -> int:
    return len(proxy.access_log.read_text().splitlines()) if proxy.access_log.exists() else 0


def nginx_processes(proxy: ManagedProxy) -> list[int]:
    """Every process of this proxy: its master (named by the configuration path in its title)
    and the master's children."""
    masters = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(proxy.config_file).encode() in (entry / "cmdline").read_bytes():
                    masters.append(int(entry.name))
            except OSError:
                continue
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, parent = fields[0], int(fields[1])
        if state != "Z" and (int(entry.name) in masters or parent in masters):
            alive.append(int(entry.name))
    return alive


def healthy(answer: httpx.Response) -> None:
    assert answer.status_code == 200, (answer.status_code, answer.text)


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


# --- the configuration --------------------------------------------------------------------

def test_the_configuration_is_valid_nginx_and_says_what_the_design_says(tmp_path: Path):
    folder = tmp_path / "nginx"
    written = render_config(folder, 18000, ["127.0.0.1:8001", "127.0.0.1:8002"], cache_mb=256)
    # The directives, without the comments.
    text = "\n".join(line.split("#", 1)[0] for line in written.splitlines())
    assert "server 127.0.0.1:8001 max_fails=1 fail_timeout=2s;" in text
    assert "server 127.0.0.1:8002 max_fails=1 fail_timeout=2s;" in text
    assert "keepalive 32;" in text
    assert "proxy_next_upstream error timeout http_502 http_503 http_504;" in text
    assert "non_idempotent" not in text
    assert "proxy_connect_timeout 1000ms;" in text
    assert (f"proxy_cache_path {folder}/cache levels=1:2 keys_zone=twin:32m max_size=256m"
            in text)
    # Tiles only, by the jurisdiction a node names, never by the credentials.
    assert 'proxy_cache_key "$request_method|$host|$request_uri|$twin_scope";' in text
    assert "http_authorization" not in text
    assert text.count("proxy_cache twin;") == 1
    tiles = text[text.index("location ~"):]
    tiles = tiles[:tiles.index("}")]
    for line in ("auth_request /_twin/auth;", "proxy_cache twin;",
                 "auth_request_set $twin_scope $upstream_http_x_twin_scope;",
                 "proxy_cache_bypass $twin_uncached;", "proxy_no_cache $twin_uncached;"):
        assert line in tiles
    auth = text[text.index("location = /_twin/auth"):]
    assert "internal;" in auth[:auth.index("}")]
    # Nothing is cached for a fixed time: only what the node marks cacheable.
    assert "proxy_cache_valid" not in text and "proxy_ignore_headers" not in text
    stream = text[text.index("location = /events/stream"):]
    stream = stream[:stream.index("}")]
    for line in ("proxy_buffering off;", "proxy_cache off;", "proxy_read_timeout 1h;"):
        assert line in stream
    # Every path is in the folder: nginx -t (as the caller, no `user`) accepts it and writes
    # nothing outside it.
    for name in ("logs", "cache", "temp"):
        (folder / name).mkdir(parents=True)
    conf = folder / "nginx.conf"
    conf.write_text(written)
    checked = subprocess.run([str(NGINX), "-t", "-p", f"{folder}/", "-c", str(conf),
                              "-e", str(folder / "logs" / "error.log")],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    files = dict(re.findall(r"^\s*(pid|error_log|access_log|\w+_temp_path|proxy_cache_path)"
                            r"\s+(/[^\s;]+)", text, re.MULTILINE))
    # Each of nginx's built-in paths (/run, /var/log/nginx, /var/lib/nginx) is overridden.
    assert set(files) == {"pid", "error_log", "access_log", "client_body_temp_path",
                          "proxy_temp_path", "fastcgi_temp_path", "uwsgi_temp_path",
                          "scgi_temp_path", "proxy_cache_path"}
    assert all(path.startswith(f"{folder}/") for path in files.values()), files


# --- load balancing and failover ----------------------------------------------------------

def test_requests_land_on_every_node_and_reload_changes_the_nodes(
        proxy_for: ProxyFactory, nodes: list[LiveServer]):
    proxy = proxy_for([address(node) for node in nodes])
    status = proxy.up()
    assert status.running and status.upstreams == proxy.upstreams
    start = log_lines(proxy)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        for _ in range(20):
            healthy(client.get("/healthz"))
        served = Counter(logged_upstreams(proxy, 20, start))
        assert set(served) == {address(node) for node in nodes}, served

    status = proxy.reload([address(nodes[1])])
    assert status.upstreams == [address(nodes[1])]
    start = log_lines(proxy)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        for _ in range(10):
            healthy(client.get("/healthz"))
        assert set(logged_upstreams(proxy, 10, start)) == {address(nodes[1])}


def test_a_node_stopped_under_get_load_costs_no_request(
        proxy_for: ProxyFactory, nodes: list[LiveServer], migrated: str):
    leaving = LiveServer(node_settings(migrated)).__enter__()
    proxy = proxy_for([address(nodes[0]), address(leaving)])
    proxy.up()
    # Four clients GET /collections: 50 before the node stops, then on until it has stopped,
    # then 100 more (bounded: stopping takes at most 10 s).
    threads, before, after = 4, 50, 100
    lock = threading.Lock()
    done = Counter[str]()
    loaded, stopped = threading.Event(), threading.Event()

    def load() -> list[int]:
        statuses = []
        with httpx.Client(base_url=proxy.url, timeout=30) as client:
            while not stopped.is_set() or done["after"] < after:
                statuses.append(client.get("/collections").status_code)
                with lock:
                    done["after" if stopped.is_set() else "before"] += 1
                    if done["before"] >= before:
                        loaded.set()
        return statuses

    start = log_lines(proxy)
    try:
        with ThreadPoolExecutor(threads) as pool:
            futures = [pool.submit(load) for _ in range(threads)]
            assert loaded.wait(60)
            leaving.__exit__(None, None, None)
            stopped_at = log_lines(proxy)
            stopped.set()
            statuses = [status for future in futures for status in future.result()]
    finally:
        stopped.set()
        leaving.__exit__(None, None, None)
    assert Counter(statuses) == {200: len(statuses)}
    served = logged_upstreams(proxy, len(statuses), start)
    # Both nodes answered; once the node had stopped (past the requests in flight then),
    # only the other one, which got every request.
    assert set(served[:stopped_at - start]) == {address(nodes[0]), address(leaving)}
    after_stop = served[stopped_at - start + threads:]
    assert len(after_stop) >= after - threads
    assert set(after_stop) == {address(nodes[0])}


# --- the shared cache ---------------------------------------------------------------------

# The jurisdiction this test's upstream names for each credential at /_twin/auth (as twin
# does, twin/api/proxy_auth.py); "refused" is refused (no scope).
SCOPES = {None: "city", "Bearer key-A": "district-a", "Bearer key-A2": "district-a",
          "Bearer key-B": "district-b"}


class Upstream(ThreadingHTTPServer):
    """Answers ``GET /<anything>?cc=<Cache-Control>[&cookie=1][&slow=<s>]`` with JSON: how
    many times it was asked for this URL, and the Authorization header it saw; and nginx's
    ``/_twin/auth`` question as twin does, by ``SCOPES``."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), UpstreamHandler)
        self.asked: Counter[str] = Counter()
        self.auth_asked: Counter[str] = Counter()  # by original URI
        self.charged: dict[str, list[str | None]] = {}  # X-Twin-Charged seen, by path
        self.proxy_said: set[str | None] = set()  # X-Twin-Proxy seen
        self.lock = threading.Lock()


class UpstreamHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Upstream

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path == "/_twin/auth":
            self._auth()
            return
        with self.server.lock:
            self.server.asked[self.path] += 1
            count = self.server.asked[self.path]
            self.server.charged.setdefault(urlsplit(self.path).path, []).append(
                self.headers.get("X-Twin-Charged"))
            self.server.proxy_said.add(self.headers.get("X-Twin-Proxy"))
        query = parse_qs(urlsplit(self.path).query)
        if "slow" in query:
            time.sleep(float(query["slow"][0]))
        body = json.dumps({"count": count,
                           "authorization": self.headers.get("Authorization")}).encode()
        self.send_response(int(query.get("status", ["200"])[0]))
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", query.get("cc", ["no-store"])[0])
        if "cookie" in query:
            self.send_header("Set-Cookie", "twin_lsn=0/1; Path=/")
        self.end_headers()
        self.wfile.write(body)

    def _auth(self) -> None:
        with self.server.lock:
            self.server.auth_asked[self.headers.get("X-Original-URI", "")] += 1
            self.server.proxy_said.add(self.headers.get("X-Twin-Proxy"))
        self.send_response(204)
        scope = SCOPES.get(self.headers.get("Authorization"))
        if scope is not None:
            self.send_header("X-Twin-Scope", scope)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.do_GET()

    def log_message(self, *args) -> None:
        pass


def serve(upstream: Upstream) -> str:
    """Runs ``upstream`` in a thread; its address."""
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    return f"127.0.0.1:{upstream.server_address[1]}"


@pytest.fixture(scope="module")
def cached_proxy(tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[tuple[Upstream, ManagedProxy]]:
    """The tiny upstream behind a proxy of its own."""
    upstream = Upstream()
    proxy = ManagedProxy(tmp_path_factory.mktemp("cache") / "home", free_port(),
                         [serve(upstream)])
    proxy.up()
    try:
        yield upstream, proxy
    finally:
        proxy.down()
        upstream.shutdown()
        upstream.server_close()


@pytest.fixture()
def cached(cached_proxy) -> tuple[Upstream, str]:
    """(upstream, the proxy's URL)."""
    upstream, proxy = cached_proxy
    return upstream, proxy.url


def fresh(kind: str) -> str:
    """A tile URL nobody asked for yet (a layer named ``kind-<random>``): only tile paths
    are cached (``proxy.TILE_PATHS``)."""
    return f"/tiles/{kind}-{secrets.token_hex(4)}/3/6/2.mvt"


def ask(base: str, url: str, cc: str, headers: dict | None = None,
        client: httpx.Client | None = None, **query: str) -> tuple[str, dict]:
    """(X-Cache-Status, the JSON answer) of one GET through the proxy."""
    answer = (client or httpx).get(base + url, params={"cc": cc, **query}, headers=headers,
                                   timeout=10)
    assert answer.status_code == 200
    return answer.headers.get("x-cache-status", ""), answer.json()


def test_a_public_answer_is_cached_and_served_without_asking_the_node(cached):
    upstream, base = cached
    url, cc = fresh("tile"), "public, max-age=60, immutable"
    assert ask(base, url, cc) == ("MISS", {"count": 1, "authorization": None})
    assert ask(base, url, cc) == ("HIT", {"count": 1, "authorization": None})
    assert ask(base, url, cc) == ("HIT", {"count": 1, "authorization": None})
    assert asked(upstream, url) == 1


def asked(upstream: Upstream, url: str) -> int:
    """How many times the upstream was asked for ``url`` (any query)."""
    return sum(n for path, n in upstream.asked.items() if urlsplit(path).path == url)


def test_a_tile_is_cached_by_the_jurisdiction_the_node_names_never_by_the_key(cached_proxy):
    upstream, proxy = cached_proxy
    base = proxy.url
    url, cc = fresh("tile"), "public, max-age=60, immutable"
    callers = {"A": {"Authorization": "Bearer key-A"}, "B": {"Authorization": "Bearer key-B"},
               "nobody": {}}
    # Three jurisdictions, three answers made (the node counts the URL's requests).
    for n, (who, headers) in enumerate(callers.items(), start=1):
        assert ask(base, url, cc, headers) == (
            "MISS", {"count": n, "authorization": headers.get("Authorization")}), who
    # Each now gets its own jurisdiction's answer from the cache, never another's.
    for who, headers in callers.items():
        status, answer = ask(base, url, cc, headers)
        assert status == "HIT", who
        assert answer["authorization"] == headers.get("Authorization"), who
    # Another key of A's jurisdiction shares A's entry (the same bytes, tiles/cache.py).
    assert ask(base, url, cc, {"Authorization": "Bearer key-A2"}) == (
        "HIT", {"count": 1, "authorization": "Bearer key-A"})
    # The node was asked about every request, hits too, and knew it came through the proxy.
    assert sum(n for uri, n in upstream.auth_asked.items() if uri.startswith(url + "?")) == 7
    assert upstream.proxy_said == {proxy.secret()}
    # The tile requests that reached the node were charged already by /_twin/auth.
    assert upstream.charged[url] == ["1", "1", "1"]
    # No credential is in the keys nginx writes into the cache's files (the bodies here echo
    # the Authorization: this upstream's, not twin's, answers).
    keys = [line for path in (proxy.folder / "cache").rglob("*") if path.is_file()
            for line in path.read_bytes().split(b"\n") if line.startswith(b"KEY: ")]
    assert any(url.encode() in key and key.endswith(b"|district-a") for key in keys), keys
    assert not any(b"key-A" in key or b"Bearer" in key for key in keys), keys


def test_a_refused_caller_passes_to_the_node_uncached(cached):
    upstream, base = cached
    url, cc = fresh("tile"), "public, max-age=60, immutable"
    assert ask(base, url, cc)[0] == "MISS"  # an entry exists for the city ...
    refused = {"Authorization": "Bearer refused"}
    for n in (2, 3):  # ... but a refused caller never reaches it, nor fills one
        status, answer = ask(base, url, cc, refused)
        assert status == "BYPASS" and answer == {"count": n, "authorization": "Bearer refused"}
    # The node charges (and refuses) such a request itself: no X-Twin-Charged.
    assert upstream.charged[url] == ["1", None, None]


def test_only_tiles_are_cached(cached):
    upstream, base = cached
    url = f"/collections/{secrets.token_hex(4)}"
    for n in (1, 2):
        status, answer = ask(base, url, "public, max-age=60, immutable")
        assert status == "" and answer["count"] == n


@pytest.mark.parametrize("cc, query", [
    ("private, max-age=60", {}),
    ("no-store", {}),
    ("public, no-cache", {}),
    ("public, max-age=60", {"cookie": "1"}),
])
def test_what_the_node_does_not_mark_shareable_is_never_cached(cached, cc: str, query: dict):
    upstream, base = cached
    url = fresh("private")
    counts = []
    for _ in range(3):
        status, answer = ask(base, url, cc, **query)
        assert status != "HIT"
        counts.append(answer["count"])
    assert counts == [1, 2, 3] and asked(upstream, url) == 3


def test_concurrent_misses_of_one_url_fill_the_cache_once_and_never_queue(cached):
    upstream, base = cached
    # Six callers at once for an answer the node takes 0.3 s to make: all are answered in
    # parallel (waiting on one another's fill would take 0.3 + 5 x 0.5 s: nginx's lock
    # waiters poll every 500 ms) ...
    clients = [httpx.Client() for _ in range(6)]

    def timed(client: httpx.Client, url: str, cc: str) -> tuple[float, tuple[str, dict]]:
        began = time.monotonic()
        answer = ask(base, url, cc, client=client, slow="0.3")
        return time.monotonic() - began, answer

    for cc in ("public, max-age=60", "no-store"):
        url = fresh("slow")
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda client, url=url, cc=cc: timed(client, url, cc),
                                    clients))
        assert max(took for took, _ in results) < 2.0, (cc, results)
        answers = [answer for _, answer in results]
        assert all(status == "MISS" for status, _ in answers), cc
        assert asked(upstream, url) == 6
        # ... and one of them filled the cache when the node allows it.
        status, answer = ask(base, url, cc, slow="0.3")
        if cc == "no-store":
            assert status == "MISS" and answer["count"] == 7
        else:
            assert status == "HIT" and answer["count"] in range(1, 7)
            assert asked(upstream, url) == 6
    for client in clients:
        client.close()


# --- what is retried ---------------------------------------------------------------------

def test_a_failed_get_is_retried_on_the_next_node_a_failed_post_never(
        proxy_for: ProxyFactory):
    upstreams = [Upstream(), Upstream()]
    nodes = [serve(upstream) for upstream in upstreams]
    # Two proxies: a node that failed is left out for fail_timeout by the proxy it failed.
    for_get, for_post = proxy_for(nodes), proxy_for(nodes)
    try:
        for_get.up()
        for_post.up()
        # Both nodes answer 502: a GET is tried on each, then the client gets the 502.
        answer = httpx.get(f"{for_get.url}/get", params={"status": "502"}, timeout=10)
        assert answer.status_code == 502
        assert [asked(upstream, "/get") for upstream in upstreams] == [1, 1]
        # A POST that reached a node is not sent again (it may have changed something).
        answer = httpx.post(f"{for_post.url}/post", params={"status": "502"}, content=b"{}",
                            timeout=10)
        assert answer.status_code == 502
        assert sorted(asked(upstream, "/post") for upstream in upstreams) == [0, 1]
    finally:
        for upstream in upstreams:
            upstream.shutdown()
            upstream.server_close()


def test_a_refused_reload_keeps_the_running_configuration(proxy_for: ProxyFactory,
                                                          nodes: list[LiveServer]):
    proxy = proxy_for([address(nodes[0])])
    proxy.up()
    before = proxy.config_file.read_text()
    with pytest.raises(ProxyError, match="refused the new configuration"):
        proxy.reload(["no-such-node.invalid:8001"])
    assert proxy.config_file.read_text() == before
    assert proxy.status().upstreams == [address(nodes[0])]
    healthy(httpx.get(f"{proxy.url}/healthz", timeout=10))


# --- the push stream through the proxy ----------------------------------------------------

def emit_one(database_url: str, payload: dict) -> int:
    """One outbox message, committed as twin's writers commit theirs; its id."""
    async def write() -> int:
        engine = create_async_engine(make_url(database_url).set(drivername="postgresql+psycopg"))
        try:
            async with engine.connect() as conn:
                message_id = await emit(conn, "event", payload, None)
                await conn.commit()
            return message_id
        finally:
            await engine.dispose()

    return asyncio.run(write())


def test_a_pushed_message_passes_the_proxy_at_once(proxy_for: ProxyFactory,
                                                   nodes: list[LiveServer], migrated: str):
    proxy = proxy_for([address(node) for node in nodes])
    proxy.up()
    tag = secrets.token_hex(4)
    with httpx.Client(base_url=proxy.url, timeout=10) as client, \
            EventStream(client, "/events/stream", headers=ADMIN) as stream:
        assert stream.response is not None and stream.response.status_code == 200
        # Not through the cache (the stream's location has none).
        assert "x-cache-status" not in stream.response.headers
        for round_ in range(3):
            sent = emit_one(migrated, {"tag": tag, "round": round_})
            committed = time.monotonic()
            got = stream.until(lambda event, sent=sent: event.id == str(sent), timeout=1.0)
            assert time.monotonic() - committed < 1.0
            assert got[-1].json()["payload"] == {"tag": tag, "round": round_}


# --- up and down --------------------------------------------------------------------------

def test_up_twice_is_one_proxy_and_down_leaves_nothing_running(proxy_for: ProxyFactory,
                                                              nodes: list[LiveServer]):
    proxy = proxy_for([address(nodes[0])])
    first = proxy.up()
    again = proxy.up()
    assert first.running and again.pid == first.pid
    processes = nginx_processes(proxy)
    assert first.pid in processes and len(processes) >= 2  # the master and its workers
    healthy(httpx.get(f"{proxy.url}/healthz", timeout=10))
    proxy.down()
    assert not proxy.status().running and proxy.status().pid is None
    assert nginx_processes(proxy) == [] and port_free(proxy.port)
    proxy.down()  # nothing to stop: fine
    # And up again after down.
    assert proxy.up().running
    healthy(httpx.get(f"{proxy.url}/healthz", timeout=10))

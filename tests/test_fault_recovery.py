"""A PostGIS stop and start under load: after PostgreSQL is back, every request sent
succeeds; during the outage, requests get 503 with Retry-After, never a 500 or a dropped
connection.

"After recovery" is exact: a request counts as after when its client started it once
``ManagedCluster.up()`` had returned, i.e. ``pg_ctl start -w`` saw the server accept
connections and twin's database answered a connection of its own. The server's pools
still hold connections that died with the old server (the tile pool has no pre-ping, and
tiles that were cached need no database during the outage, so its idle connections are
never tried until afterwards), and its versions listener is still reconnecting: none of
that may fail a request.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import morecantile
from sqlalchemy import create_engine, text

from tests.servers import LiveServer
from tests.test_resilience import AUTH, api_settings, loaded_cluster

TMS = morecantile.tms.get("WebMercatorQuad")
# Each kind of request and its answer when all is well.
KINDS = {"new tile": 200, "locate": 200, "cached tile": 200, "features": 200, "job": 404}
POOL = 6  # connections of each pool: small, so the tile pool is filled before the outage


@dataclass
class Outcome:
    kind: str
    path: str
    started: float
    finished: float
    status: int  # -1: no HTTP answer (connection error, client time-out)
    retry_after: str | None
    code: str  # the error body's code, or the transport error


class Screens:
    """Threads that each send one request after another until stopped, round the kinds: a
    locate, a feature page, a tile cached before the outage, a tile never asked for before
    (so it needs a tile-pool connection), and a job read (answered only once every versions
    listener has acknowledged a barrier, twin/api/sync.py; no such job: 404)."""

    def __init__(self, base_url: str, spot: tuple[float, float], threads: int = 4):
        self.base_url, self.spot = base_url, spot
        self.outcomes: list[Outcome] = []
        self._fresh = iter(range(1, 10**6))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(i,)) for i in range(threads)]

    def path(self, kind: str) -> str:
        lon, lat = self.spot
        if kind == "locate":
            return f"/query/locate?lon={lon}&lat={lat}"
        if kind == "features":
            return (f"/collections/risk_points/items?bbox={lon - 0.02},{lat - 0.02},"
                    f"{lon + 0.02},{lat + 0.02}&limit=20")
        if kind == "job":
            return "/jobs/" + "0" * 32
        if kind == "cached tile":
            return cached_tile_path(self.spot)
        with self._lock:
            n = next(self._fresh)
        return new_tile_path(self.spot, n)

    def _loop(self, offset: int) -> None:
        kinds = tuple(KINDS)
        with httpx.Client(base_url=self.base_url, headers=AUTH, timeout=20) as client:
            n = offset
            while not self._stop.is_set():
                kind = kinds[n % len(kinds)]
                n += 1
                path = self.path(kind)
                started = time.monotonic()
                try:
                    response = client.get(path)
                    status, retry = response.status_code, response.headers.get("retry-after")
                    code = "" if status == 200 else response.json().get("code", response.text)
                except ValueError:  # not twin's JSON error body
                    code = response.text[:80]
                except httpx.HTTPError as error:
                    status, retry, code = -1, None, type(error).__name__
                self.outcomes.append(Outcome(kind, path, started, time.monotonic(), status,
                                             retry, code))
                time.sleep(0.01)

    def __enter__(self) -> Screens:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


def cached_tile_path(spot: tuple[float, float]) -> str:
    tile = TMS.tile(spot[0], spot[1], 13)
    return f"/tiles/risk_points/{tile.z}/{tile.x}/{tile.y}.mvt"


def new_tile_path(spot: tuple[float, float], n: int) -> str:
    """A z16 tile near ``spot`` that nobody asked for before (its own address)."""
    tile = TMS.tile(spot[0], spot[1], 16)
    return f"/tiles/risk_points/16/{tile.x + n % 200}/{tile.y + n // 200}.mvt"


def grid_spot(url: str) -> tuple[float, float]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return tuple(conn.execute(text(
                "SELECT ST_X(p), ST_Y(p) FROM (SELECT ST_PointOnSurface(geom) AS p FROM "
                "admin_units WHERE level = 'grid' ORDER BY code LIMIT 1) AS s")).one())
    finally:
        engine.dispose()


def failures(outcomes: list[Outcome]) -> list[tuple]:
    return [(o.kind, o.status, o.code, o.path) for o in outcomes if o.status != KINDS[o.kind]]


def test_every_request_sent_after_postgis_is_back_succeeds(own_cluster, sample_dir):
    url = loaded_cluster(own_cluster, sample_dir)
    spot = grid_spot(url)
    settings = api_settings(url, pool_size=POOL, max_overflow=0)
    with LiveServer(settings) as live:
        with httpx.Client(base_url=live.url, headers=AUTH, timeout=20) as client:
            assert client.get(cached_tile_path(spot)).status_code == 200
            # Every connection of the tile pool opened (POOL tiles at once), then idle.
            paths = [new_tile_path(spot, -n) for n in range(1, 4 * POOL + 1)]
            with ThreadPoolExecutor(4 * POOL) as pool:
                statuses = list(pool.map(lambda path: client.get(path).status_code, paths))
            assert statuses == [200] * len(paths)
        with Screens(live.url, spot) as screens:
            time.sleep(1.0)
            down_at = time.monotonic()
            own_cluster.down()
            time.sleep(1.5)
            own_cluster.up()
            up_at = time.monotonic()
            time.sleep(4.0)
    outcomes = sorted(screens.outcomes, key=lambda o: o.started)
    before = [o for o in outcomes if o.finished < down_at]
    during = [o for o in outcomes if o.finished >= down_at and o.started < up_at]
    after = [o for o in outcomes if o.started >= up_at]
    assert before and not failures(before)
    # In flight when the database stopped, or sent while it was down: 503 with Retry-After.
    assert [o for o in during if o.status == 503 and o.started > down_at]
    assert not [(o.kind, o.status, o.code, o.retry_after) for o in during
                if o.status != KINDS[o.kind] and not (o.status == 503 and o.retry_after)]
    # Sent once the database accepted connections again: every one answered.
    assert not failures(after)
    by_kind = {kind: sum(o.kind == kind for o in after) for kind in KINDS}
    assert min(by_kind.values()) >= 5, by_kind

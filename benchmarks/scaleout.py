"""Scale-out benchmark (issue 15): the cluster's shared tile cache against a node asked
directly, and how soon a write is visible through nginx.

Run on demand (never in ``make test``). It brings up a cluster of its own with the project's
command (``twin cluster up --nodes 2 --standbys 1`` under ``/tmp/twin-scale-bench``, ports of
its own), loads the small sample city into it, measures, and brings it down again:

    .venv/bin/python benchmarks/scaleout.py [--seconds 15] [--connections 8] [--trials 60]

1. **Warm versioned tiles**: the URLs the TileJSON names (``v=`` the data versions, sent
   immutable) of a block of zoom-14 risk-point tiles, each asked for once beforehand through
   nginx (filling its cache) and of node 1 (filling its in-process cache). Then, with the same
   bare keep-alive client (benchmarks/bare_http.py), ``--connections`` connections for
   ``--seconds`` each: through nginx (every request asks a node's ``/_twin/auth`` first, then
   comes from the cache) and of node 1 directly. Requests per second, p50 and p99.
2. **Freshness**: ``--trials`` times, a risk point's level is changed by an UPDATE on the
   primary (a writer outside twin: no node is told but by PostgreSQL); the clock runs from
   its commit until the TileJSON read through nginx names new versions and the tile at that
   new URL, through nginx, holds the new level. p50, p99, max.

Two cores hold the client, nginx, both nodes, the primary and the standby: the figures are
per machine, not a scaling curve (see docs/scale-out.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import mapbox_vector_tile  # noqa: E402
import morecantile  # noqa: E402
import psycopg  # noqa: E402
from sqlalchemy import create_engine  # noqa: E402

from benchmarks.bare_http import HttpConnection  # noqa: E402
from data_samples.generate import generate  # noqa: E402
from data_samples.load import load_sample  # noqa: E402
from twin.core.settings import PROJECT_ROOT, DatabaseSettings, Settings  # noqa: E402
from twin.core.topology import ManagedTopology  # noqa: E402

HOME = Path("/tmp/twin-scale-bench")
DB_PORT, PORT = 24588, 24600
WEB_MERCATOR = morecantile.tms.get("WebMercatorQuad")
CENTRE = (106.55, 29.56)
# The base map's layers as one composite tile: a tile that costs a node real work to build.
COMPOSITE = "districts,streets,communities,grids,roads,pipe_segments,risk_points"


def env() -> dict[str, str]:
    made = {**os.environ, "TWIN_HOME": str(HOME), "TWIN_DB_PORT": str(DB_PORT),
            "TWIN_PORT": str(PORT), "TWIN_HOST": "127.0.0.1", "TWIN_WORKERS": "1",
            "TWIN_AUTH_ANONYMOUS_ROLE": "viewer", "TWIN_MQTT_PORT": "24611"}
    for name in ("TWIN_DATABASE_URL", "TWIN_MQTT_URL"):
        made.pop(name, None)
    return made


def twin(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "twin.cli", *args], env=env(),
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"twin {' '.join(args)} failed:\n{done.stderr[-3000:]}")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


# --- warm tiles ----------------------------------------------------------------------------

async def hammer(port: int, paths: list[str], connections: int, seconds: float
                 ) -> tuple[float, list[float], Counter]:
    """(requests/s, latencies in ms, statuses and cache statuses) of ``connections``
    keep-alive connections asking for ``paths`` round robin for ``seconds``."""
    latencies: list[float] = []
    seen: Counter = Counter()
    until = time.monotonic() + seconds

    async def one(offset: int) -> None:
        connection = HttpConnection("127.0.0.1", port, "gzip")
        i = offset
        while time.monotonic() < until:
            began = time.perf_counter()
            status, headers, _ = await connection.request(paths[i % len(paths)])
            latencies.append((time.perf_counter() - began) * 1000)
            seen[(status, headers.get("x-cache-status", "-"))] += 1
            i += connections
        await connection.close()

    began = time.monotonic()
    await asyncio.gather(*(one(n) for n in range(connections)))
    return len(latencies) / (time.monotonic() - began), latencies, seen


def warm_tiles(options: argparse.Namespace) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{PORT}", timeout=30) as client:
        template = client.get("/tiles/risk_points/tilejson.json").json()["tiles"][0]
    centre = WEB_MERCATOR.tile(*CENTRE, 14)
    paths = []
    for dx in range(-4, 4):
        for dy in range(-4, 4):
            url = template.replace("{z}", "14").replace("{x}", str(centre.x + dx)).replace(
                "{y}", str(centre.y + dy))
            paths.append("/" + url.split("/", 3)[3])
    print(f"warm versioned tiles: {len(paths)} risk-point tiles at z14, "
          f"{options.connections} connections x {options.seconds:g} s each")
    for port in (PORT, PORT + 1):  # fill nginx's cache and node 1's
        for path in paths:
            httpx.get(f"http://127.0.0.1:{port}{path}", timeout=30,
                      headers={"Accept-Encoding": "gzip"})
    with httpx.Client(base_url=f"http://127.0.0.1:{PORT}", timeout=30) as client:
        cold_tiles(client.get(f"/tiles/{COMPOSITE}/tilejson.json").json()["tiles"][0])
    print(f"  {'path':<34} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}  statuses")
    for name, port in (("nginx cache (auth_request + HIT)", PORT), ("node 1 directly", PORT + 1)):
        rate, latencies, seen = asyncio.run(
            hammer(port, paths, options.connections, options.seconds))
        print(f"  {name:<34} {rate:>8.0f} {statistics.median(latencies):>8.2f} "
              f"{percentile(latencies, 99):>8.2f}  {dict(seen)}")


def cold_tiles(template: str) -> None:
    """A tile one node built, asked for by a client of another: through nginx it is a HIT;
    a node that never built it builds it. The base map's composite tiles at zoom 13 that
    nobody asked for yet, one at a time (sequential latency, the client's cost included)."""
    centre = WEB_MERCATOR.tile(*CENTRE, 13)
    paths = ["/" + template.replace("{z}", "13").replace("{x}", str(centre.x + dx)).replace(
        "{y}", str(centre.y + dy)).split("/", 3)[3] for dx in range(-4, 4) for dy in range(-4, 4)]
    half = len(paths) // 2
    for path in paths[:half]:  # built once, by whichever node nginx picks, and cached
        httpx.get(f"http://127.0.0.1:{PORT}{path}", timeout=30)
    timings: dict[str, list[float]] = {}
    for name, port, chosen in (("through nginx, built elsewhere", PORT, paths[:half]),
                               ("node 2, never built there", PORT + 2, paths[half:])):
        with httpx.Client(timeout=30) as client:
            for path in chosen:
                began = time.perf_counter()
                client.get(f"http://127.0.0.1:{port}{path}")
                timings.setdefault(name, []).append((time.perf_counter() - began) * 1000)
    for name, values in timings.items():
        print(f"  first visit, {name:<32} p50 {statistics.median(values):7.2f} ms, "
              f"p99 {percentile(values, 99):7.2f} ms ({len(values)} tiles)")


# --- freshness -----------------------------------------------------------------------------

def level_in(content: bytes, point_id: int) -> int | None:
    for feature in mapbox_vector_tile.decode(content).get("risk_points", {}).get("features", []):
        if feature["id"] == point_id:
            return int(feature["properties"]["level"])
    return None


def freshness(options: argparse.Namespace, primary_url: str) -> None:
    with psycopg.connect(primary_url, autocommit=True) as conn:
        point_id, lon, lat, level = conn.execute(
            "SELECT id, ST_X(geom), ST_Y(geom), level FROM risk_points "
            "ORDER BY geom <-> ST_SetSRID(ST_MakePoint(%s, %s), 4326) LIMIT 1",
            CENTRE).fetchone()
        tile = WEB_MERCATOR.tile(lon, lat, 16)
        waits: list[float] = []
        with httpx.Client(base_url=f"http://127.0.0.1:{PORT}", timeout=30) as client:
            for trial in range(options.trials):
                level = 1 + (level % 4)
                before = client.get("/tiles/risk_points/tilejson.json").json()["tiles"][0]
                conn.execute("UPDATE risk_points SET level = %s WHERE id = %s",
                             (level, point_id))
                committed = time.perf_counter()
                while True:
                    template = client.get("/tiles/risk_points/tilejson.json").json()["tiles"][0]
                    if template != before:
                        url = template.replace("{z}", str(tile.z)).replace(
                            "{x}", str(tile.x)).replace("{y}", str(tile.y))
                        if level_in(client.get(url).content, point_id) == level:
                            break
                    if time.perf_counter() - committed > 30:
                        raise SystemExit(f"trial {trial}: the write was not visible in 30 s")
                    time.sleep(0.002)
                waits.append((time.perf_counter() - committed) * 1000)
    print(f"freshness ({options.trials} writes on the primary, to the new versioned tile "
          f"through nginx): p50 {statistics.median(waits):.1f} ms, "
          f"p99 {percentile(waits, 99):.1f} ms, max {max(waits):.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--trials", type=int, default=60)
    options = parser.parse_args()
    shutil.rmtree(HOME, ignore_errors=True)
    try:
        started = time.monotonic()
        twin("cluster", "up", "--nodes", "2", "--standbys", "1")
        settings = Settings(home=HOME, db=DatabaseSettings(port=DB_PORT), port=PORT,
                            host="127.0.0.1")
        primary = ManagedTopology(settings).cluster.url()
        sample = Path(tempfile.mkdtemp(prefix="twin-scale-sample-")) / "small"
        generate(sample, "small")
        engine = create_engine(primary)
        load_sample(engine, sample)
        engine.dispose()
        shutil.rmtree(sample.parent, ignore_errors=True)
        print(f"cluster up and the small city loaded in {time.monotonic() - started:.0f} s "
              f"({json.dumps({'nodes': 2, 'standbys': 1})})")
        warm_tiles(options)
        freshness(options, primary.replace("postgresql+psycopg://", "postgresql://", 1))
    finally:
        twin("cluster", "down")
        shutil.rmtree(HOME, ignore_errors=True)


if __name__ == "__main__":
    main()

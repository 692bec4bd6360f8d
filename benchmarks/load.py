"""Command-hall load: many screens at once on tiles and planners' queries; ``--fault``
restarts PostGIS in the middle.

Run on demand (never in ``make test``), on the full sample city:

    .venv/bin/python benchmarks/load.py [--url URL] [--clients 200] [--duration 60]
                                        [--processes 2] [--workers N] [--fault] [--outage 5]
                                        [--scale full|small]

Without ``--url`` it starts ``twin serve`` (``--workers`` processes, twin's default
``TWIN_WORKERS`` unless given, on a free loopback port)
on the database the environment names (``TWIN_DATABASE_URL``, or the managed cluster of
``TWIN_HOME``/``TWIN_DB_PORT``: database ``twin`` by default), with anonymous viewer+planner
access on, as ``make run``'s demo has it. ``--url`` drives a server already running instead
(``make run``'s). The workload only reads.

``--clients`` clients (spread over ``--processes`` client processes, each one asyncio loop
with a bare keep-alive HTTP client, benchmarks/bare_http.py) send
requests back to back for ``--duration`` seconds, each picked at random (fixed seed) from the
mix in ``MIX``: vector tiles of the style's sources at zooms 6-16 (70 % over the central
districts, the rest anywhere in the municipality; a fixed pool of tiles, so screens share
tiles as they do in a hall), locate, nearest teams by distance and by road, H3 counts over a
box, and feature pages of risk points and teams in a small bbox. A client that gets a 503
waits 0.2 s (a hall screen retries soon, sooner than Retry-After, which the server sets for
clients in general), then goes on. It prints requests, errors (anything but 200/304, and
transport errors and client time-outs of ``--timeout`` s), p50/p99 per endpoint, and the
client processes' CPU (near 100 % of a core would mean the client, not twin, is the limit).

``--fault`` stops the managed cluster (``pg_ctl stop -m fast``) at 40 % of the run and starts
it again ``--outage`` seconds later. It reports three phases, each with its errors by
endpoint, status and kind (the answer's ``code``, or the transport error): before the
outage (expected: none), during it (requests in flight when the database stopped or sent
before it accepted connections again: 503 with Retry-After expected, never a 500 or a
dropped connection), and after recovery, i.e. every request sent once the database accepts
connections again (``pg_ctl start -w`` returned and twin's database answered): expected
none, and the script exits 1 otherwise. It restarts the cluster of
``TWIN_HOME``/``TWIN_DB_PORT``; on a machine others share, use a throwaway one:

    TWIN_HOME=/tmp/twin-fault TWIN_DB_PORT=55499 .venv/bin/python benchmarks/load.py --fault

On twin's managed cluster the script makes what it lacks first (``benchmarks/prerequisites.py``:
the cluster initialised and started, migrated, the ``--scale`` sample city loaded: several
minutes of CPU the first time for the full one); on ``TWIN_DATABASE_URL`` it only checks,
and stops with the command to run. The default cluster (port 55432) is refused for
``--fault`` unless ``--fault-default-cluster`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import multiprocessing
import os
import random
import statistics
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import morecantile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bare_http import HttpConnection  # noqa: E402
from benchmarks.prerequisites import prepare  # noqa: E402
from benchmarks.serving import serving  # noqa: E402
from twin.core.cluster import ManagedCluster  # noqa: E402
from twin.core.settings import DatabaseSettings, Settings  # noqa: E402

SEED = 20_260_707
TMS = morecantile.tms.get("WebMercatorQuad")
CENTRAL_AREA = (106.35, 29.35, 106.75, 29.75)  # Yuzhong and the districts around it
MUNICIPALITY = (105.3, 28.2, 110.1, 32.2)
# The style's tile sources (tiles/style.py), each one composite tile per screen tile.
TILE_SOURCES = ("districts,streets,communities,grids", "risk_points", "response_teams",
                "pipe_segments", "buildings")
ZOOMS = range(6, 17)
TILE_POOL = 4000
# Share of each kind of request in the mix.
MIX = {"tile": 55, "locate": 10, "nearest (distance)": 8, "nearest (road)": 5, "h3": 8,
       "features (bbox)": 14}
RETRY_SOON_S = 0.2


@dataclass(frozen=True)
class Outcome:
    kind: str
    started: float  # time.monotonic(): one clock for every process on the machine
    finished: float
    status: int  # -1: no HTTP answer (connection error or client time-out)
    retry_after: bool
    # What went wrong: the answer's ``code`` (e.g. DatabaseUnavailable) for an HTTP error,
    # the exception for no answer at all.
    error: str = ""


def error_code(headers: dict[str, str], body: bytes) -> str:
    """The ``code`` of twin's error body, or the start of whatever else came back."""
    try:
        if headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        return str(json.loads(body)["code"])
    except (OSError, ValueError, KeyError, TypeError):
        return body[:60].decode("latin-1") or "(empty body)"


def random_spot(rng: random.Random, area: Sequence[float]) -> tuple[float, float]:
    return rng.uniform(area[0], area[2]), rng.uniform(area[1], area[3])


def tile_pool(rng: random.Random) -> list[str]:
    paths = []
    for _ in range(TILE_POOL):
        lon, lat = random_spot(rng, CENTRAL_AREA if rng.random() < 0.7 else MUNICIPALITY)
        tile = TMS.tile(lon, lat, rng.choice(ZOOMS))
        paths.append(f"/tiles/{rng.choice(TILE_SOURCES)}/{tile.z}/{tile.x}/{tile.y}.mvt")
    return paths


def next_request(rng: random.Random, tiles: list[str]) -> tuple[str, str, dict]:
    kind = rng.choices(list(MIX), weights=list(MIX.values()))[0]
    lon, lat = random_spot(rng, CENTRAL_AREA)
    if kind == "tile":
        return kind, rng.choice(tiles), {}
    if kind == "locate":
        return kind, "/query/locate", {"lon": lon, "lat": lat}
    if kind.startswith("nearest"):
        mode = "road" if "road" in kind else "distance"
        return kind, "/query/nearest-teams", {"lon": lon, "lat": lat, "k": 5, "mode": mode}
    if kind == "h3":
        return kind, "/query/h3", {"res": 8, "bbox": f"{lon - 0.05},{lat - 0.05},"
                                                     f"{lon + 0.05},{lat + 0.05}"}
    collection = rng.choice(("risk_points", "response_teams"))
    return kind, f"/collections/{collection}/items", {
        "bbox": f"{lon - 0.01},{lat - 0.01},{lon + 0.01},{lat + 0.01}", "limit": 100}


async def client_loop(base: str, rng: random.Random, tiles: list[str], until: float,
                      timeout: float, outcomes: list[Outcome]) -> None:
    """One screen: a keep-alive connection, one request at a time, until ``until``.

    The bare client (benchmarks/bare_http.py) costs tens of microseconds a request where
    httpx costs over a millisecond; with 200 clients on 2 cores, httpx took more CPU than
    the server under test.
    """
    host, port = base.removeprefix("http://").split(":")
    connection = HttpConnection(host, int(port), "gzip")
    try:
        while time.monotonic() < until:
            kind, path, params = next_request(rng, tiles)
            if params:
                path += "?" + urlencode(params)
            started = time.monotonic()
            try:
                status, headers, body = await asyncio.wait_for(connection.request(path),
                                                               timeout)
                retry = "retry-after" in headers
                error = error_code(headers, body) if status not in (200, 304) else ""
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
                status, retry, error = -1, False, f"{type(exc).__name__}: {exc}"[:80]
                await connection.close()
            outcomes.append(Outcome(kind, started, time.monotonic(), status, retry, error))
            if status == 503:
                await asyncio.sleep(RETRY_SOON_S)
    finally:
        await connection.close()


async def drive(base: str, clients: int, seed: int, start_at: float, until: float,
                timeout: float) -> list[Outcome]:
    rng = random.Random(SEED)
    tiles = tile_pool(rng)
    outcomes: list[Outcome] = []
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    await asyncio.gather(*(client_loop(base, random.Random(seed * 1000 + i), tiles, until,
                                       timeout, outcomes) for i in range(clients)))
    return outcomes


def client_process(args: tuple) -> tuple[list[Outcome], float, float]:
    """One client process: its outcomes, CPU seconds and wall seconds."""
    base, clients, seed, start_at, until, timeout = args
    cpu, wall = time.process_time(), time.monotonic()
    outcomes = asyncio.run(drive(base, clients, seed, start_at, until, timeout))
    return outcomes, time.process_time() - cpu, time.monotonic() - wall


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def failed(outcome: Outcome) -> bool:
    return outcome.status not in (200, 304)


def error_kinds(outcomes: Sequence[Outcome], indent: str = "    ") -> None:
    """Failures by endpoint, status and kind, most frequent first."""
    kinds = Counter((o.kind, o.status, o.error) for o in outcomes if failed(o))
    for (kind, status, error), n in kinds.most_common():
        what = "no answer" if status == -1 else str(status)
        print(f"{indent}{n:>7,}  {what:<9} {error:<40} {kind}")


def report_load(outcomes: list[Outcome], seconds: float) -> None:
    errors = [o for o in outcomes if failed(o)]
    print(f"requests {len(outcomes):,} ({len(outcomes) / seconds:,.0f}/s), "
          f"errors {len(errors)}")
    error_kinds(outcomes)
    by_kind: dict[str, list[float]] = defaultdict(list)
    for o in outcomes:
        if not failed(o):
            by_kind[o.kind].append((o.finished - o.started) * 1000)
    print(f"{'endpoint':<22}{'requests':>10}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for kind in MIX:
        times = by_kind.get(kind, [])
        if times:
            print(f"{kind:<22}{len(times):>10,}{statistics.median(times):>10.0f}"
                  f"{percentile(times, 99):>10.0f}{max(times):>10.0f}")


def report_fault(outcomes: list[Outcome], down_at: float, up_at: float) -> int:
    """Three phases: before the outage (answered before the database stopped), during it
    (in flight when it stopped, or sent before it accepted connections again: 503 with
    Retry-After allowed) and after recovery (sent once it accepts connections again: every
    one must succeed). Returns the errors after recovery."""
    before = [o for o in outcomes if o.finished < down_at]
    during = [o for o in outcomes if o.finished >= down_at and o.started < up_at]
    after = [o for o in outcomes if o.started >= up_at]
    print(f"fault: database down {up_at - down_at:.1f} s (pg_ctl stop -m fast, then start -w)")
    print(f"  before the outage: {len(before):,} answers, errors "
          f"{sum(map(failed, before))}")
    error_kinds(before)
    statuses = Counter(o.status for o in during)
    bad = [o for o in during if failed(o) and not (o.status == 503 and o.retry_after)]
    print(f"  during the outage: {len(during):,} answers {dict(statuses)}; failures other "
          f"than 503 with Retry-After: {len(bad)}")
    error_kinds(during)
    back = [o.finished for o in after if o.status == 200]
    first = f"{min(back) - up_at:.2f} s" if back else "NEVER"
    errors = sum(map(failed, after))
    print(f"  after recovery (sent once the database accepted connections): {len(after):,} "
          f"requests, errors {errors}; the first 200 came {first} after it was back")
    error_kinds(after)
    return errors + (not back)


def restart_cluster(cluster: ManagedCluster, at: float, outage: float,
                    marks: dict[str, float]) -> None:
    time.sleep(max(0.0, at - time.monotonic()))
    marks["down"] = time.monotonic()
    cluster.down()
    time.sleep(outage)
    cluster.up()
    marks["up"] = time.monotonic()


def run_load(base: str, options: argparse.Namespace, cluster: ManagedCluster | None) -> int:
    """Drives the load; returns the errors after recovery (``--fault``), else 0."""
    per_process = [options.clients // options.processes + (i < options.clients %
                   options.processes) for i in range(options.processes)]
    start_at = time.monotonic() + 2.0  # every process ready before the clock starts
    until = start_at + options.duration
    marks: dict[str, float] = {}
    fault = None
    if cluster is not None:
        fault = threading.Thread(target=restart_cluster, args=(
            cluster, start_at + 0.4 * options.duration, options.outage, marks))
        fault.start()
    jobs = [(base, n, i + 1, start_at, until, options.timeout)
            for i, n in enumerate(per_process)]
    with multiprocessing.get_context("spawn").Pool(options.processes) as pool:
        results = pool.map(client_process, jobs)
    if fault is not None:
        fault.join()
    outcomes = [o for result in results for o in result[0]]
    print(f"load: {options.clients} clients in {options.processes} processes, "
          f"{options.duration:.0f} s, against {base}")
    for i, (_, cpu, wall) in enumerate(results, 1):
        print(f"  client process {i}: {cpu / wall:.0%} of a core")
    if cluster is None:
        report_load(outcomes, options.duration)
        return 0
    if "up" not in marks:
        print("fault: the cluster was not restarted (the run ended first; see above)")
        return 1
    down, up = marks["down"], marks["up"]
    report_load([o for o in outcomes if o.finished < down], down - start_at)
    return report_fault(outcomes, down, up)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a twin already serving (e.g. make run's)")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--workers", type=int, default=Settings().workers,
                        help="worker processes of its own twin serve (TWIN_WORKERS)")
    parser.add_argument("--timeout", type=float, default=60.0, help="client time-out, s")
    parser.add_argument("--fault", action="store_true", help="restart PostGIS mid-run")
    parser.add_argument("--outage", type=float, default=5.0, help="seconds PostGIS is down")
    parser.add_argument("--fault-default-cluster", action="store_true",
                        help="allow --fault on the default cluster (port 55432)")
    parser.add_argument("--scale", choices=("full", "small"), default="full",
                        help="the sample city its own server needs (made if missing)")
    return parser.parse_args()


def main() -> None:
    options = parse_args()
    settings = Settings()
    cluster = None
    if options.fault:
        if not settings.managed:
            raise SystemExit("--fault restarts twin's managed cluster: unset TWIN_DATABASE_URL")
        if settings.db.port == DatabaseSettings.model_fields["port"].default and not \
                options.fault_default_cluster:
            raise SystemExit("--fault would restart the default cluster (port 55432); use a "
                             "throwaway TWIN_HOME/TWIN_DB_PORT or --fault-default-cluster")
        cluster = ManagedCluster(settings)
    if options.url:
        if cluster is not None:
            prepare(settings, options.scale)
        sys.exit(1 if run_load(options.url.rstrip("/"), options, cluster) else 0)
    url = prepare(settings, options.scale)
    env = {**os.environ, "TWIN_DATABASE_URL": url,
           "TWIN_WORKERS": str(options.workers),
           "TWIN_AUTH_ANONYMOUS_ROLE": os.environ.get("TWIN_AUTH_ANONYMOUS_ROLE", "planner")}
    # `twin serve` itself, as make run's server (workers, shared rate limits, keep-alive).
    argv = [sys.executable, "-m", "twin.cli", "serve"]
    with serving("twin", argv, env, "/healthz", ROOT, uvicorn_cli=False) as base:
        print(f"twin serve: {options.workers} worker process(es) on {url.split('@')[-1]}")
        errors = run_load(base, options, cluster)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()

"""Planners' queries benchmark: p50/p95 latency of locate, nearest teams, reach, coverage, h3.

Run on demand (never in ``make test``) against the full sample city, read only:

    .venv/bin/python benchmarks/queries.py [--database-url URL] [--points 200] [--seed N]
                                           [--direct]

It starts twin (uvicorn, one worker, on a free loopback port) on the database (default: the
managed cluster's ``twin``), sends one request at a time over one keep-alive connection and
times each at the client (so HTTP and JSON are included), then stops the server. With
``--direct`` it calls the query functions instead, on one connection whose transactions are
read only (no HTTP; for a database the server cannot start on, e.g. one that lacks a newer
migration). The spots
are ``--points`` random points (fixed seed) inside the central districts. Coverage does not
depend on a spot: it runs once per team type at 10 and 30 minutes. h3 asks for res 7 over a
0.1-degree box around each spot. Pipe anomalies are benchmarked by benchmarks/anomalies.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import psycopg
import shapely

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.prerequisites import libpq_or_exit, require  # noqa: E402
from benchmarks.serving import serving  # noqa: E402
from twin.core.db import database_url  # noqa: E402
from twin.core.models import TEAM_TYPES  # noqa: E402
from twin.core.settings import Settings  # noqa: E402

# Yuzhong, Dadukou, Jiangbei, Shapingba, Jiulongpo, Nan'an, Beibei, Yubei, Banan.
CENTRAL_DISTRICTS = ("500103", "500104", "500105", "500106", "500107", "500108", "500109",
                     "500112", "500113")
SEED = 20_260_404
WARMUP = 3
TARGETS_MS = {"locate": 5, "nearest (distance)": 5, "nearest (road)": 100,
              "reach 10 min": 500, "reach 10 min, on road": 500, "coverage": 10_000}


def twin_server(url: str):
    """twin under uvicorn (one worker) on a free loopback port; yields its base URL."""
    argv = [sys.executable, "-m", "uvicorn", "twin.api.app:create_app", "--factory"]
    env = {**os.environ, "TWIN_DATABASE_URL": url, "TWIN_AUTH_ANONYMOUS_ROLE": "planner"}
    return serving("twin", argv, env, "/healthz", ROOT)


def central_points(url: str, n: int, seed: int) -> list[tuple[float, float]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT ST_AsBinary(geom) FROM admin_units "
                            "WHERE level = 'district' AND code = ANY(%s)",
                            [list(CENTRAL_DISTRICTS)]).fetchall()
    if not rows:
        raise SystemExit("no central districts in this database: load the full sample city")
    area = shapely.union_all([shapely.from_wkb(bytes(row[0])) for row in rows])
    rng = np.random.default_rng(seed)
    west, south, east, north = area.bounds
    kept: list[tuple[float, float]] = []
    while len(kept) < n:
        x, y = rng.uniform(west, east, 4 * n), rng.uniform(south, north, 4 * n)
        inside = shapely.contains_xy(area, x, y)
        kept += list(zip(x[inside].tolist(), y[inside].tolist(), strict=True))
    return kept[:n]


def central_road_spots(url: str, n: int, seed: int) -> list[tuple[float, float]]:
    """Spots ~40 m off random road nodes of the central districts: most random spots are
    kilometres from the sparse sample road graph, so their reach is little more than the walk
    to the road; these exercise the road part."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT ST_X(n.geom), ST_Y(n.geom) FROM road_nodes AS n WHERE EXISTS ("
            "SELECT 1 FROM admin_units AS a WHERE a.level = 'district' AND a.code = ANY(%s) "
            "AND ST_Intersects(a.geom, n.geom)) ORDER BY n.id",
            [list(CENTRAL_DISTRICTS)]).fetchall()
    picks = np.random.default_rng(seed).choice(len(rows), min(n, len(rows)), replace=False)
    return [(rows[i][0] + 0.0003, rows[i][1] + 0.0002) for i in picks]


def requests(points: list[tuple[float, float]],
             road_spots: list[tuple[float, float]]) -> dict[str, list[tuple[str, dict]]]:
    cases: dict[str, list[tuple[str, dict]]] = {
        "locate": [("/query/locate", {"lon": x, "lat": y}) for x, y in points],
        "nearest (distance)": [("/query/nearest-teams", {"lon": x, "lat": y, "k": 5})
                               for x, y in points],
        "nearest (road)": [("/query/nearest-teams", {"lon": x, "lat": y, "k": 5,
                                                     "mode": "road"}) for x, y in points],
        "reach 10 min": [("/query/reach", {"lon": x, "lat": y, "minutes": 10})
                         for x, y in points],
        "reach 10 min, on road": [("/query/reach", {"lon": x, "lat": y, "minutes": 10})
                                  for x, y in road_spots],
        "coverage": [("/query/coverage", {"team_type": t, "minutes": m})
                     for m in (10, 30) for t in TEAM_TYPES],
        "h3 res 7 (0.1° box)": [("/query/h3", {"res": 7, "bbox": f"{x - 0.05},{y - 0.05},"
                                                                 f"{x + 0.05},{y + 0.05}"})
                                for x, y in points],
    }
    return cases


def run(client: httpx.Client, cases: list[tuple[str, dict]]) -> list[float]:
    for path, params in cases[:WARMUP]:
        client.get(path, params=params).raise_for_status()
    times = []
    for path, params in cases:
        start = time.perf_counter()
        response = client.get(path, params=params)
        times.append((time.perf_counter() - start) * 1000)
        response.raise_for_status()
    return times


# Query paths mapped to the functions behind them, for --direct.
async def _call(conn, path: str, params: dict):
    from twin.queries.coverage import coverage
    from twin.queries.h3_stats import h3_counts
    from twin.queries.locate import locate
    from twin.queries.nearest import nearest_teams
    from twin.queries.reach import reach
    from twin.queries.routing import nearest_teams_by_road

    p = dict(params)
    if path == "/query/locate":
        return await locate(conn, p["lon"], p["lat"])
    if path == "/query/nearest-teams":
        by = nearest_teams_by_road if p.pop("mode", "distance") == "road" else nearest_teams
        return await by(conn, p["lon"], p["lat"], p["k"])
    if path == "/query/reach":
        return await reach(conn, p["lon"], p["lat"], p["minutes"])
    if path == "/query/coverage":
        return await coverage(conn, p["team_type"], p["minutes"])
    if path == "/query/h3":
        return await h3_counts(conn, p["res"], bbox=p["bbox"])
    raise ValueError(path)


async def run_direct(url: str, cases: dict[str, list[tuple[str, dict]]]) -> dict:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url, connect_args={
        "options": "-c default_transaction_read_only=on"})
    results = {}
    try:
        async with engine.connect() as conn:
            for name, calls in cases.items():
                for path, params in calls[:WARMUP]:
                    await _call(conn, path, params)
                times = []
                for path, params in calls:
                    start = time.perf_counter()
                    # Serialised as the API would, so the figures stay comparable.
                    json.dumps(await _call(conn, path, params), default=str)
                    times.append((time.perf_counter() - start) * 1000)
                await conn.rollback()
                results[name] = times
                print(f"  {name}: done", flush=True)
    finally:
        await engine.dispose()
    return results


def run_server(url: str, cases: dict[str, list[tuple[str, dict]]]) -> dict:
    results = {}
    with twin_server(url) as base, httpx.Client(base_url=base, timeout=120) as client:
        for name, calls in cases.items():
            results[name] = run(client, calls)
            print(f"  {name}: done", flush=True)
    return results


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", help="the full sample city (default: twin's database)")
    parser.add_argument("--points", type=int, default=200)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--direct", action="store_true",
                        help="call the query functions on a read-only connection, no server")
    args = parser.parse_args()
    args.database_url = args.database_url or libpq_or_exit(Settings())
    # --direct is for a database the server cannot start on (an older migration).
    require(args.database_url, "full", migrated=not args.direct)
    points = central_points(args.database_url, args.points, args.seed)
    how = ("query functions, one read-only connection" if args.direct
           else "one uvicorn worker, one HTTP client")
    print(f"{len(points)} spots in the central districts (seed {args.seed}), "
          f"{os.cpu_count()} CPUs, {how}", flush=True)
    cases = requests(points, central_road_spots(args.database_url, args.points, args.seed))
    if args.direct:
        sqlalchemy_url = database_url(Settings(database_url=args.database_url))
        results = asyncio.run(run_direct(sqlalchemy_url, cases))
    else:
        results = run_server(args.database_url, cases)
    rows = [(name, len(times), statistics.median(times), percentile(times, 95), max(times),
             TARGETS_MS.get(name)) for name, times in results.items()]
    print()
    print(f"{'query':<24}{'n':>5}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}"
          f"{'target p50':>12}  verdict")
    for name, n, p50, p95, worst, target in rows:
        verdict = "-" if target is None else ("ok" if p50 <= target else "MISSED")
        target_text = "-" if target is None else f"<= {target:g}"
        print(f"{name:<24}{n:>5}{p50:>10.1f}{p95:>10.1f}{worst:>10.1f}{target_text:>12}  "
              f"{verdict}")


if __name__ == "__main__":
    main()

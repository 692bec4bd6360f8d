"""Upload benchmark: a 100,000-point GeoPackage from POST /layers to a published tile, side by
side with ``ogr2ogr -f PostgreSQL`` loading the same file into the same database.

Run on demand (never in ``make test``); it writes only to a scratch database of its own
(``twin_bench_uploads`` in the managed cluster, dropped and created afresh):

    .venv/bin/python benchmarks/uploads.py [--points 100000] [--repeat 3]

Targets (issue 5): upload -> published tiles <= 15 s, and <= 2x the ogr2ogr time.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import geopandas as gpd  # noqa: E402
import httpx  # noqa: E402
import morecantile  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.scratch import scratch_database  # noqa: E402
from tests.conftest import LiveServer  # noqa: E402
from twin.core.cluster import ManagedCluster  # noqa: E402
from twin.core.settings import AuthSettings, Settings, UploadSettings  # noqa: E402

DATABASE = "twin_bench_uploads"
KEY = "bench-editor-key"


def make_gpkg(path: Path, points: int) -> None:
    rng = np.random.default_rng(5)
    lon = rng.uniform(106.3, 106.8, points)
    lat = rng.uniform(29.3, 29.8, points)
    frame = gpd.GeoDataFrame({
        "name": [f"点{i}" for i in range(points)],
        "kind": rng.choice(["消防栓", "井盖", "路灯"], points),
        "value": rng.normal(100, 10, points),
        "count": rng.integers(0, 1000, points),
    }, geometry=gpd.points_from_xy(lon, lat), crs="EPSG:4326")
    frame.to_file(path, layer="points", engine="pyogrio")


def time_upload(client: httpx.Client, path: Path, run: int) -> float:
    tile = morecantile.tms.get("WebMercatorQuad").tile(106.55, 29.55, 12)
    headers = {"Authorization": f"Bearer {KEY}"}
    start = time.perf_counter()
    with path.open("rb") as stream:
        response = client.post("/layers", headers=headers, files={"file": (path.name, stream)},
                                data={"title": f"bench {run}", "id": f"bench_{run}"})
    response.raise_for_status()
    job_id = response.json()["id"]
    while (job := client.get(f"/jobs/{job_id}").json())["state"] not in ("succeeded", "failed"):
        time.sleep(0.05)
    if job["state"] == "failed":
        raise SystemExit(f"upload failed: {job['reasons']}")
    tile_response = client.get(f"/tiles/bench_{run}/{tile.z}/{tile.x}/{tile.y}.mvt")
    tile_response.raise_for_status()
    return time.perf_counter() - start


def time_ogr2ogr(url: str, path: Path, run: int) -> float | None:
    if shutil.which("ogr2ogr") is None:
        return None
    pg = url.replace("postgresql+psycopg://", "postgresql://")
    start = time.perf_counter()
    subprocess.run(["ogr2ogr", "-f", "PostgreSQL", f"PG:{pg}", str(path), "points",
                    "-nln", f"ogr_bench_{run}", "-lco", "GEOMETRY_NAME=geom",
                    "-lco", "SPATIAL_INDEX=GIST", "-overwrite"], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    url = scratch_database(ManagedCluster(Settings()), DATABASE)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "points.gpkg"
        make_gpkg(path, args.points)
        size_mb = path.stat().st_size / 1e6
        settings = Settings(database_url=url, auth=AuthSettings(keys={KEY: "gis-editor"}),
                            uploads=UploadSettings(dir=Path(tmp) / "uploads"))
        twin_times, ogr_times = [], []
        with LiveServer(settings) as live, httpx.Client(base_url=live.url, timeout=120) as client:
            for run in range(args.repeat):
                ogr = time_ogr2ogr(url, path, run)
                if ogr is not None:
                    ogr_times.append(ogr)
                twin_times.append(time_upload(client, path, run))
    twin_median = statistics.median(twin_times)
    print(f"{args.points} points, GeoPackage {size_mb:.1f} MB, {args.repeat} runs")
    print(f"twin upload -> published tile: median {twin_median:.2f} s "
          f"(runs: {', '.join(f'{t:.2f}' for t in twin_times)}; target <= 15 s)")
    if ogr_times:
        ogr_median = statistics.median(ogr_times)
        print(f"ogr2ogr -f PostgreSQL:          median {ogr_median:.2f} s "
              f"(runs: {', '.join(f'{t:.2f}' for t in ogr_times)})")
        print(f"ratio twin / ogr2ogr: {twin_median / ogr_median:.2f} (target <= 2)")
    else:
        print("ogr2ogr not found (apt-get install gdal-bin) - no side-by-side figure")


if __name__ == "__main__":
    main()

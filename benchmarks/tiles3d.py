"""3D Tiles benchmark: the whole CIM2 (LOD1) tileset of the full sample city, walked as a
client walks it, and py3dtiles exporting the same solids from the same PostGIS.

Run on demand (never in ``make test``). On twin's managed cluster of ``TWIN_HOME``/
``TWIN_DB_PORT`` it first makes what it lacks (cluster, migrations, the full sample city:
minutes the first time); keep it off the shared cluster:

    TWIN_HOME=/tmp/twin3d-bench TWIN_DB_PORT=55487 .venv/bin/python benchmarks/tiles3d.py

What it measures, in one run:

1. **Whole tileset**: twin (uvicorn, ``--workers`` processes, ``TWIN_TILES_CACHE=false``, so
   nothing is cached: every subtree and tile is built from the tables) is walked from
   ``tileset.json?cim=2`` as CesiumJS walks an implicit quadtree: subtree files first, then
   every available content tile and child subtree they name, ``--concurrency`` requests in
   flight (a bare keep-alive client). Wall time (target <= 10 s on 2 cores) and latency per
   request. Then the walk again on the same server: the tile cache is still off, but each
   worker now holds the subtrees' placements (which building goes in which tile: a small
   LRU the server keeps whatever ``TWIN_TILES_CACHE`` says), so the two walks tell the
   placements' share from the tiles'.
2. **Cold tiles**: every content tile of <= 1,000 buildings again, one request at a time
   (cache off: each one built from the tables; its subtree's placement is held, as above):
   p50/p95 (target p95 <= 150 ms).
3. **Bytes per LOD1 building**: content bytes / buildings, as sent and gzipped (level 6, in
   the client) (target <= 1.5 KB as sent).
4. **py3dtiles** (PyPI, in its own virtualenv ``benchmarks/.venv-py3dtiles``, installed on
   first use): the same LOD1 solids (twin's blocks: the footprint from the lowest DEM height
   under its corners minus the 3 m foundation, or its podium, up to ``height_m`` above the
   ground) built once with SFCGAL's ``ST_Extrude`` into the scratch table
   ``bench_tiles3d_solids`` (POLYHEDRALSURFACE Z in ECEF, EPSG:4978, as py3dtiles' export
   expects geocentric metres), then ``py3dtiles export`` reading that table, timed end to end,
   with its tile-size totals (target: twin >= 5x faster end to end). ``--py3dtiles-timeout``
   bounds it: a run that does not finish gives a lower bound of the ratio. The solids table
   is kept for the next run (``--rebuild-solids`` makes it again, timed).

``--profile N`` (5 when a time target is missed) rebuilds the N slowest and the N largest
tiles of the walk in-process: the placement of their subtree, the rows, the GLB, with
cProfile around the placement and around ``tiles.buildings3d.content``. The results are
printed as a table, then as JSON (also written to ``--json FILE``).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gzip
import io
import json
import os
import pstats
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psycopg
import shapely
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bare_http import HttpConnection  # noqa: E402
from benchmarks.prerequisites import (  # noqa: E402
    libpq_or_exit,
    prepare,
    require,
    require_buildings_3d,
)
from benchmarks.serving import serving  # noqa: E402
from benchmarks.tiles import server_cpu_s  # noqa: E402
from twin.core.settings import Settings  # noqa: E402

PY3DTILES_VENV = ROOT / "benchmarks" / ".venv-py3dtiles"
PY3DTILES_REQUIREMENTS = ("py3dtiles[postgres]>=12,<13",)
SOLIDS_TABLE = "bench_tiles3d_solids"
CIM = "2"
BASE = "/collections/buildings/3dtiles"
TARGET_WALL_S = 10.0
TARGET_COLD_P95_MS = 150.0
COLD_TILE_MAX_BUILDINGS = 1000
TARGET_BYTES_PER_BUILDING = 1.5 * 1024
TARGET_RATIO = 5.0
FOUNDATION_M = 3.0  # tiles/buildings3d.py's FOUNDATION_M: the same solids


# --- the walk -----------------------------------------------------------------------------

@dataclass
class Fetch:
    kind: str  # "subtree" | "content"
    level: int
    x: int
    y: int
    seconds: float
    size: int
    gzip_size: int = 0
    buildings: int = 0
    vertices: int = 0
    triangles: int = 0


@dataclass
class WalkResult:
    seconds: float
    fetches: list[Fetch] = field(default_factory=list)
    tileset_bytes: int = 0

    def of(self, kind: str) -> list[Fetch]:
        return [f for f in self.fetches if f.kind == kind]


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def morton_xy(index: int) -> tuple[int, int]:
    x = y = 0
    for bit in range(16):
        x |= ((index >> (2 * bit)) & 1) << bit
        y |= ((index >> (2 * bit + 1)) & 1) << bit
    return x, y


def subtree_tiles(levels: int) -> list[tuple[int, int, int]]:
    """(depth, dx, dy) of a subtree's tiles in bitstream order: level by level, Morton."""
    return [(depth, *morton_xy(index)) for depth in range(levels)
            for index in range(4**depth)]


def decode_subtree(data: bytes, tile_count: int, child_count: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tile, content and child-subtree availability of a binary subtree (3D Tiles 1.1)."""
    magic, _, json_length, _ = struct.unpack("<4sIQQ", data[:24])
    if magic != b"subt":
        raise RuntimeError("not a subtree file")
    document = json.loads(data[24:24 + json_length])
    binary = data[24 + json_length:]

    def bits(part: dict, count: int) -> np.ndarray:
        if "constant" in part:
            return np.full(count, bool(part["constant"]))
        view = document["bufferViews"][part["bitstream"]]
        raw = np.frombuffer(binary, np.uint8, view["byteLength"], view.get("byteOffset", 0))
        return np.unpackbits(raw, bitorder="little")[:count].astype(bool)

    return (bits(document["tileAvailability"], tile_count),
            bits(document["contentAvailability"][0], tile_count),
            bits(document["childSubtreeAvailability"], child_count))


def glb_facts(data: bytes) -> tuple[int, int, int]:
    """Features (the property table's count), vertices and triangles of a GLB."""
    if data[:4] != b"glTF":
        raise RuntimeError("not a GLB")
    length = struct.unpack_from("<I", data, 12)[0]
    document = json.loads(data[20:20 + length])
    tables = document.get("extensions", {}).get("EXT_structural_metadata", {}).get(
        "propertyTables", [{}])
    vertices = triangles = 0
    for mesh in document.get("meshes", []):
        for primitive in mesh["primitives"]:
            vertices += document["accessors"][primitive["attributes"]["POSITION"]]["count"]
            if "indices" in primitive:
                triangles += document["accessors"][primitive["indices"]]["count"] // 3
    return int(tables[0].get("count", 0)), vertices, triangles


def _connect(base: str) -> HttpConnection:
    host, port = base.removeprefix("http://").split(":")
    return HttpConnection(host, int(port), "identity")


async def walk(base: str, concurrency: int) -> WalkResult:
    """tileset.json, then every subtree and every available content tile, ``concurrency``
    requests in flight, breadth first as the subtrees name them."""
    first = _connect(base)
    started = time.perf_counter()
    status, body = await first.get(f"{BASE}/tileset.json?cim={CIM}")
    if status != 200:
        raise RuntimeError(f"tileset.json: {status} {body[:300]!r}")
    tileset = json.loads(body)
    result = WalkResult(0.0, tileset_bytes=len(body))
    implicit = next(t for t in tileset["root"]["children"] if "implicitTiling" in t)
    scheme = implicit["implicitTiling"]
    levels, subtree_levels = scheme["availableLevels"], scheme["subtreeLevels"]
    templates = {"subtree": f"{BASE}/" + scheme["subtrees"]["uri"].removeprefix("./"),
                 "content": f"{BASE}/" + implicit["content"]["uri"].removeprefix("./")}
    layout = subtree_tiles(subtree_levels)
    queue: asyncio.Queue[tuple[str, int, int, int]] = asyncio.Queue()
    queue.put_nowait(("subtree", 0, 0, 0))
    failures: list[str] = []

    async def client(connection: HttpConnection) -> None:
        while True:
            kind, level, x, y = await queue.get()
            try:
                path = templates[kind].format(level=level, x=x, y=y)
                sent = time.perf_counter()
                status, body = await connection.get(path)
                fetch = Fetch(kind, level, x, y, time.perf_counter() - sent, len(body))
                if status != 200:
                    failures.append(f"{path}: {status} {body[:200]!r}")
                    continue
                result.fetches.append(fetch)
                if kind == "content":
                    fetch.buildings, fetch.vertices, fetch.triangles = glb_facts(body)
                    continue
                tiles, content, children = decode_subtree(body, len(layout),
                                                          4**subtree_levels)
                for k in np.flatnonzero(content):
                    depth, dx, dy = layout[k]
                    if level + depth < levels:
                        queue.put_nowait(("content", level + depth, (x << depth) + dx,
                                          (y << depth) + dy))
                for k in np.flatnonzero(children):
                    dx, dy = morton_xy(int(k))
                    queue.put_nowait(("subtree", level + subtree_levels,
                                      (x << subtree_levels) + dx, (y << subtree_levels) + dy))
            except Exception as error:  # noqa: BLE001 - reported, the walk goes on
                failures.append(f"{kind} {level}/{x}/{y}: {error!r}")
            finally:
                queue.task_done()

    connections = [first] + [_connect(base) for _ in range(concurrency - 1)]
    tasks = [asyncio.create_task(client(c)) for c in connections]
    try:
        await queue.join()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for connection in connections:
            await connection.close()
    result.seconds = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{len(failures)} failed requests, e.g. " + "; ".join(failures[:5]))
    return result


async def one_at_a_time(base: str, fetches: list[Fetch]) -> list[float]:
    """Each content tile again, one request at a time (latency in seconds); between two
    requests the client gzips the body (level 6) into ``gzip_size``, off the clock."""
    connection = _connect(base)
    out = []
    try:
        for fetch in fetches:
            path = f"{BASE}/content/{fetch.level}/{fetch.x}/{fetch.y}.glb?cim={CIM}"
            sent = time.perf_counter()
            status, body = await connection.get(path)
            out.append(time.perf_counter() - sent)
            if status != 200:
                raise RuntimeError(f"{path}: {status} {body[:200]!r}")
            fetch.gzip_size = len(gzip.compress(body, 6))
    finally:
        await connection.close()
    return out


def twin_server(url: str, workers: int):
    env = {**os.environ, "TWIN_DATABASE_URL": url, "TWIN_TILES_CACHE": "false",
           "TWIN_WORKERS": str(workers)}
    env.setdefault("TWIN_AUTH_ANONYMOUS_ROLE", "viewer")
    argv = [sys.executable, "-m", "uvicorn", "twin.api.app:create_app", "--factory",
            "--workers", str(workers)]
    return serving("twin", argv, env, "/healthz", ROOT)


class CpuSampler:
    """CPU seconds of the whole machine (from /proc/stat) over a block: who is busy."""

    def __enter__(self) -> CpuSampler:
        self.before = self._read()
        return self

    def __exit__(self, *_) -> None:
        self.after = self._read()

    @staticmethod
    def _read() -> tuple[float, float]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        ticks = os.sysconf("SC_CLK_TCK")
        idle = fields[3] + fields[4]
        return (sum(fields) - idle) / ticks, sum(fields) / ticks

    @property
    def busy_s(self) -> float:
        return self.after[0] - self.before[0]

    @property
    def busy_share(self) -> float:
        busy = self.after[0] - self.before[0]
        total = self.after[1] - self.before[1]
        return busy / total if total else float("nan")


# --- the same solids for py3dtiles --------------------------------------------------------

async def _registry_dems(url: str):
    from sqlalchemy.ext.asyncio import create_async_engine

    from tiles import dem
    from twin.core.layer import LayerRegistry

    engine = create_async_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        async with engine.connect() as conn:
            registry = await LayerRegistry.load(conn)
    finally:
        await engine.dispose()
    layer = registry.get("buildings")
    terrain = registry.get(Settings().tiles.terrain_3d)
    return layer, (dem.dem_stack(registry, terrain) if dem.is_dem(terrain) else [])


def drawn_where(layer) -> str:
    """The rows the CIM2 tileset draws (tiles/buildings3d.py: the layer's rows of CIM >= 2;
    no model replaces a block when no model grade is selected)."""
    return f"({layer.where}) AND b.cim_level >= 2"


def build_solids(url: str, rebuild: bool) -> dict:
    """``bench_tiles3d_solids``: twin's LOD1 blocks as SFCGAL solids in ECEF, made once."""
    from tiles import dem

    layer, dems = asyncio.run(_registry_dems(url))
    where = drawn_where(layer)
    with psycopg.connect(url, autocommit=True) as conn:
        drawn = conn.execute(f'SELECT count(*) FROM "{layer.source_table}" AS b '
                             f"WHERE {where}").fetchone()[0]
        exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL",
                              (SOLIDS_TABLE,)).fetchone()[0]
        if exists and not rebuild:
            held = conn.execute(f"SELECT count(*) FROM {SOLIDS_TABLE}").fetchone()[0]
            if held == drawn:
                print(f"{SOLIDS_TABLE}: {held:,} solids already built (--rebuild-solids to "
                      "make them again)")
                return {"buildings": held, "seconds": None, "reused": True}
        started = time.perf_counter()
        conn.execute("CREATE EXTENSION IF NOT EXISTS postgis_sfcgal")
        rows = conn.execute(f"""
            SELECT b.id, ST_AsBinary(ST_ExteriorRing(b.geom)), b.height_m, b.base_height
              FROM "{layer.source_table}" AS b WHERE {where} ORDER BY b.id""").fetchall()
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        rings = shapely.from_wkb(np.array([bytes(r[1]) for r in rows], dtype=object))
        height = np.array([r[2] for r in rows], dtype=np.float64)
        podium = np.array([r[3] or 0.0 for r in rows], dtype=np.float64)
        # tiles/buildings3d.py's ground_under: the lowest DEM height under the corners.
        coords, index = shapely.get_coordinates(rings, return_index=True)
        heights = dem.ground_heights(dems, coords[:, 0], coords[:, 1])
        heights = np.where(np.isnan(heights), np.inf, heights)
        ground = np.full(len(rows), np.inf)
        np.minimum.at(ground, index, heights)
        ground = np.where(np.isfinite(ground), ground, 0.0)
        bottom = np.where(podium > 0, ground + podium, ground - FOUNDATION_M)
        top = ground + height
        conn.execute(f"DROP TABLE IF EXISTS {SOLIDS_TABLE}")
        conn.execute("CREATE TEMP TABLE bench_tiles3d_levels (id bigint, bottom float8, "
                     "top float8)")
        with conn.cursor().copy("COPY bench_tiles3d_levels FROM STDIN") as copy:
            for row in zip(ids.tolist(), bottom.tolist(), top.tolist(), strict=True):
                copy.write_row(row)
        conn.execute(f"""
            CREATE TABLE {SOLIDS_TABLE} AS
            SELECT b.id,
                   ST_Transform(ST_SetSRID(ST_Extrude(ST_Force3D(b.geom, l.bottom),
                                                      0, 0, l.top - l.bottom), 4979),
                                4978)::geometry(PolyhedralSurfaceZ, 4978) AS geom
              FROM "{layer.source_table}" AS b JOIN bench_tiles3d_levels AS l USING (id)""")
        conn.execute(f"ALTER TABLE {SOLIDS_TABLE} ADD PRIMARY KEY (id)")
        conn.execute(f"ANALYZE {SOLIDS_TABLE}")
        seconds = time.perf_counter() - started
        built = conn.execute(f"SELECT count(*) FROM {SOLIDS_TABLE}").fetchone()[0]
    print(f"{SOLIDS_TABLE}: {built:,} solids built with ST_Extrude in {seconds:.1f} s")
    return {"buildings": built, "seconds": seconds, "reused": False}


def ensure_py3dtiles() -> Path:
    """py3dtiles in its own virtualenv, installed from PyPI on first use."""
    python = PY3DTILES_VENV / "bin" / "python"
    if not python.exists():
        print(f"installing py3dtiles into {PY3DTILES_VENV} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(PY3DTILES_VENV)], check=True)
    probe = subprocess.run([str(python), "-c", "import py3dtiles.export, psycopg2"],
                           capture_output=True)
    if probe.returncode != 0:
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PY3DTILES_REQUIREMENTS],
                       check=True)
    return PY3DTILES_VENV / "bin" / "py3dtiles"


def run_py3dtiles(url: str, timeout: float) -> dict:
    """``py3dtiles export`` of the solids table into a scratch folder, timed end to end,
    its phases timed by the lines it prints."""
    command = ensure_py3dtiles()
    version = subprocess.run([str(PY3DTILES_VENV / "bin" / "python"), "-c",
                              "import importlib.metadata as m; print(m.version('py3dtiles'))"],
                             capture_output=True, text=True).stdout.strip()
    out_dir = Path(tempfile.mkdtemp(prefix="bench-py3dtiles-"))
    # The password in the environment, not on a command line others can read.
    parts = psycopg.conninfo.conninfo_to_dict(url)
    password = str(parts.pop("password", "") or "")
    conninfo = " ".join(f"{key}={value}" for key, value in parts.items())
    argv = [str(command), "export", "-D", conninfo, "-t", SOLIDS_TABLE, "-c", "geom",
            "-i", "id", "-s", str(out_dir)]
    print(f"py3dtiles {version}: {' '.join(argv[:2])} -D '{conninfo}' {' '.join(argv[4:])}")
    phases: list[tuple[str, float]] = []
    started = time.perf_counter()
    # Unbuffered: each line it prints is stamped when it is printed.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PGPASSWORD": password}
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, cwd=out_dir, env=env)
    log: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            phases.append((line.strip(), time.perf_counter() - started))
            log.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    finished = True
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        finished = False
        process.kill()
        process.wait()
    seconds = time.perf_counter() - started
    reader.join(timeout=5)
    tiles = sorted((out_dir / "tiles").glob("*.b3dm")) if (out_dir / "tiles").exists() else []
    sizes = [path.stat().st_size for path in tiles]
    gzipped = [len(gzip.compress(path.read_bytes(), 6)) for path in tiles]
    result = {
        "version": version, "finished": finished, "returncode": process.returncode,
        "seconds": seconds, "timeout_s": timeout,
        "phases": [{"line": line, "at_s": round(at, 2)} for line, at in phases if line],
        "tiles": len(tiles), "content_bytes": sum(sizes), "content_gzip_bytes": sum(gzipped),
        "tileset_bytes": (out_dir / "tileset.json").stat().st_size
        if (out_dir / "tileset.json").exists() else 0,
        "output": str(out_dir),
    }
    if finished and process.returncode != 0:
        print("".join(log[-20:]))
    if not finished:
        shutil.rmtree(out_dir, ignore_errors=True)
    return result


# --- where the time goes ------------------------------------------------------------------

def profile_tiles(url: str, fetches: list[Fetch], top: int) -> str:
    """The ``top`` slowest and the ``top`` largest content tiles of the walk rebuilt
    in-process, one at a time, as
    the server builds them with its caches cold: the placement of the tile's subtree
    (``buildings3d.boxes_in`` + ``implicit.place``: which buildings it holds), the rows
    (``buildings3d.fetch_rows``), the GLB (``buildings3d.content``); cProfile around the
    placement and around the content, separately."""
    from sqlalchemy.ext.asyncio import create_async_engine

    from tiles import buildings3d, implicit
    from twin.core.principal import Scope

    slowest = sorted(fetches, key=lambda f: f.seconds, reverse=True)[:top]
    largest = sorted(fetches, key=lambda f: f.buildings, reverse=True)[:top]
    slow = slowest + [f for f in largest if f not in slowest]
    layer, dems = asyncio.run(_registry_dems(url))
    grades = buildings3d.Grades.parse(CIM)
    placing_profile, content_profile = cProfile.Profile(), cProfile.Profile()

    async def rows_of(fetch: Fetch):
        engine = create_async_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
        try:
            async with engine.connect() as conn:
                tile = implicit.TileId(fetch.level, fetch.x, fetch.y)
                root = tile.subtree_root
                sent = time.perf_counter()
                placing_profile.enable()
                ids, boxes = await buildings3d.boxes_in(conn, layer, Scope(), grades, (),
                                                        root.bounds())
                placement = implicit.place(root, ids, boxes[:, 0], boxes[:, 1], boxes[:, 2],
                                           boxes[:, 3])
                placing_profile.disable()
                placed = time.perf_counter()
                rows = await buildings3d.fetch_rows(
                    conn, layer, placement.ids[placement.holds(tile)].tolist())
                fetched = time.perf_counter()
        finally:
            await engine.dispose()
        return rows, placed - sent, fetched - placed

    lines = [f"{'tile':<12} {'subtree':<10} {'buildings':>9} {'walk ms':>8} "
             f"{'placement ms':>12} {'rows ms':>8} {'content ms':>10}"]
    buildings3d.content(asyncio.run(rows_of(slow[0]))[0], grades, dems)  # DEMs read once
    for fetch in slow:
        rows, placing, fetching = asyncio.run(rows_of(fetch))
        sent = time.perf_counter()
        content_profile.enable()
        buildings3d.content(rows, grades, dems)
        content_profile.disable()
        building = time.perf_counter() - sent
        root = implicit.TileId(fetch.level, fetch.x, fetch.y).subtree_root
        lines.append(f"{f'{fetch.level}/{fetch.x}/{fetch.y}':<12} "
                     f"{f'{root.level}/{root.x}/{root.y}':<10} {len(rows):9d} "
                     f"{fetch.seconds * 1000:8.0f} {placing * 1000:12.1f} "
                     f"{fetching * 1000:8.1f} {building * 1000:10.1f}")
    out = ["\n".join(lines)]
    for title, profile in (("the placements (boxes_in + place)", placing_profile),
                           ("buildings3d.content", content_profile)):
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(12)
        body = [line for line in text.getvalue().splitlines()[4:] if line.strip()]
        out.append(f"cProfile of {title}, by own time:\n" + "\n".join(body))
    return "\n\n".join(out)


# --- report -------------------------------------------------------------------------------

def met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", help="a database holding the full sample city "
                        "(default: twin's managed cluster, prepared if needed)")
    parser.add_argument("--workers", type=int, default=2, help="twin's uvicorn workers")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--py3dtiles-timeout", type=float, default=1200.0,
                        help="seconds py3dtiles' export may run")
    parser.add_argument("--no-py3dtiles", action="store_true")
    parser.add_argument("--rebuild-solids", action="store_true")
    parser.add_argument("--profile", type=int, default=0,
                        help="profile the N slowest cold tiles (always 5 when a target "
                             "is missed)")
    parser.add_argument("--json", help="also write the results (JSON) to this file")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    settings = Settings()
    if args.database_url:
        url = args.database_url
        require(url, "full")
    elif settings.managed:
        url = prepare(settings, "full")
    else:
        url = libpq_or_exit(settings)
        require(url, "full")
    url = url.replace("postgresql+psycopg://", "postgresql://", 1)
    buildings = require_buildings_3d(url, "full")
    print(f"{buildings:,} buildings; twin: {args.workers} worker(s), cache off; "
          f"{args.concurrency} requests in flight; {os.cpu_count()} CPUs")

    summary: dict = {"command": "benchmarks/tiles3d.py " + " ".join(sys.argv[1:]),
                     "buildings": buildings, "workers": args.workers,
                     "concurrency": args.concurrency, "cpus": os.cpu_count()}
    with twin_server(url, args.workers) as base:
        server_before, client_before = server_cpu_s(base), time.process_time()
        with CpuSampler() as cpu:
            result = uvloop.run(walk(base, args.concurrency))
        server_cpu = server_cpu_s(base) - server_before
        client_cpu = time.process_time() - client_before
        content = result.of("content")
        subtrees = result.of("subtree")
        walk_ms = [f.seconds * 1000 for f in content]
        cold_set = [f for f in content if f.buildings <= COLD_TILE_MAX_BUILDINGS]
        cold_ms = [s * 1000 for s in uvloop.run(one_at_a_time(base, cold_set))]
        all_one_ms = [s * 1000 for s in uvloop.run(one_at_a_time(
            base, [f for f in content if f.buildings > COLD_TILE_MAX_BUILDINGS]))]
        # The walk again on the same server: the tile cache is still off, but each worker
        # now holds the subtrees' placements (its small LRU of which building goes where).
        again = uvloop.run(walk(base, args.concurrency))
    drawn = sum(f.buildings for f in content)
    content_bytes = sum(f.size for f in content)
    gzip_bytes = sum(f.gzip_size for f in content)
    subtree_bytes = sum(f.size for f in subtrees)
    per_building = content_bytes / drawn
    per_building_gzip = gzip_bytes / drawn
    levels = Counter(f.level for f in content)
    cold_p95 = percentile(cold_ms, 95)
    twin = {
        "wall_s": result.seconds, "subtrees": len(subtrees), "content_tiles": len(content),
        "tiles_by_level": dict(sorted(levels.items())),
        "buildings_in_content": drawn,
        "buildings_per_tile": {"max": max(f.buildings for f in content),
                               "median": statistics.median(f.buildings for f in content)},
        "walk_latency_ms": {
            "content_p50": percentile(walk_ms, 50), "content_p95": percentile(walk_ms, 95),
            "content_p99": percentile(walk_ms, 99), "content_max": max(walk_ms),
            "subtree_p50": percentile([f.seconds * 1000 for f in subtrees], 50),
            "subtree_max": max(f.seconds * 1000 for f in subtrees)},
        "cold_one_at_a_time_ms": {
            "tiles": len(cold_ms), "p50": percentile(cold_ms, 50),
            "p95": cold_p95, "max": max(cold_ms), "sum_s": sum(cold_ms) / 1000,
            "over_1000_buildings": {"tiles": len(all_one_ms),
                                    "max": max(all_one_ms, default=float("nan"))}},
        "second_walk_s": again.seconds,
        "second_walk_content_p95_ms": percentile([f.seconds * 1000 for f in
                                                  again.of("content")], 95),
        "machine_busy_share": cpu.busy_share, "machine_busy_cpu_s": cpu.busy_s,
        "twin_cpu_s": server_cpu, "client_cpu_s": client_cpu,
        "content_bytes": content_bytes, "content_gzip_bytes": gzip_bytes,
        "subtree_bytes": subtree_bytes, "tileset_bytes": result.tileset_bytes,
        "bytes_per_building": per_building, "gzip_bytes_per_building": per_building_gzip,
        "vertices_per_building": sum(f.vertices for f in content) / drawn,
        "triangles_per_building": sum(f.triangles for f in content) / drawn,
    }
    summary["twin"] = twin
    if drawn != buildings:
        print(f"WARNING: the content holds {drawn:,} buildings, the table {buildings:,}")
    targets = {
        "whole tileset <= 10 s": (result.seconds <= TARGET_WALL_S, f"{result.seconds:.2f} s"),
        "cold tile p95 <= 150 ms": (cold_p95 <= TARGET_COLD_P95_MS, f"{cold_p95:.1f} ms"),
        "<= 1.5 KB per LOD1 building": (per_building <= TARGET_BYTES_PER_BUILDING,
                                        f"{per_building:,.0f} B"),
    }
    py3dtiles = None
    if not args.no_py3dtiles:
        summary["solids"] = build_solids(url, args.rebuild_solids)
        py3dtiles = run_py3dtiles(url, args.py3dtiles_timeout)
        summary["py3dtiles"] = py3dtiles
        ratio = py3dtiles["seconds"] / result.seconds
        bound = "" if py3dtiles["finished"] else ">= "
        solids_s = summary["solids"]["seconds"]
        summary["ratio"] = {"value": ratio, "lower_bound": not py3dtiles["finished"],
                            "with_solids_build": (py3dtiles["seconds"] + solids_s)
                            / result.seconds if solids_s else None}
        targets["twin >= 5x faster than py3dtiles"] = (ratio >= TARGET_RATIO,
                                                       f"{bound}{ratio:.1f}x")

    print_table(twin, py3dtiles, targets)
    summary["targets"] = {name: {"met": ok, "value": value}
                          for name, (ok, value) in targets.items()}
    missed = [name for name, (ok, _) in targets.items() if not ok]
    top = args.profile or (5 if any(not targets[name][0] for name in list(targets)[:2]) else 0)
    if top:
        text = profile_tiles(url, content, top)
        print("\nwhere the time goes (the slowest and the largest tiles of the walk, rebuilt "
              "in-process):")
        print(text)
        summary["profile"] = text
    text = json.dumps(summary, indent=1, default=str)
    print("\n" + text)
    if args.json:
        Path(args.json).write_text(text)
    print("\n" + (f"MISSED: {', '.join(missed)}" if missed else "every target met"))


def print_table(twin: dict, py3dtiles: dict | None, targets: dict) -> None:
    walk, cold = twin["walk_latency_ms"], twin["cold_one_at_a_time_ms"]
    print(f"""
CIM2 (LOD1) tileset of {twin['buildings_in_content']:,} buildings, cache off
  whole tileset (walk)         {twin['wall_s']:8.2f} s   {twin['subtrees']} subtrees, \
{twin['content_tiles']} content tiles (levels {twin['tiles_by_level']})
  per content tile in the walk  p50 {walk['content_p50']:.1f} ms, p95 {walk['content_p95']:.1f} \
ms, p99 {walk['content_p99']:.1f} ms, max {walk['content_max']:.1f} ms; subtrees p50 \
{walk['subtree_p50']:.1f} ms, max {walk['subtree_max']:.1f} ms
  the walk again, same server   {twin['second_walk_s']:8.2f} s (cache still off; the workers \
hold the subtrees' placements now), content p95 {twin['second_walk_content_p95_ms']:.0f} ms
  CPU during the walk           machine {twin['machine_busy_cpu_s']:.1f} s \
({twin['machine_busy_share']:.0%} busy), twin's processes {twin['twin_cpu_s']:.1f} s, this \
client {twin['client_cpu_s']:.1f} s, the rest (PostgreSQL, anything else running) \
{twin['machine_busy_cpu_s'] - twin['twin_cpu_s'] - twin['client_cpu_s']:.1f} s
  cold tiles <= {COLD_TILE_MAX_BUILDINGS:,} buildings    {cold['tiles']} tiles one at a time: \
p50 {cold['p50']:.1f} ms, p95 {cold['p95']:.1f} ms, max {cold['max']:.1f} ms \
(larger: {cold['over_1000_buildings']['tiles']} tiles, max \
{cold['over_1000_buildings']['max']:.1f} ms)
  content bytes                 {twin['content_bytes'] / 1e6:.2f} MB \
({twin['bytes_per_building']:,.0f} B a building), gzip {twin['content_gzip_bytes'] / 1e6:.2f} \
MB ({twin['gzip_bytes_per_building']:,.0f} B a building); {twin['vertices_per_building']:.1f} \
vertices, {twin['triangles_per_building']:.1f} triangles a building""")
    if py3dtiles is not None:
        state = "finished" if py3dtiles["finished"] else \
            f"did NOT finish within {py3dtiles['timeout_s']:.0f} s"
        print(f"""
py3dtiles {py3dtiles['version']} export of the same solids: {state}
  end to end                    {py3dtiles['seconds']:8.1f} s (exit {py3dtiles['returncode']})
  phases                        {'; '.join(f"{p['line']} at {p['at_s']} s"
                                           for p in py3dtiles['phases'][:6])}
  content                       {py3dtiles['tiles']} b3dm, \
{py3dtiles['content_bytes'] / 1e6:.2f} MB, gzip {py3dtiles['content_gzip_bytes'] / 1e6:.2f} MB""")
    print(f"\n{'target':<36} {'measured':>14}  verdict")
    for name, (ok, value) in targets.items():
        print(f"{name:<36} {value:>14}  {met(ok)}")


if __name__ == "__main__":
    main()

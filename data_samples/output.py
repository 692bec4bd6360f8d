"""Writing the generated city as COPY-ready CSV files, one per table, plus a manifest.

Geometry goes out as hex EWKB with SRID 4326, which PostGIS reads straight from COPY.
Floats are written with ``repr`` precision so the output is byte-for-byte deterministic.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import geopandas as gpd
import pandas as pd
import shapely

MANIFEST = "manifest.json"

# Load order: every table after the tables its foreign keys point to.
TABLE_ORDER = (
    "sectors",
    "admin_units",
    "emergency_plans",
    "risk_points",
    "response_teams",
    "team_jurisdictions",
    "supply_depots",
    "depot_stock",
    "road_nodes",
    "road_edges",
    "pipe_nodes",
    "pipe_segments",
    "sensors",
    "sensor_readings",
    "hazard_sources",
    "buildings",
)



def write_table(out_dir: Path, table: str, frame: pd.DataFrame) -> Path:
    """Write ``frame`` (its columns named as the table's) to ``out_dir/<table>.csv``."""
    out = frame.copy()
    if isinstance(frame, gpd.GeoDataFrame):
        geoms = shapely.set_srid(frame.geometry.values, 4326)
        out = pd.DataFrame(out.drop(columns=frame.geometry.name))
        out["geom"] = shapely.to_wkb(geoms, hex=True, include_srid=True)
    path = out_dir / f"{table}.csv"
    out.to_csv(path, index=False, lineterminator="\n")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(out_dir: Path, scale: str, seed: int, tables: dict[str, int]) -> dict:
    """Record every file's hash and row count; the loader checks files against it."""
    files = sorted(p for p in out_dir.iterdir() if p.name != MANIFEST and p.is_file())
    manifest = {
        "scale": scale,
        "seed": seed,
        "tables": tables,
        "files": {p.name: file_sha256(p) for p in files},
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(out_dir: Path) -> dict:
    return json.loads((out_dir / MANIFEST).read_text())

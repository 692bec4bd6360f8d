"""Septic tanks and sewers watched for gas, liquid level and temperature (化粪池, 污水井).

Each sits a few tens of metres from the drainage network and is attached to its nearest
drainage node, where its gas and level would show first.
"""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from scipy.spatial import cKDTree

from data_samples.geodesy import to_local, to_lonlat
from data_samples.pipes import PipeNetwork
from data_samples.places import Gazetteer

SEPTIC_SHARE = 0.65
OFFSET_RANGE_M = (15.0, 80.0)
ESTATES = ("小区", "花园", "新村", "家园", "名苑", "公寓")
# Methane alarms at a fraction of the lower explosive limit (5 % by volume = 50,000 ppm):
# 10 % LEL for septic tanks, 5 % LEL in sewers, where people go down to work.
GAS_THRESHOLD_PPM = {"septic_tank": (5_000.0, 2_500.0), "sewer": (2_500.0, 1_000.0)}
TEMP_THRESHOLD_C = {"septic_tank": (45.0, 50.0), "sewer": (35.0, 40.0)}


def _numbered(stems: list[str], suffix: str) -> list[str]:
    """观音桥小区1号化粪池, 观音桥小区2号化粪池 ... numbered within each stem."""
    seen: dict[str, int] = {}
    names = []
    for stem in stems:
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}{seen[stem]}号{suffix}")
    return names


def build_hazards(drainage: PipeNetwork, count: int, rng: np.random.Generator) -> gpd.GeoDataFrame:
    """Hazard sources near the drainage network; ``node_id`` is the drainage node's index + 1."""
    nx, ny = to_local(drainage.lon, drainage.lat)
    near = rng.integers(0, drainage.lon.size, size=count)
    angle = rng.uniform(0.0, 2 * np.pi, count)
    distance = rng.uniform(*OFFSET_RANGE_M, count)
    x, y = nx[near] + distance * np.cos(angle), ny[near] + distance * np.sin(angle)
    _, node = cKDTree(np.column_stack([nx, ny])).query(np.column_stack([x, y]))

    kind = np.where(rng.random(count) < SEPTIC_SHARE, "septic_tank", "sewer")
    septic = kind == "septic_tank"
    place = Gazetteer().nearest(x, y)
    estate = np.array(ESTATES)[rng.integers(0, len(ESTATES), count)]
    names = np.empty(count, dtype=object)
    names[septic] = _numbered([p + e for p, e in zip(place[septic], estate[septic],
                                                      strict=True)], "化粪池")
    names[~septic] = _numbered([p + "污水干管" for p in place[~septic]], "检查井")

    pick = rng.random(count) < 0.7
    gas = np.where(pick, [GAS_THRESHOLD_PPM[k][0] for k in kind],
                   [GAS_THRESHOLD_PPM[k][1] for k in kind])
    temp = np.where(pick, [TEMP_THRESHOLD_C[k][0] for k in kind],
                    [TEMP_THRESHOLD_C[k][1] for k in kind])
    # Alarm when the liquid comes within reach of the inlet: ~80 % of the tank's depth, or
    # ~70 % of the manhole's depth for a sewer.
    manhole_depth = (drainage.ground_mm[node] - drainage.invert_mm[node]) / 1000.0
    level = np.where(septic, rng.uniform(2.0, 3.5, count) * 0.8, manhole_depth * 0.7)
    lon, lat = to_lonlat(x, y)
    return gpd.GeoDataFrame({
        "id": np.arange(1, count + 1, dtype=np.int64),
        "code": [f"HZ-{k:05d}" for k in range(1, count + 1)],
        "kind": kind.astype(object),
        "name": names,
        "node_id": pd.array(node + 1, dtype="Int64"),
        "gas_threshold_ppm": gas,
        "level_threshold_m": np.round(level, 2),
        "temp_threshold_c": temp,
    }, geometry=shapely.points(lon, lat), crs="EPSG:4326")

"""Building footprints in the blocks between the central streets.

Each block of the street grid (four corner nodes joined by four streets) is set back from its
streets and filled with lots; a rectangle in a lot, turned to the block's own street, is a
building, so no building crosses a street. Blocks on the rivers and on the ridge tops (forest
parks) stay empty. Density, use and height fall off from the centre: towers up to ~300 m in
Yuzhong and Jiangbei, 6-30 floors typical, low-rise and industry at the edge.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from scipy.spatial import cKDTree

from data_samples.geodesy import to_local, to_lonlat
from data_samples.places import Gazetteer
from data_samples.roads import RoadNetwork, river_lines_local
from data_samples.scales import CITY_CENTRE
from data_samples.terrain import RIVERS, Terrain

log = logging.getLogger(__name__)

SETBACK_M = 12.0
RIDGE_TOP_M = 480.0
SURPLUS = 1.4
# Footprint edges are at most this share of the lot pitch, and centres move by at most
# JITTER of it, so neighbouring buildings never touch.
FILL = 0.75
JITTER = 0.08
DENSITY_KM = 8.0
KEY_AREA_KM = 2.5
ROOF_SEED = 130003
TOWER_DISTRICTS = ("500103", "500105")  # Yuzhong, Jiangbei

USES = ("residential", "commercial", "office", "industrial", "public", "school", "hospital")
# Share of each use in the centre (< 3 km), the inner city (< 10 km) and the edge.
USE_MIX = np.array([
    [0.40, 0.24, 0.22, 0.02, 0.06, 0.04, 0.02],
    [0.62, 0.12, 0.08, 0.05, 0.06, 0.05, 0.02],
    [0.55, 0.07, 0.03, 0.23, 0.05, 0.05, 0.02],
])
RING_KM = (3.0, 10.0)
# Footprint width and depth ranges (m).
FOOTPRINT_M = {
    "residential": ((18, 30), (14, 60)), "commercial": ((30, 80), (30, 60)),
    "office": ((25, 45), (25, 45)), "industrial": ((40, 120), (30, 80)),
    "public": ((25, 60), (25, 50)), "school": ((20, 40), (50, 90)),
    "hospital": ((30, 60), (40, 80)),
}

# Important facilities, named and modelled in detail (CIM 5-6): name, lon, lat, use, CIM, m.
LANDMARKS = (
    ("重庆北站", 106.551, 29.607, "public", 6, 30.0),
    ("沙坪坝站", 106.457, 29.559, "public", 6, 42.0),
    ("重庆西站", 106.429, 29.497, "public", 6, 36.0),
    ("重庆站", 106.546, 29.548, "public", 6, 24.0),
    ("重庆江北国际机场T3航站楼", 106.646, 29.728, "public", 6, 40.0),
    ("重庆医科大学附属第一医院", 106.514, 29.539, "hospital", 6, 96.0),
    ("陆军军医大学第一附属医院", 106.459, 29.546, "hospital", 6, 84.0),
    ("重庆市急救医疗中心", 106.532, 29.556, "hospital", 6, 60.0),
    ("重庆大剧院", 106.584, 29.573, "public", 5, 64.0),
    ("重庆奥林匹克体育中心", 106.493, 29.527, "public", 5, 55.0),
    ("重庆市人民大礼堂", 106.553, 29.563, "public", 5, 65.0),
    ("重庆环球金融中心", 106.575, 29.560, "office", 5, 339.0),
    ("重庆来福士", 106.585, 29.567, "office", 5, 250.0),
)
LANDMARK_REACH_M = 800.0
PUBLIC_NAMED = 0.3

NAME_SUFFIXES = {
    "hospital": ("人民医院", "中医院", "妇幼保健院", "社区卫生服务中心", "第二人民医院"),
    "school": ("中学", "小学", "实验学校", "幼儿园", "外国语学校"),
    "public": ("文化馆", "体育馆", "图书馆", "街道办事处", "派出所", "社区服务中心"),
    "tower": ("国际金融中心", "环球中心", "大厦", "中心", "广场", "国际大厦"),
}


def _blocks(road: RoadNetwork) -> np.ndarray:
    """Corner node indices (n, 4) of grid cells enclosed by four streets."""
    grid = np.flatnonzero(road.on_grid)
    node_at = {(int(road.grid_i[n]), int(road.grid_j[n])): int(n) for n in grid}
    streets = road.in_core & ~road.bridge
    joined = set(zip(np.minimum(road.source[streets], road.target[streets]).tolist(),
                     np.maximum(road.source[streets], road.target[streets]).tolist(),
                     strict=True))
    corners = []
    for (i, j), a in sorted(node_at.items()):
        b, c, d = node_at.get((i + 1, j)), node_at.get((i + 1, j + 1)), node_at.get((i, j + 1))
        if b is None or c is None or d is None:
            continue
        ring = (a, b, c, d)
        if all((min(p, q), max(p, q)) in joined for p, q in zip(ring, ring[1:] + ring[:1],
                                                                 strict=True)):
            corners.append(ring)
    return np.array(corners, dtype=np.int64).reshape(-1, 4)


def _usable_blocks(road: RoadNetwork, corners: np.ndarray,
                   terrain: Terrain) -> tuple[np.ndarray, np.ndarray]:
    """Corner coordinates (local metres) of blocks off the rivers and the ridge tops, and
    the blocks' footprints less the setback."""
    xy = np.stack([road.x[corners], road.y[corners]], axis=-1)
    polygons = shapely.polygons(np.concatenate([xy, xy[:, :1]], axis=1))
    ok = shapely.is_valid(polygons) & (shapely.area(polygons) > 0)
    for river, line in zip(RIVERS, river_lines_local(), strict=True):
        ok &= ~shapely.intersects(polygons, line.buffer(river.half_width_m))
    centre = shapely.centroid(polygons)
    lon, lat = to_lonlat(shapely.get_x(centre), shapely.get_y(centre))
    ok &= terrain.ground(lon, lat) < RIDGE_TOP_M
    inset = shapely.buffer(polygons[ok], -SETBACK_M, join_style="mitre")
    keep = ~shapely.is_empty(inset) & (shapely.area(inset) > 0)
    return xy[ok][keep], inset[keep]


def _distance_km(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    cx, cy = to_local(*CITY_CENTRE)
    return np.hypot(x - float(cx), y - float(cy)) / 1000.0


def _ring(distance_km: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.array(RING_KM), distance_km)


@dataclass
class _Lots:
    """Candidate lots: each lot's block and its centre in the block's street frame (u, v)."""

    block: np.ndarray
    u: np.ndarray
    v: np.ndarray
    # Per block: the frame's origin corner, unit vectors along and across its first street,
    # and the lot size.
    origin: np.ndarray
    u_axis: np.ndarray
    v_axis: np.ndarray
    pitch: np.ndarray

    def to_xy(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Frame coordinates of each lot (rows) to local metres."""
        b = self.block if u.ndim == 1 else self.block[:, None]
        x = self.origin[b, 0] + u * self.u_axis[b, 0] + v * self.v_axis[b, 0]
        y = self.origin[b, 1] + u * self.u_axis[b, 1] + v * self.v_axis[b, 1]
        return x, y


def _lots(xy: np.ndarray, inset: np.ndarray, target: int, rng: np.random.Generator) -> _Lots:
    """A grid of lots over every block, denser near the centre, jittered a little."""
    origin = xy[:, 0]
    u_axis = xy[:, 1] - xy[:, 0]
    u_axis /= np.linalg.norm(u_axis, axis=1, keepdims=True)
    v_axis = np.column_stack([-u_axis[:, 1], u_axis[:, 0]])
    cx, cy = xy[:, :, 0].mean(axis=1), xy[:, :, 1].mean(axis=1)
    density = np.exp(-_distance_km(cx, cy) / DENSITY_KM) + 0.12
    area = shapely.area(inset)
    wanted = SURPLUS * target * density * area / np.sum(density * area)
    pitch = np.sqrt(area / np.maximum(wanted, 0.3))

    blocks, us, vs = [], [], []
    for b in range(len(inset)):
        ring = shapely.get_coordinates(inset[b]) - origin[b]
        u, v = ring @ u_axis[b], ring @ v_axis[b]
        cols = np.arange(u.min() + pitch[b] / 2, u.max(), pitch[b])
        rows = np.arange(v.min() + pitch[b] / 2, v.max(), pitch[b])
        gu, gv = np.meshgrid(cols, rows)
        blocks.append(np.full(gu.size, b))
        us.append(gu.ravel())
        vs.append(gv.ravel())
    block = np.concatenate(blocks)
    u = np.concatenate(us) + rng.uniform(-JITTER, JITTER, block.size) * pitch[block]
    v = np.concatenate(vs) + rng.uniform(-JITTER, JITTER, block.size) * pitch[block]
    return _Lots(block, u, v, origin, u_axis, v_axis, pitch)


def _uses(distance_km: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cumulative = np.cumsum(USE_MIX, axis=1)[_ring(distance_km)]
    roll = rng.random(distance_km.size)[:, None]
    return np.array(USES)[np.minimum((roll > cumulative).sum(axis=1), len(USES) - 1)]


def _footprints(lots: _Lots, use: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rectangles in local metres, turned to their block's street."""
    width, depth = np.empty(lots.block.size), np.empty(lots.block.size)
    for name, ((w0, w1), (d0, d1)) in FOOTPRINT_M.items():
        rows = use == name
        width[rows] = rng.uniform(w0, w1, rows.sum())
        depth[rows] = rng.uniform(d0, d1, rows.sum())
    cap = FILL * lots.pitch[lots.block]
    half_w, half_d = np.minimum(width, cap) / 2, np.minimum(depth, cap) / 2
    pu = lots.u[:, None] + np.array([-1, 1, 1, -1, -1])[None, :] * half_w[:, None]
    pv = lots.v[:, None] + np.array([-1, -1, 1, 1, -1])[None, :] * half_d[:, None]
    x, y = lots.to_xy(pu, pv)
    return shapely.polygons(np.stack([x, y], axis=-1))


def _heights(use: np.ndarray, distance_km: np.ndarray, district: np.ndarray,
             rng: np.random.Generator) -> np.ndarray:
    n = use.size
    ring = _ring(distance_km)
    beta = rng.beta(2.0, 3.0, n)
    height = np.empty(n)
    floors_low = np.array([18, 8, 3])[ring]
    floors_high = np.array([45, 34, 18])[ring]
    residential = np.round(floors_low + (floors_high - floors_low) * beta) * 3.0
    towers = np.isin(district, TOWER_DISTRICTS) & (distance_km < 4.0)
    office = np.where(towers, 60.0 + 240.0 * rng.beta(1.2, 4.0, n), 25.0 + 100.0 * beta)
    commercial = np.where(ring == 0, 15.0 + 120.0 * rng.beta(1.5, 4.0, n), 10.0 + 40.0 * beta)
    by_use = {
        "residential": residential, "office": office, "commercial": commercial,
        "industrial": 8.0 + 16.0 * beta, "public": 8.0 + 30.0 * beta,
        "school": 12.0 + 15.0 * beta, "hospital": 20.0 + 70.0 * beta,
    }
    for name, values in by_use.items():
        rows = use == name
        height[rows] = values[rows]
    return np.round(height + rng.uniform(0.0, 2.0, n), 1)


def _names(use: np.ndarray, height: np.ndarray, place: np.ndarray,
           rng: np.random.Generator) -> np.ndarray:
    """Names for notable buildings: hospitals, schools, some public buildings, towers.

    A name is the nearest place plus a kind of facility (观音桥小学); once a place has every
    kind, further buildings there stay unnamed, like most buildings.
    """
    names = np.full(use.size, None, dtype=object)
    group = np.where(height >= 150.0, "tower", use)
    notable = np.isin(group, list(NAME_SUFFIXES)) & ((group != "public") | (rng.random(use.size)
                                                                            < PUBLIC_NAMED))
    taken: set[str] = set()
    for k in np.flatnonzero(notable):
        suffixes = NAME_SUFFIXES[group[k]]
        for s in rng.permutation(len(suffixes)):
            name = f"{place[k]}{suffixes[s]}"
            if name not in taken:
                taken.add(name)
                names[k] = name
                break
    return names


def _roof_types(use: np.ndarray, height: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """CIM3 roof forms: towers, shops and offices are flat; low homes mostly gable or hip;
    sheds gable; schools and public halls often hip.

    Drawn from a generator of their own, so adding roofs changed no other sample value.
    """
    draw = rng.random(use.size)
    roof = np.full(use.size, "flat", dtype=object)
    low = height <= 24.0
    homes = low & (use == "residential")
    roof[homes & (draw < 0.45)] = "gable"
    roof[homes & (draw >= 0.45) & (draw < 0.75)] = "hip"
    roof[(use == "industrial") & (draw < 0.7)] = "gable"
    halls = low & np.isin(use, ("school", "public"))
    roof[halls & (draw < 0.5)] = "hip"
    roof[halls & (draw >= 0.5) & (draw < 0.7)] = "gable"
    return roof


def _districts_of(lon: np.ndarray, lat: np.ndarray, districts: gpd.GeoDataFrame) -> np.ndarray:
    """District adcode containing each point (the nearest district if none does)."""
    units = districts[districts["kind"] != "municipality"][["adcode", "geometry"]]
    points = gpd.GeoDataFrame({"k": np.arange(lon.size)}, geometry=shapely.points(lon, lat),
                              crs="EPSG:4326")
    joined = gpd.sjoin(points, units, predicate="within", how="left")
    joined = joined[~joined.index.duplicated(keep="first")].sort_index()
    code = joined["adcode"].to_numpy(dtype=object)
    missing = pd.isna(code)
    if missing.any():
        local = units.to_crs("EPSG:32648")
        lost = points[missing].to_crs("EPSG:32648")
        nearest = gpd.sjoin_nearest(lost, local, how="left")
        nearest = nearest[~nearest.index.duplicated(keep="first")]
        code[missing] = nearest["adcode"].to_numpy(dtype=object)
    return code


def build_buildings(road: RoadNetwork, terrain: Terrain, districts: gpd.GeoDataFrame,
                    target: int, rng: np.random.Generator) -> gpd.GeoDataFrame:
    xy, inset = _usable_blocks(road, _blocks(road), terrain)
    lots = _lots(xy, inset, target, rng)
    centre_x, centre_y = lots.to_xy(lots.u, lots.v)
    use = _uses(_distance_km(centre_x, centre_y), rng)
    shapes = _footprints(lots, use, rng)
    fits = shapely.contains(inset[lots.block], shapes)
    expressways = road.road_class == "expressway"
    lines = shapely.linestrings(np.stack([
        np.column_stack([road.x[road.source[expressways]], road.y[road.source[expressways]]]),
        np.column_stack([road.x[road.target[expressways]], road.y[road.target[expressways]]]),
    ], axis=1))
    crossed = shapely.STRtree(lines).query(shapes, predicate="intersects")[0]
    fits[crossed] = False
    available = np.flatnonzero(fits)
    chosen = np.sort(rng.choice(available, size=min(target, available.size), replace=False))

    shapes, use = shapes[chosen], use[chosen]
    cx, cy = centre_x[chosen], centre_y[chosen]
    distance = _distance_km(cx, cy)
    lon, lat = to_lonlat(cx, cy)
    district = _districts_of(lon, lat, districts)
    height = _heights(use, distance, district, rng)
    names = _names(use, height, Gazetteer().nearest(cx, cy), rng)
    cim = np.where(rng.random(use.size) < 0.55, 2, 3)
    cim = np.where((distance < KEY_AREA_KM) | (height >= 200.0), 4, cim)
    # Named hospitals (one per place and kind) are important facilities.
    cim = np.where((use == "hospital") & pd.notna(names), 5, cim)
    use, cim = use.astype(object), cim.astype(np.int64)

    tree = cKDTree(np.column_stack([cx, cy]))
    for name, l_lon, l_lat, l_use, l_cim, l_height in LANDMARKS:
        lx, ly = to_local(l_lon, l_lat)
        distance_m, k = tree.query([float(lx), float(ly)])
        if distance_m <= LANDMARK_REACH_M and cim[k] < 6:
            names[k], use[k], cim[k], height[k] = name, l_use, l_cim, l_height

    roof = _roof_types(use, height, np.random.default_rng([ROOF_SEED, chosen.size]))
    geometry = shapely.transform(shapes, lambda pts: np.column_stack(to_lonlat(pts[:, 0],
                                                                               pts[:, 1])))
    log.info("buildings: %d of %d candidate lots in %d blocks", chosen.size, available.size,
             len(inset))
    return gpd.GeoDataFrame({
        "id": np.arange(1, chosen.size + 1, dtype=np.int64),
        "name": names,
        "use": use,
        "height_m": height,
        "floors": np.maximum(1, np.round(height / 3.0)).astype(np.int64),
        "cim_level": cim,
        "district_code": district,
        "roof_type": roof,
    }, geometry=geometry, crs="EPSG:4326")

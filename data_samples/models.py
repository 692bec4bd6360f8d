"""The sample city's CIM4-CIM6 models: GLB files made with trimesh, deterministic.

Three models, so every CIM grade of the 3D tiles has content:

- CIM5 ``model_wfc_tower``: 重庆环球金融中心 (339 m, 72 floors), every floor its own node, over
  the sample building of that name (the building nearest the landmark's place takes the name
  when the sample has none: the small sample);
- CIM4 ``model_qiansimen_bridge``: a cable-stayed bridge over the Jialing near its mouth,
  standalone (no building);
- CIM6 ``model_pump_station``: a drainage pump station with its components as separate nodes
  (shell walls and roof, pumps and motors, pipes, tanks) over the industrial building
  nearest 鸡冠石 (south-east of the centre).

A model replaces its building's block when the camera is close, so it is built on the
building's own footprint: the anchor is the footprint's centroid, the heading its long side's
bearing, the model's plan the footprint's oriented rectangle, and its height the building's.
The building rows are updated to match (name, use, height, floors, CIM level). Anchor heights
are the DEM's ground at the anchor (the central DEM where it has data, then the municipality's,
nearest pixel as rasterio samples), read from the files the generator just wrote.

glTF coordinates: metres, +X along the model's width (east at heading 0), +Y up, -Z along
its depth (north at heading 0); tiles/models3d.py places them so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
import shapely
import trimesh
from pyproj import Transformer
from trimesh.visual.material import PBRMaterial

from data_samples.buildings import LANDMARKS
from data_samples.geodesy import to_local
from data_samples.places import Gazetteer
from data_samples.terrain import CENTRAL_FILE, JIALING, MUNICIPALITY_FILE
from tiles.models3d import enu_axes

MODELS_FILE = "models.json"
_TO_ECEF = Transformer.from_crs("EPSG:4979", "EPSG:4978", always_xy=True)
_TO_GEODETIC = Transformer.from_crs("EPSG:4978", "EPSG:4979", always_xy=True)

TOWER_NAME = "重庆环球金融中心"
TOWER_PLACE = (106.575, 29.560)
TOWER_HEIGHT_M = 339.0
TOWER_FLOORS = 72
PODIUM_FLOORS = 6
SLAB_M = 0.35
# The Jialing's last reach before the Yangtze; the bridge crosses it here.
BRIDGE_PLACE = (106.565, 29.565)
BRIDGE_LENGTH_M = 640.0
BRIDGE_CLEARANCE_M = 32.0
PUMP_PLACE = (106.625, 29.575)  # 鸡冠石, on the Yangtze's south bank
PUMP_HEIGHT_M = 14.0

COLOURS = {
    "glass": (120, 160, 190, 255), "slab": (205, 205, 200, 255), "concrete": (170, 168, 160, 255),
    "steel": (90, 100, 110, 255), "cable": (230, 230, 230, 255), "deck": (80, 80, 85, 255),
    "pump": (40, 110, 180, 255), "motor": (200, 120, 40, 255), "pipe": (60, 140, 70, 255),
    "tank": (190, 190, 195, 255), "roof": (150, 60, 50, 255), "wall": (225, 215, 195, 255),
}


@dataclass
class Model:
    """A model being built: named parts in glTF coordinates, and where it stands."""

    layer_id: str
    title_zh: str
    title_en: str
    cim_level: int
    lon: float
    lat: float
    heading: float
    building_id: int | None = None
    parts: list[tuple[str, trimesh.Trimesh, str]] = field(default_factory=list)

    def add(self, name: str, mesh: trimesh.Trimesh, colour: str) -> None:
        self.parts.append((name, mesh, colour))

    def glb(self) -> bytes:
        scene = trimesh.Scene()
        materials = {name: PBRMaterial(name=name, baseColorFactor=list(rgba),
                                       metallicFactor=0.1, roughnessFactor=0.8)
                     for name, rgba in COLOURS.items()}
        for name, mesh, colour in self.parts:
            mesh = mesh.copy()
            mesh.visual = trimesh.visual.TextureVisuals(material=materials[colour])
            scene.add_geometry(mesh, node_name=name, geom_name=name)
        return scene.export(file_type="glb")


# --- shapes in glTF coordinates (x: width, y: up, z: minus depth) -------------------------

def box(x0: float, x1: float, y0: float, y1: float, v0: float, v1: float) -> trimesh.Trimesh:
    """An axis-aligned box; ``v`` is the depth axis (glTF -Z)."""
    extents = (x1 - x0, y1 - y0, v1 - v0)
    centre = ((x0 + x1) / 2, (y0 + y1) / 2, -(v0 + v1) / 2)
    return trimesh.creation.box(extents=extents,
                                transform=trimesh.transformations.translation_matrix(centre))


def cylinder(radius: float, start: tuple[float, float, float], end: tuple[float, float, float],
             sections: int = 16) -> trimesh.Trimesh:
    """A cylinder between two points given as (x, y, v)."""
    a = (start[0], start[1], -start[2])
    b = (end[0], end[1], -end[2])
    return trimesh.creation.cylinder(radius=radius, segment=[a, b], sections=sections)


# --- where things stand --------------------------------------------------------------------

def ground(sample_dir: Path, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """DEM heights at the points: the central DEM where it has data, else the municipality's
    (the pixel containing each point, as rasterio's ``sample`` reads)."""
    lon, lat = np.atleast_1d(lon).astype(float), np.atleast_1d(lat).astype(float)
    out = np.full(lon.shape, np.nan)
    for name in (CENTRAL_FILE, MUNICIPALITY_FILE):
        missing = np.isnan(out)
        if not missing.any():
            break
        with rasterio.open(sample_dir / name) as dem:
            values = np.array([v[0] for v in dem.sample(zip(lon[missing], lat[missing],
                                                            strict=True), masked=True)
                               ], dtype=object)
            heights = np.array([np.nan if v is np.ma.masked else float(v) for v in values])
        out[missing] = heights
    return out


def to_enu(lon0: float, lat0: float, h0: float, lon: np.ndarray, lat: np.ndarray,
           h: np.ndarray | float = 0.0) -> np.ndarray:
    """Points to east/north/up metres at (lon0, lat0, h0), as tiles/models3d.py frames them."""
    lon, lat = np.atleast_1d(lon), np.atleast_1d(lat)
    h = np.broadcast_to(h, lon.shape)
    origin = np.array(_TO_ECEF.transform(lon0, lat0, h0))
    points = np.column_stack(_TO_ECEF.transform(lon, lat, h)) - origin
    return points @ enu_axes(lon0, lat0).T


def from_enu(lon0: float, lat0: float, h0: float, east: float, north: float
             ) -> tuple[float, float]:
    origin = np.array(_TO_ECEF.transform(lon0, lat0, h0))
    point = origin + np.array([east, north, 0.0]) @ enu_axes(lon0, lat0)
    lon, lat, _ = _TO_GEODETIC.transform(*point)
    return float(lon), float(lat)


@dataclass(frozen=True)
class Plan:
    """A footprint's oriented rectangle: centroid, heading of its width axis, sizes (m), and
    the lowest ground under its corners relative to the centroid's ground."""

    lon: float
    lat: float
    heading: float
    width: float
    depth: float
    ground: float
    drop: float


def plan_of(footprint: shapely.Polygon, sample_dir: Path) -> Plan:
    centroid = footprint.centroid
    lon0, lat0 = centroid.x, centroid.y
    corners = np.asarray(footprint.exterior.coords)[:-1]
    local = to_enu(lon0, lat0, 0.0, corners[:, 0], corners[:, 1])[:, :2]
    rectangle = shapely.minimum_rotated_rectangle(shapely.Polygon(local))
    ring = np.asarray(rectangle.exterior.coords)[:4]
    edges = np.diff(np.vstack([ring, ring[:1]]), axis=0)
    lengths = np.hypot(edges[:, 0], edges[:, 1])
    long_side = int(np.argmax(lengths[:2]))
    u = edges[long_side] / lengths[long_side]
    heading = math.degrees(math.atan2(-u[1], u[0])) % 360.0
    heights = ground(sample_dir, np.r_[lon0, corners[:, 0]], np.r_[lat0, corners[:, 1]])
    return Plan(lon0, lat0, round(heading, 6), float(lengths[long_side]),
                float(lengths[1 - long_side]), float(heights[0]),
                float(heights[1:].min() - heights[0]))


def _nearest(buildings: gpd.GeoDataFrame, place: tuple[float, float],
             rows: np.ndarray) -> int:
    centres = shapely.centroid(buildings.geometry.to_numpy())
    x, y = to_local(shapely.get_x(centres), shapely.get_y(centres))
    px, py = to_local(*place)
    distance = np.hypot(np.asarray(x) - float(px), np.asarray(y) - float(py))
    distance[~rows] = np.inf
    return int(np.argmin(distance))


# --- the three models -----------------------------------------------------------------------

def _foundation(model: Model, plan: Plan, width: float, depth: float) -> None:
    """A plinth from the lowest corner's ground up to the anchor: no side floats."""
    if plan.drop < -0.05:
        model.add("foundation", box(-width / 2, width / 2, plan.drop, 0.0, -depth / 2,
                                    depth / 2), "concrete")


def tower(buildings: gpd.GeoDataFrame, sample_dir: Path) -> Model:
    named = (buildings["name"] == TOWER_NAME).to_numpy()
    other_landmarks = buildings["name"].isin([entry[0] for entry in LANDMARKS]).to_numpy()
    rows = named if named.any() else (
        buildings["use"].isin(["office", "commercial"]).to_numpy() & ~other_landmarks)
    k = _nearest(buildings, TOWER_PLACE, rows)
    plan = plan_of(buildings.geometry.iloc[k], sample_dir)
    buildings.loc[buildings.index[k], ["name", "use", "height_m", "floors", "cim_level",
                                       "roof_type"]] = [TOWER_NAME, "office", TOWER_HEIGHT_M,
                                                        TOWER_FLOORS, 5, "flat"]
    model = Model("model_wfc_tower", "重庆环球金融中心（CIM5）", "Chongqing WFC tower (CIM5)",
                  5, plan.lon, plan.lat, plan.heading, int(buildings["id"].iloc[k]))
    w, d = plan.width, plan.depth
    _foundation(model, plan, w, d)
    storey = TOWER_HEIGHT_M / TOWER_FLOORS
    for floor in range(TOWER_FLOORS):
        inset = 0.0 if floor < PODIUM_FLOORS else 0.12 + 0.10 * max(0, floor - 60) / 12
        fw, fd = w * (1 - inset), d * (1 - inset)
        bottom = floor * storey
        model.add(f"F{floor + 1:02d}_slab", box(-fw / 2, fw / 2, bottom, bottom + SLAB_M,
                                               -fd / 2, fd / 2), "slab")
        glass = 0.35 if floor < PODIUM_FLOORS else 0.5
        model.add(f"F{floor + 1:02d}", box(-fw / 2 + glass, fw / 2 - glass, bottom + SLAB_M,
                                           bottom + storey, -fd / 2 + glass, fd / 2 - glass),
                  "glass")
    return model


def bridge(sample_dir: Path) -> Model:
    """A cable-stayed bridge across the Jialing at BRIDGE_PLACE, square to the river."""
    lon0, lat0 = BRIDGE_PLACE
    vertices = np.array(JIALING.vertices)
    local = to_enu(lon0, lat0, 0.0, vertices[:, 0], vertices[:, 1])[:, :2]
    line = shapely.LineString(local)
    at = line.project(shapely.Point(0.0, 0.0))
    a, b = line.interpolate(max(at - 50.0, 0.0)), line.interpolate(at + 50.0)
    centre = line.interpolate(at)
    lon0, lat0 = from_enu(lon0, lat0, 0.0, centre.x, centre.y)
    flow = np.array([b.x - a.x, b.y - a.y]) / math.hypot(b.x - a.x, b.y - a.y)
    # The deck (model +X) runs across the river: the flow turned a quarter to the left.
    across = np.array([-flow[1], flow[0]])
    heading = round(math.degrees(math.atan2(-across[1], across[0])) % 360.0, 6)
    half = BRIDGE_LENGTH_M / 2
    ends = [from_enu(lon0, lat0, 0.0, *(s * half * across)) for s in (-1, 1)]
    heights = ground(sample_dir, np.array([lon0, ends[0][0], ends[1][0]]),
                     np.array([lat0, ends[0][1], ends[1][1]]))
    base = float(heights[0])
    deck = max(float(heights[1:].max()) - base, BRIDGE_CLEARANCE_M)
    model = Model("model_qiansimen_bridge", "千厮门嘉陵江大桥（CIM4）",
                  "Qiansimen Jialing bridge (CIM4)", 4, lon0, lat0, heading)
    width = 24.0
    model.add("deck", box(-half, half, deck - 3.0, deck, -width / 2, width / 2), "deck")
    for side in (-1, 1):
        model.add(f"railing_{'n' if side > 0 else 's'}",
                  box(-half, half, deck, deck + 1.2, side * width / 2 - 0.4 * (side > 0),
                      side * width / 2 + 0.4 * (side < 0)), "steel")
    tower_x = 0.3 * BRIDGE_LENGTH_M
    top = deck + 90.0
    for sign in (-1, 1):
        x = sign * tower_x
        name = "east" if sign > 0 else "west"
        for leg in (-1, 1):
            model.add(f"pylon_{name}_{'n' if leg > 0 else 's'}",
                      box(x - 3.0, x + 3.0, 0.0, top, leg * width / 2 - 3.0 * (leg > 0),
                          leg * width / 2 + 3.0 * (leg < 0)), "concrete")
        model.add(f"pylon_{name}_beam", box(x - 3.0, x + 3.0, top - 8.0, top, -width / 2,
                                            width / 2), "concrete")
        for k in range(1, 7):
            for direction in (-1, 1):
                anchor_x = x + direction * k * 0.045 * BRIDGE_LENGTH_M
                for leg in (-1, 1):
                    model.add(f"cable_{name}_{k}{'ab'[direction > 0]}{'sn'[leg > 0]}",
                              cylinder(0.25, (x, top - 10.0 - 3.0 * k, leg * (width / 2 - 1)),
                                       (anchor_x, deck, leg * (width / 2 - 1)), sections=6),
                              "cable")
    for k, x in enumerate(np.linspace(-half + 40.0, half - 40.0, 4)):
        if abs(x) > tower_x + 20.0:
            model.add(f"pier_{k + 1}", box(x - 2.5, x + 2.5, 0.0, deck - 3.0, -width / 3,
                                           width / 3), "concrete")
    return model


def pump_station(buildings: gpd.GeoDataFrame, sample_dir: Path) -> Model:
    industrial = (buildings["use"] == "industrial").to_numpy() \
        & (buildings["cim_level"] < 5).to_numpy()
    k = _nearest(buildings, PUMP_PLACE, industrial)
    plan = plan_of(buildings.geometry.iloc[k], sample_dir)
    cx, cy = to_local(plan.lon, plan.lat)
    place = str(Gazetteer().nearest(np.atleast_1d(cx), np.atleast_1d(cy))[0])
    name = f"{place}雨水泵站"
    buildings.loc[buildings.index[k], ["name", "use", "height_m", "floors", "cim_level",
                                       "roof_type"]] = [name, "industrial", PUMP_HEIGHT_M, 2,
                                                        6, "flat"]
    model = Model("model_pump_station", f"{name}（CIM6）", "Drainage pump station (CIM6)", 6,
                  plan.lon, plan.lat, plan.heading, int(buildings["id"].iloc[k]))
    w, d = plan.width, plan.depth
    _foundation(model, plan, w, d)
    # The hall takes the west 60 % of the plot (along the width), the tank yard the rest.
    hall_x1 = -w / 2 + 0.6 * w
    wall, h = 0.4, PUMP_HEIGHT_M
    x0, v0, v1 = -w / 2, -d / 2, d / 2
    eaves = h - 0.5  # the roof slab's top is the building's height
    model.add("shell_floor", box(x0, w / 2, 0.0, 0.3, v0, v1), "concrete")
    model.add("shell_wall_s", box(x0, hall_x1, 0.0, eaves, v0, v0 + wall), "wall")
    model.add("shell_wall_n", box(x0, hall_x1, 0.0, eaves, v1 - wall, v1), "wall")
    model.add("shell_wall_w", box(x0, x0 + wall, 0.0, eaves, v0 + wall, v1 - wall), "wall")
    model.add("shell_wall_e", box(hall_x1 - wall, hall_x1, 0.0, eaves, v0 + wall, v1 - wall),
              "wall")
    model.add("shell_roof", box(x0, hall_x1, eaves, h, v0, v1), "roof")
    pumps = 4
    xs = np.linspace(x0 + 0.15 * w, hall_x1 - 0.1 * w, pumps)
    header_v = v0 + 0.25 * d
    for k, x in enumerate(xs, start=1):
        x = float(x)
        model.add(f"pump_{k}", cylinder(1.1, (x, 0.3, 0.0), (x, 2.3, 0.0)), "pump")
        model.add(f"motor_{k}", cylinder(0.8, (x, 2.3, 0.0), (x, 4.0, 0.0)), "motor")
        model.add(f"pipe_suction_{k}", cylinder(0.35, (x, 1.3, 0.0), (x, 1.3, v1 - 1.0)),
                  "pipe")
        model.add(f"pipe_riser_{k}", cylinder(0.3, (x, 1.3, 0.0), (x, 1.3, header_v)), "pipe")
    model.add("pipe_header", cylinder(0.6, (float(xs[0]) - 1.0, 1.3, header_v),
                                      (w / 2 - 2.0, 1.3, header_v)), "pipe")
    yard = w / 2 - hall_x1
    radius = max(1.5, min(yard, d / 2) / 2 - 1.5)
    for k, v in enumerate((v0 + d / 4, v1 - d / 4), start=1):
        x = hall_x1 + yard / 2
        model.add(f"tank_{k}", cylinder(radius, (x, 0.3, v), (x, 0.3 + 9.0, v), sections=24),
                  "tank")
        model.add(f"pipe_tank_{k}", cylinder(0.3, (x, 1.3, v), (x, 1.3, header_v)), "pipe")
    return model


# --- writing --------------------------------------------------------------------------------

def _document(glb: bytes) -> dict:
    length = int.from_bytes(glb[12:16], "little")
    return json.loads(glb[20:20 + length])


def build_models(buildings: gpd.GeoDataFrame, sample_dir: Path) -> list[dict]:
    """Write the models as ``<layer id>.glb`` into ``sample_dir`` and their registration as
    ``models.json``; ``buildings`` gets the models' buildings' facts. Returns the entries."""
    models = [tower(buildings, sample_dir), bridge(sample_dir),
              pump_station(buildings, sample_dir)]
    entries = []
    for model in models:
        glb = model.glb()
        file_name = f"{model.layer_id}.glb"
        (sample_dir / file_name).write_bytes(glb)
        document = _document(glb)
        height = float(ground(sample_dir, np.array([model.lon]), np.array([model.lat]))[0])
        meta: dict = {
            "format": "glb", "bytes": len(glb),
            "anchor": {"lon": round(model.lon, 9), "lat": round(model.lat, 9),
                       "height": height},
            "heading": model.heading, "cim_level": model.cim_level,
            "meshes": len(document.get("meshes") or []),
            "nodes": len(document.get("nodes") or []),
            "generator": (document.get("asset") or {}).get("generator"),
        }
        if model.building_id is not None:
            meta["building_id"] = model.building_id
        entries.append({"id": model.layer_id, "title_zh": model.title_zh,
                        "title_en": model.title_en, "file": file_name, "meta": meta})
    text = json.dumps({"models": entries}, indent=1, ensure_ascii=False, sort_keys=True)
    (sample_dir / MODELS_FILE).write_text(text + "\n", encoding="utf-8")
    return entries

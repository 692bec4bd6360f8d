"""quantized-mesh-1.0 terrain (issue 13, CIM1): tiles decoded by a decoder written here from
the spec and compared with the DEM files read by rasterio.

The oracles are independent of tiles/quantized_mesh.py: the decoder (88-byte header,
zig-zag delta u/v/h, high-water-mark indices, edge indices, extensions), the DEM surface
(bilinear between pixel centres of the finest DEM with data, nodata centres dropped, 0 m
where no DEM has data), ECEF by pyproj, and Cesium's horizon-culling test.

Checked on every tile layer.json lists (the sample's 844): the header (min/max heights, a
bounding sphere holding every vertex, a horizon-occlusion point that hides the tile only
when every vertex is hidden), indices, edges, winding, and every vertex's height against
the DEM surface. On tiles whose grid resolves the DEM (two samples per pixel, the
``Twin-Grid`` header), the mesh as Cesium draws it (straight triangles in ECEF) at every
DEM pixel centre against that pixel's value, within the ``Twin-Max-Error`` the tile
states plus quantization. CesiumJS itself (the web app's npm package, in node) reads a
sample of the tiles as the 3D view will.

The module serves the sample city from a database of its own (DEMs other modules upload
into the shared one would join the municipality's terrain).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import morecantile
import numpy as np
import pytest
import rasterio
from pyproj import Transformer
from sqlalchemy import create_engine, text

from data_samples.load import load_sample
from tests.servers import LiveServer, sibling_database
from tests.uploads import geotiff, upload_ok, upload_settings
from twin.core.settings import AuthSettings, Settings

QM = "application/vnd.quantized-mesh"
CESIUM_ACCEPT = (f"{QM};extensions=octvertexnormals-watermask-metadata,"
                 "application/octet-stream;q=0.9,*/*;q=0.01")
PLAIN_ACCEPT = f"{QM},application/octet-stream;q=0.9"
TO_ECEF = Transformer.from_crs("EPSG:4979", "EPSG:4978", always_xy=True)
A, B = 6378137.0, 6356752.3142451793
DISTRICT_KEY = "qmesh-district-viewer-0123456789"
FILES = {"terrain_central": "dem_central.tif", "terrain": "dem_municipality.tif"}


# --- the decoder (quantized-mesh-1.0 spec) ------------------------------------------------

def zigzag_deltas(raw: np.ndarray) -> np.ndarray:
    raw = raw.astype(np.int64)
    return np.cumsum((raw >> 1) ^ -(raw & 1))


def decode(content: bytes) -> dict:
    fields = struct.unpack_from("<3d2f4d3d", content, 0)
    tile: dict = {"center": np.array(fields[0:3]), "min_h": fields[3], "max_h": fields[4],
                  "sphere_center": np.array(fields[5:8]), "sphere_radius": fields[8],
                  "occlusion": np.array(fields[9:12])}
    offset = 88
    (count,) = struct.unpack_from("<I", content, offset)
    offset += 4
    for name in ("u", "v", "h"):
        tile[name] = zigzag_deltas(np.frombuffer(content, "<u2", count, offset))
        offset += 2 * count
    wide = count > 65536
    size, dtype = (4, "<u4") if wide else (2, "<u2")
    offset += (-offset) % size
    (triangles,) = struct.unpack_from("<I", content, offset)
    offset += 4
    codes = np.frombuffer(content, dtype, 3 * triangles, offset).astype(np.int64)
    offset += 3 * triangles * size
    indices, highest = np.empty(len(codes), dtype=np.int64), 0
    for i, code in enumerate(codes.tolist()):
        indices[i] = highest - code
        if code == 0:
            highest += 1
    tile["triangles"] = indices.reshape(-1, 3)
    for edge in ("west", "south", "east", "north"):
        (n,) = struct.unpack_from("<I", content, offset)
        offset += 4
        tile[edge] = np.frombuffer(content, dtype, n, offset).astype(np.int64)
        offset += n * size
    tile["extensions"] = {}
    while offset < len(content):
        ext_id, length = struct.unpack_from("<BI", content, offset)
        offset += 5
        tile["extensions"][ext_id] = content[offset:offset + length]
        offset += length
    assert offset == len(content)
    return tile


def oct_decode(data: bytes) -> np.ndarray:
    """Cesium's AttributeCompression.octDecode of 2-byte normals."""
    packed = np.frombuffer(data, np.uint8).reshape(-1, 2).astype(np.float64)
    x, y = packed[:, 0] / 255 * 2 - 1, packed[:, 1] / 255 * 2 - 1
    z = 1 - np.abs(x) - np.abs(y)
    below = z < 0
    x, y = (np.where(below, (1 - np.abs(y)) * np.where(x >= 0, 1, -1), x),
            np.where(below, (1 - np.abs(x)) * np.where(y >= 0, 1, -1), y))
    normals = np.column_stack([x, y, z])
    return normals / np.linalg.norm(normals, axis=1)[:, None]


def tile_box(z: int, x: int, y: int) -> tuple[float, float, float, float]:
    size = 180.0 / 2**z
    return -180 + x * size, -90 + y * size, -180 + (x + 1) * size, -90 + (y + 1) * size


def positions(tile: dict, z: int, x: int, y: int) -> tuple[np.ndarray, ...]:
    west, south, east, north = tile_box(z, x, y)
    lon = west + tile["u"] / 32767 * (east - west)
    lat = south + tile["v"] / 32767 * (north - south)
    h = tile["min_h"] + tile["h"] / 32767 * (tile["max_h"] - tile["min_h"])
    return lon, lat, h


def ecef(lon, lat, h) -> np.ndarray:
    return np.column_stack(TO_ECEF.transform(lon, lat, h))


def up(lon, lat) -> np.ndarray:
    lon, lat = np.radians(lon), np.radians(lat)
    return np.column_stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)])


# --- the DEM surface, from the files ------------------------------------------------------

class Dem:
    def __init__(self, path: Path):
        with rasterio.open(path) as src:
            band = src.read(1, masked=True)
            self.values = np.ma.filled(band.astype(np.float64), np.nan)
            self.transform = src.transform
            self.bounds = tuple(src.bounds)
        self.pixel = abs(self.transform.a)

    def surface(self, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        """Bilinear between pixel centres, nodata centres left out, clamped to the edge
        centres in the outer half pixel; NaN outside the raster or without data."""
        rows, cols = self.values.shape
        fx = (lon - self.transform.c) / self.transform.a - 0.5  # centre index space
        fy = (lat - self.transform.f) / self.transform.e - 0.5
        outside = (fx < -0.5) | (fx > cols - 0.5) | (fy < -0.5) | (fy > rows - 0.5)
        fx, fy = np.clip(fx, 0, cols - 1), np.clip(fy, 0, rows - 1)
        ix, iy = np.minimum(fx.astype(int), cols - 2), np.minimum(fy.astype(int), rows - 2)
        tx, ty = fx - ix, fy - iy
        num, den = np.zeros(lon.shape), np.zeros(lon.shape)
        for dy in (0, 1):
            for dx in (0, 1):
                w = (tx if dx else 1 - tx) * (ty if dy else 1 - ty)
                value = self.values[iy + dy, ix + dx]
                ok = np.isfinite(value)
                num += np.where(ok, value * w, 0)
                den += np.where(ok, w, 0)
        out = np.full(lon.shape, np.nan)
        good = ~outside & (den > 0)
        out[good] = num[good] / den[good]
        return out

    def smooth(self, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        """Whether the points lie in a cell of four pixel centres that all have data."""
        rows, cols = self.values.shape
        fx = (lon - self.transform.c) / self.transform.a - 0.5
        fy = (lat - self.transform.f) / self.transform.e - 0.5
        ix, iy = np.floor(fx).astype(int), np.floor(fy).astype(int)
        out = (ix >= 0) & (ix < cols - 1) & (iy >= 0) & (iy < rows - 1)
        for dy in (0, 1):
            for dx in (0, 1):
                value = np.full(len(lon), np.nan)
                value[out] = self.values[iy[out] + dy, ix[out] + dx]
                out &= np.isfinite(value)
        return out

    def near(self, lon: np.ndarray, lat: np.ndarray, margin: float) -> np.ndarray:
        """Whether the points lie within ``margin`` degrees of the DEM's extent."""
        west, south, east, north = self.bounds
        return ((lon > west - margin) & (lon < east + margin) & (lat > south - margin)
                & (lat < north + margin))

    def centres(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows, cols = self.values.shape
        c, r = np.meshgrid(np.arange(cols) + 0.5, np.arange(rows) + 0.5)
        lon, lat = self.transform @ (c, r)
        return lon.ravel(), lat.ravel(), self.values.ravel()


@pytest.fixture(scope="module")
def dems(sample_dir: Path) -> dict[str, Dem]:
    return {layer: Dem(sample_dir / name) for layer, name in FILES.items()}


def stack_surface(dems: dict[str, Dem], lon, lat) -> np.ndarray:
    """The builtin ``terrain``: the central DEM where it has data, then the municipality's,
    then 0 m."""
    out = dems["terrain_central"].surface(lon, lat)
    missing = np.isnan(out)
    out[missing] = dems["terrain"].surface(lon[missing], lat[missing])
    return np.nan_to_num(out, nan=0.0)


# --- helpers ----------------------------------------------------------------------------

def base(layer: str = "terrain") -> str:
    return f"/collections/{layer}/quantized-mesh"


def available_tiles(document: dict) -> list[tuple[int, int, int]]:
    return [(z, x, y) for z, ranges in enumerate(document["available"]) for r in ranges
            for x in range(r["startX"], r["endX"] + 1) for y in range(r["startY"], r["endY"] + 1)]


def tile_url(document: dict, z: int, x: int, y: int, layer: str = "terrain") -> str:
    path = document["tiles"][0].replace("{z}", str(z)).replace("{x}", str(x)).replace(
        "{y}", str(y))
    return f"{base(layer)}/{path}"


@pytest.fixture(scope="module")
def qm_database(database_url: str, sample_dir: Path) -> Iterator[str]:
    """A database of this module's own holding the sample city: a DEM layer's terrain is
    made of every DEM inside it, so DEMs that other modules upload must not join it."""
    with sibling_database(database_url, "qmesh") as url:
        engine = create_engine(url)
        load_sample(engine, sample_dir)
        engine.dispose()
        yield url


@pytest.fixture(scope="module")
def server(qm_database: str) -> Iterator[LiveServer]:
    with LiveServer(Settings(database_url=qm_database)) as live:
        yield live


@pytest.fixture()
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def layer_json(server: LiveServer) -> dict:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        response = client.get(f"{base()}/layer.json")
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def every_tile(server: LiveServer, layer_json: dict) -> dict[tuple[int, int, int], tuple]:
    """Every tile layer.json lists, asked for as Cesium does (normals, gzip)."""
    tiles = {}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for z, x, y in available_tiles(layer_json):
            response = client.get(tile_url(layer_json, z, x, y),
                                  headers={"Accept": CESIUM_ACCEPT})
            assert response.status_code == 200, (z, x, y, response.text)
            tiles[(z, x, y)] = (decode(response.content), response.headers)
    return tiles


# --- layer.json -------------------------------------------------------------------------

def test_layer_json_is_a_cesium_terrain_layer(layer_json: dict, dems: dict[str, Dem]):
    doc = layer_json
    assert doc["tilejson"] == "2.1.0" and doc["format"] == "quantized-mesh-1.0"
    assert doc["scheme"] == "tms" and doc["projection"] == "EPSG:4326"
    assert doc["extensions"] == ["octvertexnormals"]
    assert re.fullmatch(r"\{z\}/\{x\}/\{y\}\.terrain\?v=[0-9a-f]+", doc["tiles"][0])
    municipality, central = dems["terrain"], dems["terrain_central"]
    assert doc["bounds"] == pytest.approx(list(municipality.bounds))
    # Level 0 is Cesium's two hemispheres, always there.
    assert doc["available"][0] == [{"startX": 0, "startY": 0, "endX": 1, "endY": 0}]
    assert doc["minzoom"] == 0 and doc["maxzoom"] == len(doc["available"]) - 1

    def covering(z: int, bounds) -> dict:
        size = 180 / 2**z
        return {"startX": int((bounds[0] + 180) // size), "startY": int((bounds[1] + 90) // size),
                "endX": int(np.ceil((bounds[2] + 180) / size)) - 1,
                "endY": int(np.ceil((bounds[3] + 90) / size)) - 1}

    # A DEM's deepest level is the first whose tiles span at most 32 of its pixels.
    def deepest(dem: Dem) -> int:
        return next(z for z in range(30) if 180 / 2**z <= 32 * dem.pixel)

    assert deepest(municipality) == 9 and deepest(central) == 12
    assert doc["maxzoom"] == deepest(central)
    for z in range(1, doc["maxzoom"] + 1):
        expected = [covering(z, municipality.bounds)] if z <= deepest(municipality) else [
            covering(z, central.bounds)]
        assert doc["available"][z] == expected, z


def test_every_available_tile_answers_and_its_parent_is_available(layer_json: dict,
                                                                  every_tile: dict):
    listed = set(available_tiles(layer_json))
    assert set(every_tile) == listed and len(listed) > 500
    for z, x, y in listed:
        if z > 0:
            assert (z - 1, x // 2, y // 2) in listed


def test_tiles_outside_the_layout_are_404_naming_the_range(client: httpx.Client,
                                                          layer_json: dict):
    top = layer_json["maxzoom"]
    below = client.get(f"{base()}/{top + 1}/0/0.terrain")
    assert below.status_code == 404
    assert f"0..{top}" in below.json()["description"]
    r = layer_json["available"][10][0]
    outside = client.get(f"{base()}/10/{r['endX'] + 1}/{r['startY']}.terrain")
    assert outside.status_code == 404, outside.text
    body = outside.json()
    assert body["code"] == "NotFound"
    assert f"x {r['startX']}..{r['endX']}, y {r['startY']}..{r['endY']}" in body["description"]
    assert client.get(f"{base()}/3/-1/0.terrain").status_code == 404


# --- the tiles --------------------------------------------------------------------------

def test_structure_of_every_tile(every_tile: dict):
    for (z, x, y), (tile, headers) in every_tile.items():
        n = len(tile["u"])
        assert n >= 3 and tile["u"].min() >= 0 and tile["u"].max() <= 32767
        assert tile["v"].min() >= 0 and tile["v"].max() <= 32767
        assert tile["h"].min() == 0 and tile["h"].max() in (0, 32767)
        triangles = tile["triangles"]
        assert triangles.min() >= 0 and triangles.max() < n
        assert len(np.unique(triangles)) == n  # every vertex is used
        # Counter-clockwise seen from above (u east, v north), none degenerate.
        u, v = tile["u"][triangles], tile["v"][triangles]
        area = (u[:, 1] - u[:, 0]) * (v[:, 2] - v[:, 0]) - (u[:, 2] - u[:, 0]) * (v[:, 1] - v[:, 0])
        assert (area > 0).all(), (z, x, y)
        # The edges list exactly the vertices on them; the corners are there.
        for edge, axis, value in (("west", "u", 0), ("east", "u", 32767),
                                  ("south", "v", 0), ("north", "v", 32767)):
            assert set(tile[edge].tolist()) == set(np.flatnonzero(tile[axis] == value).tolist())
        corners = {(a, b) for a, b in zip(tile["u"].tolist(), tile["v"].tolist(), strict=True)}
        assert {(0, 0), (0, 32767), (32767, 0), (32767, 32767)} <= corners
        # The tile states its max error and grid, and is what Cesium's Accept asked for.
        columns, rows = (int(n) for n in headers["twin-grid"].split("x"))
        assert float(headers["twin-max-error"]) > 0 and min(columns, rows) >= 3
        assert headers["content-type"] == QM and headers["content-encoding"] == "gzip"
        assert set(tile["extensions"]) == {1}


def quantization_m(z: int, tile: dict) -> float:
    """How far quantization may move a height: half a height step, and half a u/v step
    (in metres) times a slope of 1 (the sample's DEMs stay below 30 degrees, the cliffs
    where the municipality ends below 45)."""
    return ((tile["max_h"] - tile["min_h"]) / 32767 / 2
            + 0.5 * 180 / 2**z / 32767 * 111_320)


def test_every_vertex_height_is_the_dem(every_tile: dict, dems: dict[str, Dem]):
    """On a regular grid every vertex is a sample of the DEM surface at its (quantized)
    place; on a grid of a DEM's pixel centres every vertex inside the tile is a pixel
    centre holding that pixel's value, and those on the tile's edges samples of the
    surface."""
    posts_checked, edges_checked = 0, 0
    for (z, x, y), (tile, headers) in every_tile.items():
        lon, lat, h = positions(tile, z, x, y)
        step = (tile["max_h"] - tile["min_h"]) / 32767
        surface = stack_surface(dems, lon, lat)
        posts = headers.get("twin-grid-posts")
        if posts is None:
            assert np.abs(h - surface).max() <= step / 2 + 1e-3, (z, x, y)
            continue
        dem = dems[posts]
        edge = (tile["u"] == 0) | (tile["u"] == 32767) | (tile["v"] == 0) | (tile["v"] == 32767)
        # The vertices on the tile's edges (at the places of the border's pixel centres) are
        # samples of the surface, checked where it is continuous around them (a cell of four
        # pixel centres with data, of the DEM that answers there): at a cliff (the end of the
        # data, the edge of a finer DEM) quantization may move a vertex across it.
        smooth = edge & dem.smooth(lon, lat)
        if posts == "terrain":
            smooth &= ~dems["terrain_central"].near(lon, lat, dem.pixel)
        edge_error = np.abs(h - surface)[smooth]
        assert edge_error.max(initial=0) <= quantization_m(z, tile) + 1e-3, (z, x, y)
        edges_checked += int(smooth.sum())
        # Inside: the nearest pixel centre is within quantization, and its value is there.
        col = (lon[~edge] - dem.transform.c) / dem.transform.a - 0.5
        row = (lat[~edge] - dem.transform.f) / dem.transform.e - 0.5
        half_step = 0.5 * 180 / 2**z / 32767
        assert np.abs(col - col.round()).max() * dem.pixel <= half_step * 1.001
        assert np.abs(row - row.round()).max() * dem.pixel <= half_step * 1.001
        rows, cols = dem.values.shape
        c, r = col.round().astype(int), row.round().astype(int)
        on_dem = (c >= 0) & (c < cols) & (r >= 0) & (r < rows)
        value = np.full(len(c), np.nan)
        value[on_dem] = dem.values[r[on_dem], c[on_dem]]
        # Where that DEM answers (its own data), the vertex holds the pixel's value.
        answers = np.isfinite(value) & np.isclose(
            surface[~edge], np.where(np.isfinite(value), value, 0), atol=1.0)
        assert np.abs(h[~edge] - value)[answers].max(initial=0) <= step / 2 + 1e-3, (z, x, y)
        posts_checked += int(answers.sum())
    assert posts_checked > 100_000 and edges_checked > 10_000, (posts_checked, edges_checked)


def test_header_heights_sphere_and_horizon_point(every_tile: dict):
    rng = np.random.default_rng(13)
    # Cameras around the globe in ellipsoid-scaled space, near and far.
    directions = rng.normal(size=(400, 3))
    directions /= np.linalg.norm(directions, axis=1)[:, None]
    cameras = directions * rng.uniform(1.02, 4.0, size=(400, 1))
    scale = np.array([A, A, B])
    for (z, x, y), (tile, _) in every_tile.items():
        lon, lat, h = positions(tile, z, x, y)
        assert h.min() == pytest.approx(tile["min_h"], abs=1e-3)
        assert h.max() == pytest.approx(tile["max_h"], abs=1e-3)
        points = ecef(lon, lat, h)
        distance = np.linalg.norm(points - tile["sphere_center"], axis=1)
        assert distance.max() <= tile["sphere_radius"] + 1e-6, (z, x, y)
        assert np.linalg.norm(tile["center"] - tile["sphere_center"]) <= tile["sphere_radius"]
        # The horizon-occlusion point: where it is hidden, so is every vertex (Cesium's
        # EllipsoidalOccluder.isScaledSpacePointVisible).
        occlusion = tile["occlusion"] / scale
        assert np.isfinite(occlusion).all() and np.linalg.norm(occlusion) >= 1
        scaled = points / scale
        for camera in cameras:
            if not _occluded(occlusion[None, :], camera)[0]:
                continue
            hidden = _occluded(scaled, camera, margin=1e-9)
            assert hidden.all(), (z, x, y, camera)


def _occluded(points: np.ndarray, camera: np.ndarray, margin: float = 0.0) -> np.ndarray:
    vh_sq = camera @ camera - 1
    vt = points - camera
    vt_dot_vc = -(vt @ camera)
    if vh_sq < 0:
        return vt_dot_vc > 0
    return (vt_dot_vc > vh_sq - margin) & (vt_dot_vc**2 / (vt**2).sum(axis=1) > vh_sq - margin)


def test_vertex_normals_are_unit_and_point_up(every_tile: dict):
    """Unit vectors (as decoded) pointing up, and each the area-weighted mean of the normals
    of the vertex's triangles in ECEF (within the 2-byte octahedral encoding's error)."""
    for (z, x, y), (tile, _) in every_tile.items():
        normals = oct_decode(tile["extensions"][1])
        assert normals.shape == (len(tile["u"]), 3)
        lon, lat, h = positions(tile, z, x, y)
        upness = (normals * up(lon, lat)).sum(axis=1)
        # Up; steep only at the cliffs where the municipality ends (0 m beyond its outline).
        assert upness.min() > 0 and np.median(upness) > 0.95, (z, x, y)
        corners = ecef(lon, lat, h)
        a, b, c = tile["triangles"].T
        faces = np.cross(corners[b] - corners[a], corners[c] - corners[a])  # |.| = 2 area
        mean = np.zeros_like(corners)
        for index in (a, b, c):
            np.add.at(mean, index, faces)
        mean /= np.linalg.norm(mean, axis=1)[:, None]
        agreement = (mean * normals).sum(axis=1)
        assert agreement.min() > np.cos(np.radians(2.0)), (z, x, y, agreement.min())


def _mesh_at(tile: dict, z: int, x: int, y: int, lon: np.ndarray, lat: np.ndarray,
             height: np.ndarray) -> np.ndarray:
    """The vertical distance at each point from ``height`` to the mesh Cesium draws: the
    plane of the tile triangle over the point, its vertices in ECEF."""
    west, south, east, north = tile_box(z, x, y)
    pu = (lon - west) / (east - west) * 32767
    pv = (lat - south) / (north - south) * 32767
    vx, vy, vh = positions(tile, z, x, y)
    corners = ecef(vx, vy, vh)
    q, n = ecef(lon, lat, height), up(lon, lat)
    u, v = tile["u"].astype(np.float64), tile["v"].astype(np.float64)
    out = np.full(len(lon), np.nan)
    for first in range(0, len(tile["triangles"]), 256):
        a, b, c = tile["triangles"][first:first + 256].T
        d = (u[b] - u[a]) * (v[c] - v[a]) - (u[c] - u[a]) * (v[b] - v[a])
        du_b, dv_b = u[b][:, None] - pu[None, :], v[b][:, None] - pv[None, :]
        du_c, dv_c = u[c][:, None] - pu[None, :], v[c][:, None] - pv[None, :]
        du_a, dv_a = u[a][:, None] - pu[None, :], v[a][:, None] - pv[None, :]
        l1 = (du_b * dv_c - du_c * dv_b) / d[:, None]
        l2 = (du_c * dv_a - du_a * dv_c) / d[:, None]
        inside = (l1 >= -1e-9) & (l2 >= -1e-9) & (1 - l1 - l2 >= -1e-9)
        hit = inside.any(axis=0) & np.isnan(out)
        if not hit.any():
            continue
        which = inside[:, hit].argmax(axis=0)
        ta, tb, tc = corners[a[which]], corners[b[which]], corners[c[which]]
        normal = np.cross(tb - ta, tc - ta)
        out[hit] = ((ta - q[hit]) * normal).sum(axis=1) / (n[hit] * normal).sum(axis=1)
    return out


def test_the_mesh_keeps_its_max_error_at_every_dem_pixel_centre(every_tile: dict,
                                                               dems: dict[str, Dem]):
    """Every tile sampled at a DEM's pixel centres (``Twin-Grid-Posts``: from the level where
    a tile spans at most 130 of them), at every pixel centre of that DEM where it answers
    (its data; for the municipality, outside the central DEM): the mesh Cesium draws is
    within the stated max error of the pixel's value, plus quantization."""
    central = dems["terrain_central"]
    c_west, c_south, c_east, c_north = central.bounds
    centres = {}
    for name, dem in dems.items():
        lon, lat, value = dem.centres()
        keep = np.isfinite(value)
        if name == "terrain":
            keep &= ~((lon >= c_west) & (lon <= c_east) & (lat >= c_south) & (lat <= c_north))
        centres[name] = (lon[keep], lat[keep], value[keep])
    checked, levels = 0, set()
    for (z, x, y), (tile, headers) in every_tile.items():
        posts = headers.get("twin-grid-posts")
        if posts is None:
            continue
        # The finest DEM meeting the tile gave its posts.
        west, south, east, north = tile_box(z, x, y)
        meets_central = (c_west < east and c_east > west and c_south < north and c_north > south)
        assert posts == ("terrain_central" if meets_central else "terrain"), (z, x, y)
        lon, lat, value = centres[posts]
        inside = (lon > west) & (lon < east) & (lat > south) & (lat < north)
        if not inside.any():
            continue
        error = np.abs(_mesh_at(tile, z, x, y, lon[inside], lat[inside], value[inside]))
        assert not np.isnan(error).any()
        max_error = float(headers["twin-max-error"])
        assert error.max() <= max_error + quantization_m(z, tile) + 0.01, (
            z, x, y, error.max(), max_error)
        checked += int(inside.sum())
        levels.add((posts, z))
    # Both DEMs, from the level where a tile spans at most 130 pixel centres down.
    assert levels == {("terrain", 7), ("terrain", 8), ("terrain", 9), ("terrain_central", 10),
                      ("terrain_central", 11), ("terrain_central", 12)}, levels
    assert checked > 400_000, checked


# --- HTTP -------------------------------------------------------------------------------

def test_accept_gzip_and_etag(client: httpx.Client, layer_json: dict):
    z, x, y = available_tiles(layer_json)[-1]
    url = tile_url(layer_json, z, x, y)
    plain = client.get(url, headers={"Accept": PLAIN_ACCEPT, "Accept-Encoding": "identity"})
    assert plain.status_code == 200 and "content-encoding" not in plain.headers
    tile = decode(plain.content)
    assert tile["extensions"] == {}
    zipped = client.get(url, headers={"Accept": CESIUM_ACCEPT, "Accept-Encoding": "gzip"})
    assert zipped.headers["content-encoding"] == "gzip"
    with client.stream("GET", url, headers={"Accept": CESIUM_ACCEPT,
                                            "Accept-Encoding": "gzip"}) as streamed:
        raw = b"".join(streamed.iter_raw())
    assert gzip.decompress(raw) == zipped.content and len(raw) < len(zipped.content)
    with_normals = decode(zipped.content)
    assert with_normals["extensions"].keys() == {1}
    # The same mesh either way; the normals are the only difference.
    for name in ("u", "v", "h", "triangles"):
        assert np.array_equal(tile[name], with_normals[name])
    assert plain.headers["etag"] != zipped.headers["etag"]
    assert "Accept" in plain.headers["vary"]
    again = client.get(url, headers={"Accept": PLAIN_ACCEPT,
                                     "If-None-Match": plain.headers["etag"]})
    assert again.status_code == 304 and again.headers["etag"] == plain.headers["etag"]
    assert not again.content
    # A replayed ETag of a tile outside the layout is still 404.
    r = layer_json["available"][10][0]
    assert client.get(f"{base()}/10/{r['endX'] + 1}/0.terrain",
                      headers={"If-None-Match": plain.headers["etag"]}).status_code == 404
    document = client.get(f"{base()}/layer.json")
    assert client.get(f"{base()}/layer.json", headers={
        "If-None-Match": document.headers["etag"]}).status_code == 304


def test_the_central_dem_is_a_terrain_of_its_own(client: httpx.Client, dems: dict[str, Dem]):
    document = client.get(f"{base('terrain_central')}/layer.json").json()
    assert document["bounds"] == pytest.approx(list(dems["terrain_central"].bounds))
    assert document["maxzoom"] == 12 and document["available"][1] == [
        {"startX": 3, "startY": 1, "endX": 3, "endY": 1}]
    z, x, y = available_tiles(document)[-1]
    response = client.get(tile_url(document, z, x, y, "terrain_central"))
    assert response.status_code == 200
    # A level-0 tile away from every DEM is the ellipsoid at 0 m.
    west = decode(client.get(tile_url(document, 0, 0, 0, "terrain_central")).content)
    assert west["min_h"] == west["max_h"] == 0 and len(west["u"]) > 100


def test_non_dem_and_unknown_layers(client: httpx.Client):
    for path in ("layer.json", "0/0/0.terrain"):
        not_dem = client.get(f"/collections/buildings/quantized-mesh/{path}")
        assert not_dem.status_code == 400, not_dem.text
        assert not_dem.json()["code"] == "InvalidParameter"
        assert "elevation model" in not_dem.json()["description"]
        unknown = client.get(f"/collections/no_such_layer/quantized-mesh/{path}")
        assert unknown.status_code == 404 and unknown.json()["code"] == "NotFound"


@pytest.fixture(scope="module")
def district_client(qm_database: str) -> Iterator[httpx.Client]:
    settings = Settings(database_url=qm_database, auth=AuthSettings(
        keys={DISTRICT_KEY: "viewer:qmesh-district:district=500112"}, anonymous_role=""))
    with LiveServer(settings) as live, httpx.Client(
            base_url=live.url, timeout=30,
            headers={"Authorization": f"Bearer {DISTRICT_KEY}"}) as client:
        yield client


def test_a_district_sees_the_builtin_terrain_as_the_city_does(
        district_client: httpx.Client, client: httpx.Client, layer_json: dict):
    # As its raster tiles: a built-in layer is everyone's.
    raster = morecantile.tms.get("WebMercatorQuad").tile(106.55, 29.56, 10)
    assert district_client.get(
        f"/tiles/terrain/{raster.z}/{raster.x}/{raster.y}.terrain.png").status_code == 200
    document = district_client.get(f"{base()}/layer.json")
    assert document.status_code == 200 and document.json() == layer_json
    z, x, y = available_tiles(layer_json)[-1]
    url = tile_url(layer_json, z, x, y)
    mine = district_client.get(url, headers={"Accept": CESIUM_ACCEPT})
    theirs = client.get(url, headers={"Accept": CESIUM_ACCEPT})
    assert mine.status_code == 200 and mine.content == theirs.content
    anonymous = httpx.get(f"{str(district_client.base_url).rstrip('/')}{url}")
    assert anonymous.status_code == 401


def test_a_new_version_of_a_finer_dem_changes_the_terrain_of_the_municipality(
        client: httpx.Client, qm_database: str, layer_json: dict):
    """The municipality terrain is made of the central DEM too: a new data version of that
    layer changes the tiles' ``v=`` and every ETag, so no client keeps the old mesh."""
    z, x, y = available_tiles(layer_json)[-1]
    url = tile_url(layer_json, z, x, y)
    before = client.get(url)
    engine = create_engine(qm_database)
    with engine.begin() as conn:
        conn.execute(text("UPDATE layers SET data_version = data_version + 1 "
                          "WHERE id = 'terrain_central'"))
    engine.dispose()
    deadline = time.monotonic() + 10
    while True:
        document = client.get(f"{base()}/layer.json").json()
        if document["tiles"] != layer_json["tiles"] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert document["tiles"] != layer_json["tiles"]
    assert document["available"] == layer_json["available"]
    again = client.get(url, headers={"If-None-Match": before.headers["etag"]})
    assert again.status_code == 200 and again.headers["etag"] != before.headers["etag"]
    assert again.content == before.content  # the same file: the same mesh


# --- CesiumJS itself as the reader ----------------------------------------------------------

WEB = Path(__file__).resolve().parents[1] / "web"
CESIUM_READER = r"""
import { createRequire } from "module";
import { readFileSync } from "fs";
const require = createRequire(process.env.TWIN_WEB + "/package.json");
const Cesium = require("cesium");
const job = JSON.parse(readFileSync(0, "utf8"));
const provider = await Cesium.CesiumTerrainProvider.fromUrl(job.base, {
  requestVertexNormals: true });
const rows = (z) => 2 ** z - 1;  // Cesium counts rows from the north, TMS from the south
const out = { normals: provider.hasVertexNormals, tiles: [], probes: [] };
for (const [z, x, y] of job.probes) {
  out.probes.push(provider.getTileDataAvailable(x, rows(z) - y, z));
}
for (const { z, x, y, points } of job.tiles) {
  const data = await provider.requestTileGeometry(x, rows(z) - y, z);
  const rect = provider.tilingScheme.tileXYToRectangle(x, rows(z) - y, z);
  out.tiles.push({
    vertices: data._quantizedVertices.length / 3, triangles: data._indices.length / 3,
    min: data._minimumHeight, max: data._maximumHeight,
    normals: data._encodedNormals ? data._encodedNormals.length / 2 : 0,
    heights: points.map(([lon, lat]) => data.interpolateHeight(
      rect, Cesium.Math.toRadians(lon), Cesium.Math.toRadians(lat))),
  });
}
console.log(JSON.stringify(out));
"""


def test_cesium_reads_the_terrain(server: LiveServer, layer_json: dict, every_tile: dict,
                                  dems: dict[str, Dem]):
    """CesiumJS (the web app's npm package) loads layer.json and the tiles as the 3D view
    will: availability as listed, the meshes our decoder read, normals, and its own
    height interpolation at DEM pixel centres within the stated max error (plus the sag of
    a triangle's chord, which Cesium's height interpolation leaves out, and quantization)."""
    assert (WEB / "node_modules" / "cesium").exists(), "npm install in web/ first"
    listed = available_tiles(layer_json)
    sample = sorted({listed[i] for i in np.linspace(0, len(listed) - 1, 40).astype(int)}
                    | {(0, 0, 0), (0, 1, 0)})
    jobs = []
    for z, x, y in sample:
        tile, headers = every_tile[(z, x, y)]
        posts = headers.get("twin-grid-posts")
        points: list = []
        if posts:
            west, south, east, north = tile_box(z, x, y)
            lon, lat, value = dems[posts].centres()
            inside = ((lon > west) & (lon < east) & (lat > south) & (lat < north)
                      & np.isfinite(value))
            if posts == "terrain":
                inside &= ~dems["terrain_central"].near(lon, lat, 0.0)
            points = np.column_stack([lon[inside], lat[inside]]).tolist()
        jobs.append({"z": z, "x": x, "y": y, "points": points})
    top = layer_json["maxzoom"]
    r = layer_json["available"][top][0]
    probes = [[top, r["startX"], r["startY"]], [top, r["endX"], r["endY"]],
              [top, r["endX"] + 1, r["endY"]], [top + 1, 2 * r["startX"], 2 * r["startY"]]]
    result = subprocess.run(
        ["node", "--input-type=module", "-e", CESIUM_READER],
        input=json.dumps({"base": f"{server.url}{base()}/", "tiles": jobs, "probes": probes}),
        capture_output=True, text=True, timeout=300, env={**os.environ, "TWIN_WEB": str(WEB)})
    assert result.returncode == 0, result.stderr[-2000:]
    read = json.loads(result.stdout)
    assert read["normals"] is True
    assert read["probes"] == [True, True, False, False]
    checked = 0
    for job, cesium in zip(jobs, read["tiles"], strict=True):
        z, x, y = job["z"], job["x"], job["y"]
        tile, headers = every_tile[(z, x, y)]
        assert cesium["vertices"] == len(tile["u"]) == cesium["normals"]
        assert cesium["triangles"] == len(tile["triangles"])
        assert cesium["min"] == pytest.approx(tile["min_h"]) and cesium["max"] == pytest.approx(
            tile["max_h"])
        if not job["points"]:
            continue
        posts = headers["twin-grid-posts"]
        lon, lat = np.array(job["points"]).T
        value = dems[posts].surface(lon, lat)  # at a pixel centre: the pixel's value
        size_m = 180 / 2**z * 111_320 * np.sqrt(2)
        allowed = float(headers["twin-max-error"]) + quantization_m(z, tile) + size_m**2 / (
            8 * A) + 0.01
        error = np.abs(np.array(cesium["heights"], dtype=np.float64) - value)
        assert error.max() <= allowed, (z, x, y, error.max(), allowed)
        checked += len(error)
    assert checked > 5000, checked


def test_a_projected_dem_upload_is_left_out_of_the_municipality_terrain(
        qm_database: str, layer_json: dict, tmp_path: Path):
    """tiles/dem.py reads DEMs in EPSG:4326 only: a finer DEM uploaded in a projected CRS
    inside the municipality gets a 400 naming that for its own terrain, and the
    municipality's terrain stays what it was (it does not fail with it)."""
    to_gk = Transformer.from_crs("EPSG:4326", "EPSG:4524", always_xy=True)
    x0, y0 = to_gk.transform(106.577, 29.5576)
    values = (300 + np.arange(100 * 120) % 97).astype("float32").reshape(100, 120)
    content = geotiff(values, rasterio.transform.from_origin(round(x0), round(y0), 30, 30),
                      "EPSG:4524")
    with LiveServer(upload_settings(qm_database, tmp_path)) as live, httpx.Client(
            base_url=live.url, timeout=60) as api:
        job = upload_ok(api, "gk_dem.tif", content, title="GK DEM")
        layer = api.get(f"/layers/{job['layer_id']}").json()
        assert layer["meta"]["dem"] is True and layer["source_crs"] == "EPSG:4524"
        own = api.get(f"{base(job['layer_id'])}/layer.json")
        assert own.status_code == 400 and "EPSG:4326" in own.json()["description"]
        municipality = api.get(f"{base()}/layer.json")
        assert municipality.status_code == 200
        assert municipality.json()["available"] == layer_json["available"]
        z, x, y = available_tiles(layer_json)[-1]
        assert api.get(tile_url(layer_json, z, x, y)).status_code == 200

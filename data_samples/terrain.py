"""Synthetic but plausible terrain of Chongqing: ``elevation(lon, lat)`` and its two DEM files.

The shape follows the real landforms: the Yangtze and the Jialing in valleys at 150-300 m, the
NNE-SSW parallel ridges of the central area (Jinyun, Zhongliang, Tongluo, Mingyue; 500-900 m),
the Daba Shan rising to ~2,700 m in the north-east and the Wuling and Dalou ranges at
~2,000 m in the south-east, with smooth multi-octave noise for relief. The noise uses a fixed
seed: the terrain is a property of the place, the same for every sample seed.

Everything downstream (pipe node elevations, "drainage flows downhill") reads elevations from
the rasters, sampled the way ``rasterio``'s ``sample`` does, never from the function itself.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
from rasterio.features import geometry_mask
from rasterio.transform import Affine, from_origin, rowcol
from scipy import ndimage

log = logging.getLogger(__name__)

TERRAIN_SEED = 500000
NODATA = -9999.0
# Elevations are stored as multiples of 1/8 m: exact in float32, float64 and decimal text, so
# the tables can repeat the raster's values digit for digit.
ELEVATION_STEP = 0.125

MUNICIPALITY_BOUNDS = (105.28, 28.15, 110.20, 32.21)
MUNICIPALITY_FILE = "dem_municipality.tif"
CENTRAL_FILE = "dem_central.tif"

# Equirectangular kilometres around the middle of the municipality: enough for valley and
# ridge profiles (errors under 1 %), and cheap on millions of raster cells.
_REF_LON, _REF_LAT = 107.7, 30.2
KM_PER_DEG_LAT = 110.6
KM_PER_DEG_LON = 111.32 * float(np.cos(np.radians(_REF_LAT)))


def to_km(lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = (np.asarray(lon) - _REF_LON) * KM_PER_DEG_LON
    y = (np.asarray(lat) - _REF_LAT) * KM_PER_DEG_LAT
    return x, y


@dataclass(frozen=True)
class River:
    name_zh: str
    # Centre line, upstream to downstream, with the water surface at each vertex (metres).
    vertices: tuple[tuple[float, float], ...]
    water_level_m: tuple[float, ...]
    half_width_m: float
    # e-folding half-width of the valley the river has cut.
    valley_km: float


# Water levels are the Three Gorges reservoir in winter (175 m at its tail near the city).
YANGTZE = River(
    "长江",
    (
        (106.25, 29.28), (106.38, 29.33), (106.47, 29.43), (106.52, 29.50), (106.555, 29.535),
        (106.585, 29.563), (106.63, 29.60), (106.72, 29.60), (106.80, 29.66), (107.08, 29.83),
        (107.39, 29.70), (107.73, 29.87), (108.04, 30.30), (108.40, 30.80), (108.70, 30.93),
        (109.47, 31.02), (109.88, 31.07), (110.20, 31.05),
    ),
    (190, 186, 181, 178, 176.5, 175.5, 175, 175, 175, 175, 174.5, 174, 174, 173.5, 173,
     172.5, 172, 172),
    half_width_m=350.0,
    valley_km=2.4,
)
JIALING = River(
    "嘉陵江",
    (
        (106.27, 29.99), (106.43, 29.83), (106.44, 29.72), (106.45, 29.64), (106.45, 29.585),
        (106.50, 29.575), (106.545, 29.567), (106.585, 29.563),
    ),
    (200, 190, 184, 180, 178, 177, 176, 175.5),
    half_width_m=200.0,
    valley_km=1.7,
)
RIVERS = (YANGTZE, JIALING)


@dataclass(frozen=True)
class Ridge:
    """A long narrow anticline ridge: a Gaussian cross-section along a straight crest."""

    start: tuple[float, float]
    end: tuple[float, float]
    height_m: float
    half_width_km: float


RIDGES = (
    Ridge((106.33, 29.70), (106.47, 30.08), 560.0, 1.8),  # 缙云山 Jinyun
    Ridge((106.33, 29.22), (106.45, 29.86), 330.0, 1.7),  # 中梁山 Zhongliang
    Ridge((106.58, 29.28), (106.77, 29.98), 300.0, 1.5),  # 铜锣山 Tongluo
    Ridge((106.84, 29.40), (107.14, 30.22), 380.0, 1.9),  # 明月山 Mingyue
    Ridge((107.55, 29.55), (108.45, 30.75), 650.0, 6.0),  # 方斗山 Fangdou
    Ridge((108.00, 29.45), (108.95, 30.60), 800.0, 7.0),  # 七曜山 Qiyao
)


@dataclass(frozen=True)
class Massif:
    """A mountain range as an elongated Gaussian dome."""

    centre: tuple[float, float]
    along_km: float
    across_km: float
    # Direction of the long axis, degrees east of north.
    bearing_deg: float
    height_m: float


MASSIFS = (
    Massif((109.05, 31.85), 105.0, 42.0, 110.0, 1420.0),  # 大巴山 Daba Shan, WNW-ESE
    Massif((108.85, 28.85), 110.0, 55.0, 35.0, 820.0),  # 武陵山 Wuling, NNE
    Massif((107.20, 28.95), 60.0, 28.0, 40.0, 1380.0),  # 大娄山 / 金佛山 Jinfo
)

# (lattice spacing km, relative amplitude): broad swells down to hillocks a few hundred m across.
_OCTAVES = ((48.0, 1.0), (16.0, 0.55), (5.0, 0.3), (1.6, 0.14), (0.5, 0.05))
_CREST_OCTAVES = ((12.0, 1.0), (4.0, 0.5))
_NOISE_PAD_DEG = 0.3


@functools.cache
def _noise_lattice(spacing_km: float, layer: int) -> tuple[np.ndarray, float, float]:
    """Cubic-spline coefficients of a random lattice covering the municipality."""
    west, south, east, north = MUNICIPALITY_BOUNDS
    x0, y0 = to_km(west - _NOISE_PAD_DEG, south - _NOISE_PAD_DEG)
    x1, y1 = to_km(east + _NOISE_PAD_DEG, north + _NOISE_PAD_DEG)
    shape = (int(np.ceil((y1 - y0) / spacing_km)) + 4, int(np.ceil((x1 - x0) / spacing_km)) + 4)
    rng = np.random.default_rng([TERRAIN_SEED, layer])
    lattice = rng.uniform(-1.0, 1.0, size=shape)
    return ndimage.spline_filter(lattice, order=3), float(x0), float(y0)


def _noise(x: np.ndarray, y: np.ndarray, octaves=_OCTAVES, layer: int = 0) -> np.ndarray:
    """Smooth value noise in about [-1, 1] at km coordinates; layers are independent."""
    total = np.zeros_like(x)
    norm = 0.0
    for octave, (spacing, amplitude) in enumerate(octaves):
        coeffs, x0, y0 = _noise_lattice(spacing, 16 * layer + octave)
        coords = np.stack([(y - y0) / spacing, (x - x0) / spacing])
        total += amplitude * ndimage.map_coordinates(coeffs, coords, order=3, prefilter=False)
        norm += amplitude
    return total / (0.6 * norm)


def _smoothstep(edge0: float, edge1: float, v: np.ndarray) -> np.ndarray:
    t = np.clip((v - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def polyline_distance(
    x: np.ndarray, y: np.ndarray, vx: np.ndarray, vy: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distance from points to a polyline, with the nearest segment and position on it."""
    best = np.full(x.shape, np.inf)
    segment = np.zeros(x.shape, dtype=np.int64)
    position = np.zeros(x.shape)
    for i in range(len(vx) - 1):
        dx, dy = vx[i + 1] - vx[i], vy[i + 1] - vy[i]
        t = np.clip(((x - vx[i]) * dx + (y - vy[i]) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
        d = np.hypot(x - vx[i] - t * dx, y - vy[i] - t * dy)
        closer = d < best
        best = np.where(closer, d, best)
        segment = np.where(closer, i, segment)
        position = np.where(closer, t, position)
    return best, segment, position


def _ridges(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    total = np.zeros_like(x)
    crest = np.clip(0.8 + 0.45 * _noise(x, y, _CREST_OCTAVES, layer=1), 0.3, 1.4)
    for ridge in RIDGES:
        sx, sy = to_km(*ridge.start)
        ex, ey = to_km(*ridge.end)
        dist, _, t = polyline_distance(x, y, np.array([sx, ex]), np.array([sy, ey]))
        # Crests sag towards their ends and rise and fall along their length.
        taper = _smoothstep(0.0, 0.12, t) * _smoothstep(1.0, 0.88, t)
        profile = np.exp(-((dist / ridge.half_width_km) ** 2))
        total += ridge.height_m * taper * profile * crest
    return total


def _massifs(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    total = np.zeros_like(x)
    for massif in MASSIFS:
        cx, cy = to_km(*massif.centre)
        bearing = np.radians(massif.bearing_deg)
        along = (x - cx) * np.sin(bearing) + (y - cy) * np.cos(bearing)
        across = -(x - cx) * np.cos(bearing) + (y - cy) * np.sin(bearing)
        r2 = (along / massif.along_km) ** 2 + (across / massif.across_km) ** 2
        total += massif.height_m * np.exp(-r2)
    return total


def _carve_rivers(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Lower the land towards each river's water level inside its valley."""
    for river in RIVERS:
        vx, vy = to_km(*np.array(river.vertices).T)
        dist, segment, t = polyline_distance(x, y, vx, vy)
        levels = np.asarray(river.water_level_m, float)
        level = levels[segment] + t * (levels[segment + 1] - levels[segment])
        bank = np.maximum(dist - river.half_width_m / 1000.0, 0.0)
        keep = 1.0 - np.exp(-((bank / river.valley_km) ** 2))
        z = np.where(dist < 4.0 * river.valley_km, level + (np.maximum(z, level) - level) * keep, z)
    return z


def elevation(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """Ground elevation in metres above sea level at WGS84 lon/lat (any array shape)."""
    shape = np.broadcast(lon, lat).shape
    lon = np.broadcast_to(np.asarray(lon, float), shape).ravel()
    lat = np.broadcast_to(np.asarray(lat, float), shape).ravel()
    x, y = to_km(lon, lat)
    # Rolling hills of the Sichuan basin in the west, rising towards the eastern mountains.
    base = 330.0 + 420.0 * _smoothstep(107.0, 108.6, lon)
    relief = _massifs(x, y) + _ridges(x, y)
    # Rougher where the land is high: mountains get proportionally larger noise.
    roughness = 95.0 + 0.4 * relief + 0.3 * (base - 330.0)
    z = base + relief + roughness * _noise(x, y)
    z = _carve_rivers(x, y, z)
    return np.maximum(z, 140.0).reshape(shape)


def quantise(z: np.ndarray) -> np.ndarray:
    return (np.round(z / ELEVATION_STEP) * ELEVATION_STEP).astype(np.float32)


@dataclass(frozen=True)
class Dem:
    """One DEM raster held in memory, sampled like ``rasterio``'s ``DatasetReader.sample``."""

    values: np.ndarray  # float32, (rows, cols)
    transform: Affine

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        rows, cols = self.values.shape
        left, top = self.transform.c, self.transform.f
        return left, top + rows * self.transform.e, left + cols * self.transform.a, top

    def covers(self, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        left, bottom, right, top = self.bounds
        return (lon >= left) & (lon < right) & (lat > bottom) & (lat <= top)

    def sample(self, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        rows, cols = rowcol(self.transform, np.asarray(lon, float), np.asarray(lat, float))
        rows = np.clip(np.asarray(rows), 0, self.values.shape[0] - 1)
        cols = np.clip(np.asarray(cols), 0, self.values.shape[1] - 1)
        return self.values[rows, cols].astype(float)


@dataclass(frozen=True)
class Terrain:
    municipality: Dem
    central: Dem

    def ground(self, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        """Ground elevation from the rasters: the central one where it covers the point."""
        lon = np.atleast_1d(np.asarray(lon, float))
        lat = np.atleast_1d(np.asarray(lat, float))
        values = self.municipality.sample(lon, lat)
        inside = self.central.covers(lon, lat)
        values[inside] = self.central.sample(lon[inside], lat[inside])
        return values


def _grid(bounds: tuple[float, float, float, float], cell: float) -> tuple[Affine, int, int]:
    """A north-up grid snapped outwards to whole cells."""
    west, south, east, north = bounds
    left = np.floor(west / cell) * cell
    top = np.ceil(north / cell) * cell
    cols = int(np.ceil(round((east - left) / cell, 6)))
    rows = int(np.ceil(round((top - south) / cell, 6)))
    return from_origin(float(left), float(top), cell, cell), rows, cols


def _evaluate(transform: Affine, rows: int, cols: int, band_rows: int = 256) -> np.ndarray:
    """elevation() at every cell centre, a band of rows at a time to bound memory."""
    out = np.empty((rows, cols), np.float32)
    lon = transform.c + (np.arange(cols) + 0.5) * transform.a
    for start in range(0, rows, band_rows):
        stop = min(rows, start + band_rows)
        lat = transform.f + (np.arange(start, stop) + 0.5) * transform.e
        glon, glat = np.meshgrid(lon, lat)
        out[start:stop] = quantise(elevation(glon, glat))
    return out


def _write(path: Path, dem: Dem) -> None:
    rows, cols = dem.values.shape
    profile = {
        "driver": "GTiff", "width": cols, "height": rows, "count": 1, "dtype": "float32",
        "crs": "EPSG:4326", "transform": dem.transform, "nodata": NODATA,
        "tiled": True, "blockxsize": 256, "blockysize": 256,
        "compress": "deflate", "predictor": 3, "interleave": "band",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(dem.values, 1)
        dst.update_tags(AREA_OR_POINT="Area", units="metre")


def build_terrain(
    municipality: gpd.GeoSeries,
    central_bounds: tuple[float, float, float, float],
    cell_deg: float,
    central_cell_deg: float,
    out_dir: Path,
) -> Terrain:
    """Evaluate the terrain into both DEMs, write them to ``out_dir`` and return them."""
    transform, rows, cols = _grid(MUNICIPALITY_BOUNDS, cell_deg)
    values = _evaluate(transform, rows, cols)
    # all_touched: every point inside the municipality falls in a cell that has a value.
    outside = geometry_mask(list(municipality), (rows, cols), transform, all_touched=True)
    values[outside] = NODATA
    coarse = Dem(values, transform)

    transform, rows, cols = _grid(central_bounds, central_cell_deg)
    fine = Dem(_evaluate(transform, rows, cols), transform)

    out_dir.mkdir(parents=True, exist_ok=True)
    _write(out_dir / MUNICIPALITY_FILE, coarse)
    _write(out_dir / CENTRAL_FILE, fine)
    log.info("DEMs: municipality %s cells, central %s cells", coarse.values.shape,
             fine.values.shape)
    return Terrain(coarse, fine)

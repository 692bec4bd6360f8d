"""Elevation where the city stands: which DEM answers at a place, and its height there.

One terrain serves the 3D view (quantized-mesh, tiles/quantized_mesh.py) and the ground of
every building in the 3D tiles (tiles/buildings3d.py); both read heights through this module,
so a block stands on the same ground the client draws. A DEM layer's *stack* is the finer
DEMs that lie inside it, finest first, then the layer itself: the built-in municipality DEM
hands the central urban area to its 20 m DEM (built-in DEMs only: an upload never reshapes
the city's terrain).

The surface between pixel centres is bilinear (``surface_heights``): equal to the DEM at
every pixel centre, the surface the terrain meshes stay within their stated error of.

Heights are the DEM's values, taken as metres above the WGS84 ellipsoid (what 3D Tiles and
quantized-mesh carry); a DEM of orthometric heights would need a geoid model first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import rasterio
import rasterio.errors

from twin.core.errors import InvalidParameter, TwinError
from twin.core.layer import Layer, LayerRegistry
from twin.core.local_files import local_path
from twin.core.principal import Scope
from twin.core.raster_facts import GDAL_OPTIONS
from twin.core.scope import layer_visible


@dataclass(frozen=True)
class DemArray:
    """A DEM in memory: heights (rows north to south), NaN where there is no data."""

    heights: np.ndarray
    transform: rasterio.Affine
    bounds: tuple[float, float, float, float]

    @property
    def pixel_deg(self) -> float:
        return abs(self.transform.a)


def is_dem(layer: Layer) -> bool:
    return layer.kind == "raster" and bool(layer.file_path) and bool(layer.meta.get("dem"))


def dem_layer(layer: Layer) -> Layer:
    if not is_dem(layer):
        raise InvalidParameter(f"layer '{layer.id}' is not an elevation model (a single-band "
                               "DEM raster); terrain is made from DEM layers only")
    return layer


def read_dem(layer: Layer) -> DemArray:
    path = local_path(dem_layer(layer))  # an uploaded DEM's is fetched on first use
    return _read(path, path.stat().st_mtime_ns)


@lru_cache(maxsize=8)
def _read(path: Path, modified_ns: int) -> DemArray:
    # The sample DEMs are a few MB; an uploaded DEM is read once per version of its file.
    with rasterio.Env(**GDAL_OPTIONS), rasterio.open(path) as src:
        if src.crs is None or src.crs.to_epsg() != 4326:
            raise InvalidParameter(f"DEM '{path.name}': terrain needs a DEM in EPSG:4326, "
                                   f"this one is in {src.crs}")
        band = src.read(1, masked=True)
        heights = np.ma.filled(band.astype(np.float64), np.nan)
        return DemArray(heights, src.transform, tuple(src.bounds))


def _inside(inner: Sequence[float] | None, outer: Sequence[float] | None) -> bool:
    if not inner or not outer:
        return False
    return (inner[0] >= outer[0] and inner[1] >= outer[1] and inner[2] <= outer[2]
            and inner[3] <= outer[3])


def dem_stack(registry: LayerRegistry, layer: Layer) -> list[Layer]:
    """``layer`` and the finer DEM layers inside its bounds, finest first.

    Only the built-in DEMs fuse: an uploaded DEM is a terrain of its own, never a silent
    change to the city's terrain (and to the ground every building stands on) for everyone.
    """
    dem_layer(layer)
    finer = [other for other in registry
             if other.id != layer.id and is_dem(other) and _inside(other.bbox, layer.bbox)
             and other.origin == "builtin" and layer.origin == "builtin"]
    finer.sort(key=lambda other: (read_dem(other).pixel_deg, other.id))
    own = read_dem(layer).pixel_deg
    return [other for other in finer if read_dem(other).pixel_deg < own] + [layer]


def _bilinear(dem: DemArray, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """The DEM's surface at the points (see the module docstring); NaN where it has none.

    ``lon`` and ``lat`` broadcast against each other: a row of longitudes and a column of
    latitudes give the grid at once (the DEM is north-up, so columns follow longitude and
    rows latitude alone).
    """
    heights = dem.heights
    rows, cols = heights.shape
    t = dem.transform
    col = (np.asarray(lon, dtype=np.float64) - t.c) / t.a
    row = (np.asarray(lat, dtype=np.float64) - t.f) / t.e
    inside = (col >= 0) & (col <= cols) & (row >= 0) & (row <= rows)
    c = np.clip(col - 0.5, 0.0, cols - 1.0)
    r = np.clip(row - 0.5, 0.0, rows - 1.0)
    c0 = np.minimum(np.floor(c), max(cols - 2, 0)).astype(np.int64)
    r0 = np.minimum(np.floor(r), max(rows - 2, 0)).astype(np.int64)
    fc, fr = c - c0, r - r0
    c1, r1 = np.minimum(c0 + 1, cols - 1), np.minimum(r0 + 1, rows - 1)
    total: np.ndarray | float = 0.0
    weight: np.ndarray | float = 0.0
    for rr, cc, w in ((r0, c0, (1 - fr) * (1 - fc)), (r0, c1, (1 - fr) * fc),
                      (r1, c0, fr * (1 - fc)), (r1, c1, fr * fc)):
        h = heights[rr, cc]
        valid = ~np.isnan(h)
        w = np.where(valid, w, 0.0)
        total = total + np.where(valid, h, 0.0) * w
        weight = weight + w
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(inside & (weight > 0), total / weight, np.nan)


def surface_heights(dems: Sequence[DemArray], lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """The stack's surface at the points (broadcast as ``_bilinear``): the first DEM with
    data there, else 0 m."""
    out: np.ndarray | None = None
    for dem in dems:
        if dem.transform.b or dem.transform.d:
            raise ValueError("terrain needs north-up DEMs")
        heights = _bilinear(dem, lon, lat)
        out = heights if out is None else np.where(np.isnan(out), heights, out)
        if not np.isnan(out).any():
            break
    if out is None:
        return np.zeros(np.broadcast_shapes(np.shape(lon), np.shape(lat)))
    return np.nan_to_num(out, nan=0.0)


def visible_stack(registry: LayerRegistry, layer: Layer, scope: Scope) -> list[Layer]:
    """The layer's DEM stack (400 for a layer that is no DEM, or whose DEM cannot make
    terrain), of the DEMs the caller may see (an unshared upload of another centre never
    shapes its terrain) and can serve terrain (a finer DEM uploaded in a projected CRS, which
    this module does not read, is left out rather than failing the municipality's)."""
    read_dem(dem_layer(layer))
    usable = [other for other in registry if other.id == layer.id or (
        layer_visible(scope, other.owner_scope, other.shared)
        and (not is_dem(other) or _readable(other)))]
    return dem_stack(LayerRegistry(usable), layer)


def _readable(layer: Layer) -> bool:
    try:
        read_dem(layer)
    except (TwinError, OSError, rasterio.errors.RasterioError):  # e.g. not stored, corrupt
        return False
    return True


def ground_heights(dems: Sequence[Layer], lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """The terrain's surface at the points: what the quantized-mesh terrain is drawn from
    (bilinear between pixel centres of the first DEM of the stack with data; 0 m where none),
    so a building stands where the client draws the ground."""
    return surface_heights([read_dem(layer) for layer in dems], lon, lat)

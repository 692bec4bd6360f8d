"""Elevation where the city stands: which DEM answers at a place, and its height there.

One terrain serves the 3D view (quantized-mesh, tiles/quantized_mesh.py) and the ground of
every building in the 3D tiles (tiles/buildings3d.py); both read heights through this module,
so a block stands on the same ground the client draws. A DEM layer's *stack* is the finer
DEMs that lie inside it, finest first, then the layer itself: the built-in municipality DEM
hands the central urban area to its 20 m DEM.

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

from twin.core.errors import InvalidParameter
from twin.core.layer import Layer, LayerRegistry
from twin.core.raster_facts import GDAL_OPTIONS


@dataclass(frozen=True)
class DemArray:
    """A DEM in memory: heights (rows north to south), NaN where there is no data."""

    heights: np.ndarray
    transform: rasterio.Affine
    bounds: tuple[float, float, float, float]

    @property
    def pixel_deg(self) -> float:
        return abs(self.transform.a)

    def sample(self, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        """Nearest pixel (the pixel containing the point, as ``rasterio.sample`` reads);
        NaN outside the DEM or on nodata."""
        col, row = ~self.transform @ (np.asarray(lon, dtype=np.float64),
                                      np.asarray(lat, dtype=np.float64))
        col, row = np.floor(col).astype(np.int64), np.floor(row).astype(np.int64)
        rows, cols = self.heights.shape
        inside = (row >= 0) & (row < rows) & (col >= 0) & (col < cols)
        out = np.full(np.shape(col), np.nan)
        out[inside] = self.heights[row[inside], col[inside]]
        return out


def is_dem(layer: Layer) -> bool:
    return layer.kind == "raster" and bool(layer.file_path) and bool(layer.meta.get("dem"))


def dem_layer(layer: Layer) -> Layer:
    if not is_dem(layer):
        raise InvalidParameter(f"layer '{layer.id}' is not an elevation model (a single-band "
                               "DEM raster); terrain is made from DEM layers only")
    return layer


def read_dem(layer: Layer) -> DemArray:
    path = Path(dem_layer(layer).file_path or "")
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
    """``layer`` and the finer DEM layers inside its bounds, finest first."""
    dem_layer(layer)
    finer = [other for other in registry
             if other.id != layer.id and is_dem(other) and _inside(other.bbox, layer.bbox)]
    finer.sort(key=lambda other: (read_dem(other).pixel_deg, other.id))
    own = read_dem(layer).pixel_deg
    return [other for other in finer if read_dem(other).pixel_deg < own] + [layer]


def ground_heights(dems: Sequence[Layer], lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """Heights at the points from the first DEM of the stack with data there; NaN where none."""
    lon, lat = np.asarray(lon, dtype=np.float64), np.asarray(lat, dtype=np.float64)
    out = np.full(lon.shape, np.nan)
    for layer in dems:
        missing = np.isnan(out)
        if not missing.any():
            break
        out[missing] = read_dem(layer).sample(lon[missing], lat[missing])
    return out

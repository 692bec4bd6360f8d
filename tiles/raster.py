"""Raster tiles (PNG/WebP) of raster layers: a library, no HTTP.

rio-tiler reads the Web Mercator tile out of the (COG or tiled) GeoTIFF, reprojecting on the
fly with GDAL's warper; this module only decides how the values become colours: RGB(A) bytes
as they are, a single band (a DEM) stretched over the layer's range through a colour ramp.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import rasterio
from rio_tiler.colormap import cmap
from rio_tiler.errors import TileOutsideBounds
from rio_tiler.io import Reader
from rio_tiler.models import ImageData

from twin.core.errors import InvalidParameter, NotFound
from twin.core.layer import Layer
from twin.core.local_files import local_path
from twin.core.raster_facts import GDAL_OPTIONS, describe_raster

TILE_SIZE = 256
FORMATS = {"png": ("PNG", "image/png"), "webp": ("WEBP", "image/webp")}
# A DEM's colour ramp (matplotlib's 'terrain', shipped with rio-tiler).
DEM_COLORMAP = cmap.get("terrain")


@dataclass(frozen=True)
class RasterTile:
    content: bytes
    media_type: str


def check_raster(layer: Layer) -> None:
    """400 unless ``layer`` is a raster layer (without touching its file)."""
    if layer.kind != "raster" or not layer.file_path:
        raise InvalidParameter(f"layer '{layer.id}' is a {layer.kind} layer; raster tiles "
                               "serve raster layers only (vector layers: .mvt)")


def raster_layer(layer: Layer) -> Path:
    """The raster's file on this node (an upload's is fetched on first use: call it in a
    worker thread, never on the event loop)."""
    check_raster(layer)
    return local_path(layer)


@lru_cache(maxsize=64)
def value_range(path: Path, modified: float) -> tuple[float, float]:
    """Min and max of the raster (from a decimated read), cached per file version."""
    facts = describe_raster(path)
    return facts["min"], facts["max"]


def read_tile(path: Path, z: int, x: int, y: int, tilesize: int = TILE_SIZE) -> ImageData:
    """The tile's values in Web Mercator (nearest neighbour: every pixel is a source value)."""
    with rasterio.Env(**GDAL_OPTIONS), Reader(str(path)) as src:
        if not src.tile_exists(x, y, z):
            raise NotFound(f"tile {z}/{x}/{y} is outside the layer's bounds")
        try:
            return src.tile(x, y, z, tilesize=tilesize, reproject_method="nearest")
        except TileOutsideBounds:
            raise NotFound(f"tile {z}/{x}/{y} is outside the layer's bounds") from None


def render_tile(layer: Layer, z: int, x: int, y: int, fmt: str) -> RasterTile:
    """A coloured tile: RGB(A) rasters as they are, single bands through the DEM ramp."""
    if fmt not in FORMATS:
        raise InvalidParameter(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    driver, media_type = FORMATS[fmt]
    path = raster_layer(layer)
    image = read_tile(path, z, x, y)
    if image.count == 1:
        low, high = value_range(path, path.stat().st_mtime)
        image = image.rescale(in_range=((low, max(high, low + 1e-6)),))
        content = image.render(img_format=driver, colormap=DEM_COLORMAP)
    else:
        if image.data.dtype != np.uint8:
            low, high = value_range(path, path.stat().st_mtime)
            image = image.rescale(in_range=((low, max(high, low + 1e-6)),) * image.count)
        content = ImageData(image.array[:3]).render(img_format=driver) if image.count > 4 \
            else image.render(img_format=driver)
    return RasterTile(content, media_type)

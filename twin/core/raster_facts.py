"""What a raster file holds (bbox in EPSG:4326, size, bands, value range, whether it is a DEM),
read the same way by ingestion, registration and the raster tile service; and the GDAL options
under which twin opens any raster.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import ColorInterp
from rasterio.warp import transform_bounds

# GDAL (rasterio's copy) opens only the GTiff driver and never reaches the network.
GDAL_OPTIONS = {"CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".twin-no-network",
                "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR", "GDAL_HTTP_MAX_RETRY": "0"}
DEM_DTYPES = {"float32", "float64", "int16", "int32", "uint16"}
WEB_MERCATOR_M = 40075016.686
STATS_SIZE = 1024

def describe_raster(path: Path) -> dict:
    with rasterio.Env(**GDAL_OPTIONS), rasterio.open(path) as src:
        bbox = list(transform_bounds(src.crs, "EPSG:4326", *src.bounds, densify_pts=21))
        dtype = src.dtypes[0]
        # An alpha band is a mask, not data (rio-tiler reads it as the tile's mask too).
        bands = [i for i, c in enumerate(src.colorinterp, 1) if c != ColorInterp.alpha]
        scale = max(STATS_SIZE / src.width, STATS_SIZE / src.height, 1 / 64)
        shape = (len(bands), max(1, math.ceil(src.height * min(scale, 1))),
                 max(1, math.ceil(src.width * min(scale, 1))))
        sample = src.read(bands, out_shape=shape, masked=True)
        valid = sample.compressed()
        low, high = (float(valid.min()), float(valid.max())) if valid.size else (0.0, 0.0)
        # Metres per pixel at the centre latitude -> the zoom where one pixel is one screen px.
        centre_lat = (bbox[1] + bbox[3]) / 2
        res_deg = (bbox[2] - bbox[0]) / src.width
        res_m = max(res_deg * WEB_MERCATOR_M / 360 * math.cos(math.radians(centre_lat)), 1e-3)
        max_zoom = int(np.clip(math.ceil(math.log2(WEB_MERCATOR_M / 256 / res_m)), 0, 22))
        return {
            "bbox": bbox, "width": src.width, "height": src.height, "bands": len(bands),
            "dtype": dtype, "nodata": _json_number(src.nodata), "min": low, "max": high,
            "dem": len(bands) == 1 and dtype in DEM_DTYPES, "max_zoom": max_zoom,
        }


# What a raster layer's ``meta`` keeps of ``describe_raster`` (the web map draws a hillshade
# for a ``dem``).
META_KEYS = ("width", "height", "bands", "dtype", "nodata", "min", "max", "dem")


def raster_meta(facts: dict) -> dict:
    return {key: facts[key] for key in META_KEYS}


def _json_number(value: float | None) -> float | str | None:
    """NaN is no JSON number: the layer's meta says 'nan'."""
    return "nan" if value is not None and math.isnan(value) else value

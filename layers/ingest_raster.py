"""GeoTIFF uploads become Cloud-Optimized GeoTIFFs (rio-cogeo), served by tiles/raster.py.

The COG keeps the source CRS (rio-tiler reprojects per tile); only the bbox is in EPSG:4326.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import rasterio
from pyproj import CRS
from rasterio.warp import transform_bounds
from rio_cogeo.cogeo import cog_translate
from rio_cogeo.profiles import cog_profiles

from layers.crs import SourceError, choose_crs, describe
from twin.settings import UploadSettings

# GDAL (rasterio's copy) opens only the GTiff driver and never reaches the network.
GDAL_OPTIONS = {"CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".twin-no-network",
                "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR", "GDAL_HTTP_MAX_RETRY": "0"}
DEM_DTYPES = {"float32", "float64", "int16", "int32", "uint16"}
WEB_MERCATOR_M = 40075016.686
STATS_SIZE = 1024


def check_raster(path: Path, limits: UploadSettings) -> None:
    """Refuse huge or empty rasters from the header alone (before any pixel is read)."""
    with rasterio.Env(**GDAL_OPTIONS), rasterio.open(path, driver="GTiff") as src:
        pixels = src.width * src.height
        if pixels > limits.max_raster_pixels:
            raise SourceError(f"the raster is {src.width} x {src.height} = {pixels} pixels; "
                              f"the limit is {limits.max_raster_pixels} "
                              "(TWIN_UPLOADS_MAX_RASTER_PIXELS)")
        if src.count == 0 or pixels == 0:
            raise SourceError("the raster has no pixels")


def to_cog(source: Path, target: Path, declared: CRS | None) -> dict:
    """Write ``target`` as a COG; returns the facts the layer row and the renderer need."""
    work = target.with_suffix(".source.tif")
    shutil.copyfile(source, work)
    with rasterio.Env(**GDAL_OPTIONS):
        with rasterio.open(work, "r+", driver="GTiff") as src:
            file_crs = CRS.from_user_input(src.crs) if src.crs else None
            crs = choose_crs(file_crs, declared,
                             "the GeoTIFF has no CRS (no GeoKeys) and no source_crs was given")
            if declared is not None:
                src.crs = rasterio.crs.CRS.from_wkt(crs.to_wkt())
            if src.transform.is_identity:
                raise SourceError("the GeoTIFF has no georeferencing (no geotransform)")
        profile = cog_profiles.get("deflate")
        cog_translate(str(work), str(target), profile, quiet=True, overview_resampling="average",
                      in_memory=False)
    work.unlink()
    return describe_raster(target) | {"crs": crs.to_wkt(), "crs_name": describe(crs)}


def describe_raster(path: Path) -> dict:
    with rasterio.Env(**GDAL_OPTIONS), rasterio.open(path) as src:
        bbox = list(transform_bounds(src.crs, "EPSG:4326", *src.bounds, densify_pts=21))
        dtype = src.dtypes[0]
        scale = max(STATS_SIZE / src.width, STATS_SIZE / src.height, 1 / 64)
        shape = (src.count, max(1, math.ceil(src.height * min(scale, 1))),
                 max(1, math.ceil(src.width * min(scale, 1))))
        sample = src.read(out_shape=shape, masked=True)
        valid = sample.compressed()
        low, high = (float(valid.min()), float(valid.max())) if valid.size else (0.0, 0.0)
        # Metres per pixel at the centre latitude -> the zoom where one pixel is one screen px.
        centre_lat = (bbox[1] + bbox[3]) / 2
        res_deg = (bbox[2] - bbox[0]) / src.width
        res_m = max(res_deg * WEB_MERCATOR_M / 360 * math.cos(math.radians(centre_lat)), 1e-3)
        max_zoom = int(np.clip(math.ceil(math.log2(WEB_MERCATOR_M / 256 / res_m)), 0, 22))
        return {
            "bbox": bbox, "width": src.width, "height": src.height, "bands": src.count,
            "dtype": dtype, "nodata": src.nodata, "min": low, "max": high,
            "dem": src.count == 1 and dtype in DEM_DTYPES, "max_zoom": max_zoom,
        }

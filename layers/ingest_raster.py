"""GeoTIFF uploads become Cloud-Optimized GeoTIFFs (rio-cogeo), served by tiles/raster.py.

The COG keeps the source CRS (rio-tiler reprojects per tile); only the bbox is in EPSG:4326.
A raster drawn on GCJ-02/BD-09 coordinates (cut from a commercial map) is first warped onto
true positions (``undo_offset``).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import rasterio
from pyproj import CRS, Transformer
from rasterio.control import GroundControlPoint
from rasterio.enums import ColorInterp, Resampling
from rasterio.transform import array_bounds
from rasterio.warp import calculate_default_transform, reproject, transform_bounds
from rio_cogeo.cogeo import cog_translate
from rio_cogeo.profiles import cog_profiles

from layers.coordinates import check_extent
from layers.crs import Datum, SourceError, choose_crs, describe
from layers.safety import TooLarge, UploadRefused
from twin.core.datum import coords_to_wgs84
from twin.core.raster_facts import GDAL_OPTIONS, describe_raster
from twin.core.settings import UploadSettings

# Ground control points for undoing an offset datum. The GCJ-02 offset's shortest wave is
# 1/3 degree long; GCPs 100 pixels apart (0.02-0.25 degrees) keep the thin-plate spline within
# ~0.01 pixel of the exact offset up to a degree across; 10 to 24 per axis keep GDAL's solve
# quick. Past that the cap shows: 4 degrees across is within ~22 m (0.2 px at 100 m pixels).
GCP_SPACING_PX = 100
GCP_SPACING_DEG = (0.02, 0.25)
GCP_GRID = (10, 24)


def check_raster(path: Path, limits: UploadSettings) -> None:
    """Refuse huge or empty rasters from the header alone (before any pixel is read); runs in
    the request, so the answer is a 413/400 at once."""
    try:
        with rasterio.Env(**GDAL_OPTIONS), rasterio.open(path, driver="GTiff") as src:
            width, height, count = src.width, src.height, src.count
    except rasterio.errors.RasterioIOError as error:
        message = str(error).replace(str(path.parent) + "/", "")
        raise UploadRefused(f"file: the GeoTIFF cannot be read ({message})") from None
    pixels = width * height
    if pixels > limits.max_raster_pixels:
        raise TooLarge(f"file: the raster is {width} x {height} = {pixels} pixels; the limit "
                       f"is {limits.max_raster_pixels} (TWIN_UPLOADS_MAX_RASTER_PIXELS)")
    if count == 0 or pixels == 0:
        raise UploadRefused("file: the raster has no pixels")


def to_cog(source: Path, target: Path, declared: CRS | None, datum: Datum = Datum.WGS84,
           progress: Callable[[int, str], None] | None = None) -> dict:
    """Write ``target`` as a COG; returns the facts the layer row and the renderer need."""
    progress = progress or (lambda percent, step: None)
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
            # Before any pixel moves: a raster placed nowhere on the earth is refused.
            check_extent(tuple(src.bounds), crs)
        if datum != Datum.WGS84:
            progress(15, f"moving pixels from {datum.upper()} to WGS84 positions")
            corrected = target.with_suffix(".corrected.tif")
            undo_offset(work, corrected, datum)
            work.unlink()
            work = corrected
        progress(20, "converting to Cloud-Optimized GeoTIFF")
        profile = cog_profiles.get("deflate")
        cog_translate(str(work), str(target), profile, quiet=True, overview_resampling="average",
                      in_memory=False)
    work.unlink()
    return describe_raster(target) | {"crs": crs.to_wkt(), "crs_name": describe(crs)}


def undo_offset(source: Path, target: Path, datum: Datum) -> None:
    """Warp a raster whose coordinates carry a GCJ-02/BD-09 offset onto true positions.

    The offset is smooth (a few hundred metres, changing over kilometres), so a grid of ground
    control points (pixel position -> corrected coordinate, by prcoords) and GDAL's
    thin-plate-spline transformer, exact at every GCP, place each pixel. Nearest neighbour
    keeps the source values (a DEM's heights, a classification's codes); the CRS stays.
    """
    with rasterio.open(source, "r+") as src:
        crs, resolution = src.crs, src.res
        gcps = offset_gcps(crs, src.transform, src.width, src.height, datum)
        # GDAL's warper reads GCPs from the source dataset (``source`` is twin's own copy).
        src.gcps = (gcps, crs)
    with rasterio.open(source) as src:
        transform, width, height = calculate_default_transform(
            crs, crs, src.width, src.height, gcps=gcps, resolution=resolution)
        src_alpha = next((i for i, c in enumerate(src.colorinterp, 1)
                          if c == ColorInterp.alpha), 0)
        bands = [i for i in range(1, src.count + 1) if i != src_alpha]
        nodata = src.nodata
        if nodata is None and not src_alpha \
                and np.issubdtype(np.dtype(src.dtypes[0]), np.floating):
            nodata = float("nan")
        # Integers without a nodata value get an alpha band to mark the uncovered edges
        # (an RGBA source keeps its own).
        alpha = src_alpha or (src.count + 1 if nodata is None else 0)
        profile = {"driver": "GTiff", "width": width, "height": height,
                   "count": max(src.count, alpha), "dtype": src.dtypes[0],
                   "crs": crs, "transform": transform, "nodata": nodata, "tiled": True,
                   "blockxsize": 512, "blockysize": 512, "compress": "deflate",
                   "BIGTIFF": "IF_SAFER"}
        with rasterio.open(target, "w", **profile) as dst:
            if alpha > src.count:
                dst.colorinterp = [*src.colorinterp, ColorInterp.alpha]
            else:
                dst.colorinterp = src.colorinterp
            reproject(rasterio.band(src, bands), rasterio.band(dst, bands), gcps=gcps,
                      src_crs=crs, dst_transform=transform, dst_crs=crs,
                      src_nodata=src.nodata, dst_nodata=nodata, src_alpha=src_alpha,
                      dst_alpha=alpha,
                      resampling=Resampling.nearest, SRC_METHOD="GCP_TPS")


def offset_gcps(crs, transform, width: int, height: int, datum: Datum
                ) -> list[GroundControlPoint]:
    """A grid of GCPs over the raster: pixel corners and the true place of their coordinates."""
    to_lonlat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    west, south, east, north = transform_bounds(crs, "EPSG:4326",
                                                *array_bounds(height, width, transform))
    spacing = float(np.clip(GCP_SPACING_PX * (east - west) / width, *GCP_SPACING_DEG))
    counts = [int(np.clip(math.ceil(span / spacing) + 1, *GCP_GRID))
              for span in (north - south, east - west)]
    rows, cols = np.meshgrid(np.linspace(0, height, counts[0]), np.linspace(0, width, counts[1]),
                             indexing="ij")
    xs, ys = transform * (cols.ravel(), rows.ravel())
    lon, lat = to_lonlat.transform(xs, ys)
    true = coords_to_wgs84(np.column_stack([lon, lat]), datum)
    x, y = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(true[:, 0], true[:, 1])
    return [GroundControlPoint(row=r, col=c, x=float(gx), y=float(gy), z=0.0)
            for r, c, gx, gy in zip(rows.ravel(), cols.ravel(), x, y, strict=True)]

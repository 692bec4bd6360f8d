"""Raster and terrain tiles: decoded with rasterio and compared with the DEM sampled at each
tile pixel's centre (the oracle: plain index arithmetic on the source array)."""

from __future__ import annotations

import warnings

import morecantile
import numpy as np
import pytest
import rasterio
import rasterio.warp
from pyproj import Transformer
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile
from rio_cogeo.cogeo import cog_validate
from sqlalchemy import text

from tests.uploads import (
    dem_values,
    geotiff,
    upload_ok,
)
from tiles.terrain import decode, encode_mapbox, encode_terrarium

# The upload server and its client (fixtures shared by the upload tests).


TMS = morecantile.tms.get("WebMercatorQuad")
TO_LONLAT = Transformer.from_crs("EPSG:3857", "EPSG:4326", always_xy=True)
JIEFANGBEI = (106.5770, 29.5576)


def read_png(content: bytes) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with MemoryFile(content) as memory, memory.open() as image:
            return image.read()


def pixel_centres(tile: morecantile.Tile, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    bounds = TMS.xy_bounds(tile)
    res = (bounds.right - bounds.left) / size
    cols, rows = np.meshgrid(np.arange(size), np.arange(size))
    return TO_LONLAT.transform(bounds.left + (cols + 0.5) * res, bounds.top - (rows + 0.5) * res)


def dem_at(values: np.ndarray, transform, nodata, lon: np.ndarray, lat: np.ndarray
           ) -> np.ma.MaskedArray:
    """The oracle: the source cell holding each point (outside or nodata -> masked)."""
    col = np.floor((lon - transform.c) / transform.a).astype(int)
    row = np.floor((lat - transform.f) / transform.e).astype(int)
    inside = (row >= 0) & (row < values.shape[0]) & (col >= 0) & (col < values.shape[1])
    out = np.ma.masked_all(lon.shape, dtype=np.float64)
    out[inside] = values[row[inside], col[inside]]
    if nodata is not None:
        out = np.ma.masked_where(out == nodata, out)
    return out


def assert_matches(served: np.ndarray, oracle: np.ma.MaskedArray, step: float) -> None:
    """Every pixel within one encoding step of the oracle, but for a few at cell borders where
    GDAL's approximate warp transformer picks the neighbouring cell."""
    valid = ~np.ma.getmaskarray(oracle)
    assert valid.sum() > 1000
    close = np.abs(served[valid] - oracle.data[valid]) <= step / 2 + 1e-6
    assert close.mean() > 0.99, close.mean()


def test_encodings_round_trip():
    elevation = np.array([[-412.3, 0.0, 2796.8, 8848.86]])
    assert np.allclose(decode(encode_mapbox(elevation), "mapbox"), elevation, atol=0.05)
    assert np.allclose(decode(encode_terrarium(elevation), "terrarium"), elevation,
                       atol=1 / 512)


@pytest.mark.parametrize("encoding,step", [("mapbox", 0.1), ("terrarium", 1 / 256)])
def test_builtin_dem_terrain_tiles_match_the_dem(api, sample_dir, encoding, step):
    with rasterio.open(sample_dir / "dem_central.tif") as dem:
        values, transform, nodata = dem.read(1), dem.transform, dem.nodata
    tile = TMS.tile(*JIEFANGBEI, 13)
    response = api.get(f"/tiles/terrain_central/{tile.z}/{tile.x}/{tile.y}.terrain.png",
                       params={"encoding": encoding})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    served = decode(read_png(response.content), encoding)
    assert_matches(served, dem_at(values, transform, nodata, *pixel_centres(tile)), step)
    cached = api.get(response.url, headers={"If-None-Match": response.headers["etag"]})
    assert cached.status_code == 304


@pytest.mark.parametrize("suffix,driver", [("png", "PNG"), ("webp", "WEBP")])
def test_builtin_dem_colour_tiles_are_transparent_where_there_is_no_data(api, sample_dir,
                                                                        suffix, driver):
    with rasterio.open(sample_dir / "dem_municipality.tif") as dem:
        values, transform, nodata = dem.read(1), dem.transform, dem.nodata
    # A tile on the municipality's western border: part data, part nodata.
    tile = TMS.tile(105.5, 29.5, 9)
    response = api.get(f"/tiles/terrain/{tile.z}/{tile.x}/{tile.y}.{suffix}")
    assert response.status_code == 200
    assert response.headers["content-type"] == f"image/{suffix}"
    image = read_png(response.content)
    assert image.shape == (4, 256, 256)
    oracle = dem_at(values, transform, nodata, *pixel_centres(tile))
    has_data = ~np.ma.getmaskarray(oracle)
    assert 0.05 < has_data.mean() < 0.95
    assert ((image[3] > 0) == has_data).mean() > 0.99


def test_raster_tilejson_and_kind_checks(api):
    terrain = api.get("/tiles/terrain_central/raster-tilejson.json",
                      params={"terrain": "terrarium"}).json()
    assert terrain["tiles"][0].split("&v=")[0].endswith(
        "/tiles/terrain_central/{z}/{x}/{y}.terrain.png?encoding=terrarium")
    assert terrain["encoding"] == "terrarium" and terrain["maxzoom"] == 15
    assert api.get("/tiles/terrain/raster-tilejson.json").json()["tiles"][0].split("?v=")[
        0].endswith(".png")
    assert api.get("/tiles/risk_points/10/800/420.png").status_code == 400
    assert api.get("/tiles/risk_points/raster-tilejson.json").status_code == 400
    assert api.get("/tiles/terrain/1/0/0.terrain.png").status_code == 404  # outside


def test_uploaded_geotiff_becomes_a_cog_served_as_terrain(api, engine):
    values, transform = dem_values()
    job = upload_ok(api, "dem.tif", geotiff(values, transform, "EPSG:4326"), title="DEM")
    layer = api.get(f"/layers/{job['layer_id']}").json()
    assert layer["kind"] == "raster" and layer["meta"]["dem"] is True
    assert layer["bbox"] == pytest.approx([106.50, 29.50, 106.60, 29.60])
    assert layer["meta"]["min"] == pytest.approx(values.min(), abs=1)
    with engine.connect() as conn:
        path = conn.execute(text("SELECT file_path FROM layers WHERE id = :id"),
                            {"id": job["layer_id"]}).scalar()
    assert cog_validate(path)[0], cog_validate(path)
    tile = TMS.tile(106.55, 29.55, 15)
    response = api.get(f"/tiles/{job['layer_id']}/{tile.z}/{tile.x}/{tile.y}.terrain.png")
    served = decode(read_png(response.content), "mapbox")
    assert_matches(served, dem_at(values, transform, None, *pixel_centres(tile)), 0.1)


def test_projected_geotiff_bbox_is_reprojected(api):
    to_gk = Transformer.from_crs("EPSG:4326", "EPSG:4524", always_xy=True)
    x0, y0 = to_gk.transform(*JIEFANGBEI)
    transform = rasterio.transform.from_origin(round(x0), round(y0), 30, 30)
    values = np.arange(100 * 120, dtype="float32").reshape(100, 120)
    job = upload_ok(api, "gk.tif", geotiff(values, transform, "EPSG:4524"), title="GK raster")
    layer = api.get(f"/layers/{job['layer_id']}").json()
    expected = rasterio.warp.transform_bounds(
        "EPSG:4524", "EPSG:4326", round(x0), round(y0) - 3000, round(x0) + 3600, round(y0),
        densify_pts=21)
    assert layer["bbox"] == pytest.approx(list(expected), abs=1e-6)
    assert layer["source_crs"] == "EPSG:4524"


@pytest.mark.parametrize(("layer_id", "file_name"), [("terrain", "dem_municipality.tif"),
                                                     ("terrain_central", "dem_central.tif")])
def test_builtin_dems_say_they_are_dems(api, sample_dir, layer_id, file_name):
    """As an uploaded DEM does: the web map draws a hillshade for a layer whose meta says dem."""
    meta = api.get(f"/layers/{layer_id}").json()["meta"]
    with rasterio.open(sample_dir / file_name) as dem:
        values = dem.read(1, masked=True)
        assert meta["dem"] is True and meta["bands"] == dem.count == 1
        assert (meta["width"], meta["height"], meta["dtype"]) == (dem.width, dem.height,
                                                                   dem.dtypes[0])
        # From a decimated read: within the full raster's range.
        assert float(values.min()) <= meta["min"] < meta["max"] <= float(values.max())

"""GeoTIFFs drawn on GCJ-02/BD-09 coordinates are warped onto true WGS84 positions.

The oracle is eviltransform (an implementation independent of prcoords, which twin uses): a
bright pixel placed at a known offset-datum position must land, in the published COG, on the
WGS84 position eviltransform computes for it, within half a pixel.
"""

from __future__ import annotations

import eviltransform
import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from sqlalchemy import Engine, text

from tests.uploads import geotiff, upload_ok

# The upload server and its client (fixtures shared by the upload tests).

CELL = 0.0002  # degrees, about 20 m: the GCJ-02 offset in Chongqing is ~25 cells
ORIGIN = (106.52, 29.60)
ROWS, COLS = 300, 400
BRIGHT = (117, 251)  # row, col of the marked pixel


def oracle_wgs84(lon: float, lat: float, datum: str) -> tuple[float, float]:
    if datum == "bd09":
        lat, lon = eviltransform.bd2gcj(lat, lon)
    wgs_lat, wgs_lon = eviltransform.gcj2wgs_exact(lat, lon)
    return wgs_lon, wgs_lat


def marked_raster(bands: int, dtype: str) -> np.ndarray:
    values = np.full((bands, ROWS, COLS), 10, dtype=dtype)
    values[:, BRIGHT[0], BRIGHT[1]] = 200
    return values[0] if bands == 1 else values


def cog_path(engine: Engine, layer_id: str) -> str:
    with engine.connect() as conn:
        return conn.execute(text("SELECT file_path FROM layers WHERE id = :id"),
                            {"id": layer_id}).scalar_one()


@pytest.mark.parametrize("datum,bands,dtype", [("gcj02", 1, "float32"), ("bd09", 3, "uint8")])
def test_offset_datum_raster_lands_on_the_wgs84_truth(api, engine, datum, bands, dtype):
    transform = from_origin(*ORIGIN, CELL, CELL)
    content = geotiff(marked_raster(bands, dtype), transform, "EPSG:4326", dtype=dtype)
    job = upload_ok(api, "amap.tif", content, title=f"raster in {datum}", datum=datum)
    assert job["report"]["datum"] == datum and not job["report"].get("warnings")
    assert (job["progress"], job["step"]) == (100, "published")
    layer = api.get(f"/layers/{job['layer_id']}").json()
    assert layer["source_datum"] == datum and layer["meta"]["bands"] == bands

    gcj_lon, gcj_lat = transform * (BRIGHT[1] + 0.5, BRIGHT[0] + 0.5)
    true_lon, true_lat = oracle_wgs84(gcj_lon, gcj_lat, datum)
    with rasterio.open(cog_path(engine, job["layer_id"])) as cog:
        band = cog.read(1, masked=True)
        row, col = np.unravel_index(np.argmax(band.filled(0)), band.shape)
        lon, lat = cog.xy(row, col)
        assert band[row, col] == 200 and (band == 200).sum() == 1
        assert cog.res == pytest.approx((CELL, CELL))
        # Within half a pixel of the truth, and really moved (the offset is ~25 cells).
        assert abs(lon - true_lon) <= CELL / 2 + 1e-9 and abs(lat - true_lat) <= CELL / 2 + 1e-9
        assert abs(lon - gcj_lon) > 10 * CELL
        # Cells the source did not cover are masked, not painted with a made-up value.
        assert set(np.unique(band.compressed()).tolist()) == {10, 200}
        assert band.count() > 0.98 * ROWS * COLS


def test_raster_far_outside_the_city_is_flagged(api):
    content = geotiff(marked_raster(1, "float32"), from_origin(116.3, 39.9, CELL, CELL),
                      "EPSG:4326")
    job = upload_ok(api, "beijing.tif", content, title="far raster")
    assert "outside Chongqing" in job["report"]["warnings"][0]

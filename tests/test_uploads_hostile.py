"""A corpus of hostile and broken files: each is refused with a 4xx (or a failed job) naming
the reason, nothing is published, nothing is left on disk, and the server stays up."""

from __future__ import annotations

import io
import json
import os
import sqlite3
import stat
import tempfile
import warnings
import zipfile
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import from_origin

from tests import uploads as support
from tests.uploads import (
    geojson_points,
    geotiff,
    minimal_glb,
    post_layer,
    wait,
    zip_bytes,
)

# The upload server and its client (fixtures shared by the upload tests).


SHP_PARTS = {"a.shp": b"\x00" * 100, "a.shx": b"\x00" * 100, "a.dbf": b"\x00" * 33}
XXE_KML = b"""<?xml version="1.0"?>
<!DOCTYPE kml [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<kml xmlns="http://www.opengis.net/kml/2.2"><Placemark><name>&xxe;</name>
<Point><coordinates>106.5,29.5</coordinates></Point></Placemark></kml>"""
NETWORK_KML = b"""<kml xmlns="http://www.opengis.net/kml/2.2"><NetworkLink>
<Link><href>http://169.254.169.254/latest/meta-data</href></Link></NetworkLink></kml>"""
VRT = b"""<VRTDataset rasterXSize="10" rasterYSize="10"><VRTRasterBand dataType="Byte" band="1">
<SimpleSource><SourceFilename>/vsicurl/http://example.com/x.tif</SourceFilename></SimpleSource>
</VRTRasterBand></VRTDataset>"""


def zip_with(info: zipfile.ZipInfo, data: bytes, extra: dict | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(info, data)
        for name, content in (extra or {}).items():
            archive.writestr(name, content)
    return buffer.getvalue()


def symlink_zip() -> bytes:
    info = zipfile.ZipInfo("a.shp")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return zip_with(info, b"/etc/passwd", {k: v for k, v in SHP_PARTS.items() if k != "a.shp"})


def encrypted_zip() -> bytes:
    """zipfile cannot write encrypted members: set the 'encrypted' flag of the first member
    in its local and central headers by hand."""
    data = bytearray(zip_bytes(SHP_PARTS))
    central = data.index(b"PK\x01\x02")
    data[6] |= 0x1
    data[central + 8] |= 0x1
    return bytes(data)


def bomb_zip() -> bytes:
    return zip_bytes({"a.shp": bytes(3_000_000), "a.shx": b"", "a.dbf": b""})


def big_total_zip() -> bytes:
    # Compresses about 60:1 (under the ratio limit) but unpacks past the 4 MB total.
    block = np.random.default_rng(1).bytes(20_000)
    members = {f"a{suffix}": block * 70 for suffix in (".shp", ".shx", ".dbf")}
    return zip_bytes(members)


def sqlite_not_gpkg() -> bytes:
    path = "/tmp/twin-test-not-gpkg.sqlite"
    if os.path.exists(path):
        os.unlink(path)
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (x int)")
    data = open(path, "rb").read()
    os.unlink(path)
    return data


def feature_collection(geometries) -> bytes:
    features = [{"type": "Feature", "properties": {"i": i}, "geometry": g}
                for i, g in enumerate(geometries)]
    return json.dumps({"type": "FeatureCollection", "features": features}).encode()


def sparse_huge_tiff() -> bytes:
    """A few KB on disk that declare 50,000 x 50,000 pixels (a raster decompression bomb)."""
    with rasterio.MemoryFile() as memory:
        with memory.open(driver="GTiff", width=50_000, height=50_000, count=1, dtype="uint8",
                         crs="EPSG:4326", transform=from_origin(106, 30, 1e-5, 1e-5),
                         tiled=True, compress="deflate", SPARSE_OK=True):
            pass
        return memory.read()


def many_points_shapefile() -> bytes:
    """One point more than the test server's feature limit, as a zipped Shapefile."""
    count = support.LIMITS.max_features + 1
    frame = gpd.GeoDataFrame({"i": np.arange(count) % 10},
                             geometry=gpd.points_from_xy(106.5 + np.arange(count) * 1e-5,
                                                         np.full(count, 29.5)), crs=4326)
    with tempfile.TemporaryDirectory() as folder:
        return support.shapefile_zip(Path(folder), frame, "utf-8")


POINT = {"type": "Point", "coordinates": [106.5, 29.5]}
LINE = {"type": "LineString", "coordinates": [[106.5, 29.5], [106.6, 29.6]]}
NO_CRS_TIFF = geotiff(np.ones((10, 10)), from_origin(0, 10, 1, 1), None)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", NotGeoreferencedWarning)
    NO_TRANSFORM_TIFF = geotiff(np.ones((10, 10)), rasterio.Affine.identity(), None)
HUGE_TIFF = geotiff(np.zeros((1001, 1000)), from_origin(106, 30, 0.0001, 0.0001), "EPSG:4326",
                    dtype="uint8")

# (case id, file name, content, form fields, expected status or "failed", reason substring)
CORPUS = [
    ("zip-slip-dotdot", "a.zip", zip_bytes({"../../evil.shp": b"x", **SHP_PARTS}), {}, 400,
     "zip slip"),
    ("zip-slip-absolute", "a.zip", zip_bytes({"/etc/evil.shp": b"x"}), {}, 400, "absolute"),
    ("zip-slip-drive", "a.zip", zip_bytes({"C:\\evil.shp": b"x"}), {}, 400, "absolute"),
    ("zip-symlink", "a.zip", symlink_zip(), {}, 400, "symbolic link"),
    ("zip-encrypted", "a.zip", encrypted_zip(), {}, 400, "encrypted"),
    ("zip-bomb-ratio", "a.zip", bomb_zip(), {}, 413, "zip bomb"),
    ("zip-too-many-members", "a.zip", zip_bytes({f"f{i}.txt": b"x" for i in range(21)}), {},
     413, "members"),
    ("zip-uncompressed-total", "a.zip", big_total_zip(), {}, 413, "unpacks to"),
    ("zip-nested-archive", "a.zip", zip_bytes({"inner.zip": zip_bytes(SHP_PARTS)}), {}, 400,
     "not part of a Shapefile"),
    ("zip-vrt-inside", "a.zip", zip_bytes({**SHP_PARTS, "a.vrt": VRT}), {}, 400,
     "not part of a Shapefile"),
    ("zip-no-shp", "a.zip", zip_bytes({"readme.txt": b"hello"}), {}, 400, "no .shp"),
    ("zip-no-dbf", "a.zip", zip_bytes({"a.shp": b"x", "a.shx": b"x"}), {}, 400, "no .dbf"),
    ("zip-two-shapefiles", "a.zip", zip_bytes({**SHP_PARTS, "b.shp": b"", "b.shx": b"",
                                               "b.dbf": b""}), {}, 400, "choose one"),
    ("zip-not-a-zip", "a.zip", b"PK\x03\x04 this is not really a zip", {}, 400,
     "not a readable ZIP"),
    ("vrt-as-tif", "dem.tif", VRT, {}, 400, "GDAL VRT"),
    ("text-as-tif", "dem.tif", b"hello, I am not a TIFF", {}, 400, "not a TIFF"),
    ("vsicurl-in-geojson", "a.geojson", b'{"type": "/vsicurl/http://example.com/x"}', {}, 400,
     "virtual path"),
    ("kml-xxe", "a.kml", XXE_KML, {}, 400, "external entities"),
    ("kml-network-link", "a.kml", NETWORK_KML, {}, 400, "NetworkLink"),
    ("kmz-xxe", "a.kmz", zip_bytes({"doc.kml": XXE_KML}), {}, 400, "external entities"),
    ("kml-not-kml", "a.kml", b"<html><body>hi</body></html>", {}, 400, "not a KML"),
    ("geojson-not-object", "a.geojson", b"[1, 2, 3]", {}, 400, "JSON object"),
    ("empty-file", "a.geojson", b"", {}, 400, "empty"),
    ("unknown-suffix", "a.exe", b"MZ\x90\x00", {}, 415, "allowed suffixes"),
    ("gpkg-random-bytes", "a.gpkg", b"\x00" * 200, {}, 400, "not a GeoPackage"),
    ("gpkg-plain-sqlite", "a.gpkg", sqlite_not_gpkg(), {}, 400, "application_id"),
    ("csv-binary", "a.csv", b"lon,lat\n\x00\x01\x02", {}, 400, "binary"),
    ("glb-bad-magic", "a.glb", b"gLTF" + bytes(40), {}, 400, "no 'glTF' magic"),
    ("glb-truncated", "a.glb", minimal_glb()[:-8], {"lon": "106.5", "lat": "29.5"}, 400,
     "truncated"),
    ("glb-version-1", "a.glb", minimal_glb(version=1), {"lon": "106.5", "lat": "29.5"}, 400,
     "version 1"),
    ("gltf-external-buffer", "a.gltf", json.dumps({"asset": {"version": "2.0"}, "buffers": [
        {"byteLength": 4, "uri": "../../../etc/passwd"}]}).encode(), {"lon": "1", "lat": "1"},
     400, "external file"),
    ("gltf-asset-1", "a.gltf", b'{"asset": {"version": "1.0"}}', {"lon": "1", "lat": "1"},
     400, "only glTF 2.0"),
    ("glb-no-anchor", "a.glb", minimal_glb(), {}, 400, "anchor"),
    ("glb-bad-cim-level", "a.glb", minimal_glb(), {"lon": "106.5", "lat": "29.5",
                                                   "cim_level": "9"}, 400, "cim_level"),
    ("file-too-large", "a.geojson", b"{" + b" " * 3_100_000 + b"}", {}, 413, "limit"),
    ("bad-source-crs", "a.geojson", geojson_points(), {"source_crs": "+proj=longlat +f=/vsi"},
     400, "source_crs"),
    ("unknown-datum", "a.geojson", geojson_points(), {"datum": "wgs72"}, 400, "datum"),
    ("tiff-sparse-huge-header", "dem.tif", sparse_huge_tiff(), {}, 413, "pixels"),
    ("tiff-no-georeferencing", "dem.tif", NO_TRANSFORM_TIFF, {"source_crs": "EPSG:4326"},
     "failed", "no georeferencing"),
    ("geojson-empty-collection", "a.geojson", feature_collection([]), {}, "failed",
     "no features"),
    ("geojson-null-geometries", "a.geojson", feature_collection([None, None]), {}, "failed",
     "no feature has a geometry"),
    ("geojson-mixed-types", "a.geojson", feature_collection([POINT, LINE]), {}, "failed",
     "mixed geometry types"),
    ("csv-no-coordinates", "a.csv", b"name,addr\na,b\n", {}, "failed", "no coordinate columns"),
    ("csv-xy-without-crs", "a.csv", b"name,x,y\na,500000,3270000\n", {}, "failed",
     "no source_crs"),
    ("tiff-without-crs", "a.tif", NO_CRS_TIFF, {}, "failed", "no CRS"),
    ("tiff-too-many-pixels", "a.tif", HUGE_TIFF, {}, 413, "pixels"),
    ("shapefile-too-many-features", "many.zip", many_points_shapefile(), {}, 413,
     "TWIN_UPLOADS_MAX_FEATURES"),
    ("geojson-broken-json", "a.geojson", b'{"type": "FeatureCollection", "features": [',
     {}, "failed", "cannot be read"),
]


@pytest.mark.parametrize("case", CORPUS, ids=[case[0] for case in CORPUS])
def test_hostile_or_broken_file_is_refused(api, uploads_dir, case):
    case_id, name, content, data, expected, reason = case
    response = post_layer(api, name, content, title=f"hostile {case_id}", **data)
    if expected == "failed":
        assert response.status_code == 202, response.text
        job = wait(api, response.json())
        assert job["state"] == "failed", job
        assert reason in " ".join(job["reasons"]), job["reasons"]
        assert api.get(f"/layers/{job['layer_id']}").status_code == 404
    else:
        assert response.status_code == expected, response.text
        assert reason in response.json()["description"], response.json()
    assert not any((uploads_dir / "jobs").glob("*")), "spooled files left behind"


def test_corpus_is_large_enough_and_the_server_is_still_up(api):
    assert len(CORPUS) >= 30
    assert api.get("/healthz").status_code == 200
    titles = {layer["title_en"] for layer in api.get("/layers").json()["layers"]}
    assert not any(title.startswith("hostile") for title in titles)

"""Files whose coordinates cannot be right are refused, and no input file ends in an "internal
error": every failed job names a reason a GIS person can act on, and nothing is published.

Oracles: pyproj (a CRS's area of use, the transformation of the known places), Python's own
JSON and float parsing (which coordinates are finite), shapely (what a repaired ring is).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import shapely
from pyproj import CRS, Transformer
from rasterio.transform import from_origin

from tests import uploads as support
from tests.uploads import (
    NAMES_ZH,
    PLACES,
    geotiff,
    post_layer,
    upload_ok,
    wait,
)

# The upload server and its client (fixtures shared by the upload tests).

INTERNAL = "internal error"


def refused(api, name: str, content: bytes, **data) -> dict:
    """Upload, wait, and check the job failed with a specific reason and nothing is listed."""
    response = post_layer(api, name, content, title=f"refused {name}", **data)
    assert response.status_code == 202, response.text
    job = wait(api, response.json())
    assert job["state"] == "failed", job
    assert job["reasons"] and INTERNAL not in " ".join(job["reasons"]), job["reasons"]
    listed = {layer["id"] for layer in api.get("/layers").json()["layers"]}
    assert job["layer_id"] not in listed
    assert api.get(f"/layers/{job['layer_id']}").status_code == 404
    return job


def gauss_kruger(epsg: int, places=PLACES) -> list[tuple[float, float]]:
    to_gk = Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True)
    return [to_gk.transform(lon, lat) for lon, lat in places]


def in_area_of_use(epsg: int, x: float, y: float, margin: float = 0.0) -> bool:
    """pyproj's answer: does (x, y) in EPSG:epsg fall in the CRS's area of use (+ margin)?"""
    crs = CRS.from_epsg(epsg)
    lon, lat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(x, y)
    area = crs.area_of_use
    return (math.isfinite(lon) and math.isfinite(lat)
            and area.west - margin <= lon <= area.east + margin
            and area.south - margin <= lat <= area.north + margin)


def geographic_ok(lon: float, lat: float) -> bool:
    return -180 <= lon <= 180 and -90 <= lat <= 90


# --- coordinates outside their CRS's range ----------------------------------------------------

def test_csv_with_swapped_lon_lat_columns_is_refused_as_swapped(api):
    rows = ["name,lon,lat"] + [f"{n},{lat},{lon}" for n, (lon, lat)
                               in zip(NAMES_ZH, PLACES, strict=True)]
    # The oracle: as given no row is a valid lon/lat; swapped every one is.
    assert not any(geographic_ok(lat, lon) for lon, lat in PLACES)
    assert all(geographic_ok(lon, lat) for lon, lat in PLACES)
    job = refused(api, "swapped.csv", "\n".join(rows).encode())
    reason = job["reasons"][0]
    assert reason.startswith("the columns look swapped: lon holds latitudes"), reason
    assert "3 of 3 rows" in reason
    assert f"first: row 1 at lon {PLACES[0][1]:g}, lat {PLACES[0][0]:g}" in reason
    assert "lie in Chongqing" in reason


def test_geojson_with_absurd_magnitudes_is_refused(api):
    """Gauss-Krüger metres in a GeoJSON (which is lon/lat): 36,5xx,xxx is no longitude."""
    places = gauss_kruger(4524)
    assert not any(geographic_ok(x, y) for x, y in places)
    content = support.geojson_points(places=places)
    reason = refused(api, "absurd.geojson", content)["reasons"][0]
    x, y = places[0]
    assert reason.startswith("3 of 3 features lie outside the range of EPSG:4326"), reason
    assert f"first: feature 1 at ({x:.12g}, {y:.12g})" in reason
    assert "source_crs" in reason


def test_one_bad_feature_among_good_ones_refuses_the_file(api):
    places = [PLACES[0], (106.58, 129.56), PLACES[2]]  # a typo: 129.56 for 29.56
    assert [geographic_ok(*p) for p in places] == [True, False, True]
    reason = refused(api, "typo.geojson", support.geojson_points(places=places))["reasons"][0]
    assert reason.startswith("1 of 3 features lie outside"), reason
    assert "first: feature 2 at (106.58, 129.56)" in reason


def test_projected_coordinates_outside_the_area_of_use_are_refused(api):
    """Zone-36 coordinates (false easting 36,500,000) declared as EPSG:4545 (500,000): pyproj
    places them tens of degrees away; declared as EPSG:4524 they land on the known places."""
    places = gauss_kruger(4524)
    assert not any(in_area_of_use(4545, x, y, margin=3) for x, y in places)
    assert all(in_area_of_use(4524, x, y) for x, y in places)
    rows = ["name,x,y"] + [f"{n},{x:.3f},{y:.3f}" for n, (x, y)
                           in zip(NAMES_ZH, places, strict=True)]
    content = "\n".join(rows).encode()
    reason = refused(api, "zone.csv", content, source_crs="EPSG:4545")["reasons"][0]
    assert reason.startswith("3 of 3 rows lie outside the range of EPSG:4545 (its area of use"), \
        reason
    x, y = (float(f"{v:.3f}") for v in places[0])  # as the CSV has them
    assert f"first: row 1 at x {x:.12g}, y {y:.12g}" in reason
    job = upload_ok(api, "zone.csv", content, title="zone 36", source_crs="EPSG:4524")
    served = api.get(f"/collections/{job['layer_id']}/items").json()["features"]
    assert len(served) == 3


def test_a_neighbouring_zone_within_the_margin_is_accepted(api):
    """West Chongqing (105.3 E) kept in the CM 108 E zone's CRS: outside EPSG:4545's area of
    use (106.5-109.5 E) by pyproj, but within a zone of it, so published."""
    west = [(105.35, 29.40), (105.40, 29.45)]
    places = gauss_kruger(4545, west)
    assert not any(in_area_of_use(4545, x, y) for x, y in places)
    assert all(in_area_of_use(4545, x, y, margin=3) for x, y in places)
    rows = ["name,x,y"] + [f"p{i},{x:.3f},{y:.3f}" for i, (x, y) in enumerate(places)]
    job = upload_ok(api, "west.csv", "\n".join(rows).encode(), title="west",
                    source_crs="EPSG:4545")
    served = api.get(f"/collections/{job['layer_id']}/items").json()["features"]
    got = sorted(tuple(f["geometry"]["coordinates"]) for f in served)
    assert np.allclose(got, sorted(west), atol=1e-6)


def test_northing_first_gauss_kruger_is_refused_as_swapped(api):
    places = gauss_kruger(4545)
    rows = ["name,x,y"] + [f"{n},{y:.3f},{x:.3f}" for n, (x, y)
                           in zip(NAMES_ZH, places, strict=True)]
    assert not any(in_area_of_use(4545, y, x, margin=3) for x, y in places)
    reason = refused(api, "northing.csv", "\n".join(rows).encode(),
                     source_crs="EPSG:4545")["reasons"][0]
    assert reason.startswith("the columns look swapped: x holds northings and y eastings"), \
        reason


def test_raster_outside_its_crs_range_is_refused(api):
    values = np.ones((20, 20), dtype="float32")
    beyond = geotiff(values, from_origin(106.5, 200.0, 0.001, 0.001), "EPSG:4326")
    reason = refused(api, "north.tif", beyond)["reasons"][0]
    assert reason.startswith("the raster's extent (106.5, 199.98) - (106.52, 200) lies outside "
                             "the range of EPSG:4326"), reason
    x, y = 9e9, 3e9
    assert not in_area_of_use(4524, x, y, margin=3)
    far = geotiff(values, from_origin(x, y, 1, 1), "EPSG:4524")
    reason = refused(api, "far.tif", far)["reasons"][0]
    assert "outside the range of EPSG:4524 (its area of use" in reason, reason


# --- non-finite coordinates ---------------------------------------------------------------

NON_FINITE = (b'{"type": "FeatureCollection", "features": ['
              b'{"type": "Feature", "properties": {"n": 0}, "geometry": '
              b'{"type": "Point", "coordinates": [106.577, 29.5576]}},'
              b'{"type": "Feature", "properties": {"n": 1}, "geometry": '
              b'{"type": "Point", "coordinates": [NaN, 29.5653]}},'
              b'{"type": "Feature", "properties": {"n": 2}, "geometry": '
              b'{"type": "LineString", "coordinates": [[106.5785, 29.569], [106.6, Infinity]]}},'
              b'{"type": "Feature", "properties": {"n": 3}, "geometry": '
              b'{"type": "Point", "coordinates": [-Infinity, 29.5]}}]}')


def test_non_finite_coordinates_are_refused_by_name(api):
    parsed = json.loads(NON_FINITE)  # Python reads NaN/Infinity too: the oracle
    bad = [i for i, f in enumerate(parsed["features"])
           if not np.isfinite(np.array(f["geometry"]["coordinates"], dtype=float)).all()]
    assert bad == [1, 2, 3]
    reason = refused(api, "nan.geojson", NON_FINITE)["reasons"][0]
    assert reason.startswith("3 of 4 features have coordinates that are not numbers (NaN or "
                             "Infinity); first: feature 2 at (nan, 29.5653)"), reason


# --- geometries GEOS cannot build --------------------------------------------------------

def feature_collection(geometries) -> bytes:
    features = [{"type": "Feature", "properties": {"n": i}, "geometry": g}
                for i, g in enumerate(geometries)]
    return json.dumps({"type": "FeatureCollection", "features": features}).encode()


LINE = {"type": "LineString", "coordinates": [[106.5, 29.5], [106.6, 29.6]]}
ONE_POINT_LINE = {"type": "LineString", "coordinates": [[106.5, 29.5]]}
UNCLOSED = [[106.5, 29.5], [106.6, 29.5], [106.6, 29.6], [106.5, 29.6]]


def test_a_line_of_one_point_is_dropped_and_counted(api):
    job = upload_ok(api, "lines.geojson", feature_collection([LINE, ONE_POINT_LINE]),
                    title="one point line")
    assert job["report"]["malformed_geometries"] == {"count": 1, "repaired": 0, "dropped": 1,
                                                     "first_feature": 2}
    served = api.get(f"/collections/{job['layer_id']}/items").json()["features"]
    assert [f["properties"]["n"] for f in served] == [0]


def test_only_malformed_geometries_is_refused_naming_them(api):
    reason = refused(api, "malformed.geojson",
                     feature_collection([ONE_POINT_LINE, ONE_POINT_LINE]))["reasons"][0]
    assert reason.startswith("no geometry can be read: 2 are malformed"), reason
    assert "first: feature 1" in reason


def test_an_unclosed_ring_is_closed(api):
    polygon = {"type": "Polygon", "coordinates": [UNCLOSED]}
    job = upload_ok(api, "unclosed.geojson", feature_collection([polygon]), title="unclosed")
    assert job["report"]["malformed_geometries"]["repaired"] == 1
    served = api.get(f"/collections/{job['layer_id']}/items").json()["features"]
    shape = shapely.geometry.shape(served[0]["geometry"])
    assert shape.equals(shapely.Polygon(UNCLOSED))  # shapely closes the ring itself


# --- CSVs pandas cannot read -------------------------------------------------------------

@pytest.mark.parametrize("content,reason", [
    (b"name,lon,lat\na,106.5,29.5\nb,106.5,29.5,extra\n",
     "the CSV cannot be read: Expected 3 fields in line 3, saw 4"),
    (b'name,lon,lat\n"a,106.5,29.5\n', "the CSV cannot be read: EOF inside string"),
    (b"name,lon,lat\n\xff\xfe\xff,106.5,29.5\n",
     "the CSV is neither UTF-8 nor GB18030 text (byte 0xff on line 2"),
    (b"\n\n", "the CSV holds no header line"),
    (b"name;lon;lat\na;106.5;29.5\n", "the CSV has no coordinate columns"),
], ids=["ragged-row", "unclosed-quote", "not-text", "blank", "semicolons"])
def test_unreadable_csv_names_the_problem(api, content, reason):
    job = refused(api, "broken.csv", content)
    assert job["reasons"][0].startswith(reason), job["reasons"]
    if b";" in content:
        assert "separated by semicolons" in job["reasons"][0]


# --- attribute tables PostgreSQL cannot hold ---------------------------------------------

def test_more_fields_than_a_table_holds_is_refused(api):
    point = {"type": "Point", "coordinates": list(PLACES[0])}
    content = json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {f"f{i}": i for i in range(1700)},
         "geometry": point}]}).encode()
    reason = refused(api, "wide.geojson", content)["reasons"][0]
    assert reason.startswith("the file has 1700 attribute fields; a layer holds at most 1598")


def test_long_field_names_sharing_a_prefix_stay_distinct(api):
    """PostgreSQL keeps 63 bytes of a name: 120 names alike in their first 61 characters must
    still come out distinct, each whole."""
    names = [f"{'长' * 20}{i:03d}" for i in range(120)]  # 60 bytes of prefix, then digits
    point = {"type": "Point", "coordinates": list(PLACES[0])}
    content = json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {n: i for i, n in enumerate(names)},
         "geometry": point}]}, ensure_ascii=False).encode()
    job = upload_ok(api, "alike.geojson", content, title="alike names")
    columns = job["report"]["columns"]
    assert len(columns) == 120 and len(set(columns.values())) == 120
    assert all(len(name.encode()) <= 63 for name in columns.values())
    feature = api.get(f"/collections/{job['layer_id']}/items").json()["features"][0]
    assert {columns[n]: i for i, n in enumerate(names)} == {
        k: v for k, v in feature["properties"].items() if k in columns.values()}


# --- Shapefiles with a CRS that leads nowhere --------------------------------------------

def shapefile_with_prj(prj: bytes) -> bytes:
    """Two points as a zipped Shapefile whose .prj is ``prj``."""
    frame = gpd.GeoDataFrame({"n": [1, 2]}, geometry=gpd.points_from_xy(
        [p[0] for p in PLACES[:2]], [p[1] for p in PLACES[:2]]), crs="EPSG:4326")
    with tempfile.TemporaryDirectory() as folder:
        frame.to_file(Path(folder) / "data.shp", engine="pyogrio")
        members = {p.name: p.read_bytes() for p in Path(folder).iterdir()}
    return support.zip_bytes(members | {"data.prj": prj})


def test_an_unreadable_prj_asks_for_source_crs(api):
    job = refused(api, "badprj.zip", shapefile_with_prj(b"this is not WKT"))
    assert job["reasons"] == ["the Shapefile's .prj names no CRS GDAL knows; give source_crs"]
    assert job["report"] == {"needs": ["source_crs"]}


def test_a_local_crs_that_reaches_no_earth_is_refused(api):
    job = refused(api, "local.zip", shapefile_with_prj(b'LOCAL_CS["site grid",UNIT["metre",1]]'))
    assert job["reasons"][0].startswith("the data's CRS (site grid) cannot be transformed to "
                                        "WGS84"), job["reasons"]


# --- refused in the request ---------------------------------------------------------------

ANCHOR = {"lon": "106.5", "lat": "29.5"}


@pytest.mark.parametrize("name,content,data,reason", [
    ("a.gltf", json.dumps({"asset": "2.0"}).encode(), ANCHOR,
     "glTF 'asset' must be an object"),
    ("a.gltf", json.dumps({"asset": {"version": "2.0"}, "meshes": 5}).encode(), ANCHOR,
     "glTF 'meshes' must be an array of objects"),
    ("a.gltf", json.dumps({"asset": {"version": "2.0"}, "images": "abc"}).encode(), ANCHOR,
     "glTF 'images' must be an array of objects"),
    ("a.kml", b'<kml xmlns="http://www.opengis.net/kml/2.2"><Placemark><Point><coordinates>'
              b'106.5,29.5</coordinates></Point>', {}, "cannot be opened as KML"),
], ids=["gltf-asset-string", "gltf-meshes-number", "gltf-images-string", "kml-cut-short"])
def test_malformed_files_are_refused_at_once_without_server_paths(api, uploads_dir, name,
                                                                   content, data, reason):
    response = post_layer(api, name, content, title="malformed", **data)
    assert response.status_code == 400, response.text
    description = response.json()["description"]
    assert reason in description
    assert str(uploads_dir) not in description and "/jobs/" not in description

"""Vector uploads land in place, in the right datum, with readable names, and are served at once
as collections and vector tiles. Oracles: the known WGS84 truth, pyproj and eviltransform."""

from __future__ import annotations

import io
import json
import zipfile

import eviltransform
import geopandas as gpd
import mapbox_vector_tile
import morecantile
import numpy as np
import pytest
import shapely
from pyproj import Geod, Transformer

from tests.uploads import (
    EDITOR,
    NAMES_ZH,
    PLACES,
    geojson_points,
    post_layer,
    shapefile_zip,
    upload_ok,
    wait,
    zip_bytes,
)

# The upload server and its client (fixtures shared by the upload tests).


GEOD = Geod(ellps="WGS84")
TMS = morecantile.tms.get("WebMercatorQuad")


def metres(a: tuple[float, float], b: tuple[float, float]) -> float:
    return GEOD.inv(a[0], a[1], b[0], b[1])[2]


def landed(api, layer_id: str, key: str = "name") -> dict:
    """Feature name -> (lon, lat) as served by /collections/{id}/items."""
    body = api.get(f"/collections/{layer_id}/items", params={"limit": 1000}).json()
    return {f["properties"][key]: tuple(f["geometry"]["coordinates"]) for f in body["features"]}


def test_geojson_is_published_as_collection_and_tiles(api):
    job = upload_ok(api, "places.geojson", geojson_points(), title="地标 landmarks",
                    id="landmarks")
    assert job["layer_id"] == "landmarks" and job["version"] == 1 and job["progress"] == 100
    points = landed(api, "landmarks")
    assert set(points) == set(NAMES_ZH)
    for name, place in zip(NAMES_ZH, PLACES, strict=True):
        assert metres(points[name], place) < 0.01
    layer = api.get("/layers/landmarks").json()
    assert layer["kind"] == "vector" and layer["geometry_type"] == "Point"
    assert layer["feature_count"] == 3 and layer["uploaded_by"] == "alice"
    assert {f["name"]: f["type"] for f in layer["fields"]} == {
        "id": "bigint", "name": "text", "rank": "bigint"}
    assert [v["version"] for v in layer["versions"]] == [1]
    west, south, east, north = layer["bbox"]
    assert west == pytest.approx(min(p[0] for p in PLACES))
    assert north == pytest.approx(max(p[1] for p in PLACES))
    collection = api.get("/collections/landmarks").json()
    assert collection["featureCount"] == 3 and collection["origin"] == "upload"
    tile = TMS.tile(*PLACES[0], 14)
    response = api.get(f"/tiles/landmarks/{tile.z}/{tile.x}/{tile.y}.mvt")
    assert response.status_code == 200
    decoded = mapbox_vector_tile.decode(response.content)
    names = {f["properties"]["name"] for f in decoded["landmarks"]["features"]}
    in_tile = {n for n, p in zip(NAMES_ZH, PLACES, strict=True) if TMS.tile(*p, 14) == tile}
    assert names == in_tile and in_tile


def test_gauss_kruger_shapefile_in_gbk_without_cpg(api, tmp_path):
    to_gk = Transformer.from_crs("EPSG:4326", "EPSG:4524", always_xy=True)
    xs, ys = to_gk.transform([p[0] for p in PLACES], [p[1] for p in PLACES])
    frame = gpd.GeoDataFrame({"名称": NAMES_ZH, "code": [1, 2, 3]},
                             geometry=gpd.points_from_xy(xs, ys), crs="EPSG:4524")
    content = shapefile_zip(tmp_path / "gk", frame, encoding="GBK")
    dbf = zip_member(content, ".dbf")
    assert "解放碑".encode("gbk") in dbf  # the fixture really is GBK
    job = upload_ok(api, "gk_points.zip", content, title="GK points", id="gk_points")
    assert job["report"]["encoding"] in ("gb18030", "gbk")
    assert job["report"]["source_crs"] == "EPSG:4524"
    points = landed(api, "gk_points", key="名称")
    assert set(points) == set(NAMES_ZH)
    for name, place in zip(NAMES_ZH, PLACES, strict=True):
        assert metres(points[name], place) < 1.0


@pytest.mark.parametrize("encoding", ["GBK", "GB18030", "UTF-8"])
def test_shapefile_cpg_encoding_is_honoured(api, tmp_path, encoding):
    frame = gpd.GeoDataFrame({"名称": NAMES_ZH}, geometry=gpd.points_from_xy(
        [p[0] for p in PLACES], [p[1] for p in PLACES]), crs="EPSG:4326")
    content = shapefile_zip(tmp_path / "cpg", frame, encoding=encoding, keep_cpg=True)
    assert zip_member(content, ".cpg").strip().upper() in (encoding.encode(), b"936")
    job = upload_ok(api, "cpg.zip", content, title=f"cpg {encoding}")
    assert set(landed(api, job["layer_id"], key="名称")) == set(NAMES_ZH)


def zip_member(content: bytes, suffix: str) -> bytes:
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        name = next(n for n in archive.namelist() if n.endswith(suffix))
        return archive.read(name)


def test_shapefile_without_prj_needs_source_crs(api, tmp_path):
    to_gk = Transformer.from_crs("EPSG:4326", "EPSG:4524", always_xy=True)
    xs, ys = to_gk.transform([p[0] for p in PLACES], [p[1] for p in PLACES])
    frame = gpd.GeoDataFrame({"name": ["a", "b", "c"]}, geometry=gpd.points_from_xy(xs, ys),
                             crs="EPSG:4524")
    content = shapefile_zip(tmp_path / "noprj", frame, encoding="UTF-8", keep_prj=False)
    response = post_layer(api, "noprj.zip", content, title="no prj")
    job = wait(api, response.json())
    assert job["state"] == "failed"
    assert job["reasons"] == ["no .prj in the Shapefile and no source_crs given"]
    assert job["report"] == {"needs": ["source_crs"]}  # what a client asks the user for
    assert api.get(f"/layers/{job['layer_id']}").status_code == 404
    job = upload_ok(api, "noprj.zip", content, title="no prj", source_crs="EPSG:4524")
    points = landed(api, job["layer_id"])
    assert metres(points["a"], PLACES[0]) < 1.0


def test_gcj02_csv_lands_on_wgs84_truth(api):
    rows = ["name,lng,lat"]
    for name, (lon, lat) in zip(NAMES_ZH, PLACES, strict=True):
        gcj_lat, gcj_lon = eviltransform.wgs2gcj(lat, lon)
        assert 300 < metres((gcj_lon, gcj_lat), (lon, lat)) < 700  # really offset
        rows.append(f"{name},{gcj_lon:.8f},{gcj_lat:.8f}")
    job = upload_ok(api, "amap.csv", "\n".join(rows).encode("gb18030"), title="amap",
                    datum="gcj02")
    assert job["report"]["datum"] == "gcj02"
    points = landed(api, job["layer_id"])
    for name, place in zip(NAMES_ZH, PLACES, strict=True):
        assert metres(points[name], place) < 1.0
    assert api.get(f"/layers/{job['layer_id']}").json()["source_datum"] == "gcj02"


def test_csv_with_non_numeric_coordinates_is_reported(api):
    rows = ["name,lon,lat"] + [f"p{i},106.5,29.5" for i in range(5)]
    rows[3] = "p2,abc,29.5"
    rows[5] = "p4,,29.5"
    job = wait(api, post_layer(api, "bad.csv", "\n".join(rows).encode(), title="bad").json())
    assert job["state"] == "failed"
    assert job["reasons"] == ["column lon has 2 non-numeric values, first at row 3 ('abc')"]


def test_geopackage_layer_must_be_chosen(api, tmp_path):
    path = tmp_path / "two.gpkg"
    points = gpd.GeoDataFrame({"name": NAMES_ZH}, geometry=gpd.points_from_xy(
        [p[0] for p in PLACES], [p[1] for p in PLACES]), crs="EPSG:4326")
    lines = gpd.GeoDataFrame({"name": ["l"]}, geometry=[shapely.LineString(PLACES)],
                             crs="EPSG:4326")
    points.to_file(path, layer="places", engine="pyogrio")
    lines.to_file(path, layer="walk", engine="pyogrio")
    response = post_layer(api, "two.gpkg", path.read_bytes(), title="two")
    assert response.status_code == 400
    assert "places" in response.text and "walk" in response.text and "layer" in response.text
    job = upload_ok(api, "two.gpkg", path.read_bytes(), title="walk", layer="walk")
    layer = api.get(f"/layers/{job['layer_id']}").json()
    assert layer["geometry_type"] == "LineString" and layer["feature_count"] == 1
    line = api.get(f"/collections/{job['layer_id']}/items").json()["features"][0]
    assert np.allclose(line["geometry"]["coordinates"], PLACES)


KML = """<?xml version="1.0" encoding="UTF-8"?>
<kml xmlns="http://www.opengis.net/kml/2.2"><Document>{}</Document></kml>"""
PLACEMARK = ("<Placemark><name>{}</name><Point><coordinates>{},{},0</coordinates></Point>"
             "</Placemark>")


def kml_points() -> bytes:
    marks = "".join(PLACEMARK.format(n, *p) for n, p in zip(NAMES_ZH, PLACES, strict=True))
    return KML.format(marks).encode()


@pytest.mark.parametrize("kind", ["kml", "kmz"])
def test_kml_and_kmz(api, kind):
    content = kml_points() if kind == "kml" else zip_bytes({"doc.kml": kml_points()})
    job = upload_ok(api, f"field.{kind}", content, title=f"field {kind}")
    points = landed(api, job["layer_id"])
    for name, place in zip(NAMES_ZH, PLACES, strict=True):
        assert metres(points[name][:2], place) < 0.01


def test_invalid_polygons_are_repaired_and_counted(api):
    bowtie = {"type": "Polygon", "coordinates": [[[106.5, 29.5], [106.6, 29.6], [106.6, 29.5],
                                                   [106.5, 29.6], [106.5, 29.5]]]}
    square = {"type": "Polygon", "coordinates": [[[106.5, 29.5], [106.6, 29.5], [106.6, 29.6],
                                                   [106.5, 29.6], [106.5, 29.5]]]}
    flat = {"type": "Polygon", "coordinates": [[[106.5, 29.5], [106.6, 29.5], [106.7, 29.5],
                                                 [106.5, 29.5]]]}
    features = [{"type": "Feature", "properties": {"n": i}, "geometry": g}
                for i, g in enumerate([bowtie, square, flat, None])]
    content = json.dumps({"type": "FeatureCollection", "features": features}).encode()
    job = upload_ok(api, "polys.geojson", content, title="polys")
    report = job["report"]
    assert report["fixed"] == 1 and report["dropped"] == 2
    assert any("no geometry" in r for r in report["dropped_reasons"])
    assert any("collapsed" in r for r in report["dropped_reasons"])
    served = api.get(f"/collections/{job['layer_id']}/items").json()["features"]
    shapes = {f["properties"]["n"]: shapely.geometry.shape(f["geometry"]) for f in served}
    assert set(shapes) == {0, 1}
    assert all(shape.is_valid for shape in shapes.values())
    # The repaired bow tie keeps its area: two triangles of a quarter of the square each.
    assert shapes[0].area == pytest.approx(shapes[1].area / 2)


def test_far_away_data_is_flagged(api):
    content = geojson_points(places=[(116.39, 39.91), *PLACES[1:]])  # Beijing and two here
    job = upload_ok(api, "far.geojson", content, title="far")
    assert job["report"]["far_outside_municipality"] == 1
    assert "outside Chongqing" in job["report"]["warnings"][0]


def test_uploaded_layer_ids_follow_the_title(api):
    first = upload_ok(api, "a.geojson", geojson_points(), title="Water Points")
    second = upload_ok(api, "a.geojson", geojson_points(), title="Water Points")
    assert first["layer_id"] == "water_points" and second["layer_id"] == "water_points_2"
    listed = {layer["id"]: layer for layer in api.get("/layers").json()["layers"]}
    assert listed["water_points"]["origin"] == "upload"
    assert listed["risk_points"]["origin"] == "builtin"
    assert api.post("/layers", files={"file": ("a.geojson", geojson_points())},
                    data={"title": "x", "id": "water_points"},
                    headers=EDITOR).status_code == 409


def test_attribute_values_survive_the_copy(api):
    values = [
        {"note": "tab\there", "flag": True, "n": 1.5, "when": "2024-05-01T08:30:00"},
        {"note": "two\nlines\\and a backslash", "flag": False, "n": None,
         "when": "2024-05-02T09:00:00"},
        {"note": None, "flag": None, "n": -2.25, "when": None},
    ]
    features = [{"type": "Feature", "properties": {"k": i, **v},
                 "geometry": {"type": "Point", "coordinates": list(PLACES[i])}}
                for i, v in enumerate(values)]
    content = json.dumps({"type": "FeatureCollection", "features": features}).encode()
    job = upload_ok(api, "values.geojson", content, title="values")
    layer = api.get(f"/layers/{job['layer_id']}").json()
    types = {f["name"]: f["type"] for f in layer["fields"]}
    assert types["flag"] == "boolean" and types["n"] == "double precision"
    assert types["when"].startswith("timestamp")
    served = api.get(f"/collections/{job['layer_id']}/items").json()["features"]
    by_k = {f["properties"]["k"]: f["properties"] for f in served}
    for i, expected in enumerate(values):
        got = by_k[i]
        assert got["note"] == expected["note"] and got["flag"] == expected["flag"]
        assert got["n"] == expected["n"]
        assert (got["when"] or "")[:19] == (expected["when"] or "")[:19]

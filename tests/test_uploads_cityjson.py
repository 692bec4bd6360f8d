"""CityJSON uploads: LOD1/LOD2 buildings become a 3D buildings table (the columns of
``buildings``) published as a vector layer; bad files are refused with reasons.

Oracles: the test files are made by code from known lon/lat corners and heights, projected with
pyproj (tests/uploads.py ``cityjson``); footprints are compared with pyproj's geodesic
distance, district codes with shapely over the sample's own admin_units.csv, GCJ-02 with
eviltransform.
"""

from __future__ import annotations

import json
from pathlib import Path

import eviltransform
import mapbox_vector_tile
import morecantile
import numpy as np
import pandas as pd
import pytest
import shapely
from pyproj import Geod
from sqlalchemy import Engine, text

from tests.uploads import (
    EDITOR,
    city_building,
    cityjson,
    geojson_points,
    post_layer,
    upload_ok,
)

GEOD = Geod(ellps="WGS84")
# Near Jiefangbei (Yuzhong) and Guanyinqiao (Jiangbei).
GABLE = city_building(106.5770, 29.5576, 251.5, 24.0, "gable", width_m=32.0, depth_m=14.0,
                      bearing_deg=70.0)
HIPPED = city_building(106.5790, 29.5585, 249.0, 18.0, "hip", width_m=36.0, depth_m=16.0,
                      bearing_deg=160.0)
TOWER = city_building(106.5330, 29.5750, 262.0, 96.0, "flat", width_m=40.0, depth_m=36.0,
                      bearing_deg=15.0, attributes={"name": "测试大厦", "function": "office",
                                                     "storeysAboveGround": 30})


def _rows(engine: Engine, layer: dict) -> list[dict]:
    table = f"upload_{layer['id']}_v{layer['current_version']}"
    with engine.connect() as conn:
        rows = conn.execute(text(
            f'SELECT id, name, use, height_m, height, base_height, floors, cim_level, '
            f'roof_type, district_code, street_code, cityjson_id, lod, ST_AsBinary(geom) AS geom, '
            f'ST_AsBinary(surfaces) AS surfaces, ST_SRID(geom) AS srid, '
            f'GeometryType(surfaces) AS surfaces_type FROM "{table}" ORDER BY id')).mappings()
        return [dict(row) for row in rows]


def _district_oracle(sample_dir: Path, footprint: shapely.Polygon, level: str) -> str | None:
    admin = pd.read_csv(sample_dir / "admin_units.csv", dtype={"code": str})
    admin = admin[admin["level"] == level]
    polygons = shapely.from_wkb(admin["geom"].to_numpy())
    point = footprint.point_on_surface()
    hits = admin["code"].to_numpy()[shapely.covers(polygons, point)]
    return str(sorted(hits)[0]) if len(hits) else None


def _check_footprint(row: dict, building: dict, tolerance_m: float = 0.5) -> None:
    footprint = shapely.from_wkb(bytes(row["geom"]))
    corners = np.asarray(footprint.exterior.coords)[:-1]
    assert len(corners) == 4
    for lon, lat in building["corners"]:
        distance = min(GEOD.inv(lon, lat, x, y)[2] for x, y in corners)
        assert distance < tolerance_m, (lon, lat, distance)
    assert footprint.exterior.is_ccw


def test_lod2_buildings_become_a_vector_layer_with_their_surfaces(api, engine, sample_dir):
    job = upload_ok(api, "blocks.city.json", cityjson([GABLE, TOWER, HIPPED]),
                    title="CityJSON 楼栋")
    assert job["report"]["features"] == 3 and job["report"]["source_crs"] == "EPSG:4545"
    layer = api.get(f"/layers/{job['layer_id']}").json()
    assert layer["kind"] == "vector" and layer["geometry_type"] == "Polygon"
    assert layer["meta"]["tiles3d"] == "buildings" and layer["meta"]["lod"] == 2
    rows = _rows(engine, layer)
    assert [r["cityjson_id"] for r in rows] == ["building-1", "building-2", "building-3"]
    for row, building in zip(rows, (GABLE, TOWER, HIPPED), strict=True):
        assert row["srid"] == 4326 and row["surfaces_type"] == "MULTIPOLYGON"
        _check_footprint(row, building)
        surfaces = shapely.from_wkb(bytes(row["surfaces"]))
        z = shapely.get_coordinates(surfaces, include_z=True)[:, 2]
        assert z.min() == pytest.approx(building["ground"], abs=0.1)
        assert z.max() == pytest.approx(building["ground"] + building["height"], abs=0.1)
        assert row["height_m"] == pytest.approx(building["height"], abs=0.1)
        assert row["height"] == row["height_m"] and row["base_height"] == 0
        assert row["cim_level"] == 3 and row["lod"] == "2"
        footprint = shapely.from_wkb(bytes(row["geom"]))
        assert row["district_code"] == _district_oracle(sample_dir, footprint, "district")
        assert row["street_code"] == _district_oracle(sample_dir, footprint, "street")
    assert rows[0]["district_code"] == "500103"
    assert [row["roof_type"] for row in rows] == ["gable", "flat", "hip"]
    assert len(shapely.from_wkb(bytes(rows[0]["surfaces"])).geoms) == 7  # ground, 4 walls, 2 roofs
    assert (rows[1]["name"], rows[1]["use"], rows[1]["floors"]) == ("测试大厦", "office", 30)
    assert rows[0]["floors"] == 8  # 24 m / 3 m, none given
    # Served like any vector layer: OGC API Features and vector tiles.
    items = api.get(f"/collections/{job['layer_id']}/items", headers=EDITOR).json()
    assert sorted(f["properties"]["cityjson_id"] for f in items["features"]) == [
        "building-1", "building-2", "building-3"]
    assert {f["geometry"]["type"] for f in items["features"]} == {"Polygon"}
    tile = morecantile.tms.get("WebMercatorQuad").tile(106.5770, 29.5576, 16)
    response = api.get(f"/tiles/{job['layer_id']}/{tile.z}/{tile.x}/{tile.y}.mvt",
                       headers=EDITOR)
    assert response.status_code == 200, response.text
    decoded = mapbox_vector_tile.decode(response.content)
    in_tile = {f["properties"]["cityjson_id"] for f in decoded[job["layer_id"]]["features"]}
    bounds = shapely.box(*morecantile.tms.get("WebMercatorQuad").bounds(tile))
    assert in_tile == {row["cityjson_id"] for row in rows
                       if shapely.from_wkb(bytes(row["geom"])).intersects(bounds)}
    assert "building-1" in in_tile


def test_lod1_building_parts_in_cityjson_1_1(api, engine):
    """LOD1 MultiSurface BuildingParts (the parent Building has no geometry of its own)."""
    document = json.loads(cityjson([GABLE, TOWER], lod="1", version="1.1",
                                   object_type="BuildingPart", geometry_type="MultiSurface"))
    parts = list(document["CityObjects"])
    for key in parts:
        document["CityObjects"][key]["parents"] = ["parent"]
    document["CityObjects"]["parent"] = {"type": "Building", "children": parts,
                                         "attributes": {"name": "组合楼"}}
    # A .json file is told from GeoJSON by its content, whatever the order of its keys.
    document = {"CityObjects": document.pop("CityObjects"), **document}
    job = upload_ok(api, "parts.json", json.dumps(document).encode(), title="LOD1 parts")
    layer = api.get(f"/layers/{job['layer_id']}").json()
    assert layer["meta"]["lod"] == 1
    rows = _rows(engine, layer)
    assert len(rows) == 2 and "skipped" not in job["report"]
    for row, building in zip(rows, (GABLE, TOWER), strict=True):
        _check_footprint(row, building)
        assert row["cim_level"] == 2 and row["roof_type"] == "flat" and row["lod"] == "1"
        assert row["height_m"] == pytest.approx(building["height"], abs=0.1)
    assert rows[0]["name"] == "组合楼"  # from the parent


def test_a_file_without_crs_takes_source_crs_and_gcj02_is_corrected(api, engine):
    """WGS84 corners shifted to GCJ-02 in an EPSG:4326 file, declared with datum=gcj02."""
    shifted = dict(GABLE)
    shifted["corners"] = [tuple(reversed(eviltransform.wgs2gcj(lat, lon)))
                          for lon, lat in GABLE["corners"]]
    content = cityjson([shifted], epsg=None, scale=1e-7)
    job = upload_ok(api, "gcj.city.json", content, title="GCJ-02 楼", source_crs="EPSG:4326",
                    datum="gcj02")
    assert job["report"]["datum"] == "gcj02"
    rows = _rows(engine, api.get(f"/layers/{job['layer_id']}").json())
    _check_footprint(rows[0], GABLE, tolerance_m=1.0)


def _tin_only() -> bytes:
    document = json.loads(cityjson([GABLE]))
    document["CityObjects"] = {"ground": {"type": "TINRelief", "geometry": []}}
    return json.dumps(document).encode()


def _with(**changes) -> bytes:
    document = json.loads(cityjson([GABLE]))
    for key, value in changes.items():
        document[key] = value
    return json.dumps(document).encode()


BEIJING = city_building(116.397, 39.909, 44.0, 30.0)


@pytest.mark.parametrize(("name", "content", "form", "reason"), [
    ("a.city.json", b'{"type": "CityJSON", "version": "2.0", ', {}, "does not parse"),
    ("a.city.json", geojson_points(), {}, "not a CityJSON file"),
    ("a.json", _tin_only(), {}, "no Building or BuildingPart (1 TINRelief)"),
    ("a.city.json", cityjson([GABLE], epsg=None), {}, "names no CRS"),
    ("a.city.json", cityjson([GABLE]).replace(b"EPSG/0/4545", b"EPSG/0/4534"), {},
     "outside the area of use of EPSG:4534"),
    ("a.city.json", cityjson([GABLE]), {"source_crs": "EPSG:4326"},
     "outside the area of use of EPSG:4326"),
    ("a.city.json", cityjson([BEIJING], epsg=4326, scale=1e-7), {},
     "outside the municipality of Chongqing (105.28-110.2 E, 28.15-32.21 N)"),
    ("a.city.json", cityjson([GABLE], lod="3"), {}, "no LOD1/LOD2 Solid"),
    ("a.city.json", cityjson([GABLE], geometry_type="MultiSolid"), {}, "no LOD1/LOD2 Solid"),
    ("a.city.json", _with(version="0.9"), {}, "CityJSON version 0.9"),
    ("a.city.json", _with(vertices=[[1, 2]]), {}, "[x, y, z] numbers"),
    ("a.city.json", b'{"type": "CityJSON", "type": "CityJSON"}', {}, "does not parse"),
], ids=["not-json", "geojson-named-cityjson", "no-buildings", "no-crs", "wrong-crs",
        "wrong-declared-crs", "outside-municipality", "lod3-only", "multisolid",
        "old-version", "bad-vertices", "duplicate-keys"])
def test_bad_cityjson_is_refused_with_its_reason(api, uploads_dir, name, content, form,
                                                 reason):
    before = {layer["id"] for layer in api.get("/layers", headers=EDITOR).json()["layers"]}
    response = post_layer(api, name, content, title="bad cityjson", **form)
    assert response.status_code == 400, response.text
    body = response.json()
    assert set(body) >= {"code", "description"}
    assert reason in body["description"], body["description"]
    if "names no CRS" in reason:
        assert "source_crs=EPSG:" in body["description"]
    after = {layer["id"] for layer in api.get("/layers", headers=EDITOR).json()["layers"]}
    assert after == before
    assert not any((uploads_dir / "jobs").glob("*"))

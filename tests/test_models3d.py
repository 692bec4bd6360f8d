"""CIM4-6 models: the sample's generated models, their placement (ENU x heading at the anchor)
and their 3D Tiles content (one feature, EXT_mesh_features + EXT_structural_metadata).

Oracles: pyproj (EPSG:4979 <-> 4978) for the placement, rasterio for the DEM under the anchor,
PostGIS for the buildings the models replace, trimesh/pygltflib for reading the GLBs back, and
the Khronos glTF validator for the content.
"""

from __future__ import annotations

import base64
import io
import json
import math
import struct
from pathlib import Path

import numpy as np
import pygltflib
import pytest
import rasterio
import shapely
import trimesh
from pyproj import Geod, Transformer
from sqlalchemy import Engine, text

from tests import gltf_validator
from tests.uploads import (
    DISTRICT_EDITOR,
    DISTRICT_EDITOR_SCOPE,
    EDITOR,
    minimal_glb,
    post_layer,
    upload_ok,
    wait,
)
from tiles import models3d
from twin.core.layer import Layer

TO_ECEF = Transformer.from_crs("EPSG:4979", "EPSG:4978", always_xy=True)
TO_GEODETIC = Transformer.from_crs("EPSG:4978", "EPSG:4979", always_xy=True)
GEOD = Geod(ellps="WGS84")
ANCHOR = {"lon": 106.5770, "lat": 29.5576, "height": 250.0}
ROW = {"id": 1119, "name": "重庆环球金融中心", "height": 339.0, "floors": 72, "cim_level": 5,
       "district_code": "500103", "street_code": None}


def placed(meta: dict, points: np.ndarray) -> np.ndarray:
    """glTF points -> lon, lat, h as a 3D Tiles client places them: y-up to z-up, then the
    tile transform (column-major, as model_transform gives it), then ECEF -> geodetic."""
    matrix = np.array(models3d.model_transform(meta), dtype=np.float64).reshape(4, 4).T
    points = np.atleast_2d(np.asarray(points, dtype=np.float64))
    z_up = np.column_stack([points[:, 0], -points[:, 2], points[:, 1], np.ones(len(points))])
    ecef = (matrix @ z_up.T).T
    lon, lat, h = TO_GEODETIC.transform(ecef[:, 0], ecef[:, 1], ecef[:, 2])
    return np.column_stack([lon, lat, h])


def bearing_and_distance(origin: dict, point: np.ndarray) -> tuple[float, float]:
    azimuth, _, distance = GEOD.inv(origin["lon"], origin["lat"], point[0], point[1])
    return azimuth % 360.0, distance


# --- the transform -----------------------------------------------------------------------------

def test_the_anchor_is_the_models_origin():
    meta = {"anchor": ANCHOR, "heading": 37.0}
    lon, lat, h = placed(meta, np.zeros((1, 3)))[0]
    assert GEOD.inv(ANCHOR["lon"], ANCHOR["lat"], lon, lat)[2] < 1e-3
    assert h == pytest.approx(ANCHOR["height"], abs=1e-3)
    matrix = models3d.model_transform(meta)
    assert len(matrix) == 16 and matrix[3] == matrix[7] == matrix[11] == 0 and matrix[15] == 1
    x, y, z = TO_ECEF.transform(ANCHOR["lon"], ANCHOR["lat"], ANCHOR["height"])
    assert matrix[12:15] == pytest.approx([x, y, z], abs=1e-6)


@pytest.mark.parametrize(("heading", "x_bearing", "minus_z_bearing"),
                         [(0, 90, 0), (90, 180, 90), (180, 270, 180), (270, 0, 270),
                          (30, 120, 30)])
def test_heading_turns_the_model_clockwise_from_north(heading, x_bearing, minus_z_bearing):
    meta = {"anchor": ANCHOR, "heading": heading}
    east, north, up = placed(meta, np.array([[100.0, 0, 0], [0, 0, -100.0], [0, 100.0, 0]]))
    for point, expected in ((east, x_bearing), (north, minus_z_bearing)):
        azimuth, distance = bearing_and_distance(ANCHOR, point)
        assert distance == pytest.approx(100.0, abs=0.01)
        assert (azimuth - expected + 180) % 360 - 180 == pytest.approx(0.0, abs=0.01)
        assert point[2] == pytest.approx(ANCHOR["height"], abs=0.01)  # level: no tilt
    assert GEOD.inv(ANCHOR["lon"], ANCHOR["lat"], up[0], up[1])[2] < 1e-3
    assert up[2] == pytest.approx(ANCHOR["height"] + 100.0, abs=1e-3)


def test_the_region_holds_every_vertex(tmp_path: Path):
    tower = trimesh.creation.box(extents=(40.0, 300.0, 20.0))
    tower.apply_translation((25.0, 150.0, -10.0))
    path = tmp_path / "tower.glb"
    path.write_bytes(trimesh.Scene([tower]).export(file_type="glb"))
    meta = {"anchor": ANCHOR, "heading": 63.0}
    layer = Layer("m", "m", "m", "3d", "Point", None, None, file_path=str(path), meta=meta)
    west, south, east, north, low, high = models3d.model_region(layer)
    points = placed(meta, tower.vertices)
    lon, lat = np.radians(points[:, 0]), np.radians(points[:, 1])
    assert (lon >= west).all() and (lon <= east).all()
    assert (lat >= south).all() and (lat <= north).all()
    assert (points[:, 2] >= low).all() and (points[:, 2] <= high).all()
    # ... and not much more: at most a couple of metres of margin on any side.
    assert high - points[:, 2].max() < 2.0 and points[:, 2].min() - low < 2.0
    assert (east - lon.max()) * 6.4e6 < 2.0 and (lat.min() - south) * 6.4e6 < 2.0


# --- content -----------------------------------------------------------------------------

def _column(gltf: pygltflib.GLTF2, blob: bytes, view_index: int) -> bytes:
    view = gltf.bufferViews[view_index]
    return blob[view.byteOffset or 0:(view.byteOffset or 0) + view.byteLength]


def decode_content(glb: bytes) -> tuple[pygltflib.GLTF2, dict]:
    """The GLB read back with pygltflib: checks the feature ids, returns the one row."""
    gltf = pygltflib.GLTF2.load_from_bytes(glb)
    blob = gltf.binary_blob()
    assert {"EXT_mesh_features", "EXT_structural_metadata"} <= set(gltf.extensionsUsed)
    primitives = [p for mesh in gltf.meshes for p in mesh.primitives]
    assert primitives
    for primitive in primitives:
        attributes = primitive.attributes.__dict__ | getattr(primitive.attributes,
                                                             "_extra", {})
        feature = gltf.accessors[attributes["_FEATURE_ID_0"]]
        position = gltf.accessors[primitive.attributes.POSITION]
        assert feature.count == position.count and feature.type == "SCALAR"
        view = gltf.bufferViews[feature.bufferView]
        start = (view.byteOffset or 0) + (feature.byteOffset or 0)
        ids = np.frombuffer(blob[start:start + 4 * feature.count], dtype="<f4")
        assert (ids == 0).all()
        ext = primitive.extensions["EXT_mesh_features"]["featureIds"]
        assert ext == [{"featureCount": 1, "attribute": 0, "propertyTable": 0}]
    metadata = gltf.extensions["EXT_structural_metadata"]
    table = metadata["propertyTables"][0]
    assert table["count"] == 1
    definitions = metadata["schema"]["classes"][table["class"]]["properties"]
    row = {}
    for name, column in table["properties"].items():
        raw = _column(gltf, blob, column["values"])
        kind = definitions[name]
        if kind["type"] == "STRING":
            start, end = struct.unpack("<II", _column(gltf, blob, column["stringOffsets"]))
            row[name] = raw[start:end].decode("utf-8")
        else:
            row[name] = struct.unpack({"INT32": "<i", "INT64": "<q", "FLOAT64": "<d"}[
                kind["componentType"]], raw)[0]
    return gltf, row


def _validate(glb: bytes) -> None:
    report = gltf_validator.validate(glb)
    assert gltf_validator.problems(report, glb) == [], report["issues"]["messages"][:5]


def test_content_of_a_glb_has_one_feature_with_the_row(tmp_path: Path):
    path = tmp_path / "model.glb"
    path.write_bytes(minimal_glb())
    layer = Layer("m", "m", "m", "3d", "Point", None, None, file_path=str(path),
                  meta={"anchor": ANCHOR, "heading": 0})
    glb = models3d.model_content(layer, ROW)
    _, row = decode_content(glb)
    assert row == {k: v for k, v in ROW.items() if v is not None}
    mesh = trimesh.load(io.BytesIO(glb), file_type="glb", force="mesh")
    assert len(mesh.vertices) == 3
    _validate(glb)


def test_content_of_a_gltf_with_embedded_buffers_is_a_glb(tmp_path: Path):
    positions = np.array([[0, 0, 0], [10, 0, 0], [0, 0, -10]], dtype="<f4").tobytes()
    document = {
        "asset": {"version": "2.0"}, "scene": 0, "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0, "translation": [5.0, 0.0, 0.0]}],
        "meshes": [{"primitives": [{"attributes": {"POSITION": 0}}]}],
        "accessors": [{"bufferView": 0, "componentType": 5126, "count": 3, "type": "VEC3",
                       "min": [0, 0, -10], "max": [10, 0, 0]}],
        "bufferViews": [{"buffer": 0, "byteLength": len(positions)}],
        "buffers": [{"byteLength": len(positions), "uri": "data:application/octet-stream;"
                     "base64," + base64.b64encode(positions).decode()}],
    }
    path = tmp_path / "model.gltf"
    path.write_text(json.dumps(document))
    layer = Layer("m", "m", "m", "3d", "Point", None, None, file_path=str(path),
                  meta={"anchor": ANCHOR, "heading": 0})
    glb = models3d.model_content(layer, {"id": 5, "name": "泵房", "cim_level": 6})
    assert glb[:4] == b"glTF"
    gltf, row = decode_content(glb)
    assert row == {"id": 5, "name": "泵房", "cim_level": 6}
    assert all(buffer.uri is None for buffer in gltf.buffers)
    vertices = models3d.model_vertices(Layer("m", "m", "m", "3d", "Point", None, None,
                                             file_path=str(path), meta={}))
    assert sorted(map(tuple, vertices.round(3).tolist())) == [
        (5.0, 0.0, -10.0), (5.0, 0.0, 0.0), (15.0, 0.0, 0.0)]
    _validate(glb)


# --- the sample's models -------------------------------------------------------------------

def _model_layers(engine: Engine) -> list[Layer]:
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT id, title_zh, title_en, kind, geometry_type, file_path, meta, origin, bbox "
            "FROM layers WHERE kind = '3d' AND origin = 'builtin' ORDER BY id")).mappings().all()
    return [Layer(r["id"], r["title_zh"], r["title_en"], r["kind"], r["geometry_type"], None,
                  None, file_path=r["file_path"], meta=r["meta"], origin=r["origin"],
                  bbox=r["bbox"]) for r in rows]


def _dem_ground(sample_dir: Path, lon: float, lat: float) -> float:
    for name in ("dem_central.tif", "dem_municipality.tif"):
        with rasterio.open(sample_dir / name) as dem:
            value = next(dem.sample([(lon, lat)], masked=True))[0]
            if value is not np.ma.masked:
                return float(value)
    raise AssertionError("no DEM under the anchor")


def test_the_sample_ships_a_model_for_each_of_cim4_to_cim6(engine: Engine, sample_dir: Path):
    layers = _model_layers(engine)
    assert {layer.meta["cim_level"] for layer in layers} >= {4, 5, 6}
    manifest = json.loads((sample_dir / "manifest.json").read_text())
    for layer in layers:
        assert layer.id.startswith("model_")
        path = Path(layer.file_path or "")
        assert path.name in manifest["files"] and path.parent == sample_dir
        meta = layer.meta
        assert meta["format"] == "glb" and meta["bytes"] == path.stat().st_size
        document = pygltflib.GLTF2.load(str(path))
        assert meta["meshes"] == len(document.meshes) and meta["nodes"] == len(document.nodes)
        anchor = meta["anchor"]
        assert layer.bbox == pytest.approx([anchor["lon"], anchor["lat"]] * 2)
        assert anchor["height"] == _dem_ground(sample_dir, anchor["lon"], anchor["lat"])
        assert 0 <= meta["heading"] < 360
    by_level = {layer.meta["cim_level"]: layer for layer in layers}
    tower = pygltflib.GLTF2.load(by_level[5].file_path)
    assert len([n for n in tower.nodes if n.name and n.name.startswith("F")]) >= 2 * 72
    station = {n.name.split("_")[0] for n in pygltflib.GLTF2.load(by_level[6].file_path).nodes}
    assert {"shell", "pump", "motor", "pipe", "tank"} <= station
    assert "building_id" not in by_level[4].meta  # the bridge stands alone


def test_a_model_stands_on_its_buildings_footprint(engine: Engine):
    """The model that replaces a building has that building's CIM level, fills its footprint
    (within 0.5 m) and reaches its roof (within 0.1 m)."""
    tied = [layer for layer in _model_layers(engine) if "building_id" in layer.meta]
    assert len(tied) >= 2
    for layer in tied:
        with engine.connect() as conn:
            building = conn.execute(text(
                "SELECT cim_level, height_m, ST_AsBinary(geom) AS geom FROM buildings "
                "WHERE id = :id"), {"id": layer.meta["building_id"]}).mappings().one()
        assert building["cim_level"] == layer.meta["cim_level"]
        points = placed(layer.meta, models3d.model_vertices(layer))
        footprint = shapely.from_wkb(bytes(building["geom"]))
        lon0, lat0 = footprint.centroid.x, footprint.centroid.y
        # Footprint and vertices in metres east/north of the footprint's centroid.
        scale = np.array([111_320.0 * math.cos(math.radians(lat0)), 110_574.0])
        local = (points[:, :2] - [lon0, lat0]) * scale
        ring = (np.asarray(footprint.exterior.coords) - [lon0, lat0]) * scale
        area = shapely.Polygon(ring)
        assert shapely.contains(area.buffer(0.5), shapely.MultiPoint(local))
        hull = shapely.MultiPoint(local).convex_hull
        assert hull.area > 0.5 * area.area
        top = points[:, 2].max() - layer.meta["anchor"]["height"]
        assert top == pytest.approx(building["height_m"], abs=0.1)


def test_the_sample_models_content_answers_with_the_building(engine: Engine):
    for layer in _model_layers(engine):
        glb = models3d.model_content(layer, {**ROW, "cim_level": layer.meta["cim_level"]})
        _, row = decode_content(glb)
        assert row["cim_level"] == layer.meta["cim_level"]
        region = models3d.model_region(layer)
        points = placed(layer.meta, models3d.model_vertices(layer))
        assert (np.radians(points[:, 0]) >= region[0]).all()
        assert (np.radians(points[:, 1]) <= region[3]).all()
        assert (points[:, 2] >= region[4]).all() and (points[:, 2] <= region[5]).all()
        _validate(glb)


# --- uploads: a model that replaces a building ------------------------------------------------

def _building_in(engine: Engine, district: str, inside: bool = True) -> tuple[int, float, float]:
    """A sample building (id, centroid lon, lat) in ``district`` (or outside it)."""
    with engine.connect() as conn:
        row = conn.execute(text(
            "SELECT id, ST_X(ST_Centroid(geom)), ST_Y(ST_Centroid(geom)) FROM buildings "
            "WHERE (district_code = :d) = :inside ORDER BY id LIMIT 1"),
            {"d": district, "inside": inside}).one()
    return int(row[0]), float(row[1]), float(row[2])


def test_a_model_upload_names_the_building_it_replaces(api, engine):
    building, lon, lat = _building_in(engine, DISTRICT_EDITOR_SCOPE)
    job = upload_ok(api, "block.glb", minimal_glb(), title="楼栋模型", lon=str(lon),
                    lat=str(lat), cim_level="5", building_id=str(building))
    meta = api.get(f"/layers/{job['layer_id']}").json()["meta"]
    assert meta["building_id"] == building and meta["cim_level"] == 5
    assert job["params"]["building_id"] == str(building)
    # The district's own editor may tie a model to a building of its district.
    response = api.post("/layers", files={"file": ("block.glb", minimal_glb())},
                        data={"title": "区内模型", "lon": str(lon), "lat": str(lat),
                              "building_id": str(building)}, headers=DISTRICT_EDITOR)
    assert response.status_code == 202, response.text
    assert wait(api, response.json())["state"] == "succeeded"


@pytest.mark.parametrize("case", ["unknown", "other-district", "far", "not-a-number"])
def test_a_bad_building_id_is_refused_at_once(api, engine, uploads_dir, case):
    building, lon, lat = _building_in(engine, DISTRICT_EDITOR_SCOPE)
    other, o_lon, o_lat = _building_in(engine, DISTRICT_EDITOR_SCOPE, inside=False)
    form = {"title": "bad building", "lon": str(lon), "lat": str(lat)}
    headers, reason = EDITOR, "building_id: "
    if case == "unknown":
        form["building_id"], reason = "99999999", "no building 99999999"
    elif case == "other-district":
        form |= {"building_id": str(other), "lon": str(o_lon), "lat": str(o_lat)}
        headers, reason = DISTRICT_EDITOR, f"no building {other} in your jurisdiction"
    elif case == "far":
        form |= {"building_id": str(building), "lon": str(lon + 0.05)}
        reason = "m from building"
    else:
        form["building_id"], reason = "12a", "building_id: expected the id of a building"
    response = api.post("/layers", files={"file": ("m.glb", minimal_glb())}, data=form,
                        headers=headers)
    assert response.status_code == 400, response.text
    assert reason in response.json()["description"]
    assert not any((uploads_dir / "jobs").glob("*"))


@pytest.mark.parametrize(("form", "reason"), [
    ({"lon": "116.397", "lat": "39.909"},
     "lon: expected a number in [105.28, 110.2] (the municipality of Chongqing)"),
    ({"lon": "106.5", "lat": "39.909"},
     "lat: expected a number in [28.15, 32.21] (the municipality of Chongqing)"),
])
def test_an_anchor_outside_the_municipality_is_refused_naming_the_bounds(api, form, reason):
    response = post_layer(api, "m.glb", minimal_glb(), title="far away", **form)
    assert response.status_code == 400, response.text
    assert reason in response.json()["description"]


def _glb_with_json(raw: bytes) -> bytes:
    good = minimal_glb()
    raw += b" " * (-len(raw) % 4)
    chunk = struct.pack("<II", len(raw), 0x4E4F534A) + raw
    rest = good[20 + struct.unpack("<I", good[12:16])[0]:]
    body = chunk + rest
    return struct.pack("<4sII", b"glTF", 2, 12 + len(body)) + body


@pytest.mark.parametrize(("content", "reason"), [
    (_glb_with_json(b'{"asset": {"version": "2.0"'), "the glTF JSON does not parse"),
    (_glb_with_json(b'[1, 2]'), "the glTF JSON must be an object"),
    (_glb_with_json(b'{"asset": {"version": "2.0"}, "nodes": {"0": {}}}'),
     "glTF 'nodes' must be an array of objects"),
    (minimal_glb()[:12] + struct.pack("<II", 10_000, 0x4E4F534A) + minimal_glb()[20:],
     "the first GLB chunk must be the JSON chunk"),
    (minimal_glb()[:12] + struct.pack("<II", 8, 0x004E4942) + minimal_glb()[20:],
     "the first GLB chunk must be the JSON chunk"),
], ids=["json-cut", "json-array", "nodes-object", "chunk-too-long", "bin-first"])
def test_malformed_glb_is_refused_with_its_reason(api, content, reason):
    response = post_layer(api, "m.glb", content, title="malformed", lon="106.5", lat="29.5")
    assert response.status_code == 400, response.text
    assert reason in response.json()["description"]


def test_the_sample_models_are_served_as_3d_layers(client, engine, sample_dir: Path):
    for layer in _model_layers(engine):
        model = client.get(f"/layers/{layer.id}/model")
        assert model.status_code == 200, model.text
        assert model.content == Path(layer.file_path or "").read_bytes()
        assert model.headers["content-type"] == "model/gltf-binary"
        collection = client.get(f"/collections/{layer.id}").json()
        assert collection["kind"] == "3d" and collection["origin"] == "builtin"

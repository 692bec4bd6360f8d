"""glTF/GLB models are stored with their anchor, heading and CIM level and listed as 3D layers."""

from __future__ import annotations

import base64
import json

import eviltransform
import pytest
from pyproj import Geod

from tests.uploads import (
    minimal_glb,
    upload_ok,
)

# The upload server and its client (fixtures shared by the upload tests).


GEOD = Geod(ellps="WGS84")


def test_glb_is_a_3d_layer_with_its_anchor(api):
    content = minimal_glb()
    job = upload_ok(api, "theatre.glb", content, title="大剧院", lon="106.5785", lat="29.5690",
                    height="12.5", heading="30", cim_level="4")
    layer = api.get(f"/layers/{job['layer_id']}").json()
    assert layer["kind"] == "3d"
    meta = layer["meta"]
    assert meta["anchor"] == {"lon": 106.5785, "lat": 29.5690, "height": 12.5}
    assert meta["heading"] == 30 and meta["cim_level"] == 4 and meta["meshes"] == 1
    assert layer["bbox"] == pytest.approx([106.5785, 29.5690, 106.5785, 29.5690])
    model = api.get(f"/layers/{job['layer_id']}/model")
    assert model.status_code == 200 and model.content == content
    assert model.headers["content-type"] == "model/gltf-binary"
    collection = api.get(f"/collections/{job['layer_id']}").json()
    assert collection["kind"] == "3d" and collection["itemType"] == "3d"


def test_gltf_anchor_in_gcj02_is_corrected(api):
    truth = (106.5770, 29.5576)
    gcj_lat, gcj_lon = eviltransform.wgs2gcj(truth[1], truth[0])
    buffer = base64.b64encode(bytes(36)).decode()
    document = {"asset": {"version": "2.0"}, "buffers": [
        {"byteLength": 36, "uri": f"data:application/octet-stream;base64,{buffer}"}]}
    job = upload_ok(api, "box.gltf", json.dumps(document).encode(), title="box",
                    lon=str(gcj_lon), lat=str(gcj_lat), datum="gcj02")
    anchor = api.get(f"/layers/{job['layer_id']}").json()["meta"]["anchor"]
    assert GEOD.inv(anchor["lon"], anchor["lat"], *truth)[2] < 1.0
    assert api.get(f"/layers/{job['layer_id']}/model").headers["content-type"] == \
        "model/gltf+json"

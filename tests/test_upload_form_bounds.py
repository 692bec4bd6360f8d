"""The upload form's bounds as /api declares them are the bounds the server enforces: a value
just past each declared bound is refused with a 400 naming the field, before any job exists.
The oracle is the served OpenAPI document itself (read over HTTP, not from the code)."""

from __future__ import annotations

import re

import pytest

from tests import uploads as support
from tests.uploads import EDITOR, minimal_glb, post_layer

# The upload server and its client (fixtures shared by the upload tests).

ANCHOR = {"lon": "106.5", "lat": "29.5"}


@pytest.fixture()
def form_schema(api) -> dict:
    document = api.get("/api").json()
    body = document["paths"]["/layers"]["post"]["requestBody"]
    return body["content"]["multipart/form-data"]["schema"]["properties"]


@pytest.mark.parametrize("field", ["lon", "lat", "height", "heading", "cim_level"])
def test_a_model_anchor_past_its_declared_bound_is_refused(api, uploads_dir, form_schema,
                                                            field):
    schema = form_schema[field]
    integer = schema["type"] == "integer"  # (the document writes its bounds as 7.0)
    step = 1 if integer else 0.001
    for bound, inside in ((schema["maximum"] + step, False), (schema["minimum"] - step, False),
                          (schema["maximum"], True)):
        value = int(bound) if integer else bound
        response = post_layer(api, "model.glb", minimal_glb(), title=f"bounds {field}",
                              **(ANCHOR | {field: str(value)}))
        if inside:
            # Within bounds: accepted (the job is then deleted with its layer).
            assert response.status_code == 202, response.text
            job = support.wait(api, response.json())
            assert job["state"] == "succeeded", job
            assert api.delete(f"/layers/{job['layer_id']}", headers=EDITOR).status_code == 204
        else:
            assert response.status_code == 400, (value, response.text)
            assert response.json()["description"].startswith(f"{field}:"), response.json()
    assert not any((uploads_dir / "jobs").glob("*"))


def test_patterns_and_enums_are_enforced(api, form_schema):
    cases = {"id": "Not-An-Id", "source_crs": "EPSG:43x6", "datum": "wgs72"}
    assert not re.fullmatch(form_schema["id"]["pattern"], cases["id"])
    assert not re.fullmatch(form_schema["source_crs"]["pattern"], cases["source_crs"])
    assert cases["datum"] not in form_schema["datum"]["enum"]
    for field, value in cases.items():
        response = post_layer(api, "a.geojson", support.geojson_points(), title="bounds",
                              **{field: value})
        assert response.status_code == 400, (field, response.text)
        assert response.json()["description"].startswith(f"{field}:"), response.json()


def test_rollback_with_a_broken_json_body_is_a_400(api):
    job = support.upload_ok(api, "v1.geojson", support.geojson_points(), title="rollback body")
    layer_id = job["layer_id"]
    broken = api.post(f"/layers/{layer_id}/rollback", content=b'{"version": ',
                      headers={**EDITOR, "Content-Type": "application/json"})
    assert broken.status_code == 400, broken.text
    assert "JSON" in broken.json()["description"]
    missing = api.post(f"/layers/{layer_id}/rollback", json={"version": "one"}, headers=EDITOR)
    assert missing.status_code == 400 and missing.json()["description"].startswith("version:")
    assert api.post(f"/layers/{layer_id}/rollback", json={"version": 1},
                    headers=EDITOR).status_code == 200
    assert api.delete(f"/layers/{layer_id}", headers=EDITOR).status_code == 204

"""Who may change an upload, and what a refusal reveals (issue 7).

Seeing a layer is not owning it: a street sees its district's upload but may not replace,
roll back or delete it; a district may change its own and its streets' uploads; the city
may change any. A centre that cannot see a layer gets the 404 of a layer that does not
exist, and no 404 anywhere lists a layer the caller may not see.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import Engine, text

from tests.servers import LiveServer
from tests.uploads import geojson_points
from twin.core.settings import AuthSettings, Settings, UploadSettings

DISTRICT, STREET, OTHER = "500112", "500112002", "500103"
KEYS = {
    "district": ("writes-district-editor-0123456789", f"gis-editor:d:district={DISTRICT}"),
    "street": ("writes-street-editor-0123456789", f"gis-editor:s:street={STREET}"),
    "other": ("writes-other-editor-0123456789", f"gis-editor:o:district={OTHER}"),
    "city": ("writes-city-editor-0123456789", "gis-editor:c:city"),
}


def auth(who: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[who][0]}"}


@pytest.fixture(scope="module")
def api(engine: Engine, database_url: str,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    settings = Settings(database_url=database_url,
                        auth=AuthSettings(keys=dict(KEYS.values()), anonymous_role=""),
                        uploads=UploadSettings(dir=tmp_path_factory.mktemp("scope-writes")))
    with LiveServer(settings) as live, httpx.Client(base_url=live.url, timeout=60) as client:
        yield client


def finished(api: httpx.Client, response: httpx.Response, who: str) -> dict:
    assert response.status_code == 202, response.text
    job = response.json()
    deadline = time.monotonic() + 90
    while job["state"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
        job = api.get(f"/jobs/{job['id']}", headers=auth(who)).json()
    assert job["state"] == "succeeded", job
    return job


def upload(api: httpx.Client, who: str, layer_id: str) -> None:
    finished(api, api.post("/layers", files={"file": ("p.geojson", geojson_points())},
                           data={"title": layer_id, "id": layer_id}, headers=auth(who)), who)


def replace(api: httpx.Client, who: str, layer_id: str) -> httpx.Response:
    return api.put(f"/layers/{layer_id}", files={"file": ("p.geojson", geojson_points())},
                   headers=auth(who))


def versions(engine: Engine, layer_id: str) -> list[int]:
    with engine.connect() as conn:
        return conn.execute(text("SELECT version FROM layer_versions WHERE layer_id = :id "
                                 "ORDER BY version"), {"id": layer_id}).scalars().all()


@pytest.fixture()
def district_layer(api: httpx.Client, engine: Engine) -> Iterator[str]:
    """An unshared upload of the district, at two versions."""
    layer_id = "writes_district"
    upload(api, "district", layer_id)
    finished(api, replace(api, "district", layer_id), "district")
    yield layer_id
    api.delete(f"/layers/{layer_id}", headers=auth("city"))


def test_a_centre_that_cannot_see_a_layer_cannot_touch_it(api, engine, district_layer):
    for response in (replace(api, "other", district_layer),
                     api.post(f"/layers/{district_layer}/rollback?version=1",
                              headers=auth("other")),
                     api.delete(f"/layers/{district_layer}", headers=auth("other"))):
        assert response.status_code == 404, response.text
        assert district_layer not in response.json()["description"].split("available")[1]
    assert versions(engine, district_layer) == [1, 2]


def test_seeing_a_layer_is_not_owning_it(api, engine, district_layer):
    """The street below the district sees its upload, and may not change it."""
    assert api.get(f"/layers/{district_layer}", headers=auth("street")).status_code == 200
    for response in (replace(api, "street", district_layer),
                     api.post(f"/layers/{district_layer}/rollback?version=1",
                              headers=auth("street")),
                     api.delete(f"/layers/{district_layer}", headers=auth("street"))):
        assert response.status_code == 403, response.text
        assert f"uploaded for {DISTRICT}" in response.json()["description"]
    assert versions(engine, district_layer) == [1, 2]
    layer = api.get(f"/layers/{district_layer}", headers=auth("district")).json()
    assert layer["current_version"] == 2


def test_the_owner_and_the_centres_above_may_change_it(api, engine, district_layer):
    rolled = api.post(f"/layers/{district_layer}/rollback?version=1", headers=auth("district"))
    assert rolled.status_code == 200, rolled.text
    finished(api, replace(api, "city", district_layer), "city")
    assert versions(engine, district_layer) == [1, 2, 3]
    assert api.delete(f"/layers/{district_layer}", headers=auth("district")).status_code == 204
    assert versions(engine, district_layer) == []


def test_a_district_may_delete_its_streets_upload_but_not_the_citys(api):
    upload(api, "street", "writes_street")
    upload(api, "city", "writes_city")
    try:
        assert api.delete("/layers/writes_street", headers=auth("district")).status_code == 204
        refused = api.delete("/layers/writes_city", headers=auth("district"))
        assert refused.status_code == 403 and "the city" in refused.json()["description"]
    finally:
        api.delete("/layers/writes_street", headers=auth("city"))
        assert api.delete("/layers/writes_city", headers=auth("city")).status_code == 204


@pytest.mark.parametrize("path", ["/collections/nope", "/collections/nope/items",
                                  "/tiles/nope/3/6/3.mvt", "/tiles/nope/tilejson.json",
                                  "/layers/nope/model", "/collections/nope/tiles"])
def test_no_404_lists_a_layer_the_caller_may_not_see(api, district_layer, path):
    hidden = api.get(path, headers=auth("other"))
    assert hidden.status_code == 404
    assert "available layers: " in hidden.json()["description"]
    assert district_layer not in hidden.json()["description"]
    assert "risk_points" in hidden.json()["description"]
    seen = api.get(path, headers=auth("city"))
    assert seen.status_code == 404 and district_layer in seen.json()["description"]

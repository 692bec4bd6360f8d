"""Jurisdiction of raster layers and of the style (issue 7).

A district's GeoTIFF upload (not shared with the city) is served, listed and described only to
principals whose scope overlaps the district's; another district gets 404 on its raster
tiles, terrain tiles and TileJSON, exactly the answer it gets for the layer as a collection,
even when it replays the layer's ETag. A city upload is shared: everyone sees it. The style
lists only built-in layers, so it is the same document for every principal.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import morecantile
import numpy as np
import pytest
from rasterio.io import MemoryFile
from sqlalchemy import Engine

from layers.builtin import BUILTIN_LAYERS
from tests.servers import EDITOR as CITY_EDITOR
from tests.servers import LiveServer
from tests.uploads import dem_values, geotiff
from twin.core.settings import AuthSettings, Settings, UploadSettings

DISTRICT, STREET, OTHER_DISTRICT = "500112", "500112002", "500103"
KEYS = {
    "district-editor": ("raster-district-editor-0123456789",
                        f"gis-editor:yubei-gis:district={DISTRICT}"),
    "street": ("raster-street-viewer-0123456789", f"viewer:yubei-street:street={STREET}"),
    "other": ("raster-other-viewer-0123456789",
              f"viewer:other-district:district={OTHER_DISTRICT}"),
    "city": ("raster-city-viewer-0123456789", "viewer:city-viewer:city"),
}
# Who sees an unshared upload of DISTRICT: its own centre, the street below, the city.
SEES_DISTRICT_UPLOAD = {"district-editor": True, "street": True, "city": True, "other": False}
HIDDEN, SHARED = "raster_scope_district", "raster_scope_city"
WEB_MERCATOR = morecantile.tms.get("WebMercatorQuad")


def auth(who: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[who][0]}"}


@pytest.fixture(scope="module")
def api(engine: Engine, database_url: str,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    keys = {key: value for key, value in KEYS.values()}
    settings = Settings(database_url=database_url,
                        auth=AuthSettings(keys=keys, anonymous_role=""),
                        uploads=UploadSettings(dir=tmp_path_factory.mktemp("raster-scope")))
    with LiveServer(settings) as live, httpx.Client(base_url=live.url, timeout=60) as client:
        yield client


def upload(api: httpx.Client, headers: dict, layer_id: str) -> dict:
    values, transform = dem_values()
    content = geotiff(values, transform, "EPSG:4326")
    response = api.post("/layers", files={"file": ("dem.tif", content)},
                        data={"title": layer_id, "id": layer_id}, headers=headers)
    assert response.status_code == 202, response.text
    job = response.json()
    deadline = time.monotonic() + 90
    while job["state"] not in ("succeeded", "failed") and time.monotonic() < deadline:
        time.sleep(0.1)
        job = api.get(f"/jobs/{job['id']}", headers=headers).json()
    assert job["state"] == "succeeded", job
    return job


@pytest.fixture(scope="module")
def uploaded(api: httpx.Client) -> Iterator[dict]:
    """A DEM uploaded by the district's editor (unshared) and one by a city editor (shared)."""
    made = {HIDDEN: auth("district-editor"), SHARED: CITY_EDITOR}
    try:
        for layer_id, headers in made.items():
            upload(api, headers, layer_id)
        yield made
    finally:
        for layer_id, headers in made.items():
            api.delete(f"/layers/{layer_id}", headers=headers)


def centre_tile(z: int = 13) -> morecantile.Tile:
    """A tile in the middle of the uploaded DEM (dem_values: 106.50-106.60, 29.50-29.60)."""
    return WEB_MERCATOR.tile(106.55, 29.55, z)


def raster_paths(layer_id: str) -> list[str]:
    t = centre_tile()
    base = f"/tiles/{layer_id}/{t.z}/{t.x}/{t.y}"
    return [f"{base}.png", f"{base}.webp", f"{base}.terrain.png?encoding=mapbox",
            f"{base}.terrain.png?encoding=terrarium", f"/tiles/{layer_id}/raster-tilejson.json",
            f"/tiles/{layer_id}/raster-tilejson.json?terrain=terrarium"]


def listed(api: httpx.Client, who: str) -> tuple[set[str], set[str]]:
    layers = api.get("/layers", headers=auth(who)).json()["layers"]
    collections = api.get("/collections", headers=auth(who)).json()["collections"]
    return {layer["id"] for layer in layers}, {c["id"] for c in collections}


@pytest.mark.parametrize("who", sorted(SEES_DISTRICT_UPLOAD))
def test_an_unshared_raster_is_served_only_where_jurisdictions_overlap(
        api: httpx.Client, uploaded: dict, who: str):
    visible = SEES_DISTRICT_UPLOAD[who]
    for path in raster_paths(HIDDEN):
        response = api.get(path, headers=auth(who))
        assert response.status_code == (200 if visible else 404), (who, path, response.text)
    layers, collections = listed(api, who)
    assert (HIDDEN in layers) is visible and (HIDDEN in collections) is visible
    # Everyone sees the city's (shared) upload, tiles and all.
    assert SHARED in layers and SHARED in collections
    for path in raster_paths(SHARED):
        assert api.get(path, headers=auth(who)).status_code == 200, (who, path)


def test_a_visible_raster_tile_holds_the_uploaded_dem(api: httpx.Client, uploaded: dict):
    """The tile a district sees is the real thing: a full PNG with data, and the TileJSON
    points at it and at the DEM's bounds."""
    png = api.get(raster_paths(HIDDEN)[0], headers=auth("district-editor"))
    with MemoryFile(png.content) as memory, memory.open() as image:
        bands = image.read()
    # Every pixel of a tile inside the DEM is data (opaque), and the DEM is not flat.
    assert bands.shape[1:] == (256, 256) and (bands[-1] > 0).all()
    assert len(np.unique(bands[0])) > 10
    document = api.get(f"/tiles/{HIDDEN}/raster-tilejson.json", headers=auth("street")).json()
    assert document["bounds"] == pytest.approx([106.50, 29.50, 106.60, 29.60], abs=1e-6)
    assert document["tiles"][0].split("?v=")[0].endswith(f"/tiles/{HIDDEN}/{{z}}/{{x}}/{{y}}.png")


def test_the_404_is_the_hidden_collection_answer_and_no_etag_leaks(api: httpx.Client,
                                                                     uploaded: dict):
    hidden_collection = api.get(f"/collections/{HIDDEN}", headers=auth("other"))
    assert hidden_collection.status_code == 404
    expected = hidden_collection.json()
    assert expected["code"] == "NotFound"
    # The answer for a layer that does not exist: the layers the caller may see, not this one.
    said, available = expected["description"].split("; available layers: ")
    assert said == f"unknown layer '{HIDDEN}'"
    assert HIDDEN not in available.split(", ") and SHARED in available.split(", ")
    for path in raster_paths(HIDDEN):
        response = api.get(path, headers=auth("other"))
        assert (response.status_code, response.json()) == (404, expected), path
    # Replaying the layer's ETag (learnt elsewhere) gets the same 404, never a 304.
    tile = raster_paths(HIDDEN)[0]
    etag = api.get(tile, headers=auth("city")).headers["etag"]
    assert api.get(tile, headers=auth("city") | {"If-None-Match": etag}).status_code == 304
    replay = api.get(tile, headers=auth("other") | {"If-None-Match": etag})
    assert (replay.status_code, replay.json()) == (404, expected)


def test_built_in_dems_are_everyones(api: httpx.Client):
    for who in KEYS:
        for layer_id in ("terrain", "terrain_central"):
            response = api.get(f"/tiles/{layer_id}/raster-tilejson.json", headers=auth(who))
            assert response.status_code == 200, (who, layer_id)


def test_the_style_lists_only_built_in_layers_the_same_for_everyone(api: httpx.Client,
                                                                      uploaded: dict):
    """Built-in layers are city-wide (twin/core/scope.py: no owner scope), so a style made
    of them only is everyone's; an upload, hidden or shared, is not in it."""
    builtin = {layer.id for layer in BUILTIN_LAYERS}
    styles = {who: api.get("/styles/risk-map.json", headers=auth(who)).json() for who in KEYS}
    first = styles["city"]
    assert all(style == first for style in styles.values())
    for source in first["sources"].values():
        layer_ids = source["url"].split("/tiles/")[1].split("/")[0].split(",")
        assert set(layer_ids) <= builtin, source
        for who in KEYS:  # and every source's TileJSON answers every principal
            path = httpx.URL(source["url"]).path
            assert api.get(path, headers=auth(who)).status_code == 200, (who, path)
    assert HIDDEN not in str(first) and SHARED not in str(first)

"""Versioned tile URLs (issue 15): the documents that name tiles put the data versions in the
URL (``v=``), and a tile asked for with the current ``v`` is sent immutable.

Oracles: the documents themselves (the URL they name is the one that answers immutable), a
write made straight in PostgreSQL (the next document names another ``v``; the old URL answers
the new data, revalidated, never immutable) and the decoded tiles.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import h3
import mapbox_vector_tile
import morecantile
import pytest
from httpx import Client
from sqlalchemy import Engine, text

from twin.core.versions import announce

WEB_MERCATOR = morecantile.tms.get("WebMercatorQuad")
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATED = "public, no-cache"
SPOT = (106.5634567, 29.5612345)  # Yuzhong


def version_of(url: str) -> str:
    (version,) = parse_qs(urlsplit(url).query)["v"]
    return version


def filled(template: str, tile: morecantile.Tile, base: str = "") -> str:
    path = (template.replace("{z}", str(tile.z)).replace("{x}", str(tile.x))
            .replace("{y}", str(tile.y)).replace("{tileMatrix}", str(tile.z))
            .replace("{tileRow}", str(tile.y)).replace("{tileCol}", str(tile.x)))
    return path.removeprefix(base)


def ids_in(content: bytes, layer: str) -> set[int]:
    decoded = mapbox_vector_tile.decode(content)
    return {feature["id"] for feature in decoded.get(layer, {}).get("features", [])}


@pytest.fixture()
def spot_tile() -> morecantile.Tile:
    return WEB_MERCATOR.tile(*SPOT, 16)


def test_tilejson_names_the_url_that_answers_immutable(client: Client, spot_tile):
    base = str(client.base_url).rstrip("/")
    for layers in ("risk_points", "districts,streets", "roads"):
        template = client.get(f"/tiles/{layers}/tilejson.json").json()["tiles"][0]
        url = filled(template, spot_tile, base)
        fast = client.get(url)  # the warm XYZ path
        assert fast.status_code == 200 and fast.headers["cache-control"] == IMMUTABLE, layers
        declared = client.get(url + "&aggregate=true&aggregate=true")  # the declared route
        assert declared.headers["cache-control"] == IMMUTABLE
        assert declared.content == fast.content
        # Any other v, or none, is revalidated as before, with the same bytes and ETag.
        for other in (url.replace("v=", "v=0"), url.split("?")[0]):
            answer = client.get(other)
            assert answer.headers["cache-control"] == REVALIDATED
            assert answer.headers["etag"] == fast.headers["etag"]
        # A 304 of the current URL is immutable too.
        again = client.get(url, headers={"If-None-Match": fast.headers["etag"]})
        assert again.status_code == 304 and again.headers["cache-control"] == IMMUTABLE


def test_a_write_names_a_new_url_and_the_old_one_is_never_immutable(
        client: Client, engine: Engine, spot_tile):
    base = str(client.base_url).rstrip("/")
    before = client.get("/tiles/risk_points/tilejson.json").json()["tiles"][0]
    with engine.connect() as conn:
        grid_code = conn.execute(text(
            "SELECT code FROM admin_units WHERE level = 'grid' ORDER BY geom <-> "
            "ST_SetSRID(ST_MakePoint(:lon, :lat), 4326)"
            " LIMIT 1"), {"lon": SPOT[0], "lat": SPOT[1]}).scalar_one()
    cells = {f"h3_r{res}": h3.str_to_int(h3.latlng_to_cell(SPOT[1], SPOT[0], res))
             for res in range(3, 10)}
    with engine.begin() as conn:
        conn.execute(text(f"""
            INSERT INTO risk_points (id, code, name, sector_code, category, level, address,
                                     grid_code, {", ".join(cells)}, geom)
            VALUES (999321, 'RP-VERSIONED', 'versioned', 'facility_operation', 'test', 1, 't',
                    :grid, {", ".join(f":{c}" for c in cells)},
                    ST_SetSRID(ST_MakePoint(:lon, :lat), 4326))"""),
            {"grid": grid_code, "lon": SPOT[0], "lat": SPOT[1], **cells})
    assert announce(engine.url.render_as_string(hide_password=False)) == set()
    try:
        after = client.get("/tiles/risk_points/tilejson.json").json()["tiles"][0]
        assert version_of(after) != version_of(before)
        old = client.get(filled(before, spot_tile, base))
        new = client.get(filled(after, spot_tile, base))
        # The old URL answers the new data, and says so: revalidate, never keep.
        assert old.headers["cache-control"] == REVALIDATED
        assert 999321 in ids_in(old.content, "risk_points")
        assert new.headers["cache-control"] == IMMUTABLE
        assert 999321 in ids_in(new.content, "risk_points")
        # A layer the write did not touch keeps its URL.
        roads = client.get("/tiles/roads/tilejson.json").json()["tiles"][0]
        assert client.get(filled(roads, spot_tile, base)).headers["cache-control"] == IMMUTABLE
    finally:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM risk_points WHERE id = 999321"))
        assert announce(engine.url.render_as_string(hide_password=False)) == set()


def test_documents_naming_tiles_are_never_kept(client: Client):
    for path in ("/tiles/risk_points/tilejson.json", "/tiles/terrain/raster-tilejson.json",
                 "/styles/risk-map.json", "/collections/risk_points/tiles/WebMercatorQuad"):
        assert client.get(path).headers["cache-control"] == "no-cache", path
    for path in ("/collections/terrain/quantized-mesh/layer.json",
                 "/collections/buildings/3dtiles/tileset.json"):
        assert "no-cache" in client.get(path).headers["cache-control"], path


def test_ogc_tileset_template_carries_the_version(client: Client, spot_tile):
    base = str(client.base_url).rstrip("/")
    document = client.get("/collections/risk_points/tiles/WebMercatorQuad").json()
    (item,) = [link for link in document["links"] if link["rel"] == "item"]
    url = filled(item["href"], spot_tile, base)
    assert "v=" in url
    answer = client.get(url)
    assert answer.status_code == 200 and answer.headers["cache-control"] == IMMUTABLE
    assert client.get(url.split("?")[0]).headers["cache-control"] == REVALIDATED


def test_raster_terrain_and_3d_urls_carry_the_version(client: Client):
    base = str(client.base_url).rstrip("/")
    tile = WEB_MERCATOR.tile(*SPOT, 10)
    for query in ("", "?terrain=terrarium"):
        document = client.get(f"/tiles/terrain/raster-tilejson.json{query}").json()
        url = filled(document["tiles"][0], tile, base)
        answer = client.get(url)
        assert answer.status_code == 200 and answer.headers["cache-control"] == IMMUTABLE, url
        assert client.get(url.replace("v=", "v=x")).headers["cache-control"] == REVALIDATED
    # quantized-mesh: layer.json's template (relative to it) carries the stack's token.
    layer_json = client.get("/collections/terrain/quantized-mesh/layer.json").json()
    (template,) = layer_json["tiles"]
    assert "v=" in template
    path = "/collections/terrain/quantized-mesh/" + template.replace("{z}", "0").replace(
        "{x}", "1").replace("{y}", "0")
    answer = client.get(path)
    assert answer.status_code == 200 and answer.headers["cache-control"] == IMMUTABLE
    assert client.get(path.split("?")[0]).headers["cache-control"] == REVALIDATED
    # 3D Tiles: CesiumJS appends asset.tilesetVersion as v= to what the tileset names.
    tileset = client.get("/collections/buildings/3dtiles/tileset.json")
    assert tileset.headers["cache-control"] == REVALIDATED  # the root is never kept
    version = tileset.json()["asset"]["tilesetVersion"]
    subtree = "/collections/buildings/3dtiles/subtrees/0/0/0.subtree"
    assert client.get(subtree, params={"v": version}).headers["cache-control"] == IMMUTABLE
    assert client.get(subtree, params={"v": "old"}).headers["cache-control"] == REVALIDATED

"""OGC API – Features: paging, filters (CQL2-text, bbox), sorting and bad input, over HTTP."""

from __future__ import annotations

import pandas as pd
import pytest
import shapely
from httpx import Client
from rasterio.io import MemoryFile
from sqlalchemy import Engine, text

GEOJSON = "application/geo+json"
# A box around the central urban area (Yuzhong, Jiangbei, Nan'an, Shapingba).
CENTRAL_WKT = "POLYGON((106.3 29.4, 106.8 29.4, 106.8 29.8, 106.3 29.8, 106.3 29.4))"


@pytest.fixture(scope="module")
def risk_points(engine: Engine) -> pd.DataFrame:
    frame = pd.read_sql(text("SELECT id, code, name, sector_code, category, level, grid_code, "
                             "plan_id, ST_AsText(geom) AS wkt FROM risk_points"), engine)
    frame["geometry"] = shapely.from_wkt(frame["wkt"])
    return frame


def page_through(client: Client, url: str) -> tuple[list, set[int]]:
    """Follow ``next`` links to the end; returns every feature id and numberMatched seen."""
    ids, matched = [], set()
    while url:
        response = client.get(url)
        assert response.status_code == 200, response.text
        body = response.json()
        ids += [feature["id"] for feature in body["features"]]
        matched.add(body["numberMatched"])
        assert body["numberReturned"] == len(body["features"])
        url = next((link["href"] for link in body["links"] if link["rel"] == "next"), None)
    return ids, matched


def matching_ids(client: Client, layer: str, **params) -> set:
    response = client.get(f"/collections/{layer}/items", params={"limit": 10000, **params})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["numberMatched"] == body["numberReturned"] == len(body["features"])
    return {feature["id"] for feature in body["features"]}


@pytest.mark.parametrize("layer, table, where", [
    ("risk_points", "risk_points", "TRUE"),
    ("grids", "admin_units", "level = 'grid'"),
    ("response_teams", "response_teams", "TRUE"),
])
def test_paging_returns_every_feature_exactly_once(client: Client, engine: Engine, layer: str,
                                                   table: str, where: str):
    key = "code" if table == "admin_units" else "id"
    with engine.connect() as conn:
        expected = set(conn.execute(text(f"SELECT {key} FROM {table} WHERE {where}")).scalars())
    ids, matched = page_through(client, f"/collections/{layer}/items?limit=347&properties=")
    assert len(ids) == len(set(ids))
    assert set(ids) == expected
    assert matched == {len(expected)}


def test_items_are_geojson_with_the_layer_fields(client: Client):
    response = client.get("/collections/risk_points/items", params={"limit": 3})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(GEOJSON)
    body = response.json()
    assert body["type"] == "FeatureCollection" and body["numberReturned"] == 3
    feature = body["features"][0]
    assert set(feature["properties"]) == {"id", "code", "name", "sector_code", "category",
                                          "level", "grid_code", "plan_id"}
    assert shapely.geometry.shape(feature["geometry"]).geom_type == "Point"
    rels = {link["rel"] for link in body["links"]}
    assert {"self", "next", "collection"} <= rels and "prev" not in rels


def test_prev_link_steps_back_one_page(client: Client):
    body = client.get("/collections/risk_points/items", params={"limit": 5, "offset": 12}).json()
    prev = next(link["href"] for link in body["links"] if link["rel"] == "prev")
    assert "offset=7" in prev and "limit=5" in prev


def test_properties_selects_a_subset(client: Client):
    body = client.get("/collections/districts/items",
                      params={"limit": 2, "properties": "name_en,population"}).json()
    assert all(set(f["properties"]) == {"name_en", "population"} for f in body["features"])
    assert all(len(f["id"]) == 6 for f in body["features"])


def test_sortby_orders_and_breaks_ties_by_id(client: Client, risk_points: pd.DataFrame):
    body = client.get("/collections/risk_points/items",
                      params={"limit": 10000, "sortby": "-level,+code", "properties": "level,code"}
                      ).json()
    got = [(f["properties"]["level"], f["properties"]["code"]) for f in body["features"]]
    expected = risk_points.sort_values(["level", "code"], ascending=[False, True])
    assert got == list(zip(expected["level"], expected["code"], strict=True))


def test_bbox_agrees_with_shapely(client: Client, risk_points: pd.DataFrame):
    box = (106.4, 29.45, 106.7, 29.7)
    inside = shapely.intersects(risk_points["geometry"], shapely.box(*box))
    assert 0 < inside.sum() < len(risk_points)
    got = matching_ids(client, "risk_points", bbox=",".join(map(str, box)))
    assert got == set(risk_points.loc[inside, "id"])


FILTERS = [
    ("level <= 2 AND sector_code = 'facility_operation'",
     lambda f: (f.level <= 2) & (f.sector_code == "facility_operation")),
    ("level IN (1, 3)", lambda f: f.level.isin([1, 3])),
    ("level NOT BETWEEN 2 AND 3", lambda f: ~f.level.between(2, 3)),
    ("name LIKE '%1号'", lambda f: f.name.str.endswith("1号")),
    ("plan_id IS NULL OR NOT (level > 1)", lambda f: f.plan_id.isna() | ~(f.level > 1)),
    ("(sector_code <> 'facility_operation' AND level = 4) OR code = 'RP00000014'",
     lambda f: ((f.sector_code != "facility_operation") & (f.level == 4))
     | (f.code == "RP00000014")),
    ("\"grid_code\" LIKE '500103%' AND plan_id IS NOT NULL",
     lambda f: f.grid_code.str.startswith("500103") & f.plan_id.notna()),
]


@pytest.mark.parametrize("cql, oracle", FILTERS, ids=[cql for cql, _ in FILTERS])
def test_cql2_filter_agrees_with_pandas(client: Client, risk_points: pd.DataFrame, cql, oracle):
    expected = set(risk_points.loc[oracle(risk_points), "id"])
    assert expected, "the filter should select something on the small sample"
    assert matching_ids(client, "risk_points", filter=cql, **{"filter-lang": "cql2-text"}) \
        == expected


def test_cql2_s_intersects_agrees_with_shapely(client: Client, risk_points: pd.DataFrame):
    polygon = shapely.from_wkt(CENTRAL_WKT)
    inside = shapely.intersects(risk_points["geometry"], polygon) & (risk_points["level"] < 4)
    assert inside.sum() > 0
    got = matching_ids(client, "risk_points",
                       filter=f"S_INTERSECTS(geometry, {CENTRAL_WKT}) AND level < 4")
    assert got == set(risk_points.loc[inside, "id"])


def test_filter_on_admin_layer_keeps_the_layer_filter(client: Client, engine: Engine):
    got = matching_ids(client, "streets", filter="parent_code = '500103'")
    with engine.connect() as conn:
        expected = set(conn.execute(text(
            "SELECT code FROM admin_units WHERE level = 'street' AND parent_code = '500103'"
        )).scalars())
    assert got == expected and expected


def test_one_feature_by_id(client: Client):
    first = client.get("/collections/risk_points/items", params={"limit": 1}).json()["features"][0]
    response = client.get(f"/collections/risk_points/items/{first['id']}")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(GEOJSON)
    assert response.json()["properties"] == first["properties"]
    grid = client.get(f"/collections/grids/items/{first['properties']['grid_code']}").json()
    assert grid["properties"]["kind"] == "grid"
    assert client.get("/collections/risk_points/items/99999999").status_code == 404
    assert client.get("/collections/risk_points/items/abc").status_code == 404
    # A district code is not a grid: the layer filter applies to single features too.
    assert client.get("/collections/grids/items/500103").status_code == 404


def test_queryables_describe_the_fields(client: Client):
    response = client.get("/collections/risk_points/queryables")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/schema+json")
    schema = response.json()
    assert schema["properties"]["level"]["type"] == "integer"
    assert schema["properties"]["name"]["type"] == "string"
    assert schema["properties"]["geometry"]["format"] == "geometry-point"
    assert schema["additionalProperties"] is False


def test_conformance_lists_features_and_cql2(client: Client):
    classes = set(client.get("/conformance").json()["conformsTo"])
    for name in ("ogcapi-features-1/1.0/conf/core", "ogcapi-features-1/1.0/conf/geojson",
                 "ogcapi-features-3/1.0/conf/filter", "ogcapi-features-3/1.0/conf/queryables",
                 "cql2/1.0/conf/cql2-text", "cql2/1.0/conf/basic-cql2",
                 "cql2/1.0/conf/basic-spatial-functions"):
        assert f"http://www.opengis.net/spec/{name}" in classes


@pytest.mark.parametrize("params, names", [
    ({"bbox": "106,29,107"}, "bbox"),
    ({"bbox": "106,31,107,29"}, "bbox"),
    ({"bbox": "a,b,c,d"}, "bbox"),
    ({"limit": 0}, "limit"),
    ({"limit": 10001}, "limit"),
    ({"offset": -1}, "offset"),
    ({"properties": "name,secret"}, "secret"),
    ({"sortby": "-nope"}, "nope"),
    ({"filter": "level = "}, "filter"),
    ({"filter": "level = 'high'"}, "level"),
    ({"filter": "password = 'x'"}, "password"),
    ({"filter": "level = 1; DROP TABLE risk_points"}, "filter"),
    ({"filter": "S_INTERSECTS(geometry, POLYGON((1 2, 3)))"}, "WKT"),
    ({"filter": "level = 1", "filter-lang": "cql2-json"}, "filter-lang"),
    ({"colour": "red"}, "colour"),
])
def test_bad_item_parameters_are_400_naming_the_parameter(client: Client, params, names):
    response = client.get("/collections/risk_points/items", params=params)
    assert response.status_code == 400, response.text
    assert names in response.json()["description"]


def test_raster_collection_has_no_items_and_says_where_its_tiles_are(client: Client):
    response = client.get("/collections/terrain/items")
    assert response.status_code == 404
    body = response.json()
    assert set(body) == {"code", "description"} and "raster collection" in body["description"]
    # The TileJSON the message names is there and leads to a tile that decodes as an image.
    tilejson_url = next(word for word in body["description"].split()
                        if word.endswith("raster-tilejson.json"))
    tilejson = client.get(tilejson_url)
    assert tilejson.status_code == 200
    # z8 tile over Chongqing's centre (106.5°E 29.5°N).
    tile = client.get(tilejson.json()["tiles"][0].format(z=8, x=203, y=106))
    assert tile.status_code == 200 and tile.headers["content-type"] == "image/png"
    with MemoryFile(tile.content) as memory, memory.open() as image:
        assert (image.width, image.height) == (256, 256)
    assert client.get("/collections/terrain/queryables").status_code == 404
    assert client.get("/collections/nope/items").status_code == 404


def test_raster_collections_are_described_as_no_feature_layers(client: Client):
    documents = {c["id"]: c for c in client.get("/collections").json()["collections"]}
    for layer_id in ("terrain", "terrain_central"):
        document = documents[layer_id]
        # GDAL's OAPIF driver skips 'Raster'/'Coverage' collections; clients find no items.
        assert document["itemType"] != "feature"
        assert document["layerDataType"] == "Coverage"
        rels = {link["rel"] for link in document["links"]}
        assert "items" not in rels
        tilejson = next(link["href"] for link in document["links"]
                        if link["href"].endswith("raster-tilejson.json"))
        assert client.get(tilejson).json()["tiles"]
    assert "layerDataType" not in documents["roads"]
    assert any(link["rel"] == "items" for link in documents["roads"]["links"])

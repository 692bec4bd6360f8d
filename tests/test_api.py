"""The first API: landing page, conformance, collections, content negotiation."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import shapely
from httpx import Client

from layers.builtin import BUILTIN_LAYERS
from layers.registry import sample_models


def test_landing_page_links_the_api_for_clients(client: Client):
    response = client.get("/", headers={"Accept": "application/json"})
    assert response.status_code == 200
    rels = {link["rel"]: link["href"] for link in response.json()["links"]}
    for rel in ("self", "service-desc", "conformance", "data"):
        assert rel in rels
    assert client.get(rels["data"]).status_code == 200
    assert client.get(rels["service-desc"]).json()["openapi"].startswith("3.")


def test_landing_page_gives_a_browser_the_web_page(client: Client):
    response = client.get("/", headers={"Accept": "text/html,application/xhtml+xml"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "<html" in response.text


def test_conformance_lists_the_core(client: Client):
    classes = client.get("/conformance").json()["conformsTo"]
    assert "http://www.opengis.net/spec/ogcapi-common-1/1.0/conf/core" in classes


def test_collections_list_every_layer_with_exact_counts(client: Client, sample_dir: Path):
    collections = {c["id"]: c for c in client.get("/collections").json()["collections"]}
    # Every built-in layer; anything else is an upload (other test modules leave some behind,
    # so the listing must not depend on which ran before).
    builtin = {layer.id for layer in BUILTIN_LAYERS} | {
        model["id"] for model in sample_models(sample_dir)}
    assert builtin <= set(collections)
    assert all(c["origin"] == "upload" for i, c in collections.items() if i not in builtin)
    admin = pd.read_csv(sample_dir / "admin_units.csv", dtype={"code": str})
    layer_of_level = {"district": "districts", "street": "streets",
                      "community": "communities", "grid": "grids"}
    expected = {layer_of_level[level]: n for level, n in admin["level"].value_counts().items()
                if level in layer_of_level}
    for table in ("risk_points", "response_teams", "supply_depots", "buildings", "sensors"):
        expected[table] = len(pd.read_csv(sample_dir / f"{table}.csv", usecols=["id"]))
    for layer_id, count in expected.items():
        assert collections[layer_id]["featureCount"] == count, layer_id
    assert collections["terrain"]["kind"] == "raster"
    assert collections["risk_points"]["origin"] == "builtin"
    assert collections["risk_points"]["geometryType"] == "Point"


def test_collection_bbox_covers_its_features(client: Client, sample_dir: Path):
    doc = client.get("/collections/risk_points").json()
    west, south, east, north = doc["extent"]["spatial"]["bbox"][0]
    points = shapely.from_wkb(pd.read_csv(sample_dir / "risk_points.csv")["geom"])
    xs, ys = shapely.get_x(points), shapely.get_y(points)
    # ST_Extent rounds outwards to float4: the bbox holds every point, within ~1e-5 degrees.
    assert west <= xs.min() < west + 1e-4 and east - 1e-4 < xs.max() <= east
    assert south <= ys.min() < south + 1e-4 and north - 1e-4 < ys.max() <= north
    assert 105 < west < east < 111 and 28 < south < north < 33


def test_unknown_collection_is_404_and_names_the_available_ones(client: Client):
    response = client.get("/collections/nope")
    assert response.status_code == 404
    assert "risk_points" in response.json()["description"]


def test_vector_collections_link_their_items_queryables_and_tiles(client: Client):
    doc = client.get("/collections/grids").json()
    links = {link["rel"]: link["href"] for link in doc["links"]}
    items = client.get(links["items"], params={"limit": 1})
    assert items.status_code == 200 and items.json()["type"] == "FeatureCollection"
    for rel in ("http://www.opengis.net/def/rel/ogc/1.0/queryables",
                "http://www.opengis.net/def/rel/ogc/1.0/tilesets-vector"):
        assert client.get(links[rel]).status_code == 200, rel

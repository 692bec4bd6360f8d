"""OGC API - Features as real GIS clients read it: GDAL's OAPIF driver (through pyogrio) and OWSLib.

The oracle is the database itself: what the clients decode must be the rows and coordinates
stored there, with every feature read exactly once through the clients' own paging.
"""

from __future__ import annotations

import pandas as pd
import pyogrio
import pytest
import shapely
from owslib.ogcapi.features import Features
from sqlalchemy import Engine, text

from tests.conftest import ServerProcess


def stored(engine: Engine, sql: str, **params) -> pd.DataFrame:
    with engine.connect() as conn:
        return pd.read_sql(text(sql), conn, params=params)


@pytest.fixture(scope="module")
def oapif(server_process: ServerProcess) -> str:
    return f"OAPIF:{server_process.url}"


def test_gdal_lists_every_vector_collection(oapif: str, engine: Engine):
    listed = {name for name, _ in pyogrio.list_layers(oapif)}
    vector = set(stored(engine, "SELECT id FROM layers WHERE kind = 'vector'")["id"])
    assert vector <= listed


def test_gdal_reads_a_whole_collection_through_its_paging(oapif: str, engine: Engine):
    frame = pyogrio.read_dataframe(oapif, layer="risk_points")
    expected = stored(engine, "SELECT id, level, sector_code, ST_X(geom) AS lon, "
                              "ST_Y(geom) AS lat FROM risk_points ORDER BY id")
    assert frame.crs.to_epsg() == 4326
    assert len(frame) == len(expected)
    merged = frame.merge(expected, on="id", suffixes=("", "_db"), validate="one_to_one")
    assert len(merged) == len(expected)
    assert (merged["level"] == merged["level_db"]).all()
    assert (merged["sector_code"] == merged["sector_code_db"]).all()
    assert (abs(merged.geometry.x - merged["lon"]) < 1e-7).all()
    assert (abs(merged.geometry.y - merged["lat"]) < 1e-7).all()


def test_gdal_spatial_and_attribute_filters_match_postgis(oapif: str, engine: Engine):
    teams = stored(engine, "SELECT ST_X(geom) AS lon, ST_Y(geom) AS lat FROM response_teams")
    west, south = teams["lon"].quantile(0.25), teams["lat"].quantile(0.25)
    east, north = teams["lon"].quantile(0.75), teams["lat"].quantile(0.75)
    frame = pyogrio.read_dataframe(oapif, layer="response_teams", bbox=(west, south, east, north),
                                   where="headcount >= 20")
    expected = stored(engine, """
        SELECT id FROM response_teams
         WHERE ST_Intersects(geom, ST_MakeEnvelope(:w, :s, :e, :n, 4326)) AND headcount >= 20
    """, w=west, s=south, e=east, n=north)
    assert sorted(frame["id"]) == sorted(expected["id"])
    assert len(frame) > 0


def test_gdal_reads_polygons_that_match_the_stored_ones(oapif: str, engine: Engine):
    frame = pyogrio.read_dataframe(oapif, layer="districts")
    expected = stored(engine, "SELECT code, ST_AsBinary(geom) AS wkb FROM admin_units "
                              "WHERE level = 'district'")
    by_code = dict(zip(expected["code"], shapely.from_wkb(expected["wkb"]), strict=True))
    assert set(frame["code"]) == set(by_code)
    for code, geometry in zip(frame["code"], frame.geometry, strict=True):
        stored_geometry = by_code[code]
        overlap = geometry.intersection(stored_geometry).area
        assert overlap / stored_geometry.area > 0.999999, code


def test_owslib_reads_conformance_collections_items_and_queryables(
        server_process: ServerProcess, engine: Engine):
    api = Features(server_process.url)
    conforms = api.conformance()["conformsTo"]
    assert "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/core" in conforms
    assert "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/geojson" in conforms
    collections = {c["id"] for c in api.collections()["collections"]}
    assert {"risk_points", "response_teams", "districts"} <= collections

    total = stored(engine, "SELECT count(*) AS n FROM response_teams")["n"][0]
    seen: list[int] = []
    for offset in range(0, int(total), 37):
        page = api.collection_items("response_teams", limit=37, offset=offset)
        assert page["numberMatched"] == total
        seen += [feature["id"] for feature in page["features"]]
    assert sorted(seen) == sorted(set(seen)) and len(seen) == total

    first = seen[0]
    item = api.collection_item("response_teams", str(first))
    expected = stored(engine, "SELECT code FROM response_teams WHERE id = :id", id=first)
    assert item["properties"]["code"] == expected["code"][0]

    queryables = api.collection_queryables("risk_points")["properties"]
    assert {"level", "sector_code", "grid_code"} <= set(queryables)

"""OGC API - Features as real GIS clients read it: GDAL's OAPIF driver (through pyogrio) and OWSLib.

The oracle is the database itself: what the clients decode must be the rows and coordinates
stored there, with every feature read exactly once through the clients' own paging; and GDAL
must open the whole service without an error (raster collections are no feature layers).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pyogrio
import pytest
import shapely
from owslib.ogcapi.features import Features
from pyproj import CRS
from sqlalchemy import Engine, text

from tests.servers import ServerProcess


def stored(engine: Engine, sql: str, **params) -> pd.DataFrame:
    with engine.connect() as conn:
        return pd.read_sql(text(sql), conn, params=params)


# GDAL reads this module's server through conftest.py's `oapif`, with a patient timeout.
pytestmark = pytest.mark.usefixtures("gdal_waits_for_the_server")


def test_gdal_lists_every_vector_collection_and_no_raster(oapif: str, engine: Engine):
    listed = {name for name, _ in pyogrio.list_layers(oapif)}
    kinds = stored(engine, "SELECT id, kind FROM layers")
    assert {"terrain", "terrain_central"} <= set(kinds.loc[kinds["kind"] == "raster", "id"])
    # GDAL's OAPIF driver skips only collections whose layerDataType is Raster or Coverage;
    # 3D model collections (glTF, no items) are listed too (a known limit, README).
    assert listed == set(kinds.loc[kinds["kind"].isin(["vector", "3d"]), "id"])


def test_gdal_reads_a_whole_collection_through_its_paging(oapif: str, engine: Engine):
    frame = pyogrio.read_dataframe(oapif, layer="risk_points")
    expected = stored(engine, "SELECT id, level, sector_code, ST_X(geom) AS lon, "
                              "ST_Y(geom) AS lat FROM risk_points ORDER BY id")
    # Stored and served in CRS84 (lon/lat), which the collections name as their storageCrs.
    assert frame.crs == CRS.from_user_input("OGC:CRS84")
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


# --- GDAL's error output, as ogrinfo would print it -----------------------------------------
# pyogrio hides GDAL's non-fatal errors (CE_Failure) unless a call fails, and there is no
# ogrinfo binary in the environment: so the test drives pyogrio's own libgdal through its C API,
# as `ogrinfo -ro -al -so` does, with an error handler of its own on top of pyogrio's.
CE_FAILURE = 3
_ERROR_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_int, ctypes.c_char_p)


def libgdal() -> ctypes.CDLL:
    """The GDAL library pyogrio runs on (its wheel's copy, else the system's)."""
    bundled = sorted((Path(pyogrio.__file__).parent.parent / "pyogrio.libs").glob("libgdal*.so*"))
    path = str(bundled[0]) if bundled else ctypes.util.find_library("gdal")
    assert path, "no libgdal found"
    lib = ctypes.CDLL(path)
    lib.GDALOpenEx.restype = ctypes.c_void_p
    lib.GDALOpenEx.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_void_p]
    lib.GDALDatasetGetLayerCount.argtypes = [ctypes.c_void_p]
    lib.GDALDatasetGetLayer.restype = ctypes.c_void_p
    lib.GDALDatasetGetLayer.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.OGR_L_GetName.restype = ctypes.c_char_p
    lib.OGR_L_GetName.argtypes = [ctypes.c_void_p]
    lib.OGR_L_GetGeomType.argtypes = [ctypes.c_void_p]
    lib.OGR_L_GetFeatureCount.restype = ctypes.c_int64
    lib.OGR_L_GetFeatureCount.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.OGR_L_GetNextFeature.restype = ctypes.c_void_p
    lib.OGR_L_GetNextFeature.argtypes = [ctypes.c_void_p]
    lib.OGR_F_Destroy.argtypes = [ctypes.c_void_p]
    lib.GDALClose.argtypes = [ctypes.c_void_p]
    lib.CPLPushErrorHandler.argtypes = [_ERROR_HANDLER]
    return lib


@contextmanager
def gdal_messages(lib: ctypes.CDLL) -> Iterator[list[tuple[int, str]]]:
    """Every message GDAL emits in the block, as (error class, text)."""
    messages: list[tuple[int, str]] = []
    handler = _ERROR_HANDLER(lambda klass, _no, msg: messages.append((klass, msg.decode())))
    lib.CPLPushErrorHandler(handler)
    try:
        yield messages
    finally:
        lib.CPLPopErrorHandler()


def ogrinfo_summary(lib: ctypes.CDLL, url: str) -> dict[str, int]:
    """What `ogrinfo -ro -al -so` does: open, then each layer's schema, feature count and
    first feature. Returns the feature count of each layer by name."""
    dataset = lib.GDALOpenEx(url.encode(), 0x04, None, None, None)  # GDAL_OF_VECTOR
    assert dataset, "GDAL could not open the service"
    counts = {}
    try:
        for index in range(lib.GDALDatasetGetLayerCount(dataset)):
            layer = lib.GDALDatasetGetLayer(dataset, index)
            name = lib.OGR_L_GetName(layer).decode()
            lib.OGR_L_GetGeomType(layer)
            counts[name] = lib.OGR_L_GetFeatureCount(layer, 1)
            feature = lib.OGR_L_GetNextFeature(layer)
            if feature:
                lib.OGR_F_Destroy(feature)
    finally:
        lib.GDALClose(dataset)
    return counts


def test_gdal_opens_and_reads_every_feature_layer_without_an_error(oapif: str, engine: Engine):
    lib = libgdal()
    with gdal_messages(lib) as messages:
        counts = ogrinfo_summary(lib, oapif)
    errors = [text for klass, text in messages if klass >= CE_FAILURE]
    models = set(stored(engine, "SELECT id FROM layers WHERE kind = '3d'")["id"])
    # The only errors: GDAL asking a 3D model collection for items, answered by a 404 that
    # names the model (GDAL lists them, see above); every feature collection reads cleanly.
    for message in errors:
        assert models and message.startswith("HTTP error code : 404"), message
        assert "has no items" not in message or any(f"'{m}'" in message for m in models)
    vector = stored(engine, "SELECT id FROM layers WHERE kind = 'vector'")["id"]
    assert set(vector) <= set(counts)
    assert set(counts) - set(vector) <= models
    expected = stored(engine, "SELECT count(*) AS n FROM risk_points")["n"][0]
    assert counts["risk_points"] == expected


def test_the_error_capture_sees_an_error_gdal_reports(oapif: str):
    """The capture above is not blind: GDAL's ERROR for a URL that answers 404 reaches it."""
    lib = libgdal()
    with gdal_messages(lib) as messages:
        dataset = lib.GDALOpenEx(f"{oapif}/no-such-service".encode(), 0x04, None, None, None)
    assert not dataset
    assert any(klass >= CE_FAILURE and "404" in text for klass, text in messages), messages

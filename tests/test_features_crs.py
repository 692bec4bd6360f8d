"""OGC API – Features Part 2 (CRS by reference): features served (`crs`) and filtered
(`bbox-crs`) in CRS84, EPSG:4326, CGCS2000 (EPSG:4490), Web Mercator and the CGCS2000
Gauss-Krüger zones over Chongqing.

The oracle is PROJ through pyproj, not PostGIS: the stored coordinates transformed into each CRS,
in that CRS's authority axis order, must be the served ones; a bbox in a CRS must select the
features whose transformed geometry meets it (shapely). GDAL's OAPIF driver, asked for a CRS,
must read the coordinates pyproj computes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyogrio
import pytest
import shapely
from httpx import Client
from pyproj import CRS, Transformer
from sqlalchemy import Engine, text

CRS84 = "http://www.opengis.net/def/crs/OGC/1.3/CRS84"
EPSG = "http://www.opengis.net/def/crs/EPSG/0/"
PART2 = "http://www.opengis.net/spec/ogcapi-features-2/1.0/conf/crs"
REQUIRED = [CRS84] + [f"{EPSG}{code}" for code in
                      (4326, 4490, 3857, 4523, 4524, 4525, 4544, 4545, 4546)]
GK = [f"{EPSG}{code}" for code in (4523, 4524, 4525, 4544, 4545, 4546)]


def authority_order(uri: str) -> Transformer:
    """CRS84 (lon/lat) to ``uri`` in the CRS's own axis order, as Part 2 serves it."""
    return Transformer.from_crs(CRS.from_user_input("OGC:CRS84"), CRS.from_user_input(uri))


def tolerance(uri: str) -> float:
    """A millimetre, in the CRS's unit."""
    return 1e-8 if CRS.from_user_input(uri).is_geographic else 1e-3


@pytest.fixture(scope="module")
def risk_points(engine: Engine) -> pd.DataFrame:
    return pd.read_sql(text("SELECT id, ST_X(geom) AS lon, ST_Y(geom) AS lat FROM risk_points "
                            "ORDER BY id"), engine)


@pytest.fixture(scope="module")
def districts(engine: Engine) -> pd.DataFrame:
    frame = pd.read_sql(text("SELECT code, ST_AsBinary(geom) AS wkb FROM admin_units "
                             "WHERE level = 'district' ORDER BY code"), engine)
    frame["geometry"] = shapely.from_wkb(frame["wkb"])
    return frame


def in_crs(points: pd.DataFrame, uri: str) -> pd.DataFrame:
    """The points' coordinates in ``uri``, first and second axis in the CRS's order."""
    first, second = authority_order(uri).transform(points["lon"].to_numpy(),
                                                   points["lat"].to_numpy())
    return pd.DataFrame({"id": points["id"], "a1": first, "a2": second})


def transformed(geometry, transformer: Transformer):
    return shapely.transform(geometry, lambda xy: np.column_stack(
        transformer.transform(xy[:, 0], xy[:, 1])))


def served(client: Client, layer: str, **params) -> tuple[dict, str]:
    response = client.get(f"/collections/{layer}/items", params={"limit": 10000, **params})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["numberReturned"] == body["numberMatched"]
    return body, response.headers["content-crs"]


@pytest.mark.parametrize("uri", REQUIRED)
def test_points_are_served_as_pyproj_transforms_them(client: Client, risk_points, uri):
    body, content_crs = served(client, "risk_points", crs=uri, properties="")
    assert content_crs == f"<{uri}>"
    got = pd.DataFrame([(f["id"], *f["geometry"]["coordinates"]) for f in body["features"]],
                       columns=["id", "g1", "g2"])
    merged = got.merge(in_crs(risk_points, uri), on="id", validate="one_to_one")
    assert len(merged) == len(risk_points)
    assert np.abs(merged["g1"] - merged["a1"]).max() < tolerance(uri)
    assert np.abs(merged["g2"] - merged["a2"]).max() < tolerance(uri)


def test_axis_order_is_the_crs_own(client: Client, risk_points):
    """Chongqing lies near 29.5°N 106.5°E: lat first in EPSG:4326, lon first in CRS84, and the
    Gauss-Krüger zones give northing (~3.3e6 m) before the zone-prefixed easting (~3.6e7 m)."""
    def first_point(uri):
        response = client.get("/collections/risk_points/items",
                              params={"crs": uri, "limit": 1, "properties": ""})
        return response.json()["features"][0]["geometry"]["coordinates"]
    lon, lat = first_point(CRS84)
    assert first_point(f"{EPSG}4326") == pytest.approx([lat, lon], abs=1e-9)
    northing, easting = first_point(f"{EPSG}4524")
    assert 3.0e6 < northing < 3.7e6 and 36.2e6 < easting < 36.8e6
    northing, easting = first_point(f"{EPSG}4545")
    assert 3.0e6 < northing < 3.7e6 and 0.2e6 < easting < 0.8e6


@pytest.mark.parametrize("uri", [f"{EPSG}4545", f"{EPSG}4490", f"{EPSG}3857"])
def test_polygons_are_served_vertex_by_vertex_as_pyproj_transforms_them(
        client: Client, districts: pd.DataFrame, uri: str):
    body, _ = served(client, "districts", crs=uri, properties="")
    got = {f["id"]: shapely.geometry.shape(f["geometry"]) for f in body["features"]}
    assert set(got) == set(districts["code"])
    transformer = authority_order(uri)
    for code, geometry in zip(districts["code"], districts["geometry"], strict=True):
        expected = transformed(geometry, transformer)
        assert shapely.get_num_coordinates(got[code]) == shapely.get_num_coordinates(expected)
        assert shapely.equals_exact(got[code], expected, tolerance=tolerance(uri)), code


def test_one_feature_in_a_crs_named_by_its_short_form(client: Client, risk_points):
    point = risk_points.iloc[7]
    feature_id = int(point["id"])
    response = client.get(f"/collections/risk_points/items/{feature_id}",
                          params={"crs": "EPSG:4524"})
    assert response.status_code == 200, response.text
    assert response.headers["content-crs"] == f"<{EPSG}4524>"
    expected = authority_order(f"{EPSG}4524").transform(point["lon"], point["lat"])
    assert response.json()["geometry"]["coordinates"] == pytest.approx(expected, abs=1e-3)
    plain = client.get(f"/collections/risk_points/items/{feature_id}")
    assert plain.headers["content-crs"] == f"<{CRS84}>"


def bbox_around_the_middle(coordinates: pd.DataFrame) -> tuple[float, float, float, float]:
    """min a1, min a2, max a1, max a2 around the middle of the points, in their CRS's order."""
    return (coordinates["a1"].quantile(0.3), coordinates["a2"].quantile(0.3),
            coordinates["a1"].quantile(0.7), coordinates["a2"].quantile(0.7))


@pytest.mark.parametrize("bbox_crs, crs", [
    (f"{EPSG}4326", None),
    (f"{EPSG}4490", f"{EPSG}4490"),
    (f"{EPSG}3857", f"{EPSG}4523"),
    (f"{EPSG}4523", f"{EPSG}3857"),
    (f"{EPSG}4546", f"{EPSG}4546"),
])
def test_bbox_in_a_crs_selects_what_shapely_selects(client: Client, risk_points, bbox_crs, crs):
    coordinates = in_crs(risk_points, bbox_crs)
    box = bbox_around_the_middle(coordinates)
    inside = shapely.intersects(shapely.points(coordinates[["a1", "a2"]].to_numpy()),
                                shapely.box(*box))
    assert 0 < inside.sum() < len(risk_points)
    params = {"bbox": ",".join(repr(float(v)) for v in box), "bbox-crs": bbox_crs}
    body, content_crs = served(client, "risk_points", **params, **({"crs": crs} if crs else {}))
    assert {f["id"] for f in body["features"]} == set(coordinates.loc[inside, "id"])
    # The answer is in `crs`, whatever the bbox's CRS.
    assert content_crs == f"<{crs or CRS84}>"
    if crs:
        expected = in_crs(risk_points, crs).set_index("id")
        for feature in body["features"][:50]:
            row = expected.loc[feature["id"]]
            assert feature["geometry"]["coordinates"] == pytest.approx(
                [row["a1"], row["a2"]], abs=tolerance(crs))


def test_a_box_reaching_far_outside_its_zone_still_selects_exactly(client: Client, risk_points):
    """Half the box lies 20,000 km beyond the zone, where PROJ cannot go back to lon/lat:
    the selection is still what shapely makes of the transformed points."""
    uri = f"{EPSG}4523"
    coordinates = in_crs(risk_points, uri)
    box = (coordinates["a1"].median(), coordinates["a2"].median(),
           coordinates["a1"].max() + 2e7, coordinates["a2"].max() + 2e7)
    inside = shapely.intersects(shapely.points(coordinates[["a1", "a2"]].to_numpy()),
                                shapely.box(*box))
    assert 0 < inside.sum() < len(risk_points)
    body, _ = served(client, "risk_points", bbox=",".join(str(float(v)) for v in box),
                     **{"bbox-crs": uri}, properties="")
    assert {f["id"] for f in body["features"]} == set(coordinates.loc[inside, "id"])


def test_gauss_kruger_bbox_selects_the_polygons_it_meets(client: Client, districts):
    """A projected bbox is a rectangle in its CRS: districts meet it when their transformed
    outline does (shapely on pyproj's transform), not when their lon/lat box does."""
    uri = f"{EPSG}4545"
    transformer = authority_order(uri)
    outlines = [transformed(geometry, transformer) for geometry in districts["geometry"]]
    bounds = shapely.total_bounds(outlines)  # northing/easting order, as served
    middle = ((bounds[0] + bounds[2]) / 2, (bounds[1] + bounds[3]) / 2)
    box = (middle[0] - 30_000, middle[1] - 40_000, middle[0] + 30_000, middle[1] + 40_000)
    meets = shapely.intersects(outlines, shapely.box(*box))
    assert 0 < meets.sum() < len(districts)
    body, _ = served(client, "districts", bbox=",".join(map(str, box)), **{"bbox-crs": uri},
                     properties="")
    assert {f["id"] for f in body["features"]} == set(districts.loc[meets, "code"])


def test_paging_in_a_crs_keeps_the_crs(client: Client, risk_points):
    url, ids = "/collections/risk_points/items?limit=700&properties=&crs=EPSG:4523", []
    while url:
        response = client.get(url)
        assert response.status_code == 200
        assert response.headers["content-crs"] == f"<{EPSG}4523>"
        body = response.json()
        ids += [f["id"] for f in body["features"]]
        url = next((link["href"] for link in body["links"] if link["rel"] == "next"), None)
    assert sorted(ids) == sorted(risk_points["id"])


@pytest.mark.parametrize("path, params, names", [
    ("items", {"crs": "EPSG:32648"}, "crs"),
    ("items", {"crs": "http://www.opengis.net/def/crs/EPSG/0/999999"}, "crs"),
    ("items", {"crs": "wgs84"}, "crs"),
    ("items/1", {"crs": "EPSG:2000"}, "crs"),
    ("items", {"bbox": "1,2,3,4", "bbox-crs": "EPSG:32648"}, "bbox-crs"),
    # EPSG:4326 is lat/lon: 106 is no latitude.
    ("items", {"bbox": "106,29,107,30", "bbox-crs": f"{EPSG}4326"}, "lat,lon"),
    ("items", {"bbox": "3300000,500000,3200000,600000", "bbox-crs": f"{EPSG}4545"},
     "northing,easting"),
    ("items", {"bbox": "3200000,500000", "bbox-crs": f"{EPSG}4545"}, "northing"),
])
def test_unknown_crs_and_bad_bbox_are_400(client: Client, path, params, names):
    response = client.get(f"/collections/risk_points/{path}", params=params)
    assert response.status_code == 400, response.text
    body = response.json()
    assert set(body) == {"code", "description"}
    assert names in body["description"]
    if params.get("crs") or "EPSG:32648" in params.values():
        # The answer lists what would work.
        assert all(uri in body["description"] for uri in REQUIRED)


def test_collections_declare_storage_crs_and_crs_list(client: Client):
    listing = client.get("/collections").json()
    assert listing["crs"][0] == CRS84 and set(REQUIRED) <= set(listing["crs"])
    for uri in listing["crs"]:
        CRS.from_user_input(uri)  # every listed URI is a CRS PROJ knows
    documents = {c["id"]: c for c in listing["collections"]}
    for document in documents.values():
        if document["kind"] == "vector":
            assert document["storageCrs"] == CRS84
            assert document["crs"] == listing["crs"]
        else:
            assert "storageCrs" not in document
    one = client.get("/collections/roads").json()
    assert one["storageCrs"] == CRS84 and set(REQUIRED) <= set(one["crs"])
    assert PART2 in client.get("/conformance").json()["conformsTo"]


def test_openapi_declares_crs_and_bbox_crs(client: Client):
    document = client.get("/api").json()
    for path, names in (("/collections/{collection_id}/items", {"crs", "bbox-crs"}),
                        ("/collections/{collection_id}/items/{feature_id}", {"crs"})):
        parameters = {p["name"]: p for p in document["paths"][path]["get"]["parameters"]}
        for name in names:
            assert parameters[name]["in"] == "query" and parameters[name]["description"]
            assert set(REQUIRED) <= set(parameters[name]["schema"]["enum"])


# --- GDAL as the client (a server process of its own: pyogrio holds the GIL) ----------------

# GDAL reads this module's server through conftest.py's `oapif`, with a patient timeout.
pytestmark = pytest.mark.usefixtures("gdal_waits_for_the_server")


@pytest.mark.parametrize("options", [
    {"CRS": "EPSG:4490"}, {"CRS": "EPSG:4326"}, {"CRS": "EPSG:4523"}, {"CRS": "EPSG:4545"},
    {"PREFERRED_CRS": "EPSG:3857"},
], ids=lambda options: "=".join(*options.items()))
def test_gdal_reads_features_in_the_crs_it_asks_for(oapif: str, risk_points, options):
    code = next(iter(options.values()))
    frame = pyogrio.read_dataframe(oapif, layer="risk_points", columns=["id"], **options)
    # GDAL takes the first listed CRS equal to the one asked for but for its axis order:
    # CRS84 for EPSG:4326, the very CRS for the others.
    assert frame.crs.equals(CRS.from_user_input(code), ignore_axis_order=True)
    # GDAL hands out x = east, y = north whatever the CRS's axis order.
    east, north = Transformer.from_crs("OGC:CRS84", code, always_xy=True).transform(
        risk_points["lon"].to_numpy(), risk_points["lat"].to_numpy())
    expected = pd.DataFrame({"id": risk_points["id"], "east": east, "north": north})
    merged = frame.merge(expected, on="id", validate="one_to_one")
    assert len(merged) == len(risk_points)
    assert np.abs(merged.geometry.x - merged["east"]).max() < tolerance(code)
    assert np.abs(merged.geometry.y - merged["north"]).max() < tolerance(code)


def test_gdal_bbox_in_a_gauss_kruger_zone_matches_pyproj(oapif: str, risk_points):
    """GDAL sends the spatial filter as bbox + bbox-crs in the zone's northing/easting order."""
    code = "EPSG:4524"
    east, north = Transformer.from_crs("OGC:CRS84", code, always_xy=True).transform(
        risk_points["lon"].to_numpy(), risk_points["lat"].to_numpy())
    box = (np.quantile(east, 0.2), np.quantile(north, 0.2),
           np.quantile(east, 0.6), np.quantile(north, 0.6))
    inside = (east >= box[0]) & (east <= box[2]) & (north >= box[1]) & (north <= box[3])
    assert 0 < inside.sum() < len(risk_points)
    frame = pyogrio.read_dataframe(oapif, layer="risk_points", columns=["id"], bbox=box,
                                   CRS=code)
    assert sorted(frame["id"]) == sorted(risk_points.loc[inside, "id"])

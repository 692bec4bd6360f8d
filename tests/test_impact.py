"""impact against geopandas/pyproj: points within a geodesic circle by pyproj Geod distances,
what lies in a polygon by shapely; every bad area is a 400 naming the problem.

Points within 1 cm of the circle (or 1e-6 degrees of a polygon's edge) may fall either way.
"""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
import shapely
from httpx import Client
from pyproj import Geod, Transformer
from sqlalchemy import Engine, text

from tests.oracles import assert_summary_matches_polygon

GEOD = Geod(ellps="WGS84")
CIRCLE_TOL_M = 0.01


@pytest.fixture(scope="module")
def contents(engine: Engine) -> dict[str, gpd.GeoDataFrame]:
    return {
        "risk_points": gpd.read_postgis(text("SELECT id, sector_code, level, geom "
                                             "FROM risk_points ORDER BY id"), engine,
                                        geom_col="geom"),
        "hazard_sources": gpd.read_postgis(text("SELECT id, kind, geom FROM hazard_sources "
                                                "ORDER BY id"), engine, geom_col="geom"),
        "buildings": gpd.read_postgis(text("SELECT id, use, floors, geom FROM buildings "
                                           "ORDER BY id"), engine, geom_col="geom"),
    }


@pytest.fixture(scope="module")
def circles(contents) -> list[tuple[float, float, float]]:
    """Centred on buildings and hazard sources (fixed seed), so circles hold something."""
    rng = np.random.default_rng(11)
    centres = [g.centroid for g in contents["buildings"].geometry.sample(4, random_state=3)]
    centres += list(contents["hazard_sources"].geometry.sample(2, random_state=5))
    return [(c.x, c.y, float(r)) for c, r in zip(centres, rng.uniform(300, 5000, len(centres)),
                                                 strict=True)]


def geodesic_m(lon: float, lat: float, points: gpd.GeoSeries) -> np.ndarray:
    _, _, metres = GEOD.inv(np.full(len(points), lon), np.full(len(points), lat),
                            points.x.to_numpy(), points.y.to_numpy())
    return metres


def building_distance_m(lon: float, lat: float, buildings: gpd.GeoSeries) -> np.ndarray:
    """Distance from the centre to each footprint in an azimuthal equidistant projection
    centred there (true geodesic distance from the centre, to well under a metre)."""
    to_m = Transformer.from_crs("EPSG:4326", f"+proj=aeqd +lat_0={lat} +lon_0={lon} "
                                "+datum=WGS84 +units=m", always_xy=True)
    projected = shapely.transform(buildings.to_numpy(), lambda xy: np.column_stack(
        to_m.transform(xy[:, 0], xy[:, 1])))
    return shapely.distance(projected, shapely.Point(0, 0))


def assert_between(got: int, sure: np.ndarray, near: np.ndarray, label) -> None:
    assert sure.sum() <= got <= sure.sum() + near.sum(), (label, got, sure.sum(), near.sum())


def test_circle_summary_and_features_agree_with_pyproj(client: Client, circles, contents):
    seen = 0
    for lon, lat, radius in circles:
        body = client.get("/query/impact", params={"lon": lon, "lat": lat,
                                                   "radius_m": radius, "limit": 10000}).json()
        summary = body["summary"]
        risk = contents["risk_points"]
        metres = geodesic_m(lon, lat, risk.geometry)
        sure, near = metres < radius - CIRCLE_TOL_M, abs(metres - radius) <= CIRCLE_TOL_M
        assert_between(summary["risk_points"]["total"], sure, near, "risk")
        for level, got in summary["risk_points"]["by_level"].items():
            mask = (risk["level"] == int(level)).to_numpy()
            assert_between(got, sure & mask, near & mask, level)
        for sector, got in summary["risk_points"]["by_sector"].items():
            mask = (risk["sector_code"] == sector).to_numpy()
            assert_between(got, sure & mask, near & mask, sector)
        returned = {f["id"] for f in body["features"] if f["properties"]["layer"] == "risk_points"}
        if not near.any():
            assert returned == set(risk["id"][sure])
        hazards = contents["hazard_sources"]
        metres = geodesic_m(lon, lat, hazards.geometry)
        sure_h, near_h = metres < radius - CIRCLE_TOL_M, abs(metres - radius) <= CIRCLE_TOL_M
        assert_between(summary["hazard_sources"]["total"], sure_h, near_h, "hazards")
        for kind, got in summary["hazard_sources"]["by_kind"].items():
            mask = (hazards["kind"] == kind).to_numpy()
            assert_between(got, sure_h & mask, near_h & mask, kind)
        buildings = contents["buildings"]
        metres = building_distance_m(lon, lat, buildings.geometry)
        sure_b, near_b = metres < radius - 0.5, abs(metres - radius) <= 0.5
        assert_between(summary["buildings"]["total"], sure_b, near_b, "buildings")
        if not near_b.any():
            floor_m2 = sum(abs(GEOD.geometry_area_perimeter(g)[0]) * floors for g, floors in
                           zip(buildings.geometry[sure_b], buildings["floors"][sure_b],
                               strict=True))
            assert summary["buildings"]["floor_area_m2"] == pytest.approx(floor_m2, rel=1e-4)
        area = body["features"][0]
        assert area["id"] == "area" and area["properties"]["radius_m"] == radius
        assert body["truncated"] == {"risk_points": 0, "hazard_sources": 0, "buildings": 0}
        seen += summary["risk_points"]["total"] > 0 and summary["buildings"]["total"] > 0
    assert seen >= 3  # the circles hold something


def test_the_limit_truncates_features_not_the_summary(client: Client, circles):
    lon, lat, _ = circles[0]
    params = {"lon": lon, "lat": lat, "radius_m": 20_000}
    full = client.get("/query/impact", params=params | {"limit": 10000}).json()
    cut = client.get("/query/impact", params=params | {"limit": 2}).json()
    assert cut["summary"] == full["summary"]
    for kind in ("risk_points", "hazard_sources", "buildings"):
        total = full["summary"][kind]["total"]
        kept = [f for f in cut["features"] if f["properties"]["layer"] == kind]
        assert len(kept) == min(2, total)
        assert cut["truncated"][kind] == total - len(kept)
    assert cut["truncated"]["buildings"] > 0
    # Risk points come most severe first.
    risk = [f["properties"]["level"] for f in full["features"]
            if f["properties"]["layer"] == "risk_points"]
    assert risk == sorted(risk)


def test_post_circle_equals_get(client: Client, circles):
    lon, lat, radius = circles[1]
    got = client.get("/query/impact", params={"lon": lon, "lat": lat, "radius_m": radius})
    posted = client.post("/query/impact", json={"point": [lon, lat], "radius_m": radius})
    assert posted.status_code == 200, posted.text
    assert posted.json()["summary"] == got.json()["summary"]


def test_post_polygon_agrees_with_shapely(client: Client, circles, contents):
    for lon, lat, radius in circles[:4]:
        d = radius / 111_000
        # A concave (L-shaped) polygon, and the same as a MultiPolygon with a second part.
        polygon = shapely.Polygon([(lon - d, lat - d), (lon + d, lat - d), (lon + d, lat),
                                   (lon, lat), (lon, lat + d), (lon - d, lat + d)])
        for geometry in (polygon, shapely.MultiPolygon(
                [polygon, shapely.box(lon + 2 * d, lat + 2 * d, lon + 3 * d, lat + 3 * d)])):
            response = client.post("/query/impact",
                                   json=shapely.geometry.mapping(geometry))
            assert response.status_code == 200, response.text
            body = response.json()
            assert_summary_matches_polygon(body["summary"], geometry, contents)
            assert body["features"][0]["properties"]["area_km2"] == pytest.approx(
                abs(GEOD.geometry_area_perimeter(geometry)[0]) / 1e6, rel=1e-3)


def test_post_a_feature(client: Client):
    feature = {"type": "Feature", "properties": {},
               "geometry": shapely.geometry.mapping(shapely.box(106.5, 29.5, 106.6, 29.6))}
    response = client.post("/query/impact", json=feature)
    assert response.status_code == 200, response.text


BOWTIE = {"type": "Polygon", "coordinates": [[[106.5, 29.5], [106.6, 29.6], [106.6, 29.5],
                                              [106.5, 29.6], [106.5, 29.5]]]}


@pytest.mark.parametrize("body, name, words", [
    (BOWTIE, "geometry", "Self-intersection"),
    ({"type": "Polygon", "coordinates": []}, "geometry", "empty"),
    ({"type": "MultiPolygon", "coordinates": []}, "geometry", "empty"),
    ({"type": "LineString", "coordinates": [[106.5, 29.5], [106.6, 29.6]]}, "geometry",
     "Polygon or MultiPolygon"),
    ({"type": "Point", "coordinates": [106.5, 29.5]}, "geometry", "Polygon or MultiPolygon"),
    ({"coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]}, "geometry", "Polygon or MultiPolygon"),
    ({"type": "Polygon", "coordinates": [[[106.5, 29.5], [106.6, 29.6]]]}, "geometry",
     "malformed"),
    ({"type": "Polygon", "coordinates": "nope"}, "geometry", "malformed"),
    ({"type": "Polygon", "coordinates": [[[200, 29.5], [201, 29.5], [201, 30], [200, 29.5]]]},
     "geometry", "EPSG:4326"),
    (shapely.geometry.mapping(shapely.box(100, 25, 115, 35)), "geometry", "municipality"),
    ([1, 2, 3], "geometry", "JSON object"),
    ({"point": [106.5, 29.5]}, "radius_m", "required"),
    ({"point": [106.5], "radius_m": 100}, "point", "[lon, lat]"),
    ({"point": ["a", 29.5], "radius_m": 100}, "point", "number"),
    ({"point": [106.5, 29.5], "radius_m": 0}, "radius_m", "(0, 100000]"),
    ({"point": [106.5, 29.5], "radius_m": "far"}, "radius_m", "number"),
    ({"point": [190, 29.5], "radius_m": 100}, "lon", "[-180, 180]"),
])
def test_bad_areas_are_400_naming_the_problem(client: Client, body, name, words):
    response = client.post("/query/impact", json=body)
    assert response.status_code == 400, response.text
    description = response.json()["description"]
    assert description.startswith(name) and words in description, description


@pytest.mark.parametrize("params, name", [
    ({"radius_m": 0}, "radius_m"),
    ({"radius_m": -10}, "radius_m"),
    ({"radius_m": 1e9}, "radius_m"),
    ({"radius_m": "inf"}, "radius_m"),
    ({"radius_m": 100, "lon": -181}, "lon"),
    ({"radius_m": 100, "lat": 95}, "lat"),
    ({"radius_m": 100, "limit": -1}, "limit"),
    ({"radius_m": 100, "limit": 10001}, "limit"),
])
def test_bad_circle_parameters_are_400_naming_the_parameter(client: Client, params, name):
    response = client.get("/query/impact", params={"lon": 106.55, "lat": 29.56} | params)
    assert response.status_code == 400, response.text
    assert response.json()["description"].startswith(name)


def test_missing_radius_is_4xx(client: Client):
    response = client.get("/query/impact", params={"lon": 106.55, "lat": 29.56})
    assert response.status_code == 400 and "radius_m" in response.text

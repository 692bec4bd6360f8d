"""locate and nearest-teams against independent oracles (geopandas sjoin, pyproj.Geod)."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
from httpx import Client
from pyproj import Geod
from sqlalchemy import Engine, text

N_POINTS = 1000
GEOD = Geod(ellps="WGS84")


@pytest.fixture(scope="module")
def admin(engine: Engine) -> gpd.GeoDataFrame:
    return gpd.read_postgis(text("SELECT code, level, parent_code, geom FROM admin_units"),
                            engine, geom_col="geom")


@pytest.fixture(scope="module")
def teams(engine: Engine) -> pd.DataFrame:
    return pd.read_sql(text("SELECT id, team_type, ST_X(geom) AS lon, ST_Y(geom) AS lat "
                            "FROM response_teams"), engine)


@pytest.fixture(scope="module")
def random_points(admin: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """1,000 points (fixed seed) drawn uniformly inside the municipality."""
    city = admin.loc[admin["level"] == "city", "geom"].iloc[0]
    rng = np.random.default_rng(20240604)
    west, south, east, north = city.bounds
    kept = []
    while len(kept) < N_POINTS:
        candidates = shapely.points(rng.uniform(west, east, 4000), rng.uniform(south, north, 4000))
        kept += list(candidates[shapely.contains(city, candidates)])
    return gpd.GeoDataFrame(geometry=kept[:N_POINTS], crs=4326)


def oracle_units(points: gpd.GeoDataFrame, admin: gpd.GeoDataFrame) -> pd.DataFrame:
    grids = admin.loc[admin["level"] == "grid", ["code", "geom"]].set_geometry("geom")
    joined = gpd.sjoin(points, grids, predicate="within", how="left")
    # Random points never land on a shared edge, so each has exactly one grid.
    assert joined.index.is_unique and joined["code"].notna().all()
    parent = admin.set_index("code")["parent_code"]
    units = pd.DataFrame({"grid": joined["code"]})
    for child, level in (("grid", "community"), ("community", "street"), ("street", "district")):
        units[level] = units[child].map(parent)
    return units


def oracle_nearest(lon: float, lat: float, teams: pd.DataFrame, k: int) -> pd.DataFrame:
    _, _, metres = GEOD.inv(np.full(len(teams), lon), np.full(len(teams), lat),
                            teams["lon"].to_numpy(), teams["lat"].to_numpy())
    return teams.assign(distance_m=metres).sort_values(["distance_m", "id"]).head(k)


def test_locate_agrees_with_a_geopandas_sjoin(client: Client, random_points, admin):
    expected = oracle_units(random_points, admin)
    for i, point in enumerate(random_points.geometry):
        response = client.get("/query/locate", params={"lon": point.x, "lat": point.y, "k": 1})
        assert response.status_code == 200, response.text
        body = response.json()
        got = {level: body[level]["code"] for level in expected.columns}
        assert got == expected.iloc[i].to_dict(), (point.x, point.y)


def test_nearest_teams_agree_with_geodesic_distances_to_every_team(client: Client,
                                                                   random_points, teams):
    for point in random_points.geometry:
        response = client.get("/query/nearest-teams", params={"lon": point.x, "lat": point.y})
        assert response.status_code == 200, response.text
        features = response.json()["features"]
        expected = oracle_nearest(point.x, point.y, teams, 5)
        assert [f["id"] for f in features] == list(expected["id"])
        assert [f["properties"]["rank"] for f in features] == [1, 2, 3, 4, 5]
        got_m = np.array([f["properties"]["distance_m"] for f in features])
        assert np.abs(got_m - expected["distance_m"].to_numpy()).max() < 0.5


@pytest.mark.parametrize("team_type", ["fire", "medical", "police"])
def test_nearest_teams_of_one_type(client: Client, random_points, teams, team_type: str):
    of_type = teams[teams["team_type"] == team_type]
    for point in random_points.geometry[:100]:
        body = client.get("/query/nearest-teams", params={
            "lon": point.x, "lat": point.y, "type": team_type, "k": 3}).json()
        expected = oracle_nearest(point.x, point.y, of_type, 3)
        assert [f["id"] for f in body["features"]] == list(expected["id"])
        assert {f["properties"]["team_type"] for f in body["features"]} == {team_type}


def test_locate_names_the_responsible_and_nearest_teams(client: Client, engine: Engine):
    body = client.get("/query/locate", params={"lon": 106.55, "lat": 29.56}).json()
    assert body["district"]["name_en"] and body["street"]["name_zh"]
    with engine.connect() as conn:
        expected = set(conn.execute(text(
            "SELECT team_id FROM team_jurisdictions WHERE admin_code = :street"
        ), {"street": body["street"]["code"]}).scalars())
    assert {team["id"] for team in body["responsible_teams"]} == expected
    assert len(body["nearest_teams"]) == 5
    distances = [team["distance_m"] for team in body["nearest_teams"]]
    assert distances == sorted(distances)


def test_locate_outside_the_municipality_is_404_with_the_reason(client: Client):
    response = client.get("/query/locate", params={"lon": 116.39, "lat": 39.9})  # Beijing
    assert response.status_code == 404
    assert "outside the municipality" in response.json()["description"]


def test_nearest_teams_when_k_exceeds_the_teams_of_a_type(client: Client, teams):
    n = int((teams["team_type"] == "utility_repair").sum())
    body = client.get("/query/nearest-teams", params={
        "lon": 106.55, "lat": 29.56, "type": "utility_repair", "k": 100}).json()
    assert body["numberReturned"] == n


@pytest.mark.parametrize("path, params, names", [
    ("/query/locate", {"lon": 190, "lat": 29.5}, "lon"),
    ("/query/locate", {"lon": 106.5, "lat": -91}, "lat"),
    ("/query/locate", {"lon": "nan", "lat": 29.5}, "lon"),
    ("/query/nearest-teams", {"lon": 106.5, "lat": 29.5, "k": 0}, "k"),
    ("/query/nearest-teams", {"lon": 106.5, "lat": 29.5, "k": 101}, "k"),
    ("/query/nearest-teams", {"lon": 106.5, "lat": 29.5, "type": "ninja"}, "type"),
    ("/query/nearest-teams", {"lon": 106.5, "lat": 29.5, "mode": "helicopter"}, "mode"),
])
def test_bad_query_parameters_are_400_naming_the_parameter(client: Client, path, params,
                                                           names):
    response = client.get(path, params=params)
    assert response.status_code == 400, response.text
    assert response.json()["description"].startswith(names)


@pytest.mark.parametrize("params", [{"lat": 29.5}, {"lon": 106.5}, {"lon": "east", "lat": 1}])
def test_missing_or_non_numeric_coordinates_are_400(client: Client, params):
    response = client.get("/query/nearest-teams", params=params)
    assert response.status_code == 400
    assert "lon" in response.text or "lat" in response.text

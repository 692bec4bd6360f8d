"""nearest-teams by road against a networkx Dijkstra over the same edges (an independent oracle).

The oracle snaps with pyproj geodesic distances to every road node and routes with networkx;
only the edge table and the documented snapping rule (straight line at 15 km/h) are shared.
"""

from __future__ import annotations

import networkx as nx
import numpy as np
import pandas as pd
import pytest
import shapely
from httpx import Client
from pyproj import Geod
from sqlalchemy import Engine, text

from tests import oracles
from tests.oracles import drive_graph
from twin.queries.routing import SNAP_SPEED_KMH

N_POINTS = 50
GEOD = Geod(ellps="WGS84")


@pytest.fixture(scope="module")
def road_graph(engine: Engine) -> nx.DiGraph:
    """Teams drive to the incident along the graph as driven."""
    return drive_graph(engine)


@pytest.fixture(scope="module")
def road_nodes(engine: Engine) -> pd.DataFrame:
    return oracles.road_nodes(engine)


@pytest.fixture(scope="module")
def teams(engine: Engine) -> pd.DataFrame:
    return pd.read_sql(text("SELECT id, team_type, ST_X(geom) AS lon, ST_Y(geom) AS lat "
                            "FROM response_teams ORDER BY id"), engine).set_index("id")


@pytest.fixture(scope="module")
def incidents(engine: Engine) -> list[shapely.Point]:
    city = shapely.from_wkb(bytes(pd.read_sql(text(
        "SELECT ST_AsBinary(geom) AS g FROM admin_units WHERE level = 'city'"), engine)["g"][0]))
    rng = np.random.default_rng(4)
    west, south, east, north = city.bounds
    kept: list[shapely.Point] = []
    while len(kept) < N_POINTS:
        points = shapely.points(rng.uniform(west, east, 500), rng.uniform(south, north, 500))
        kept += list(points[shapely.contains(city, points)])
    return kept[:N_POINTS]


def snap(lon: float, lat: float, nodes: pd.DataFrame) -> tuple[int, float]:
    _, _, metres = GEOD.inv(np.full(len(nodes), lon), np.full(len(nodes), lat),
                            nodes["lon"].to_numpy(), nodes["lat"].to_numpy())
    at = int(np.argmin(metres))
    return int(nodes["id"].iloc[at]), float(metres[at])


def oracle_times(lon, lat, team_ids, graph, nodes, teams) -> dict[int, float | None]:
    """Seconds from each team to (lon, lat): snap leg + Dijkstra + snap leg."""
    incident_node, incident_m = snap(lon, lat, nodes)
    to_incident = nx.single_source_dijkstra_path_length(graph.reverse(copy=False),
                                                        incident_node, weight="cost")
    speed = SNAP_SPEED_KMH / 3.6
    times = {}
    for team_id in team_ids:
        node, team_m = snap(teams.at[team_id, "lon"], teams.at[team_id, "lat"], nodes)
        times[team_id] = (None if node not in to_incident
                          else to_incident[node] + (team_m + incident_m) / speed)
    return times


def test_road_times_agree_with_a_networkx_dijkstra(client: Client, incidents, road_graph,
                                                   road_nodes, teams):
    for point in incidents:
        body = client.get("/query/nearest-teams", params={
            "lon": point.x, "lat": point.y, "mode": "road", "k": 5}).json()
        features = body["features"]
        assert len(features) == 5
        got = {f["id"]: f["properties"]["travel_time_s"] for f in features}
        # The ten teams nearest in a straight line are always among the routed candidates.
        _, _, metres = GEOD.inv(np.full(len(teams), point.x), np.full(len(teams), point.y),
                                teams["lon"].to_numpy(), teams["lat"].to_numpy())
        near = list(teams.index[np.argsort(metres)[:10]])
        expected = oracle_times(point.x, point.y, set(got) | set(near), road_graph,
                                road_nodes, teams)
        for team_id, seconds in got.items():
            assert seconds == pytest.approx(expected[team_id], abs=1.0), (point, team_id)
        times = [f["properties"]["travel_time_s"] for f in features]
        assert times == sorted(times)
        assert [f["properties"]["route_status"] for f in features] == ["ok"] * 5
        # No near team the answer left out is quicker than the slowest team it kept.
        left_out = [expected[t] for t in near if t not in got and expected[t] is not None]
        assert all(t >= times[-1] - 1.0 for t in left_out), point


def test_route_geometry_runs_from_the_team_to_the_incident(client: Client):
    lon, lat = 106.55, 29.56
    body = client.get("/query/nearest-teams", params={
        "lon": lon, "lat": lat, "mode": "road", "k": 3, "route": "true"}).json()
    for feature in body["features"]:
        props = feature["properties"]
        line = shapely.geometry.shape(props["route"])
        assert line.geom_type == "LineString"
        assert list(line.coords[0]) == pytest.approx(feature["geometry"]["coordinates"])
        assert list(line.coords[-1]) == pytest.approx([lon, lat])
        geodesic_m = GEOD.geometry_length(line)
        assert geodesic_m == pytest.approx(props["network_distance_m"], rel=0.02)
        assert props["network_distance_m"] >= props["distance_m"] - 1.0


def test_teams_slower_than_max_minutes_are_beyond_the_cutoff(client: Client):
    params = {"lon": 106.55, "lat": 29.56, "mode": "road", "k": 10}
    times = [f["properties"]["travel_time_s"]
             for f in client.get("/query/nearest-teams", params=params).json()["features"]]
    cutoff_min = float(np.median(times)) / 60
    features = client.get("/query/nearest-teams",
                          params=params | {"max_minutes": cutoff_min}).json()["features"]
    for feature in features:
        props = feature["properties"]
        expected = "ok" if props["travel_time_s"] <= cutoff_min * 60 else "beyond_cutoff"
        assert props["route_status"] == expected
    assert {"ok", "beyond_cutoff"} <= {f["properties"]["route_status"] for f in features}


def test_road_mode_of_one_type(client: Client, teams):
    body = client.get("/query/nearest-teams", params={
        "lon": 106.55, "lat": 29.56, "mode": "road", "type": "medical", "k": 3}).json()
    assert {teams.at[f["id"], "team_type"] for f in body["features"]} == {"medical"}


@pytest.mark.parametrize("params, name", [
    ({"mode": "road", "max_minutes": -1}, "max_minutes"),
    ({"mode": "road", "max_minutes": 0}, "max_minutes"),
    ({"mode": "distance", "max_minutes": 5}, "max_minutes"),
    ({"mode": "distance", "route": "true"}, "route"),
    ({"mode": "road", "k": 0}, "k"),
])
def test_bad_road_parameters_are_400_naming_the_parameter(client: Client, params, name):
    response = client.get("/query/nearest-teams", params={"lon": 106.55, "lat": 29.56} | params)
    assert response.status_code == 400, response.text
    assert response.json()["description"].startswith(name)

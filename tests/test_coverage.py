"""coverage against a brute-force networkx computation on the small sample.

The oracle snaps every risk point and team to its nearest road node by pyproj geodesic
distance to *every* node, then, for every road node that holds a risk point, runs networkx's
Dijkstra over the reversed graph (teams drive to the point) and takes the quickest team. The
uncovered points must be exactly the same set, except points whose time lies within
``EPSILON_S`` of the cutoff (float sums in another order may put them either side).
"""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pandas as pd
import pytest
from httpx import Client
from pyproj import Geod
from sqlalchemy import Engine, text

from tests import oracles
from tests.oracles import drive_graph
from twin.core.models import TEAM_TYPES
from twin.queries.routing import MAX_MINUTES, SNAP_SPEED_KMH

GEOD = Geod(ellps="WGS84")
SPEED = SNAP_SPEED_KMH / 3.6
EPSILON_S = 1e-3


@pytest.fixture(scope="module")
def to_point_graph(engine: Engine) -> nx.DiGraph:
    """Reversed road graph: an arc v->u here is the drive u->v (cost_s, or reverse_cost_s)."""
    return drive_graph(engine).reverse(copy=True)


def nearest_nodes(lon: np.ndarray, lat: np.ndarray, nodes: pd.DataFrame):
    """Brute force: geodesic metres to every road node, nearest first, ties to the lower id."""
    ids, metres = [], []
    for x, y in zip(lon, lat, strict=True):
        _, _, m = GEOD.inv(np.full(len(nodes), x), np.full(len(nodes), y),
                           nodes["lon"].to_numpy(), nodes["lat"].to_numpy())
        at = int(np.argmin(m))  # nodes are sorted by id: argmin keeps the lower id on a tie
        ids.append(int(nodes["id"].iloc[at]))
        metres.append(float(m[at]))
    return np.array(ids), np.array(metres)


@pytest.fixture(scope="module")
def sample(engine: Engine) -> dict:
    nodes = oracles.road_nodes(engine)
    points = pd.read_sql(text("SELECT id, level, left(grid_code, 6) AS district, "
                              "ST_X(geom) AS lon, ST_Y(geom) AS lat FROM risk_points "
                              "ORDER BY id"), engine)
    teams = pd.read_sql(text("SELECT id, team_type, ST_X(geom) AS lon, ST_Y(geom) AS lat "
                             "FROM response_teams ORDER BY id"), engine)
    points["node"], points["snap_m"] = nearest_nodes(points["lon"], points["lat"], nodes)
    teams["node"], teams["snap_m"] = nearest_nodes(teams["lon"], teams["lat"], nodes)
    return {"points": points, "teams": teams}


def oracle_times(team_type: str, sample: dict, graph: nx.DiGraph) -> pd.Series:
    """Seconds from the quickest team of the type to each risk point (inf: none reaches it)."""
    points = sample["points"]
    teams = sample["teams"][sample["teams"]["team_type"] == team_type]
    best = {}
    for node in points["node"].unique():
        from_teams = (nx.single_source_dijkstra_path_length(graph, node, weight="cost")
                      if node in graph else {node: 0.0})
        best[node] = min((team.snap_m / SPEED + from_teams[team.node]
                          for team in teams.itertuples() if team.node in from_teams),
                         default=math.inf)
    return points["node"].map(best) + points["snap_m"] / SPEED


@pytest.mark.parametrize("team_type, minutes", [("fire", 10), ("fire", 30), ("medical", 45),
                                                ("utility_repair", 90)])
def test_uncovered_points_agree_with_brute_force(client: Client, sample, to_point_graph,
                                                 team_type, minutes):
    body = client.get("/query/coverage", params={"team_type": team_type, "minutes": minutes,
                                                 "limit": 200_000}).json()
    points = sample["points"]
    times = oracle_times(team_type, sample, to_point_graph).to_numpy()
    budget = minutes * 60
    borderline = np.abs(times - budget) <= EPSILON_S
    expected = set(points["id"][(times > budget) & ~borderline])
    got = {f["id"] for f in body["features"]}
    assert got - set(points["id"][borderline]) == expected
    summary = body["summary"]
    assert summary["risk_points"] == len(points)
    assert summary["teams"] == int((sample["teams"]["team_type"] == team_type).sum())
    assert body["numberMatched"] == summary["uncovered"] == len(got)
    assert summary["covered"] + summary["uncovered"] == len(points)
    # Both covered and uncovered points exist, so the comparison means something.
    assert 0 < len(expected) < len(points) - borderline.sum()
    # Counts by level and by district are counts of the same set.
    uncovered = points[points["id"].isin(got)]
    assert summary["uncovered_by_level"] == {
        str(level): int((uncovered["level"] == level).sum()) for level in range(1, 5)}
    districts = {d["code"]: d for d in summary["by_district"]}
    assert set(districts) == set(points["district"])
    for code, group in points.groupby("district"):
        assert districts[code]["risk_points"] == len(group)
        mine = uncovered[uncovered["district"] == code]
        assert districts[code]["uncovered"] == len(mine)
        assert districts[code]["uncovered_by_level"] == {
            str(level): int((mine["level"] == level).sum()) for level in range(1, 5)}
    # Each feature's time is the oracle's (null: no team reaches its road node in time).
    by_id = dict(zip(points["id"], times, strict=True))
    for feature in body["features"]:
        seconds = feature["properties"]["travel_time_s"]
        if seconds is not None:
            assert seconds == pytest.approx(by_id[feature["id"]], abs=1e-3)
            assert seconds > budget - EPSILON_S


def test_limit_keeps_the_counts_and_returns_the_most_severe_first(client: Client):
    params = {"team_type": "fire", "minutes": 10}
    full = client.get("/query/coverage", params=params | {"limit": 200_000}).json()
    cut = client.get("/query/coverage", params=params | {"limit": 7}).json()
    assert cut["summary"] == full["summary"]
    assert cut["numberMatched"] == full["numberMatched"] > 7
    assert cut["numberReturned"] == len(cut["features"]) == 7
    ranked = sorted(full["features"], key=lambda f: (f["properties"]["level"], f["id"]))
    assert [f["id"] for f in cut["features"]] == [f["id"] for f in ranked[:7]]
    assert client.get("/query/coverage", params=params | {"limit": 0}).json()["features"] == []


def test_more_time_never_uncovers_a_point(client: Client):
    sets = [{f["id"] for f in client.get("/query/coverage", params={
        "team_type": "medical", "minutes": m, "limit": 200_000}).json()["features"]}
        for m in (5, 20, 60)]
    assert sets[0] >= sets[1] >= sets[2]


def test_unknown_team_type_lists_the_known_ones(client: Client):
    response = client.get("/query/coverage", params={"team_type": "ambulance", "minutes": 10})
    assert response.status_code == 400
    description = response.json()["description"]
    assert description.startswith("team_type")
    assert all(team_type in description for team_type in TEAM_TYPES)


@pytest.mark.parametrize("params, name", [
    ({"minutes": 0}, "minutes"),
    ({"minutes": -3}, "minutes"),
    ({"minutes": MAX_MINUTES + 1}, "minutes"),
    ({"minutes": "nan"}, "minutes"),
    ({"minutes": 10, "limit": -1}, "limit"),
    ({"minutes": 10, "limit": 10**7}, "limit"),
])
def test_bad_coverage_parameters_are_400_naming_the_parameter(client: Client, params, name):
    response = client.get("/query/coverage", params={"team_type": "fire"} | params)
    assert response.status_code == 400, response.text
    assert response.json()["description"].startswith(name)


@pytest.mark.parametrize("missing", ["team_type", "minutes"])
def test_missing_coverage_parameters_are_4xx(client: Client, missing):
    params = {"team_type": "fire", "minutes": 10}
    del params[missing]
    response = client.get("/query/coverage", params=params)
    assert response.status_code == 400 and missing in response.text

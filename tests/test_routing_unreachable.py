"""nearest-teams by road with a team that cannot reach the incident.

The fixture adds, as committed rows of its own (the live server reads through its own
connections, so a test transaction would be invisible to it), an isolated road: two new nodes
joined by one edge and no other, with a new medical team a few metres from one end, close to
the incident in a straight line. The rows are deleted afterwards (the writes bump the layers'
data versions, which is harmless), so the other tests see the sample as loaded.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest
from httpx import Client
from pyproj import Geod
from sqlalchemy import Engine, text

from tests import oracles

GEOD = Geod(ellps="WGS84")
TEAM_TYPE = "medical"
# Offsets (degrees) of the new team from the incident, tried in turn until one is clear of
# the sample's own teams (none of them may end up snapping to the isolated road).
OFFSETS = [(0.002, 0.0015), (-0.002, 0.0015), (0.002, -0.0015), (-0.002, -0.0015)]
ROAD_OFFSET = (0.00005, 0.00003)  # the isolated road's first node, ~6 m from the team


def metres(lon, lat, lons, lats) -> np.ndarray:
    lons, lats = np.atleast_1d(lons), np.atleast_1d(lats)
    return GEOD.inv(np.full(len(lons), lon), np.full(len(lons), lat), lons, lats)[2]


def _layout(engine: Engine) -> dict:
    nodes = oracles.road_nodes(engine)
    teams = pd.read_sql(text("SELECT ST_X(geom) AS lon, ST_Y(geom) AS lat FROM response_teams"),
                        engine)
    incident = nodes.iloc[int(np.argmin(metres(106.55, 29.56, nodes["lon"], nodes["lat"])))]
    own_snap = [metres(t.lon, t.lat, nodes["lon"], nodes["lat"]).min()
                for t in teams.itertuples()]
    for dx, dy in OFFSETS:
        team = (incident.lon + dx, incident.lat + dy)
        a = (team[0] + ROAD_OFFSET[0], team[1] + ROAD_OFFSET[1])
        b = (a[0] + 0.001, a[1])
        clear = all(metres(t.lon, t.lat, [a[0], b[0]], [a[1], b[1]]).min() > snap
                    for t, snap in zip(teams.itertuples(), own_snap, strict=True))
        nearest_to_team = metres(*team, nodes["lon"], nodes["lat"]).min()
        if clear and nearest_to_team > metres(*team, a[0], a[1])[0]:
            return {"incident": (float(incident.lon), float(incident.lat)), "team": team,
                    "a": a, "b": b, "node_id": int(nodes["id"].max()) + 1000}
    raise AssertionError("no clear spot for the isolated road")


@pytest.fixture(scope="module")
def isolated_team(engine: Engine) -> Iterator[dict]:
    layout = _layout(engine)
    with engine.begin() as conn:
        team_id = conn.execute(text("SELECT max(id) + 1000 FROM response_teams")).scalar()
        edge_id = conn.execute(text("SELECT max(id) + 1000 FROM road_edges")).scalar()
    a_id, b_id = layout["node_id"], layout["node_id"] + 1
    (ax, ay), (bx, by), (tx, ty) = layout["a"], layout["b"], layout["team"]
    try:
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO road_nodes (id, geom) VALUES "
                "(:a, ST_SetSRID(ST_MakePoint(:ax, :ay), 4326)), "
                "(:b, ST_SetSRID(ST_MakePoint(:bx, :by), 4326))"),
                {"a": a_id, "b": b_id, "ax": ax, "ay": ay, "bx": bx, "by": by})
            conn.execute(text(
                "INSERT INTO road_edges (id, source, target, road_class, name, speed_kmh, "
                "length_m, cost_s, reverse_cost_s, geom) VALUES (:id, :a, :b, 'local', "
                "'isolated test road', 30, :len, :len / (30 / 3.6), :len / (30 / 3.6), "
                "ST_SetSRID(ST_MakeLine(ST_MakePoint(:ax, :ay), ST_MakePoint(:bx, :by)), 4326))"),
                {"id": edge_id, "a": a_id, "b": b_id, "ax": ax, "ay": ay, "bx": bx, "by": by,
                 "len": float(metres(ax, ay, bx, by)[0])})
            conn.execute(text(
                "INSERT INTO response_teams (id, code, name_zh, name_en, team_type, headcount, "
                "status, phone, district_code, geom) VALUES (:id, 'TEST-ISOLATED', "
                "'孤立测试队', 'Isolated test team', :type, 5, 'standby', '000', "
                "(SELECT code FROM admin_units WHERE level = 'district' ORDER BY code LIMIT 1), "
                "ST_SetSRID(ST_MakePoint(:tx, :ty), 4326))"),
                {"id": team_id, "type": TEAM_TYPE, "tx": tx, "ty": ty})
        yield layout | {"team_id": team_id, "road_node": a_id}
    finally:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM response_teams WHERE id = :id"), {"id": team_id})
            conn.execute(text("DELETE FROM road_edges WHERE id = :id"), {"id": edge_id})
            conn.execute(text("DELETE FROM road_nodes WHERE id IN (:a, :b)"),
                         {"a": a_id, "b": b_id})


def _teams(client: Client, layout: dict, **params) -> list[dict]:
    lon, lat = layout["incident"]
    response = client.get("/query/nearest-teams", params={
        "lon": lon, "lat": lat, "mode": "road", "type": TEAM_TYPE} | params)
    assert response.status_code == 200, response.text
    return response.json()["features"]


STATUS_ORDER = {"ok": 0, "beyond_cutoff": 1, "unreachable": 2}


def test_the_isolated_team_is_nearest_in_a_straight_line(client: Client, isolated_team):
    lon, lat = isolated_team["incident"]
    nearest = client.get("/query/nearest-teams", params={
        "lon": lon, "lat": lat, "type": TEAM_TYPE, "k": 1}).json()["features"]
    assert nearest[0]["id"] == isolated_team["team_id"]


def test_an_unreachable_team_is_reported_and_ranked_last(client: Client, isolated_team):
    features = _teams(client, isolated_team, k=100)
    mine = [f for f in features if f["id"] == isolated_team["team_id"]]
    assert len(mine) == 1
    props = mine[0]["properties"]
    assert props["route_status"] == "unreachable"
    assert props["travel_time_s"] is None and props["network_distance_m"] is None
    assert props["road_node"] == isolated_team["road_node"]
    statuses = [f["properties"]["route_status"] for f in features]
    assert statuses == sorted(statuses, key=STATUS_ORDER.get)
    reachable = [s for s in statuses if s != "unreachable"]
    assert len(reachable) >= 2
    assert features.index(mine[0]) >= len(reachable)
    # Though nearest in a straight line, it never comes first when someone can get there.
    assert _teams(client, isolated_team, k=1)[0]["id"] != isolated_team["team_id"]


def test_max_minutes_marks_slow_teams_beyond_the_cutoff(client: Client, isolated_team):
    times = [f["properties"]["travel_time_s"] for f in _teams(client, isolated_team, k=100)
             if f["properties"]["route_status"] == "ok"]
    cutoff_min = float(np.median(times)) / 60
    features = _teams(client, isolated_team, k=100, max_minutes=cutoff_min)
    statuses = [f["properties"]["route_status"] for f in features]
    assert {"ok", "beyond_cutoff", "unreachable"} <= set(statuses)
    assert statuses == sorted(statuses, key=STATUS_ORDER.get)
    for feature in features:
        props = feature["properties"]
        if props["route_status"] == "ok":
            assert props["travel_time_s"] <= cutoff_min * 60
        elif props["route_status"] == "beyond_cutoff":
            assert props["travel_time_s"] > cutoff_min * 60
    assert features[-1]["properties"]["route_status"] == "unreachable"
    assert isolated_team["team_id"] in {f["id"] for f in features
                                        if f["properties"]["route_status"] == "unreachable"}

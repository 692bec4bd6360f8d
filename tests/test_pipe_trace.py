"""pipe-trace against a networkx breadth-first search over the same segment table.

The oracle shares only the tables: drainage is a DiGraph walked with (or against) the flow;
water and gas are a Graph walked from the start segment's ends, never expanding a valve.
"""

from __future__ import annotations

import networkx as nx
import numpy as np
import pandas as pd
import pytest
import shapely
from httpx import Client
from sqlalchemy import Engine, text


@pytest.fixture(scope="module")
def segments(engine: Engine) -> pd.DataFrame:
    return pd.read_sql(text("SELECT id, network, from_node, to_node, ST_AsText(geom) AS wkt "
                            "FROM pipe_segments ORDER BY id"), engine).set_index("id")


@pytest.fixture(scope="module")
def valves(engine: Engine) -> set[int]:
    return set(pd.read_sql(text("SELECT id FROM pipe_nodes WHERE kind = 'valve'"), engine)["id"])


def oracle(segments: pd.DataFrame, valves: set[int], start: int,
           direction: str) -> tuple[dict[int, int], set[int]]:
    """(segment id -> hop, node ids) reached from ``start``."""
    network = segments.at[start, "network"]
    own = segments[segments["network"] == network]
    if network == "drainage":
        graph = nx.DiGraph()
        for a, b in own[["from_node", "to_node"]].itertuples(index=False):
            graph.add_edge(*((a, b) if direction == "downstream" else (b, a)))
        entry = "from_node" if direction == "downstream" else "to_node"
        first = segments.at[start, "to_node" if direction == "downstream" else "from_node"]
        depth = nx.single_source_shortest_path_length(graph, first)
        hops = {seg: depth[node] + 1 for seg, node in own[entry].items() if node in depth}
    else:
        graph = nx.Graph()
        graph.add_nodes_from(set(own["from_node"]) | set(own["to_node"]))
        for a, b in own[["from_node", "to_node"]].itertuples(index=False):
            if a not in valves and b not in valves:
                graph.add_edge(a, b)
        ends = [n for n in (segments.at[start, "from_node"], segments.at[start, "to_node"])
                if n not in valves]
        depth = nx.multi_source_dijkstra_path_length(graph, ends) if ends else {}
        hops = {}
        for seg, a, b in own[["from_node", "to_node"]].itertuples():
            reached = [depth[n] for n in (a, b) if n in depth]
            if reached:
                hops[seg] = min(reached) + 1
    hops[start] = 0
    nodes = set(segments.loc[list(hops), "from_node"]) | set(segments.loc[list(hops), "to_node"])
    return hops, nodes


def starts(segments: pd.DataFrame, network: str, count: int) -> list[int]:
    ids = segments.index[segments["network"] == network].to_numpy()
    return [int(s) for s in np.random.default_rng(7).choice(ids, count, replace=False)]


@pytest.mark.parametrize("network", ["drainage", "water", "gas"])
@pytest.mark.parametrize("direction", ["downstream", "upstream"])
def test_trace_agrees_with_networkx(client: Client, segments, valves, network, direction):
    for start in starts(segments, network, 25):
        response = client.get("/query/pipe-trace", params={
            "segment_id": start, "network": network, "direction": direction})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/geo+json"
        features = response.json()["features"]
        got = {f["properties"]["id"]: f["properties"]["hop"] for f in features
               if f["properties"]["feature_type"] == "segment"}
        nodes = {f["properties"]["id"] for f in features
                 if f["properties"]["feature_type"] == "node"}
        expected_hops, expected_nodes = oracle(segments, valves, start, direction)
        assert got == expected_hops, (network, direction, start)
        assert nodes == expected_nodes
        assert {f["properties"]["network"] for f in features} == {network}


def test_features_carry_the_segment_geometry(client: Client, segments):
    start = starts(segments, "drainage", 1)[0]
    body = client.get("/query/pipe-trace", params={"segment_id": start, "network": "drainage",
                                                   "direction": "upstream"}).json()
    for feature in body["features"]:
        if feature["properties"]["feature_type"] == "segment":
            line = shapely.geometry.shape(feature["geometry"])
            expected = shapely.from_wkt(segments.at[feature["properties"]["id"], "wkt"])
            assert line.equals_exact(expected, 1e-6)
    assert body["numberSegments"] + body["numberNodes"] == len(body["features"])


def test_water_trace_stops_at_valves(client: Client, segments, valves):
    """Every valve in the answer ends the trace: only one of its pipes is in it."""
    stopped = 0
    for start in starts(segments, "water", 25):
        body = client.get("/query/pipe-trace", params={"segment_id": start,
                                                       "network": "water"}).json()
        traced = {f["properties"]["id"] for f in body["features"]
                  if f["properties"]["feature_type"] == "segment"}
        for f in body["features"]:
            props = f["properties"]
            if props["feature_type"] == "node" and props["kind"] == "valve":
                assert props["stops_trace"] is True
                touching = segments[(segments["from_node"] == props["id"])
                                    | (segments["to_node"] == props["id"])].index
                inside = traced.intersection(touching)
                assert len(inside) == 1 or inside == {start}, (start, props["id"])
                stopped += 1
    assert stopped > 0


def test_unknown_segment_is_404_naming_it(client: Client):
    response = client.get("/query/pipe-trace", params={"segment_id": 99_999_999,
                                                       "network": "drainage"})
    assert response.status_code == 404
    assert "segment_id" in response.json()["description"]
    assert "99999999" in response.json()["description"]


@pytest.mark.parametrize("params, name", [
    ({"network": "sewage"}, "network"),
    ({"direction": "sideways"}, "direction"),
    ({"segment_id": 0}, "segment_id"),
    ({"segment_id": 2**64}, "segment_id"),
])
def test_bad_trace_parameters_are_400_naming_them(client: Client, segments, params, name):
    start = starts(segments, "drainage", 1)[0]
    response = client.get("/query/pipe-trace",
                          params={"segment_id": start, "network": "drainage"} | params)
    assert response.status_code == 400, response.text
    assert response.json()["description"].startswith(name)


def test_segment_of_another_network_is_400(client: Client, segments):
    start = starts(segments, "gas", 1)[0]
    response = client.get("/query/pipe-trace", params={"segment_id": start,
                                                       "network": "water"})
    assert response.status_code == 400
    body = response.json()["description"]
    assert body.startswith("network") and "gas" in body


@pytest.mark.parametrize("params", [{"network": "water"}, {"segment_id": "x",
                                                           "network": "water"}])
def test_missing_or_non_integer_segment_is_400(client: Client, params):
    response = client.get("/query/pipe-trace", params=params)
    assert response.status_code == 400
    assert "segment_id" in response.text

"""reach against a networkx oracle: the same edge table and the documented model, nothing else.

The oracle snaps with pyproj geodesic distances to every road node, runs networkx's
single-source Dijkstra outward from the spot's node, rebuilds the documented area (discs at the
spot and at every reached node, the reached stretches of road as a roadside band) with shapely
in an azimuthal equidistant projection, and counts what lies in the returned polygon with
shapely. Points within 1e-6 degrees (~0.1 m) of the polygon's edge may fall either way (the
served polygon is rounded to 7 decimals) and are allowed on either side.
"""

from __future__ import annotations

import math

import geopandas as gpd
import networkx as nx
import numpy as np
import pandas as pd
import pytest
import shapely
from httpx import Client
from pyproj import Transformer
from shapely.ops import substring
from sqlalchemy import Engine, text

from tests import oracles
from tests.oracles import EDGE_TOL_DEG, GEOD, assert_summary_matches_polygon, drive_graph
from twin.queries.reach import MAX_REACH_MINUTES, ROADSIDE_M
from twin.queries.routing import SNAP_SPEED_KMH

SPEED = SNAP_SPEED_KMH / 3.6


@pytest.fixture(scope="module")
def edges(engine: Engine) -> gpd.GeoDataFrame:
    return gpd.read_postgis(text("SELECT id, source, target, cost_s, reverse_cost_s, geom "
                                 "FROM road_edges ORDER BY id"), engine, geom_col="geom")


@pytest.fixture(scope="module")
def outward_graph(engine: Engine) -> nx.DiGraph:
    """A crew leaves the spot along the graph as driven."""
    return drive_graph(engine)


@pytest.fixture(scope="module")
def nodes(engine: Engine) -> pd.DataFrame:
    return oracles.road_nodes(engine).set_index("id", drop=False)


@pytest.fixture(scope="module")
def contents(engine: Engine) -> dict[str, gpd.GeoDataFrame]:
    return {
        "risk_points": gpd.read_postgis(text("SELECT id, sector_code, level, geom "
                                             "FROM risk_points"), engine, geom_col="geom"),
        "hazard_sources": gpd.read_postgis(text("SELECT id, kind, geom FROM hazard_sources"),
                                           engine, geom_col="geom"),
        "buildings": gpd.read_postgis(text("SELECT id, use, floors, geom FROM buildings"),
                                      engine, geom_col="geom"),
    }


@pytest.fixture(scope="module")
def origins(contents, nodes) -> list[tuple[float, float]]:
    """Spots a few tens of metres off the road nodes nearest to random risk points (fixed
    seed), so that areas hold roads and risk points; and one spot far from any road."""
    points = contents["risk_points"].geometry
    picks = np.random.default_rng(7).choice(len(points), 8, replace=False)
    spots = []
    for i in picks:
        node, _ = snap(points.iloc[i].x, points.iloc[i].y, nodes)
        spots.append((float(nodes.at[node, "lon"]) + 0.0004, float(nodes.at[node, "lat"]) - 0.0003))
    return spots + [(106.55, 29.56)]


def snap(lon: float, lat: float, nodes: pd.DataFrame) -> tuple[int, float]:
    _, _, metres = GEOD.inv(np.full(len(nodes), lon), np.full(len(nodes), lat),
                            nodes["lon"].to_numpy(), nodes["lat"].to_numpy())
    at = int(np.argmin(metres))
    return int(nodes["id"].iloc[at]), float(metres[at])


def to_metres(geometry, to_m: Transformer):
    return shapely.transform(geometry, lambda xy: np.column_stack(
        to_m.transform(xy[:, 0], xy[:, 1])))


def oracle_area(lon, lat, minutes, graph, nodes, edges):
    """(reached node times, the model's area in aeqd metres, the lon/lat -> metres transform)."""
    budget = minutes * 60
    node0, snap_m = snap(lon, lat, nodes)
    snap_s = snap_m / SPEED
    reached = {}
    if snap_s <= budget:
        reached = {n: t + snap_s for n, t in nx.single_source_dijkstra_path_length(
            graph, node0, cutoff=budget - snap_s, weight="cost").items()}
    to_m = Transformer.from_crs(
        "EPSG:4326", f"+proj=aeqd +lat_0={lat!r} +lon_0={lon!r} +datum=WGS84 +units=m",
        always_xy=True)
    pieces = [shapely.Point(0, 0).buffer(budget * SPEED)]
    for node, t in reached.items():
        if t < budget:
            x, y = to_m.transform(nodes.at[node, "lon"], nodes.at[node, "lat"])
            pieces.append(shapely.Point(x, y).buffer((budget - t) * SPEED))
    stretches = []
    for row in edges.itertuples(index=False):
        ts, tt = reached.get(row.source), reached.get(row.target)
        f_s = (min(1.0, (budget - ts) / row.cost_s if row.cost_s > 0 else 1.0)
               if ts is not None and row.cost_s >= 0 else 0.0)
        f_t = (min(1.0, (budget - tt) / row.reverse_cost_s if row.reverse_cost_s > 0 else 1.0)
               if tt is not None and row.reverse_cost_s >= 0 else 0.0)
        if f_s + f_t >= 1:
            stretches.append(row.geom)
        else:
            if f_s > 0:
                stretches.append(substring(row.geom, 0, f_s, normalized=True))
            if f_t > 0:
                stretches.append(substring(row.geom, 1 - f_t, 1, normalized=True))
    if stretches:
        lines = to_metres(shapely.GeometryCollection(stretches), to_m)
        pieces.append(lines.buffer(ROADSIDE_M, quad_segs=2))
    return reached, shapely.union_all(pieces), to_m


@pytest.mark.parametrize("minutes", [5, 30])
def test_reach_agrees_with_a_networkx_oracle(client: Client, origins, outward_graph, nodes,
                                             edges, contents, minutes):
    seen = []
    for lon, lat in origins:
        body = client.get("/query/reach", params={"lon": lon, "lat": lat,
                                                  "minutes": minutes}).json()
        area = body["features"][0]
        props = area["properties"]
        polygon = shapely.geometry.shape(area["geometry"])
        assert polygon.geom_type in ("Polygon", "MultiPolygon") and polygon.is_valid
        node0, snap_m = snap(lon, lat, nodes)
        assert props["origin_road_node"] == node0
        assert props["snap_m"] == pytest.approx(snap_m, abs=0.01)
        reached, model, to_m = oracle_area(lon, lat, minutes, outward_graph, nodes, edges)
        # Every node networkx reaches in time is inside; the count agrees but for nodes
        # reached within a millisecond of the budget (float sums in another order).
        budget = minutes * 60
        borderline = sum(1 for t in reached.values() if abs(t - budget) < 1e-3)
        assert abs(props["reached_road_nodes"] - len(reached)) <= borderline
        for node in reached:
            point = shapely.Point(nodes.at[node, "lon"], nodes.at[node, "lat"])
            assert polygon.distance(point) < EDGE_TOL_DEG, (lon, lat, node)
        # The served polygon is the model's area (bar rounding and 32-gon chords).
        served = to_metres(polygon, to_m)
        assert served.symmetric_difference(model).area <= 0.005 * model.area, (lon, lat)
        assert props["area_km2"] == pytest.approx(model.area / 1e6, rel=0.005)
        assert_summary_matches_polygon(body["summary"], polygon, contents)
        seen.append((len(reached), body["summary"]["risk_points"]["total"]))
    # The spots test something: several areas hold roads and risk points.
    assert sum(1 for n, risk in seen if n > 3 and risk > 0) >= 3, seen


def test_a_budget_shorter_than_the_snap_leg_reaches_only_the_disc_around_the_spot(
        client: Client, contents, nodes):
    # A risk point far from every road node: the walk to the road takes longer than the budget.
    risk = contents["risk_points"].geometry
    spot = next(p for p in risk if snap(p.x, p.y, nodes)[1] > 500)
    minutes = 1.0  # 250 m at 15 km/h
    body = client.get("/query/reach", params={"lon": spot.x, "lat": spot.y,
                                              "minutes": minutes}).json()
    props = body["features"][0]["properties"]
    assert props["reached_road_nodes"] == 0
    radius = minutes * 60 * SPEED
    assert props["area_km2"] == pytest.approx(math.pi * radius ** 2 / 1e6, rel=0.01)


def test_reach_grows_with_time(client: Client):
    areas = [client.get("/query/reach", params={"lon": 106.55, "lat": 29.56, "minutes": m})
             .json()["features"][0] for m in (3, 6, 12)]
    polygons = [shapely.geometry.shape(a["geometry"]) for a in areas]
    assert areas[0]["properties"]["area_km2"] < areas[1]["properties"]["area_km2"] \
        < areas[2]["properties"]["area_km2"]
    # Rounded to 7 decimals, so allow a hair at the edge.
    assert polygons[1].buffer(EDGE_TOL_DEG).contains(polygons[0])
    assert polygons[2].buffer(EDGE_TOL_DEG).contains(polygons[1])


@pytest.mark.parametrize("params, name", [
    ({"minutes": 0}, "minutes"),
    ({"minutes": -5}, "minutes"),
    ({"minutes": MAX_REACH_MINUTES + 1}, "minutes"),
    ({"minutes": "nan"}, "minutes"),
    ({"minutes": 10, "mode": "walk"}, "mode"),
    ({"minutes": 10, "lon": 181}, "lon"),
    ({"minutes": 10, "lat": -91}, "lat"),
])
def test_bad_reach_parameters_are_400_naming_the_parameter(client: Client, params, name):
    response = client.get("/query/reach", params={"lon": 106.55, "lat": 29.56} | params)
    assert response.status_code == 400, response.text
    assert response.json()["description"].startswith(name)


@pytest.mark.parametrize("missing", ["lon", "lat", "minutes"])
def test_missing_reach_parameters_are_4xx(client: Client, missing):
    params = {"lon": 106.55, "lat": 29.56, "minutes": 10}
    del params[missing]
    response = client.get("/query/reach", params=params)
    assert response.status_code == 400
    assert missing in response.text

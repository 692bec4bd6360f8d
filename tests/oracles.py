"""Independent oracles shared by several test modules (networkx, not pgRouting; shapely and
pyproj.Geod for what lies in an area)."""

from __future__ import annotations

import geopandas as gpd
import networkx as nx
import numpy as np
import pandas as pd
import pytest
import shapely
from pyproj import Geod
from sqlalchemy import Engine, text

GEOD = Geod(ellps="WGS84")
# Points this close to an area's edge (~0.1 m; served polygons are rounded to 7 decimals)
# may fall either way.
EDGE_TOL_DEG = 1e-6


def road_nodes(engine: Engine) -> pd.DataFrame:
    """Every road node's id, lon and lat, by id."""
    return pd.read_sql(text("SELECT id, ST_X(geom) AS lon, ST_Y(geom) AS lat FROM road_nodes "
                            "ORDER BY id"), engine)


def drive_graph(engine: Engine) -> nx.DiGraph:
    """The road graph as driven: u->v costs cost_s, v->u reverse_cost_s (< 0: closed).

    Of parallel edges the cheaper one counts, as it does for pgRouting's Dijkstra.
    """
    edges = pd.read_sql(text("SELECT source, target, cost_s, reverse_cost_s FROM road_edges"),
                        engine)
    graph = nx.DiGraph()
    for source, target, cost, reverse in edges.itertuples(index=False):
        for u, v, c in ((source, target, cost), (target, source, reverse)):
            if c >= 0 and (not graph.has_edge(u, v) or graph[u][v]["cost"] > c):
                graph.add_edge(u, v, cost=c)
    return graph


def in_polygon(polygon, geoms: gpd.GeoSeries) -> tuple[np.ndarray, np.ndarray]:
    """(surely inside, within EDGE_TOL_DEG of the edge) for each geometry (intersects)."""
    near = shapely.distance(geoms.to_numpy(), polygon.boundary) < EDGE_TOL_DEG
    inside = shapely.intersects(geoms.to_numpy(), polygon)
    return inside & ~near, near


def assert_count(got: int, sure: np.ndarray, near: np.ndarray, label) -> None:
    assert sure.sum() <= got <= sure.sum() + near.sum(), (label, got, sure.sum(), near.sum())


def assert_summary_matches_polygon(summary: dict, polygon, contents) -> None:
    risk = contents["risk_points"]
    sure, near = in_polygon(polygon, risk.geometry)
    assert_count(summary["risk_points"]["total"], sure, near, "risk total")
    for sector, got in summary["risk_points"]["by_sector"].items():
        mask = (risk["sector_code"] == sector).to_numpy()
        assert_count(got, sure & mask, near & mask, sector)
    assert set(summary["risk_points"]["by_sector"]) == set(risk["sector_code"])
    for level, got in summary["risk_points"]["by_level"].items():
        mask = (risk["level"] == int(level)).to_numpy()
        assert_count(got, sure & mask, near & mask, f"level {level}")
    hazards = contents["hazard_sources"]
    sure, near = in_polygon(polygon, hazards.geometry)
    assert_count(summary["hazard_sources"]["total"], sure, near, "hazards")
    for kind in set(hazards["kind"]):
        mask = (hazards["kind"] == kind).to_numpy()
        assert_count(summary["hazard_sources"]["by_kind"].get(kind, 0), sure & mask,
                     near & mask, kind)
    buildings = contents["buildings"]
    sure, near = in_polygon(polygon, buildings.geometry)
    assert_count(summary["buildings"]["total"], sure, near, "buildings")
    if not near.any():
        floor_m2 = sum(abs(GEOD.geometry_area_perimeter(geom)[0]) * floors
                       for geom, floors in zip(buildings.geometry[sure],
                                               buildings["floors"][sure], strict=True))
        assert summary["buildings"]["floor_area_m2"] == pytest.approx(floor_m2, rel=1e-4, abs=1)

"""The loaded small sample city: partitions, codes, ownership, networks, anomalies."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import networkx as nx
import numpy as np
import pytest
import rasterio
from sqlalchemy import Engine, text

from data_samples.generate import ANOMALY_TRUTH, generate
from data_samples.output import read_manifest

LEVEL_PAIRS = [
    ("district", "city"),
    ("street", "district"),
    ("community", "street"),
    ("grid", "community"),
]


def rows(engine: Engine, sql: str, **params) -> list:
    with engine.connect() as conn:
        return conn.execute(text(sql), params).mappings().all()


@pytest.mark.parametrize(("child", "parent"), LEVEL_PAIRS)
def test_children_exactly_partition_their_parent(engine: Engine, child: str, parent: str):
    result = rows(engine, """
        WITH children AS (
            SELECT parent_code, ST_Union(geom) AS merged, sum(ST_Area(geom)) AS summed
              FROM admin_units WHERE level = :child GROUP BY parent_code)
        SELECT p.code, ST_Area(p.geom) AS parent_area, c.summed,
               ST_Area(c.merged) AS union_area,
               ST_Area(ST_SymDifference(c.merged, p.geom)) AS mismatch,
               ST_Area(ST_Difference(c.merged, p.geom)) AS outside
          FROM admin_units p LEFT JOIN children c ON c.parent_code = p.code
         WHERE p.level = :parent""", child=child, parent=parent)
    assert result
    for unit in result:
        assert unit["summed"] is not None, f"{parent} {unit['code']} has no {child}"
        area = unit["parent_area"]
        assert unit["mismatch"] / area < 1e-9, f"gap or spill in {unit['code']}"
        assert (unit["summed"] - unit["union_area"]) / area < 1e-9, f"overlap in {unit['code']}"
        assert unit["outside"] / area < 1e-9, f"a {child} leaves {unit['code']}"


def test_codes_follow_the_hierarchy(engine: Engine):
    units = rows(engine, """
        SELECT c.code, c.level, p.code AS parent, p.level AS parent_level
          FROM admin_units c LEFT JOIN admin_units p ON p.code = c.parent_code""")
    expected_parent = {"city": None, "district": "city", "street": "district",
                       "community": "street", "grid": "community"}
    lengths = {"city": 6, "district": 6, "street": 9, "community": 12, "grid": 15}
    for unit in units:
        assert unit["code"].isdigit() and len(unit["code"]) == lengths[unit["level"]]
        assert unit["parent_level"] == expected_parent[unit["level"]]
        if unit["level"] in ("street", "community", "grid"):
            # A 15-digit grid code = district(6) + street(3) + community(3) + grid(3).
            assert unit["code"].startswith(unit["parent"])
    assert sum(u["level"] == "district" for u in units) == 38


def test_every_risk_point_lies_in_its_owning_grid(engine: Engine):
    with engine.connect() as conn:
        points = gpd.read_postgis("SELECT id, grid_code, geom FROM risk_points", conn)
        grids = gpd.read_postgis(
            "SELECT code, geom FROM admin_units WHERE level = 'grid'", conn)
    # Oracle: geopandas' own point-in-polygon join, independent of how the generator placed them.
    joined = gpd.sjoin(points, grids, predicate="intersects", how="left")
    owners = joined.groupby("id")["code"].apply(set)
    assert len(owners) == len(points)
    for point_id, grid_code in zip(points["id"], points["grid_code"], strict=True):
        assert grid_code in owners[point_id]


def test_risk_levels_are_skewed_and_sectors_are_data(engine: Engine):
    levels = {r["level"]: r["n"] for r in rows(
        engine, "SELECT level, count(*) AS n FROM risk_points GROUP BY level")}
    assert set(levels) == {1, 2, 3, 4}
    assert levels[1] < levels[2] < levels[3] < levels[4]
    sectors = rows(engine, "SELECT code FROM sectors")
    assert len(sectors) == 7
    unplanned = rows(engine, "SELECT count(*) AS n FROM risk_points "
                             "WHERE level <= 2 AND plan_id IS NULL")
    assert unplanned[0]["n"] == 0


def test_road_graph_is_connected(engine: Engine):
    edges = rows(engine, "SELECT source, target FROM road_edges")
    graph = nx.Graph((e["source"], e["target"]) for e in edges)
    assert nx.is_connected(graph)
    components = rows(engine, """
        SELECT count(DISTINCT component) AS n FROM pgr_connectedComponents(
            'SELECT id, source, target, cost_s AS cost, reverse_cost_s AS reverse_cost
               FROM road_edges')""")
    assert components[0]["n"] == 1


def test_road_edges_start_and_end_on_their_nodes(engine: Engine):
    bad = rows(engine, """
        SELECT count(*) AS n FROM road_edges e
          JOIN road_nodes s ON s.id = e.source JOIN road_nodes t ON t.id = e.target
         WHERE ST_Distance(ST_StartPoint(e.geom), s.geom) > 1e-9
            OR ST_Distance(ST_EndPoint(e.geom), t.geom) > 1e-9""")
    assert bad[0]["n"] == 0


def sample_dem(sample_dir: Path, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """Ground elevation from the DEM files: the central raster where it covers the point."""
    with rasterio.open(sample_dir / "dem_municipality.tif") as coarse:
        values = np.array([v[0] for v in coarse.sample(zip(lon, lat, strict=True))], float)
    with rasterio.open(sample_dir / "dem_central.tif") as fine:
        left, bottom, right, top = fine.bounds
        inside = (lon >= left) & (lon < right) & (lat > bottom) & (lat <= top)
        coords = zip(lon[inside], lat[inside], strict=True)
        values[inside] = [v[0] for v in fine.sample(coords)]
    return values


def test_drainage_flows_downhill_on_the_dem(engine: Engine, sample_dir: Path):
    segments = rows(engine, """
        SELECT s.id, f.invert_elev_m AS inv_from, t.invert_elev_m AS inv_to,
               ST_X(f.geom) AS x_from, ST_Y(f.geom) AS y_from,
               ST_X(t.geom) AS x_to, ST_Y(t.geom) AS y_to
          FROM pipe_segments s
          JOIN pipe_nodes f ON f.id = s.from_node JOIN pipe_nodes t ON t.id = s.to_node
         WHERE s.network = 'drainage'""")
    assert len(segments) > 100
    assert all(s["inv_from"] > s["inv_to"] for s in segments)
    ground_from = sample_dem(sample_dir, np.array([s["x_from"] for s in segments]),
                             np.array([s["y_from"] for s in segments]))
    ground_to = sample_dem(sample_dir, np.array([s["x_to"] for s in segments]),
                           np.array([s["y_to"] for s in segments]))
    assert np.all(ground_from >= ground_to)


def test_every_injected_anomaly_names_things_that_exist(engine: Engine, sample_dir: Path):
    truth = json.loads((sample_dir / ANOMALY_TRUTH).read_text())
    sensors = {r["id"] for r in rows(engine, "SELECT id FROM sensors")}
    segments = {r["id"]: r["network"] for r in rows(engine,
                                                    "SELECT id, network FROM pipe_segments")}
    assert truth["anomalies"]
    for anomaly in truth["anomalies"]:
        assert anomaly["affected_sensor_ids"]
        assert set(anomaly["affected_sensor_ids"]) <= sensors
        assert segments[anomaly["source_segment_id"]] == anomaly["network"]
        assert set(anomaly["affected_segment_ids"]) <= set(segments)
    for spike in truth["noise_spikes"]:
        assert spike["sensor_id"] in sensors


def test_generator_is_deterministic(sample_dir: Path, tmp_path: Path):
    again = tmp_path / "again"
    generate(again, "small")
    assert read_manifest(again)["files"] == read_manifest(sample_dir)["files"]

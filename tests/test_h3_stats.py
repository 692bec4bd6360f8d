"""/query/h3 against a pandas groupby over the sample CSV, cells computed afresh by ``h3``."""

from __future__ import annotations

from pathlib import Path

import h3
import pandas as pd
import pytest
import shapely
from httpx import Client

BBOX = (106.45, 29.45, 106.65, 29.65)


@pytest.fixture(scope="module")
def risk_points(sample_dir: Path, engine) -> pd.DataFrame:
    frame = pd.read_csv(sample_dir / "risk_points.csv",
                        usecols=["id", "sector_code", "level", "geom"])
    points = shapely.from_wkb(frame.pop("geom").map(bytes.fromhex).to_list())
    return frame.assign(lon=shapely.get_x(points), lat=shapely.get_y(points))


def oracle(points: pd.DataFrame, res: int) -> dict[str, dict]:
    cells = [h3.latlng_to_cell(lat, lon, res) for lat, lon in zip(points["lat"], points["lon"],
                                                                  strict=True)]
    counts = points.assign(h3=cells).groupby(["h3", "level"]).size()
    answer: dict[str, dict] = {}
    for (cell, level), n in counts.items():
        entry = answer.setdefault(cell, {"h3": cell, "count": 0, "by_level": {}})
        entry["count"] += int(n)
        entry["by_level"][str(level)] = int(n)
    return answer


def as_cells(body: dict) -> dict[str, dict]:
    assert len({c["h3"] for c in body["cells"]}) == len(body["cells"])
    return {c["h3"]: c for c in body["cells"]}


@pytest.mark.parametrize("res", range(3, 10))
def test_counts_per_cell_agree_with_a_pandas_groupby(client: Client, risk_points, res: int):
    body = client.get("/query/h3", params={"res": res}).json()
    assert body["resolution"] == res
    assert body["total"] == len(risk_points)
    assert as_cells(body) == oracle(risk_points, res)
    assert all(h3.get_resolution(cell["h3"]) == res for cell in body["cells"])


def test_sector_level_and_bbox_filters(client: Client, risk_points):
    sectors = sorted(risk_points["sector_code"].unique())[:2]
    west, south, east, north = BBOX
    expected = risk_points[risk_points["sector_code"].isin(sectors)
                           & risk_points["level"].isin([1, 2])
                           & risk_points["lon"].between(west, east)
                           & risk_points["lat"].between(south, north)]
    assert 0 < len(expected) < len(risk_points)
    body = client.get("/query/h3", params={
        "res": 7, "sector": ",".join(sectors), "level": "1,2",
        "bbox": ",".join(map(str, BBOX))}).json()
    assert body["total"] == len(expected)
    assert as_cells(body) == oracle(expected, 7)


@pytest.mark.parametrize("params, name", [
    ({"res": 2}, "res"),
    ({"res": 10}, "res"),
    ({"res": 7, "level": "5"}, "level"),
    ({"res": 7, "level": "high"}, "level"),
    ({"res": 7, "sector": "no_such_sector"}, "sector"),
    ({"res": 7, "bbox": "1,2,3"}, "bbox"),
])
def test_bad_h3_parameters_are_400_naming_the_parameter(client: Client, params, name):
    response = client.get("/query/h3", params=params)
    assert response.status_code == 400, response.text
    assert response.json()["description"].startswith(name)


def test_resolution_error_names_the_allowed_values(client: Client):
    description = client.get("/query/h3", params={"res": 12}).json()["description"]
    assert "3, 4, 5, 6, 7, 8, 9" in description

"""Risk-point tiles within their byte budget (tiles.points), and the TWIN_TILES_ settings.

The small sample has too few points to reach the real budgets (800 / 4000 points a tile),
so these tests run their own server with tiny ones; the oracle is pandas + pyproj on the
sample CSV, never the SQL under test.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import mapbox_vector_tile
import morecantile
import pandas as pd
import pyproj
import pytest
import shapely
from sqlalchemy import Engine

from tests.servers import LiveServer
from tiles.cache import tile_key
from tiles.filters import TileFilters
from tiles.points import CLUSTER_CELL
from tiles.vector import BUFFER, EXTENT, TileOptions
from twin.core.settings import Settings, TilesSettings

WEB_MERCATOR = morecantile.tms.get("WebMercatorQuad")
DETAIL_CAP, POINT_CAP = 5, 20
AGGREGATE_BELOW = 8
RISK_FIELDS = {"code", "name", "sector_code", "category", "level", "grid_code", "plan_id"}


@pytest.fixture(scope="module")
def risk_points(sample_dir: Path) -> pd.DataFrame:
    frame = pd.read_csv(sample_dir / "risk_points.csv", dtype={"grid_code": str})
    points = shapely.from_wkb(frame["geom"])
    lon, lat = shapely.get_x(points), shapely.get_y(points)
    x, y = pyproj.Transformer.from_crs(4326, 3857, always_xy=True).transform(lon, lat)
    return frame.assign(lon=lon, lat=lat, x=x, y=y)


@pytest.fixture(scope="module")
def budget_client(engine: Engine, database_url: str) -> Iterator[httpx.Client]:
    tiles = TilesSettings(detail_cap=DETAIL_CAP, point_cap=POINT_CAP,
                          aggregate_below_zoom=AGGREGATE_BELOW)
    with LiveServer(Settings(database_url=database_url, tiles=tiles)) as live, \
            httpx.Client(base_url=live.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def uncached_client(engine: Engine, database_url: str) -> Iterator[httpx.Client]:
    with LiveServer(Settings(database_url=database_url,
                             tiles=TilesSettings(cache=False))) as live, \
            httpx.Client(base_url=live.url, timeout=30) as client:
        yield client


def features(client: httpx.Client, tile: morecantile.Tile, **params) -> list[dict]:
    response = client.get(f"/tiles/risk_points/{tile.z}/{tile.x}/{tile.y}.mvt", params=params)
    assert response.status_code == 200, response.text
    decoded = mapbox_vector_tile.decode(response.content, default_options={"y_coord_down": True})
    return decoded["risk_points"]["features"]


def in_box(frame: pd.DataFrame, tile: morecantile.Tile, margin: float) -> pd.DataFrame:
    """Points in the tile grown by ``margin`` tile units (of EXTENT) on every side."""
    left, bottom, right, top = WEB_MERCATOR.xy_bounds(tile)
    grow = (right - left) * margin / EXTENT
    return frame[frame.x.between(left - grow, right + grow)
                 & frame.y.between(bottom - grow, top + grow)]


def ring_count(frame: pd.DataFrame, tile: morecantile.Tile) -> int:
    """What the server counts to pick the budget: the tile grown by one cluster cell."""
    return len(in_box(frame, tile, CLUSTER_CELL))


def tile_with_count(frame: pd.DataFrame, z: int, low: int, high: int) -> morecantile.Tile:
    tiles = {WEB_MERCATOR.tile(lon, lat, z) for lon, lat in zip(frame.lon, frame.lat, strict=True)}
    for tile in sorted(tiles):
        if low <= ring_count(frame, tile) <= high:
            return tile
    raise AssertionError(f"no zoom-{z} tile holds {low}-{high} points")


def densest_tile(frame: pd.DataFrame, z: int) -> morecantile.Tile:
    tiles = [WEB_MERCATOR.tile(lon, lat, z) for lon, lat in zip(frame.lon, frame.lat, strict=True)]
    return max(set(tiles), key=tiles.count)


def inside(feature: dict) -> bool:
    x, y = feature["geometry"]["coordinates"]
    return 0 <= x < EXTENT and 0 <= y < EXTENT


def cells_oracle(frame: pd.DataFrame, tile: morecantile.Tile) -> pd.DataFrame:
    """Per cluster cell of the tile: how many points and the worst level."""
    left, _, right, top = WEB_MERCATOR.xy_bounds(tile)
    cell = (right - left) * CLUSTER_CELL / EXTENT
    mine = in_box(frame, tile, 0)
    mine = mine.assign(cx=((mine.x - left) // cell).astype(int),
                       cy=((top - mine.y) // cell).astype(int))
    return mine.groupby(["cx", "cy"]).agg(n=("id", "size"), worst=("level", "min"),
                                          first_id=("id", "min"))


def test_small_tiles_carry_every_field(budget_client: httpx.Client, risk_points):
    tile = tile_with_count(risk_points, 14, 2, DETAIL_CAP)
    served = {f["id"]: f for f in features(budget_client, tile)}
    expected = in_box(risk_points, tile, 0).set_index("id")
    assert set(expected.index) <= set(served) <= set(in_box(risk_points, tile, BUFFER + 1)["id"])
    for point_id, row in expected.iterrows():
        props = served[point_id]["properties"]
        assert RISK_FIELDS - {"plan_id"} <= set(props) and "count" not in props
        assert props["code"] == row.code and props["level"] == row.level


def test_busier_tiles_carry_id_level_and_sector(budget_client: httpx.Client, risk_points):
    tile = tile_with_count(risk_points, 13, DETAIL_CAP + 1, POINT_CAP)
    served = {f["id"]: f["properties"] for f in features(budget_client, tile)}
    expected = in_box(risk_points, tile, 0).set_index("id")
    assert set(expected.index) <= set(served) <= set(in_box(risk_points, tile, BUFFER + 1)["id"])
    for point_id, row in expected.iterrows():
        assert served[point_id] == {"level": row.level, "sector_code": row.sector_code}


@pytest.mark.parametrize("z", [9, 10, 12])
def test_dense_tiles_cluster_with_exact_counts(budget_client: httpx.Client, risk_points,
                                               z: int):
    tile = densest_tile(risk_points, z)
    assert ring_count(risk_points, tile) > POINT_CAP
    served = features(budget_client, tile)
    oracle = cells_oracle(risk_points, tile)
    mine = [f for f in served if inside(f)]
    # Sum of counts (a lone point counts 1) = the points in the tile, each counted once.
    assert sum(f["properties"].get("count", 1) for f in mine) == len(in_box(risk_points, tile, 0))
    clusters = {(f["geometry"]["coordinates"][0] // CLUSTER_CELL,
                 f["geometry"]["coordinates"][1] // CLUSTER_CELL): f for f in mine
                if "count" in f["properties"]}
    for (cx, cy), row in oracle.iterrows():
        if row.n == 1:
            lone = next(f for f in mine if f["id"] == row.first_id)
            assert "count" not in lone["properties"]
            continue
        cluster = clusters[(cx, cy)]
        # At the centre of its cell, with the count and the worst level of the cell.
        assert cluster["geometry"]["coordinates"] == [cx * CLUSTER_CELL + CLUSTER_CELL // 2,
                                                      cy * CLUSTER_CELL + CLUSTER_CELL // 2]
        assert cluster["properties"] == {"count": row.n, "level": row.worst}
    assert len(clusters) == (oracle.n > 1).sum() > 0


def test_clusters_over_a_whole_zoom_count_every_point_once(budget_client: httpx.Client,
                                                          risk_points):
    bbox = (risk_points.lon.min(), risk_points.lat.min(), risk_points.lon.max(),
            risk_points.lat.max())
    total = 0
    for tile in WEB_MERCATOR.tiles(*bbox, zooms=[AGGREGATE_BELOW]):
        total += sum(f["properties"].get("count", 1) for f in features(budget_client, tile)
                     if inside(f))
    assert total == len(risk_points)


def test_filters_apply_before_clustering(budget_client: httpx.Client, risk_points):
    chosen = risk_points[risk_points.level <= 2]
    tile = tile_with_count(chosen, 10, POINT_CAP + 1, len(chosen))
    served = features(budget_client, tile, filter="level <= 2")
    assert sum(f["properties"].get("count", 1) for f in served if inside(f)) == \
        len(in_box(chosen, tile, 0))
    assert {f["properties"]["level"] for f in served} <= {1, 2}


def test_aggregate_false_sends_every_point_with_every_field(budget_client: httpx.Client,
                                                            risk_points):
    tile = tile_with_count(risk_points, 10, POINT_CAP + 1, len(risk_points))
    served = features(budget_client, tile, aggregate="false")
    assert set(in_box(risk_points, tile, 0)["id"]) <= {f["id"] for f in served}
    assert all("code" in f["properties"] and "count" not in f["properties"] for f in served)


def test_hexagons_stop_at_the_configured_zoom(budget_client: httpx.Client, client, risk_points):
    tile = WEB_MERCATOR.tile(106.55, 29.56, AGGREGATE_BELOW)
    assert all(f["geometry"]["type"] == "Point" for f in features(budget_client, tile))
    below = WEB_MERCATOR.tile(106.55, 29.56, AGGREGATE_BELOW - 1)
    assert {f["geometry"]["type"] for f in features(budget_client, below)} <= {
        "Polygon", "MultiPolygon"}
    # The default (12) still aggregates at that zoom; TileJSON and style follow the setting.
    assert all(f["geometry"]["type"] != "Point" for f in features(client, tile))
    style = budget_client.get("/styles/risk-map.json").json()
    layers = {layer["id"]: layer for layer in style["layers"]}
    assert layers["risk-hexagons"]["maxzoom"] == layers["risk-points"]["minzoom"] == \
        AGGREGATE_BELOW
    tilejson = budget_client.get("/tiles/risk_points/tilejson.json").json()
    assert f"below zoom {AGGREGATE_BELOW}" in tilejson["vector_layers"][0]["description"]


def test_cache_off_serves_the_same_tile_and_etag(uncached_client: httpx.Client, client):
    tile = WEB_MERCATOR.tile(106.55, 29.56, 13)
    path = f"/tiles/risk_points,roads/13/{tile.x}/{tile.y}.mvt"
    cached, fresh = client.get(path), uncached_client.get(path)
    assert fresh.status_code == cached.status_code == 200
    assert fresh.content == cached.content and fresh.headers["etag"] == cached.headers["etag"]
    again = uncached_client.get(path, headers={"If-None-Match": fresh.headers["etag"]})
    assert again.status_code == 304


def test_cache_key_carries_scope_and_every_option(client):
    from twin.core.layer import Layer

    layer = Layer("risk_points", "风险点", "Risk points", "vector", "Point", "risk_points", None)
    tile = morecantile.Tile(1, 2, 3)
    base = tile_key([layer], tile, TileOptions(), {"risk_points": 1})
    variants = [
        tile_key([layer], tile, TileOptions(), {"risk_points": 1}, scope="district:500103"),
        tile_key([layer], tile, TileOptions(), {"risk_points": 2}),
        tile_key([layer], tile, TileOptions(aggregate=False), {"risk_points": 1}),
        tile_key([layer], tile, TileOptions(point_cap=10), {"risk_points": 1}),
        tile_key([layer], tile, TileOptions(TileFilters(levels=(1,))), {"risk_points": 1}),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_point_positions_match_an_independent_projection(budget_client: httpx.Client,
                                                         risk_points):
    """twin projects points by formula in SQL; pyproj must agree to the tile unit."""
    tile = tile_with_count(risk_points, 16, 1, DETAIL_CAP)
    left, bottom, right, top = WEB_MERCATOR.xy_bounds(tile)
    rows = risk_points.set_index("id")
    for feature in features(budget_client, tile):
        row = rows.loc[feature["id"]]
        px = (row.x - left) / (right - left) * EXTENT
        py = (top - row.y) / (top - bottom) * EXTENT
        x, y = feature["geometry"]["coordinates"]
        assert math.isclose(x, px, abs_tol=0.5 + 1e-6) and math.isclose(y, py, abs_tol=0.5 + 1e-6)

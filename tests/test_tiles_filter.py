"""CQL2-text ``filter=`` on tiles, against oracles selected with pandas from the sample CSV."""

from __future__ import annotations

from pathlib import Path

import h3
import mapbox_vector_tile
import morecantile
import pandas as pd
import pytest
import shapely
from httpx import Client

from tiles.hexagons import resolution_for_zoom
from tiles.vector import BUFFER, EXTENT

WEB_MERCATOR = morecantile.tms.get("WebMercatorQuad")
CENTRAL = (106.55, 29.56)  # Yuzhong, the central urban area
SERIOUS_FACILITIES = "level <= 2 OR (sector_code = 'facility_operation' AND level = 3)"


@pytest.fixture(scope="module")
def risk_points(sample_dir: Path) -> pd.DataFrame:
    frame = pd.read_csv(sample_dir / "risk_points.csv", dtype={"grid_code": str})
    points = shapely.from_wkb(frame["geom"])
    return frame.assign(lon=shapely.get_x(points), lat=shapely.get_y(points))


@pytest.fixture(scope="module")
def serious(risk_points: pd.DataFrame) -> pd.DataFrame:
    """The oracle for SERIOUS_FACILITIES, written with pandas rather than SQL."""
    keep = (risk_points.level <= 2) | (
        (risk_points.sector_code == "facility_operation") & (risk_points.level == 3))
    return risk_points[keep]


def tile_layers(client: Client, path: str, **params) -> dict:
    response = client.get(path, params=params)
    assert response.status_code == 200, response.text
    return mapbox_vector_tile.decode(response.content, default_options={"y_coord_down": True})


def inside(frame: pd.DataFrame, tile: morecantile.Tile, margin: float = 0.0) -> pd.DataFrame:
    west, south, east, north = WEB_MERCATOR.bounds(tile)
    dx, dy = (east - west) * margin, (north - south) * margin
    keep = frame.lon.between(west - dx, east + dx) & frame.lat.between(south - dy, north + dy)
    return frame[keep]


def busiest_tile(frame: pd.DataFrame, z: int) -> morecantile.Tile:
    tiles = [WEB_MERCATOR.tile(lon, lat, z) for lon, lat in zip(frame.lon, frame.lat, strict=True)]
    return max(set(tiles), key=tiles.count)


def owned(cell: int, tile: morecantile.Tile) -> bool:
    lat, lon = h3.cell_to_latlng(h3.int_to_str(cell))
    west, south, east, north = WEB_MERCATOR.bounds(tile)
    return west <= lon < east and south < lat <= north


def cell_counts(frame: pd.DataFrame, z: int) -> pd.DataFrame:
    res = resolution_for_zoom(z)
    cells = [h3.str_to_int(h3.latlng_to_cell(lat, lon, res))
             for lon, lat in zip(frame.lon, frame.lat, strict=True)]
    return frame.assign(cell=cells).groupby("cell").agg(
        count=("id", "size"), worst_level=("level", "min"))


def test_filtered_point_tile_holds_exactly_the_chosen_points(client: Client, risk_points,
                                                               serious):
    tile = busiest_tile(serious, 14)
    layer = tile_layers(client, f"/tiles/risk_points/14/{tile.x}/{tile.y}.mvt",
                        filter=SERIOUS_FACILITIES)["risk_points"]
    served = {feature["id"] for feature in layer["features"]}
    expected = set(inside(serious, tile)["id"])
    assert len(expected) >= 2
    assert expected <= served <= set(inside(serious, tile, BUFFER / EXTENT + 1e-3)["id"])
    # The filter removed something that the unfiltered tile holds.
    assert set(inside(risk_points, tile)["id"]) - served


def test_filter_with_in_like_and_not(client: Client, risk_points):
    cql = ("category IN ('燃气管线', '排水管网') AND NOT code LIKE '%7' "
           "AND level BETWEEN 2 AND 4")
    chosen = risk_points[risk_points.category.isin(["燃气管线", "排水管网"])
                         & ~risk_points.code.str.endswith("7") & risk_points.level.between(2, 4)]
    tile = busiest_tile(chosen, 13)
    layer = tile_layers(client, f"/tiles/risk_points/13/{tile.x}/{tile.y}.mvt",
                        filter=cql)["risk_points"]
    served = {feature["id"] for feature in layer["features"]}
    assert set(inside(chosen, tile)["id"]) <= served <= set(inside(chosen, tile, 0.05)["id"])
    assert all(f["properties"]["category"] in ("燃气管线", "排水管网") for f in layer["features"])


def test_spatial_filter_keeps_the_points_in_the_box(client: Client, risk_points):
    tile = busiest_tile(risk_points, 13)
    west, south, east, north = WEB_MERCATOR.bounds(tile)
    box = (west, south, (west + east) / 2, (south + north) / 2)  # the south-west quarter
    chosen = risk_points[risk_points.lon.between(box[0], box[2])
                         & risk_points.lat.between(box[1], box[3])]
    cql = f"S_INTERSECTS(geom, BBOX({box[0]}, {box[1]}, {box[2]}, {box[3]}))"
    layer = tile_layers(client, f"/tiles/risk_points/13/{tile.x}/{tile.y}.mvt",
                        filter=cql)["risk_points"]
    assert {f["id"] for f in layer["features"]} == set(chosen["id"])


@pytest.mark.parametrize("z", [8, 10])
def test_filter_applies_to_hexagon_counts(client: Client, serious, z: int):
    tile = WEB_MERCATOR.tile(*CENTRAL, z)
    oracle = cell_counts(serious, z)
    layer = tile_layers(client, f"/tiles/risk_points/{z}/{tile.x}/{tile.y}.mvt",
                        filter=SERIOUS_FACILITIES)["risk_points"]
    assert layer["features"]
    for feature in layer["features"]:
        assert feature["properties"]["count"] == oracle.loc[feature["id"], "count"]
        assert feature["properties"]["worst_level"] == oracle.loc[feature["id"], "worst_level"]
    owned_sum = sum(f["properties"]["count"] for f in layer["features"]
                    if f["properties"]["centroid_in_tile"])
    assert owned_sum == sum(n for cell, n in oracle["count"].items() if owned(cell, tile))


def test_filtered_hexagons_over_all_tiles_count_every_chosen_point_once(client: Client,
                                                                        risk_points, serious):
    bbox = (risk_points.lon.min(), risk_points.lat.min(), risk_points.lon.max(),
            risk_points.lat.max())
    total = 0
    for tile in WEB_MERCATOR.tiles(*bbox, zooms=[7]):
        layer = tile_layers(client, f"/tiles/risk_points/7/{tile.x}/{tile.y}.mvt",
                            filter=SERIOUS_FACILITIES)["risk_points"]
        total += sum(f["properties"]["count"] for f in layer["features"]
                     if f["properties"]["centroid_in_tile"])
    assert total == len(serious) < len(risk_points)


def test_filter_combines_with_level_and_on_the_ogc_route(client: Client, serious):
    tile = busiest_tile(serious, 13)
    xyz = client.get(f"/tiles/risk_points/13/{tile.x}/{tile.y}.mvt",
                     params={"filter": SERIOUS_FACILITIES, "level": "3"})
    ogc = client.get(f"/collections/risk_points/tiles/WebMercatorQuad/13/{tile.y}/{tile.x}",
                     params={"filter": SERIOUS_FACILITIES, "level": "3"})
    assert xyz.status_code == ogc.status_code == 200 and xyz.content == ogc.content
    features = mapbox_vector_tile.decode(xyz.content)["risk_points"]["features"]
    chosen = inside(serious[serious.level == 3], tile)
    assert set(chosen["id"]) <= {f["id"] for f in features}
    assert {f["properties"]["sector_code"] for f in features} == {"facility_operation"}


def test_filter_is_part_of_the_cache_key(client: Client, risk_points):
    tile = busiest_tile(risk_points, 13)
    path = f"/tiles/risk_points/13/{tile.x}/{tile.y}.mvt"
    plain = client.get(path)
    level_1 = client.get(path, params={"filter": "level = 1"})
    level_4 = client.get(path, params={"filter": "level = 4"})
    etags = {plain.headers["etag"], level_1.headers["etag"], level_4.headers["etag"]}
    assert len(etags) == 3
    assert level_1.content != level_4.content != plain.content
    again = client.get(path, params={"filter": "level = 1"},
                       headers={"If-None-Match": level_1.headers["etag"]})
    assert again.status_code == 304


def test_composite_tile_filters_every_layer(client: Client):
    # Both layers have a 'code' field, so the filter applies to each of them.
    tile = WEB_MERCATOR.tile(*CENTRAL, 12)
    decoded = tile_layers(client, f"/tiles/risk_points,response_teams/12/{tile.x}/{tile.y}.mvt",
                          filter="code LIKE 'no such code%'")
    assert decoded["risk_points"]["features"] == []
    assert decoded["response_teams"]["features"] == []


@pytest.mark.parametrize(("path", "params", "words"), [
    ("/tiles/risk_points/13/6700/3400.mvt", {"filter": "level = "}, "filter: expected"),
    ("/tiles/risk_points/13/6700/3400.mvt", {"filter": "level = 1 AND"}, "filter: expected"),
    ("/tiles/risk_points/13/6700/3400.mvt", {"filter": "level ~ 1"}, "unexpected character"),
    ("/tiles/risk_points/13/6700/3400.mvt", {"filter": "nope = 1"},
     "unknown property 'nope'"),
    ("/tiles/risk_points/8/209/107.mvt", {"filter": "nope = 1"}, "unknown property 'nope'"),
    ("/tiles/risk_points/13/6700/3400.mvt", {"filter": "level = 'high'"}, "cannot compare"),
    ("/tiles/risk_points/13/6700/3400.mvt", {"filter": "  "}, "filter is empty"),
    ("/tiles/districts,risk_points/13/6700/3400.mvt", {"filter": "level = 1"},
     "layer 'districts'"),
    ("/collections/risk_points/tiles/WebMercatorQuad/13/3400/6700", {"filter": "x = 1"},
     "unknown property 'x'"),
])
def test_bad_filter_is_a_400_naming_the_problem(client: Client, path: str, params: dict,
                                                words: str):
    response = client.get(path, params=params)
    assert response.status_code == 400, response.text
    assert words in response.json()["description"]

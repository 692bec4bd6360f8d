"""Vector tiles, decoded and compared with oracles computed from the sample CSVs."""

from __future__ import annotations

import gzip
from pathlib import Path

import geopandas as gpd
import h3
import mapbox_vector_tile
import morecantile
import pandas as pd
import pytest
import shapely
from httpx import Client
from sqlalchemy import Engine, text

from tiles.hexagons import resolution_for_zoom
from tiles.vector import BUFFER, EXTENT
from twin.core.versions import announce

WEB_MERCATOR = morecantile.tms.get("WebMercatorQuad")
MVT = "application/vnd.mapbox-vector-tile"
CENTRAL = (106.55, 29.56)  # Yuzhong, the central urban area


@pytest.fixture(scope="module")
def risk_points(sample_dir: Path) -> pd.DataFrame:
    frame = pd.read_csv(sample_dir / "risk_points.csv", dtype={"grid_code": str})
    points = shapely.from_wkb(frame["geom"])
    return frame.assign(lon=shapely.get_x(points), lat=shapely.get_y(points))


def decode(content: bytes) -> dict:
    # y_coord_down: keep tile coordinates as served (origin top-left).
    return mapbox_vector_tile.decode(content, default_options={"y_coord_down": True})


def get_tile(client: Client, path: str, **params) -> dict:
    response = client.get(path, params=params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == MVT
    return decode(response.content)


def inside(frame: pd.DataFrame, tile: morecantile.Tile, margin: float = 0.0) -> pd.DataFrame:
    """Points in the tile's bounds, grown by ``margin`` of the tile's width."""
    west, south, east, north = WEB_MERCATOR.bounds(tile)
    dx, dy = (east - west) * margin, (north - south) * margin
    keep = frame.lon.between(west - dx, east + dx) & frame.lat.between(south - dy, north + dy)
    return frame[keep]


def to_mercator(tile: morecantile.Tile, px: float, py: float) -> tuple[float, float]:
    left, bottom, right, top = WEB_MERCATOR.xy_bounds(tile)
    return left + px / EXTENT * (right - left), top - py / EXTENT * (top - bottom)


def busiest_tile(frame: pd.DataFrame, z: int) -> morecantile.Tile:
    tiles = [WEB_MERCATOR.tile(lon, lat, z) for lon, lat in zip(frame.lon, frame.lat, strict=True)]
    return max(set(tiles), key=tiles.count)


def test_point_tile_holds_exactly_the_points_in_its_bounds(client: Client, risk_points):
    tile = busiest_tile(risk_points, 14)
    layer = get_tile(client, f"/tiles/risk_points/{tile.z}/{tile.x}/{tile.y}.mvt")["risk_points"]
    served = {feature["id"]: feature for feature in layer["features"]}
    expected = inside(risk_points, tile).set_index("id")
    assert len(expected) >= 3
    assert set(expected.index) <= set(served)
    # Everything else served lies in the tile's buffer.
    assert set(served) <= set(inside(risk_points, tile, BUFFER / EXTENT + 1e-3)["id"])
    pixel = (WEB_MERCATOR.xy_bounds(tile).right - WEB_MERCATOR.xy_bounds(tile).left) / EXTENT
    for point_id, row in expected.iterrows():
        feature = served[point_id]
        x, y = to_mercator(tile, *feature["geometry"]["coordinates"])
        want_x, want_y = WEB_MERCATOR.xy(row.lon, row.lat)
        assert abs(x - want_x) <= pixel and abs(y - want_y) <= pixel
        assert feature["properties"]["code"] == row.code
        assert feature["properties"]["sector_code"] == row.sector_code
        assert feature["properties"]["level"] == row.level


def test_ogc_tile_path_is_z_row_col_and_matches_xyz(client: Client, risk_points):
    tile = busiest_tile(risk_points, 13)
    ogc = client.get(f"/collections/risk_points/tiles/WebMercatorQuad/{tile.z}/{tile.y}/{tile.x}")
    xyz = client.get(f"/tiles/risk_points/{tile.z}/{tile.x}/{tile.y}.mvt")
    assert ogc.status_code == 200 and ogc.content == xyz.content
    assert ogc.headers["etag"] == xyz.headers["etag"]


def hexagon_oracle(frame: pd.DataFrame, z: int) -> pd.DataFrame:
    """Per cell: count, worst level, centre - from h3 on the CSV's coordinates."""
    res = resolution_for_zoom(z)
    cells = [h3.str_to_int(h3.latlng_to_cell(lat, lon, res))
             for lon, lat in zip(frame.lon, frame.lat, strict=True)]
    grouped = frame.assign(cell=cells).groupby("cell")
    return grouped.agg(count=("id", "size"), worst_level=("level", "min"))


def owned(cell: int, tile: morecantile.Tile) -> bool:
    lat, lon = h3.cell_to_latlng(h3.int_to_str(cell))
    west, south, east, north = WEB_MERCATOR.bounds(tile)
    return west <= lon < east and south < lat <= north


@pytest.mark.parametrize("z", [5, 8, 10, 11])
def test_hexagon_counts_are_exact(client: Client, risk_points, z: int):
    tile = WEB_MERCATOR.tile(*CENTRAL, z)
    oracle = hexagon_oracle(risk_points, z)
    features = get_tile(client, f"/tiles/risk_points/{z}/{tile.x}/{tile.y}.mvt")["risk_points"]
    assert features["features"], "no hexagons in a central tile"
    for feature in features["features"]:
        props = feature["properties"]
        assert feature["geometry"]["type"] in ("Polygon", "MultiPolygon")
        assert props["resolution"] == resolution_for_zoom(z)
        assert props["count"] == oracle.loc[feature["id"], "count"]
        assert props["worst_level"] == oracle.loc[feature["id"], "worst_level"]
        assert sum(v for k, v in props.items() if k.startswith("count_")) == props["count"]
        assert props["centroid_in_tile"] == owned(feature["id"], tile)
    owned_sum = sum(f["properties"]["count"] for f in features["features"]
                    if f["properties"]["centroid_in_tile"])
    expected = sum(n for cell, n in oracle["count"].items() if owned(cell, tile))
    assert owned_sum == expected > 0


@pytest.mark.parametrize("z", [0, 1, 2, 7])
def test_hexagons_owned_over_all_tiles_count_every_point_once(client: Client, risk_points,
                                                              z: int):
    # z0-z2: tiles grown by their buffer reach past the antimeridian.
    bbox = (risk_points.lon.min(), risk_points.lat.min(), risk_points.lon.max(),
            risk_points.lat.max())
    total = 0
    for tile in WEB_MERCATOR.tiles(*bbox, zooms=[z]):
        layer = get_tile(client, f"/tiles/risk_points/{z}/{tile.x}/{tile.y}.mvt")["risk_points"]
        total += sum(f["properties"]["count"] for f in layer["features"]
                     if f["properties"]["centroid_in_tile"])
    assert total == len(risk_points)


def test_filters_apply_to_points_and_to_hexagon_counts(client: Client, risk_points):
    sectors, levels = ["facility_operation", "social_governance"], [1, 2]
    chosen = risk_points[risk_points.sector_code.isin(sectors) & risk_points.level.isin(levels)]
    params = {"sector": ",".join(sectors), "level": "1,2"}
    tile = busiest_tile(chosen, 13)
    layer = get_tile(client, f"/tiles/risk_points/13/{tile.x}/{tile.y}.mvt", **params)
    served = {f["id"] for f in layer["risk_points"]["features"]}
    assert set(inside(chosen, tile)["id"]) <= served
    assert served <= set(inside(chosen, tile, 0.05)["id"])
    tile = WEB_MERCATOR.tile(*CENTRAL, 8)
    oracle = hexagon_oracle(chosen, 8)
    hexes = get_tile(client, f"/tiles/risk_points/8/{tile.x}/{tile.y}.mvt", **params)
    for feature in hexes["risk_points"]["features"]:
        assert feature["properties"]["count"] == oracle.loc[feature["id"], "count"]
        assert set(k for k in feature["properties"] if k.startswith("count_")) <= {
            f"count_{s}" for s in sectors}


def test_aggregation_can_be_turned_off(client: Client, risk_points):
    tile = WEB_MERCATOR.tile(*CENTRAL, 9)
    layer = get_tile(client, f"/tiles/risk_points/9/{tile.x}/{tile.y}.mvt", aggregate="false")
    served = {f["id"] for f in layer["risk_points"]["features"]}
    assert set(inside(risk_points, tile)["id"]) <= served


def test_composite_tile_holds_every_requested_layer(client: Client):
    tile = WEB_MERCATOR.tile(*CENTRAL, 10)
    layers = ["districts", "roads", "risk_points", "buildings"]
    decoded = get_tile(client, f"/tiles/{','.join(layers)}/10/{tile.x}/{tile.y}.mvt")
    assert set(decoded) == set(layers)
    # buildings start at zoom 13: an empty layer, not a missing one.
    assert decoded["buildings"]["features"] == []
    assert decoded["districts"]["features"] and decoded["roads"]["features"]
    assert all(f["properties"]["name_en"] for f in decoded["districts"]["features"])


def test_composite_layers_match_a_geopandas_oracle(client: Client, sample_dir: Path):
    tile = WEB_MERCATOR.tile(*CENTRAL, 11)
    decoded = get_tile(client, f"/tiles/districts,response_teams/11/{tile.x}/{tile.y}.mvt")
    box = shapely.box(*WEB_MERCATOR.bounds(tile))
    west, south, east, north = WEB_MERCATOR.bounds(tile)
    grow = (east - west) * (BUFFER / EXTENT + 1e-3)
    buffered = shapely.box(west - grow, south - grow, east + grow, north + grow)
    admin = gpd.GeoDataFrame(pd.read_csv(sample_dir / "admin_units.csv", dtype={"code": str}))
    districts = admin[admin.level == "district"].set_geometry(
        shapely.from_wkb(admin[admin.level == "district"].geom))
    served = {f["properties"]["code"] for f in decoded["districts"]["features"]}
    # Every district meeting the tile is there, and nothing that only lies past the buffer.
    assert set(districts[districts.intersects(box.buffer(-1e-4))].code) <= served
    assert served <= set(districts[districts.intersects(buffered)].code)
    teams = pd.read_csv(sample_dir / "response_teams.csv")
    geoms = shapely.from_wkb(teams.geom)
    teams = teams.assign(lon=shapely.get_x(geoms), lat=shapely.get_y(geoms))
    served_teams = {f["id"] for f in decoded["response_teams"]["features"]}
    assert set(inside(teams, tile)["id"]) <= served_teams
    assert served_teams <= set(inside(teams, tile, BUFFER / EXTENT + 1e-3)["id"])
    assert served_teams, "no response team in a central tile"


def test_building_tiles_carry_what_extrusion_needs(client: Client, sample_dir: Path):
    """height (the roof), base_height (0 on the ground) and cim_level of every building in
    the tile, as the sample file has them."""
    frame = pd.read_csv(sample_dir / "buildings.csv")
    centres = shapely.centroid(shapely.from_wkb(frame.geom))
    frame = frame.assign(lon=shapely.get_x(centres), lat=shapely.get_y(centres))
    tallest = frame.loc[frame.height_m.idxmax()]
    tile = WEB_MERCATOR.tile(tallest.lon, tallest.lat, 15)
    layer = get_tile(client, f"/tiles/buildings/15/{tile.x}/{tile.y}.mvt")["buildings"]
    served = {feature["id"]: feature["properties"] for feature in layer["features"]}
    expected = inside(frame, tile).set_index("id")
    assert int(tallest.id) in served and set(expected.index) <= set(served)
    for building_id, row in expected.iterrows():
        props = served[building_id]
        assert props["height"] == pytest.approx(row.height_m)
        assert props["base_height"] == 0
        assert props["cim_level"] == row.cim_level
        assert "height_m" not in props


def test_tilejson_describes_the_layers(client: Client):
    doc = client.get("/tiles/districts,risk_points/tilejson.json").json()
    assert doc["tilejson"] == "3.0.0"
    path, version = doc["tiles"][0].split("?v=")  # the data versions: tests/test_tiles_versioned
    assert path.endswith("/tiles/districts,risk_points/{z}/{x}/{y}.mvt") and version
    layers = {layer["id"]: layer for layer in doc["vector_layers"]}
    assert set(layers) == {"districts", "risk_points"}
    assert layers["risk_points"]["fields"]["sector_code"] == "String"
    assert layers["risk_points"]["fields"]["level"] == "Number"
    assert layers["risk_points"]["fields"]["count"] == "Number"
    west, south, east, north = doc["bounds"]
    assert 105 < west < east < 111 and 28 < south < north < 33
    assert west < doc["center"][0] < east and doc["minzoom"] == 0 and doc["maxzoom"] == 22


def test_tile_matrix_sets_and_tileset_metadata(client: Client):
    sets = client.get("/tileMatrixSets").json()["tileMatrixSets"]
    assert [s["id"] for s in sets] == ["WebMercatorQuad"]
    tms = client.get("/tileMatrixSets/WebMercatorQuad").json()
    assert tms["id"] == "WebMercatorQuad" and len(tms["tileMatrices"]) >= 23
    assert client.get("/collections/streets/tiles").json()["tilesets"][0]["dataType"] == "vector"
    tileset = client.get("/collections/streets/tiles/WebMercatorQuad").json()
    assert tileset["tileMatrixSetLimits"][0]["tileMatrix"] == "8"
    item = next(link for link in tileset["links"] if link["rel"] == "item")
    assert item["href"].split("?v=")[0].endswith("/{tileMatrix}/{tileRow}/{tileCol}")
    classes = client.get("/conformance").json()["conformsTo"]
    assert "http://www.opengis.net/spec/ogcapi-tiles-1/1.0/conf/core" in classes


def test_etag_gives_304_and_gzip_is_the_same_tile(client: Client):
    tile = WEB_MERCATOR.tile(*CENTRAL, 12)
    path = f"/tiles/risk_points,roads/12/{tile.x}/{tile.y}.mvt"
    first = client.get(path, headers={"Accept-Encoding": "identity"})
    etag = first.headers["etag"]
    assert etag.startswith('"') and "no-cache" in first.headers["cache-control"]
    again = client.get(path, headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.headers["etag"] == etag
    # httpx inflates transparently; read the raw stream to see the gzip the server sent.
    with client.stream("GET", path, headers={"Accept-Encoding": "gzip"}) as zipped:
        raw = b"".join(zipped.iter_raw())
    assert zipped.headers["content-encoding"] == "gzip"
    assert gzip.decompress(raw) == first.content and len(raw) < len(first.content)


def test_a_new_risk_point_shows_on_the_next_request(client: Client, engine: Engine,
                                                    risk_points):
    lon, lat = 106.5612345, 29.5598765
    here = WEB_MERCATOR.tile(lon, lat, 15)
    elsewhere = WEB_MERCATOR.tile(108.4, 30.8, 15)  # Wanzhou, far away
    here_path = f"/tiles/risk_points/15/{here.x}/{here.y}.mvt"
    far_path = f"/tiles/roads/15/{elsewhere.x}/{elsewhere.y}.mvt"
    before, far_before = client.get(here_path), client.get(far_path)
    cells = {f"h3_r{res}": h3.str_to_int(h3.latlng_to_cell(lat, lon, res)) for res in range(3, 10)}
    insert = text(f"""
        INSERT INTO risk_points (id, code, name, sector_code, category, level, address,
                                 grid_code, {", ".join(cells)}, geom)
        VALUES (999999, 'RP-TILE-TEST', 'tile test', 'facility_operation', 'test', 1, 'test',
                :grid, {", ".join(f":{c}" for c in cells)},
                ST_SetSRID(ST_MakePoint(:lon, :lat), 4326))
    """)
    with engine.begin() as conn:
        conn.execute(insert, {"grid": risk_points.grid_code.iloc[0], "lon": lon, "lat": lat,
                              **cells})
    # A writer outside twin waits for the server to have the new version, as twin's own
    # writes do before they answer (twin/core/versions.py).
    assert announce(engine.url.render_as_string(hide_password=False)) == set()
    try:
        after = client.get(here_path, headers={"If-None-Match": before.headers["etag"]})
        assert after.status_code == 200 and after.headers["etag"] != before.headers["etag"]
        assert 999999 in {f["id"] for f in decode(after.content)["risk_points"]["features"]}
        far_after = client.get(far_path, headers={"If-None-Match": far_before.headers["etag"]})
        assert far_after.status_code == 304
    finally:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM risk_points WHERE id = 999999"))
        assert announce(engine.url.render_as_string(hide_password=False)) == set()
    gone = decode(client.get(here_path).content)["risk_points"]["features"]
    assert 999999 not in {f["id"] for f in gone}


@pytest.mark.parametrize(("path", "status", "words"), [
    ("/tiles/risk_points/23/0/0.mvt", 400, "zoom 23"),
    ("/tiles/risk_points/-1/0/0.mvt", 400, "zoom -1"),
    ("/tiles/risk_points/3/8/0.mvt", 400, "x=8"),
    ("/tiles/risk_points/3/0/-1.mvt", 400, "y=-1"),
    ("/tiles/nope,risk_points/3/0/0.mvt", 404, "available layers"),
    ("/tiles/nope/tilejson.json", 404, "unknown layer 'nope'"),
    ("/tiles/terrain/3/0/0.mvt", 400, "raster"),
    ("/collections/risk_points/tiles/WorldCRS84Quad", 404, "WebMercatorQuad"),
    ("/collections/risk_points/tiles/Nope/3/0/0", 404, "unknown tile matrix set"),
    ("/tileMatrixSets/Nope", 404, "unknown tile matrix set"),
    ("/tiles/risk_points/3/6/3.mvt?sector=arson", 400, "unknown sector arson"),
    ("/tiles/risk_points/3/6/3.mvt?level=5,x", 400, "unknown level 5, x"),
    ("/tiles/roads/3/6/3.mvt?level=1", 400, "risk_points only"),
    ("/tiles/risk_points/3/6/3.mvt?filter=level%20%3D", 400, "filter: expected"),
    ("/tiles/risk_points/3/6/3.mvt?filter=nope%20%3D%201", 400, "unknown property 'nope'"),
    ("/tiles/risk_points/40/0/0.mvt", 400, "zoom 40"),
    ("/tiles/risk_points/13/0/8192.mvt", 400, "y=8192"),
    ("/collections/nope/tiles/WebMercatorQuad/3/3/6", 404, "available layers"),
])
def test_bad_input_is_a_4xx_naming_the_problem(client: Client, path: str, status: int,
                                               words: str):
    response = client.get(path)
    assert response.status_code == status, response.text
    assert words in response.json()["description"]


@pytest.mark.parametrize("path", [
    "/tiles/risk_points/abc/0/0.mvt",
    "/tiles/risk_points/3/6/3.mvt?aggregate=maybe",
    "/collections/risk_points/tiles/WebMercatorQuad/3/x/6",
])
def test_malformed_tile_requests_are_4xx_not_500(client: Client, path: str):
    response = client.get(path)
    assert 400 <= response.status_code < 500, response.text

"""Jurisdiction (issue 7): city, district and street principals against tiles, items, locate,
nearest, coverage and h3, each answer checked against an oracle computed from the sample's
CSV files with shapely, h3 and pyproj (never through the server's SQL).

The scoped principals are Yubei district (500112, which has several streets in the small
sample), one of its streets (500112002), a principal holding a district and a street of
another district (500103 + 500112002: the union of several polygons), and a neighbour of
Yubei (a district that touches it), to show that neighbours see nothing of each other.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import h3
import mapbox_vector_tile
import morecantile
import numpy as np
import pandas as pd
import pytest
import shapely
from httpx import Client
from pyproj import Geod
from sqlalchemy import Engine

from tests.servers import LiveServer
from twin.core.principal import CITY, Scope, parse_scope
from twin.core.settings import AuthSettings, Settings, UploadSettings

WEB_MERCATOR = morecantile.tms.get("WebMercatorQuad")
GEOD = Geod(ellps="WGS84")
DISTRICT, STREET, OTHER_DISTRICT = "500112", "500112002", "500103"
KEYS = {
    "city": ("scope-city-key-0123456789", "city"),
    "district": ("scope-district-key-0123456789", f"district={DISTRICT}"),
    "street": ("scope-street-key-0123456789", f"street={STREET}"),
    "mixed": ("scope-mixed-key-0123456789", f"district={OTHER_DISTRICT};street={STREET}"),
}
PRINCIPALS = tuple(KEYS)
SCOPED = ("district", "street", "mixed")
# Built-in vector layers and the column that identifies their features.
LAYERS = {"risk_points": "id", "districts": "code", "streets": "code", "communities": "code",
          "grids": "code", "response_teams": "id", "supply_depots": "id", "roads": "id",
          "pipe_segments": "id", "pipe_nodes": "id", "sensors": "id", "hazard_sources": "id",
          "buildings": "id"}
ADMIN_LEVELS = {"districts": "district", "streets": "street", "communities": "community",
                "grids": "grid"}
CSV = {"risk_points": "risk_points", "response_teams": "response_teams",
       "supply_depots": "supply_depots", "roads": "road_edges", "pipe_segments": "pipe_segments",
       "pipe_nodes": "pipe_nodes", "sensors": "sensors", "hazard_sources": "hazard_sources",
       "buildings": "buildings"}


# --- the city from its CSV files ----------------------------------------------------------

def read(sample_dir: Path, name: str) -> pd.DataFrame:
    codes = {c: str for c in ("code", "parent_code", "grid_code", "district_code", "admin_code")}
    frame = pd.read_csv(sample_dir / f"{name}.csv", dtype=codes)
    if "geom" in frame:
        frame["geom"] = shapely.from_wkb(frame["geom"])
    return frame


class City:
    """The sample city and the scope rules, restated over shapely geometries."""

    def __init__(self, sample_dir: Path):
        self.admin = read(sample_dir, "admin_units").set_index("code", drop=False)
        self.frames = {layer: read(sample_dir, name) for layer, name in CSV.items()}
        self.jurisdictions = read(sample_dir, "team_jurisdictions")
        points = self.frames["risk_points"]
        self.frames["risk_points"] = points.assign(lon=shapely.get_x(points["geom"]),
                                                   lat=shapely.get_y(points["geom"]))

    def polygon(self, codes) -> shapely.Geometry:
        return shapely.union_all(self.admin.loc[sorted(codes), "geom"].to_numpy())

    @staticmethod
    def by_code(codes: pd.Series, scope: Scope) -> np.ndarray:
        return codes.map(lambda c: any(c.startswith(p) for p in scope.prefixes)).to_numpy(bool)

    def located(self, frame: pd.DataFrame, scope: Scope) -> np.ndarray:
        """Stationed by district code, or inside one of the scope's streets."""
        mask = frame["district_code"].isin(scope.districts).to_numpy().copy()
        if scope.streets:
            mask |= shapely.intersects(frame["geom"].to_numpy(), self.polygon(scope.streets))
        return mask

    def mask(self, layer: str, scope: Scope) -> np.ndarray:
        frame = self.frame(layer)
        if scope.is_city:
            return np.ones(len(frame), bool)
        if layer == "risk_points":
            return self.by_code(frame["grid_code"], scope)
        if layer in ADMIN_LEVELS:
            return self.by_code(frame["code"], scope)
        if layer == "response_teams":
            j = self.jurisdictions
            answering = set(j.loc[self.by_code(j["admin_code"], scope), "team_id"])
            return self.located(frame, scope) | frame["id"].isin(answering).to_numpy()
        if layer in ("supply_depots", "buildings"):
            return self.located(frame, scope)
        area = self.polygon(scope.districts | scope.streets)
        return shapely.intersects(frame["geom"].to_numpy(), area)

    def frame(self, layer: str) -> pd.DataFrame:
        if layer in ADMIN_LEVELS:
            return self.admin[self.admin["level"] == ADMIN_LEVELS[layer]].reset_index(drop=True)
        return self.frames[layer]

    def in_scope(self, layer: str, scope: Scope) -> pd.DataFrame:
        return self.frame(layer)[self.mask(layer, scope)]

    def ids(self, layer: str, scope: Scope) -> set:
        return set(self.in_scope(layer, scope)[LAYERS[layer]])


@pytest.fixture(scope="module")
def city(sample_dir: Path) -> City:
    return City(sample_dir)


@pytest.fixture(scope="module")
def neighbour(city: City) -> str:
    """A district that shares a border with DISTRICT."""
    districts = city.admin[city.admin["level"] == "district"]
    home = city.admin.loc[DISTRICT, "geom"]
    touching = sorted(code for code, geom in zip(districts["code"], districts["geom"],
                                                  strict=True)
                      if code != DISTRICT and shapely.intersects(home, geom))
    assert touching, "the sample city has no neighbour of the test district"
    return touching[0]


SCOPES = {name: parse_scope(text) for name, (_, text) in KEYS.items()}


def scoped_settings(database_url: str, neighbour: str) -> Settings:
    keys = {key: f"planner:scope-{name}:{text}" for name, (key, text) in KEYS.items()}
    keys["scope-neighbour-key-0123456789"] = f"planner:scope-neighbour:district={neighbour}"
    return Settings(database_url=database_url, auth=AuthSettings(keys=keys))


@pytest.fixture(scope="module")
def scoped_server(engine: Engine, database_url: str, neighbour: str) -> Iterator[LiveServer]:
    with LiveServer(scoped_settings(database_url, neighbour)) as live:
        yield live


@pytest.fixture(scope="module")
def api(scoped_server: LiveServer) -> Iterator[Client]:
    with Client(base_url=scoped_server.url, timeout=60) as client:
        yield client


def auth(name: str) -> dict:
    key = "scope-neighbour-key-0123456789" if name == "neighbour" else KEYS[name][0]
    return {"Authorization": f"Bearer {key}"}


def get(api: Client, who: str, path: str, status: int = 200, **params):
    response = api.get(path, params=params, headers=auth(who))
    assert response.status_code == status, (who, path, response.text[:300])
    return response


def decode(content: bytes) -> dict:
    return mapbox_vector_tile.decode(content, default_options={"y_coord_down": True})


def tile_features(api: Client, who: str, layers: str, tile: morecantile.Tile, **params) -> dict:
    response = get(api, who, f"/tiles/{layers}/{tile.z}/{tile.x}/{tile.y}.mvt", **params)
    return {name: layer["features"] for name, layer in decode(response.content).items()}


def inside(frame: pd.DataFrame, tile: morecantile.Tile, grow: float = 0.0) -> pd.DataFrame:
    west, south, east, north = WEB_MERCATOR.bounds(tile)
    dx, dy = (east - west) * grow, (north - south) * grow
    keep = frame.lon.between(west - dx, east + dx) & frame.lat.between(south - dy, north + dy)
    return frame[keep]


# --- features ----------------------------------------------------------------------------

@pytest.mark.parametrize("who", PRINCIPALS)
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_items_are_exactly_the_features_in_scope(api: Client, city: City, who: str, layer: str):
    body = get(api, who, f"/collections/{layer}/items", limit=10000, properties="").json()
    expected = city.ids(layer, SCOPES[who])
    assert body["numberMatched"] == len(expected)
    assert {feature["id"] for feature in body["features"]} == expected
    if who != "city":
        assert len(expected) < len(city.frame(layer))


@pytest.mark.parametrize("who", SCOPED)
def test_a_feature_outside_the_scope_is_not_found(api: Client, city: City, who: str):
    scope = SCOPES[who]
    for layer in ("risk_points", "grids", "response_teams", "roads", "buildings"):
        mask = city.mask(layer, scope)
        frame = city.frame(layer)
        key = LAYERS[layer]
        outside, mine = frame.loc[~mask, key].iloc[0], frame.loc[mask, key].iloc[0]
        get(api, who, f"/collections/{layer}/items/{outside}", 404)
        assert get(api, who, f"/collections/{layer}/items/{mine}").json()["id"] == mine
        get(api, "city", f"/collections/{layer}/items/{outside}")


def test_a_district_sees_no_feature_of_its_neighbour(api: Client, city: City, neighbour: str):
    """Nothing the neighbour owns by code, nothing lying wholly inside the neighbour."""
    theirs, mine = city.admin.loc[neighbour, "geom"], city.admin.loc[DISTRICT, "geom"]
    for layer in sorted(LAYERS):
        features = get(api, "district", f"/collections/{layer}/items", limit=10000).json()
        assert features["numberMatched"] == len(city.ids(layer, SCOPES["district"]))
        for feature in features["features"]:
            properties = feature["properties"]
            for column in ("code", "grid_code", "parent_code"):
                assert not str(properties.get(column) or "").startswith(neighbour), layer
            if layer != "response_teams":  # a team may answer for a street across the border
                assert properties.get("district_code") in (None, DISTRICT), layer
                shape = shapely.geometry.shape(feature["geometry"])
                assert not (shapely.within(shape, theirs) and not shapely.intersects(shape, mine))
    # And the other way round, for the neighbour's own key.
    points = get(api, "neighbour", "/collections/risk_points/items", limit=10000).json()
    assert points["numberMatched"] > 0
    assert not any(f["properties"]["grid_code"].startswith(DISTRICT) for f in points["features"])


# --- listings ----------------------------------------------------------------------------

@pytest.mark.parametrize("who", PRINCIPALS)
def test_collections_and_layers_count_what_is_in_scope(api: Client, city: City, who: str):
    collections = {c["id"]: c for c in get(api, who, "/collections").json()["collections"]}
    layers = {layer["id"]: layer for layer in get(api, who, "/layers").json()["layers"]}
    for layer in ("risk_points", "streets", "response_teams", "roads"):
        expected = len(city.ids(layer, SCOPES[who]))
        assert collections[layer]["featureCount"] == expected
        assert layers[layer]["feature_count"] == expected
        assert get(api, who, f"/collections/{layer}").json()["featureCount"] == expected


UPLOADED = "scope_test_upload"


@pytest.fixture()
def upload_api(engine: Engine, database_url: str, neighbour: str) -> Iterator[Client]:
    """A server whose catalogue holds an uploaded layer of Yubei's, not shared with the city
    (as a district's upload records it), written straight into the catalogue before the
    server resolves its registry."""
    table = f"upload_{UPLOADED}_v1"
    with engine.begin() as conn:
        conn.exec_driver_sql(f'CREATE TABLE "{table}" (id integer PRIMARY KEY, name text, '
                             "geom geometry(Point, 4326))")
        conn.exec_driver_sql(f"""INSERT INTO "{table}" VALUES
            (1, 'in Yubei', ST_SetSRID(ST_MakePoint(106.63, 29.72), 4326))""")
        conn.exec_driver_sql(f"""
            INSERT INTO layers (id, title_zh, title_en, kind, geometry_type, source_table,
                                fields, source_crs, source_datum, min_zoom, max_zoom, origin,
                                current_version, uploaded_by, owner_scope, shared)
            VALUES ('{UPLOADED}', '测试', 'Scope test', 'vector', 'Point', '{table}',
                    '[{{"name": "id", "type": "integer"}}, {{"name": "name", "type": "text"}}]',
                    'EPSG:4326', 'wgs84', 0, 22, 'upload', 1, 'scope-district', '{DISTRICT}',
                    false)""")
    try:
        with LiveServer(scoped_settings(database_url, neighbour)) as live, \
                Client(base_url=live.url, timeout=60) as client:
            yield client
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DELETE FROM layers WHERE id = '{UPLOADED}'")
            conn.exec_driver_sql(f'DROP TABLE "{table}"')


def test_an_unshared_upload_is_seen_only_where_jurisdictions_overlap(upload_api: Client):
    api, unshared_upload = upload_api, UPLOADED
    seen = {"city": True, "district": True, "street": True, "mixed": True, "neighbour": False}
    for who, visible in seen.items():
        listed = {c["id"] for c in get(api, who, "/collections").json()["collections"]}
        catalogued = {layer["id"] for layer in get(api, who, "/layers").json()["layers"]}
        assert (unshared_upload in listed) is visible, who
        assert (unshared_upload in catalogued) is visible, who
        status = 200 if visible else 404
        get(api, who, f"/collections/{unshared_upload}", status)
        get(api, who, f"/layers/{unshared_upload}", status)
        get(api, who, f"/collections/{unshared_upload}/items", status)
        get(api, who, f"/tiles/{unshared_upload}/10/843/421.mvt", status)



@pytest.fixture()
def district_editor_api(engine: Engine, database_url: str, neighbour: str,
                        tmp_path: Path) -> Iterator[Client]:
    settings = scoped_settings(database_url, neighbour)
    keys = {**settings.auth.keys,
            "scope-editor-key-0123456789": f"gis-editor:district-editor:district={DISTRICT}"}
    settings = settings.model_copy(update={
        "auth": AuthSettings(keys=keys), "uploads": UploadSettings(dir=tmp_path / "uploads")})
    with LiveServer(settings) as live, Client(base_url=live.url, timeout=60) as client:
        yield client


def test_a_district_upload_belongs_to_the_district(district_editor_api: Client, engine: Engine):
    """Uploaded through the API (not written by hand): the uploader's scope is recorded."""
    api, layer_id = district_editor_api, "district_upload_scope_test"
    editor = {"Authorization": "Bearer scope-editor-key-0123456789"}
    body = ('{"type": "FeatureCollection", "features": [{"type": "Feature", '
            '"properties": {"name": "in Yubei"}, '
            '"geometry": {"type": "Point", "coordinates": [106.63, 29.72]}}]}')
    response = api.post("/layers", files={"file": ("yubei.geojson", body.encode())},
                        data={"title": "Yubei only", "id": layer_id}, headers=editor)
    assert response.status_code == 202, response.text
    job = response.json()
    for _ in range(600):
        job = api.get(f"/jobs/{job['id']}", headers=editor).json()
        if job["state"] in ("succeeded", "failed"):
            break
        time.sleep(0.1)
    assert job["state"] == "succeeded", job
    try:
        for who, visible in {"city": True, "district": True, "neighbour": False}.items():
            listed = {c["id"] for c in get(api, who, "/collections").json()["collections"]}
            assert (layer_id in listed) is visible, who
            get(api, who, f"/collections/{layer_id}/items", 200 if visible else 404)
    finally:
        api.delete(f"/layers/{layer_id}", headers=editor)


# --- tiles -------------------------------------------------------------------------------

def border_tile(city: City, z: int) -> morecantile.Tile:
    """The tile holding the most risk points of DISTRICT and of other districts alike."""
    points = city.frame("risk_points")
    tiles = pd.Series([WEB_MERCATOR.tile(lon, lat, z) for lon, lat in
                       zip(points.lon, points.lat, strict=True)])
    mine = points["grid_code"].str.startswith(DISTRICT).to_numpy()
    both = pd.DataFrame({"tile": tiles, "mine": mine, "other": ~mine}).groupby("tile").sum()
    best = both.assign(score=both[["mine", "other"]].min(axis=1)).sort_values("score").index[-1]
    assert both.loc[best, "mine"] > 0 and both.loc[best, "other"] > 0
    return best


@pytest.mark.parametrize("who", PRINCIPALS)
def test_point_tiles_hold_the_points_in_scope(api: Client, city: City, who: str):
    tile = border_tile(city, 12)
    points = city.in_scope("risk_points", SCOPES[who])
    served = tile_features(api, who, "risk_points", tile)["risk_points"]
    assert all("count" not in f["properties"] for f in served), "expected the detail tier"
    ids = {feature["id"] for feature in served}
    assert set(inside(points, tile)["id"]) <= ids <= set(inside(points, tile, 0.1)["id"])


@pytest.mark.parametrize("who", PRINCIPALS)
def test_hexagon_counts_sum_to_the_points_in_scope(api: Client, city: City, who: str):
    z = 7
    all_points = city.frame("risk_points")
    points = city.in_scope("risk_points", SCOPES[who])
    res = 4  # tiles.hexagons.resolution_for_zoom(7)
    oracle = pd.Series([h3.str_to_int(h3.latlng_to_cell(lat, lon, res))
                        for lon, lat in zip(points.lon, points.lat, strict=True)]).value_counts()
    bbox = (all_points.lon.min(), all_points.lat.min(), all_points.lon.max(),
            all_points.lat.max())
    total = 0
    for tile in WEB_MERCATOR.tiles(*bbox, zooms=[z]):
        for feature in tile_features(api, who, "risk_points", tile)["risk_points"]:
            assert feature["properties"]["count"] == oracle[feature["id"]]
            if feature["properties"]["centroid_in_tile"]:
                total += feature["properties"]["count"]
    assert total == len(points) > 0


@pytest.mark.parametrize("who", SCOPED)
@pytest.mark.parametrize("z, layers", [
    (11, "roads,streets,response_teams,pipe_segments,hazard_sources"),
    (13, "buildings,grids,supply_depots,sensors,pipe_nodes")])
def test_line_and_polygon_tiles_keep_to_the_scope(api: Client, city: City, who: str, z: int,
                                                  layers: str):
    tile = border_tile(city, z)
    served = tile_features(api, who, layers, tile, aggregate="false")
    west, south, east, north = WEB_MERCATOR.bounds(tile)
    core = shapely.box(west, south, east, north)
    for layer in layers.split(","):
        mine = city.in_scope(layer, SCOPES[who])
        ids = {feature["id"] for feature in served[layer]}
        if layer in ADMIN_LEVELS:  # MVT ids are integers; a unit's code is a property
            ids = {feature["properties"]["code"] for feature in served[layer]}
        within_tile = set(mine.loc[shapely.intersects(mine["geom"].to_numpy(), core),
                                   LAYERS[layer]])
        assert ids <= set(mine[LAYERS[layer]]), layer
        # Features that only touch the tile's edge may be clipped away; all others are served.
        assert len(within_tile - ids) <= max(2, len(within_tile) // 50), layer


def test_a_tile_outside_the_scope_is_an_empty_tile(api: Client, city: City, neighbour: str):
    theirs = city.frame("risk_points")
    theirs = theirs[theirs["grid_code"].str.startswith(neighbour)]
    home = city.admin.loc[DISTRICT, "geom"]
    # A tile of the neighbour's points that does not reach DISTRICT at all.
    tile = next(t for t in (WEB_MERCATOR.tile(lon, lat, 13) for lon, lat in
                            zip(theirs.lon, theirs.lat, strict=True))
                if not shapely.intersects(shapely.box(*WEB_MERCATOR.bounds(t)).buffer(0.01),
                                          home))
    layers = "risk_points,districts,grids,roads,response_teams"
    for who, empty in (("district", True), ("street", True), ("neighbour", False)):
        served = tile_features(api, who, layers, tile)
        assert set(served) == set(layers.split(","))
        assert (sum(len(features) for features in served.values()) == 0) is empty, who


def test_the_tile_cache_never_serves_one_scope_to_another(api: Client, city: City):
    first, second = border_tile(city, 12), border_tile(city, 13)
    mine = city.ids("risk_points", SCOPES["district"])
    for tile, order in ((first, ("city", "district")), (second, ("district", "city"))):
        path = f"/tiles/risk_points/{tile.z}/{tile.x}/{tile.y}.mvt"
        answers = {who: get(api, who, path) for who in order}
        city_tile, district_tile = answers["city"], answers["district"]
        assert city_tile.content != district_tile.content
        assert city_tile.headers["etag"] != district_tile.headers["etag"]
        city_ids = {f["id"] for f in decode(city_tile.content)["risk_points"]["features"]}
        district_ids = {f["id"] for f in decode(district_tile.content)["risk_points"]["features"]}
        assert district_ids <= mine and city_ids - mine and district_ids
        # Revalidating with the other scope's ETag gets that scope's tile, not a 304.
        again = api.get(path, headers={**auth("district"),
                                       "If-None-Match": city_tile.headers["etag"]})
        assert again.status_code == 200 and again.content == district_tile.content
        zipped = api.get(path, headers={**auth("city"), "Accept-Encoding": "gzip"})
        assert zipped.content == city_tile.content  # httpx undoes the gzip


# --- queries -----------------------------------------------------------------------------

def spot_in(city: City, code: str) -> tuple[float, float]:
    grids = city.admin[(city.admin["level"] == "grid") & city.admin["code"].str.startswith(code)]
    point = shapely.point_on_surface(grids["geom"].iloc[0])
    return point.x, point.y


@pytest.mark.parametrize("who", PRINCIPALS)
def test_locate_answers_inside_the_scope_and_404_outside(api: Client, city: City, who: str,
                                                         neighbour: str):
    scope = SCOPES[who]
    lon, lat = spot_in(city, STREET)
    body = get(api, who, "/query/locate", lon=lon, lat=lat, k=5).json()
    assert body["street"]["code"] == STREET
    teams = city.ids("response_teams", scope)
    assert {t["id"] for t in body["nearest_teams"] + body["responsible_teams"]} <= teams
    lon, lat = spot_in(city, neighbour)
    status = 200 if who == "city" else 404
    response = get(api, who, "/query/locate", status, lon=lon, lat=lat)
    if status == 404:
        assert "outside your jurisdiction" in response.json()["description"]


@pytest.mark.parametrize("who", PRINCIPALS)
def test_nearest_teams_are_the_nearest_of_the_scope(api: Client, city: City, who: str):
    lon, lat = spot_in(city, STREET)
    teams = city.in_scope("response_teams", SCOPES[who])
    _, _, metres = GEOD.inv(np.full(len(teams), lon), np.full(len(teams), lat),
                            shapely.get_x(teams["geom"]), shapely.get_y(teams["geom"]))
    k = 4
    expected = list(teams.assign(d=metres).sort_values(["d", "id"])["id"][:k])
    body = get(api, who, "/query/nearest-teams", lon=lon, lat=lat, k=k).json()
    assert [f["id"] for f in body["features"]] == expected
    road = get(api, who, "/query/nearest-teams", lon=lon, lat=lat, k=k, mode="road").json()
    assert {f["id"] for f in road["features"]} <= set(teams["id"])
    assert len(road["features"]) == min(k, len(teams))


@pytest.mark.parametrize("who", PRINCIPALS)
def test_coverage_counts_the_points_and_teams_of_the_scope(api: Client, city: City, who: str):
    scope = SCOPES[who]
    points = city.in_scope("risk_points", scope)
    teams = city.in_scope("response_teams", scope)
    body = get(api, who, "/query/coverage", team_type="fire", minutes=30, limit=200000).json()
    summary = body["summary"]
    assert summary["risk_points"] == len(points)
    assert summary["teams"] == int((teams["team_type"] == "fire").sum())
    assert {d["code"] for d in summary["by_district"]} == set(points["grid_code"].str[:6])
    assert {f["id"] for f in body["features"]} <= set(points["id"])
    assert summary["uncovered"] == body["numberMatched"] == len(body["features"])


@pytest.mark.parametrize("who", PRINCIPALS)
def test_h3_counts_are_the_points_of_the_scope(api: Client, city: City, who: str):
    points = city.in_scope("risk_points", SCOPES[who])
    oracle = pd.Series([h3.latlng_to_cell(lat, lon, 7) for lon, lat in
                        zip(points.lon, points.lat, strict=True)]).value_counts()
    body = get(api, who, "/query/h3", res=7).json()
    assert body["total"] == len(points) == sum(c["count"] for c in body["cells"])
    assert {c["h3"]: c["count"] for c in body["cells"]} == oracle.to_dict()


@pytest.mark.parametrize("who", SCOPED)
def test_impact_and_reach_summarise_only_the_scope(api: Client, city: City, who: str):
    scope = SCOPES[who]
    lon, lat = spot_in(city, STREET)
    whole = get(api, "city", "/query/impact", lon=lon, lat=lat, radius_m=30000,
                limit=10000).json()
    mine = get(api, who, "/query/impact", lon=lon, lat=lat, radius_m=30000, limit=10000).json()
    for kind, layer in (("risk_points", "risk_points"), ("hazard_sources", "hazard_sources"),
                        ("buildings", "buildings")):
        ids = city.ids(layer, scope)
        everything = {f["id"] for f in whole["features"] if f["properties"]["layer"] == kind}
        scoped = {f["id"] for f in mine["features"] if f["properties"]["layer"] == kind}
        assert scoped == everything & ids, kind
        assert mine["summary"][kind]["total"] == len(scoped)
    reach = get(api, who, "/query/reach", lon=lon, lat=lat, minutes=10).json()
    area = shapely.geometry.shape(reach["features"][0]["geometry"])
    points = city.in_scope("risk_points", scope)
    assert reach["summary"]["risk_points"]["total"] == int(
        shapely.intersects(points["geom"].to_numpy(), area).sum())


@pytest.mark.parametrize("who", SCOPED)
def test_pipe_trace_starts_and_stays_in_scope(api: Client, city: City, who: str):
    scope = SCOPES[who]
    segments = city.frame("pipe_segments")
    mask = city.mask("pipe_segments", scope)
    network = segments.loc[mask, "network"].iloc[0] if mask.any() else "drainage"
    if mask.any():
        start = segments.loc[mask & (segments["network"] == network), "id"].iloc[0]
        body = get(api, who, "/query/pipe-trace", segment_id=start, network=network,
                   direction="downstream").json()
        nodes = city.ids("pipe_nodes", scope)
        for feature in body["features"]:
            kind, fid = feature["id"].split(".")
            assert int(fid) in (city.ids("pipe_segments", scope) if kind == "segment"
                                else nodes)
    outside = segments.loc[~mask, ["id", "network"]].iloc[0]
    get(api, who, "/query/pipe-trace", 404, segment_id=outside["id"],
        network=outside["network"])


@pytest.mark.parametrize("network", ["drainage", "water", "gas"])
def test_anomaly_zones_of_a_district_are_those_meeting_it(api: Client, city: City,
                                                          network: str):
    home = city.admin.loc[DISTRICT, "geom"]
    points = city.ids("risk_points", SCOPES["district"])
    whole = get(api, "city", "/query/pipe-anomalies", network=network).json()["features"]
    mine = get(api, "district", "/query/pipe-anomalies", network=network).json()["features"]
    meeting = {z["id"] for z in whole if shapely.intersects(
        shapely.geometry.shape(z["geometry"]), home)}
    assert {z["id"] for z in mine} == meeting
    for zone in mine:
        assert set(zone["properties"]["risk_points"]["ids"]) <= points
        assert all(c["code"].startswith(DISTRICT) for c in zone["properties"]["communities"])


def test_city_scope_is_everything(city: City):
    """The oracle's own sanity: the city scope holds every feature of every layer."""
    for layer in LAYERS:
        assert len(city.ids(layer, CITY)) == len(city.frame(layer))

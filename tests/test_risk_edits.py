"""Editing risk points through OGC API - Features Part 4 (issue 14): create, replace, update
(JSON merge patch) and delete on /collections/risk_points/items, within the editor's
jurisdiction, with ETag / If-Match, audit rows, exact H3 counts and the change pushed.

Oracles: the grid a point belongs to is found by shapely over the grid polygons (not PostGIS);
H3 cells by h3's string API; counts by a recount over risk_points; the map by decoding the
vector tile (mapbox_vector_tile). Every point a test creates is deleted again (the suite's
other tests compare the sample's points with its files).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import h3
import httpx
import mapbox_vector_tile
import morecantile
import pytest
import shapely
from sqlalchemy import Engine, text

from tests.servers import LiveServer
from twin.core.settings import AuthSettings, Settings

DISTRICT, STREET, OTHER = "500112", "500112002", "500103"
KEYS = {
    "street": ("edits-street-editor-0123456789", f"gis-editor:grid-worker:street={STREET}"),
    "district": ("edits-district-editor-0123456789",
                 f"gis-editor:district-editor:district={DISTRICT}"),
    "other": ("edits-other-editor-0123456789", f"gis-editor:other-editor:district={OTHER}"),
    "city": ("edits-city-editor-0123456789", "gis-editor:city-editor:city"),
    "viewer": ("edits-viewer-0123456789", "viewer:a-viewer:city"),
    "planner": ("edits-planner-0123456789", "planner:a-planner:city"),
}
ITEMS = "/collections/risk_points/items"
GEOJSON = {"Content-Type": "application/geo+json"}
MERGE = {"Content-Type": "application/merge-patch+json"}
WEB_MERCATOR = morecantile.tms.get("WebMercatorQuad")


def auth(who: str, **headers: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[who][0]}", **headers}


@pytest.fixture(scope="module")
def api(engine: Engine, database_url: str) -> Iterator[httpx.Client]:
    settings = Settings(database_url=database_url,
                        auth=AuthSettings(keys=dict(KEYS.values()), anonymous_role=""))
    with LiveServer(settings) as live, httpx.Client(base_url=live.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def grids(engine: Engine) -> dict[str, shapely.Geometry]:
    """Every grid cell's polygon, for the shapely oracle."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT code, ST_AsBinary(geom) FROM admin_units "
                                 "WHERE level = 'grid' ORDER BY code")).all()
    return {code: shapely.from_wkb(bytes(wkb)) for code, wkb in rows}


def spot(grids: dict, prefix: str, nth: int = 0) -> tuple[float, float]:
    """A point well inside the nth grid cell under ``prefix``."""
    codes = [code for code in grids if code.startswith(prefix)]
    assert len(codes) > nth, f"the sample has no grid {nth} under {prefix}"
    point = shapely.point_on_surface(grids[codes[nth]])
    return round(point.x, 7), round(point.y, 7)


def oracle_grid(grids: dict, lon: float, lat: float) -> str:
    point = shapely.Point(lon, lat)
    return min(code for code, polygon in grids.items() if polygon.covers(point))


def feature(lon: float, lat: float, **properties) -> dict:
    props = {"name": "和平社区燃气调压箱1号", "sector_code": "facility_operation",
             "category": "燃气调压设施", "level": 2, "address": "重庆市测试街道1号"}
    return {"type": "Feature", "geometry": {"type": "Point", "coordinates": [lon, lat]},
            "properties": props | properties}


@pytest.fixture()
def created(api: httpx.Client, engine: Engine) -> Iterator[list[int]]:
    """Ids the test created; deleted afterwards whatever happened."""
    ids: list[int] = []
    yield ids
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM risk_points WHERE id = ANY(:ids)"), {"ids": ids})


def create(api: httpx.Client, created: list[int], who: str, body: dict) -> httpx.Response:
    response = api.post(ITEMS, json=body, headers=auth(who, **GEOJSON))
    if response.status_code == 201:
        created.append(response.json()["id"])
    return response


def row(engine: Engine, point_id: int) -> dict | None:
    with engine.connect() as conn:
        found = conn.execute(text(
            "SELECT *, ST_X(geom) AS lon, ST_Y(geom) AS lat FROM risk_points WHERE id = :id"),
            {"id": point_id}).mappings().first()
    return dict(found) if found else None


def h3_counts_exact(engine: Engine) -> None:
    """The stored H3 counts equal a recount over risk_points."""
    with engine.connect() as conn:
        stored = set(conn.execute(text(
            "SELECT res, cell, sector_code, level, n FROM risk_point_h3_counts")).all())
        recount = set(conn.execute(text("""
            SELECT r.res, r.cell, p.sector_code, p.level, count(*)::int
              FROM risk_points AS p
             CROSS JOIN LATERAL (VALUES (3, p.h3_r3), (4, p.h3_r4), (5, p.h3_r5),
                                        (6, p.h3_r6), (7, p.h3_r7), (8, p.h3_r8),
                                        (9, p.h3_r9)) AS r(res, cell)
             GROUP BY 1, 2, 3, 4""")).all())
    assert stored == recount


def edits(engine: Engine, point_id: int) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(text(
            "SELECT principal, action, before, after FROM risk_point_edits "
            "WHERE risk_point_id = :id ORDER BY id"), {"id": point_id}).mappings()]


def feature_messages(engine: Engine, point_id: int) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(
            "SELECT payload->>'action', area_codes FROM outbox WHERE kind = 'feature' "
            "AND payload->>'collection' = 'risk_points' AND (payload->>'id')::bigint = :id "
            "ORDER BY id"), {"id": point_id})]


def tile_feature(api: httpx.Client, lon: float, lat: float, point_id: int) -> dict | None:
    """The point as the z15 vector tile holding (lon, lat) serves it."""
    tile = WEB_MERCATOR.tile(lon, lat, 15)
    response = api.get(f"/tiles/risk_points/15/{tile.x}/{tile.y}.mvt", headers=auth("viewer"))
    assert response.status_code == 200, response.text
    layer = mapbox_vector_tile.decode(response.content).get("risk_points", {"features": []})
    return next((f for f in layer["features"] if f["id"] == point_id), None)


def check_stored(engine: Engine, grids: dict, point_id: int, lon: float, lat: float,
                 **properties) -> dict:
    stored = row(engine, point_id)
    assert stored is not None
    assert (stored["lon"], stored["lat"]) == (lon, lat)
    assert stored["grid_code"] == oracle_grid(grids, lon, lat)
    for res in range(3, 10):
        assert stored[f"h3_r{res}"] == h3.str_to_int(h3.latlng_to_cell(lat, lon, res))
    for name, value in properties.items():
        assert stored[name] == value, name
    return stored


def test_create_replace_patch_delete_round_trip(api, engine, grids, created):
    lon, lat = spot(grids, STREET)
    response = create(api, created, "street", feature(lon, lat, plan_id=None))
    assert response.status_code == 201, response.text
    point_id = response.json()["id"]
    assert response.headers["location"].endswith(f"{ITEMS}/{point_id}")
    etag = response.headers["etag"]
    assert etag.startswith('"') and not etag.startswith("W/")
    stored = check_stored(engine, grids, point_id, lon, lat, level=2, code=f"RP{point_id:08d}",
                          sector_code="facility_operation", address="重庆市测试街道1号")
    h3_counts_exact(engine)

    # The item GET, at the Location, says the same, with the same ETag.
    read = api.get(response.headers["location"], headers=auth("street"))
    assert read.status_code == 200 and read.headers["etag"] == etag
    assert read.json()["geometry"]["coordinates"] == [lon, lat]
    assert read.json()["properties"]["grid_code"] == stored["grid_code"]
    shown = tile_feature(api, lon, lat, point_id)
    assert shown is not None and shown["properties"]["level"] == 2

    # PUT: replace everything, moved to another grid of the same street.
    lon2, lat2 = spot(grids, STREET, 1)
    replaced = api.put(f"{ITEMS}/{point_id}", json=feature(
        lon2, lat2, level=1, name="替换后的名字", category="危化品仓库",
        sector_code="production_services"), headers=auth("street", **GEOJSON, **{
            "If-Match": etag}))
    assert replaced.status_code == 200, replaced.text
    assert replaced.headers["etag"] != etag
    etag = replaced.headers["etag"]
    check_stored(engine, grids, point_id, lon2, lat2, level=1, name="替换后的名字",
                 sector_code="production_services", code=f"RP{point_id:08d}")
    h3_counts_exact(engine)
    assert api.get(f"{ITEMS}/{point_id}", headers=auth("city")).headers["etag"] == etag
    assert tile_feature(api, lon2, lat2, point_id)["properties"]["level"] == 1
    if WEB_MERCATOR.tile(lon, lat, 15) != WEB_MERCATOR.tile(lon2, lat2, 15):
        assert tile_feature(api, lon, lat, point_id) is None

    # PATCH: a merge patch of one property; the rest stays.
    patched = api.patch(f"{ITEMS}/{point_id}", json={"properties": {"level": 4}},
                        headers=auth("district", **MERGE, **{"If-Match": etag}))
    assert patched.status_code == 200, patched.text
    assert patched.json()["properties"]["name"] == "替换后的名字"
    check_stored(engine, grids, point_id, lon2, lat2, level=4, name="替换后的名字")
    h3_counts_exact(engine)
    assert tile_feature(api, lon2, lat2, point_id)["properties"]["level"] == 4
    etag = patched.headers["etag"]
    assert api.get(f"{ITEMS}/{point_id}", headers=auth("street")).headers["etag"] == etag

    # PATCH the geometry only (back to the first spot): grid and H3 follow.
    moved = api.patch(f"{ITEMS}/{point_id}", json={"geometry": {
        "type": "Point", "coordinates": [lon, lat]}}, headers=auth("street", **MERGE))
    assert moved.status_code == 200, moved.text
    check_stored(engine, grids, point_id, lon, lat, level=4)
    h3_counts_exact(engine)

    deleted = api.delete(f"{ITEMS}/{point_id}",
                         headers=auth("street", **{"If-Match": moved.headers["etag"]}))
    assert deleted.status_code == 204, deleted.text
    assert row(engine, point_id) is None
    assert api.get(f"{ITEMS}/{point_id}", headers=auth("city")).status_code == 404
    assert tile_feature(api, lon, lat, point_id) is None
    h3_counts_exact(engine)

    history = edits(engine, point_id)
    assert [h["action"] for h in history] == ["create", "replace", "update", "update", "delete"]
    assert [h["principal"] for h in history] == ["grid-worker", "grid-worker",
                                                 "district-editor", "grid-worker",
                                                 "grid-worker"]
    assert history[0]["before"] is None and history[-1]["after"] is None
    assert history[1]["before"]["level"] == 2 and history[1]["after"]["level"] == 1
    assert history[1]["after"]["geometry"]["coordinates"] == [lon2, lat2]
    assert history[2]["before"] == history[1]["after"]
    assert history[2]["after"]["level"] == 4
    assert history[-1]["before"]["geometry"]["coordinates"] == [lon, lat]
    grid1, grid2 = oracle_grid(grids, lon, lat), oracle_grid(grids, lon2, lat2)
    assert feature_messages(engine, point_id) == [
        ("create", [grid1]), ("replace", sorted({grid1, grid2})), ("update", [grid2]),
        ("update", sorted({grid1, grid2})), ("delete", [grid1])]
    # Each edit's transaction also pushed the layer's new data version (migration 0010).
    with engine.connect() as conn:
        layer_versions = conn.execute(text("""
            SELECT count(*) FROM outbox AS f JOIN outbox AS l ON l.txid = f.txid
             WHERE f.kind = 'feature' AND (f.payload->>'id')::bigint = :id
               AND l.kind = 'layer' AND l.payload->>'id' = 'risk_points' AND l.id > f.id"""),
            {"id": point_id}).scalar_one()
    assert layer_versions == 5


def test_a_lost_update_is_refused(api, engine, grids, created):
    """Two editors read the same version; the second write with it gets 412."""
    lon, lat = spot(grids, STREET)
    point_id = create(api, created, "street", feature(lon, lat)).json()["id"]
    etag = api.get(f"{ITEMS}/{point_id}", headers=auth("street")).headers["etag"]
    first = api.patch(f"{ITEMS}/{point_id}", json={"properties": {"level": 1}},
                      headers=auth("street", **MERGE, **{"If-Match": etag}))
    assert first.status_code == 200, first.text
    second = api.patch(f"{ITEMS}/{point_id}", json={"properties": {"level": 3}},
                       headers=auth("district", **MERGE, **{"If-Match": etag}))
    assert second.status_code == 412, second.text
    assert second.json()["code"] == "PreconditionFailed"
    assert "changed since you read it" in second.json()["description"]
    assert "grid-worker" in second.json()["description"]
    for refused in (
            api.put(f"{ITEMS}/{point_id}", json=feature(lon, lat),
                    headers=auth("district", **GEOJSON, **{"If-Match": etag})),
            api.delete(f"{ITEMS}/{point_id}", headers=auth("district", **{"If-Match": etag})),
            api.delete(f"{ITEMS}/{point_id}", headers=auth("district", **{
                "If-Match": "W/" + first.headers["etag"]}))):
        assert refused.status_code == 412, refused.text
    assert row(engine, point_id)["level"] == 1
    assert [h["action"] for h in edits(engine, point_id)] == ["create", "update"]
    # The current ETag (or *) passes.
    assert api.patch(f"{ITEMS}/{point_id}", json={"properties": {"level": 3}}, headers=auth(
        "district", **MERGE, **{"If-Match": first.headers["etag"]})).status_code == 200
    assert api.patch(f"{ITEMS}/{point_id}", json={"properties": {"level": 2}}, headers=auth(
        "district", **MERGE, **{"If-Match": "*"})).status_code == 200


def test_of_simultaneous_writers_with_one_etag_exactly_one_wins(api, engine, grids, created):
    lon, lat = spot(grids, STREET)
    response = create(api, created, "street", feature(lon, lat))
    point_id, etag = response.json()["id"], response.headers["etag"]
    statuses: list[int] = []
    start = threading.Barrier(4)

    def write(level: int) -> None:
        start.wait()
        statuses.append(api.patch(f"{ITEMS}/{point_id}", json={"properties": {"level": level}},
                                  headers=auth("city", **MERGE, **{"If-Match": etag})
                                  ).status_code)

    threads = [threading.Thread(target=write, args=(level,)) for level in (1, 2, 3, 4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [200, 412, 412, 412]
    assert [h["action"] for h in edits(engine, point_id)] == ["create", "update"]
    h3_counts_exact(engine)


def test_jurisdiction(api, engine, grids, created):
    here, there = spot(grids, STREET), spot(grids, OTHER)
    # Creating outside: 403 naming the editor's jurisdiction.
    refused = create(api, created, "street", feature(*there))
    assert refused.status_code == 403, refused.text
    assert f"street={STREET}" in refused.json()["description"]
    assert oracle_grid(grids, *there) in refused.json()["description"]
    # Moving a point out of it: 403, nothing changes.
    point_id = create(api, created, "street", feature(*here)).json()["id"]
    moved = api.patch(f"{ITEMS}/{point_id}", json={"geometry": {
        "type": "Point", "coordinates": list(there)}}, headers=auth("street", **MERGE))
    assert moved.status_code == 403, moved.text
    assert "moved out" in moved.json()["description"]
    assert (row(engine, point_id)["lon"], row(engine, point_id)["lat"]) == here
    # A point of another jurisdiction does not exist for the editor.
    for who in ("other",):
        for response in (
                api.put(f"{ITEMS}/{point_id}", json=feature(*here),
                        headers=auth(who, **GEOJSON)),
                api.patch(f"{ITEMS}/{point_id}", json={"properties": {"level": 1}},
                          headers=auth(who, **MERGE)),
                api.delete(f"{ITEMS}/{point_id}", headers=auth(who))):
            assert response.status_code == 404, response.text
    assert api.get(f"{ITEMS}/{point_id}", headers=auth("other")).status_code == 404
    # The city may move it anywhere; then the street no longer finds it.
    assert api.patch(f"{ITEMS}/{point_id}", json={"geometry": {
        "type": "Point", "coordinates": list(there)}},
        headers=auth("city", **MERGE)).status_code == 200
    assert api.delete(f"{ITEMS}/{point_id}", headers=auth("street")).status_code == 404
    assert [h["action"] for h in edits(engine, point_id)] == ["create", "update"]
    h3_counts_exact(engine)


@pytest.mark.parametrize("who", ["viewer", "planner"])
def test_viewers_and_planners_may_not_edit(api, engine, grids, who):
    lon, lat = spot(grids, STREET)
    sample_id = 1
    for response in (
            api.post(ITEMS, json=feature(lon, lat), headers=auth(who, **GEOJSON)),
            api.put(f"{ITEMS}/{sample_id}", json=feature(lon, lat), headers=auth(who, **GEOJSON)),
            api.patch(f"{ITEMS}/{sample_id}", json={"properties": {"level": 1}},
                      headers=auth(who, **MERGE)),
            api.delete(f"{ITEMS}/{sample_id}", headers=auth(who))):
        assert response.status_code == 403, response.text
        assert "gis-editor" in response.json()["description"]
    assert row(engine, sample_id) is not None


def test_bad_input(api, engine, grids, created):
    lon, lat = spot(grids, STREET)

    def post(body, headers=GEOJSON, raw: bytes | None = None) -> httpx.Response:
        if raw is not None:
            return api.post(ITEMS, content=raw, headers=auth("city", **headers))
        return create(api, created, "city", body)

    cases = [
        (feature(0.0, 0.0), 422, "outside the municipality"),
        (feature(lon, lat, sector_code="weather"), 422, "party_building"),
        (feature(lon, lat, level=5), 422, "1 major (red)"),
        (feature(lon, lat, level="2"), 422, "level"),
        (feature(lon, lat, level=2.5), 422, "level"),
        (feature(lon, lat, plan_id=987654321), 422, "no emergency plan"),
        (feature(lon, lat, colour="red"), 422, "unknown properties colour"),
        (feature(lon, lat, name=""), 422, "name"),
        (feature(lon, lat, name="a\x00b"), 422, "NUL"),
        ({**feature(lon, lat), "properties": {"name": "x"}}, 422, "missing properties"),
        ({**feature(lon, lat), "geometry": {"type": "LineString",
                                            "coordinates": [[lon, lat], [lon, lat]]}},
         400, "Point"),
        ({**feature(lon, lat), "geometry": {"type": "Point", "coordinates": [lat]}}, 400,
         "coordinates"),
        ({**feature(lon, lat), "geometry": {"type": "Point", "coordinates": [200.0, lat]}},
         400, "longitudes"),
        ({**feature(lon, lat), "geometry": None}, 400, "Point"),
        ({**feature(lon, lat), "type": "FeatureCollection"}, 400, "Feature"),
        ([1, 2], 400, "Feature"),
        ({**feature(lon, lat), "crs": {"type": "name", "properties": {
            "name": "urn:ogc:def:crs:EPSG::4545"}}}, 400, "crs"),
    ]
    for body, status, words in cases:
        response = post(body)
        assert response.status_code == status, (body, response.text)
        assert set(response.json()) == {"code", "description"}
        assert words in response.json()["description"], (body, response.text)
    for raw, headers, status in ((b"{not json", GEOJSON, 400), (b'{"a": NaN}', GEOJSON, 400),
                                 (b"{}", {"Content-Type": "text/plain"}, 415)):
        response = post(None, headers, raw)
        assert response.status_code == status, response.text
        assert set(response.json()) == {"code", "description"}
    unknown_crs = api.post(ITEMS, json=feature(lon, lat),
                           headers=auth("city", **GEOJSON, **{"Content-Crs": "EPSG:9999"}))
    assert unknown_crs.status_code == 400 and "Content-Crs" in unknown_crs.json()["description"]
    assert not created  # nothing was written
    h3_counts_exact(engine)


def test_a_code_is_unique_and_content_crs_is_honoured(api, engine, grids, created):
    lon, lat = spot(grids, STREET)
    first = create(api, created, "city", feature(lon, lat, code="RP-EDIT-TEST-1"))
    assert first.status_code == 201, first.text
    assert row(engine, first.json()["id"])["code"] == "RP-EDIT-TEST-1"
    again = create(api, created, "city", feature(lon, lat, code="RP-EDIT-TEST-1"))
    assert again.status_code == 409, again.text
    # EPSG:4326 by its URI is latitude first.
    body = feature(lat, lon)
    flipped = api.post(ITEMS, json=body, headers=auth("city", **GEOJSON, **{
        "Content-Crs": "<http://www.opengis.net/def/crs/EPSG/0/4326>".strip("<>")}))
    assert flipped.status_code == 201, flipped.text
    created.append(flipped.json()["id"])
    stored = row(engine, flipped.json()["id"])
    assert abs(stored["lon"] - lon) < 1e-9 and abs(stored["lat"] - lat) < 1e-9
    assert stored["grid_code"] == oracle_grid(grids, lon, lat)
    # A PUT keeps the code when it leaves it out; GET's properties can be sent back.
    point_id = first.json()["id"]
    read = api.get(f"{ITEMS}/{point_id}", headers=auth("city")).json()
    back = {"type": "Feature", "geometry": read["geometry"],
            "properties": read["properties"] | {"address": "重庆市测试街道2号"}}
    del back["properties"]["code"]
    put = api.put(f"{ITEMS}/{point_id}", json=back, headers=auth("city", **GEOJSON))
    assert put.status_code == 200, put.text
    assert row(engine, point_id)["code"] == "RP-EDIT-TEST-1"
    assert row(engine, point_id)["address"] == "重庆市测试街道2号"

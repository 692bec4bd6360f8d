"""The command-hall map (web/) in a real browser: Debian's chromium driven by Playwright.

The app is the built bundle (web/dist, made by ``make test``) served by a live twin on the small
sample city. Oracles come from the database (risk_points.grid_code, team positions) and from
shapely, never from the page itself. Screenshots of the main views go to tests/artifacts/.
"""

from __future__ import annotations

import io
import json
import math
import re
import time
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from pyproj import Transformer
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile
from rasterio.transform import from_origin
from shapely import wkb
from shapely.geometry import Point, shape
from sqlalchemy import Engine, text

from data_samples.generate import ANOMALY_TRUTH
from tests.servers import LiveServer
from tests.uploads import minimal_glb
from tests.webpages import BrowserPage, chromium, need_built_web
from twin.core.settings import AuthSettings, Settings, UploadSettings

EDITOR_KEY = "web-test-editor-key"
VIEWPORT = {"width": 1920, "height": 1080}
LAPTOP = {"width": 1366, "height": 768}
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def web_server(engine: Engine, database_url: str,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """twin with a gis-editor key and its own upload folder (the page's upload needs both)."""
    need_built_web()
    settings = Settings(
        database_url=database_url,
        auth=AuthSettings(keys={EDITOR_KEY: "gis-editor:web-test"}),
        uploads=UploadSettings(dir=tmp_path_factory.mktemp("uploads")),
    )
    with LiveServer(settings) as live:
        yield live


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with chromium() as browser:
        yield browser


class MapPage(BrowserPage):
    """One browser page on the map, recording console errors and requests."""

    def __init__(self, page, base_url: str):
        super().__init__(page, base_url, TIMEOUT_MS)
        self.requests: list[str] = []
        page.on("request", lambda r: self.requests.append(r.url))

    def open(self, fragment: str = "") -> MapPage:
        self.page.goto(f"{self.base_url}/{fragment}")
        self.page.wait_for_function("window.__twin && window.__twin.ready")
        self.idle()
        return self

    def source_features(self, source: str) -> list[dict]:
        return self.page.evaluate(
            "async (id) => (await window.__twinMap.getSource(id).getData()).features", source)


@pytest.fixture()
def map_page(browser, web_server: LiveServer) -> Iterator[MapPage]:
    context = browser.new_context(viewport=VIEWPORT, locale="zh-CN")
    page = context.new_page()
    yield MapPage(page, web_server.url)
    context.close()


def _isolated_risk_point(engine: Engine) -> dict:
    """A risk point with an emergency plan and no other point within ~100 m, so a click on it
    cannot hit a neighbour; the most serious such point first."""
    with engine.connect() as conn:
        row = conn.execute(text("""
            SELECT r.id, r.name, r.grid_code, ST_X(r.geom) AS lon, ST_Y(r.geom) AS lat,
                   p.title_zh AS plan_title
              FROM risk_points AS r JOIN emergency_plans AS p ON p.id = r.plan_id
             WHERE NOT EXISTS (SELECT 1 FROM risk_points AS o
                                WHERE o.id <> r.id AND ST_DWithin(o.geom, r.geom, 0.001))
             ORDER BY r.level, r.id LIMIT 1
        """)).mappings().one()
    return dict(row)


def _metres(a: list[float], b: list[float]) -> float:
    """Equirectangular distance, plenty for "is this end at that point" within metres."""
    lat = math.radians((a[1] + b[1]) / 2)
    dx = math.radians(b[0] - a[0]) * math.cos(lat) * 6_371_000
    dy = math.radians(b[1] - a[1]) * 6_371_000
    return math.hypot(dx, dy)


def test_index_and_assets_are_served(web_server: LiveServer):
    import httpx

    html = httpx.get(f"{web_server.url}/", headers={"Accept": "text/html"}).text
    assets = re.findall(r'(?:src|href)="(/assets/[^"]+)"', html)
    assert assets, "the built index.html names its bundles under /assets"
    for asset in assets:
        response = httpx.get(f"{web_server.url}{asset}")
        assert response.status_code == 200, asset
    # The API is not shadowed by the static mount.
    assert httpx.get(f"{web_server.url}/", headers={"Accept": "application/json"}).json()["title"]


def test_map_loads_without_console_errors_and_requests_tiles(map_page: MapPage):
    map_page.open()
    assert map_page.errors == []
    tiles = [url for url in map_page.requests if url.endswith(".mvt") or ".mvt?" in url]
    assert any("/tiles/risk_points/" in url for url in tiles), tiles
    assert any("/tiles/districts,streets,communities,grids/" in url for url in tiles), tiles
    # The statistics strip shows the seven sectors and a total.
    labels = map_page.page.locator("#stats-chart text.stats-label")
    assert labels.count() == 7
    map_page.screenshot("map-overview.png")


def test_sector_toggle_rerequests_tiles_with_the_filter(map_page: MapPage, engine: Engine):
    map_page.open()
    with engine.connect() as conn:
        codes = conn.execute(text("SELECT code FROM sectors ORDER BY sort_order")).scalars().all()
    before = len(map_page.requests)
    with map_page.page.expect_request(lambda r: "/tiles/risk_points/" in r.url
                                      and "sector=" in r.url) as request_info:
        map_page.page.locator(f"#sector-{codes[0]}").uncheck()
    url = request_info.value.url
    sent = re.search(r"sector=([^&]+)", url).group(1).replace("%2C", ",").split(",")
    assert sent == codes[1:]
    response = request_info.value.response()
    assert response is not None and response.status in (200, 304)
    # The level filter joins the sector filter on the next request.
    with map_page.page.expect_request(lambda r: "/tiles/risk_points/" in r.url
                                      and "level=" in r.url) as level_info:
        map_page.page.locator("#level-4").uncheck()
    assert "level=1%2C2%2C3" in level_info.value.url or "level=1,2,3" in level_info.value.url
    assert len(map_page.requests) > before
    map_page.idle()
    map_page.page.wait_for_function(
        "document.querySelectorAll('#stats-chart text.stats-label').length === 6")
    assert map_page.errors == []


def test_click_on_a_risk_point_opens_its_card_and_draws_the_nearest_route(
        map_page: MapPage, engine: Engine):
    point = _isolated_risk_point(engine)
    map_page.open()
    map_page.jump(point["lon"], point["lat"], 16)
    map_page.click_lonlat(point["lon"], point["lat"])
    card = map_page.page.locator(f"#card .card-title[data-risk-point='{point['id']}']")
    card.wait_for()
    assert card.inner_text() == point["name"]
    assert map_page.page.locator("#card code[data-unit='grid']").inner_text() == \
        point["grid_code"]
    assert point["plan_title"] in map_page.page.locator("#card .plan-title").inner_text()
    assert map_page.page.locator("#card ol.teams li").count() >= 1
    map_page.screenshot("risk-point-card.png")

    first_team = int(map_page.page.locator("#card ol.teams li").first.get_attribute(
        "data-team-id"))
    map_page.page.locator("#route-button").click()
    map_page.page.wait_for_function(
        "async () => (await window.__twinMap.getSource('twin-route').getData())"
        ".features.length === 1")
    route = map_page.source_features("twin-route")[0]
    assert route["geometry"]["type"] == "LineString"
    assert route["properties"]["team_id"] == first_team
    with engine.connect() as conn:
        team = conn.execute(text("SELECT ST_X(geom), ST_Y(geom) FROM response_teams "
                                 "WHERE id = :id"), {"id": first_team}).one()
    coordinates = route["geometry"]["coordinates"]
    assert _metres(coordinates[0], list(team)) < 1.0
    assert _metres(coordinates[-1], [point["lon"], point["lat"]]) < 1.0
    map_page.idle()
    drawn = map_page.page.evaluate(
        "window.__twinMap.queryRenderedFeatures({layers: ['twin-route-line']}).length")
    assert drawn > 0
    map_page.screenshot("nearest-team-route.png")
    assert map_page.errors == []


def test_click_anywhere_locates_the_spot_and_draws_reach(map_page: MapPage, engine: Engine):
    # A spot inside a grid cell with no risk point within ~300 m of it.
    with engine.connect() as conn:
        row = conn.execute(text("""
            SELECT g.code, ST_AsBinary(g.geom) AS geom,
                   ST_X(ST_PointOnSurface(g.geom)) AS lon, ST_Y(ST_PointOnSurface(g.geom)) AS lat
              FROM admin_units AS g
             WHERE g.level = 'grid' AND NOT EXISTS (
                   SELECT 1 FROM risk_points AS r
                    WHERE ST_DWithin(r.geom, ST_PointOnSurface(g.geom), 0.003))
             ORDER BY g.code LIMIT 1
        """)).mappings().one()
    spot = (row["lon"], row["lat"])
    assert wkb.loads(bytes(row["geom"])).contains(Point(spot))
    map_page.open()
    map_page.jump(*spot, 14)
    map_page.click_lonlat(*spot)
    grid = map_page.page.locator("#card code[data-unit='grid']")
    grid.wait_for()
    assert grid.inner_text() == row["code"]
    map_page.page.wait_for_function(
        "async () => (await window.__twinMap.getSource('twin-reach').getData())"
        ".features.length === 3", timeout=60_000)
    areas = {f["properties"]["minutes"]: shape(f["geometry"])
             for f in map_page.source_features("twin-reach")}
    assert sorted(areas) == [5, 10, 15]
    # Reach grows with time, and the 5-minute area holds the spot.
    assert areas[5].area <= areas[10].area <= areas[15].area
    assert areas[5].buffer(1e-9).contains(Point(spot))
    assert map_page.page.locator("#card ul.reach li").count() == 3
    map_page.idle()
    map_page.screenshot("locate-and-reach.png")
    assert map_page.errors == []


def _planted_incident(sample_dir: Path) -> dict:
    """The sample's latest planted incident (its ground truth file), drainage first."""
    incidents = json.loads((sample_dir / ANOMALY_TRUTH).read_text())["anomalies"]
    assert incidents, "the small sample plants anomaly incidents in its sensor readings"
    return max(incidents, key=lambda i: (i["network"] == "drainage", i["end"]))


def test_pipe_anomaly_panel_lists_zones_and_shows_one(map_page: MapPage, web_server: LiveServer,
                                                      sample_dir: Path):
    import httpx

    # As of the end of a planted incident (?until= in the page's address): its readings are in
    # the 24-hour window whatever readings other tests added since.
    incident = _planted_incident(sample_dir)
    window = {"network": incident["network"], "until": incident["end"]}
    answer = httpx.get(f"{web_server.url}/query/pipe-anomalies", params=window, timeout=60)
    assert answer.status_code == 200, answer.text
    zones = answer.json()["features"]
    assert incident["source_segment_id"] in [z["properties"]["source_segment_id"] for z in zones]
    map_page.page.goto(f"{map_page.base_url}/?{urlencode({'until': incident['end']})}")
    map_page.page.wait_for_function("window.__twin && window.__twin.ready")
    with map_page.page.expect_response(lambda r: "/query/pipe-anomalies" in r.url):
        map_page.page.locator("#pipe-network").select_option(incident["network"])
    buttons = map_page.page.locator("#pipe-list .zone-button")
    buttons.first.wait_for()
    assert buttons.count() == len(zones)
    strongest = max(zones, key=lambda z: z["properties"]["severity"])
    buttons.first.click()
    map_page.page.locator("#pipe-detail dl.facts").wait_for()
    assert map_page.page.locator("#pipe-detail dd").nth(2).inner_text() == \
        str(strongest["properties"]["source_segment_id"])
    shown = map_page.source_features("twin-zone")
    assert shape(shown[0]["geometry"]).equals_exact(shape(strongest["geometry"]), 1e-7)
    affected = map_page.page.evaluate(
        "window.__twinMap.getFilter('twin-affected-segments')[2][1]")
    assert sorted(affected) == sorted(strongest["properties"]["affected_segment_ids"])
    map_page.page.wait_for_function(
        "async () => (await window.__twinMap.getSource('twin-trace').getData())"
        ".features.length > 0")
    map_page.idle()
    map_page.screenshot("pipe-anomaly.png")
    assert map_page.errors == []


# Impossible metadata, as a bad upload could leave it: longitude and latitude swapped
# (latitude 106.57) and a runaway 1e9.
SWAPPED_BBOX = [29.5, 106.5, 29.6, 106.57]
RUNAWAY_BBOX = [105.28, 28.16, 1e9, 1e9]


@pytest.fixture()
def absurd_layers(engine: Engine) -> Iterator[dict[str, str]]:
    """A vector layer with a swapped bbox and a 3D layer anchored at latitude 1e9 (rows put in
    the layers table directly), and the style's grids and the client-drawn supply depots with
    runaway bboxes; every row as it was afterwards."""
    bumped = "data_version = data_version + 1, updated_at = now()"
    with engine.begin() as conn:
        saved = dict(conn.execute(text(
            "SELECT id, bbox FROM layers WHERE id IN ('grids', 'supply_depots')")).all())
        conn.execute(text(f"UPDATE layers SET bbox = :bbox, {bumped} "
                          "WHERE id IN ('grids', 'supply_depots')"), {"bbox": RUNAWAY_BBOX})
        conn.execute(text("""
            INSERT INTO layers (id, title_zh, title_en, kind, geometry_type, source_table,
                                source_filter, fields, bbox, source_crs, source_datum,
                                min_zoom, max_zoom, origin, data_version, shared, meta)
            SELECT 'web_test_swapped', '坐标颠倒的图层', 'Swapped coordinates', kind,
                   geometry_type, source_table, source_filter, fields, :bbox, source_crs,
                   source_datum, min_zoom, max_zoom, origin, 1, shared, meta
              FROM layers WHERE id = 'supply_depots'
        """), {"bbox": SWAPPED_BBOX})
        conn.execute(text("""
            INSERT INTO layers (id, title_zh, title_en, kind, geometry_type, fields, bbox,
                                source_crs, source_datum, min_zoom, max_zoom, origin,
                                data_version, shared, meta)
            VALUES ('web_test_runaway_model', '锚点错误的模型', 'Model anchored nowhere', '3d',
                    'Point', '[]', :bbox, 'EPSG:4326', 'wgs84', 0, 22, 'builtin', 1, true,
                    '{"anchor": {"lon": 106.5, "lat": 1e9, "height": 0}, "cim_level": 3}')
        """), {"bbox": RUNAWAY_BBOX})
    try:
        yield {"vector": "web_test_swapped", "model": "web_test_runaway_model"}
    finally:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM layers WHERE id IN ('web_test_swapped', "
                              "'web_test_runaway_model')"))
            for layer_id, bbox in saved.items():
                conn.execute(text(f"UPDATE layers SET bbox = :bbox, {bumped} WHERE id = :id"),
                             {"bbox": bbox, "id": layer_id})


def test_a_layer_with_impossible_metadata_does_not_break_the_map(
        map_page: MapPage, engine: Engine, absurd_layers: dict[str, str]):
    """The map once threw "Invalid LngLat latitude value" on start for one such layer."""
    warnings_seen: list[str] = []
    map_page.page.on("console", lambda m: warnings_seen.append(m.text)
                     if m.type == "warning" else None)
    collections = map_page.page.context.request.get(f"{map_page.base_url}/collections").json()
    served = {c["id"]: c["extent"]["spatial"]["bbox"] for c in collections["collections"]}
    assert served[absurd_layers["vector"]] == [SWAPPED_BBOX]  # the server does hand them out
    assert served["grids"] == [RUNAWAY_BBOX]
    map_page.open()
    assert map_page.errors == []
    assert map_page.page.locator(".fatal").count() == 0
    # A warning names each bad layer (grids through its composite tile source).
    for layer_id in (*absurd_layers.values(), "grids", "supply_depots"):
        assert any(re.search(rf"\b{layer_id}\b.*impossible", w) for w in warnings_seen), \
            (layer_id, warnings_seen)
    # Both bad layers are listed; the model has no marker (it has nowhere to stand).
    for layer_id in absurd_layers.values():
        assert map_page.page.locator(
            f"#layer-switches input[data-collection='{layer_id}']").count() == 1
    map_page.page.locator(f"#layer-switches input[data-collection='{absurd_layers['model']}']"
                          ).check()
    assert map_page.page.locator(".model-marker").count() == 0
    # The rest of the map draws, at the city's extent: the risk hexagons, district outlines
    # (from the composite source grids is part of) and the supply depots (their bbox ignored).
    with engine.connect() as conn:
        west, south, east, north = conn.execute(text(
            "SELECT ST_XMin(e), ST_YMin(e), ST_XMax(e), ST_YMax(e) FROM (SELECT "
            "ST_Extent(geom) AS e FROM admin_units WHERE level = 'district') AS d")).one()
    centre = map_page.page.evaluate("window.__twinMap.getCenter().toArray()")
    assert west < centre[0] < east and south < centre[1] < north
    map_page.idle()
    for layer in ("risk-hexagons", "districts-outline", "collection-supply_depots-circle"):
        drawn = map_page.page.evaluate(
            f"window.__twinMap.queryRenderedFeatures({{layers: ['{layer}']}}).length")
        assert drawn > 0, layer
    map_page.screenshot("map-with-absurd-layers.png")
    assert map_page.errors == []


def test_language_switch_and_3d_buildings(map_page: MapPage, engine: Engine):
    with engine.connect() as conn:
        lon, lat = conn.execute(text("SELECT ST_X(c), ST_Y(c) FROM (SELECT ST_Centroid(geom) AS c "
                                     "FROM buildings ORDER BY height_m DESC LIMIT 1) AS b")).one()
    map_page.open()
    assert map_page.page.locator("header h1").inner_text() == "城市运行风险一张图"
    map_page.page.locator("#lang").click()
    assert map_page.page.locator("header h1").inner_text() == "City operations risk map"
    assert map_page.page.locator("#level-1 + span").inner_text() == "Major"
    map_page.jump(lon, lat, 13)
    with map_page.page.expect_request(lambda r: "/tiles/buildings/15/" in r.url):
        map_page.page.locator("#toggle-3d").check()
    map_page.idle()
    assert map_page.page.evaluate("window.__twinMap.getPitch()") > 30
    extruded = map_page.page.evaluate(
        "window.__twinMap.queryRenderedFeatures({layers: ['buildings-3d']}).length")
    assert extruded > 0
    map_page.screenshot("3d-buildings-en.png")
    assert map_page.errors == []


def _sample_geojson(path: Path, centre: tuple[float, float]) -> None:
    lon, lat = centre
    features = [{"type": "Feature", "properties": {"name": f"站点{i}", "kind": "shelter"},
                 "geometry": {"type": "Point", "coordinates": [lon + i * 0.002, lat]}}
                for i in range(5)]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features},
                               ensure_ascii=False))


def test_upload_through_the_page_shows_progress_then_the_layer(
        map_page: MapPage, engine: Engine, tmp_path: Path):
    upload = tmp_path / "shelters.geojson"
    _sample_geojson(upload, _street_centre(engine, 0))
    page = _submit_upload(map_page, upload, "Web test shelters")
    page.locator("#upload-status .progress-bar").wait_for()
    page.wait_for_function(
        "['succeeded', 'failed'].includes(document.getElementById('upload-status')"
        ".dataset.state)", timeout=60_000)
    reasons = page.locator("#upload-reasons li").all_inner_texts()
    assert page.locator("#upload-status").get_attribute("data-state") == "succeeded", reasons
    assert page.locator("#upload-bar").inner_text() == "100%"
    map_page.screenshot("upload-succeeded.png")
    page.locator("#upload-show").click()
    page.locator("#map").wait_for()
    layer_id = page.locator("#upload-status").get_attribute("data-layer-id")
    page.wait_for_function("!location.hash.startsWith('#/upload')")
    checkbox = page.locator(f"#layer-switches input[data-collection='{layer_id}']")
    assert checkbox.is_checked()
    map_page.idle()
    with engine.connect() as conn:
        title = conn.execute(text("SELECT title_zh FROM layers WHERE id = :id"),
                             {"id": layer_id}).scalar_one()
    assert title == "Web test shelters"
    drawn = page.evaluate(f"window.__twinMap.queryRenderedFeatures("
                          f"{{layers: ['collection-{layer_id}-circle']}}).length")
    assert drawn == 5
    map_page.screenshot("uploaded-layer-on-map.png")
    assert map_page.errors == []



def _job_done(web_server: LiveServer, response) -> dict:
    import httpx

    assert response.status_code == 202, response.text
    job = response.json()
    for _ in range(600):
        job = httpx.get(f"{web_server.url}/jobs/{job['id']}",
                        headers={"Authorization": f"Bearer {EDITOR_KEY}"}).json()
        if job["state"] in ("succeeded", "failed"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job still {job['state']}")


def _submit_upload(map_page: MapPage, path: Path, title: str):
    """The upload page, filled in (file, title, the editor's key) and sent; returns the page."""
    map_page.open("#/upload")
    page = map_page.page
    page.locator("#upload-file").set_input_files(str(path))
    page.locator("#upload-title").fill(title)
    page.locator("#upload-key").fill(EDITOR_KEY)
    page.locator("#upload-submit").click()
    return page


def _street_centre(engine: Engine, offset: int = 1) -> tuple[float, float]:
    with engine.connect() as conn:
        return tuple(conn.execute(text(
            "SELECT ST_X(c), ST_Y(c) FROM (SELECT ST_Centroid(geom) AS c FROM admin_units "
            "WHERE level = 'street' ORDER BY code OFFSET :n LIMIT 1) AS s"), {"n": offset}).one())


def _magenta_geotiff(path: Path, centre: tuple[float, float], half: float = 0.01) -> None:
    """An RGB GeoTIFF (EPSG:4326) of pure magenta around ``centre``: easy to find on screen."""
    size = 200
    transform = from_origin(centre[0] - half, centre[1] + half, 2 * half / size, 2 * half / size)
    values = np.zeros((3, size, size), dtype="uint8")
    values[0], values[2] = 255, 255
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3,
                       dtype="uint8", crs="EPSG:4326", transform=transform) as dst:
        dst.write(values)


def _screen_rgb(map_page: MapPage, lon: float, lat: float, box: int = 12) -> np.ndarray:
    """The median colour the page shows in a small box around lon/lat (a real screenshot)."""
    x, y = map_page.page.evaluate(
        "([lon, lat]) => { const p = window.__twinMap.project([lon, lat]);"
        " const r = window.__twinMap.getCanvas().getBoundingClientRect();"
        " return [r.left + p.x, r.top + p.y]; }", [lon, lat])
    png = map_page.page.screenshot(clip={"x": x - box / 2, "y": y - box / 2, "width": box,
                                         "height": box})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with MemoryFile(png) as memory, memory.open() as image:
            pixels = image.read()[:3]
    return np.median(pixels.reshape(3, -1), axis=1)


def _is_magenta(rgb: np.ndarray) -> bool:
    return rgb[0] > 180 and rgb[2] > 180 and rgb[1] < 120


def test_raster_upload_is_drawn_and_3d_models_show_their_anchor(
        map_page: MapPage, web_server: LiveServer, engine: Engine, tmp_path: Path):
    import httpx

    centre = _street_centre(engine, 3)
    anchor = (centre[0] + 0.02, centre[1])
    glb = _job_done(web_server, httpx.post(
        f"{web_server.url}/layers", headers={"Authorization": f"Bearer {EDITOR_KEY}"},
        files={"file": ("hall.glb", minimal_glb())},
        data={"title": "指挥大厅模型", "lon": str(anchor[0]), "lat": str(anchor[1]),
              "cim_level": "4", "heading": "45"}, timeout=60))
    assert glb["state"] == "succeeded", glb
    raster = tmp_path / "magenta.tif"
    _magenta_geotiff(raster, centre)

    page = _submit_upload(map_page, raster, "Web test raster")
    page.wait_for_function("document.getElementById('upload-status').dataset.state "
                           "=== 'succeeded'", timeout=60_000)
    layer_id = page.locator("#upload-status").get_attribute("data-layer-id")
    tile = re.compile(rf"/tiles/{layer_id}/\d+/\d+/\d+\.png(\?v=\w+)?$")
    with page.expect_response(lambda r: bool(tile.search(r.url)) and r.status == 200):
        page.locator("#upload-show").click()
    map_page.idle()
    raster_layer = f"collection-{layer_id}-raster"
    assert page.evaluate(f"window.__twinMap.getLayoutProperty('{raster_layer}', "
                         "'visibility')") == "visible"
    assert page.locator(f"#layer-switches input[data-collection='{layer_id}']").is_checked()
    # The oracle is the screen: magenta where the raster lies, and not once it is hidden.
    assert _is_magenta(_screen_rgb(map_page, *centre)), _screen_rgb(map_page, *centre)
    map_page.screenshot("uploaded-raster-on-map.png")
    page.locator(f"#layer-switches input[data-collection='{layer_id}']").uncheck()
    map_page.idle()
    assert not _is_magenta(_screen_rgb(map_page, *centre))

    # The 3D model: listed, and once switched on a marker at its anchor with its CIM level.
    model_switch = page.locator(f"#layer-switches input[data-collection='{glb['layer_id']}']")
    assert model_switch.get_attribute("data-kind") == "3d"
    model_switch.check()
    marker = page.locator(f".model-marker[data-layer-id='{glb['layer_id']}']")
    marker.wait_for()
    assert marker.inner_text().replace("\n", " ").endswith("指挥大厅模型 · CIM4")
    box = marker.locator(".model-icon").bounding_box()
    x, y = page.evaluate(
        "([lon, lat]) => { const p = window.__twinMap.project([lon, lat]);"
        " const r = window.__twinMap.getCanvas().getBoundingClientRect();"
        " return [r.left + p.x, r.top + p.y]; }", list(anchor))
    # The marker stands on its anchor: bottom-centre of the marker element.
    element = marker.bounding_box()
    assert abs(element["x"] + element["width"] / 2 - x) < 2
    assert abs(element["y"] + element["height"] - y) < 2 and box["y"] < y
    map_page.screenshot("3d-model-anchor.png")
    assert map_page.errors == []


def _shapefile_without_prj(folder: Path, centre: tuple[float, float]) -> bytes:
    """Three points in CGCS2000 / 3-degree Gauss-Kruger zone 36 (EPSG:4524), no .prj."""
    to_gk = Transformer.from_crs("EPSG:4326", "EPSG:4524", always_xy=True)
    lons = [centre[0] + i * 0.003 for i in range(3)]
    xs, ys = to_gk.transform(lons, [centre[1]] * 3)
    frame = gpd.GeoDataFrame({"name": ["甲", "乙", "丙"]}, geometry=gpd.points_from_xy(xs, ys),
                             crs="EPSG:4524")
    folder.mkdir(parents=True, exist_ok=True)
    frame.to_file(folder / "survey.shp", engine="pyogrio", encoding="UTF-8")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for part in folder.iterdir():
            if part.suffix != ".prj":
                archive.write(part, part.name)
    return buffer.getvalue()


def test_missing_crs_is_asked_for_and_the_retry_lands(
        browser, web_server: LiveServer, engine: Engine, tmp_path: Path):
    """On a laptop screen: a Shapefile without .prj fails, the page asks for the CRS,
    the retry with EPSG:4524 publishes the points where they belong."""
    centre = _street_centre(engine, 5)
    upload = tmp_path / "survey.zip"
    upload.write_bytes(_shapefile_without_prj(tmp_path / "shp", centre))
    context = browser.new_context(viewport=LAPTOP, locale="zh-CN")
    map_page = MapPage(context.new_page(), web_server.url)
    try:
        page = _submit_upload(map_page, upload, "Web test survey")
        prompt = page.locator("#crs-prompt")
        prompt.wait_for(state="visible", timeout=60_000)
        assert page.locator("#upload-status").get_attribute("data-state") == "failed"
        assert ".prj" in page.locator("#upload-reasons").inner_text()
        assert prompt.is_visible() and page.locator("#crs-prompt-retry").is_visible()
        map_page.screenshot("laptop-crs-prompt.png")
        page.locator("#crs-prompt-select").select_option("EPSG:4524")
        page.locator("#crs-prompt-retry").click()
        page.wait_for_function("document.getElementById('upload-status').dataset.state "
                               "=== 'succeeded'", timeout=60_000)
        assert prompt.is_hidden()
        layer_id = page.locator("#upload-status").get_attribute("data-layer-id")
        with engine.connect() as conn:
            lons = conn.execute(text(f'SELECT ST_X(geom) FROM "upload_{layer_id}_v1" '
                                     "ORDER BY 1")).scalars().all()
            crs = conn.execute(text("SELECT source_crs FROM layers WHERE id = :id"),
                               {"id": layer_id}).scalar_one()
        assert crs == "EPSG:4524"
        assert [round(lon, 6) for lon in lons] == [round(centre[0] + i * 0.003, 6)
                                                   for i in range(3)]
        page.locator("#upload-show").click()
        page.wait_for_function("!location.hash.startsWith('#/upload')")
        map_page.idle()
        drawn = page.evaluate(f"window.__twinMap.queryRenderedFeatures("
                              f"{{layers: ['collection-{layer_id}-circle']}}).length")
        assert drawn == 3
        map_page.screenshot("laptop-uploaded-layer.png")
        assert map_page.errors == []
    finally:
        context.close()

"""The command hall's 3D view (web/src/view3d.ts: CesiumJS) in a real browser.

Debian's chromium driven by Playwright, WebGL on SwiftShader, against a live twin on the small
sample city: twin's quantized-mesh terrain, its 3D Tiles of the buildings and the features API.
Oracles come from the database (a building's id and footprint, the risk points in a box) and
the DEM files (the ground under a building), never from the page itself. One page serves the
module (opening CesiumJS on software GL takes a while); each test puts the camera where it
needs it. Screenshots go to tests/artifacts/.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from urllib.parse import urlsplit

import numpy as np
import pytest
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile
from sqlalchemy import Engine, text

from tests.servers import LiveServer
from tests.tiles3d import dem_ground
from tests.webpages import artifact, chromium, need_built_web

# Small: SwiftShader draws every pixel on the CPU.
VIEWPORT = {"width": 1000, "height": 700}
TIMEOUT_MS = 180_000
# The 3D requests whose every answer must be a success (tiles, subtrees, terrain).
TILE_PATHS = ("/3dtiles/", "/quantized-mesh/")
# Where the 2D map looks when the 3D view first opens: the central city, buildings in view.
# "Nothing else near" in degrees (indexed ST_DWithin on the 4326 columns): at least 40 m and
# 60 m at the city's latitude (a degree of longitude is ~97 km there).
NEAR_DEG = 0.0005
FAR_DEG = 0.0007
START = {"lon": 106.55, "lat": 29.56, "zoom": 14.0, "bearing": 30.0, "pitch": 40.0}


class GlobePage:
    """The app on one page, switched to 3D; records requests, answers and errors."""

    def __init__(self, page, base_url: str):
        self.page = page
        self.base_url = base_url
        self.page_errors: list[str] = []
        self.console_errors: list[str] = []
        self.requests: list[str] = []
        self.answers: list[tuple[int, str]] = []
        self.failed: list[str] = []
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        page.on("console",
                lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        page.on("request", lambda r: self.requests.append(r.url))
        page.on("response", lambda r: self.answers.append((r.status, r.url)))
        page.on("requestfailed", lambda r: self.failed.append(f"{r.url}: {r.failure}"))
        page.set_default_timeout(TIMEOUT_MS)

    def open(self) -> GlobePage:
        self.page.goto(f"{self.base_url}/")
        self.page.wait_for_function("window.__twin && window.__twin.ready")
        self.jump_2d(START)
        self.switch()
        self.page.wait_for_function("window.__twin3d.mode === '3d' && window.__twin3d.view")
        self.settle()
        return self

    def jump_2d(self, view: dict) -> None:
        self.page.evaluate(
            "(v) => window.__twinMap.jumpTo({center: [v.lon, v.lat], zoom: v.zoom, "
            "bearing: v.bearing, pitch: v.pitch})", view)
        self.page.wait_for_function(
            "window.__twinMap.loaded() && !window.__twinMap.isMoving()")

    def view_2d(self) -> dict:
        return self.page.evaluate(
            "(() => { const m = window.__twinMap; const c = m.getCenter(); return {lon: c.lng,"
            " lat: c.lat, zoom: m.getZoom(), bearing: m.getBearing(), pitch: m.getPitch()}; })()")

    def switch(self) -> None:
        self.page.locator("#view-switch").click()
        self.page.wait_for_function("!window.__twin3d.switching")

    def settle(self) -> None:
        """Until a frame drawn now shows every terrain and building tile asked for."""
        self.page.evaluate("window.__twin3d.view.settled()")

    def camera(self, lon: float, lat: float, height: float, heading: float = 0,
               pitch: float = -90) -> None:
        self.page.evaluate("([lon, lat, h, heading, pitch]) => "
                           "window.__twin3d.view.setCamera(lon, lat, h, heading, pitch)",
                           [lon, lat, height, heading, pitch])
        # The camera's moveEnd reloads the risk points of the new view.
        self.settle()

    def canvas_centre(self) -> tuple[float, float, float, float]:
        """Page x, y of the 3D canvas's centre, and the centre in canvas pixels."""
        return self.page.evaluate(
            "(() => { const c = window.__twin3d.view.viewer.scene.canvas;"
            " const r = c.getBoundingClientRect();"
            " return [r.left + r.width / 2, r.top + r.height / 2, r.width / 2, r.height / 2];"
            " })()")

    def screenshot(self, name: str) -> bytes:
        png = self.page.locator("#globe-view").screenshot()
        artifact(name).write_bytes(png)
        return png


@pytest.fixture(scope="module")
def globe(server: LiveServer) -> Iterator[GlobePage]:
    need_built_web()
    with chromium() as browser:
        context = browser.new_context(viewport=VIEWPORT, locale="zh-CN")
        yield GlobePage(context.new_page(), server.url).open()
        context.close()


def _lone_building(engine: Engine) -> dict:
    """A large LOD1/LOD2 building (no model replaces it) with no other building within 40 m
    and no risk point within 60 m: a click on its middle can only hit it."""
    with engine.connect() as conn:
        row = conn.execute(text("""
            SELECT b.id, b.height_m, b.cim_level,
                   ST_X(ST_PointOnSurface(b.geom)) AS lon, ST_Y(ST_PointOnSurface(b.geom)) AS lat,
                   ST_AsBinary(b.geom) AS footprint
              FROM buildings AS b
             WHERE b.cim_level IN (2, 3) AND ST_Area(b.geom::geography) > 1500
               AND NOT EXISTS (SELECT 1 FROM buildings AS o WHERE o.id <> b.id
                                  AND ST_DWithin(o.geom, b.geom, :near_deg))
               AND NOT EXISTS (SELECT 1 FROM risk_points AS r
                                WHERE ST_DWithin(r.geom, b.geom, :far_deg))
             ORDER BY ST_Area(b.geom::geography) DESC, b.id LIMIT 1
        """), {"near_deg": NEAR_DEG, "far_deg": FAR_DEG}).mappings().one()
    from shapely import wkb

    corners = np.asarray(wkb.loads(bytes(row["footprint"])).exterior.coords)
    ground = float(np.nanmin(dem_ground(engine, corners[:, 0], corners[:, 1])))
    return {**row, "roof": ground + row["height_m"]}


def _lone_risk_point(engine: Engine) -> dict:
    """A risk point with no other point and no building within 60 m (on open ground)."""
    with engine.connect() as conn:
        row = conn.execute(text("""
            SELECT r.id, r.level, ST_X(r.geom) AS lon, ST_Y(r.geom) AS lat
              FROM risk_points AS r
             WHERE ST_X(r.geom) BETWEEN 106.3 AND 106.8 AND ST_Y(r.geom) BETWEEN 29.3 AND 29.8
               AND NOT EXISTS (SELECT 1 FROM risk_points AS o WHERE o.id <> r.id
                                  AND ST_DWithin(o.geom, r.geom, :far_deg))
               AND NOT EXISTS (SELECT 1 FROM buildings AS b
                                WHERE ST_DWithin(b.geom, r.geom, :far_deg))
             ORDER BY r.level, r.id LIMIT 1
        """), {"far_deg": FAR_DEG}).mappings().one()
    ground = float(dem_ground(engine, np.array([row["lon"]]), np.array([row["lat"]]))[0])
    return {**row, "ground": ground}


def test_3d_view_loads_offline_with_every_tile(globe: GlobePage):
    """Switched from the 2D map: terrain and building tiles all answered, nothing but twin
    asked, no page error, the tileset's tiles loaded, a picture that is not blank."""
    assert globe.page_errors == []
    assert globe.console_errors == [], globe.console_errors
    assert globe.failed == []
    # Only twin, on loopback (no Cesium ion, no imagery, no CDN).
    hosts = {urlsplit(url).hostname for url in globe.requests
             if not url.startswith(("data:", "blob:"))}
    assert hosts == {"127.0.0.1"}, hosts
    tiles = [(status, url) for status, url in globe.answers
             if any(part in url for part in TILE_PATHS)]
    assert [t for t in tiles if t[0] not in (200, 304)] == []
    paths = [urlsplit(url).path for _, url in tiles]
    assert any(p.endswith("/buildings/3dtiles/tileset.json") for p in paths), paths
    assert any(p.endswith(".subtree") for p in paths), paths
    assert any(p.endswith(".glb") for p in paths), paths
    assert any(p.endswith("/terrain/quantized-mesh/layer.json") for p in paths), paths
    assert any(p.endswith(".terrain") for p in paths), paths
    # Cesium's workers and assets come from our own build.
    assert any("/assets/cesium/Workers/" in url for url in globe.requests)
    state = globe.page.evaluate(
        "(() => { const v = window.__twin3d.view; return {error: v.tilesetError,"
        " loaded: v.tileset && v.tileset.tilesLoaded, fallback: v.terrainFallback}; })()")
    assert state["loaded"] is True, state
    assert state["fallback"] is False and state["error"] is None, state
    png = globe.screenshot("globe-overview.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with MemoryFile(png) as memory, memory.open() as image:
            pixels = image.read()[:3].astype(np.float64)  # RGB bands of the PNG
    assert pixels.std() > 12, "the 3D view is (nearly) one colour"
    assert len(np.unique(pixels.reshape(3, -1), axis=1).T) > 200


def test_risk_points_of_the_view_match_the_database(globe: GlobePage, engine: Engine):
    """Close to the ground the view draws the risk points inside its rectangle and says how
    many; higher up it draws none and says to come closer."""
    globe.camera(106.55, 29.56, 6000)
    shown = globe.page.evaluate(
        "(() => { const v = window.__twin3d.view; return {box: v.viewBox(), risk: v.riskShown,"
        " drawn: v.risk.length, label: document.getElementById('globe-status').dataset.shown};"
        " })()")
    west, south, east, north = shown["box"]
    with engine.connect() as conn:
        expected = conn.execute(text(
            "SELECT count(*) FROM risk_points WHERE geom && ST_MakeEnvelope(:w, :s, :e, :n, 4326)"),
            {"w": round(west, 6), "s": round(south, 6), "e": round(east, 6),
             "n": round(north, 6)}).scalar_one()
    assert expected > 0
    assert shown["risk"]["matched"] == expected
    assert shown["drawn"] == shown["risk"]["shown"] == min(expected, 2000)
    assert shown["label"] == str(shown["drawn"])
    globe.camera(106.55, 29.56, 80_000)
    far = globe.page.evaluate("(() => { const v = window.__twin3d.view;"
                              " return [v.riskShown, v.risk.length]; })()")
    assert far == [None, 0]
    assert "放大" in globe.page.locator("#globe-status").inner_text()


def test_picking_the_middle_of_a_building_returns_its_id(globe: GlobePage, engine: Engine):
    building = _lone_building(engine)
    # Straight down, 150 m above its roof (the DEM ground plus its height).
    globe.camera(building["lon"], building["lat"], building["roof"] + 150)
    page_x, page_y, x, y = globe.canvas_centre()
    picked = globe.page.evaluate("([x, y]) => window.__twin3d.view.pickAt(x, y)", [x, y])
    assert picked.get("building", {}).get("id") == building["id"], picked
    assert picked["building"]["cim_level"] == building["cim_level"]
    assert picked["building"]["height"] == pytest.approx(building["height_m"], abs=0.01)
    # A click there opens the building's card.
    globe.page.mouse.click(page_x, page_y)
    title = globe.page.locator(f"#card h2[data-building='{building['id']}']")
    title.wait_for()
    assert globe.page.locator("#card [data-building-id]").inner_text() == str(building["id"])
    globe.screenshot("globe-building.png")


def test_a_risk_point_stands_on_the_ground_and_opens_its_card(globe: GlobePage,
                                                               engine: Engine):
    point = _lone_risk_point(engine)
    globe.camera(point["lon"], point["lat"], point["ground"] + 400)
    page_x, page_y, x, y = globe.canvas_centre()
    picked = globe.page.evaluate("([x, y]) => window.__twin3d.view.pickAt(x, y)", [x, y])
    assert picked.get("riskPoint") == point["id"], picked
    # Clamped: its billboard sits on the terrain, at the DEM's height (within the mesh's
    # error and a DEM pixel's slope).
    height = globe.page.evaluate(
        "(id) => { const v = window.__twin3d.view; for (let i = 0; i < v.risk.length; i++) {"
        " const b = v.risk.get(i); if (b.id.riskPoint === id) { const c ="
        " window.__twin3d.view.viewer.scene.globe.ellipsoid.cartesianToCartographic("
        "b._clampedPosition || b.position); return c.height; } } return null; }", point["id"])
    assert height == pytest.approx(point["ground"], abs=15)
    globe.page.mouse.click(page_x, page_y)
    globe.page.locator(f"#card h2[data-risk-point='{point['id']}']").wait_for()


def test_cim_grades_reload_the_tileset(globe: GlobePage, engine: Engine):
    building = _lone_building(engine)
    grade = building["cim_level"]
    others = [g for g in (2, 3, 4, 5, 6) if g != grade]
    globe.camera(building["lon"], building["lat"], building["roof"] + 150)
    with globe.page.expect_response(lambda r: "/3dtiles/tileset.json" in r.url) as answer:
        globe.page.locator(f"#cim-{grade}").uncheck()
    assert answer.value.status == 200
    assert f"cim={','.join(map(str, others))}" in answer.value.url.replace("%2C", ",")
    globe.settle()
    _, _, x, y = globe.canvas_centre()
    assert globe.page.evaluate("([x, y]) => window.__twin3d.view.pickAt(x, y)", [x, y]) == {}
    globe.page.locator(f"#cim-{grade}").check()
    globe.page.wait_for_function("window.__twin3d.view.tileset !== null")
    globe.settle()
    picked = globe.page.evaluate("([x, y]) => window.__twin3d.view.pickAt(x, y)", [x, y])
    assert picked.get("building", {}).get("id") == building["id"]
    # Colour by CIM grade: the style changes, the picture still shows the building.
    globe.page.locator("#building-colour").select_option("cim")
    globe.settle()
    assert globe.page.evaluate("window.__twin3d.view.colourMode") == "cim"


def _metres(a: dict, b: dict) -> float:
    lat = math.radians((a["lat"] + b["lat"]) / 2)
    return math.hypot(math.radians(b["lon"] - a["lon"]) * math.cos(lat) * 6_371_000,
                      math.radians(b["lat"] - a["lat"]) * 6_371_000)


def test_switching_2d_3d_2d_keeps_the_place(globe: GlobePage):
    if globe.page.evaluate("window.__twin3d.mode") == "3d":
        globe.switch()
    place = {"lon": 106.58, "lat": 29.55, "zoom": 15.2, "bearing": -35.0, "pitch": 50.0}
    globe.jump_2d(place)
    globe.switch()
    assert globe.page.evaluate("window.__twin3d.mode") == "3d"
    globe.settle()
    # The 3D camera looks at the same ground point, along the same bearing and pitch.
    seen = globe.page.evaluate("window.__twin3d.view.mapView()")
    assert _metres(seen, place) < 5, seen
    assert seen["zoom"] == pytest.approx(place["zoom"], abs=0.02)
    assert seen["bearing"] == pytest.approx(place["bearing"], abs=0.1)
    assert seen["pitch"] == pytest.approx(place["pitch"], abs=0.1)
    globe.switch()
    assert globe.page.evaluate("window.__twin3d.mode") == "2d"
    assert globe.page.locator("#map").is_visible()
    back = globe.view_2d()
    assert _metres(back, place) < 5, back
    assert back["zoom"] == pytest.approx(place["zoom"], abs=0.02)
    assert back["bearing"] == pytest.approx(place["bearing"], abs=0.1)
    assert back["pitch"] == pytest.approx(place["pitch"], abs=0.1)
    # The language switch names the view switch in English too.
    globe.page.locator("#lang").click()
    assert globe.page.locator("#view-switch").inner_text() == "3D view"
    globe.page.locator("#lang").click()
    assert globe.page.locator("#view-switch").inner_text() == "三维视图"
    assert globe.page_errors == []

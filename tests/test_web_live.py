"""The living map (issue 14) in two real browsers on one server: what one page does, the other
sees through the push stream, without a reload.

Debian's chromium driven by Playwright (as tests/test_web.py) on the built bundle (web/dist)
served by a live twin on the sample city. Two pages, each in its own browser context (its own
sessionStorage, so its own key): page A reports an event, B's panel shows it and its marker
flashes; B moves it to its next state, A's panel follows; A edits, moves, creates and deletes
risk points, B's tiles and card follow the ``layer`` and ``feature`` messages. Oracles are the
database (events, deadlines, risk_points) and shapely over the admin units' polygons, never the
page itself.

Credentials: the server reads anonymously as a planner (tests/servers.py: reporting events and
moving them need planner); editing risk points needs gis-editor, which the page gets from the
key typed into the header's key box (kept in sessionStorage, sent as a bearer header).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime

import httpx
import pytest
from shapely import wkb
from shapely.geometry import Point
from sqlalchemy import Engine, text

from tests.servers import EDITOR, EDITOR_KEY, LiveServer
from tests.webpages import BrowserPage, chromium, need_built_web
from twin.core.settings import Settings

VIEWPORT = {"width": 1280, "height": 800}
TIMEOUT_MS = 30_000
# The stream's messages reach the other page within this (they take well under a second).
PUSH_MS = 15_000
ZOOM = 16
# Drawn by the map but not what these tests look at: hidden, as SwiftShader draws every pixel
# on the CPU (a first view at zoom 16 took ~20 s with them).
HEAVY_LAYERS = ["buildings-3d", "pipe-segments", "risk-hexagons", "risk-hexagons-worst-level"]
# The page's own words (web/src/i18n.ts, zh-CN), as a person reads them.
NEED_KEY = "需要权限"
STALE = "已被他人修改"


class LivePage(BrowserPage):
    """One browser page on the map, its console errors recorded, its stream open."""

    def __init__(self, page, base_url: str):
        super().__init__(page, base_url, TIMEOUT_MS)

    def open(self) -> LivePage:
        self.page.goto(f"{self.base_url}/")
        self.page.wait_for_function("window.__twin && window.__twin.ready")
        self.page.wait_for_function("window.__twin.live.state === 'open'")
        # Gone if the page ever reloads.
        self.page.evaluate("window.__sameDocument = true")
        self.page.evaluate("(ids) => ids.forEach((id) => window.__twinMap.getLayer(id) && "
                           "window.__twinMap.setLayoutProperty(id, 'visibility', 'none'))",
                           HEAVY_LAYERS)
        self.idle()
        return self

    def problems(self, *expected: int) -> list[str]:
        """Console errors, less the browser's note of each refusal the test provoked."""
        said = [f"the server responded with a status of {status} " for status in expected]
        return [e for e in self.errors if not any(s in e for s in said)]

    def same_document(self) -> bool:
        return self.page.evaluate("window.__sameDocument === true")

    def wait_drawn(self, point_id: int, lon: float, lat: float, drawn: bool = True) -> None:
        self.page.wait_for_function(
            "([id, lon, lat, drawn]) => { const m = window.__twinMap;"
            " const p = m.project([lon, lat]);"
            " const hit = m.queryRenderedFeatures([[p.x - 8, p.y - 8], [p.x + 8, p.y + 8]],"
            " {layers: ['risk-points']}).some((f) => Number(f.id) === id);"
            " return hit === drawn && m.loaded(); }",
            arg=[point_id, lon, lat, drawn], timeout=PUSH_MS)

    def wait_event(self, event_id: int, data: str, value: str) -> None:
        """Until the panel's item of the event has ``data-<data>`` = ``value``."""
        self.page.wait_for_function(
            "([id, data, value]) => document.querySelector("
            "`#event-list li.event[data-event-id='${id}']`)?.dataset[data] === value",
            arg=[event_id, data, value], timeout=PUSH_MS)

    def submit(self, button: str, answer: str, attribute: str) -> int:
        """Clicks the form's ``button``; the id the server gave, once the page shows it as
        ``answer``'s ``attribute``."""
        self.page.locator(button).click()
        shown = self.page.locator(f"{answer}[{attribute}]")
        shown.wait_for()
        return int(shown.get_attribute(attribute))

    def wait_said(self, words: str) -> None:
        """Until the risk point card's message says ``words``."""
        self.page.wait_for_function("(t) => document.querySelector('#rp-message')?.textContent"
                                    ".includes(t)", arg=words)

    def enter_key(self, key: str) -> None:
        if self.page.locator("#key-form").is_hidden():
            self.page.locator("#key-button").click()
        self.page.locator("#key-input").fill(key)
        self.page.locator("#key-save").click()
        self.page.wait_for_function("window.__twin.live.state === 'open'")


@pytest.fixture(scope="module")
def live_server(engine: Engine, database_url: str) -> Iterator[LiveServer]:
    """Anonymous planner (tests/servers.with_test_access) and the fixture gis-editor key."""
    need_built_web()
    with LiveServer(Settings(database_url=database_url)) as live:
        yield live


@pytest.fixture(scope="module")
def pages(live_server: LiveServer) -> Iterator[tuple[LivePage, LivePage]]:
    with chromium() as browser:
        contexts = [browser.new_context(viewport=VIEWPORT, locale="zh-CN") for _ in range(2)]
        a, b = (LivePage(context.new_page(), live_server.url).open() for context in contexts)
        yield a, b
        for context in contexts:
            context.close()


def _grid_of(engine: Engine, lon: float, lat: float) -> str:
    """The grid whose polygon holds the spot, by shapely over admin_units (lowest code on an
    edge, as the server's rule)."""
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT code, ST_AsBinary(geom) AS geom FROM admin_units WHERE level = 'grid' "
            "AND geom && ST_Expand(ST_SetSRID(ST_MakePoint(:lon, :lat), 4326), 0.01)"),
            {"lon": lon, "lat": lat}).all()
    spot = Point(lon, lat)
    codes = sorted(code for code, geom in rows if wkb.loads(bytes(geom)).covers(spot))
    assert codes, f"({lon}, {lat}) lies in no grid"
    return codes[0]


@pytest.fixture(scope="module")
def scene(engine: Engine) -> dict:
    """One neighbourhood for every scenario (both pages look at it once, then their tiles are
    warm): a risk point alone within ~150 m whose spot ~60 m east is free and in a grid
    (``point``, moved there), and two free spots in grids a few hundred metres from it, no
    risk point within ~80 m (``report``: an event is reported there; ``create``: a risk point
    is created there)."""
    with engine.connect() as conn:
        point = conn.execute(text("""
            SELECT r.id, r.name, ST_X(r.geom) AS lon, ST_Y(r.geom) AS lat
              FROM risk_points AS r
             WHERE NOT EXISTS (SELECT 1 FROM risk_points AS o
                                WHERE o.id <> r.id AND ST_DWithin(o.geom, r.geom, 0.0015))
               AND EXISTS (SELECT 1 FROM admin_units AS g WHERE g.level = 'grid'
                            AND ST_Covers(g.geom, ST_Translate(r.geom, 0.0006, 0)))
             ORDER BY r.level DESC, r.id DESC LIMIT 1
        """)).mappings().one()
        spots = conn.execute(text("""
            WITH p AS (SELECT geom FROM risk_points WHERE id = :id),
                 c AS (SELECT ST_Translate(p.geom, dx * 0.001, dy * 0.001) AS geom, dx, dy
                         FROM p, generate_series(-4, 4) AS dx, generate_series(-3, 3) AS dy)
            SELECT ST_X(c.geom) AS lon, ST_Y(c.geom) AS lat
              FROM c, p
             WHERE NOT ST_DWithin(c.geom, p.geom, 0.002)
               AND NOT EXISTS (SELECT 1 FROM risk_points AS r
                                WHERE ST_DWithin(r.geom, c.geom, 0.0008))
               AND EXISTS (SELECT 1 FROM admin_units AS g
                            WHERE g.level = 'grid' AND ST_Covers(g.geom, c.geom))
             ORDER BY abs(c.dx) + abs(c.dy), c.dx, c.dy LIMIT 2
        """), {"id": point["id"]}).all()
    assert len(spots) == 2, "no free spots near the chosen risk point"
    return {"point": dict(point), "report": tuple(spots[0]), "create": tuple(spots[1]),
            "centre": (point["lon"] + 0.0003, point["lat"])}


def _look(pages: tuple[LivePage, LivePage], scene: dict) -> None:
    for page in pages:
        page.jump(*scene["centre"], ZOOM)


def _press_at(pages: tuple[LivePage, LivePage], scene: dict, spot: str,
              button: str) -> tuple[float, float]:
    """Both pages look at the scene; page A clicks the map at the scene's ``spot``, then the
    ``button`` the click offers. Returns the spot."""
    lon, lat = scene[spot]
    _look(pages, scene)
    pages[0].click_lonlat(lon, lat)
    pages[0].page.locator(button).click()
    return lon, lat


def _located(engine: Engine, row, lon: float, lat: float, within: float = 2e-5) -> None:
    """The stored row stands at (lon, lat), give or take ``within`` degrees, and its grid is
    the one whose polygon holds it."""
    assert abs(row["lon"] - lon) < within and abs(row["lat"] - lat) < within
    assert row["grid_code"] == _grid_of(engine, row["lon"], row["lat"])


def test_an_event_reported_in_one_page_appears_and_flashes_in_the_other(
        pages: tuple[LivePage, LivePage], engine: Engine, scene: dict):
    a, b = pages
    lon, lat = _press_at(pages, scene, "report", "#report-event")
    a.page.wait_for_function("document.querySelectorAll('#report-kind option').length > 0")
    kind = a.page.locator("#report-kind").input_value()
    a.page.locator("#report-description").fill("网页测试：井盖冒水")
    event_id = a.submit("#report-submit", "#report-message", "data-event-id")
    with engine.connect() as conn:
        stored = conn.execute(text(
            "SELECT kind, status, level, grid_code, ST_X(geom) AS lon, ST_Y(geom) AS lat "
            "FROM events WHERE id = :id"), {"id": event_id}).mappings().one()
        respond_due = conn.execute(text(
            "SELECT due_at FROM event_deadlines WHERE event_id = :id AND step = 'respond'"),
            {"id": event_id}).scalar_one()
    assert stored["kind"] == kind and stored["status"] == "reported" and stored["level"] == "grid"
    # The click's spot, located to its grid.
    _located(engine, stored, lon, lat)

    # Page B: in the panel through the stream, no reload; its marker pulses at the spot.
    item = b.page.locator(f"#event-list li.event[data-event-id='{event_id}']")
    item.wait_for(timeout=PUSH_MS)
    assert b.same_document()
    assert item.get_attribute("data-status") == "reported"
    assert item.get_attribute("data-level") == "grid"
    assert item.locator(".place-part[data-unit='grid']").get_attribute("title") == \
        stored["grid_code"]
    # Newest first.
    assert b.page.locator("#event-list li.event").first.get_attribute("data-event-id") == \
        str(event_id)
    countdown = item.locator(".countdown")
    assert countdown.get_attribute("data-step") == "respond"
    assert datetime.fromisoformat(countdown.get_attribute("data-due")) == respond_due
    assert "剩余" in countdown.inner_text()
    flash = b.page.locator(f".flash-marker[data-event-id='{event_id}']")
    flash.wait_for(timeout=PUSH_MS)
    # Where it settles: a layout change of the page (the panel growing) moves the canvas a
    # frame before MapLibre moves its markers with it.
    off = (float("inf"), float("inf"))
    deadline = time.monotonic() + 3
    while max(off) >= 3 and time.monotonic() < deadline:
        box = flash.bounding_box()
        x, y = b.screen(stored["lon"], stored["lat"])
        assert box is not None
        off = (abs(box["x"] + box["width"] / 2 - x), abs(box["y"] + box["height"] / 2 - y))
        if max(off) >= 3:
            b.page.wait_for_timeout(100)
    assert max(off) < 3, off
    assert "flash" in (item.get_attribute("class") or "")
    b.screenshot("live-event-flash.png")

    # A transition in B reaches A.
    item.locator("button.transition[data-to='responded']").click()
    mine = a.page.locator(f"#event-list li.event[data-event-id='{event_id}']")
    a.wait_event(event_id, "status", "responded")
    assert a.same_document()
    with engine.connect() as conn:
        status = conn.execute(text("SELECT status FROM events WHERE id = :id"),
                              {"id": event_id}).scalar_one()
        met = conn.execute(text("SELECT met_at FROM event_deadlines WHERE event_id = :id "
                                "AND step = 'respond'"), {"id": event_id}).scalar_one()
    assert status == "responded" and met is not None
    # The next deadline is now the verification's; the next button in both pages "verify".
    assert mine.locator(".countdown").get_attribute("data-step") == "verify"
    assert mine.locator("button.transition").get_attribute("data-to") == "verified"
    b.page.wait_for_function(
        "(id) => document.querySelector(`#event-list li.event[data-event-id='${id}'] "
        "button.transition`)?.dataset.to === 'verified'", arg=event_id)

    # Out of order (A's page still offers "verified"; the server moves it on first): 409 named.
    with httpx.Client(base_url=b.base_url) as client:
        moved = client.post(f"/events/{event_id}/transitions", json={"to": "verified"})
        assert moved.status_code == 200, moved.text
    a.wait_event(event_id, "status", "verified")
    assert a.problems(401, 412) == [] and b.problems(401, 412) == []


def test_a_risk_point_edited_in_one_page_moves_and_renames_in_the_other(
        pages: tuple[LivePage, LivePage], engine: Engine, scene: dict):
    a, b = pages
    point = scene["point"]
    pid, lon, lat = point["id"], point["lon"], point["lat"]
    _look(pages, scene)
    for page in (a, b):
        page.wait_drawn(pid, lon, lat)
    b.click_lonlat(lon, lat)
    b.page.locator(f"#card .card-title[data-risk-point='{pid}']").wait_for()

    a.click_lonlat(lon, lat)
    a.page.locator(f"#card .card-title[data-risk-point='{pid}']").wait_for()
    a.page.locator("#rp-edit").click()
    new_name = f"{point['name']}（已核查）"
    a.page.locator("#rp-name").fill(new_name)
    # Anonymous (planner) cannot edit: the page says so and opens the key box.
    a.page.locator("#rp-save").click()
    a.wait_said(NEED_KEY)
    assert a.page.locator("#key-form").is_visible()
    a.enter_key(EDITOR_KEY)
    # Move it: "pick a new spot", then a click on the map ~60 m east.
    a.page.locator("#rp-pick").click()
    a.click_lonlat(lon + 0.0006, lat)
    position = a.page.locator("#rp-position")
    a.page.wait_for_function(f"Number(document.querySelector('#rp-position').dataset.lon) > {lon}")
    sent = (float(position.get_attribute("data-lon")), float(position.get_attribute("data-lat")))
    assert abs(sent[0] - (lon + 0.0006)) < 2e-5 and abs(sent[1] - lat) < 2e-5
    a.page.locator("#rp-save").click()
    a.page.locator(f"#card .card-title[data-risk-point='{pid}']").wait_for()
    assert a.page.locator("#card .card-title").inner_text() == new_name

    with engine.connect() as conn:
        row = conn.execute(text(
            "SELECT name, grid_code, ST_X(geom) AS lon, ST_Y(geom) AS lat FROM risk_points "
            "WHERE id = :id"), {"id": pid}).mappings().one()
        audit = conn.execute(text("SELECT action FROM risk_point_edits WHERE risk_point_id = :id "
                                  "ORDER BY id"), {"id": pid}).scalars().all()
    assert row["name"] == new_name
    _located(engine, row, *sent, within=1e-9)
    assert audit[-1] == "update"

    # Page B: its card shows the new name, its tiles the new place (not the old one).
    b.page.wait_for_function(
        "([id, name]) => document.querySelector(`#card .card-title[data-risk-point='${id}']`)"
        "?.textContent === name", arg=[pid, new_name], timeout=PUSH_MS)
    b.wait_drawn(pid, row["lon"], row["lat"])
    b.wait_drawn(pid, lon, lat, drawn=False)
    reloads = b.page.evaluate("window.__twin.reloads")
    assert any(r["layer"] == "risk_points" and "risk_points" in r["sources"] for r in reloads)
    assert b.same_document()
    b.screenshot("live-risk-point-moved.png")

    # A lost update: B edits from the version it read; someone else writes first: 412 said.
    b.enter_key(EDITOR_KEY)
    b.page.locator("#rp-edit").click()
    with httpx.Client(base_url=b.base_url, headers=EDITOR) as client:
        other = client.patch(f"/collections/risk_points/items/{pid}",
                             content='{"properties": {"category": "其他人修改"}}',
                             headers={"Content-Type": "application/merge-patch+json"})
        assert other.status_code == 200, other.text
    b.page.locator("#rp-address").fill("测试路 1 号")
    b.page.locator("#rp-save").click()
    b.wait_said(STALE)
    b.page.locator("#rp-reload").click()
    b.page.locator(f"#card .card-title[data-risk-point='{pid}']").wait_for()
    assert "其他人修改" in b.page.locator("#card dl.facts").inner_text()
    assert a.problems(401) == [] and b.problems(412) == []
    assert any("412" in e for e in b.errors)


def test_a_risk_point_created_then_deleted_in_one_page_comes_and_goes_in_the_other(
        pages: tuple[LivePage, LivePage], engine: Engine, scene: dict):
    a, b = pages
    lon, lat = _press_at(pages, scene, "create", "#rp-create")
    a.page.locator("#rp-name").fill("网页测试新增风险点")
    a.page.locator("#rp-level").select_option("2")
    a.page.locator("#rp-category").fill("测试类别")
    a.page.locator("#rp-address").fill("测试路 2 号")
    sector = a.page.locator("#rp-sector").input_value()
    pid = a.submit("#rp-save", "#card .card-title", "data-risk-point")
    with engine.connect() as conn:
        row = conn.execute(text(
            "SELECT name, level, sector_code, grid_code, ST_X(geom) AS lon, ST_Y(geom) AS lat "
            "FROM risk_points WHERE id = :id"), {"id": pid}).mappings().one()
    assert (row["name"], row["level"], row["sector_code"]) == ("网页测试新增风险点", 2, sector)
    _located(engine, row, lon, lat)
    b.wait_drawn(pid, row["lon"], row["lat"])

    a.page.locator("#rp-delete").click()
    a.page.locator("#rp-confirm-delete").click()
    a.page.locator("#card").wait_for(state="hidden")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM risk_points WHERE id = :id"),
                            {"id": pid}).scalar_one() == 0
    b.wait_drawn(pid, row["lon"], row["lat"], drawn=False)
    assert a.same_document() and b.same_document()
    assert a.problems(401, 412) == [] and b.problems(401, 412) == []


def test_a_missed_deadline_turns_red_and_the_escalation_reaches_the_panel(
        pages: tuple[LivePage, LivePage], engine: Engine, scene: dict):
    """A kind with a 2 s respond deadline (set in this module's database): the countdown runs
    out, turns red, and the escalation grid -> street arrives through the stream."""
    a, b = pages
    lon, lat = scene["report"]
    with engine.begin() as conn:
        kind, respond_s = conn.execute(text(
            "SELECT code, respond_s FROM event_kinds ORDER BY code LIMIT 1")).one()
        conn.execute(text("UPDATE event_kinds SET respond_s = 2 WHERE code = :code"),
                     {"code": kind})
    try:
        with httpx.Client(base_url=a.base_url) as client:
            answer = client.post("/events", json={"lon": lon + 0.0002, "lat": lat, "kind": kind,
                                                  "description": "网页测试：超时升级"})
        assert answer.status_code == 201, answer.text
    finally:
        with engine.begin() as conn:
            conn.execute(text("UPDATE event_kinds SET respond_s = :s WHERE code = :code"),
                         {"s": respond_s, "code": kind})
    event_id = answer.json()["id"]
    item = b.page.locator(f"#event-list li.event[data-event-id='{event_id}']")
    item.wait_for(timeout=PUSH_MS)
    b.wait_event(event_id, "level", "street")
    with engine.connect() as conn:
        level = conn.execute(text("SELECT level FROM events WHERE id = :id"),
                             {"id": event_id}).scalar_one()
        fired = conn.execute(text(
            "SELECT fired_at FROM event_deadlines WHERE event_id = :id AND step = 'respond'"),
            {"id": event_id}).scalar_one()
    assert level == "street" and fired is not None
    countdown = item.locator(".countdown")
    assert countdown.get_attribute("data-step") == "respond"
    assert "overdue" in (countdown.get_attribute("class") or "")
    assert "已超时" in countdown.inner_text()
    assert countdown.evaluate("(e) => getComputedStyle(e).color") == "rgb(255, 82, 82)"
    assert item.locator(".event-level").inner_text() == "镇街级"
    # Escalated: it flashed again.
    assert "flash" in (item.get_attribute("class") or "")
    a.page.locator(f"#event-list li.event[data-event-id='{event_id}'][data-level='street']"
                   ).wait_for(timeout=PUSH_MS)
    b.screenshot("live-event-escalated.png")
    assert a.problems(401, 412) == [] and b.problems(401, 412) == []


def test_a_page_that_lost_its_stream_gets_what_it_missed_once(
        pages: tuple[LivePage, LivePage], engine: Engine, scene: dict):
    """B's stream goes down; an event is reported meanwhile; B reopens with a fresh ticket and
    ``last_event_id``: the missed message is replayed, once."""
    _, b = pages
    lon, lat = scene["report"]
    last = b.page.evaluate("window.__twin.live.stop(); window.__twin.live.lastId")
    assert last is not None
    with httpx.Client(base_url=b.base_url) as client:
        answer = client.post("/events", json={"lon": lon - 0.0002, "lat": lat,
                                              "kind": _a_kind(engine),
                                              "description": "网页测试：断线期间上报"})
    assert answer.status_code == 201, answer.text
    event_id = answer.json()["id"]
    assert b.page.locator(f"#event-list li.event[data-event-id='{event_id}']").count() == 0
    with b.page.expect_request(lambda r: "/events/stream?" in r.url) as opened:
        b.page.evaluate("window.__twin.live.restart()")
    assert f"last_event_id={last}" in opened.value.url
    b.page.locator(f"#event-list li.event[data-event-id='{event_id}']").wait_for(
        timeout=PUSH_MS)
    ids = b.page.evaluate("window.__twin.live.recent.map((m) => Number(m.id))")
    assert len(ids) == len(set(ids)) and ids == sorted(ids)
    with engine.connect() as conn:
        missed = conn.execute(text(
            "SELECT id FROM outbox WHERE id > :last AND kind = 'event' "
            "AND payload->>'id' = :event"), {"last": last, "event": str(event_id)}).scalars().all()
    assert missed and all(m in ids for m in missed)
    assert b.problems(401, 412) == []


def _a_kind(engine: Engine) -> str:
    with engine.connect() as conn:
        return conn.execute(text("SELECT code FROM event_kinds ORDER BY code LIMIT 1")).scalar_one()

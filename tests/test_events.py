"""Events (issue 14): located on the grid, linked, moved through their states, escalated.

Against a real server and database: where an event lands is checked against shapely over the
grid polygons (and the nesting of the codes); the linked risk points against geodesic
distances from pyproj; jurisdiction, states and ETags through the HTTP API; escalation with
an event kind of 1-2 s deadlines, watched in the database (never before the deadline, never
twice), and across a server restart on a database of the test's own (no other server can
fire its deadlines there).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import shapely
from pyproj import Geod
from sqlalchemy import Engine, create_engine, text

from tests.databases import on_own_connection
from tests.servers import LiveServer, sibling_database
from twin.core.settings import AuthSettings, EventsSettings, Settings

FAST_KIND = "test_fast"  # respond 1 s, verify 2 s, handle 2 s
SLOW_KIND = "test_slow"  # minutes: states are tested without escalations in between
GEOD = Geod(ellps="WGS84")


def keys_for(district: str, street: str, other_street: str) -> dict[str, tuple[str, str]]:
    return {
        "city": ("events-city-planner-0123456789", "planner:city-desk:city"),
        "district": ("events-district-planner-0123456789",
                     f"planner:district-desk:district={district}"),
        "street": ("events-street-planner-0123456789", f"planner:street-desk:street={street}"),
        "other": ("events-other-planner-0123456789",
                  f"planner:other-desk:street={other_street}"),
        "viewer": ("events-city-viewer-0123456789", "viewer:city-viewer:city"),
    }


def add_kinds(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("""
            INSERT INTO event_kinds (code, sector_code, name_zh, name_en, respond_s, verify_s,
                                     handle_s)
            VALUES ('test_fast', 'facility_operation', '测试（快）', 'Test (fast)', 1, 2, 2),
                   ('test_slow', 'facility_operation', '测试（慢）', 'Test (slow)', 600, 600,
                    600)
            ON CONFLICT (code) DO NOTHING
        """))


class City:
    """The sample's grid polygons and a district with two streets, read from the database."""

    def __init__(self, engine: Engine):
        with engine.connect() as conn:
            rows = conn.execute(text("""
                SELECT code, ST_AsBinary(geom) FROM admin_units WHERE level = 'grid'
                 ORDER BY code
            """)).all()
            self.grid_codes = [code for code, _ in rows]
            self.grids = shapely.from_wkb([bytes(wkb) for _, wkb in rows])
            self.district, self.street, self.other_street = conn.execute(text("""
                SELECT s1.parent_code, s1.code, s2.code
                  FROM admin_units AS s1 JOIN admin_units AS s2
                    ON s2.parent_code = s1.parent_code AND s2.code > s1.code
                 WHERE s1.level = 'street' AND s2.level = 'street'
                 ORDER BY s1.code, s2.code LIMIT 1
            """)).one()
            self.city_bounds = conn.execute(text("""
                SELECT ST_XMin(e), ST_YMin(e), ST_XMax(e), ST_YMax(e)
                  FROM (SELECT ST_Extent(geom) AS e FROM admin_units WHERE level = 'grid') AS x
            """)).one()
            self.risk_points = conn.execute(text(
                "SELECT id, ST_X(geom), ST_Y(geom) FROM risk_points ORDER BY id")).all()
        shapely.prepare(self.grids)

    def owner(self, lon: float, lat: float) -> str | None:
        """The grid holding the point (the lowest code on a shared edge), by shapely."""
        hits = np.flatnonzero(shapely.intersects(self.grids, shapely.Point(lon, lat)))
        return self.grid_codes[hits[0]] if len(hits) else None

    def inside(self, street: str) -> tuple[float, float]:
        """A point well inside a grid cell of ``street``."""
        for code, grid in zip(self.grid_codes, self.grids, strict=True):
            if code.startswith(street):
                point = shapely.get_coordinates(shapely.point_on_surface(grid))[0]
                return float(point[0]), float(point[1])
        raise AssertionError(f"no grid in street {street}")


@pytest.fixture(scope="module")
def city(engine: Engine) -> City:
    add_kinds(engine)
    return City(engine)


class Api:
    def __init__(self, client: httpx.Client, keys: dict[str, tuple[str, str]]):
        self.client = client
        self.keys = keys

    def headers(self, who: str, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who][0]}", **extra}

    def report(self, who: str, lon: float, lat: float, kind: str = SLOW_KIND,
               description: str = "测试事件") -> httpx.Response:
        return self.client.post("/events", headers=self.headers(who), json={
            "lon": lon, "lat": lat, "kind": kind, "description": description})

    def move(self, who: str, event_id: int, to: str, **headers: str) -> httpx.Response:
        return self.client.post(f"/events/{event_id}/transitions",
                                headers=self.headers(who, **headers),
                                json={"to": to, "note": f"-> {to}"})

    def get(self, who: str, path: str, **params: Any) -> httpx.Response:
        return self.client.get(path, headers=self.headers(who), params=params)


def events_settings(database_url: str, keys: dict[str, tuple[str, str]]) -> Settings:
    return Settings(database_url=database_url,
                    auth=AuthSettings(keys=dict(keys.values()), anonymous_role=""),
                    events=EventsSettings(escalation_poll_s=0.2))


@pytest.fixture(scope="class")
def api(engine: Engine, database_url: str, city: City) -> Iterator[Api]:
    keys = keys_for(city.district, city.street, city.other_street)
    with LiveServer(events_settings(database_url, keys)) as live, \
            httpx.Client(base_url=live.url, timeout=60) as client:
        yield Api(client, keys)


def history(engine: Engine, event_id: int) -> list[Any]:
    with engine.connect() as conn:
        return conn.execute(text("""
            SELECT action, from_level, to_level, step, at FROM event_history
             WHERE event_id = :id ORDER BY id
        """), {"id": event_id}).all()


def deadlines(engine: Engine, event_id: int) -> dict[str, Any]:
    with engine.connect() as conn:
        rows = conn.execute(text("""
            SELECT step, due_at, met_at, fired_at FROM event_deadlines WHERE event_id = :id
        """), {"id": event_id}).all()
    return {row.step: row for row in rows}


class TestEvents:
    def test_kinds_are_listed(self, api: Api):
        response = api.get("viewer", "/events/kinds")
        assert response.status_code == 200, response.text
        kinds = {k["code"]: k for k in response.json()["kinds"]}
        assert {"fire", "gas_leak", "waterlogging", "pipe_burst", "road_collapse"} <= set(kinds)
        assert kinds["fire"]["respond_s"] == 60 and kinds["fire"]["handle_s"] == 300
        assert len({k["sector_code"] for k in kinds.values()}) >= 7

    def test_located_like_shapely_over_the_grid_polygons(self, api: Api, city: City,
                                                         engine: Engine):
        rng = np.random.default_rng(14)
        minx, miny, maxx, maxy = city.city_bounds
        # Random spots over the municipality's bounding box (some fall outside it), plus the
        # inside of known cells.
        spots = [(float(rng.uniform(minx, maxx)), float(rng.uniform(miny, maxy)))
                 for _ in range(12)]
        spots += [city.inside(city.street), city.inside(city.other_street)]
        inside = outside = 0
        for lon, lat in spots:
            expected = city.owner(lon, lat)
            response = api.report("city", lon, lat)
            if expected is None:
                outside += 1
                assert response.status_code == 422, response.text
                assert response.json()["code"] == "OutsideMunicipality"
                continue
            inside += 1
            assert response.status_code == 201, response.text
            event = response.json()
            assert event["grid_code"] == expected
            assert (event["community_code"], event["street_code"], event["district_code"]) == (
                expected[:12], expected[:9], expected[:6])
            assert event["status"] == "reported" and event["level"] == "grid"
            assert response.headers["Location"] == f"/events/{event['id']}"
            assert response.headers["ETag"] == event["etag"]
            assert [d["step"] for d in event["deadlines"]] == ["respond", "verify", "handle"]
        assert inside >= 2
        # Far outside.
        response = api.report("city", 100.0, 20.0)
        assert response.status_code == 422 and "outside the municipality" in response.text

    def test_links_risk_points_within_the_radius(self, api: Api, city: City):
        lon, lat = city.inside(city.street)
        event = api.report("city", lon, lat).json()
        links = event["links"]
        radius = links["radius_m"]
        lons = np.array([p[1] for p in city.risk_points])
        lats = np.array([p[2] for p in city.risk_points])
        _, _, dist = GEOD.inv(np.full_like(lons, lon), np.full_like(lats, lat), lons, lats)
        order = np.argsort(dist, kind="stable")
        near = [(city.risk_points[i][0], dist[i]) for i in order if dist[i] <= radius]
        got = [(p["id"], p["distance_m"]) for p in links["risk_points"]]
        assert len(got) == min(len(near), 20)
        for (got_id, got_d), (want_id, want_d) in zip(got, near, strict=False):
            assert abs(got_d - want_d) < 0.5
            assert got_id == want_id or abs(got_d - want_d) < 0.5
        assert links["teams_by"] in ("road", "distance")
        assert len(links["teams"]) == 3
        if links["teams_by"] == "road":
            times = [t["travel_time_s"] for t in links["teams"] if t["route_status"] == "ok"]
            assert times == sorted(times)
        with_plan = [p for p in links["risk_points"] if p["plan_id"] is not None]
        if with_plan:
            severest = min(with_plan, key=lambda p: (p["level"], p["distance_m"]))
            assert links["plan"]["id"] == severest["plan_id"]

    def test_reporting_outside_ones_jurisdiction_is_403(self, api: Api, city: City):
        lon, lat = city.inside(city.street)
        response = api.report("other", lon, lat)
        assert response.status_code == 403, response.text
        body = response.json()
        assert body["code"] == "OutsideJurisdiction"
        assert f"street={city.other_street}" in body["description"]
        assert city.street in body["description"]
        # A viewer may not report at all.
        assert api.report("viewer", lon, lat).status_code == 403
        # Unknown kind: 422 naming the kinds.
        response = api.report("street", lon, lat, kind="alien_invasion")
        assert response.status_code == 422 and "gas_leak" in response.json()["description"]

    def test_states_in_order_scope_and_etags(self, api: Api, city: City, engine: Engine):
        lon, lat = city.inside(city.street)
        created = api.report("street", lon, lat)
        assert created.status_code == 201, created.text
        event = created.json()
        event_id = event["id"]
        # Another street's centre: as if it did not exist, for reads and moves.
        assert api.get("other", f"/events/{event_id}").status_code == 404
        assert api.move("other", event_id, "responded").status_code == 404
        listed = api.get("other", "/events", limit=1000).json()
        assert event_id not in {f["id"] for f in listed["features"]}
        # Its district and the city see it.
        for who in ("district", "city", "street"):
            listed = api.get(who, "/events", limit=1000).json()
            assert event_id in {f["id"] for f in listed["features"]}, who
        # Out of order: 409 naming the allowed one.
        response = api.move("street", event_id, "verified")
        assert response.status_code == 409
        assert "'responded'" in response.json()["description"]
        # Stale If-Match: 412; the current one passes.
        etag = api.get("street", f"/events/{event_id}").headers["ETag"]
        assert etag == event["etag"]
        ok = api.move("street", event_id, "responded", **{"If-Match": etag})
        assert ok.status_code == 200, ok.text
        assert ok.headers["ETag"] != etag
        stale = api.move("district", event_id, "verified", **{"If-Match": etag})
        assert stale.status_code == 412, stale.text
        for who, to in (("district", "verified"), ("city", "handled"), ("street", "closed")):
            response = api.move(who, event_id, to)
            assert response.status_code == 200, response.text
        final = api.get("viewer", f"/events/{event_id}").json()
        assert final["status"] == "closed" and final["closed_at"] is not None
        assert final["version"] == 5
        assert [h["to_status"] for h in final["history"]] == [
            "reported", "responded", "verified", "handled", "closed"]
        assert all(d["met_at"] is not None and d["fired_at"] is None
                   for d in final["deadlines"])
        response = api.move("city", event_id, "closed")
        assert response.status_code == 409 and "final" in response.json()["description"]
        # Filters.
        closed = api.get("viewer", "/events", status="closed", limit=1000).json()
        assert event_id in {f["id"] for f in closed["features"]}
        assert all(f["properties"]["status"] == "closed" for f in closed["features"])
        assert api.get("viewer", "/events", status="nonsense").status_code == 400
        box = f"{lon - 0.001},{lat - 0.001},{lon + 0.001},{lat + 0.001}"
        boxed = api.get("viewer", "/events", bbox=box, limit=1000).json()
        assert event_id in {f["id"] for f in boxed["features"]}
        # Every change pushed to the event's grid, in order.
        with engine.connect() as conn:
            messages = conn.execute(text("""
                SELECT payload, area_codes FROM outbox
                 WHERE kind = 'event' AND (payload->>'id')::bigint = :id ORDER BY id
            """), {"id": event_id}).all()
        assert [m.payload["status"] for m in messages] == [
            "reported", "responded", "verified", "handled", "closed"]
        assert all(m.area_codes == [event["grid_code"]] for m in messages)

    def test_a_write_bumps_the_layer_version(self, api: Api, city: City, engine: Engine):
        def version() -> int | None:
            with engine.connect() as conn:
                return conn.execute(text(
                    "SELECT data_version FROM layers WHERE id = 'events'")).scalar()
        before = version()
        assert before is not None, "the events layer is registered"
        lon, lat = city.inside(city.street)
        assert api.report("street", lon, lat).status_code == 201
        assert version() == before + 1

    def test_missed_deadlines_escalate_once_never_early(self, api: Api, city: City,
                                                        engine: Engine):
        lon, lat = city.inside(city.street)
        started = time.monotonic()
        fast = api.report("street", lon, lat, kind=FAST_KIND).json()
        kept = api.report("street", lon, lat, kind=FAST_KIND).json()
        # One responds in time: its respond step is met and never fires.
        assert api.move("street", kept["id"], "responded").status_code == 200
        time.sleep(max(0.0, 0.6 - (time.monotonic() - started)))
        before = deadlines(engine, fast["id"])
        assert all(d.fired_at is None for d in before.values()), "fired before its deadline"
        assert api.get("street", f"/events/{fast['id']}").json()["level"] == "grid"
        # Every step missed by 2 s: wait until all fired (or give up at 6 s).
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            rows = deadlines(engine, fast["id"])
            if all(d.fired_at is not None for d in rows.values()):
                break
            time.sleep(0.1)
        rows = deadlines(engine, fast["id"])
        for step, row in rows.items():
            assert row.fired_at is not None, step
            assert row.due_at <= row.fired_at, f"{step} fired early"
            lateness = (row.fired_at - row.due_at).total_seconds()
            assert lateness < 2.0, f"{step} fired {lateness:.2f} s late"
        time.sleep(1.0)  # nothing more happens
        steps = history(engine, fast["id"])
        escalations = [(h.from_level, h.to_level, h.step) for h in steps
                       if h.action == "escalated"]
        assert escalations == [("grid", "street", "respond"), ("street", "district", "verify"),
                               ("district", "city", "handle")]
        event = api.get("viewer", f"/events/{fast['id']}").json()
        assert event["level"] == "city" and event["version"] == 4
        # The kept one: respond met, verify and handle fired (grid -> street -> district).
        kept_rows = deadlines(engine, kept["id"])
        assert kept_rows["respond"].met_at is not None
        assert kept_rows["respond"].fired_at is None
        kept_steps = [h.step for h in history(engine, kept["id"]) if h.action == "escalated"]
        assert kept_steps == ["verify", "handle"]
        # Escalations are pushed.
        with engine.connect() as conn:
            pushed = conn.execute(text("""
                SELECT payload->>'step' FROM outbox WHERE kind = 'event'
                   AND (payload->>'id')::bigint = :id AND payload->>'action' = 'escalated'
                 ORDER BY id
            """), {"id": fast["id"]}).scalars().all()
        assert pushed == ["respond", "verify", "handle"]


def _copy_city_part(engine: Engine, target_url: str, street: str) -> None:
    """One street's admin units (and its district) into a fresh database, with a kind."""
    with engine.connect() as conn:
        rows = conn.execute(text("""
            SELECT code, level, parent_code, name_zh, name_en, kind, population, area_km2,
                   ST_AsEWKB(geom) AS geom
              FROM admin_units
             WHERE code = left(:street, 6) OR code LIKE :prefix
             ORDER BY length(code), code
        """), {"street": street, "prefix": f"{street}%"}).mappings().all()
    target = create_engine(target_url)
    try:
        with target.begin() as conn:
            for row in rows:
                parent = row["parent_code"] if row["level"] != "district" else None
                conn.execute(text("""
                    INSERT INTO admin_units (code, level, parent_code, name_zh, name_en, kind,
                                             population, area_km2, geom)
                    VALUES (:code, :level, :parent, :name_zh, :name_en, :kind, :population,
                            :area_km2, ST_GeomFromEWKB(:geom))
                """), {**row, "parent": parent, "geom": bytes(row["geom"])})
        add_kinds(target)
        with target.begin() as conn:
            conn.execute(text("""
                INSERT INTO event_kinds (code, sector_code, name_zh, name_en, respond_s,
                                         verify_s, handle_s)
                VALUES ('test_restart', 'facility_operation', '测试', 'Test', 2, 600, 600)
            """))
    finally:
        target.dispose()


def test_overdue_deadlines_fire_soon_after_a_server_starts(engine: Engine, database_url: str,
                                                          city: City):
    """On a database of its own (the suite's servers escalate on the shared one): a deadline
    that passed while no server ran fires within seconds of the next server's start."""
    keys = keys_for(city.district, city.street, city.other_street)
    with sibling_database(database_url, "events_restart") as url:
        _copy_city_part(engine, url, city.street)
        lon, lat = city.inside(city.street)
        settings = events_settings(url, keys)
        with LiveServer(settings) as first, httpx.Client(base_url=first.url) as client:
            created = client.post("/events", headers={
                "Authorization": f"Bearer {keys['street'][0]}"}, json={
                "lon": lon, "lat": lat, "kind": "test_restart", "description": "重启测试"})
            assert created.status_code == 201, created.text
            event = created.json()
        check = create_engine(url)
        try:
            def respond() -> Any:
                with check.connect() as conn:
                    return conn.execute(text("""
                        SELECT due_at, fired_at, clock_timestamp() AS now FROM event_deadlines
                         WHERE event_id = :id AND step = 'respond'
                    """), {"id": event["id"]}).one()
            row = respond()
            assert row.fired_at is None and row.now < row.due_at, "the first server was slow"
            wait = (row.due_at - row.now).total_seconds() + 1.0
            time.sleep(wait)
            row = respond()
            assert row.fired_at is None and row.now > row.due_at  # overdue, nobody running
            with LiveServer(settings) as second, httpx.Client(base_url=second.url) as client:
                started = time.monotonic()
                while respond().fired_at is None:
                    assert time.monotonic() - started < 5, "not fired within 5 s of start-up"
                    time.sleep(0.05)
                # The database drops every connection of the server (as in a restart): the
                # loop logs, reconnects and goes on firing.
                with check.connect() as conn:
                    conn.execute(text("""
                        SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                         WHERE datname = current_database() AND pid <> pg_backend_pid()
                    """))
                later = None
                for _ in range(20):  # the pool notices the dead connections at checkout
                    answer = client.post("/events", headers={
                        "Authorization": f"Bearer {keys['street'][0]}"}, json={
                        "lon": lon, "lat": lat, "kind": "test_restart", "description": "再次"})
                    if answer.status_code == 201:
                        later = answer.json()
                        break
                    assert answer.status_code == 503, answer.text
                    time.sleep(0.2)
                assert later is not None
                with check.connect() as conn:
                    due = conn.execute(text("""
                        SELECT due_at FROM event_deadlines WHERE event_id = :id
                           AND step = 'respond'"""), {"id": later["id"]}).scalar_one()
                while True:
                    with check.connect() as conn:
                        fired, now = conn.execute(text("""
                            SELECT fired_at, clock_timestamp() FROM event_deadlines
                             WHERE event_id = :id AND step = 'respond'
                        """), {"id": later["id"]}).one()
                    if fired is not None:
                        assert due <= fired and (fired - due).total_seconds() < 2
                        break
                    assert (now - due).total_seconds() < 2, "not fired after the reconnect"
                    time.sleep(0.1)
            with check.connect() as conn:
                steps = conn.execute(text("""
                    SELECT step, to_level FROM event_history
                     WHERE event_id = :id AND action = 'escalated'
                """), {"id": event["id"]}).all()
                assert [tuple(s) for s in steps] == [("respond", "street")]
                links = conn.execute(text("SELECT links FROM events WHERE id = :id"),
                                     {"id": event["id"]}).scalar_one()
                # No roads or teams in this database: nothing to route, said so.
                assert links["teams_by"] == "distance" and links["teams"] == []
                assert json.dumps(links)
        finally:
            check.dispose()



def test_raised_by_a_rule_inside_the_callers_transaction(engine: Engine, database_url: str,
                                                        city: City):
    """raise_event: no principal, no commit of its own; a rollback leaves nothing."""
    from twin.live import events
    from twin.live.events import OutsideMunicipality

    lon, lat = city.inside(city.other_street)

    async def raise_two(conn: Any) -> tuple[dict, dict]:
        kept = await events.raise_event(
            conn, kind="gas_leak", lon=lon, lat=lat, source="rule", title="燃气" * 300,
            description="", sensor_id=1, rule_code="gas_high")
        await conn.commit()
        dropped = await events.raise_event(conn, kind="gas_leak", lon=lon, lat=lat,
                                           source="detector", title="管网异常",
                                           description="回滚")
        await conn.rollback()
        return kept, dropped

    kept, dropped = on_own_connection(database_url, raise_two)
    assert kept["grid_code"] == city.owner(lon, lat)
    assert len(kept["title"]) == events.TITLE_MAX
    assert kept["links"]["teams_by"] == "distance"
    with engine.connect() as conn:
        row = conn.execute(text("SELECT source, rule_code, sensor_id, reported_by FROM events "
                                "WHERE id = :id"), {"id": kept["id"]}).one()
        assert tuple(row) == ("rule", "gas_high", 1, "rule:gas_high")
        assert conn.execute(text("SELECT count(*) FROM events WHERE id = :id"),
                            {"id": dropped["id"]}).scalar_one() == 0
        actions = conn.execute(text("""
            SELECT payload->>'action' FROM outbox WHERE kind = 'event'
               AND (payload->>'id')::bigint = ANY(:ids)"""),
            {"ids": [kept["id"], dropped["id"]]}).scalars().all()
        assert actions == ["raised"]

    async def outside(conn: Any) -> None:
        await events.raise_event(conn, kind="fire", lon=100.0, lat=20.0, source="rule",
                                 title="x", description="y")

    with pytest.raises(OutsideMunicipality):
        on_own_connection(database_url, outside)


def test_events_are_a_collection_and_a_tile_layer(engine: Engine, database_url: str,
                                                  city: City):
    """The events layer as every other: OGC API Features items and vector tiles, scoped."""
    import mapbox_vector_tile
    import morecantile

    keys = keys_for(city.district, city.street, city.other_street)
    lon, lat = city.inside(city.street)
    with LiveServer(events_settings(database_url, keys)) as live, \
            httpx.Client(base_url=live.url, timeout=60) as client:
        api = Api(client, keys)
        event = api.report("street", lon, lat).json()
        items = api.get("street", "/collections/events/items", limit=1000,
                        bbox=f"{lon - 0.001},{lat - 0.001},{lon + 0.001},{lat + 0.001}")
        assert items.status_code == 200, items.text
        ids = {f["id"] for f in items.json()["features"]}
        assert event["id"] in ids
        other = api.get("other", "/collections/events/items", limit=1000).json()
        assert event["id"] not in {f["id"] for f in other["features"]}
        tile = morecantile.tms.get("WebMercatorQuad").tile(lon, lat, 14)
        answer = api.get("street", f"/tiles/events/{tile.z}/{tile.x}/{tile.y}.mvt")
        assert answer.status_code == 200, answer.text
        layers = mapbox_vector_tile.decode(answer.content)
        assert any(f["id"] == event["id"] and f["properties"]["status"] == "reported"
                   for f in layers["events"]["features"])

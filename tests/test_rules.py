"""Alert rules and detectors (issue 14): readings posted over HTTP open and close alerts by
the rules' thresholds with hysteresis, exactly as a pure-Python state machine over the same
readings says; a repeated or concurrent crossing never opens a second alert; silent sensors
open and close alerts; a planted incident becomes a live anomaly zone (and an event) in one
detector run at a fixed clock, and closes once it is over.

Readings posted here carry a sub-second mark (the sample's are on whole minutes) and are
deleted after the module, with the alerts, zones and events they made.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from httpx import Client
from sqlalchemy import Engine, text
from sqlalchemy.ext.asyncio import create_async_engine

from data_samples.sensors import READINGS_START
from tests.databases import in_own_transaction
from tests.sensors import forget_readings
from tests.servers import ADMIN, EDITOR, LiveServer
from twin.core.settings import AuthSettings, RulesSettings, Settings
from twin.live import detectors
from twin.live.runtime import LiveContext
from twin.queries.anomalies import pipe_anomalies

MARK = timedelta(microseconds=271_828)
VIEWER_KEY = "rules-viewer-street-key-0123456789"
OTHER_KEY = "rules-viewer-other-key-0123456789"


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def places(engine: Engine) -> dict:
    """Sensors of each kind standing in a grid cell, with their street, for the tests."""
    rows = engine.connect().execute(text("""
        SELECT DISTINCT ON (s.kind, s.id) s.id, s.kind, s.code, left(g.code, 9) AS street
          FROM sensors s JOIN admin_units g ON g.level = 'grid' AND ST_Intersects(g.geom, s.geom)
         ORDER BY s.kind, s.id
    """)).all()
    by_kind: dict[str, list] = {}
    for row in rows:
        by_kind.setdefault(row.kind, []).append(row)
    return by_kind


@pytest.fixture(scope="module")
def live(engine: Engine, database_url: str, places) -> Iterator[LiveServer]:
    street = places["gas"][0].street
    other = next(r.street for rows in places.values() for r in rows
                 if r.street[:6] != street[:6])
    keys = {VIEWER_KEY: f"viewer:rules-street:street={street}",
            OTHER_KEY: f"viewer:rules-other:street={other}"}
    # The detector loop looks once at start-up and then not again during the module (the
    # tests run its looks themselves, at fixed clocks).
    settings = Settings(database_url=database_url, auth=AuthSettings(keys=keys),
                        rules=RulesSettings(silence_check_every_s=3600, anomaly_every_s=3600))
    with LiveServer(settings) as server:
        yield server


@pytest.fixture()
def client(live: LiveServer) -> Iterator[Client]:
    with Client(base_url=live.url, timeout=120, headers=EDITOR) as client:
        yield client


@pytest.fixture(scope="module", autouse=True)
def forget_what_the_module_made(engine: Engine):
    yield
    with engine.begin() as conn:
        # Marked readings, and the quiet sensors' fillers whole milliseconds after them.
        ids = forget_readings(conn, "date_part('microseconds', ts)::int % 1000 = :mark",
                              {"mark": MARK.microseconds % 1000})
        events = conn.execute(text("""
            SELECT event_id FROM sensor_alerts WHERE sensor_id = ANY(:ids) AND event_id IS NOT NULL
            UNION SELECT event_id FROM anomaly_zones WHERE event_id IS NOT NULL
        """), {"ids": ids}).scalars().all()
        conn.execute(text("DELETE FROM sensor_alerts WHERE sensor_id = ANY(:ids)"), {"ids": ids})
        conn.execute(text("DELETE FROM anomaly_zones"))
        conn.execute(text("DELETE FROM events WHERE id = ANY(:ids)"), {"ids": events})


def marked(instant: datetime) -> datetime:
    return instant.replace(microsecond=0) + MARK


def post(client: Client, readings: list[tuple[int, datetime, float]]) -> None:
    body = {"readings": [{"sensor_id": s, "ts": ts.isoformat(), "value": v}
                         for s, ts, v in readings]}
    response = client.post("/sensors/readings", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["accepted"] == len(readings), response.text


def alerts_of(engine: Engine, sensor_id: int, rule: str) -> list:
    return engine.connect().execute(text("""
        SELECT a.id, a.opened_at, a.opened_value, a.closed_at, a.closed_value, a.event_id,
               e.kind AS event_kind, e.source AS event_source, e.sensor_id AS event_sensor
          FROM sensor_alerts a LEFT JOIN events e ON e.id = a.event_id
         WHERE a.sensor_id = :s AND a.rule_code = :r ORDER BY a.opened_at
    """), {"s": sensor_id, "r": rule}).all()


def outbox_alerts(engine: Engine, sensor_id: int) -> list:
    return engine.connect().execute(text("""
        SELECT payload, area_codes FROM outbox
         WHERE kind = 'alert' AND (payload->>'sensor_id')::int = :s ORDER BY id
    """), {"s": sensor_id}).all()


# ------------------------------------------------------------------ the oracle

def oracle(readings: list[tuple[datetime, float]], rule: dict) -> list[dict]:
    """Alerts over readings in time order: open past an open bound, close past the close
    bound(s), hold in between."""
    alerts: list[dict] = []
    current = None
    for ts, value in sorted(readings):
        if current is None:
            above = rule["open_above"] is not None and value > rule["open_above"]
            below = rule["open_below"] is not None and value < rule["open_below"]
            if above or below:
                current = {"opened_at": ts, "opened_value": value, "closed_at": None,
                           "closed_value": None}
                alerts.append(current)
        else:
            ok_high = rule["close_below"] is None or value < rule["close_below"]
            ok_low = rule["close_above"] is None or value > rule["close_above"]
            if ok_high and ok_low:
                current["closed_at"], current["closed_value"] = ts, value
                current = None
    return alerts


def sequence(rng: np.random.Generator, n: int, low: float, high: float) -> np.ndarray:
    """A wandering signal between ``low`` and ``high`` that lingers near the middle."""
    t = np.arange(n)
    middle, half = (low + high) / 2, (high - low) / 2
    wave = np.sin(t / 7.0) * 0.7 + np.sin(t / 2.3) * 0.35
    return np.round(middle + half * np.clip(wave + rng.normal(0, 0.15, n), -1, 1), 4)


# ------------------------------------------------------------------ thresholds

HYSTERESIS_CASES = [("gas", "gas_high", 10.0, 40.0), ("pressure", "pressure_low", 0.10, 0.24)]


@pytest.mark.parametrize("kind,rule_code,low,high", HYSTERESIS_CASES)
def test_alerts_follow_the_hysteresis_oracle(client: Client, engine: Engine, places, kind,
                                             rule_code, low, high):
    rule = dict(engine.connect().execute(text("SELECT * FROM alert_rules WHERE code = :c"),
                                         {"c": rule_code}).mappings().one())
    sensor = places[kind][1].id
    rng = np.random.default_rng(14)
    values = sequence(rng, 240, low, high)
    start = marked(datetime.now(UTC) - timedelta(minutes=25))
    readings = [(sensor, start + timedelta(seconds=5 * i), float(v)) for i, v in enumerate(values)]
    # Batches of uneven sizes, many holding several readings of the sensor, with readings of
    # quiet sensors around them.
    quiet = [r.id for r in places["level"][:20]]
    # The cases share the seed and start within seconds of each other: their quiet readings
    # take different milliseconds, or one case's would be the other's already stored ones.
    offset_ms = 1 + 500 * [kind for kind, *_ in HYSTERESIS_CASES].index(kind)
    k = 0
    while k < len(readings):
        size = int(rng.integers(1, 30))
        chunk = readings[k:k + size]
        filler = [(q, chunk[0][1] + timedelta(milliseconds=offset_ms + j), 0.3)
                  for j, q in enumerate(quiet)]
        post(client, chunk + filler)
        k += size
    expected = oracle([(ts, v) for _, ts, v in readings], rule)
    assert len(expected) >= 3, "the sequence should cross the bounds several times"
    stored = alerts_of(engine, sensor, rule_code)
    assert [(a.opened_at, a.opened_value, a.closed_at, a.closed_value) for a in stored] == [
        (e["opened_at"], e["opened_value"], e["closed_at"], e["closed_value"]) for e in expected]
    # Every alert raised its event at the sensor, of the rule's kind.
    assert all(a.event_id is not None and a.event_kind == rule["event_kind"]
               and a.event_source == "rule" and a.event_sensor == sensor for a in stored)
    # One message per opening and per closing, to the sensor's grid, in order.
    messages = outbox_alerts(engine, sensor)
    changes = sorted([(a.opened_at, "opened", a.id) for a in stored]
                     + [(a.closed_at, "closed", a.id) for a in stored if a.closed_at])
    assert [(m.payload["state"], m.payload["id"]) for m in messages] == [
        (state, alert_id) for _, state, alert_id in changes]
    grid = messages[0].area_codes
    assert len(grid) == 1 and len(grid[0]) == 15 and all(m.area_codes == grid for m in messages)
    # The quiet sensors opened no threshold alert (a silence alert is another matter: the
    # suite's earlier readings may have gone quiet).
    assert not engine.connect().execute(text(
        "SELECT count(*) FROM sensor_alerts AS a JOIN alert_rules AS r ON r.code = a.rule_code "
        "WHERE a.sensor_id = ANY(:q) AND r.silent_minutes IS NULL AND a.opened_at >= :start"),
        {"q": quiet, "start": start}).scalar()


def test_a_repeated_or_concurrent_crossing_opens_one_alert(client: Client, engine: Engine,
                                                           places):
    sensor = places["gas"][2].id
    start = marked(datetime.now(UTC) - timedelta(minutes=20))
    # Above, back into the band (not below 20), above again: one alert, still open.
    post(client, [(sensor, start, 30.0), (sensor, start + timedelta(seconds=5), 22.0)])
    post(client, [(sensor, start + timedelta(seconds=10), 31.0)])
    post(client, [(sensor, start + timedelta(seconds=15), 24.9),
                  (sensor, start + timedelta(seconds=20), 45.0)])
    # Many batches crossing at once, from threads: still one.
    errors: list[BaseException] = []

    def cross(k: int) -> None:
        try:
            post(client, [(sensor, start + timedelta(seconds=30 + k), 40.0 + k)])
        except BaseException as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    threads = [threading.Thread(target=cross, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    stored = alerts_of(engine, sensor, "gas_high")
    assert len(stored) == 1 and stored[0].closed_at is None
    assert (stored[0].opened_at, stored[0].opened_value) == (start, 30.0)
    # Below the close bound: closed; the next crossing opens a second one.
    post(client, [(sensor, start + timedelta(seconds=60), 19.0)])
    post(client, [(sensor, start + timedelta(seconds=65), 26.0)])
    stored = alerts_of(engine, sensor, "gas_high")
    assert [(a.closed_at is None) for a in stored] == [False, True]
    assert stored[0].closed_at == start + timedelta(seconds=60)


# ------------------------------------------------------------------ silence

def test_a_silent_sensor_opens_an_alert_and_speaking_again_closes_it(client: Client,
                                                                     engine: Engine,
                                                                     places, database_url):
    first, second = places["flow"][0].id, places["flow"][1].id
    last = marked(datetime.now(UTC) - timedelta(minutes=50))
    post(client, [(first, last, 0.2), (second, last, 0.2)])
    now = datetime.now(UTC)

    async def look(conn, at=now):
        return await detectors.check_silence(conn, at, timedelta(hours=24))

    def alerts(sensor: int) -> list:
        """This test's silence alerts of the sensor: the suite's servers look for silence in
        the background too, and may have opened (and closed) one on an earlier test's
        readings."""
        return [a for a in alerts_of(engine, sensor, "flow_silent") if a.opened_at > last]

    # 20 minutes later than the reading: not silent yet.
    in_own_transaction(database_url, lambda conn: look(conn, last + timedelta(minutes=20)))
    assert not alerts(first)
    in_own_transaction(database_url, look)
    for sensor in (first, second):
        (alert,) = alerts(sensor)
        assert alert.opened_at == last + timedelta(minutes=30) and alert.closed_at is None
        assert alert.event_kind == "sensor_fault" and alert.event_sensor == sensor
    # A second look opens nothing more.
    in_own_transaction(database_url, look)
    assert len(alerts(first)) == 1
    # A reading arrives: the ingest closes the alert at once.
    post(client, [(first, marked(now - timedelta(minutes=1)), 0.21)])
    (alert,) = alerts(first)
    assert alert.closed_at is not None and alert.closed_value == 0.21
    # A reading stored behind the rules' back: the next look closes it.
    resumed = marked(now - timedelta(minutes=2))
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO sensor_readings (sensor_id, ts, value) "
                          "VALUES (:s, :t, 0.22)"), {"s": second, "t": resumed})
        conn.execute(text("UPDATE sensor_latest SET ts = :t, value = 0.22 WHERE sensor_id = :s"),
                     {"s": second, "t": resumed})
    in_own_transaction(database_url, look)
    (alert,) = alerts(second)
    assert alert.closed_at == resumed
    states = [m.payload["state"] for m in outbox_alerts(engine, second)
              if m.payload["rule"] == "flow_silent" and m.payload["id"] == alert.id]
    assert states == ["opened", "closed"]


# ------------------------------------------------------------------ anomaly zones

def test_a_planted_incident_becomes_a_live_zone_with_an_event(engine: Engine, places,
                                                               database_url, live):
    # A gas sensor of the first one's street (the scoped viewer's), not used by other tests.
    sensor = next(r for r in places["gas"][5:] if r.street == places["gas"][0].street)
    clock = marked(datetime.now(UTC) - timedelta(hours=3))
    steps = [clock - timedelta(minutes=5 * k) for k in range(72, -1, -1)]
    rng = np.random.default_rng(7)
    values = 6.0 + rng.normal(0, 0.3, len(steps))
    values[-7:] += 300.0  # the last half hour: methane building up
    with engine.begin() as conn:
        conn.execute(text("""
            INSERT INTO sensor_readings (sensor_id, ts, value)
            SELECT :s, t, v FROM unnest(CAST(:ts AS timestamptz[]), CAST(:v AS float8[])) AS x(t, v)
        """), {"s": sensor.id, "ts": steps, "v": values.tolist()})
    window = timedelta(hours=1)

    async def look(conn, at):
        return await detectors.run_anomalies(conn, at, window, ("gas",))

    assert in_own_transaction(database_url, lambda c: look(c, clock)) == {
        "opened": 1, "updated": 0, "closed": 0}
    zone = engine.connect().execute(text("""
        SELECT z.*, e.kind AS event_kind, e.source AS event_source, e.grid_code
          FROM anomaly_zones z LEFT JOIN events e ON e.id = z.event_id
    """)).one()
    assert zone.network == "gas" and zone.sensors == [sensor.id] and zone.closed_at is None
    assert zone.event_kind == "gas_leak" and zone.event_source == "detector"
    assert zone.started_at == steps[-7] and zone.last_seen_at == steps[-1]
    # Seen again: matched, not a second zone, and nothing new pushed.
    assert in_own_transaction(database_url, lambda c: look(c, clock + timedelta(minutes=1))) == {
        "opened": 0, "updated": 0, "closed": 0}
    # The map reads it, in scope only.
    with Client(base_url=live.url, timeout=60) as client:
        features = client.get("/alerts/anomaly-zones").json()["features"]
        assert [f["id"] for f in features] == [zone.id]
        assert features[0]["properties"]["sensor_ids"] == [sensor.id]
        assert features[0]["geometry"]["type"] == "MultiPolygon"
        mine = client.get("/alerts/anomaly-zones",
                          headers={"Authorization": f"Bearer {VIEWER_KEY}"}).json()
        assert [f["id"] for f in mine["features"]] == [zone.id]
        other = client.get("/alerts/anomaly-zones",
                           headers={"Authorization": f"Bearer {OTHER_KEY}"}).json()
        assert other["features"] == []
    # Over once its last anomalous reading is more than 15 minutes old.
    assert in_own_transaction(database_url, lambda c: look(c, clock + timedelta(minutes=30))) == {
        "opened": 0, "updated": 0, "closed": 1}
    messages = engine.connect().execute(text(
        "SELECT payload, area_codes FROM outbox WHERE kind = 'anomaly' ORDER BY id")).all()
    assert [(m.payload["id"], m.payload["state"]) for m in messages] == [
        (zone.id, "opened"), (zone.id, "closed")]
    assert zone.grid_code in messages[0].area_codes


def test_live_zones_are_the_on_demand_detectors_and_find_the_samples_incidents(
        database_url: str, sample_dir: Path):
    """Mid-way through each incident injected into the sample: the live look finds the zones
    GET /query/pipe-anomalies finds over the same hour, one of them on the incident's sensors
    (the truth file) when the sample has hours of readings before it. Rolled back: nothing
    is kept."""
    truth = json.loads((sample_dir / "anomalies_truth.json").read_text())["anomalies"]

    async def main() -> None:
        engine = create_async_engine(database_url)
        try:
            for incident in truth:
                start = datetime.fromisoformat(incident["start"])
                clock = start + (datetime.fromisoformat(incident["end"]) - start) / 2
                network = incident["network"]
                async with engine.connect() as conn:
                    await conn.begin()
                    counts = await detectors.run_anomalies(conn, clock, timedelta(hours=1),
                                                           (network,))
                    live = {frozenset(z) for z in (await conn.execute(text(
                        "SELECT sensors FROM anomaly_zones WHERE closed_at IS NULL "
                        "AND network = :n"), {"n": network})).scalars()}
                    answer = await pipe_anomalies(conn, network,
                                                  (clock - timedelta(hours=1)).isoformat(),
                                                  clock.isoformat())
                    await conn.rollback()
                on_demand = {frozenset(f["properties"]["sensor_ids"])
                             for f in answer["features"]}
                assert counts["opened"] == len(live) and live == on_demand, (incident, live)
                if start - READINGS_START < timedelta(hours=4):
                    continue  # too little history before it for a baseline (either way)
                affected = set(incident["affected_sensor_ids"])
                assert any(len(zone & affected) * 2 >= len(affected) for zone in live), (
                    incident, live)
        finally:
            await engine.dispose()

    asyncio.run(main())


# ------------------------------------------------------------------ routes

def test_alerts_are_listed_in_the_callers_jurisdiction(live: LiveServer, engine: Engine,
                                                       places):
    sensor = places["gas"][0]
    start = marked(datetime.now(UTC) - timedelta(minutes=15))
    with Client(base_url=live.url, timeout=60, headers=EDITOR) as client:
        post(client, [(sensor.id, start, 33.0)])
    with Client(base_url=live.url, timeout=60) as client:
        every = client.get("/alerts").json()["features"]
        assert sensor.id in {f["properties"]["sensor_id"] for f in every}
        assert all(f["properties"]["state"] == "open" for f in every)
        mine = client.get("/alerts", headers={"Authorization": f"Bearer {VIEWER_KEY}"}).json()
        ids = {f["properties"]["sensor_id"] for f in mine["features"]}
        assert sensor.id in ids
        other = client.get("/alerts", headers={"Authorization": f"Bearer {OTHER_KEY}"}).json()
        assert sensor.id not in {f["properties"]["sensor_id"] for f in other["features"]}
        closed = client.get("/alerts", params={"state": "closed"}).json()["features"]
        assert all(f["properties"]["state"] == "closed" for f in closed)
        assert client.get("/alerts", params={"state": "nope"}).status_code in (400, 422)


def test_rules_are_read_by_viewers_and_replaced_by_admins_with_checked_bounds(
        live: LiveServer, engine: Engine, places):
    with Client(base_url=live.url, timeout=60) as client:
        rules = {r["code"]: r for r in client.get("/alerts/rules").json()["rules"]}
        assert {"gas_high", "level_high", "flow_high", "pressure_low", "gas_silent"} <= set(rules)
        assert rules["gas_high"]["open_above"] == 25 and rules["gas_high"]["close_below"] == 20
        body = {k: rules["level_high"][k] for k in (
            "sensor_kind", "network", "open_above", "close_below", "event_kind")}
        # Not an admin: refused.
        assert client.put("/alerts/rules/level_high", json=body,
                          headers=EDITOR).status_code == 403
        bad = [({**body, "close_below": 2.0}, "close_below (2) must not be above open_above"),
               ({**body, "close_below": None}, "open_above needs close_below"),
               ({**body, "silent_minutes": 10}, "either thresholds"),
               ({"sensor_kind": "gas"}, "needs open_above or open_below"),
               ({**body, "event_kind": "meteor"}, "unknown kind 'meteor'"),
               ({**body, "sensor_kind": "radon"}, "sensor_kind")]
        for payload, words in bad:
            response = client.put("/alerts/rules/level_high", json=payload, headers=ADMIN)
            # 400: the body's schema (the app's rule for request validation); 422: the bounds.
            assert response.status_code == (400 if words == "sensor_kind" else 422), (
                payload, response.text)
            answer = response.json()
            assert set(answer) == {"code", "description"} and words in answer["description"], (
                payload, answer)
        changed = client.put("/alerts/rules/level_high", json={**body, "open_above": 1.8},
                             headers=ADMIN)
        assert changed.status_code == 200 and changed.json()["open_above"] == 1.8
        created = client.put("/alerts/rules/gas_very_high", headers=ADMIN, json={
            "sensor_kind": "gas", "open_above": 40, "close_below": 30,
            "name_zh": "燃气浓度严重超限", "event_kind": "gas_leak"})
        assert created.status_code == 201, created.text
        # A reading above both gas rules opens an alert of each; disabling one closes its own.
        sensor = places["gas"][3].id
        with Client(base_url=live.url, timeout=60, headers=EDITOR) as editor:
            post(editor, [(sensor, marked(datetime.now(UTC) - timedelta(minutes=10)), 45.0)])
        assert len(alerts_of(engine, sensor, "gas_very_high")) == 1
        disabled = client.put("/alerts/rules/gas_very_high", headers=ADMIN, json={
            "sensor_kind": "gas", "open_above": 40, "close_below": 30, "enabled": False})
        assert disabled.status_code == 200 and disabled.json()["closed_alerts"] >= 1
        (alert,) = alerts_of(engine, sensor, "gas_very_high")
        assert alert.closed_at is not None
        assert alerts_of(engine, sensor, "gas_high")[-1].closed_at is None
        client.put("/alerts/rules/level_high", json=body, headers=ADMIN)
        with engine.begin() as conn:
            for sql in ("DELETE FROM events WHERE id IN (SELECT event_id FROM sensor_alerts "
                        "WHERE rule_code = 'gas_very_high')",
                        "DELETE FROM sensor_alerts WHERE rule_code = 'gas_very_high'",
                        "DELETE FROM alert_rules WHERE code = 'gas_very_high'"):
                conn.execute(text(sql))


# ------------------------------------------------------------------ the loop

class CountingDetectors(detectors.Detectors):
    """The real loop and leadership, with the looks counted instead of run (tested above)."""

    def __init__(self, ctx, lock):
        super().__init__(ctx, lock)
        self.looks = 0

    async def _silence(self) -> None:
        self.looks += 1

    async def _anomalies(self) -> None:
        self.looks += 1


def test_one_process_leads_the_detectors_and_a_lost_connection_is_taken_over(
        engine: Engine, database_url: str, monkeypatch):
    lock = 0x7477696E_74657374  # not the servers' lock: they run beside this test
    monkeypatch.setattr(detectors, "RETRY_S", 0.5)
    settings = Settings(database_url=database_url,
                        rules=RulesSettings(silence_check_every_s=0.1, anomaly_every_s=0.1))
    # In this database only: the suite may be running beside this one on the same cluster.
    holder = text("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                  "AND classid = :hi AND objid = :lo AND database = "
                  "(SELECT oid FROM pg_database WHERE datname = current_database())")
    key = {"hi": lock >> 32, "lo": lock & 0xFFFFFFFF}

    async def main() -> None:
        work = create_async_engine(database_url)
        ctx = LiveContext(settings, work, "")
        one, two = CountingDetectors(ctx, lock).start(), CountingDetectors(ctx, lock).start()
        try:
            await asyncio.sleep(1.0)
            assert (one.looks > 0) != (two.looks > 0), (one.looks, two.looks)
            leader, other = (one, two) if one.looks else (two, one)
            with engine.connect() as conn:
                (pid,) = conn.execute(holder, key).scalars().all()
                # The database drops the leader's connection (as a restart would).
                conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            before = leader.looks + other.looks
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                with engine.connect() as conn:
                    pids = conn.execute(holder, key).scalars().all()
                if pids and pids[0] != pid and leader.looks + other.looks > before + 2:
                    break
            assert pids and pids[0] != pid, "nobody took the lock again"
        finally:
            await one.stop()
            await two.stop()
            await work.dispose()
        with engine.connect() as conn:
            assert conn.execute(holder, key).scalars().all() == []

    asyncio.run(main())

"""POST /sensors/readings: per-row rejections, what is stored (read back), and atomicity.

Readings posted here carry a sub-second part (the sample's are on whole minutes), so they
never collide with the sample and are deleted again after the module.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
from httpx import Client
from sqlalchemy import Engine, text

from tests.servers import EDITOR, LiveServer

MARK = timedelta(microseconds=123_457)
pytestmark = pytest.mark.usefixtures("forget_posted_readings")


@pytest.fixture()
def client(server: LiveServer) -> Iterator[Client]:
    """Sensor gateways post with a gis-editor key (issue 7: twin/api/access.py)."""
    with Client(base_url=server.url, timeout=30, headers=EDITOR) as client:
        yield client


def stamp(minutes_ago: float, tz: str = "+08:00") -> str:
    """An instant ``minutes_ago`` before now, marked, with the given offset."""
    instant = datetime.now(UTC) - timedelta(minutes=minutes_ago) + MARK
    return instant.astimezone(datetime.fromisoformat(f"2000-01-01T00:00{tz}").tzinfo).isoformat()


def stored(engine: Engine, keys: list[tuple[int, str]]) -> dict[tuple[int, datetime], float]:
    """Stored values at (sensor_id, ISO ts) keys, keyed by (sensor_id, aware datetime)."""
    frame = pd.read_sql(text(
        "SELECT r.sensor_id, r.ts, r.value FROM sensor_readings r "
        "JOIN unnest(CAST(:ids AS int[]), CAST(:ts AS timestamptz[])) AS k(sensor_id, ts) "
        "ON k.sensor_id = r.sensor_id AND k.ts = r.ts"), engine,
        params={"ids": [k[0] for k in keys], "ts": [k[1] for k in keys]})
    return {(int(r.sensor_id), r.ts.to_pydatetime()): r.value for r in frame.itertuples()}


def key(sensor_id: int, ts: str) -> tuple[int, datetime]:
    return sensor_id, datetime.fromisoformat(ts)


def test_mixed_batch_stores_the_valid_rows_and_rejects_the_rest(client: Client, engine: Engine,
                                                                sensors):
    level = int(sensors.index[sensors["kind"] == "level"][0])
    gas = int(sensors.index[sensors["kind"] == "gas"][0])
    top = float(sensors.at[level, "max_value"])
    rows = [
        {"sensor_id": level, "ts": stamp(30), "value": 0.42},            # 0 ok
        {"sensor_id": gas, "ts": stamp(30, "Z").replace("+00:00", "Z"), "value": 7.5},  # 1 ok
        {"sensor_id": level, "ts": stamp(25, "+00:00"), "value": top},   # 2 ok, at the maximum
        {"sensor_id": 987_654, "ts": stamp(20), "value": 1.0},           # 3 unknown sensor
        {"sensor_id": level, "ts": stamp(20), "value": top + 0.5},       # 4 above range
        {"sensor_id": level, "ts": stamp(19), "value": -0.1},            # 5 below range
        {"sensor_id": level, "ts": stamp(-24 * 60), "value": 0.5},       # 6 a day ahead
        {"sensor_id": level, "ts": stamp(18)[:-6], "value": 0.5},        # 7 no offset
        {"sensor_id": level, "ts": "20 Nov 2026 08:00", "value": 0.5},   # 8 not ISO 8601
        {"sensor_id": level, "ts": stamp(17), "value": "0.5"},           # 9 value a string
        {"sensor_id": level, "value": 0.5},                              # 10 no ts
        [level, stamp(16), 0.5],                                         # 11 not an object
        {"sensor_id": True, "ts": stamp(15), "value": 0.5},              # 12 boolean id
        {"sensor_id": level, "ts": stamp(30), "value": 0.43},            # 13 repeats row 0
        {"sensor_id": level, "ts": stamp(14), "value": float("nan")},    # 14 NaN
        {"sensor_id": 2**40, "ts": stamp(13), "value": 1.0},             # 15 beyond int4
        {"sensor_id": level, "ts": stamp(12), "value": 10**400},         # 16 beyond float
    ]
    # Same instant as row 0 written with another offset: still the same reading.
    rows[13]["ts"] = datetime.fromisoformat(rows[0]["ts"]).astimezone(UTC).isoformat()
    response = client.post("/sensors/readings", content=json.dumps({"readings": rows}),
                           headers={"content-type": "application/json"})
    assert response.status_code == 207, response.text
    body = response.json()
    assert body["received"] == len(rows)
    assert body["accepted"] == 3 and body["already_stored"] == 0
    reasons = {item["index"]: item["reason"] for item in body["rejected"]}
    assert sorted(reasons) == list(range(3, 17))
    expectations = {3: "unknown sensor", 4: "outside the sensor's range",
                    5: "outside the sensor's range", 6: "in the future", 7: "no UTC offset",
                    8: "not an ISO 8601", 9: "value must be a finite number", 10: "missing ts",
                    11: "must be an object", 12: "sensor_id must be an integer",
                    13: "duplicate of reading 0", 14: "value must be a finite number",
                    15: "unknown sensor", 16: "value must be a finite number"}
    for index, words in expectations.items():
        assert words in reasons[index], (index, reasons[index])
    assert {item["index"]: item["sensor_id"] for item in body["rejected"]}[3] == 987_654

    keys = [(r["sensor_id"], r["ts"]) for r in rows[:3]]
    assert stored(engine, keys) == {key(*k): r["value"] for k, r in zip(keys, rows[:3],
                                                                        strict=True)}
    rejected_keys = [(level, rows[i]["ts"]) for i in (4, 5, 6)]
    assert stored(engine, rejected_keys) == {}


def test_a_retried_batch_is_not_stored_twice_and_conflicts_are_rejected(client: Client,
                                                                        engine: Engine, sensors):
    pressure = int(sensors.index[sensors["kind"] == "pressure"][0])
    rows = [{"sensor_id": pressure, "ts": stamp(40 + k), "value": 0.3 + k / 100}
            for k in range(4)]
    first = client.post("/sensors/readings", json={"readings": rows})
    assert first.status_code == 200 and first.json()["accepted"] == 4
    again = client.post("/sensors/readings", json={"readings": rows})
    assert again.status_code == 200, again.text
    assert again.json() | {"rejected": None} == {"received": 4, "accepted": 0,
                                                 "already_stored": 4, "rejected": None}
    changed = [dict(rows[0], value=0.35), {"sensor_id": pressure, "ts": stamp(50),
                                           "value": 0.31}]
    response = client.post("/sensors/readings", json={"readings": changed})
    assert response.status_code == 207
    body = response.json()
    assert body["accepted"] == 1
    assert [(r["index"], r["reason"].split(":")[0]) for r in body["rejected"]] == [
        (0, "conflict")]
    assert stored(engine, [(pressure, rows[0]["ts"])]) == {key(pressure, rows[0]["ts"]): 0.3}


def test_a_database_error_stores_nothing_of_the_batch(client: Client, engine: Engine, sensors):
    """A trigger fails the insert on one row: none of the batch's rows may be left behind."""
    level = int(sensors.index[sensors["kind"] == "level"][1])
    with engine.begin() as conn:
        conn.execute(text("""
            CREATE FUNCTION pipes_test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.value = 4.2424 THEN RAISE EXCEPTION 'refused by the test'; END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER pipes_test_refuse BEFORE INSERT ON sensor_readings
                FOR EACH ROW EXECUTE FUNCTION pipes_test_refuse();
        """))
    try:
        rows = [{"sensor_id": level, "ts": stamp(60 + k), "value": 1.0 + k} for k in range(5)]
        rows[3]["value"] = 4.2424
        response = client.post("/sensors/readings", json={"readings": rows})
        assert response.status_code == 500
        assert "database" in response.json()["description"]
    finally:
        with engine.begin() as conn:
            conn.execute(text("DROP TRIGGER pipes_test_refuse ON sensor_readings; "
                              "DROP FUNCTION pipes_test_refuse()"))
    assert stored(engine, [(r["sensor_id"], r["ts"]) for r in rows]) == {}
    # With the trigger gone the same batch goes in whole.
    response = client.post("/sensors/readings", json={"readings": rows})
    assert response.status_code == 200 and response.json()["accepted"] == 5


def test_an_empty_batch_is_fine(client: Client):
    response = client.post("/sensors/readings", json={"readings": []})
    assert response.status_code == 200
    assert response.json() == {"received": 0, "accepted": 0, "already_stored": 0,
                               "rejected": []}


def test_too_many_readings_are_413_naming_the_limit(client: Client, sensors):
    level = int(sensors.index[0])
    rows = [{"sensor_id": level, "ts": stamp(1), "value": 1}] * 10_001
    response = client.post("/sensors/readings", json={"readings": rows})
    assert response.status_code == 413, response.text
    assert response.json()["description"].startswith("readings: at most 10000")


def test_a_body_over_the_byte_limit_is_413(client: Client):
    response = client.post("/sensors/readings", content=b"[" + b" " * (3 * 1024 * 1024) + b"]",
                           headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["description"].startswith("body")


@pytest.mark.parametrize("content, name", [
    (b"{not json", "body"),
    (b'{"data": []}', "readings"),
    (b'[{"sensor_id": 1}]', "readings"),
    (b'{"readings": {"sensor_id": 1}}', "readings"),
])
def test_a_malformed_body_is_400_naming_what_is_wrong(client: Client, content, name):
    response = client.post("/sensors/readings", content=content,
                           headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["description"].startswith(name)

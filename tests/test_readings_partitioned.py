"""Readings in day partitions (migration 0011, twin/live/partitions.py), the latest value per
sensor, and SensorThings CreateObservations (twin/live/readings.py, routes/sensors.py).

Oracles: the catalogue (pg_inherits, pg_class, pg_index, tableoid) read directly; the latest
reading per sensor is a pandas groupby over the rows the test posted; a sensor's jurisdiction
is a shapely intersection with the admin polygons.

Readings posted here carry a sub-second mark (the sample's are on whole minutes) and are
deleted after the module, with sensor_latest rebuilt for the sensors touched.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import geopandas as gpd
import pandas as pd
import pytest
import shapely
from httpx import Client
from sqlalchemy import Engine, text

from tests.sensors import run_maintenance
from tests.servers import EDITOR, LiveServer
from twin.core.db import async_engine
from twin.core.settings import AuthSettings, ReadingsSettings, Settings
from twin.live import partitions
from twin.live.runtime import LiveContext

MARK = timedelta(microseconds=654_321)
STREET = "500112002"
STREET_KEY = "ingest-street-key-0123456789"
pytestmark = pytest.mark.usefixtures("forget_posted_readings")


@pytest.fixture(scope="module")
def live(engine: Engine, database_url: str) -> Iterator[LiveServer]:
    keys = {STREET_KEY: f"viewer:ingest-street:street={STREET}"}
    with LiveServer(Settings(database_url=database_url, auth=AuthSettings(keys=keys))) as server:
        yield server


@pytest.fixture()
def client(live: LiveServer) -> Iterator[Client]:
    with Client(base_url=live.url, timeout=60, headers=EDITOR) as client:
        yield client


def stamp(instant: datetime) -> str:
    return (instant + MARK).astimezone(datetime.fromisoformat(
        "2000-01-01T00:00+08:00").tzinfo).isoformat()


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def day_partition(instant: datetime) -> str:
    return "sensor_readings_p" + instant.astimezone(UTC).strftime("%Y_%m_%d")


def mid_value(sensors: pd.DataFrame, sensor_id: int, fraction: float = 0.5) -> float:
    low, high = sensors.at[sensor_id, "min_value"], sensors.at[sensor_id, "max_value"]
    return round(float(low + (high - low) * fraction), 6)


def children(engine: Engine) -> dict[str, str]:
    """Partition name -> its bound expression, from the catalogue."""
    with engine.connect() as conn:
        return dict(conn.execute(text("""
            SELECT c.relname, pg_get_expr(c.relpartbound, c.oid)
              FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'sensor_readings'::regclass""")).all())


def homes(engine: Engine, keys: list[tuple[int, str]]) -> dict[tuple[int, datetime], str]:
    """(sensor, ts) -> the partition its row is stored in (tableoid)."""
    with engine.connect() as conn:
        rows = conn.execute(text("""
            SELECT r.sensor_id, r.ts, r.tableoid::regclass::text
              FROM sensor_readings AS r
              JOIN unnest(CAST(:ids AS int[]), CAST(:ts AS timestamptz[])) AS k(sensor_id, ts)
                ON k.sensor_id = r.sensor_id AND k.ts = r.ts"""),
            {"ids": [k[0] for k in keys], "ts": [k[1] for k in keys]}).all()
    return {(sensor_id, ts): home for sensor_id, ts, home in rows}


# --- the partitioned table --------------------------------------------------------------

def test_the_table_is_partitioned_by_day_with_brin_and_without_fk_or_row_triggers(
        engine: Engine):
    with engine.connect() as conn:
        kind, key = conn.execute(text("""
            SELECT c.relkind, pg_get_partkeydef(c.oid) FROM pg_class AS c
             WHERE c.oid = 'sensor_readings'::regclass""")).one()
        assert (kind, key) == ("p", "RANGE (ts)")
        interval = conn.execute(text("SELECT partition_interval FROM partman.part_config "
                                     "WHERE parent_table = 'public.sensor_readings'")).scalar()
        assert interval == "1 day"
        methods = conn.execute(text("""
            SELECT am.amname, pg_get_indexdef(ix.indexrelid)
              FROM pg_index AS ix JOIN pg_class AS c ON c.oid = ix.indexrelid
              JOIN pg_am AS am ON am.oid = c.relam
             WHERE ix.indrelid = 'sensor_readings'::regclass""")).all()
        assert sorted(m for m, _ in methods) == ["brin", "btree"]
        assert any("brin (ts)" in d for m, d in methods if m == "brin")
        primary = conn.execute(text("""
            SELECT pg_get_constraintdef(oid) FROM pg_constraint
             WHERE conrelid = 'sensor_readings'::regclass AND contype = 'p'""")).scalar()
        assert primary == "PRIMARY KEY (sensor_id, ts)"
        foreign = conn.execute(text("""
            SELECT count(*) FROM pg_constraint
             WHERE conrelid IN (SELECT 'sensor_readings'::regclass UNION
                                SELECT inhrelid FROM pg_inherits
                                 WHERE inhparent = 'sensor_readings'::regclass)
               AND contype = 'f'""")).scalar()
        assert foreign == 0
        triggers = conn.execute(text("""
            SELECT count(*) FROM pg_trigger
             WHERE tgrelid IN (SELECT 'sensor_readings'::regclass UNION
                               SELECT inhrelid FROM pg_inherits
                                WHERE inhparent = 'sensor_readings'::regclass)""")).scalar()
        assert triggers == 0
        # Every child carries the BRIN index (index inheritance).
        unindexed = conn.execute(text("""
            SELECT count(*) FROM pg_inherits AS i
             WHERE i.inhparent = 'sensor_readings'::regclass
               AND NOT EXISTS (SELECT 1 FROM pg_index AS x JOIN pg_class AS c
                                   ON c.oid = x.indexrelid JOIN pg_am AS am ON am.oid = c.relam
                                WHERE x.indrelid = i.inhrelid AND am.amname = 'brin')
        """)).scalar()
        assert unindexed == 0
    parts = children(engine)
    assert parts.get("sensor_readings_default") == "DEFAULT"
    today = now()
    for ahead in range(0, 7):
        day = (today + timedelta(days=ahead)).date()
        name = "sensor_readings_p" + day.strftime("%Y_%m_%d")
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        assert parts.get(name) == (f"FOR VALUES FROM ('{start:%Y-%m-%d %H:%M:%S}+00') "
                                   f"TO ('{start + timedelta(days=1):%Y-%m-%d %H:%M:%S}+00')"), name


def test_the_sample_readings_are_in_their_day_partitions(engine: Engine):
    """The loader made the sample day's partitions before its COPY: nothing in the default."""
    with engine.connect() as conn:
        homes_ = conn.execute(text("""
            SELECT tableoid::regclass::text, min(ts), max(ts), count(*) FROM sensor_readings
             WHERE ts < now() - interval '2 days' AND ts = date_trunc('minute', ts)
             GROUP BY 1""")).all()
    assert sum(n for *_, n in homes_) > 0
    for home, first, last, _ in homes_:
        assert home == day_partition(first) == day_partition(last)


def test_readings_land_in_their_day_and_old_ones_in_the_default_never_lost(
        client: Client, engine: Engine, sensors):
    level = int(sensors.index[sensors["kind"] == "level"][0])
    today = now()
    old = datetime(2001, 3, 4, 5, 6, tzinfo=UTC)
    rows = [{"sensor_id": level, "ts": stamp(today - timedelta(minutes=3)), "value": 0.25},
            {"sensor_id": level, "ts": stamp(today - timedelta(days=1, minutes=1)),
             "value": 0.26},
            {"sensor_id": level, "ts": stamp(old), "value": 0.27}]
    response = client.post("/sensors/readings", json={"readings": rows})
    assert response.status_code == 200, response.text
    assert response.json()["accepted"] == 3
    keys = [(level, r["ts"]) for r in rows]
    where = homes(engine, keys)
    instants = [datetime.fromisoformat(r["ts"]) for r in rows]
    yesterday = day_partition(instants[1])
    assert where[(level, instants[0])] == day_partition(instants[0])
    if yesterday in children(engine):  # made by the migration only when it ran yesterday
        assert where[(level, instants[1])] == yesterday
    assert where[(level, instants[2])] == "sensor_readings_default"

    # The past day's partition made afterwards takes the row over from the default.
    with engine.begin() as conn:
        made = conn.execute(text("SELECT twin_readings_make_partitions(:a, :b)"),
                            {"a": old, "b": old + timedelta(days=1)}).scalar_one()
    assert made == 2
    assert homes(engine, keys)[(level, instants[2])] == day_partition(old)
    with engine.begin() as conn:  # idempotent
        assert conn.execute(text("SELECT twin_readings_make_partitions(:a, :a)"),
                            {"a": old}).scalar_one() == 0
    read = client.get(f"/sensors/{level}/readings/{instants[2].astimezone(UTC).isoformat()}")
    assert read.status_code == 200 and read.json()["value"] == 0.27


def test_retention_drops_old_partitions_and_premake_makes_days_ahead(engine: Engine,
                                                                   database_url: str, sensors):
    gas = int(sensors.index[sensors["kind"] == "gas"][0])
    first = datetime(2003, 5, 1, tzinfo=UTC)
    with engine.begin() as conn:
        conn.execute(text("SELECT twin_readings_make_partitions(:a, :b)"),
                     {"a": first, "b": first + timedelta(days=2)})
        conn.execute(text("""
            INSERT INTO sensor_readings (sensor_id, ts, value)
            SELECT :s, g, 1.0 FROM generate_series(CAST(:a AS timestamptz),
                                                   CAST(:a AS timestamptz) + interval '2 days',
                                                   interval '6 hours') AS g
        """), {"s": gas, "a": first + MARK})
        # Older than every partition: in the default, and past retention too.
        conn.execute(text("INSERT INTO sensor_readings VALUES (:s, :t, 2.0)"),
                     {"s": gas, "t": datetime(1999, 1, 1, tzinfo=UTC) + MARK})
    old_days = {day_partition(first + timedelta(days=k)) for k in range(3)}
    assert old_days <= set(children(engine))
    sample_days = {name for name in children(engine) if name.startswith("sensor_readings_p2026")}

    # Ten years: the 2003 days go, the sample's (weeks old) and today's stay.
    report = run_maintenance(database_url, ReadingsSettings(retention_days=3650, premake_days=10))
    parts = set(children(engine))
    assert old_days.isdisjoint(parts) and set(report.dropped) >= old_days
    assert sample_days <= parts
    assert report.default_rows_deleted >= 1
    ahead = day_partition(now() + timedelta(days=10))
    assert ahead in parts
    with engine.connect() as conn:
        left = conn.execute(text("SELECT count(*) FROM sensor_readings WHERE sensor_id = :s "
                                 "AND ts < '2004-01-01'"), {"s": gas}).scalar()
        assert left == 0
    # Back to keeping everything.
    run_maintenance(database_url, ReadingsSettings())
    with engine.connect() as conn:
        assert conn.execute(text("SELECT retention FROM partman.part_config "
                                 "WHERE parent_table = 'public.sensor_readings'")).scalar() is None


def test_one_process_of_several_runs_the_maintenance(engine: Engine, database_url: str):
    lock = partitions.PARTITION_LOCK
    holders = text("""
        SELECT count(*) FROM pg_locks
         WHERE locktype = 'advisory' AND granted AND classid = :hi AND objid = :lo
           AND objsubid = 1
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())""")
    key = {"hi": lock >> 32, "lo": lock & 0xFFFFFFFF}
    with engine.connect() as conn:
        held_elsewhere = conn.execute(holders, key).scalar() > 0

    async def two_keepers() -> list:
        settings = Settings(database_url=database_url)
        ctx = LiveContext(settings, async_engine(settings, pool_size=1), "")
        keepers = [await partitions.start(ctx), await partitions.start(ctx)]
        for _ in range(100):
            if held_elsewhere or any(k.last for k in keepers):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        ran = [k.last is not None for k in keepers]
        for k in keepers:
            await k.stop()
        await ctx.engine.dispose()
        return ran

    ran = asyncio.run(two_keepers())
    assert sum(ran) == (0 if held_elsewhere else 1)
    with engine.connect() as conn:
        assert conn.execute(holders, key).scalar() == (1 if held_elsewhere else 0)


# --- idempotency and the latest value --------------------------------------------------

def test_a_retried_batch_stores_nothing_twice(client: Client, engine: Engine, sensors):
    flow = [int(s) for s in sensors.index[sensors["kind"] == "flow"][:3]]
    base = now() - timedelta(hours=2)
    rows = [{"sensor_id": s, "ts": stamp(base + timedelta(minutes=k)),
             "value": mid_value(sensors, s, 0.1 + k / 100)} for s in flow for k in range(20)]
    first = client.post("/sensors/readings", json={"readings": rows})
    assert first.status_code == 200 and first.json()["accepted"] == 60
    for _ in range(2):
        again = client.post("/sensors/readings", json={"readings": rows})
        assert again.json() == {"received": 60, "accepted": 0, "already_stored": 60,
                                "rejected": []}
    with engine.connect() as conn:
        counts = conn.execute(text("""
            SELECT count(*), count(DISTINCT (sensor_id, ts)) FROM sensor_readings
             WHERE sensor_id = ANY(:ids) AND ts >= :a AND ts < :b"""),
            {"ids": flow, "a": base, "b": base + timedelta(minutes=30)}).one()
    assert tuple(counts) == (60, 60)


def test_sensor_latest_matches_a_groupby_of_batches_sent_out_of_order(client: Client,
                                                                    engine: Engine, sensors):
    chosen = [int(s) for s in sensors.index[sensors["kind"] == "pressure"][2:8]]
    with engine.connect() as conn:
        before = pd.read_sql(text("SELECT sensor_id, ts, value FROM sensor_latest "
                                  "WHERE sensor_id = ANY(:ids)"), conn,
                             params={"ids": chosen})
    rng = random.Random(14)
    base = now() - timedelta(hours=5)
    sent = []
    for batch_no in range(5):
        rows = []
        for s in chosen:
            for _ in range(rng.randint(0, 6)):
                instant = base + timedelta(minutes=rng.randint(0, 280), seconds=batch_no)
                rows.append({"sensor_id": s, "ts": stamp(instant),
                             "value": mid_value(sensors, s, rng.random())})
        rng.shuffle(rows)
        response = client.post("/sensors/readings", json={"readings": rows})
        assert response.status_code in (200, 207), response.text
        bad = {r["index"] for r in response.json()["rejected"]}
        assert all("duplicate" in r["reason"] for r in response.json()["rejected"])
        sent += [r for k, r in enumerate(rows) if k not in bad]
    frame = pd.DataFrame(sent)
    frame["ts"] = pd.to_datetime(frame["ts"], utc=True)
    frame = pd.concat([before.assign(ts=pd.to_datetime(before["ts"], utc=True)), frame])
    oracle = frame.sort_values("ts").groupby("sensor_id").tail(1).set_index("sensor_id")
    with engine.connect() as conn:
        latest = pd.read_sql(text("SELECT sensor_id, ts, value FROM sensor_latest "
                                  "WHERE sensor_id = ANY(:ids)"), conn,
                             params={"ids": chosen}).set_index("sensor_id")
    latest["ts"] = pd.to_datetime(latest["ts"], utc=True)
    assert sorted(latest.index) == sorted(oracle.index)
    for s in oracle.index:
        assert latest.at[s, "ts"] == oracle.at[s, "ts"], s
        assert latest.at[s, "value"] == pytest.approx(oracle.at[s, "value"]), s
    # An older reading arriving late leaves the latest alone.
    s = chosen[0]
    late = [{"sensor_id": s, "ts": stamp(base - timedelta(hours=1)), "value": 0.3}]
    assert client.post("/sensors/readings", json={"readings": late}).json()["accepted"] == 1
    with engine.connect() as conn:
        ts = conn.execute(text("SELECT ts FROM sensor_latest WHERE sensor_id = :s"),
                          {"s": s}).scalar()
    assert pd.Timestamp(ts) == oracle.at[s, "ts"]
    # Read back over HTTP.
    one = client.get(f"/sensors/{s}/latest")
    assert one.status_code == 200
    assert pd.Timestamp(one.json()["ts"]) == oracle.at[s, "ts"]


def test_latest_reads_are_scoped_to_the_jurisdiction(live: LiveServer, engine: Engine):
    with engine.connect() as conn:
        street = gpd.read_postgis(text("SELECT geom FROM admin_units WHERE code = :c"), conn,
                                  params={"c": STREET}, geom_col="geom").geometry.iloc[0]
        points = gpd.read_postgis(text(
            "SELECT s.id, s.geom FROM sensors AS s JOIN sensor_latest AS l ON l.sensor_id = s.id"),
            conn, geom_col="geom")
    inside = sorted(int(i) for i, g in zip(points["id"], points.geometry, strict=True)
                    if shapely.intersects(street, g))
    outside = sorted(set(int(i) for i in points["id"]) - set(inside))
    assert inside and outside
    headers = {"Authorization": f"Bearer {STREET_KEY}"}
    with Client(base_url=live.url, timeout=60, headers=headers) as viewer:
        answer = viewer.get("/sensors/latest")
        assert answer.status_code == 200
        assert sorted(r["sensor_id"] for r in answer.json()["sensors"]) == inside
        assert viewer.get(f"/sensors/{inside[0]}/latest").status_code == 200
        missing = viewer.get(f"/sensors/{outside[0]}/latest")
        assert missing.status_code == 404 and missing.json()["code"]
        assert viewer.get("/sensors/latest", params={"kind": "smoke"}).status_code in (400, 422)
    with Client(base_url=live.url, timeout=60, headers=EDITOR) as city:
        every = city.get("/sensors/latest").json()["sensors"]
        assert sorted(r["sensor_id"] for r in every) == sorted(inside + outside)
        gas = city.get("/sensors/latest", params={"kind": "gas"}).json()["sensors"]
        assert gas and all(r["kind"] == "gas" for r in gas)


# --- SensorThings CreateObservations ----------------------------------------------------

def test_create_observations_stores_a_data_array(client: Client, engine: Engine, sensors):
    level, gas = (int(sensors.index[sensors["kind"] == k][3]) for k in ("level", "gas"))
    base = now() - timedelta(minutes=90)
    times = [stamp(base + timedelta(minutes=k)) for k in range(4)]
    body = [{"Datastream": {"@iot.id": level}, "components": ["phenomenonTime", "result"],
             "dataArray": [[t, mid_value(sensors, level, 0.2 + k / 10)]
                           for k, t in enumerate(times)]},
            {"Datastream": {"@iot.id": gas},
             "components": ["result", "FeatureOfInterest/id", "phenomenonTime"],
             "dataArray": [[mid_value(sensors, gas), 7, times[0]]]}]
    response = client.post("/sensors/CreateObservations", json=body)
    assert response.status_code == 201, response.text
    links = response.json()
    assert len(links) == 5 and not any(link.startswith("error") for link in links)
    for link, (sensor, t, value) in zip(links, [
            (level, t, mid_value(sensors, level, 0.2 + k / 10)) for k, t in enumerate(times)]
            + [(gas, times[0], mid_value(sensors, gas))], strict=True):
        read = client.get(link)
        assert read.status_code == 200, link
        assert read.json()["sensor_id"] == sensor and read.json()["value"] == value
        assert datetime.fromisoformat(read.json()["ts"]) == datetime.fromisoformat(t)
    # The same request again: every observation already stored, the same links, 201.
    again = client.post("/sensors/CreateObservations", json=body)
    assert again.status_code == 201 and again.json() == links
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM sensor_readings WHERE sensor_id = :s "
                                 "AND ts = ANY(CAST(:t AS timestamptz[]))"),
                            {"s": level, "t": times}).scalar() == 4


def test_create_observations_answers_each_bad_row_with_its_reason(client: Client,
                                                                 engine: Engine, sensors):
    flow = int(sensors.index[sensors["kind"] == "flow"][5])
    base = now() - timedelta(minutes=70)
    good = stamp(base)
    rows = [[good, mid_value(sensors, flow)],                                   # 0 ok
            [stamp(base + timedelta(minutes=1)), math.nan],                     # 1 NaN
            [stamp(now() + timedelta(days=2)), mid_value(sensors, flow)],       # 2 future
            [good, mid_value(sensors, flow)],                                   # 3 duplicate
            [stamp(base + timedelta(minutes=2)), math.inf],                     # 4 infinite
            [stamp(base + timedelta(minutes=3))],                               # 5 short
            [stamp(base + timedelta(minutes=4)) + "/" + good, 1.0],             # 6 interval
            [stamp(base + timedelta(minutes=5)), mid_value(sensors, flow, 0.3)]]  # 7 ok
    body = [{"Datastream": {"@iot.id": flow}, "components": ["phenomenonTime", "result"],
             "dataArray": rows},
            {"Datastream": {"@iot.id": 987_654}, "components": ["phenomenonTime", "result"],
             "dataArray": [[good, 1.0]]}]                                       # 8 unknown
    response = client.post("/sensors/CreateObservations", content=json.dumps(body),
                           headers={"content-type": "application/json"})
    assert response.status_code == 207, response.text
    answer = response.json()
    assert len(answer) == 9
    expected = {1: "finite number", 2: "in the future", 3: "duplicate of reading 0",
                4: "finite number", 5: "array of 2 values", 6: "intervals are not supported",
                8: "unknown sensor 987654"}
    for k, words in expected.items():
        assert answer[k].startswith("error: ") and words in answer[k], (k, answer[k])
    assert answer[0].startswith(f"/sensors/{flow}/readings/")
    assert answer[7].startswith(f"/sensors/{flow}/readings/")
    # A different value at a stored instant: a conflict; the stored reading stands.
    clash = [{"Datastream": {"@iot.id": flow}, "components": ["phenomenonTime", "result"],
              "dataArray": [[good, mid_value(sensors, flow, 0.9)]]}]
    conflict = client.post("/sensors/CreateObservations", json=clash)
    assert conflict.status_code == 207 and conflict.json()[0].startswith("error: conflict")
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT value FROM sensor_readings WHERE sensor_id = :s "
                                   "AND ts = :t"), {"s": flow, "t": good}).scalar()
    assert stored == mid_value(sensors, flow)


@pytest.mark.parametrize("body, words", [
    ({"Datastream": {"@iot.id": 1}}, "body: must be"),
    ([{"Datastream": {"@iot.id": "x"}, "components": ["phenomenonTime", "result"],
       "dataArray": []}], "Datastream"),
    ([{"Datastream": {"@iot.id": 1}, "components": ["result"], "dataArray": []}],
     "components"),
    ([{"Datastream": {"@iot.id": 1}, "components": ["phenomenonTime", "result"],
       "dataArray": {}}], "dataArray"),
])
def test_create_observations_refuses_a_body_of_the_wrong_shape(client: Client, body, words):
    response = client.post("/sensors/CreateObservations", json=body)
    assert response.status_code == 400
    assert words in response.json()["description"]


def test_create_observations_over_the_batch_limit_is_413(client: Client):
    body = [{"Datastream": {"@iot.id": 1}, "components": ["phenomenonTime", "result"],
             "dataArray": [["2026-11-20T08:00:00+08:00", 1.0]] * 10_001}]
    response = client.post("/sensors/CreateObservations", json=body)
    assert response.status_code == 413
    assert "at most 10000" in response.json()["description"]


def test_create_observations_needs_an_editor(live: LiveServer):
    headers = {"Authorization": f"Bearer {STREET_KEY}"}
    with Client(base_url=live.url, timeout=30, headers=headers) as viewer:
        response = viewer.post("/sensors/CreateObservations", json=[])
    assert response.status_code == 403

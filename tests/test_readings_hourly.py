"""Hourly rollups of sensor readings (migration 0017, twin/live/partitions.py) and their read
route (``GET /sensors/{id}/readings/hourly``).

Oracles: a pandas groupby over the raw readings this module inserted (hour = the UTC floor of
each instant); the rollup table read directly; a sensor's jurisdiction is a shapely
intersection with the admin polygons.

The readings go to days of their own (2005-2007, day partitions made here) with a sub-second
mark, so no sample reading and no other module's shares an hour with them; they are deleted
after the module (``forget_posted_readings``) and so are the rollups of their hours.
"""

from __future__ import annotations

import random
import time
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
from twin.core.settings import AuthSettings, ReadingsSettings, Settings

MARK = timedelta(microseconds=321_987)
STREET = "500112002"
STREET_KEY = "hourly-street-key-0123456789"
pytestmark = pytest.mark.usefixtures("forget_posted_readings", "forget_rollups")
COLUMNS = ["count", "min", "max", "sum", "avg", "first_ts", "last_ts"]


@pytest.fixture(scope="module")
def forget_rollups(engine: Engine) -> Iterator[None]:
    """After the module, the rollups of the years this module writes are gone again."""
    yield
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM sensor_readings_hourly WHERE hour < '2008-01-01'"))


@pytest.fixture(scope="module")
def live(engine: Engine, database_url: str) -> Iterator[LiveServer]:
    keys = {STREET_KEY: f"viewer:hourly-street:street={STREET}"}
    auth = AuthSettings(keys=keys, anonymous_role="")
    with LiveServer(Settings(database_url=database_url, auth=auth)) as server:
        yield server


maintain = run_maintenance


def make_days(engine: Engine, first: datetime, days: int) -> None:
    with engine.begin() as conn:
        conn.execute(text("SELECT twin_readings_make_partitions(:a, :b)"),
                     {"a": first, "b": first + timedelta(days=days - 1)})


def insert(engine: Engine, rows: list[tuple[int, datetime, float]]) -> None:
    with engine.begin() as conn:
        conn.execute(text("""
            INSERT INTO sensor_readings (sensor_id, ts, value)
            SELECT * FROM unnest(CAST(:s AS int[]), CAST(:t AS timestamptz[]),
                                 CAST(:v AS float8[]))"""),
                     {"s": [r[0] for r in rows], "t": [r[1] for r in rows],
                      "v": [r[2] for r in rows]})


def random_rows(rng: random.Random, sensors: list[int], first: datetime, hours: int,
                low: float = -5.0, high: float = 40.0) -> list[tuple[int, datetime, float]]:
    """Up to 12 readings per sensor and hour (some hours none), distinct instants, values in
    [low, high]."""
    rows = []
    for sensor in sensors:
        for hour in range(hours):
            start = first + timedelta(hours=hour)
            for minute in sorted(rng.sample(range(60), rng.choice([0, 1, 2, 5, 12]))):
                rows.append((sensor, start + timedelta(minutes=minute) + MARK,
                             round(rng.uniform(low, high), 3)))
    return rows


def oracle(rows: list[tuple[int, datetime, float]]) -> pd.DataFrame:
    """The hourly rollup of ``rows``, by pandas."""
    frame = pd.DataFrame(rows, columns=["sensor_id", "ts", "value"])
    frame["ts"] = pd.to_datetime(frame["ts"], utc=True)
    frame["hour"] = frame["ts"].dt.floor("h")
    out = frame.groupby(["sensor_id", "hour"]).agg(
        count=("value", "size"), min=("value", "min"), max=("value", "max"),
        sum=("value", "sum"), avg=("value", "mean"), first_ts=("ts", "min"),
        last_ts=("ts", "max"))
    return out.sort_index()


def stored(engine: Engine, sensors: list[int], start: datetime, end: datetime) -> pd.DataFrame:
    with engine.connect() as conn:
        frame = pd.read_sql(text("""
            SELECT sensor_id, hour, count, min, max, sum, avg, first_ts, last_ts
              FROM sensor_readings_hourly
             WHERE sensor_id = ANY(:s) AND hour >= :a AND hour < :b"""), conn,
            params={"s": sensors, "a": start, "b": end})
    for column in ("hour", "first_ts", "last_ts"):
        frame[column] = pd.to_datetime(frame[column], utc=True)
    return frame.set_index(["sensor_id", "hour"]).sort_index()


def assert_same(got: pd.DataFrame, want: pd.DataFrame) -> None:
    assert list(got.index) == list(want.index)
    assert (got["count"] == want["count"]).all()
    for column in ("min", "max", "sum", "avg"):
        assert got[column].to_numpy() == pytest.approx(want[column].to_numpy(), rel=1e-12,
                                                       abs=1e-9), column
    for column in ("first_ts", "last_ts"):
        assert (got[column] == want[column]).all(), column


def pick(sensors: pd.DataFrame, kind: str, count: int, skip: int = 0) -> list[int]:
    return [int(s) for s in sensors.index[sensors["kind"] == kind][skip:skip + count]]


# --- rolling up ------------------------------------------------------------------------------

def test_rollups_match_a_pandas_groupby_and_a_second_run_rolls_nothing_again(
        engine: Engine, database_url: str, sensors: pd.DataFrame):
    first = datetime(2005, 6, 1, tzinfo=UTC)
    make_days(engine, first, 3)
    chosen = pick(sensors, "flow", 3) + pick(sensors, "level", 2)
    rows = random_rows(random.Random(15), chosen, first, 3 * 24)
    insert(engine, rows)
    report = maintain(database_url, ReadingsSettings())
    assert report.rollup is not None
    days = {f"sensor_readings_p2005_06_0{k}" for k in (1, 2, 3)}
    assert days <= set(report.rollup.partitions)
    assert_same(stored(engine, chosen, first, first + timedelta(days=3)), oracle(rows))
    with engine.connect() as conn:
        # Hours are whole UTC hours; every stored row has readings.
        odd = conn.execute(text("""
            SELECT count(*) FROM sensor_readings_hourly
             WHERE hour <> date_trunc('hour', hour, 'UTC') OR count < 1""")).scalar()
        assert odd == 0
    # Nothing changed in those days: a later run leaves them alone (the counters settle
    # within a second or so of the inserting transaction's end).
    deadline = time.monotonic() + 15
    while True:
        again = maintain(database_url, ReadingsSettings())
        assert again.rollup is not None
        if days.isdisjoint(again.rollup.partitions) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert days.isdisjoint(again.rollup.partitions), again.rollup


def test_late_readings_are_folded_into_hours_already_rolled_up(
        engine: Engine, database_url: str, sensors: pd.DataFrame, live: LiveServer):
    first = datetime(2005, 7, 10, tzinfo=UTC)
    make_days(engine, first, 2)
    chosen = pick(sensors, "pressure", 3)
    # Within every chosen sensor's range (the ingest checks it).
    low = float(sensors.loc[chosen, "min_value"].max())
    high = float(sensors.loc[chosen, "max_value"].min())
    span = high - low
    rows = random_rows(random.Random(7), chosen, first, 48, low + 0.2 * span, high)
    insert(engine, rows)
    maintain(database_url, ReadingsSettings())
    assert_same(stored(engine, chosen, first, first + timedelta(days=2)), oracle(rows))
    # Late: a reading into an hour already rolled up (a new minimum), one into an hour that
    # had none, over HTTP through the ingest, and a second batch straight into the table.
    sensor = chosen[0]
    late = [(sensor, first + timedelta(hours=5, minutes=30, seconds=7) + MARK, low),
            (sensor, first + timedelta(hours=30, seconds=11) + MARK, low + 0.5 * span)]
    have = {(s, t) for s, t, _ in rows}
    late = [r for r in late if (r[0], r[1]) not in have]
    with Client(base_url=live.url, timeout=60, headers=EDITOR) as client:
        answer = client.post("/sensors/readings", json={"readings": [
            {"sensor_id": s, "ts": t.isoformat(), "value": v} for s, t, v in late]})
    assert answer.status_code == 200 and answer.json()["accepted"] == len(late), answer.text
    more = [(chosen[1], first + timedelta(hours=h, minutes=59, seconds=59) + MARK, 1.25)
            for h in (0, 47)]
    insert(engine, more)
    everything = oracle(rows + late + more)
    # Folded in by a run once the day's counter has moved (at most a second or so).
    deadline = time.monotonic() + 15
    while True:
        maintain(database_url, ReadingsSettings())
        got = stored(engine, chosen, first, first + timedelta(days=2))
        if len(got) == len(everything) and (got["count"] == everything["count"]).all():
            break
        assert time.monotonic() < deadline, "late readings not folded in"
        time.sleep(0.3)
    assert_same(got, everything)
    hour = pd.Timestamp(first + timedelta(hours=5))
    assert got.at[(sensor, hour), "min"] == low


def test_raw_retention_never_drops_an_hour_not_rolled_up(
        engine: Engine, database_url: str, sensors: pd.DataFrame):
    first = datetime(2006, 3, 1, tzinfo=UTC)
    make_days(engine, first, 2)
    chosen = pick(sensors, "gas", 2)
    rows = random_rows(random.Random(3), chosen, first, 24)
    insert(engine, rows)
    maintain(database_url, ReadingsSettings())
    # A late reading, then at once (before the statistics can count it) a run whose raw
    # retention drops its day: it is rolled up first, as is the day never rolled up.
    late = [(chosen[0], first + timedelta(hours=2, seconds=1) + MARK, 123.0)]
    never = random_rows(random.Random(4), chosen, first + timedelta(days=1), 24)
    insert(engine, late + never)
    report = maintain(database_url, ReadingsSettings(retention_days=3650))
    parts = {"sensor_readings_p2006_03_01", "sensor_readings_p2006_03_02"}
    assert parts <= set(report.dropped)
    assert report.rollup is not None and parts <= set(report.rollup.partitions)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM sensor_readings WHERE ts >= :a "
                                 "AND ts < :b"), {"a": first, "b": first + timedelta(days=2)}
                            ).scalar() == 0
    assert_same(stored(engine, chosen, first, first + timedelta(days=2)),
                oracle(rows + late + never))
    # The raw days are gone, their rollups stay (and the keeper forgot the dropped days).
    report = maintain(database_url, ReadingsSettings())
    assert_same(stored(engine, chosen, first, first + timedelta(days=2)),
                oracle(rows + late + never))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM sensor_readings_rollup_seen "
                                 "WHERE name LIKE 'sensor_readings_p2006_03_%'")).scalar() == 0
        assert conn.execute(text("SELECT retention FROM partman.part_config "
                                 "WHERE parent_table = 'public.sensor_readings'")).scalar() is None


def test_rollup_retention_drops_old_rollups_and_keeps_newer(
        engine: Engine, database_url: str, sensors: pd.DataFrame):
    old, newer = datetime(2007, 1, 5, tzinfo=UTC), datetime(2007, 2, 5, tzinfo=UTC)
    chosen = pick(sensors, "flow", 2, skip=4)
    for day in (old, newer):
        make_days(engine, day, 1)
    rows_old = random_rows(random.Random(11), chosen, old, 24)
    rows_new = random_rows(random.Random(12), chosen, newer, 24)
    insert(engine, rows_old + rows_new)
    maintain(database_url, ReadingsSettings())
    assert len(stored(engine, chosen, old, old + timedelta(days=1))) == len(oracle(rows_old))
    # Keep the rollups of hours that start after (today - days): newer's day inside, old's
    # outside.
    today = datetime.now(UTC)
    days = (today - (old + timedelta(days=10))).days
    report = maintain(database_url, ReadingsSettings(rollup_retention_days=days))
    assert report.rollup is not None and report.rollup.expired >= len(oracle(rows_old))
    assert stored(engine, chosen, old, old + timedelta(days=1)).empty
    assert_same(stored(engine, chosen, newer, newer + timedelta(days=1)), oracle(rows_new))
    # A day past rollup retention is not rolled up again while its raw readings stay.
    report = maintain(database_url, ReadingsSettings(rollup_retention_days=days))
    assert report.rollup is not None
    assert "sensor_readings_p2007_01_05" not in report.rollup.partitions
    assert stored(engine, chosen, old, old + timedelta(days=1)).empty
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM sensor_readings_hourly WHERE hour < "
                                 "now() - make_interval(days => :d) - interval '1 hour'"),
                            {"d": days}).scalar() == 0


# --- the read route ----------------------------------------------------------------------------

def street_sensors(engine: Engine) -> tuple[list[int], list[int]]:
    """(sensors inside STREET, sensors outside), by shapely."""
    with engine.connect() as conn:
        street = gpd.read_postgis(text("SELECT geom FROM admin_units WHERE code = :c"), conn,
                                  params={"c": STREET}, geom_col="geom").geometry.iloc[0]
        points = gpd.read_postgis(text("SELECT id, geom FROM sensors ORDER BY id"), conn,
                                  geom_col="geom")
    inside = [int(i) for i, g in zip(points["id"], points.geometry, strict=True)
              if shapely.intersects(street, g)]
    outside = [int(i) for i in points["id"] if int(i) not in set(inside)]
    return inside, outside


def test_the_hourly_route_answers_the_rollups_within_the_jurisdiction(
        engine: Engine, database_url: str, live: LiveServer):
    inside, outside = street_sensors(engine)
    assert inside and outside
    first = datetime(2005, 9, 20, tzinfo=UTC)
    make_days(engine, first, 1)
    rows = random_rows(random.Random(20), [inside[0], outside[0]], first, 24)
    insert(engine, rows)
    maintain(database_url, ReadingsSettings())
    want = oracle(rows)
    window = {"start": first.isoformat(), "end": (first + timedelta(days=1)).isoformat()}
    with Client(base_url=live.url, timeout=60,
                headers={"Authorization": f"Bearer {STREET_KEY}"}) as viewer:
        answer = viewer.get(f"/sensors/{inside[0]}/readings/hourly", params=window)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        mine = want.loc[inside[0]]
        assert body["sensor_id"] == inside[0] and body["numberReturned"] == len(mine)
        got = pd.DataFrame(body["hours"])
        for column in ("hour", "first_ts", "last_ts"):
            got[column] = pd.to_datetime(got[column], utc=True)
        got = got.set_index("hour")
        assert list(got.index) == list(mine.index)
        assert (got["count"] == mine["count"]).all()
        assert got["avg"].to_numpy() == pytest.approx(mine["avg"].to_numpy())
        assert got["min"].to_numpy() == pytest.approx(mine["min"].to_numpy())
        assert (got["last_ts"] == mine["last_ts"]).all()
        # Half-open: an end at the first hour's start answers nothing of that day.
        empty = viewer.get(f"/sensors/{inside[0]}/readings/hourly",
                           params={"start": (first - timedelta(days=1)).isoformat(),
                                   "end": first.isoformat()})
        assert empty.status_code == 200 and empty.json()["hours"] == []
        # Outside the street: not found, as the other sensor reads answer.
        elsewhere = viewer.get(f"/sensors/{outside[0]}/readings/hourly", params=window)
        assert elsewhere.status_code == 404 and elsewhere.json()["code"]
        # No window: the hours of the last 7 days.
        recent = viewer.get(f"/sensors/{inside[0]}/readings/hourly")
        assert recent.status_code == 200
        assert all(pd.Timestamp(h["hour"]) >= pd.Timestamp.now(tz="UTC") - pd.Timedelta(days=7,
                                                                                      hours=1)
                   for h in recent.json()["hours"])
        # Bad windows.
        for params in ({"start": "yesterday"}, {"start": "2005-09-20T00:00:00"},
                       {"start": window["end"], "end": window["start"]},
                       {"start": "2004-01-01T00:00:00Z", "end": "2005-09-21T00:00:00Z"},
                       {"end": "0001-01-02T00:00:00Z"}):
            bad = viewer.get(f"/sensors/{inside[0]}/readings/hourly", params=params)
            assert bad.status_code == 400, params
            assert set(bad.json()) >= {"code", "description"}
    with Client(base_url=live.url, timeout=60, headers=EDITOR) as city:
        other = city.get(f"/sensors/{outside[0]}/readings/hourly", params=window)
        assert other.status_code == 200
        assert other.json()["numberReturned"] == len(want.loc[outside[0]])
        assert city.get("/sensors/987654/readings/hourly", params=window).status_code == 404
    with Client(base_url=live.url, timeout=60) as nobody:
        refused = nobody.get(f"/sensors/{inside[0]}/readings/hourly", params=window)
        assert refused.status_code == 401

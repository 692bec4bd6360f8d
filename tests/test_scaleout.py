"""twin on several machines' worth of parts (issue 15): `twin cluster up --nodes 2 --standbys 1`
on a home of the test's own (the primary, a hot standby, two `twin serve` nodes, nginx in
front), loaded with the small sample city, driven over HTTP as clients would.

Oracles: the primary read directly (what a write stored), the nodes asked directly (what a
principal's tile holds, bypassing the cache), decoded tiles, nginx's X-Cache-Status and
access log (which node answered), and the push stream itself.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import mapbox_vector_tile
import morecantile
import pandas as pd
import psycopg
import pytest
import shapely
from sqlalchemy import create_engine

from data_samples.load import load_sample
from tests.brokers import Publisher
from tests.clusters import ClusterHome, cluster_home
from tests.databases import libpq
from tests.sse import EventStream
from tests.uploads import wait

NODES, STANDBYS = 2, 1
WEB_MERCATOR = morecantile.tms.get("WebMercatorQuad")
# Every key may make this many requests in the module (no refill to speak of): the rate
# limit test spends one key's exactly; the others stay well below.
BURST = 700
ITEMS = "/collections/risk_points/items"
MERGE = {"Content-Type": "application/merge-patch+json"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def keys_of(districts: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Each principal's key, and the keys setting (key -> role:name[:scope])."""
    keys = {"viewer": "scale-viewer-city-0123456789", "editor": "scale-editor-city-0123456789",
            "planner": "scale-planner-city-0123456789",
            "limited": "scale-limited-city-0123456789",
            **{f"district{n}": f"scale-district{n}-0123456789" for n in range(len(districts))}}
    roles = {"viewer": "viewer:sv", "editor": "gis-editor:se", "planner": "planner:sp",
             "limited": "viewer:sl",
             **{f"district{n}": f"viewer:sd{n}:district={code}"
                for n, code in enumerate(districts)}}
    return keys, {keys[who]: role for who, role in roles.items()}


class Scaled:
    """The running cluster (``home``), its principals' keys and the primary."""

    def __init__(self, home: ClusterHome, keys: dict[str, str], districts: list[str]):
        self.home, self.keys, self.districts = home, keys, districts
        self.env, self.url, self.port = home.env, home.url, home.port
        self.mqtt_url = home.mqtt_url
        self.topology, self.node_url = home.topology, home.node_url

    def client(self, who: str, base: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=base or self.url, timeout=30, headers=bearer(self.keys[who]))

    def primary(self) -> psycopg.Connection:
        return psycopg.connect(libpq(self.topology().cluster.url()), autocommit=True)


def busiest_districts(sample_dir: Path, count: int = 2) -> list[str]:
    frame = pd.read_csv(sample_dir / "risk_points.csv", dtype={"grid_code": str})
    return frame.grid_code.str[:6].value_counts().index[:count].tolist()


@pytest.fixture(scope="module")
def scaled(sample_dir: Path) -> Iterator[Scaled]:
    districts = busiest_districts(sample_dir)
    keys, setting = keys_of(districts)
    with cluster_home(NODES, STANDBYS, "twin-scaleout-test-", {
            "TWIN_AUTH_ANONYMOUS_ROLE": "", "TWIN_AUTH_KEYS": json.dumps(setting),
            "TWIN_LIMITS_BURST": str(BURST), "TWIN_LIMITS_RATE_PER_S": "0.001"}) as home:
        engine = create_engine(home.topology().cluster.url())
        load_sample(engine, sample_dir)
        engine.dispose()
        yield Scaled(home, keys, districts)


def decode(content: bytes) -> dict:
    return mapbox_vector_tile.decode(content)


def point_ids(content: bytes) -> set[int]:
    return {feature["id"] for feature in decode(content).get("risk_points", {}).get(
        "features", [])}


# --- the shared cache ---------------------------------------------------------------------

def test_a_district_never_receives_a_tile_cached_for_another(scaled: Scaled, sample_dir):
    frame = pd.read_csv(sample_dir / "risk_points.csv", dtype={"grid_code": str})
    points = shapely.from_wkb(frame["geom"])
    frame = frame.assign(lon=shapely.get_x(points), lat=shapely.get_y(points))
    first, second = scaled.districts
    # A tile holding points of the first district at a zoom where points are sent as points.
    mine = frame[frame.grid_code.str.startswith(first)]
    tile = WEB_MERCATOR.tile(mine.lon.iloc[0], mine.lat.iloc[0], 15)
    with scaled.client("district0") as one, scaled.client("district1") as two, \
            scaled.client("viewer") as city:
        answers: dict[str, list[httpx.Response]] = {}
        for who, client in (("district0", one), ("district1", two), ("city", city)):
            template = client.get("/tiles/risk_points/tilejson.json").json()["tiles"][0]
            url = template.replace("{z}", str(tile.z)).replace("{x}", str(tile.x)).replace(
                "{y}", str(tile.y))
            answers[who] = [client.get(url) for _ in range(3)]
            for answer in answers[who]:
                assert answer.status_code == 200, answer.text
                assert "immutable" in answer.headers["cache-control"]
            assert [a.headers["x-cache-status"] for a in answers[who]] == ["MISS", "HIT", "HIT"]
            # The oracle: the same principal's tile from a node directly (no cache).
            with scaled.client("district0" if who == "district0" else
                               "district1" if who == "district1" else "viewer",
                               scaled.node_url(1)) as direct:
                assert direct.get(url).content == answers[who][0].content, who
            assert len({a.content for a in answers[who]}) == 1
    firsts = point_ids(answers["district0"][0].content)
    seconds = point_ids(answers["district1"][0].content)
    everyone = point_ids(answers["city"][0].content)
    by_id = frame.set_index("id").grid_code
    assert firsts and all(by_id[i].startswith(first) for i in firsts)
    assert all(by_id[i].startswith(second) for i in seconds)
    assert firsts <= everyone and not firsts & seconds


def test_the_tile_cache_holds_no_key(scaled: Scaled):
    cache = scaled.home.home / "nginx" / "cache"
    keys = [line for path in cache.rglob("*") if path.is_file()
            for line in path.read_bytes().split(b"\n") if line.startswith(b"KEY: ")]
    assert keys
    assert not any(key.encode() in line for key in scaled.keys.values() for line in keys)


# --- shared state -------------------------------------------------------------------------

def test_a_key_gets_exactly_its_limit_across_both_nodes_then_429(scaled: Scaled):
    """Tiles (charged once, by nginx's /_twin/auth, cached or not) and other reads alike."""
    topology = scaled.topology()
    log = topology.proxy.access_log
    start = len(log.read_text().splitlines())
    with scaled.client("limited") as client:
        template = client.get("/tiles/roads/tilejson.json").json()["tiles"][0]
        statuses = []
        for i in range(BURST + 10):
            if i % 2:
                statuses.append(client.get("/collections").status_code)
            else:
                url = template.replace("{z}", "12").replace("{x}", str(3300 + i % 7)).replace(
                    "{y}", "1700")
                statuses.append(client.get(url).status_code)
    counted = Counter(statuses)
    # The TileJSON request counted too.
    assert counted == {200: BURST - 1, 429: 11}, counted
    assert statuses[:BURST - 1] == [200] * (BURST - 1)
    served = Counter(re.findall(r'upstream="127\.0\.0\.1:(\d+)', line)[0]
                     for line in log.read_text().splitlines()[start:] if 'upstream="1' in line)
    assert set(served) == {str(scaled.port + n) for n in range(1, NODES + 1)}, served


def test_an_event_created_through_one_node_reaches_a_stream_on_the_other(scaled: Scaled,
                                                                           sample_dir):
    frame = pd.read_csv(sample_dir / "risk_points.csv")
    spot = shapely.from_wkb(frame["geom"].iloc[0])
    with scaled.client("planner", scaled.node_url(2)) as on_b, \
            scaled.client("planner", scaled.node_url(1)) as on_a:
        with EventStream(on_b, "/events/stream") as stream:
            assert stream.response is not None and stream.response.status_code == 200
            created = on_a.post("/events", json={"lon": spot.x, "lat": spot.y, "kind": "fire",
                                                 "description": "跨节点推送测试"})
            assert created.status_code == 201, created.text
            event_id = created.json()["id"]
            got = stream.until(lambda event: event.event == "event"
                               and event.json()["payload"].get("id") == event_id, timeout=10)
    assert got[-1].json()["payload"]["id"] == event_id


def mqtt_roles(scaled: Scaled) -> dict[int, str | None]:
    roles = {}
    for n in range(1, NODES + 1):
        try:
            health = httpx.get(f"{scaled.node_url(n)}/healthz", timeout=5).json()
        except httpx.HTTPError:
            roles[n] = None
            continue
        roles[n] = (health.get("mqtt") or {}).get("role")
    return roles


def stored_readings(scaled: Scaled, sensor_id: int, since: str) -> int:
    with scaled.primary() as conn:
        return conn.execute("SELECT count(*) FROM sensor_readings WHERE sensor_id = %s "
                            "AND ts >= %s AND ts < %s::timestamptz + interval '1 day'",
                            (sensor_id, since, since)).fetchone()[0]


def wait_for(check, timeout_s: float = 30):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def test_one_node_subscribes_to_mqtt_and_another_takes_over_when_it_dies(scaled: Scaled,
                                                                          sample_dir):
    """Readings published to the cluster's broker are stored once (one node subscribes),
    and after that node is SIGKILLed the other resumes the session: none is lost."""
    sensor_id = int(pd.read_csv(sample_dir / "sensors.csv")["id"].iloc[0])
    def settled() -> dict[int, str | None] | None:
        roles = mqtt_roles(scaled)
        return roles if sorted(map(str, roles.values())) == ["standby", "subscriber"] else None

    roles = wait_for(settled)
    assert roles, mqtt_roles(scaled)
    leader = next(n for n, role in roles.items() if role == "subscriber")
    since = "2025-06-02T00:00:00Z"  # a day the sample has no readings of
    publisher = Publisher(scaled.mqtt_url)
    try:
        def batch(start: int) -> dict:
            return {"readings": [{"sensor_id": sensor_id, "value": 1.0,
                                  "ts": f"2025-06-02T00:{(start + i) // 60:02d}:"
                                        f"{(start + i) % 60:02d}Z"} for i in range(60)]}
        for k in range(5):
            publisher.send("twin/readings/scaleout", batch(60 * k))
        assert wait_for(lambda: stored_readings(scaled, sensor_id, since) == 300), ([
            httpx.get(f"{scaled.node_url(n)}/healthz").json().get("mqtt")
            for n in range(1, NODES + 1)], stored_readings(scaled, sensor_id, since))
        pid = scaled.topology().status().nodes[leader - 1].pid
        assert pid is not None
        os.killpg(pid, signal.SIGKILL)
        for k in range(5, 10):  # acknowledged by the broker while nobody subscribes
            publisher.send("twin/readings/scaleout", batch(60 * k))
        assert wait_for(lambda: stored_readings(scaled, sensor_id, since) == 600, 60), \
            stored_readings(scaled, sensor_id, since)
        survivor = next(n for n in roles if n != leader)
        assert mqtt_roles(scaled)[survivor] == "subscriber"
    finally:
        publisher.close()
        up = scaled.home.up(NODES, STANDBYS)
        assert up.returncode == 0, up.stderr


# --- read-your-writes through nginx ---------------------------------------------------------

def test_writes_are_read_back_through_nginx_never_stale(scaled: Scaled, sample_dir):
    """150 risk-point edits, 52 event transitions and 5 upload publishes, each read back at
    once through nginx (any node, reading a standby where it has replayed the write): 0 stale
    reads."""
    frame = pd.read_csv(sample_dir / "risk_points.csv")
    point_id = int(frame["id"].iloc[0])
    spot = shapely.from_wkb(frame["geom"].iloc[0])
    stale = []
    with scaled.client("editor") as editor:
        for trial in range(150):
            level = 1 + trial % 4
            got = editor.get(f"{ITEMS}/{point_id}")
            written = editor.patch(f"{ITEMS}/{point_id}",
                                   json={"properties": {"level": level}},
                                   headers={**MERGE, "If-Match": got.headers["etag"]})
            assert written.status_code == 200, written.text
            read = editor.get(f"{ITEMS}/{point_id}")
            if read.json()["properties"]["level"] != level:
                stale.append(("point", trial))
    with scaled.client("planner") as planner:
        trials = 0
        while trials < 52:
            created = planner.post("/events", json={"lon": spot.x, "lat": spot.y,
                                                    "kind": "fire", "description": "读写一致"})
            assert created.status_code == 201, created.text
            event_id = created.json()["id"]
            for to in ("responded", "verified", "handled", "closed"):
                moved = planner.post(f"/events/{event_id}/transitions", json={"to": to})
                assert moved.status_code == 200, moved.text
                if planner.get(f"/events/{event_id}").json()["status"] != to:
                    stale.append(("event", trials))
                trials += 1
    with scaled.client("editor") as editor:
        # Upload publishes: each new version's job followed through nginx (GET /jobs reads
        # the primary and hands out a token), then the layer and its features read back.
        layer_id = None
        for trial in range(5):
            body = {"file": ("trial.geojson", trial_layer(trial))}
            started = (editor.post("/layers", files=body, data={"title": "读写一致"})
                       if layer_id is None else editor.put(f"/layers/{layer_id}", files=body))
            assert started.status_code == 202, started.text
            job = wait(editor, started.json())
            assert job["state"] == "succeeded", job
            layer_id = job["layer_id"]
            layer = editor.get(f"/layers/{layer_id}").json()
            items = editor.get(f"/collections/{layer_id}/items").json()["features"]
            if (layer["current_version"] != trial + 1
                    or {f["properties"]["trial"] for f in items} != {trial}):
                stale.append(("upload", trial))
    assert stale == []
    with scaled.primary() as conn:
        assert conn.execute("SELECT level FROM risk_points WHERE id = %s",
                            (point_id,)).fetchone() == (1 + 149 % 4,)


def trial_layer(trial: int) -> bytes:
    """A small GeoJSON layer whose features say which trial wrote them."""
    return json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"trial": trial, "n": n},
         "geometry": {"type": "Point", "coordinates": [106.55 + n / 100, 29.56]}}
        for n in range(3)]}).encode()


# --- 3D Tiles read on a standby only at their versions ---------------------------------------

def test_a_3d_tileset_read_while_the_standby_lags_is_of_the_new_data(scaled: Scaled):
    """Replay paused on the standby, the tallest building raised 1,000 m on the primary: the
    tileset a node answers next (its root's height range read on a standby only when that
    holds the buildings' new version) reaches the new height."""
    topology = scaled.topology()
    (standby,) = topology.standbys()
    path = "/collections/buildings/3dtiles/tileset.json"
    with scaled.client("viewer", scaled.node_url(1)) as node:
        before = node.get(path).json()
        top = before["root"]["children"][0]["boundingVolume"]["region"][5] \
            if "children" in before["root"] else before["root"]["boundingVolume"]["region"][5]
        with psycopg.connect(libpq(standby.url("twin")), autocommit=True) as on_standby, \
                scaled.primary() as primary:
            on_standby.execute("SELECT pg_wal_replay_pause()")
            try:
                tallest = primary.execute(
                    "UPDATE buildings SET height_m = height_m + 1000 WHERE id = (SELECT id "
                    "FROM buildings ORDER BY height_m DESC LIMIT 1) RETURNING id").fetchone()[0]
                deadline = time.monotonic() + 10
                while (after := node.get(path).json())["asset"]["tilesetVersion"] == \
                        before["asset"]["tilesetVersion"]:
                    assert time.monotonic() < deadline, "the write never reached the node"
                    time.sleep(0.05)
                region = (after["root"]["children"][0]["boundingVolume"]["region"]
                          if "children" in after["root"]
                          else after["root"]["boundingVolume"]["region"])
                assert region[5] >= top + 900, (top, region)
            finally:
                on_standby.execute("SELECT pg_wal_replay_resume()")
                primary.execute("UPDATE buildings SET height_m = height_m - 1000 WHERE id = %s",
                                (tallest,))

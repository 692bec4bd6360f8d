"""pipe-anomalies scored against the small sample's injected ground truth.

The detector reads only the database; the truth file (``anomalies_truth.json``) is the
oracle. Matching and scoring are benchmarks/anomalies.py's, so the test and the full-scale
benchmark count the same way. What a zone affects is checked against shapely/geopandas.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import geopandas as gpd
import httpx
import numpy as np
import pandas as pd
import pytest
import shapely
from httpx import Client
from sqlalchemy import Engine, text

from benchmarks.anomalies import score
from tests.databases import on_own_connection
from twin.queries.anomalies import BUFFER_M, Zone, group_medians, zone_impacts

NETWORKS = ("drainage", "water", "gas")
# Chongqing lies in UTM zone 48N: metres for the buffer oracle.
UTM = "EPSG:32648"
# Features this close to a zone's edge may fall either way between two buffer algorithms.
EDGE_M = 0.5


@pytest.fixture(scope="module")
def truth(sample_dir: Path) -> dict:
    return json.loads((sample_dir / "anomalies_truth.json").read_text())


@pytest.fixture(scope="module")
def answers(server) -> dict[str, dict]:
    """Each network's zones over the default window (the last 24 hours of data)."""
    answers = {}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for network in NETWORKS:
            response = client.get("/query/pipe-anomalies", params={"network": network})
            assert response.status_code == 200, response.text
            answers[network] = response.json()
    return answers


def test_zones_match_the_injected_anomalies(answers, truth):
    """Precision and recall >= 0.9 on every network (the small sample has two per network)."""
    for network in NETWORKS:
        expected = [a for a in truth["anomalies"] if a["network"] == network]
        assert expected, network
        result = score(answers[network]["features"], expected)
        assert result["precision"] >= 0.9, (network, result)
        assert result["recall"] >= 0.9, (network, result)
        assert result["source_on_affected"] == 1.0, (network, result)


def test_noise_spikes_do_not_become_zones(answers, truth):
    spiked = {s["sensor_id"] for s in truth["noise_spikes"]}
    for network in NETWORKS:
        for zone in answers[network]["features"]:
            assert not spiked & set(zone["properties"]["sensor_ids"]), zone["id"]


def test_zone_times_lie_within_the_anomaly(answers, truth):
    step = timedelta(minutes=5)
    for network in NETWORKS:
        for zone in answers[network]["features"]:
            props = zone["properties"]
            anomaly = next(a for a in truth["anomalies"]
                           if set(a["affected_sensor_ids"]) & set(props["sensor_ids"]))
            assert datetime.fromisoformat(anomaly["start"]) <= datetime.fromisoformat(
                props["start"]) <= datetime.fromisoformat(anomaly["start"]) + 4 * step
            assert datetime.fromisoformat(props["end"]) < datetime.fromisoformat(anomaly["end"])
            assert props["severity"] > 0 and props["severity_level"] in (
                "minor", "moderate", "major")
            assert props["source_segment_id"] in props["affected_segment_ids"]


def test_default_window_is_the_last_24_hours_of_data(answers, engine: Engine):
    for network in NETWORKS:
        newest = pd.read_sql(text(
            "SELECT max(r.ts) AS ts FROM sensor_readings r JOIN sensors s ON s.id = r.sensor_id "
            "WHERE s.network = :network"), engine, params={"network": network})["ts"][0]
        query = answers[network]["query"]
        assert datetime.fromisoformat(query["until"]) == newest.to_pydatetime()
        assert (datetime.fromisoformat(query["until"])
                - datetime.fromisoformat(query["since"])) == timedelta(hours=24)


def test_a_narrow_window_finds_only_the_anomalies_in_it(client: Client, truth):
    anomaly = next(a for a in truth["anomalies"] if a["network"] == "water")
    since = datetime.fromisoformat(anomaly["start"]) - timedelta(minutes=30)
    until = datetime.fromisoformat(anomaly["end"]) + timedelta(minutes=30)
    body = client.get("/query/pipe-anomalies", params={
        "network": "water", "since": since.isoformat(), "until": until.isoformat()}).json()
    inside = [a for a in truth["anomalies"] if a["network"] == "water"
              and datetime.fromisoformat(a["start"]) < until
              and datetime.fromisoformat(a["end"]) > since]
    result = score(body["features"], inside)
    assert result["precision"] == result["recall"] == 1.0, result
    # Times come back in the caller's offset.
    assert body["features"][0]["properties"]["start"].endswith(anomaly["start"][-6:])


@pytest.fixture(scope="module")
def places(engine: Engine) -> dict[str, gpd.GeoDataFrame]:
    def frame(sql: str) -> gpd.GeoDataFrame:
        return gpd.read_postgis(text(sql), engine, geom_col="geom").to_crs(UTM)

    return {
        "segments": frame("SELECT id, geom FROM pipe_segments"),
        "communities": frame("SELECT code, geom FROM admin_units WHERE level = 'community'"),
        "risk_points": frame("SELECT id, level, geom FROM risk_points"),
        "buildings": frame("SELECT id, geom FROM buildings"),
    }


def _inside(frame: gpd.GeoDataFrame, zone: shapely.Geometry) -> tuple[set, set]:
    """(surely inside, inside or on the edge) index labels of ``frame`` against ``zone``."""
    return (set(frame.index[frame.intersects(zone.buffer(-EDGE_M))]),
            set(frame.index[frame.intersects(zone.buffer(EDGE_M))]))


def _check_impact(geometry: dict, communities, risk_points, buildings, segment_ids, places):
    pipes = places["segments"].set_index("id").loc[segment_ids].union_all()
    expected = pipes.buffer(BUFFER_M, quad_segs=16)
    got = gpd.GeoSeries([shapely.geometry.shape(geometry)], crs="EPSG:4326").to_crs(UTM)[0]
    assert got.symmetric_difference(expected).area < 0.03 * expected.area
    for name, key, answer in (("communities", "code", {c["code"] for c in communities}),
                              ("risk_points", "id", set(risk_points["ids"])),
                              ("buildings", "id", None)):
        frame = places[name].set_index(key)
        sure, maybe = _inside(frame, expected)
        if answer is None:
            assert len(sure) <= buildings <= len(maybe)
        else:
            assert sure <= answer <= maybe, name
    assert risk_points["count"] == len(risk_points["ids"])
    assert sum(risk_points["by_level"].values()) == risk_points["count"]


def test_what_each_zone_affects_agrees_with_shapely(answers, places):
    for network in NETWORKS:
        for zone in answers[network]["features"]:
            props = zone["properties"]
            _check_impact(zone["geometry"], props["communities"], props["risk_points"],
                          props["buildings"]["count"], props["affected_segment_ids"], places)


def test_impacts_of_a_large_zone_agree_with_shapely(database_url: str, engine: Engine, places):
    """The sample's zones touch few places; a zone of 60 central drainage pipes touches many."""
    ids = list(pd.read_sql(text(
        "SELECT id FROM pipe_segments WHERE network = 'drainage' ORDER BY id LIMIT 60"),
        engine)["id"])

    row = on_own_connection(database_url,
                            lambda conn: zone_impacts(conn, [Zone([], ids[0], ids)]))[0]
    assert row.risk_points["count"] + row.buildings + len(row.communities) > 0
    _check_impact(json.loads(row.geometry), row.communities, row.risk_points, row.buildings,
                  ids, places)


def test_group_medians_agree_with_pandas():
    """Sensors with different reading counts (odd, even, one) against a pandas groupby."""
    rng = np.random.default_rng(3)
    counts = rng.choice([1, 2, 287, 288, 289, 1000], size=300)
    values = rng.normal(size=counts.sum())
    groups = np.repeat(np.arange(counts.size), counts)
    expected = pd.Series(values).groupby(groups).median().to_numpy()
    assert np.allclose(group_medians(values, counts), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("params, name", [
    ({"network": "sewage"}, "network"),
    ({"since": "yesterday"}, "since"),
    ({"until": "2026-11-20T25:00:00+08:00"}, "until"),
    ({"since": "2026-11-20T08:00:00"}, "since"),
    ({"since": "2026-11-20T12:00:00+08:00", "until": "2026-11-20T08:00:00+08:00"}, "since"),
    ({"since": "2026-11-01T00:00:00+08:00", "until": "2026-11-20T00:00:00+08:00"}, "since"),
])
def test_bad_anomaly_parameters_are_400_naming_them(client: Client, params, name):
    response = client.get("/query/pipe-anomalies", params={"network": "water"} | params)
    assert response.status_code == 400, response.text
    assert response.json()["description"].startswith(name)


def test_an_unencoded_plus_in_the_offset_is_read_as_plus(client: Client):
    """"+08:00" typed into a URL arrives as " 08:00"."""
    query = "network=gas&since=2026-11-20T08:00:00+08:00&until=2026-11-20T12:00:00+08:00"
    response = client.get(f"/query/pipe-anomalies?{query}")
    assert response.status_code == 200, response.text
    assert response.json()["query"]["since"] == "2026-11-20T08:00:00+08:00"


def test_missing_network_is_400(client: Client):
    response = client.get("/query/pipe-anomalies")
    assert response.status_code == 400
    assert "network" in response.text

"""Limits and hygiene: per-key rate limits (429 + Retry-After), body limits (413), CORS, and
the audit log of writes (read back from the database and through GET /audit)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import Engine, text

from tests.servers import ADMIN, EDITOR, LiveServer
from twin.core.settings import AuthSettings, CorsSettings, LimitsSettings, Settings, UploadSettings

LOCATE = "/query/locate?lon=106.55&lat=29.56"
ORIGIN = "https://hall.example"
KEYS = {"limits-key-a-0123456789": "planner:key-a", "limits-key-b-0123456789": "planner:key-b"}
KEY_A = {"Authorization": "Bearer limits-key-a-0123456789"}
KEY_B = {"Authorization": "Bearer limits-key-b-0123456789"}
BURST, RATE = 5, 0.5
MAX_BODY = 1000


@pytest.fixture(scope="module")
def limited_server(engine: Engine, database_url: str, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[LiveServer]:
    settings = Settings(
        database_url=database_url, auth=AuthSettings(keys=KEYS),
        limits=LimitsSettings(rate_per_s=RATE, burst=BURST, max_body_bytes=MAX_BODY),
        uploads=UploadSettings(dir=tmp_path_factory.mktemp("uploads")))
    with LiveServer(settings) as live:
        yield live


@pytest.fixture(scope="module")
def cors_server(engine: Engine, database_url: str) -> Iterator[LiveServer]:
    settings = Settings(database_url=database_url, cors=CorsSettings(origins=[ORIGIN]),
                        limits=LimitsSettings(max_body_bytes=MAX_BODY))
    with LiveServer(settings) as live:
        yield live


def test_a_key_past_its_burst_gets_429_with_retry_after(limited_server: LiveServer):
    with httpx.Client(base_url=limited_server.url, timeout=30) as api:
        started = time.monotonic()
        answers = [api.get(LOCATE, headers=KEY_A) for _ in range(BURST + 3)]
        elapsed = time.monotonic() - started
        statuses = [a.status_code for a in answers]
        assert elapsed < 1 / RATE, "too slow to test the burst; the bucket refilled"
        assert statuses == [200] * BURST + [429] * 3
        refused = answers[BURST]
        wait = int(refused.headers["retry-after"])
        assert 1 <= wait <= 1 / RATE
        assert "TWIN_LIMITS_RATE_PER_S" in refused.json()["description"]
        # Per key: another key, and anonymous callers (by IP), have buckets of their own.
        assert api.get(LOCATE, headers=KEY_B).status_code == 200
        assert api.get(LOCATE).status_code == 200
        time.sleep(wait)
        assert api.get(LOCATE, headers=KEY_A).status_code == 200


def test_a_body_over_the_limit_is_413_whether_declared_or_streamed(cors_server: LiveServer):
    body = json.dumps({"point": [106.55, 29.56], "radius_m": 100, "pad": "x" * MAX_BODY})
    with httpx.Client(base_url=cors_server.url, timeout=30) as api:
        declared = api.post("/query/impact", content=body,
                            headers={"Content-Type": "application/json"})
        assert declared.status_code == 413
        assert declared.json()["description"] == (
            f"request body: over the limit of {MAX_BODY} bytes (TWIN_LIMITS_MAX_BODY_BYTES): "
            f"{len(body)} bytes")

        def chunks():  # no Content-Length: counted as it streams in
            for start in range(0, len(body), 100):
                yield body[start:start + 100].encode()

        streamed = api.post("/query/impact", content=chunks(),
                            headers={"Content-Type": "application/json"})
        assert streamed.status_code == 413, streamed.text
        assert "TWIN_LIMITS_MAX_BODY_BYTES" in streamed.json()["description"]
        small = api.post("/query/impact", json={"point": [106.55, 29.56], "radius_m": 100})
        assert small.status_code == 200


def test_uploads_have_their_own_bigger_limit(limited_server: LiveServer):
    features = [{"type": "Feature", "properties": {"name": f"p{i}" * 20},
                 "geometry": {"type": "Point", "coordinates": [106.55, 29.56]}}
                for i in range(40)]
    content = json.dumps({"type": "FeatureCollection", "features": features}).encode()
    assert len(content) > 2 * MAX_BODY
    with httpx.Client(base_url=limited_server.url, timeout=30) as api:
        # Without a title nothing is stored, but the answer shows the whole form was read.
        response = api.post("/layers", files={"file": ("points.geojson", content)},
                            headers=EDITOR)
        assert response.status_code == 400, response.text
        assert response.json()["description"].startswith("title: required")


def test_cors_preflight_is_answered_for_the_configured_origin_only(cors_server: LiveServer):
    preflight = {"Access-Control-Request-Method": "GET",
                 "Access-Control-Request-Headers": "authorization"}
    with httpx.Client(base_url=cors_server.url, timeout=30) as api:
        allowed = api.options(LOCATE, headers={"Origin": ORIGIN, **preflight})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == ORIGIN
        assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
        other = api.options(LOCATE, headers={"Origin": "https://elsewhere.example",
                                             **preflight})
        assert other.status_code == 400
        assert "access-control-allow-origin" not in other.headers
        simple = api.get(LOCATE, headers={"Origin": ORIGIN})
        assert simple.headers["access-control-allow-origin"] == ORIGIN
        assert "access-control-allow-origin" not in api.get(
            LOCATE, headers={"Origin": "https://elsewhere.example"}).headers


def audit_rows(engine: Engine, request_id: str) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(text(
            "SELECT principal, role, method, path, status, outcome, detail FROM audit_log "
            "WHERE request_id = :id"), {"id": request_id}).mappings()]


def test_writes_are_audited_done_or_refused_and_admins_read_them(client: httpx.Client,
                                                                  engine: Engine):
    since = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
    done = client.post("/sensors/readings?source=test", json={"readings": []},
                       headers={**EDITOR, "X-Request-ID": "audit-test-done"})
    assert done.status_code == 200 and done.headers["x-request-id"] == "audit-test-done"
    refused = client.delete("/layers/risk_points")
    assert refused.status_code == 401
    too_big = client.post("/sensors/readings", content=b"x" * (5 * 1024 * 1024),
                          headers=EDITOR)
    assert too_big.status_code == 413
    read = client.get("/collections")

    assert audit_rows(engine, "audit-test-done") == [{
        "principal": "fixture-editor", "role": "gis-editor", "method": "POST",
        "path": "/sensors/readings", "status": 200, "outcome": "ok",
        "detail": {"client": "127.0.0.1", "query": "source=test"}}]
    [row] = audit_rows(engine, refused.headers["x-request-id"])
    assert row["principal"] == "anonymous" and row["status"] == 401
    assert row["outcome"] == "refused" and row["method"] == "DELETE"
    assert row["detail"]["reason"] == refused.json()["description"]
    [row] = audit_rows(engine, too_big.headers["x-request-id"])
    assert row["status"] == 413 and "TWIN_LIMITS_MAX_BODY_BYTES" in row["detail"]["reason"]
    assert audit_rows(engine, read.headers["x-request-id"]) == []  # reads are not audited

    assert client.get("/audit").status_code == 401
    assert client.get("/audit", headers=EDITOR).status_code == 403
    listed = client.get("/audit", params={"since": since, "principal": "fixture-editor"},
                        headers=ADMIN)
    assert listed.status_code == 200
    entries = listed.json()["entries"]
    assert "audit-test-done" in [e["request_id"] for e in entries]
    assert {e["principal"] for e in entries} == {"fixture-editor"}
    with engine.connect() as conn:
        expected = conn.execute(text(
            "SELECT count(*) FROM audit_log WHERE principal = 'fixture-editor' AND at >= :s"),
            {"s": datetime.fromisoformat(since)}).scalar_one()
    assert listed.json()["count"] == expected
    limited = client.get("/audit", params={"limit": 1}, headers=ADMIN).json()["entries"]
    assert len(limited) == 1
    naive = client.get("/audit", params={"since": "2026-01-01T00:00:00"}, headers=ADMIN)
    assert naive.status_code == 400 and "since" in naive.json()["description"]

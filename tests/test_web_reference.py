"""Reference data the web map reads: the sector list and emergency plans."""

from __future__ import annotations

import httpx
from sqlalchemy import Engine, text


def test_sectors_come_from_the_table_in_display_order(client: httpx.Client, engine: Engine):
    with engine.connect() as conn:
        expected = [dict(row) for row in conn.execute(text(
            "SELECT code, name_zh, name_en, sort_order FROM sectors")).mappings()]
    expected.sort(key=lambda s: (s["sort_order"], s["code"]))
    assert client.get("/sectors").json() == {"sectors": expected}


def test_emergency_plan_by_id(client: httpx.Client, engine: Engine):
    with engine.connect() as conn:
        plan = conn.execute(text("SELECT id, code, title_zh, summary, issuer_code "
                                 "FROM emergency_plans ORDER BY id DESC LIMIT 1")).mappings().one()
        issuer = conn.execute(text("SELECT name_zh FROM admin_units WHERE code = :c"),
                              {"c": plan["issuer_code"]}).scalar_one()
    body = client.get(f"/emergency-plans/{plan['id']}").json()
    assert (body["code"], body["title_zh"], body["summary"]) == \
        (plan["code"], plan["title_zh"], plan["summary"])
    assert body["issuer_name_zh"] == issuer


def test_unknown_or_bad_plan_ids_are_refused(client: httpx.Client):
    missing = client.get("/emergency-plans/2147483647")
    assert missing.status_code == 404 and "2147483647" in missing.json()["description"]
    bad = client.get("/emergency-plans/0")
    assert bad.status_code == 400 and "plan_id" in bad.json()["description"]
    assert client.get("/emergency-plans/abc").status_code == 400

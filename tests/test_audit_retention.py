"""Audit log retention: rows older than TWIN_AUDIT_RETENTION_DAYS go (``twin audit prune``, a
server at start-up and then every TWIN_AUDIT_PRUNE_EVERY_S, in one process of several),
recent rows stay, 0 keeps everything, and admins still read what is left.

Works on a database of its own (no sample city needed), so the pruning servers never meet
the suite's shared audit log. The oracle is the age each row was written with.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import Engine, create_engine, text

from tests.databases import on_own_connection
from tests.servers import ADMIN, LiveServer, sibling_database
from twin.audit import PRUNE_LOCK, prune
from twin.core.settings import AuditSettings, AuthSettings, Settings

WHO = "retention-test"
# Days old each test row is written with; the default retention is 365.
AGES = (0, 1, 100, 364, 366, 400, 1000)


@pytest.fixture(scope="module")
def audit_db(database_url: str) -> Iterator[str]:
    with sibling_database(database_url, "audit") as url:
        yield url


@pytest.fixture()
def db(audit_db: str) -> Iterator[Engine]:
    engine = create_engine(audit_db)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_log"))
    yield engine
    engine.dispose()


def write_rows(engine: Engine, ages=AGES, tag: str = "") -> None:
    with engine.begin() as conn:
        for age in ages:
            conn.execute(text(
                "INSERT INTO audit_log (at, principal, role, method, path, status, outcome, "
                "detail, request_id) VALUES (now() - make_interval(days => :age), :who, "
                "'admin', 'POST', '/keys', 201, 'ok', '{}', :request_id)"),
                {"age": age, "who": WHO, "request_id": f"age-{age}{tag}"})


def ages_left(engine: Engine) -> list[int]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT request_id FROM audit_log WHERE principal = :who"),
                            {"who": WHO}).scalars().all()
    return sorted(int(r.removeprefix("age-").split("-")[0]) for r in rows)


def run_prune(url: str, days: int, batch: int) -> int:
    return on_own_connection(url, lambda conn: prune(conn, days, batch))


@pytest.mark.parametrize("days,batch", [(365, 5000), (365, 1), (30, 2), (2, 3)])
def test_old_rows_go_and_recent_rows_stay(db: Engine, audit_db: str, days: int, batch: int):
    write_rows(db)
    deleted = run_prune(audit_db, days, batch)
    assert ages_left(db) == [age for age in AGES if age < days]
    assert deleted == sum(age >= days for age in AGES)


def test_zero_keeps_everything(db: Engine, audit_db: str):
    write_rows(db)
    assert run_prune(audit_db, 0, 5000) == 0
    assert ages_left(db) == list(AGES)


def cli(audit_db: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "TWIN_DATABASE_URL": audit_db, **env}
    return subprocess.run([sys.executable, "-m", "twin.cli", "audit", "prune", *args],
                          env=environment, capture_output=True, text=True, timeout=60)


def test_the_cli_prunes_by_the_setting_or_its_days(db: Engine, audit_db: str):
    write_rows(db)
    kept = cli(audit_db, TWIN_AUDIT_RETENTION_DAYS="0")
    assert kept.returncode == 0 and "keeps every row" in kept.stderr
    assert ages_left(db) == list(AGES)
    by_setting = cli(audit_db)  # the default, 365 days
    assert by_setting.returncode == 0, by_setting.stderr
    assert "3 rows older than 365 days pruned" in by_setting.stderr  # 366, 400, 1000
    assert ages_left(db) == [0, 1, 100, 364]
    by_days = cli(audit_db, "--days", "50")
    assert "2 rows older than 50 days pruned" in by_days.stderr  # 100, 364
    assert ages_left(db) == [0, 1]


def lock_holders(engine: Engine) -> int:
    """Sessions holding PRUNE_LOCK (a bigint advisory key: high and low 32 bits)."""
    with engine.connect() as conn:
        return conn.execute(text(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND classid = :high AND objid = :low AND objsubid = 1"),
            {"high": PRUNE_LOCK >> 32, "low": PRUNE_LOCK & 0xFFFFFFFF}).scalar_one()


def eventually(condition, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def servers_settings(audit_db: str, every_s: float, days: int = 365) -> Settings:
    return Settings(database_url=audit_db, auth=AuthSettings(anonymous_role=""),
                    audit=AuditSettings(retention_days=days, prune_every_s=every_s))


def test_servers_prune_at_start_then_periodically_in_one_process(db: Engine, audit_db: str):
    write_rows(db)
    first = LiveServer(servers_settings(audit_db, 0.3)).__enter__()
    second = LiveServer(servers_settings(audit_db, 0.3)).__enter__()
    try:
        eventually(lambda: ages_left(db) == [0, 1, 100, 364])  # at start-up
        assert lock_holders(db) == 1  # one process prunes, the other waits its turn
        write_rows(db, (500,), "-later")
        eventually(lambda: ages_left(db) == [0, 1, 100, 364])  # and on its schedule
        # Whichever process was pruning, once it stops the other one takes over.
        first.__exit__(None, None, None)
        eventually(lambda: lock_holders(db) == 1)
        write_rows(db, (600,), "-after")
        eventually(lambda: ages_left(db) == [0, 1, 100, 364])
        # Admins still read the log, newest first, with its filters.
        with httpx.Client(base_url=second.url, timeout=30) as client:
            body = client.get("/audit", params={"principal": WHO}, headers=ADMIN).json()
            assert [e["request_id"] for e in body["entries"]] == [
                "age-0", "age-1", "age-100", "age-364"]
            since = body["entries"][1]["at"]
            recent = client.get("/audit", params={"principal": WHO, "since": since},
                                headers=ADMIN).json()
            assert [e["request_id"] for e in recent["entries"]] == ["age-0", "age-1"]
    finally:
        first.__exit__(None, None, None)
        second.__exit__(None, None, None)
    eventually(lambda: lock_holders(db) == 0)  # a stopped server lets go of the lock


def test_a_server_with_retention_zero_prunes_nothing(db: Engine, audit_db: str):
    write_rows(db)
    with LiveServer(servers_settings(audit_db, 0.2, days=0)):
        time.sleep(1.0)
        assert lock_holders(db) == 0
    assert ages_left(db) == list(AGES)

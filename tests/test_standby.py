"""A hot standby of the managed primary (twin/core/standby.py), made once for the module by
pg_basebackup from the suite's cluster: read-only, in recovery, caught up within a bound
(measured by WAL positions read on each server), stopped and started again, destroyed with
its replication slot. The oracles are the primary itself, read directly, and PostgreSQL's
own views (pg_replication_slots, pg_is_in_recovery)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine, text

from tests.conftest import TEST_DATABASE
from tests.databases import libpq
from tests.servers import free_port_run
from twin.core.cluster import ManagedCluster
from twin.core.errors import ClusterError
from twin.core.settings import DatabaseSettings, Settings
from twin.core.standby import (
    ManagedStandby,
    prepare_primary,
    wait_for_lsn,
)

# A number no other test or helper uses: its port is TWIN_DB_PORT + 10 + 9.
K = 9
# Seconds a committed write may take to be replayed on the idle standby.
CATCH_UP_S = 10.0


@pytest.fixture(scope="module")
def standby(engine: Engine) -> Iterator[ManagedStandby]:
    if os.environ.get("TWIN_TEST_DATABASE_URL"):
        pytest.skip("a standby is made from the managed cluster, not an external database")
    standby = ManagedStandby(Settings(), K)
    standby.destroy()  # what an interrupted earlier run may have left
    try:
        started = time.monotonic()
        standby.up()
        print(f"standby {K} made and started in {time.monotonic() - started:.1f} s")
        yield standby
    finally:
        standby.destroy()


def primary_lsn(engine: Engine) -> str:
    with engine.connect() as conn:
        return conn.execute(text("SELECT pg_current_wal_lsn()::text")).scalar_one()


def on_standby(standby: ManagedStandby, autocommit: bool = True) -> psycopg.Connection:
    return psycopg.connect(libpq(standby.url(TEST_DATABASE)), autocommit=autocommit)


def slots(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(text("SELECT slot_name FROM pg_replication_slots")).scalars())


def rename(engine: Engine, point_id: int, name: str) -> str:
    """Rename a risk point on the primary; the primary's WAL position after the commit."""
    with engine.begin() as conn:
        conn.execute(text("UPDATE risk_points SET name = :name WHERE id = :id"),
                     {"name": name, "id": point_id})
    return primary_lsn(engine)


@pytest.fixture()
def risk_point(engine: Engine) -> Iterator[tuple[int, str]]:
    """A risk point of the test database, its name restored after the test."""
    with engine.connect() as conn:
        point_id, name = conn.execute(
            text("SELECT id, name FROM risk_points ORDER BY id LIMIT 1")).one()
    yield point_id, name
    rename(engine, point_id, name)


def test_the_standby_is_a_read_only_copy_in_recovery(standby: ManagedStandby, engine: Engine):
    assert f"twin_standby_{K}" in slots(engine)
    with engine.connect() as conn:
        tables = set(conn.execute(text(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars())
        points = conn.execute(text("SELECT count(*) FROM risk_points")).scalar_one()
    lsn = primary_lsn(engine)
    with on_standby(standby) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        assert wait_for_lsn(conn, lsn, CATCH_UP_S)
        assert "risk_points" in tables
        assert set(conn.execute("SELECT tablename FROM pg_tables "
                                "WHERE schemaname = 'public'").fetchall()) == {
            (table,) for table in tables}
        assert conn.execute("SELECT count(*) FROM risk_points").fetchone() == (points,)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction) as refused:
            conn.execute("UPDATE risk_points SET name = name WHERE id = 1")
        assert refused.value.sqlstate == "25006"


def test_a_write_on_the_primary_is_replayed_within_the_bound(
        standby: ManagedStandby, engine: Engine, risk_point: tuple[int, str]):
    point_id, name = risk_point
    with on_standby(standby) as conn:
        written = time.monotonic()
        lsn = rename(engine, point_id, f"{name} (standby check)")
        assert wait_for_lsn(conn, lsn, CATCH_UP_S)
        waited = time.monotonic() - written
        print(f"replayed {waited * 1000:.0f} ms after the commit")
        assert conn.execute("SELECT name FROM risk_points WHERE id = %s",
                            (point_id,)).fetchone() == (f"{name} (standby check)",)
        assert conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn",
                            (lsn,)).fetchone() == (True,)


def test_wait_for_lsn_gives_up_without_raising(standby: ManagedStandby, engine: Engine,
                                               database_url: str):
    # A WAL position the primary will not reach in this run.
    ahead = "FFFFFFF/0"
    with on_standby(standby) as conn:
        started = time.monotonic()
        assert wait_for_lsn(conn, ahead, 0.3) is False
        assert 0.3 <= time.monotonic() - started < 3
        assert wait_for_lsn(conn, ahead, 0) is False
    # Not in autocommit: the connection is left idle, so the next read takes a fresh snapshot.
    with on_standby(standby, autocommit=False) as conn:
        assert wait_for_lsn(conn, primary_lsn(engine), CATCH_UP_S)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    # On the primary it compares with the primary's own position.
    with psycopg.connect(libpq(database_url), autocommit=True) as conn:
        assert wait_for_lsn(conn, primary_lsn(engine), 0)
        assert wait_for_lsn(conn, ahead, 0.1) is False


def test_status_down_and_up_again_catches_up(
        standby: ManagedStandby, engine: Engine, risk_point: tuple[int, str]):
    prepare_primary(ManagedCluster(Settings()))  # idempotent: nothing changes
    lsn = primary_lsn(engine)
    with on_standby(standby) as conn:
        assert wait_for_lsn(conn, lsn, CATCH_UP_S)
    # The lag is the primary's WAL position, read around status(), less the replayed one.
    before = primary_lsn(engine)
    status = standby.status()
    after = primary_lsn(engine)
    assert status.running and status.in_recovery and status.port == standby.port
    assert status.replay_lsn is not None and status.lag_bytes is not None
    with engine.connect() as conn:
        low, high = conn.execute(text(
            "SELECT greatest(pg_wal_lsn_diff(:before, :replay), 0)::bigint, "
            "pg_wal_lsn_diff(:after, :replay)::bigint"),
            {"before": before, "after": after, "replay": status.replay_lsn}).one()
    assert low <= status.lag_bytes <= high
    # Idle, it is 0; other databases of the shared cluster may be written meanwhile, so
    # small (under a WAL segment or so) within the bound.
    deadline = time.monotonic() + CATCH_UP_S
    while (lag := standby.status().lag_bytes) is None or lag > 16 * 1024 * 1024:
        assert time.monotonic() < deadline, f"{lag} bytes behind after {CATCH_UP_S} s"
        time.sleep(0.1)

    standby.up()  # running: nothing to do
    assert standby.status().running

    standby.down()
    assert not standby.status().running
    with pytest.raises(psycopg.OperationalError):
        on_standby(standby).close()
    point_id, name = risk_point
    lsn = rename(engine, point_id, f"{name} (written while the standby was down)")
    with engine.connect() as conn:  # the primary still serves
        assert conn.execute(text("SELECT name FROM risk_points WHERE id = :id"),
                            {"id": point_id}).scalar_one() == (
            f"{name} (written while the standby was down)")

    standby.up()
    assert standby.status().running
    with on_standby(standby) as conn:
        assert wait_for_lsn(conn, lsn, CATCH_UP_S)
        assert conn.execute("SELECT name FROM risk_points WHERE id = %s",
                            (point_id,)).fetchone() == (
            f"{name} (written while the standby was down)",)


def test_destroy_leaves_no_slot_and_no_data(standby: ManagedStandby, engine: Engine):
    standby.destroy()
    assert f"twin_standby_{K}" not in slots(engine)
    assert not standby.folder.exists()
    status = standby.status()
    assert not status.initialised and not status.running


@pytest.fixture()
def own_primary() -> Iterator[ManagedCluster]:
    """A cluster of the test's own (not a standby), restarted by the test. Its home is not
    under pytest's temporary folder: a pytest session starting meanwhile (another working
    copy's) takes back the search permission the database user needs on that folder."""
    home = Path(tempfile.mkdtemp(prefix="twin-standby-test-"))
    cluster = ManagedCluster(Settings(
        home=home, db=DatabaseSettings(port=free_port_run())))
    try:
        yield cluster
    finally:
        cluster.down()
        shutil.rmtree(home)


def test_prepare_primary_admits_replication_only_where_it_can(own_primary: ManagedCluster):
    """On a cluster of the test's own (no standby): pg_hba.conf without any replication line
    gets twin's, once, and keeps its other lines; a primary without WAL for standbys is
    refused with a message saying what to set."""
    own_primary.up()
    admin = libpq(own_primary.url("postgres"))
    hba = own_primary.pgdata / "pg_hba.conf"
    kept = [line for line in hba.read_text().splitlines()
            if line.strip() and not line.startswith("#") and "replication" not in line]
    hba.write_text("\n".join(kept) + "\n")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("SELECT pg_reload_conf()")
    deadline = time.monotonic() + 10  # the postmaster reloads on SIGHUP, asynchronously
    while True:
        try:
            psycopg.connect(admin, replication="true").close()
        except psycopg.OperationalError as refused:
            assert "pg_hba.conf" in str(refused)
            break
        assert time.monotonic() < deadline, "the reloaded pg_hba.conf still admits replication"
        time.sleep(0.1)

    prepare_primary(own_primary)
    prepare_primary(own_primary)
    psycopg.connect(admin, replication="true").close()  # admitted now
    lines = [line for line in hba.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    role = own_primary.settings.db.user
    assert lines == [*kept, f"host    replication     {role}    127.0.0.1/32    scram-sha-256"]

    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET wal_level = minimal")
        conn.execute("ALTER SYSTEM SET max_wal_senders = 0")
    own_primary.down()
    try:
        own_primary.up()
    except ClusterError:
        log = own_primary.log_file.read_text()[-2000:]
        pytest.fail(f"the cluster did not start again: {log}")
    with pytest.raises(ClusterError, match="wal_level is minimal"):
        prepare_primary(own_primary)

"""What a benchmark needs before it measures anything: a database that answers, migrated to
the newest revision, holding the sample city of the right scale.

A benchmark never ends in a traceback for a missing prerequisite. Either it makes what is
missing (``prepare``: on twin's managed cluster of ``TWIN_HOME``/``TWIN_DB_PORT``, what
``twin run`` does: db up, migrate, ``python -m data_samples load --scale ...``), or it stops
at once with one line saying which command to run (``require``, ``database_or_exit``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine

from data_samples.scales import SCALES
from twin.core.cluster import ManagedCluster
from twin.core.db import database_url
from twin.core.errors import TwinError
from twin.core.settings import Settings
from twin.migrate import alembic_config, upgrade

ROOT = Path(__file__).resolve().parent.parent
TWIN = ".venv/bin/twin"


def database_or_exit(settings: Settings) -> str:
    """The SQLAlchemy URL of the database ``settings`` name, or one line and exit (e.g. a
    TWIN_HOME whose cluster was never initialised)."""
    try:
        return database_url(settings)
    except TwinError as error:
        raise SystemExit(f"{error}") from None


def libpq_or_exit(settings: Settings) -> str:
    return database_or_exit(settings).replace("postgresql+psycopg://", "postgresql://", 1)


def _where(url: str) -> str:
    return url.rpartition("@")[2]


def missing(url: str, scale: str = "full", migrated: bool = True) -> str | None:
    """What the database at ``url`` (libpq or SQLAlchemy) lacks, as the command that makes
    it; None when it answers, is migrated to the newest revision (unless not ``migrated``:
    a benchmark that reads tables directly) and holds the ``scale`` sample city."""
    url = url.replace("postgresql+psycopg://", "postgresql://", 1)
    try:
        conn = psycopg.connect(url, connect_timeout=5)
    except psycopg.OperationalError as error:
        reason = (str(error).strip().splitlines() or ["no answer"])[0]
        return (f"the database at {_where(url)} does not answer ({reason}): start it with "
                f"`{TWIN} db up` (the managed cluster of TWIN_HOME/TWIN_DB_PORT)")
    with conn:
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        versioned = conn.execute("SELECT to_regclass('alembic_version') IS NOT NULL").fetchone()
        current = (conn.execute("SELECT version_num FROM alembic_version").fetchone()
                   if versioned and versioned[0] else None)
        if current is None or (migrated and current[0] != head):
            return (f"the database at {_where(url)} is not migrated to {head} (it is at "
                    f"{current[0] if current else 'nothing'}): run `{TWIN} db migrate`")
        risk_points = conn.execute("SELECT count(*) FROM risk_points").fetchone()[0]
    if risk_points < SCALES[scale].risk_points:
        return (f"the database at {_where(url)} holds {risk_points:,} risk points, not the "
                f"{scale} sample city's {SCALES[scale].risk_points:,}: run "
                f"`{TWIN} sample load --scale {scale}`")
    return None


def require(url: str, scale: str = "full", migrated: bool = True) -> None:
    """Stops with one line unless the database at ``url`` is ready for a benchmark."""
    lacking = missing(url, scale, migrated)
    if lacking:
        raise SystemExit(lacking)


def prepare(settings: Settings, scale: str = "full") -> str:
    """The SQLAlchemy URL of a database ready for a benchmark. On twin's managed cluster,
    makes what is missing (cluster started, database migrated, sample city loaded: minutes
    of CPU the first time for the full sample); on ``TWIN_DATABASE_URL`` only checks."""
    if not settings.managed:
        url = database_or_exit(settings)
        require(url, scale)
        return url
    cluster = ManagedCluster(settings)
    try:
        if not cluster.status().running:
            print(f"starting the managed cluster in {settings.home} on port "
                  f"{settings.db.port} (`{TWIN} db up`)", flush=True)
        cluster.up()
    except TwinError as error:
        raise SystemExit(f"{error}") from None
    url = cluster.url()
    if missing(url, scale) is None:
        return url
    print(f"preparing {_where(url)}: migrate, then the {scale} sample city (`python -m "
          "data_samples load`; minutes the first time)", flush=True)
    engine = create_engine(url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    # The loader in its own process, as `twin sample load` runs it: it generates the sample
    # into TWIN_HOME/samples once, and replaces another sample the database holds.
    env = {**os.environ, "TWIN_HOME": str(settings.home), "TWIN_DB_PORT": str(settings.db.port)}
    done = subprocess.run([sys.executable, "-m", "data_samples", "load", "--scale", scale],
                          cwd=ROOT, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"loading the {scale} sample city failed (exit {done.returncode}); "
                         f"run `{TWIN} sample load --scale {scale}` to see why")
    require(url, scale)
    return url


def require_buildings_3d(url: str, scale: str = "full") -> int:
    """The number of buildings, or one line and exit unless the database holds the ``scale``
    sample's buildings as the current generator makes them (roof forms, migration 0009).
    A sample generated before that is reused as it is by the loader (it generates into
    TWIN_HOME/samples once): its folder must go for the new one to be made."""
    url = url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(url, connect_timeout=5) as conn:
        has_roofs = conn.execute(
            "SELECT count(*) FROM information_schema.columns "
            "WHERE table_name = 'buildings' AND column_name = 'roof_type'").fetchone()[0]
        if not has_roofs:
            raise SystemExit(f"the database at {_where(url)} has no buildings.roof_type: run "
                             f"`{TWIN} db migrate`, then `{TWIN} sample load --scale {scale}`")
        buildings, forms = conn.execute(
            "SELECT count(*), count(DISTINCT roof_type) FROM buildings").fetchone()
    if buildings < SCALES[scale].buildings or forms < 2:
        raise SystemExit(
            f"the database at {_where(url)} holds {buildings:,} buildings with {forms} roof "
            f"form(s), not the current {scale} sample's {SCALES[scale].buildings:,} with "
            f"flat, gable and hip roofs: remove TWIN_HOME/samples/{scale} and run "
            f"`{TWIN} sample load --scale {scale}`")
    return int(buildings)

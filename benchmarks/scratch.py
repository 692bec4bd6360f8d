"""A scratch database for a benchmark: fresh and migrated in the managed cluster of
TWIN_HOME/TWIN_DB_PORT (started, and initialised, first if it is not running, as
``twin db up`` does), dropped again afterwards."""

from __future__ import annotations

import psycopg
from sqlalchemy import create_engine

from twin.core.cluster import ManagedCluster
from twin.core.errors import TwinError
from twin.migrate import upgrade


def _admin(cluster: ManagedCluster) -> str:
    return cluster.url("postgres").replace("postgresql+psycopg", "postgresql", 1)


def scratch_database(cluster: ManagedCluster, name: str) -> str:
    """The SQLAlchemy URL of database ``name``, made anew and migrated."""
    try:
        cluster.up()
    except TwinError as error:
        raise SystemExit(f"{error}") from None
    with psycopg.connect(_admin(cluster), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    url = cluster.url(name)
    engine = create_engine(url)
    upgrade(engine)
    engine.dispose()
    return url


def drop_database(cluster: ManagedCluster, name: str) -> None:
    with psycopg.connect(_admin(cluster), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

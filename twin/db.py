"""Where the database is (managed cluster or ``TWIN_DATABASE_URL``) and engines onto it."""

from __future__ import annotations

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from twin.cluster import ManagedCluster
from twin.settings import Settings


def database_url(settings: Settings) -> str:
    """SQLAlchemy URL (psycopg 3 driver) of the database twin works on."""
    if settings.database_url:
        url = make_url(settings.database_url)
        if url.drivername in ("postgresql", "postgres", "postgresql+psycopg2"):
            url = url.set(drivername="postgresql+psycopg")
        return url.render_as_string(hide_password=False)
    return ManagedCluster(settings).url()


def libpq_url(settings: Settings) -> str:
    """The same URL for plain psycopg (COPY and admin work)."""
    return database_url(settings).replace("postgresql+psycopg://", "postgresql://", 1)


def sync_engine(settings: Settings) -> Engine:
    return create_engine(database_url(settings), pool_pre_ping=True)


def async_engine(settings: Settings) -> AsyncEngine:
    return create_async_engine(
        database_url(settings),
        pool_size=settings.db.pool_size,
        max_overflow=settings.db.max_overflow,
        # A connection that died with the database is noticed and replaced, so the
        # app recovers by itself when PostgreSQL comes back.
        pool_pre_ping=True,
        connect_args={"connect_timeout": settings.db.connect_timeout},
    )

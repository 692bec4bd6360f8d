"""Running the tile builders' SQL: one statement, straight through the driver.

A tile is one statement whose answer is one row of bytes. Through SQLAlchemy's execute it
would cost ~0.3 ms of Python a tile more, and the bytes would arrive hex-encoded (text
results: 3.4 MB for a 1.7 MB tile, encoded by PostgreSQL and decoded again here). So the
statement is written with SQLAlchemy's ``:name`` binds, translated once per shape to
psycopg's, and run on the pooled connection's psycopg connection with binary results.
Errors are translated here into what the API answers (504, or a lost connection that
``tiles.cache`` retries once and otherwise answers with 503).
"""

from __future__ import annotations

from functools import lru_cache

import psycopg
from sqlalchemy import TextClause, text
from sqlalchemy.dialects.postgresql.psycopg import dialect as psycopg_dialect
from sqlalchemy.ext.asyncio import AsyncConnection

from twin.core.db import SERVER_GONE
from twin.core.errors import DatabaseUnavailable, StatementTimeout

_DIALECT = psycopg_dialect()


class ConnectionLost(DatabaseUnavailable):
    """The tile's connection broke (a database restart): worth one retry on a fresh one."""


@lru_cache(maxsize=512)
def sql_text(query: str) -> TextClause:
    """``text(query)``, made once per distinct query: a tile's SQL comes in few shapes, and
    text() scans the whole statement for bind parameters every time (~0.3 ms a tile)."""
    return text(query)


@lru_cache(maxsize=512)
def driver_sql(query: str) -> str:
    """``query`` with psycopg's ``%(name)s`` placeholders for SQLAlchemy's ``:name``."""
    return str(sql_text(query).compile(dialect=_DIALECT))


async def fetch_row(conn: AsyncConnection, query: str, params: dict) -> tuple:
    """The one row ``query`` answers. Prepared (the same shapes recur for every tile), and
    binary, so bytea comes back as bytes."""
    raw = await conn.get_raw_connection()
    driver: psycopg.AsyncConnection | None = raw.driver_connection
    # None only once the pool has let the connection go; conn holds it checked out.
    assert driver is not None
    try:
        cursor = await driver.execute(driver_sql(query), params, prepare=True, binary=True)
        row = await cursor.fetchone()
        # A tile's statement selects scalar subqueries and no FROM: always exactly one row.
        assert row is not None
        return row
    except psycopg.errors.QueryCanceled as error:
        raise StatementTimeout(
            "the tile took longer than the statement timeout (TWIN_DB_STATEMENT_TIMEOUT_MS) "
            "and was cancelled; ask for a higher zoom or fewer layers") from error
    except psycopg.Error as error:
        if driver.broken or driver.closed or error.sqlstate in SERVER_GONE:
            await conn.invalidate()
            raise ConnectionLost("the database is unavailable; retry shortly") from error
        raise

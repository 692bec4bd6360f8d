"""The test database reached otherwise than through the suite's engine: by libpq (psycopg
connections, LISTEN, the CLI) and on an async connection of a test's own, as the server's
pools hold one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

T = TypeVar("T")


def libpq(database_url: str) -> str:
    """The URL as libpq reads it (``postgresql://``, password kept), whatever its driver."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(
        hide_password=False)


def async_url(database_url: str) -> str:
    """The URL for SQLAlchemy's async engine (psycopg 3), whatever its driver."""
    return make_url(database_url).set(drivername="postgresql+psycopg").render_as_string(
        hide_password=False)


Work = Callable[[AsyncConnection], Awaitable[T]]


def on_own_connection(database_url: str, work: Work[T], commit: bool = False) -> T:
    """``await work(conn)`` on an async connection of its own (an engine made and disposed of
    here), from a loop of its own. With ``commit``, in one transaction committed when ``work``
    returns (rolled back if it raises); without, what ``work`` does not commit itself is
    rolled back."""
    async def main() -> T:
        engine = create_async_engine(async_url(database_url))
        try:
            async with (engine.begin() if commit else engine.connect()) as conn:
                return await work(conn)
        finally:
            await engine.dispose()

    return asyncio.run(main())


def in_own_transaction(database_url: str, work: Work[T]) -> T:
    """``await work(conn)`` in one transaction of its own, committed when ``work`` returns."""
    return on_own_connection(database_url, work, commit=True)

"""One mapping from twin's exceptions (and a lost or overloaded database) to HTTP responses.

- twin's own exceptions: their status code and message.
- A statement cancelled by the statement timeout: 504, naming the timeout.
- The database unreachable, restarting, or every pooled connection busy past the pool
  timeout: 503 with ``Retry-After`` (clients and proxies retry; the pool reconnects by itself).
- Any other database error: 500 without details (they are in the server log).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from psycopg.errors import QueryCanceled
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from twin.core.errors import StatementTimeout, TwinError

log = logging.getLogger("twin.api")

RETRY_AFTER_S = "5"


def _problem(status: int, title: str, detail: str, headers: dict | None = None) -> JSONResponse:
    body = {"code": title, "description": detail}
    return JSONResponse(body, status_code=status, headers=headers)


def _unavailable(detail: str) -> JSONResponse:
    return _problem(503, "DatabaseUnavailable", detail, {"Retry-After": RETRY_AFTER_S})


async def twin_error(request: Request, exc: TwinError) -> JSONResponse:
    if exc.status_code >= 500:
        log.error("%s %s: %s", request.method, request.url.path, exc)
    headers = {"Retry-After": RETRY_AFTER_S} if exc.status_code == 503 else None
    return _problem(exc.status_code, type(exc).__name__, str(exc), headers)


def statement_timeout(request: Request) -> StatementTimeout:
    limit = request.app.state.settings.db.statement_timeout_ms
    return StatementTimeout(
        f"the query ran longer than the statement timeout ({limit} ms, "
        "TWIN_DB_STATEMENT_TIMEOUT_MS) and was cancelled; ask for less (a smaller area, "
        "radius, time or limit) or retry later")


async def database_error(request: Request, exc: DBAPIError) -> JSONResponse:
    # QueryCanceled is an OperationalError too, but the database is fine: only the
    # statement ran too long, and retrying the same request would not help.
    if isinstance(exc.orig, QueryCanceled):
        log.warning("statement timeout during %s %s", request.method, request.url.path)
        return await twin_error(request, statement_timeout(request))
    if isinstance(exc, OperationalError) or exc.connection_invalidated:
        log.warning("database unavailable during %s %s: %s", request.method,
                    request.url.path, exc.orig)
        return _unavailable("the database is unavailable; retry shortly")
    log.exception("database error during %s %s", request.method, request.url.path)
    return _problem(500, "DatabaseError", "database error (see the server log)")


async def pool_exhausted(request: Request, exc: PoolTimeout) -> JSONResponse:
    """Every pooled connection stayed busy for TWIN_DB_POOL_TIMEOUT seconds: overloaded."""
    log.warning("no free database connection for %s %s: %s", request.method,
                request.url.path, exc)
    return _unavailable("the server is busy (every database connection is in use); "
                        "retry shortly")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(TwinError, twin_error)
    app.add_exception_handler(DBAPIError, database_error)
    app.add_exception_handler(PoolTimeout, pool_exhausted)

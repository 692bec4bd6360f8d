"""One mapping from twin's exceptions (and a lost database) to HTTP responses."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError

from twin.errors import TwinError

log = logging.getLogger("twin.api")

RETRY_AFTER_S = "5"


def _problem(status: int, title: str, detail: str, headers: dict | None = None) -> JSONResponse:
    body = {"code": title, "description": detail}
    return JSONResponse(body, status_code=status, headers=headers)


async def twin_error(request: Request, exc: TwinError) -> JSONResponse:
    if exc.status_code >= 500:
        log.error("%s %s: %s", request.method, request.url.path, exc)
    headers = {"Retry-After": RETRY_AFTER_S} if exc.status_code == 503 else None
    return _problem(exc.status_code, type(exc).__name__, str(exc), headers)


async def database_error(request: Request, exc: DBAPIError) -> JSONResponse:
    if isinstance(exc, OperationalError) or exc.connection_invalidated:
        log.warning("database unavailable during %s %s: %s", request.method,
                    request.url.path, exc.orig)
        return _problem(503, "DatabaseUnavailable",
                        "the database is unavailable; retry shortly",
                        {"Retry-After": RETRY_AFTER_S})
    log.exception("database error during %s %s", request.method, request.url.path)
    return _problem(500, "DatabaseError", "database error (see the server log)")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(TwinError, twin_error)
    app.add_exception_handler(DBAPIError, database_error)

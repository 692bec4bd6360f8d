"""One mapping from twin's exceptions (and a lost or overloaded database) to HTTP responses.

Every error answer has one body, ``{"code", "description"}`` (``ERROR_SCHEMA``, declared for
the 4xx answers of every operation in the OpenAPI document):

- twin's own exceptions: their status code and message.
- A parameter FastAPI refuses (missing, malformed, outside the bounds the route declares):
  400 ``InvalidParameter``, like the bounds twin checks itself, naming the parameter, where it
  is, what is wrong with the bound, and the value given. 400, not FastAPI's 422: OGC API
  (Features, Tiles) answers 400 to an invalid parameter, and one code should not come with
  two statuses depending on which layer noticed the problem.
- An unknown path or a method a path does not take: 404 ``NotFound`` / 405
  ``MethodNotAllowed``.
- A statement cancelled by the statement timeout: 504, naming the timeout.
- The database unreachable, restarting, or every pooled connection busy past the pool
  timeout: 503 with ``Retry-After`` (clients and proxies retry; the pool reconnects by itself).
- Any other database error: 500 without details (they are in the server log).
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.dependencies.utils import get_flat_params
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from psycopg.errors import QueryCanceled
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException
from starlette.types import ExceptionHandler

from twin.api.access import PUBLIC, role_for
from twin.api.readroute import note_failure
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
    # A read on a standby: twin/api/readroute.py may answer it from the primary instead.
    note_failure(request.scope, exc)
    # QueryCanceled is an OperationalError too, but the database is fine: only the
    # statement ran too long, and retrying the same request would not help.
    if isinstance(exc.orig, QueryCanceled):
        log.warning("statement timeout during %s %s", request.method, request.url.path)
        return await twin_error(request, statement_timeout(request))
    if isinstance(exc, OperationalError) or exc.connection_invalidated:
        log.warning("database unavailable during %s %s: %s", request.method,
                    request.url.path, exc.orig)
        return _unavailable("the database is unavailable; retry shortly")
    if "NUL (0x00)" in str(exc.orig):
        # A text the client sent that PostgreSQL cannot hold (psycopg refuses it before it
        # leaves): the input's fault, not the server's. Routes refuse it up front where they
        # can (twin/api/fields.py); this is the net under the others.
        return _problem(400, "InvalidParameter", "a text value contains a NUL (U+0000) "
                        "character, which cannot be stored; remove it")
    log.exception("database error during %s %s", request.method, request.url.path)
    return _problem(500, "DatabaseError", "database error (see the server log)")


async def pool_exhausted(request: Request, exc: PoolTimeout) -> JSONResponse:
    """Every pooled connection stayed busy for TWIN_DB_POOL_TIMEOUT seconds: overloaded."""
    log.warning("no free database connection for %s %s: %s", request.method,
                request.url.path, exc)
    return _unavailable("the server is busy (every database connection is in use); "
                        "retry shortly")


# --- parameters FastAPI refuses ----------------------------------------------------------------
WHERE = {"query": "query parameter", "path": "path parameter", "header": "header",
         "cookie": "cookie", "body": "body field"}
# What is wrong, by pydantic error type; the others fall back to pydantic's own words.
WHAT = {
    "missing": "is required",
    "int_parsing": "must be an integer", "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "float_parsing": "must be a number", "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "bool_parsing": "must be true or false", "bool_type": "must be true or false",
    "greater_than_equal": "must be >= {ge}", "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}", "less_than": "must be < {lt}",
    "string_too_long": "must be at most {max_length} characters",
    "string_too_short": "must be at least {min_length} characters",
    "string_pattern_mismatch": "must match {pattern}",
    "literal_error": "must be {expected}", "enum": "must be {expected}",
    "datetime_parsing": "must be an ISO 8601 date and time",
    "datetime_from_date_parsing": "must be an ISO 8601 date and time",
    "json_invalid": "is not valid JSON ({error})",
    "string_type": "must be a string",
    "model_attributes_type": "must be a JSON object",
    "dict_type": "must be a JSON object",
}
QUIET = {"missing", "json_invalid"}  # no value to show
MAX_SHOWN = 80


def _shown(value: Any, where: str) -> str:
    """The value as the client sent it: query, path and header values are text already."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
        text = value if where != "body" else repr(value)
    elif isinstance(value, str) and where != "body":
        text = value
    else:
        text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "…"


def _bound(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _descriptions(request: Request) -> dict[tuple[str, str], str]:
    """(where, name) -> the route's description of each parameter (it states the bounds in
    a GIS person's words, e.g. "H3 resolution, one of 3, ..., 9")."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    if dependant is None:
        return {}
    # Flat params are fastapi.params.Param, which know where they are (``in_``).
    return {(field.field_info.in_.value, field.alias):  # type: ignore[attr-defined]
            field.field_info.description
            for field in get_flat_params(dependant) if field.field_info.description}


def describe_invalid(error: dict, descriptions: dict[tuple[str, str], str]) -> str:
    """One pydantic error as "<name> (<where>): <what is wrong>, got <value> (<description>)"."""
    where, *path = error["loc"] or ("request",)
    if error["type"] == "json_invalid":
        path = []  # its loc holds the character position, not a field
    name = ".".join(f"[{part}]" if isinstance(part, int) else str(part)
                    for part in path).replace(".[", "[")
    if name:
        label = f"{name} ({WHERE.get(where, where)})"
    else:
        label = "body" if where == "body" else WHERE.get(where, where)
    ctx = {key: _bound(value) for key, value in (error.get("ctx") or {}).items()}
    template = WHAT.get(error["type"])
    if error["type"] == "string_too_short" and ctx.get("min_length") == "1":
        template = "must not be empty"
    try:
        what = template.format(**ctx) if template else None
    except KeyError:
        what = None
    if what is None:
        what = error["msg"].removeprefix("Input ").removeprefix("Value error, ")
        what = what[:1].lower() + what[1:]
    text = f"{label}: {what}"
    if error["type"] not in QUIET:
        text += f", got {_shown(error.get('input'), where)}"
    description = descriptions.get((where, name))
    if description:
        text += f" ({description})"
    return text


async def invalid_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
    descriptions = _descriptions(request)
    detail = "; ".join(describe_invalid(error, descriptions) for error in exc.errors())
    return _problem(400, "InvalidParameter", detail or "invalid request")


# --- unknown paths, methods a path does not take ------------------------------------------------
async def http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own refusals (no route, wrong method, a missing static file) in twin's
    shape; their default detail is only the status phrase, so say what was asked."""
    status = exc.status_code
    if status in (204, 304):  # no body allowed
        return Response(status_code=status, headers=exc.headers)
    phrase = HTTPStatus(status).phrase
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail, default=str)
    if detail == phrase and status == 404:
        detail = (f"no such path: {request.url.path} (the API and its paths are described "
                  "at /api)")
    elif detail == phrase and status == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        detail = f"{request.method} is not allowed on {request.url.path}; allowed: {allowed}"
    return _problem(status, phrase.title().replace(" ", "").replace("-", ""), detail,
                    dict(exc.headers) if exc.headers else None)


# --- the OpenAPI document -----------------------------------------------------------------------
ERROR_SCHEMA_NAME = "Error"
ERROR_SCHEMA = {
    "title": ERROR_SCHEMA_NAME, "type": "object", "required": ["code", "description"],
    "properties": {
        "code": {"type": "string", "description": "what kind of error, e.g. InvalidParameter, "
                 "NotFound, RateLimited"},
        "description": {"type": "string", "description": "what is wrong, for a person: the "
                        "parameter, the bound, the value given"}},
}
ERROR_CONTENT = {"application/json": {"schema": {
    "$ref": f"#/components/schemas/{ERROR_SCHEMA_NAME}"}}}
INVALID = {"description": "a parameter or the body is missing, malformed or outside its "
                          "bounds (InvalidParameter: the description names it)",
           "content": ERROR_CONTENT}
NO_SUCH = {"description": "nothing with that id, or outside the caller's jurisdiction "
                          "(NotFound)", "content": ERROR_CONTENT}
RATE_LIMITED = {"description": "over the caller's rate limit (RateLimited): retry after "
                               "Retry-After seconds (TWIN_LIMITS_RATE_PER_S, TWIN_LIMITS_BURST)",
                "headers": {"Retry-After": {"schema": {"type": "integer", "minimum": 1}}},
                "content": ERROR_CONTENT}
TOO_LARGE = {"description": "the body is over its size limit (TWIN_LIMITS_MAX_BODY_BYTES)",
             "content": ERROR_CONTENT}
FASTAPI_VALIDATION = ("HTTPValidationError", "ValidationError")


def describe_error_responses(document: dict) -> dict:
    """In place: every operation's 4xx answers carry ``ERROR_SCHEMA``; FastAPI's 422 with its
    ``HTTPValidationError`` (which twin never sends) becomes the 400 it does send, and a 422
    a route declares stays."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas[ERROR_SCHEMA_NAME] = ERROR_SCHEMA
    for path, operations in document.get("paths", {}).items():
        for method, operation in operations.items():
            _describe_operation_errors(operation, role_for(method.upper(), path) != PUBLIC)
    for name in FASTAPI_VALIDATION:  # in order: the first refers to the second
        if f"#/components/schemas/{name}" not in json.dumps(document):
            schemas.pop(name, None)
    return document


def _describe_operation_errors(operation: dict, limited: bool) -> None:
    responses = operation.setdefault("responses", {})
    parameters = operation.get("parameters", [])
    # FastAPI's own 422 (its HTTPValidationError body) is never sent; a 422 a route declares
    # itself (input twin understood but cannot take: outside the municipality) is.
    validation = responses.get("422")
    if validation is not None and "HTTPValidationError" in json.dumps(validation):
        del responses["422"]
    else:
        validation = None
    if validation is not None or parameters or "requestBody" in operation:
        responses.setdefault("400", INVALID)
    if any(parameter["in"] == "path" for parameter in parameters):
        responses.setdefault("404", NO_SUCH)
    if "requestBody" in operation:
        responses.setdefault("413", TOO_LARGE)
    if limited:  # the access guard charges every call but the public ones (access.enforce)
        responses.setdefault("429", RATE_LIMITED)
    for status, response in responses.items():
        if status.startswith("4") and "content" not in response:
            response["content"] = ERROR_CONTENT


def install_error_handlers(app: FastAPI) -> None:
    # Starlette types a handler as taking any Exception; each of these is registered for,
    # and only ever called with, the exception class it takes.
    for exception, handler in ((TwinError, twin_error), (DBAPIError, database_error),
                               (PoolTimeout, pool_exhausted),
                               (RequestValidationError, invalid_parameter),
                               (HTTPException, http_error)):
        app.add_exception_handler(exception, cast(ExceptionHandler, handler))
    build = app.openapi

    def openapi() -> dict:
        # FastAPI caches its document (app.openapi_schema); describing it again is harmless.
        return describe_error_responses(build())

    # Replacing the method on the instance is FastAPI's documented way to extend the schema.
    app.openapi = openapi  # type: ignore[method-assign]

"""Dependencies injected into routes: settings, a pooled connection, the layers' data
versions and registry, and who is calling (their principal, role and scope)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from twin import apikeys
from twin.auth import Authenticator
from twin.core import principal as principals
from twin.core.db import pooled_connection
from twin.core.layer import LayerRegistry
from twin.core.principal import (
    AuthError,
    Forbidden,
    Principal,
    Scope,
    Unauthenticated,
)
from twin.core.settings import Settings
from twin.live.fanout import redeem_ticket


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


# The request state's key of the connection a read on a standby holds (get_versions reads
# the versions on it too).
READ_CONNECTION = "read_connection"


def read_engine(request: Request) -> AsyncEngine:
    """Where this request's database work goes: a GET or HEAD where twin/api/readroute.py
    sent it (a standby, or the primary), anything else the primary."""
    if request.method in ("GET", "HEAD"):
        engine = request.scope.get("state", {}).get("read_engine")
        if engine is not None:
            return engine
    return request.app.state.engine


def _on_standby(request: Request, engine: AsyncEngine) -> bool:
    reads = getattr(request.app.state, "reads", None)
    return reads is not None and reads.is_standby(engine)


async def get_connection(request: Request) -> AsyncIterator[AsyncConnection]:
    """A pooled connection to the primary, or for a read to the standby chosen for it. A
    standby that cannot be reached (or has no free connection) costs the request nothing: it
    is reported (twin/core/replicas.py skips it) and the request reads the primary."""
    engine = read_engine(request)
    async with AsyncExitStack() as stack:
        if _on_standby(request, engine):
            try:
                conn = await stack.enter_async_context(pooled_connection(engine))
            except (DBAPIError, PoolTimeout) as error:
                request.app.state.reads.report_failure(engine, error)
                engine = request.app.state.engine
                request.state.read_engine = engine
                conn = await stack.enter_async_context(pooled_connection(engine))
            else:
                setattr(request.state, READ_CONNECTION, conn)
        else:
            conn = await stack.enter_async_context(pooled_connection(engine))
        yield conn


async def get_versions(request: Request) -> dict[str, int]:
    """Every layer's data version, once per request (FastAPI shares a dependency's answer
    within a request), read now: one query shared by concurrent requests, exact for any
    writer, twin or not. These routes do database work anyway; the tiles, which need not,
    take the versions pushed to the process (tiles/service.py, twin/core/versions.py).
    Raw: ``LayerRegistry.data_versions`` gives the ones to key by.

    A read on a standby reads them on that standby (on the request's connection when it has
    one already), before its data: what it reads is then at least as new as the versions it
    keys counts by, as on the primary; versions from the primary could be newer than the
    standby's rows, and a count of old rows would be kept under a new version."""
    engine = read_engine(request)
    if _on_standby(request, engine):
        query = text("SELECT id, data_version FROM layers")
        conn = getattr(request.state, READ_CONNECTION, None)
        if conn is not None:
            return {row[0]: row[1] for row in await conn.execute(query)}
        try:
            async with pooled_connection(engine) as own:
                return {row[0]: row[1] for row in await own.execute(query)}
        except (DBAPIError, PoolTimeout) as error:
            # Unreachable, or gone mid-query: this request reads the primary instead.
            request.app.state.reads.report_failure(engine, error)
            request.state.read_engine = request.app.state.engine
    return await request.app.state.tiles.layer_versions(pushed=False)


VersionsDep = Annotated[dict[str, int], Depends(get_versions)]


async def get_registry(request: Request, versions: VersionsDep) -> LayerRegistry:
    """The layer registry, exact across worker processes: the versions tell whether a layer
    was published, rolled back or deleted since this process resolved it; if so it is
    resolved again."""
    return await request.app.state.registry.current_all(versions)


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
ConnDep = Annotated[AsyncConnection, Depends(get_connection)]
RegistryDep = Annotated[LayerRegistry, Depends(get_registry)]


# --- who is calling (issue 7) --------------------------------------------------------------
# twin/api/access.py's guard resolves the caller once per request (it runs first, on every
# router); the dependencies below reuse what it found.

def get_authenticator(request: Request) -> Authenticator:
    authenticator = getattr(request.app.state, "authenticator", None)
    if authenticator is None:
        authenticator = Authenticator(request.app.state.settings.auth, apikeys.lookup)
        request.app.state.authenticator = authenticator
    return authenticator


# Routes a client may open with ``?ticket=`` instead of an Authorization header: the push
# stream, as a browser's EventSource cannot send headers (twin/api/routes/stream.py).
TICKET_PATHS = frozenset({"/events/stream"})


async def get_principal(request: Request) -> Principal | None:
    """The caller (the anonymous principal when allowed), or None: anonymous access is off.

    Raises Unauthenticated for a malformed, unknown, revoked or expired key or token, or an
    unknown or expired stream ticket.
    """
    # Resolved already (None too is an answer) when the access guard has run.
    if hasattr(request.state, "principal"):
        principal: Principal | None = request.state.principal
    else:
        header = request.headers.get("authorization")
        ticket = request.query_params.get("ticket")
        if header is None and ticket is not None and request.url.path in TICKET_PATHS:
            principal = await _ticket_principal(request, ticket)
        else:
            principal = await get_authenticator(request).principal(
                header, request.app.state.engine.connect)
        request.state.principal = principal
    return principal


async def _ticket_principal(request: Request, ticket: str) -> Principal:
    async with request.app.state.engine.connect() as conn:
        principal = await redeem_ticket(conn, ticket)
    if principal is None:
        raise Unauthenticated("unknown or expired stream ticket; ask POST "
                              "/events/stream/tickets for a new one")
    return principal


def require_role(role: str) -> Callable[[Request], Awaitable[Principal]]:
    """A dependency that lets through only callers with ``role`` (or a stronger one)."""

    async def dependency(request: Request) -> Principal:
        return principals.require_role(await get_principal(request), role)

    return dependency


async def auth_error(request: Request, exc: AuthError) -> JSONResponse:
    """401/403 with the challenge RFC 6750 asks for."""
    challenge = 'Bearer realm="twin"'
    if isinstance(exc, Forbidden):
        challenge += ', error="insufficient_scope"'
    elif request.headers.get("authorization"):
        challenge += ', error="invalid_token"'
    return JSONResponse({"code": type(exc).__name__, "description": str(exc)},
                        status_code=exc.status_code, headers={"WWW-Authenticate": challenge})


EditorDep = Annotated[Principal, Depends(require_role("gis-editor"))]
AdminDep = Annotated[Principal, Depends(require_role("admin"))]


async def get_scope(request: Request) -> Scope:
    """The caller's jurisdiction: what tiles, features and queries may return.

    Anonymous callers (only where TWIN_AUTH_ANONYMOUS_ROLE allows them) see the city.
    """
    principal = await get_principal(request)
    if principal is None:
        raise Unauthenticated("this endpoint needs a bearer key or token (anonymous access "
                              "is off)")
    return principal.scope


ScopeDep = Annotated[Scope, Depends(get_scope)]

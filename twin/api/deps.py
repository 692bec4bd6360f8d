"""Dependencies injected into routes: settings, a pooled connection, the layer registry."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncConnection

from layers.registry import LayerRegistry
from twin import auth
from twin.auth import CITY, AuthError, Forbidden, KeyTable, Principal, Scope, authenticate
from twin.settings import Settings


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


async def get_connection(request: Request) -> AsyncIterator[AsyncConnection]:
    async with request.app.state.engine.connect() as conn:
        yield conn


async def get_registry(request: Request) -> LayerRegistry:
    return await request.app.state.registry()


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
ConnDep = Annotated[AsyncConnection, Depends(get_connection)]
RegistryDep = Annotated[LayerRegistry, Depends(get_registry)]


# --- who is calling (issue 5; issue 7 swaps the key source inside twin/auth.py) -----------

def get_key_table(request: Request) -> KeyTable:
    table = getattr(request.app.state, "key_table", None)
    if table is None:
        table = request.app.state.key_table = KeyTable(request.app.state.settings.auth.keys)
    return table


def require_role(role: str) -> Callable[[Request], Principal]:
    """A dependency that lets through only callers whose key has ``role`` (or a stronger one)."""

    def dependency(request: Request) -> Principal:
        principal = authenticate(request.headers.get("authorization"), get_key_table(request))
        return auth.require_role(principal, role)

    return dependency


async def auth_error(request: Request, exc: AuthError) -> JSONResponse:
    """401/403 with the challenge RFC 6750 asks for."""
    challenge = 'Bearer realm="twin"'
    if isinstance(exc, Forbidden):
        challenge += ', error="insufficient_scope"'
    return JSONResponse({"code": type(exc).__name__, "description": str(exc)},
                        status_code=exc.status_code, headers={"WWW-Authenticate": challenge})


EditorDep = Annotated[Principal, Depends(require_role("gis-editor"))]


def get_scope(request: Request) -> Scope:
    """The caller's jurisdiction (issue 7): what tiles, features and queries may return.

    Anonymous callers see the city while anonymous access exists; issue 7 decides who may
    be anonymous at all.
    """
    principal = authenticate(request.headers.get("authorization"), get_key_table(request))
    return CITY if principal is None else principal.scope


ScopeDep = Annotated[Scope, Depends(get_scope)]

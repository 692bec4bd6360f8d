"""Dependencies injected into routes: settings, a pooled connection, the layer registry."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncConnection

from layers.registry import LayerRegistry
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

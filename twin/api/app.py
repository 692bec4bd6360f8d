"""The FastAPI application factory."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from layers.registry import LayerRegistry
from twin.api.errors import install_error_handlers
from twin.api.routes import collections, features, health, landing, queries, tiles
from twin.db import async_engine
from twin.settings import Settings, get_settings

log = logging.getLogger("twin.api")


class RegistryCache:
    """Resolves the layer registry on first use and after a publish, never per request.

    Lazy, so the app starts (and /healthz answers 503) even while the database is down.
    """

    def __init__(self, engine: AsyncEngine):
        self._engine = engine
        self._registry: LayerRegistry | None = None
        self._lock = asyncio.Lock()

    async def __call__(self) -> LayerRegistry:
        if self._registry is None:
            async with self._lock:
                if self._registry is None:
                    async with self._engine.connect() as conn:
                        self._registry = await LayerRegistry.load(conn)
        return self._registry

    def invalidate(self) -> None:
        self._registry = None


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.engine = async_engine(settings)
        app.state.registry = RegistryCache(app.state.engine)
        try:
            yield
        finally:
            await app.state.engine.dispose()

    app = FastAPI(
        title="twin",
        description="Digital-twin risk map server: the spatial service under the city, "
        "district and street operation-and-governance centres.",
        version="0.1.0",
        lifespan=lifespan,
        openapi_url="/api",
        docs_url="/api.html",
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(landing.router)
    app.include_router(collections.router)
    app.include_router(features.router)
    app.include_router(tiles.router)
    app.include_router(queries.router)
    return app

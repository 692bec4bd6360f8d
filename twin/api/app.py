"""The FastAPI application factory."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from sqlalchemy.ext.asyncio import AsyncEngine

from layers.jobs import start_runner
from layers.registry import LayerRegistry
from tiles.cache import tile_cache
from twin.api.deps import auth_error
from twin.api.errors import install_error_handlers
from twin.api.routes import areas as area_routes
from twin.api.routes import collections, features, health, landing, queries, tiles
from twin.api.routes import jobs as job_routes
from twin.api.routes import layers as layer_routes
from twin.api.routes import pipes as pipe_routes
from twin.api.routes import raster as raster_routes
from twin.api.routes import reference as reference_routes
from twin.api.routes import sensors as sensor_routes
from twin.auth import AuthError
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


def mount_web_assets(app: FastAPI) -> None:
    """The built web map's bundles (web/dist/assets) under /assets; index.html is served at /.

    check_dir=False: a checkout without a build still starts and serves the API.
    """
    assets = landing.WEB_ROOT / "dist" / "assets"
    app.mount("/assets", StaticFiles(directory=assets, check_dir=False), name="web-assets")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.engine = async_engine(settings)
        app.state.registry = RegistryCache(app.state.engine)
        # Upload jobs run in a thread pool; jobs a killed server left running are failed first.
        app.state.upload_jobs = await start_runner(
            settings, lambda layer_id: app.state.registry.invalidate())
        app.state.tile_cache = tile_cache(settings.tiles)
        try:
            yield
        finally:
            app.state.upload_jobs.shutdown()
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
    app.add_exception_handler(AuthError, auth_error)
    app.include_router(health.router)
    app.include_router(landing.router)
    app.include_router(collections.router)
    app.include_router(features.router)
    app.include_router(tiles.router)
    app.include_router(queries.router)
    app.include_router(pipe_routes.router)
    app.include_router(sensor_routes.router)
    app.include_router(area_routes.router)
    app.include_router(reference_routes.router)
    app.include_router(layer_routes.router)
    app.include_router(job_routes.router)
    app.include_router(raster_routes.router)
    mount_web_assets(app)
    return app

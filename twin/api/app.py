"""The FastAPI application factory."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from sqlalchemy.ext.asyncio import AsyncEngine

from layers.uploads import start_uploads
from tiles.cache import DataVersions, tile_cache
from tiles.filters import SectorCodes
from twin import apikeys
from twin.api import access
from twin.api.deps import auth_error
from twin.api.errors import install_error_handlers
from twin.api.middleware import AuditMiddleware, BodyLimitMiddleware
from twin.api.openapi import install_security
from twin.api.routes import areas as area_routes
from twin.api.routes import audit as audit_routes
from twin.api.routes import collections, features, health, landing, queries, tiles
from twin.api.routes import jobs as job_routes
from twin.api.routes import keys as key_routes
from twin.api.routes import layers as layer_routes
from twin.api.routes import pipes as pipe_routes
from twin.api.routes import raster as raster_routes
from twin.api.routes import reference as reference_routes
from twin.api.routes import sensors as sensor_routes
from twin.audit import AuditPruner
from twin.auth import Authenticator
from twin.core.db import async_engine
from twin.core.layer import LayerRegistry
from twin.core.principal import AuthError
from twin.core.settings import Settings, get_settings

log = logging.getLogger("twin.api")


class RegistryCache:
    """This process's layer registry: resolved on first use and again when it is older than
    the database, never per request.

    A route first reads every layer's data version (``tiles.cache.DataVersions``: one query
    shared by concurrent requests, sent after they arrived), then asks for the registry with
    them: one those versions show to be older (a layer published, published anew, rolled back
    or deleted, by this process or another worker) is resolved again, by a load that starts
    after the versions were read, unless a concurrent request's load already matches them.
    So a request that starts after a change committed, in any process, sees it.

    Lazy, so the app starts (and /healthz answers 503) even while the database is down.
    """

    def __init__(self, engine: AsyncEngine):
        self._engine = engine
        self._registry: LayerRegistry | None = None
        self._lock = asyncio.Lock()

    async def __call__(self) -> LayerRegistry:
        """The registry as last resolved (resolved now the first time and after invalidate)."""
        return await self._resolved(lambda registry: False)

    async def current(self, layer_ids: Sequence[str], versions: dict[str, int]) -> LayerRegistry:
        """The registry, resolved again first if ``versions`` (read before this call) show
        that one of ``layer_ids`` changed since it was resolved."""
        return await self._resolved(lambda registry: registry.is_stale_for(layer_ids, versions))

    async def current_all(self, versions: dict[str, int]) -> LayerRegistry:
        """The registry, resolved again first if ``versions`` (read before this call) show
        that any layer changed since it was resolved: for routes that list layers or take
        one by id."""
        return await self._resolved(lambda registry: registry.is_stale(versions))

    def invalidate(self) -> None:
        """After this process committed a change; safe from any thread (upload jobs call it
        from theirs). A shortcut only: the next versions read would show the change too."""
        self._registry = None

    async def _resolved(self, stale: Callable[[LayerRegistry], bool]) -> LayerRegistry:
        """The held registry unless ``stale``; else one that is not, or one loaded after the
        caller's versions were read. Callers that found it stale at once share one load:
        each checks again what the load before it brought."""
        registry = self._registry
        if registry is None or stale(registry):
            async with self._lock:
                registry = self._registry
                if registry is None or stale(registry):
                    async with self._engine.connect() as conn:
                        registry = await LayerRegistry.load(conn)
                    self._registry = registry
        return registry


def mount_web_assets(app: FastAPI) -> None:
    """The built web map's bundles (web/dist/assets) under /assets; index.html is served at /.

    check_dir=False: a checkout without a build still starts and serves the API.
    """
    assets = landing.WEB_ROOT / "dist" / "assets"
    app.mount("/assets", StaticFiles(directory=assets, check_dir=False), name="web-assets")


def install_middleware(app: FastAPI, settings: Settings) -> None:
    """Body limits innermost (a 413 is audited like any refused write), then the audit log
    of writes, then CORS outermost (so refusals carry CORS headers too); the last added runs
    first."""
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(AuditMiddleware)
    if settings.cors.origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors.origins,
            allow_methods=["GET", "HEAD", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "If-None-Match", "X-Request-ID"],
            expose_headers=["ETag", "Location", "Retry-After", "X-Request-ID"],
            max_age=settings.cors.max_age_s)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.engine = async_engine(settings)
        # Not the requests' pool: a request holding a pooled connection may need the registry.
        registry_engine = async_engine(settings, pool_size=1, max_overflow=0)
        app.state.registry = RegistryCache(registry_engine)
        # The upload service; its jobs run in a thread pool, and jobs a killed server left
        # running are failed first.
        app.state.uploads = await start_uploads(
            settings, lambda layer_id: app.state.registry.invalidate())
        # Audit rows past TWIN_AUDIT_RETENTION_DAYS go now and daily, in one process of several.
        app.state.audit_pruner = AuditPruner.start(settings)
        app.state.tile_cache = tile_cache(settings.tiles)
        app.state.sector_codes = SectorCodes()
        # Layer data versions for the tile cache keys, one query shared by concurrent tiles,
        # on a connection of its own (never waiting for the requests' pool).
        app.state.tile_versions = DataVersions(async_engine(settings, pool_size=1,
                                                            max_overflow=0))
        # Tiles' own pool, without a pre-ping round trip per checkout (tiles retry instead).
        app.state.tile_engine = async_engine(settings, pre_ping=False, server_settings={
            "max_parallel_workers_per_gather": str(settings.tiles.parallel_workers)})
        try:
            yield
        finally:
            await app.state.audit_pruner.stop()
            await app.state.tile_versions.close()
            await app.state.tile_engine.dispose()
            app.state.uploads.shutdown()
            await app.state.engine.dispose()
            await registry_engine.dispose()

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
    app.add_exception_handler(access.RateLimited, access.rate_limited)
    # Fails at start-up, not on the first request, when a JWKS file or key is bad.
    app.state.authenticator = Authenticator(settings.auth, apikeys.lookup)
    # Every router passes the access guard; twin/api/access.py says which role each route needs.
    for router in (health.router, landing.router, collections.router, features.router,
                   tiles.router, queries.router, pipe_routes.router, sensor_routes.router,
                   area_routes.router, reference_routes.router, layer_routes.router,
                   job_routes.router, raster_routes.router,
                   audit_routes.router, key_routes.router):
        app.include_router(router, dependencies=access.GUARD)
    mount_web_assets(app)
    install_middleware(app, settings)
    # /api declares the bearer schemes and each operation's role, from access.RULES.
    install_security(app, settings.auth.anonymous_role)
    return app

"""The FastAPI application factory."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import cast

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from starlette.types import ExceptionHandler

from layers.uploads import start_uploads
from tiles.service import TileService
from tiles.tiles3d import Tiles3D
from twin import apikeys, ratelimit
from twin.api import access
from twin.api.deps import auth_error
from twin.api.errors import install_error_handlers
from twin.api.middleware import AuditMiddleware, BodyLimitMiddleware
from twin.api.openapi import install_security
from twin.api.proxy_auth import install_proxy_auth
from twin.api.readroute import ReadRouteMiddleware
from twin.api.routes import alerts as alert_routes
from twin.api.routes import areas as area_routes
from twin.api.routes import audit as audit_routes
from twin.api.routes import collections, features, health, landing, queries, tiles
from twin.api.routes import edits as edit_routes
from twin.api.routes import events as event_routes
from twin.api.routes import jobs as job_routes
from twin.api.routes import keys as key_routes
from twin.api.routes import layers as layer_routes
from twin.api.routes import pipes as pipe_routes
from twin.api.routes import raster as raster_routes
from twin.api.routes import reference as reference_routes
from twin.api.routes import sensors as sensor_routes
from twin.api.routes import stream as stream_routes
from twin.api.routes import terrain3d as terrain3d_routes
from twin.api.routes import tiles3d as tiles3d_routes
from twin.api.sync import VersionsSyncMiddleware
from twin.audit import AuditPruner
from twin.auth import Authenticator
from twin.core.db import async_engine
from twin.core.principal import AuthError
from twin.core.replicas import ReadRouter
from twin.core.settings import Settings, get_settings
from twin.live.runtime import LiveRuntime

log = logging.getLogger("twin.api")


def mount_web_assets(app: FastAPI) -> None:
    """The built web map's bundles (web/dist/assets) under /assets; index.html is served at /.

    check_dir=False: a checkout without a build still starts and serves the API; its /assets
    paths are then 404 (a mount on a missing folder would answer 500).
    """
    assets = landing.WEB_ROOT / "dist" / "assets"
    if assets.is_dir():
        app.mount("/assets", StaticFiles(directory=assets, check_dir=False), name="web-assets")


def install_middleware(app: FastAPI, settings: Settings) -> None:
    """Body limits innermost (a 413 is audited like any refused write), then the audit log
    of writes, then the read routing (reads on standbys, a GET retried on the primary goes
    through everything inside it again; writes get their read-your-writes token), then CORS
    outermost (so refusals carry CORS headers too); the last added runs first."""
    app.add_middleware(VersionsSyncMiddleware)
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(AuditMiddleware)
    app.add_middleware(ReadRouteMiddleware)
    if settings.cors.origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors.origins,
            allow_methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "If-Match", "If-None-Match",
                           "Last-Event-ID", "X-Request-ID"],
            expose_headers=["ETag", "Location", "Retry-After", "X-Request-ID", "Twin-LSN"],
            max_age=settings.cors.max_age_s)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.engine = async_engine(settings)
        # Reads on the hot standbys of TWIN_DB_STANDBY_URLS (none: everything on the primary).
        app.state.reads = reads = await ReadRouter.open(settings, app.state.engine)
        # Limits shared by a cluster's nodes (TWIN_LIMITS_SHARED=postgres); the shared-memory
        # buckets `twin serve` gave this worker, if any, stand in while the database is away.
        current = getattr(app.state, "rate_buckets", None)
        own_buckets = None
        if (settings.limits.shared == "postgres" and settings.limits.rate_per_s
                and not isinstance(current, ratelimit.PostgresTokenBuckets)):
            own_buckets = app.state.rate_buckets = ratelimit.open_postgres_buckets(
                settings, fallback=current)
        # The tile path (versions pushed to this process, the registry, tile pool and cache),
        # which every route that reads layers shares.
        app.state.tiles = tiles_service = TileService.open(settings, reads)
        app.state.tiles3d = Tiles3D(tiles_service)
        app.state.layer_versions = tiles_service.versions
        app.state.registry = tiles_service.registry
        # The upload service; its jobs run in a thread pool, and jobs a killed server left
        # running are failed first.
        app.state.uploads = await start_uploads(
            settings, lambda layer_id: app.state.registry.invalidate())
        # Audit rows past TWIN_AUDIT_RETENTION_DAYS go now and daily, in one process of several.
        app.state.audit_pruner = AuditPruner.start(settings)
        # The living twin: push fan-out, escalation, detectors, partitions, MQTT (issue 14).
        app.state.live = await LiveRuntime.start(settings, app.state.engine)
        try:
            yield
        finally:
            await app.state.live.stop()
            await app.state.audit_pruner.stop()
            await tiles_service.close()
            app.state.uploads.shutdown()
            if own_buckets is not None:
                await own_buckets.close()
            await reads.close()
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
    # Starlette types a handler as taking any Exception; each of these is registered for,
    # and only ever called with, the exception class it takes.
    app.add_exception_handler(AuthError, cast(ExceptionHandler, auth_error))
    app.add_exception_handler(access.RateLimited, cast(ExceptionHandler, access.rate_limited))
    # Fails at start-up, not on the first request, when a JWKS file or key is bad.
    app.state.authenticator = Authenticator(settings.auth, apikeys.lookup)
    # Every router passes the access guard; twin/api/access.py says which role each route needs.
    for router in (health.router, landing.router, collections.router, features.router,
                   tiles.router, queries.router, pipe_routes.router, sensor_routes.router,
                   area_routes.router, reference_routes.router, layer_routes.router,
                   job_routes.router, raster_routes.router, tiles3d_routes.router,
                   terrain3d_routes.router, stream_routes.router, event_routes.router,
                   alert_routes.router, edit_routes.router,
                   audit_routes.router, key_routes.router):
        app.include_router(router, dependencies=access.GUARD)
    tiles.install_xyz_route(app)  # the warm tile path, ahead of the routers (same guard)
    install_proxy_auth(app)  # what the cluster's nginx asks before a cached tile (issue 15)
    mount_web_assets(app)
    install_middleware(app, settings)
    # /api declares the bearer schemes and each operation's role, from access.RULES.
    install_security(app, settings.auth.anonymous_role)
    return app

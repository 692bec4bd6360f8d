"""The tile service: owns the tile path from a parsed request to bytes and validators.

Made once in the app's lifespan (``TileService.open``), it holds what every tile needs: the
layer versions (pushed to this process, twin/core/versions.py), the layer registry, the
tile pool, the tile cache and the sector codes. A route parses the request into a
``TileRequest`` or ``RasterRequest`` and sends back the ``TileAnswer``: the service decides
the ETag, Cache-Control, a 304, gzip, the layers the caller may see. (Martin's
``Source::get_tile`` and tipg's ``Collection.get_tile`` are the shape.)

A cached vector tile costs no database round trip and no await while the versions listener
is in sync: versions from memory, the registry held, the tile from the cache.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import anyio.to_thread
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tiles import raster, terrain
from tiles.cache import CachedTile, TileCache, cached_tile, tile_cache, tile_key
from tiles.filters import SectorCodes, parse_filters, read_filters, split_ids
from tiles.grid import tile_address
from tiles.metadata import MVT_MEDIA_TYPE
from tiles.sql import ConnectionLost
from tiles.validators import (
    IMMUTABLE,
    cache_control,
    etag_of,
    headers_of,
    not_modified,
    pinned,
    version_token,
)
from tiles.vector import TileOptions
from twin.core.db import async_engine, libpq_url
from twin.core.layer import Layer, LayerRegistry, RegistryCache
from twin.core.principal import Scope
from twin.core.replicas import ReadRouter, retry_on_primary
from twin.core.scope import visible_layer
from twin.core.settings import Settings, TilesSettings
from twin.core.versions import DataVersions, LayerVersions

T = TypeVar("T")


@dataclass(frozen=True)
class TileRequest:
    """A vector tile as asked for: layers (one composite tile for several), address,
    filters as sent (checked by the service), and the caller's scope."""

    layer_ids: tuple[str, ...]
    z: int
    x: int
    y: int
    scope: Scope
    sector: str | None = None
    level: str | None = None
    cql: str | None = None
    # False sends every risk point with every field (no hexagons, no byte budget).
    aggregate: bool = True
    if_none_match: str | None = None
    accepts_gzip: bool = False
    # The URL's ``v=``: the answer is immutable when it is the token of the tile's versions.
    version: str | None = None


@dataclass(frozen=True)
class RasterRequest:
    """A raster tile (``fmt`` png or webp) or a terrain tile (``fmt`` terrain, with its
    ``encoding``) of one raster layer."""

    layer_id: str
    z: int
    x: int
    y: int
    scope: Scope
    fmt: str
    encoding: str = "mapbox"
    if_none_match: str | None = None
    version: str | None = None  # the URL's ``v=`` (as TileRequest's)


@dataclass(frozen=True)
class TileAnswer:
    """What to send: ``content`` None is a 304 (the headers still carry the validators)."""

    content: bytes | None
    media_type: str
    headers: dict[str, str] = field(default_factory=dict)
    # Every header of the response in ASGI's raw form, content type and length too, when
    # made already (a cached tile keeps its own).
    raw: list[tuple[bytes, bytes]] | None = None

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        if self.raw is not None:
            return self.raw
        raw = [(name.lower().encode("latin-1"), value.encode("latin-1"))
               for name, value in self.headers.items()]
        if self.content is not None:
            raw += [(b"content-type", self.media_type.encode("latin-1")),
                    (b"content-length", str(len(self.content)).encode("latin-1"))]
        return raw


class _TileConnection:
    """A connection of the tile pool, checked out on first use: a cached tile needs none.

    Autocommit: a tile only reads, one statement at a time, so no transaction is opened and
    none is rolled back when the connection goes back to the pool. ``fresh=True`` replaces a
    connection that broke (the tile pool has no pre-ping; tiles.cache retries once).
    """

    def __init__(self, engine: AsyncEngine):
        self._engine = engine
        self._conn: AsyncConnection | None = None

    async def __call__(self, fresh: bool = False) -> AsyncConnection:
        if fresh:
            await self.close()
        if self._conn is None:
            conn = await self._engine.connect()
            self._conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        return self._conn

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()


class TileService:
    def __init__(self, settings: TilesSettings, versions: LayerVersions,
                 registry: RegistryCache, engine: AsyncEngine, pooled: int = 1,
                 reads: ReadRouter | None = None):
        self.settings = settings
        self.versions = versions
        self.registry = registry
        self.cache: TileCache | None = tile_cache(settings)
        self.sector_codes = SectorCodes()
        self._engine = engine
        # How many connections the tile pool holds: after a database restart, as many may
        # be dead before a live one (tiles.cache.cached_tile).
        self._pooled = pooled
        # TileOptions by (filters, aggregate): the same few, made once.
        self._options: dict[tuple, TileOptions] = {}
        # The hot standbys tiles are built on when they hold the tile's data version
        # (twin/core/replicas.py); None or without standbys: the primary.
        self._reads = reads

    @classmethod
    def open(cls, settings: Settings, reads: ReadRouter | None = None) -> TileService:
        """The service of one server process, its listener started (call inside the loop).
        ``reads``: the standbys tiles may be built on; the versions are always the
        primary's (LISTEN is refused on a standby)."""
        # The versions read per request while the listener is down, and the writers'
        # barriers, on a connection of their own (never waiting for the requests' pool).
        fallback = DataVersions(async_engine(settings, pool_size=1, max_overflow=0))
        tiles = settings.tiles
        versions = LayerVersions(libpq_url(settings), fallback, poll_s=tiles.versions_poll_s,
                                 sync_timeout_s=tiles.versions_sync_timeout_s,
                                 connect_timeout_s=settings.db.connect_timeout)
        if tiles.versions_listen:
            versions.start()
        # Not the requests' pool: a request holding a pooled connection may need the registry.
        registry = RegistryCache(async_engine(settings, pool_size=1, max_overflow=0))
        # Tiles' own pool, without a pre-ping round trip per checkout (tiles retry instead).
        engine = async_engine(settings, pre_ping=False, server_settings={
            "max_parallel_workers_per_gather": str(tiles.parallel_workers)})
        return cls(tiles, versions, registry, engine,
                   pooled=settings.db.pool_size + settings.db.max_overflow, reads=reads)

    def connect(self):
        """A connection of the tile pool (``async with``), for the 3D tile path."""
        return self._engine.connect()

    async def read(self, versions: dict[str, int],
                   work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """``work`` done on a standby that holds exactly ``versions`` (layer id -> the
        primary's data version, as pushed) of the layers it reads, else on the primary: the
        3D tile path's reads, under the rule of ``_cached_tile``."""
        async def on_standby(standby: _TileConnection) -> T:
            return await work(await standby())

        done = await self._on_standby(versions, on_standby)
        if done:
            return done[0]
        async with self.connect() as conn:
            return await work(conn)

    async def _on_standby(self, versions: dict[str, int],
                          work: Callable[[_TileConnection], Awaitable[T]]) -> tuple[T] | None:
        """``(work's answer,)`` when a standby holding exactly ``versions`` (layer id -> the
        primary's data version, as pushed) did it; None when there is none, it is behind
        them, or it failed in a way the primary would not (gone, a recovery conflict)."""
        reads = self._reads
        engine = await reads.choose() if reads is not None and reads.active else None
        if reads is None or engine is None or not reads.is_standby(engine):
            return None
        standby = _TileConnection(engine)
        try:
            if await self._standby_has(standby, list(versions), versions):
                return (await work(standby),)
        except (DBAPIError, ConnectionLost) as error:
            if isinstance(error, DBAPIError) and retry_on_primary(error) is None:
                raise
            reads.report_failure(engine, error)
        finally:
            await standby.close()
        return None

    async def close(self) -> None:
        await self.versions.close()
        await self.registry.close()
        await self._engine.dispose()

    # --- what every tile and listing shares -------------------------------------------

    async def layer_versions(self, pushed: bool = True) -> dict[str, int]:
        """Every layer's data version, as of a moment after the request arrived: pushed to
        this process (no round trip) unless ``pushed`` is False or the listener is not in
        sync, else read now (see twin/core/versions.py)."""
        return (pushed and self.versions.current()) or await self.versions.read(pushed)

    async def layers_for(self, layer_ids: tuple[str, ...], scope: Scope,
                         versions: dict[str, int]) -> tuple[LayerRegistry, list[Layer]]:
        registry = (self.registry.held(layer_ids, versions)
                    or await self.registry.current(layer_ids, versions))
        # Only what lies in the caller's jurisdiction; the cache keeps each scope's tiles apart.
        return registry, [visible_layer(scope, registry, layer_id) for layer_id in layer_ids]

    # --- vector tiles -----------------------------------------------------------------

    async def vector_tile(self, request: TileRequest) -> TileAnswer:
        tile = tile_address(request.z, request.x, request.y)
        versions = await self.layer_versions()
        registry, layers = await self.layers_for(request.layer_ids, request.scope, versions)
        connect = _TileConnection(self._engine)
        try:
            options = await self._options_retried(request, connect)
            keyed = {layer.id: registry.data_version(layer.id, versions) for layer in layers}
            key = tile_key(layers, tile, options, keyed, request.scope.key)
            made = await self._cached_tile(key, connect, layers, tile, options, versions)
        finally:
            await connect.close()
        return _vector_answer(made, request, version_token(keyed.items()))

    async def _cached_tile(self, key: tuple, connect: _TileConnection, layers: list[Layer],
                           tile, options: TileOptions, versions: dict[str, int]) -> CachedTile:
        """The tile of ``key`` from the cache, else built: on a standby when one is usable
        and has the data version of every layer of the tile, else on the primary.

        The key's versions are the primary's (pushed to this process). A standby behind
        them would build old rows into a tile cached under the new key (and served as the
        new version's, immutable, by every cache on the way): so the build first reads
        ``layers.data_version`` of the tile's layers on the standby's connection, and goes
        to the primary unless they are the key's. Read before the features, on the same
        server, the rows read after are at least that new (replay only moves forward). A
        standby that fails the build (gone, a recovery conflict) costs the tile nothing:
        built on the primary."""
        found = self.cache.get(key) if self.cache is not None else None
        if found is not None:
            return found
        async def build(standby: _TileConnection) -> CachedTile:
            return await cached_tile(key, standby, self.cache, layers, tile, options, 1)

        done = await self._on_standby({layer.id: versions.get(layer.id, 0) for layer in layers},
                                      build)
        if done:
            return done[0]
        return await cached_tile(key, connect, self.cache, layers, tile, options,
                                 self._pooled)

    @staticmethod
    async def _standby_has(connect: _TileConnection, ids: list[str],
                           versions: dict[str, int]) -> bool:
        """Whether the standby has replayed exactly the data versions the tile is keyed by
        (the primary's, as pushed) for each of its layers."""
        conn = await connect()
        rows = await conn.execute(text("SELECT id, data_version FROM layers "
                                       "WHERE id = ANY(:ids)"), {"ids": ids})
        held = {row[0]: row[1] for row in rows}
        return all(held.get(layer_id) == versions.get(layer_id) for layer_id in ids)

    async def _options_retried(self, request: TileRequest, connect: _TileConnection
                               ) -> TileOptions:
        """The tile's options; reading the sector codes (a process's first tile) retries on a
        fresh connection like the tile itself, as the pooled ones may have died with a
        database restart (tiles/cache.py)."""
        for attempt in range(self._pooled + 1):
            try:
                if attempt:
                    await connect(fresh=True)
                return await self._tile_options(request, connect)
            except DBAPIError as error:
                if not error.connection_invalidated or attempt == self._pooled:
                    raise
        raise AssertionError("unreachable")

    async def _tile_options(self, request: TileRequest, connect: _TileConnection) -> TileOptions:
        codes = self.sector_codes.known
        if codes is not None and (request.sector is None
                                  or set(split_ids(request.sector)) <= set(codes)):
            # The warm path: the codes are known and cover the request, no await.
            filters = parse_filters(codes, request.sector, request.level, request.cql,
                                    request.scope)
        else:
            filters = await read_filters(self.sector_codes, connect, request.sector,
                                         request.level, request.cql, request.scope)
            codes = await self.sector_codes.get(connect)
        options = self._options.get((filters, request.aggregate, codes))
        if options is None:
            settings = self.settings
            options = TileOptions(filters, request.aggregate, settings.aggregate_below_zoom,
                                  settings.feature_cap, settings.detail_cap,
                                  settings.point_cap, sectors=codes)
            if len(self._options) > 4096:  # filters are the clients' free text: bounded
                self._options.clear()
            self._options[(filters, request.aggregate, codes)] = options
        return options

    # --- raster and terrain tiles -----------------------------------------------------

    async def raster_tile(self, request: RasterRequest) -> TileAnswer:
        """A raster layer outside the caller's jurisdiction is 404 before the ETag is
        compared, so a 304 never tells a caller that the layer exists."""
        tile_address(request.z, request.x, request.y)  # 400 off the grid, before rasterio
        versions = await self.layer_versions()
        registry, (layer,) = await self.layers_for((request.layer_id,), request.scope, versions)
        terrain_tile = request.fmt == "terrain"
        if not terrain_tile:
            raster.check_raster(layer)  # the file is fetched, if need be, in the render thread
        media_type = "image/png" if terrain_tile else raster.FORMATS.get(
            request.fmt, ("", "application/octet-stream"))[1]
        version = registry.data_version(layer.id, versions)
        etag = etag_of(("raster", layer.id, version, request.z, request.x, request.y,
                        request.fmt, request.encoding if terrain_tile else None))
        headers = {**headers_of(etag), "Cache-Control": cache_control(
            version_token([(layer.id, version)]), request.version)}
        if not_modified(etag, request.if_none_match):
            return TileAnswer(None, media_type, headers)
        if terrain_tile:
            content = await anyio.to_thread.run_sync(
                terrain.terrain_tile, layer, request.z, request.x, request.y, request.encoding)
            return TileAnswer(content, media_type, headers)
        made = await anyio.to_thread.run_sync(raster.render_tile, layer, request.z, request.x,
                                              request.y, request.fmt)
        return TileAnswer(made.content, made.media_type, headers)


def _vector_answer(made: CachedTile, request: TileRequest, token: str) -> TileAnswer:
    if not_modified(made.etag, request.if_none_match):
        content, headers, answer = None, made.headers, "304"
    elif request.accepts_gzip:
        content, headers, answer = made.gzipped, made.gzip_headers, "gzip"
    else:
        content, headers, answer = made.tile.content, made.headers, "plain"
    if request.version is None or request.version != token:
        return TileAnswer(content, MVT_MEDIA_TYPE, headers, made.raw_headers(answer))
    return TileAnswer(content, MVT_MEDIA_TYPE, {**headers, "Cache-Control": IMMUTABLE},
                      pinned(made.raw_headers(answer)))

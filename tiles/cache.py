"""An exact in-process tile cache: keyed by the data version of every layer in the tile.

A write to a layer's table bumps ``layers.data_version`` (a trigger, in the same transaction),
so the next request builds a new key and a fresh tile; no TTL, no purge. The ETag is a hash
of the key, so it changes exactly when the tile can have changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import morecantile
import psycopg
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tiles.sql import ConnectionLost
from tiles.vector import TileOptions, VectorTile, render_tile
from twin.core.errors import DatabaseUnavailable
from twin.core.layer import Layer
from twin.core.settings import TilesSettings

GZIP_LEVEL = 6
# Every screen revalidates (the ETag changes exactly when the data does), but may store.
CACHE_CONTROL = "public, no-cache"


@dataclass
class CachedTile:
    etag: str
    tile: VectorTile
    _gzipped: bytes | None = field(default=None, repr=False)
    # The response headers, made once per tile rather than once per request.
    headers: dict[str, str] = field(init=False, repr=False)
    gzip_headers: dict[str, str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.headers = {"ETag": self.etag, "Cache-Control": CACHE_CONTROL,
                        "Vary": "Accept-Encoding"}
        if self.tile.truncated:
            self.headers["X-Tile-Truncated"] = ", ".join(
                f"{layer}={kept}" for layer, kept in self.tile.truncated.items())
        self.gzip_headers = {**self.headers, "Content-Encoding": "gzip"}

    @property
    def gzipped(self) -> bytes:
        if self._gzipped is None:
            # mtime=0 keeps the bytes (and so any downstream cache) stable across rebuilds.
            self._gzipped = gzip.compress(self.tile.content, GZIP_LEVEL, mtime=0)
        return self._gzipped

    @property
    def size(self) -> int:
        # Counted as if gzipped already (gzip never makes a tile much larger), so adding the
        # gzipped copy later cannot push the cache over its bound.
        return 2 * len(self.tile.content) + 64


class TileCache:
    """Tiles by key, at most ``max_bytes`` of them (plain and gzipped); least recently used
    go first."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._tiles: OrderedDict[tuple, CachedTile] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._tiles)

    def get(self, key: tuple) -> CachedTile | None:
        cached = self._tiles.get(key)
        if cached is not None:
            self._tiles.move_to_end(key)
        return cached

    def put(self, key: tuple, cached: CachedTile) -> None:
        if key in self._tiles:
            self._bytes -= self._tiles.pop(key).size
        self._tiles[key] = cached
        self._bytes += cached.size
        while self._bytes > self.max_bytes and self._tiles:
            self._bytes -= self._tiles.popitem(last=False)[1].size


def tile_cache(settings: TilesSettings) -> TileCache | None:
    """The app's cache (made in its lifespan), or None when ``TWIN_TILES_CACHE`` is off."""
    return TileCache(settings.cache_bytes) if settings.cache else None


def tile_key(layers: Sequence[Layer], tile: morecantile.Tile, options: TileOptions,
             versions: dict[str, int], scope: str | None = None) -> tuple:
    """Everything a tile's bytes depend on.

    ``scope`` is the part of the city the caller may see (a principal's jurisdiction, once
    tiles are restricted by it); None is the whole city.
    """
    return (tuple(layer.id for layer in layers), tile.z, tile.x, tile.y,
            options.filters.sectors, options.filters.levels, options.filters.cql,
            options.aggregate, options.aggregate_below, options.feature_cap,
            options.detail_cap, options.point_cap, options.stored_counts, options.sectors,
            scope,
            tuple(versions.get(layer.id, 0) for layer in layers))


def etag_of(key: tuple) -> str:
    return '"' + hashlib.blake2b(repr(key).encode(), digest_size=16).hexdigest() + '"'


class DataVersions:
    """Every layer's ``data_version``, read by one query that concurrent requests share.

    Exact: a request joins the next query *sent after it arrived*, never one already on its
    way, so the versions it gets are at least as new as the database when it asked. Under
    load one query answers a whole batch of requests, which is what keeps a cached tile at
    about one round trip's worth of work shared by all tiles waiting for it.

    The query runs on one connection held for the purpose (no pool checkout, no pre-ping per
    request). When it breaks (a database restart), the query is retried once on a new
    connection, which is what the pool's pre-ping would have done; if that fails too, the
    waiting requests get 503.
    """

    _QUERY = "SELECT id, data_version FROM layers"

    def __init__(self, engine: AsyncEngine):
        self._engine = engine
        self._conn: AsyncConnection | None = None
        self._driver: psycopg.AsyncConnection | None = None
        # The query the next arrivals join, and whether a reader task is running.
        self._next: asyncio.Future | None = None
        self._reading = False
        self._task: asyncio.Task | None = None  # held: the loop keeps only weak references

    async def read(self) -> dict[str, int]:
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            if not self._reading:
                self._reading = True
                self._task = asyncio.get_running_loop().create_task(self._read_batches())
        # shield: one caller giving up (a client gone) must not cancel the others' answer.
        return await asyncio.shield(self._next)

    async def _read_batches(self) -> None:
        try:
            while self._next is not None:
                batch, self._next = self._next, None
                try:
                    batch.set_result(await self._query())
                except Exception as error:  # every waiter gets the error, e.g. 503
                    batch.set_exception(error)
                    # Retrieved or not, the error is the waiters'; no "never retrieved" noise.
                    batch.exception()
        finally:
            self._reading = False

    async def _query(self) -> dict[str, int]:
        for attempt in (1, 2):
            driver = await self._connection()
            try:
                # psycopg directly: SQLAlchemy's execute costs ~150 us of CPU more than the
                # query itself on every cached tile.
                cursor = await driver.execute(self._QUERY, prepare=True)
                return dict(await cursor.fetchall())
            except psycopg.Error as error:
                await self._drop()
                if attempt == 2:
                    raise DatabaseUnavailable("the database is unavailable; try again "
                                              "shortly") from error
        raise AssertionError("unreachable")

    async def _connection(self) -> psycopg.AsyncConnection:
        """The held connection, from the engine DataVersions was given (twin.core.db's options)."""
        if self._conn is None:
            conn = await self._engine.connect()
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            self._driver = (await conn.get_raw_connection()).driver_connection
            self._conn = conn
        return self._driver

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.invalidate()
                await conn.close()

    async def close(self) -> None:
        """Closes the connection and disposes of the engine: give DataVersions one of its own."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()
        await self._engine.dispose()


def tile_versions(layers: Sequence[Layer], versions: dict[str, int]) -> dict[str, int]:
    """The version to key each layer's tiles by (the rule of LayerRegistry.data_versions).

    An uploaded layer's rows never change in place: a publish points it at another table and
    resolves the registry again, so until then its tiles are keyed by the version the
    registry was resolved at, never by a newer one (which would cache old rows under it).
    """
    return {layer.id: layer.data_version if layer.origin == "upload"
            else versions.get(layer.id, 0) for layer in layers}


async def cached_tile(versions: dict[str, int], connect: Callable[..., Awaitable[AsyncConnection]],
                      cache: TileCache | None, layers: Sequence[Layer], tile: morecantile.Tile,
                      options: TileOptions, scope: str | None = None) -> CachedTile:
    """The tile for ``versions`` (read before the features, so a cached tile is never older
    than its key): from the cache, or built on a connection from ``connect`` and cached.
    ``connect(fresh=True)`` must replace the connection it gave before.

    A cached tile needs no connection at all. Without a cache the ETag is the same as with
    one, so revalidation still gives 304s.
    """
    key = tile_key(layers, tile, options, tile_versions(layers, versions), scope)
    found = cache.get(key) if cache is not None else None
    if found is not None:
        return found
    try:
        built = await render_tile(await connect(), layers, tile, options)
    except (DBAPIError, ConnectionLost) as error:
        # The tile pool skips the pre-ping round trip: a connection the database dropped (a
        # restart) fails here once, and the tile is built again on a fresh one.
        if isinstance(error, DBAPIError) and not error.connection_invalidated:
            raise
        built = await render_tile(await connect(fresh=True), layers, tile, options)
    made = CachedTile(etag_of(key), built)
    if cache is not None:
        cache.put(key, made)
    return made

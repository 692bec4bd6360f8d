"""An exact in-process tile cache: keyed by the data version of every layer in the tile.

A write to a layer's table bumps ``layers.data_version`` (a trigger, in the same transaction),
so the next request builds a new key and a fresh tile; no TTL, no purge. The ETag is a hash
of the key (tiles.validators), so it changes exactly when the tile can have changed.
"""

from __future__ import annotations

import gzip
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import morecantile
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from tiles.metadata import MVT_MEDIA_TYPE
from tiles.sql import ConnectionLost
from tiles.validators import etag_of, headers_of
from tiles.vector import TileOptions, VectorTile, render_tile
from twin.core.layer import Layer
from twin.core.settings import TilesSettings

GZIP_LEVEL = 6


@dataclass
class CachedTile:
    etag: str
    tile: VectorTile
    _gzipped: bytes | None = field(default=None, repr=False)
    # The response headers, made once per tile rather than once per request.
    headers: dict[str, str] = field(init=False, repr=False)
    gzip_headers: dict[str, str] = field(init=False, repr=False)
    # The same as raw HTTP headers, by answer (plain, gzip, 304), made on first use.
    raw: dict[str, list[tuple[bytes, bytes]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.headers = {**headers_of(self.etag), "Vary": "Accept-Encoding"}
        if self.tile.truncated:
            self.headers["X-Tile-Truncated"] = ", ".join(
                f"{layer}={kept}" for layer, kept in self.tile.truncated.items())
        self.gzip_headers = {**self.headers, "Content-Encoding": "gzip"}

    def raw_headers(self, answer: str) -> list[tuple[bytes, bytes]]:
        """The HTTP headers (ASGI's raw form) of its ``plain``, ``gzip`` or ``304`` answer,
        content type and length too: made once, not once per request."""
        raw = self.raw.get(answer)
        if raw is None:
            headers = self.gzip_headers if answer == "gzip" else self.headers
            raw = [(name.lower().encode("latin-1"), value.encode("latin-1"))
                   for name, value in headers.items()]
            if answer != "304":
                body = self.gzipped if answer == "gzip" else self.tile.content
                raw += [(b"content-type", MVT_MEDIA_TYPE.encode()),
                        (b"content-length", str(len(body)).encode())]
            self.raw[answer] = raw
        return raw

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


async def cached_tile(key: tuple, connect: Callable[..., Awaitable[AsyncConnection]],
                      cache: TileCache | None, layers: Sequence[Layer], tile: morecantile.Tile,
                      options: TileOptions, pooled: int = 1) -> CachedTile:
    """The tile of ``key`` (``tile_key``, with the versions taken before the features are
    read, so a cached tile is never older than its key): from the cache, or built on a
    connection from ``connect`` and cached. ``connect(fresh=True)`` must replace the
    connection it gave before with the pool's next one; ``pooled`` is how many connections
    the pool can hold.

    A cached tile needs no connection at all. Without a cache the ETag is the same as with
    one, so revalidation still gives 304s.
    """
    found = cache.get(key) if cache is not None else None
    if found is not None:
        return found
    # The tile pool skips the pre-ping round trip: a connection that died with the database
    # (a restart) fails at its first statement, and the tile is built again on the pool's
    # next one. After a restart every connection that sat idle in the pool is dead (while
    # the database was down, tiles failed on the versions before reaching the pool), and
    # the pool hands them out in turn: up to ``pooled`` of them before a new one. A lost
    # connection costs no wait (the socket is closed); with the database down, opening a
    # new one fails at once and the request gets its 503.
    for attempt in range(pooled + 1):
        try:
            built = await render_tile(await connect(fresh=attempt > 0), layers, tile, options)
            break
        except (DBAPIError, ConnectionLost) as error:
            lost = isinstance(error, ConnectionLost) or error.connection_invalidated
            if not lost or attempt == pooled:
                raise
    made = CachedTile(etag_of(key), built)
    if cache is not None:
        cache.put(key, made)
    return made

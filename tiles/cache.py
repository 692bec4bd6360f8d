"""An exact in-process tile cache: keyed by the data version of every layer in the tile.

A write to a layer's table bumps ``layers.data_version`` (a trigger, in the same transaction),
so the next request builds a new key and a fresh tile; no TTL, no purge. The ETag is a hash
of the key, so it changes exactly when the tile can have changed.
"""

from __future__ import annotations

import gzip
import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import morecantile
from sqlalchemy.ext.asyncio import AsyncConnection

from layers.registry import Layer, LayerRegistry
from tiles.vector import TileOptions, VectorTile, render_tile
from twin.settings import TilesSettings

GZIP_LEVEL = 6


@dataclass
class CachedTile:
    etag: str
    tile: VectorTile
    _gzipped: bytes | None = field(default=None, repr=False)

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
            options.detail_cap, options.point_cap, scope,
            tuple(versions.get(layer.id, 0) for layer in layers))


def etag_of(key: tuple) -> str:
    return '"' + hashlib.blake2b(repr(key).encode(), digest_size=16).hexdigest() + '"'


async def cached_tile(conn: AsyncConnection, registry: LayerRegistry, cache: TileCache | None,
                      layers: Sequence[Layer], tile: morecantile.Tile,
                      options: TileOptions, scope: str | None = None) -> CachedTile:
    """The tile for the current data versions: from the cache, or built and cached.

    The versions are read before the features, so a cached tile is never older than its key.
    Without a cache the ETag is the same as with one, so revalidation still gives 304s.
    """
    versions = await registry.data_versions(conn)
    key = tile_key(layers, tile, options, versions, scope)
    found = cache.get(key) if cache is not None else None
    if found is not None:
        return found
    made = CachedTile(etag_of(key), await render_tile(conn, layers, tile, options))
    if cache is not None:
        cache.put(key, made)
    return made

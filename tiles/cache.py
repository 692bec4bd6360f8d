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

# Bytes of tiles (plain and gzipped) kept; least recently used go first.
CACHE_MAX_BYTES = 256 * 1024 * 1024
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
    def __init__(self, max_bytes: int = CACHE_MAX_BYTES):
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


def tile_key(layers: Sequence[Layer], tile: morecantile.Tile, options: TileOptions,
             versions: dict[str, int]) -> tuple:
    return (tuple(layer.id for layer in layers), tile.z, tile.x, tile.y,
            options.filters.sectors, options.filters.levels, options.filters.cql,
            options.aggregate_below,
            tuple(versions.get(layer.id, 0) for layer in layers))


def etag_of(key: tuple) -> str:
    return '"' + hashlib.blake2b(repr(key).encode(), digest_size=16).hexdigest() + '"'


async def cached_tile(conn: AsyncConnection, registry: LayerRegistry, cache: TileCache | None,
                      layers: Sequence[Layer], tile: morecantile.Tile,
                      options: TileOptions) -> CachedTile:
    """The tile for the current data versions: from the cache, or built and cached.

    The versions are read before the features, so a cached tile is never older than its key.
    """
    versions = await registry.data_versions(conn)
    key = tile_key(layers, tile, options, versions)
    found = cache.get(key) if cache is not None else None
    if found is not None:
        return found
    made = CachedTile(etag_of(key), await render_tile(conn, layers, tile, options))
    if cache is not None:
        cache.put(key, made)
    return made

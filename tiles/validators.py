"""The validators of every tile and tile-like answer: one ETag and Cache-Control scheme.

An ETag is a hash of the answer's key: everything its bytes depend on, the data versions of
its layers among them (by the registry's rule, ``LayerRegistry.data_versions``). So it
changes exactly when the answer can have changed, and a client that revalidates gets a 304
until then. Vector, raster and terrain tiles all use it.

Versioned URLs (issue 15): the documents that name tile URLs (TileJSON, the style's sources,
OGC tilesets, terrain ``layer.json``, 3D tileset roots) add ``v=<token>``, a short hash of the
data versions of the layers the tiles are made of. A tile asked for with the token of the
versions it was built at can never change, so it is sent ``immutable``: a shared cache (the
cluster's nginx) and the browser keep it without asking again. Any other ``v`` (an older
document, or a node whose pushed versions are behind) gets the revalidated answer above:
never cached as immutable under a URL whose data it does not hold.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

# Every screen revalidates (the ETag changes exactly when the data does), but may store.
CACHE_CONTROL = "public, no-cache"
# A tile whose URL names the data versions it was built at (``v=``): it never changes.
IMMUTABLE = "public, max-age=31536000, immutable"


def version_token(versions: Iterable[tuple[str, int]]) -> str:
    """The ``v=`` of tiles made of these ``(layer id, data version)`` pairs: the same pairs in
    any order give the same token."""
    return hashlib.blake2b(repr(sorted(versions)).encode(), digest_size=6).hexdigest()


def cache_control(token: str, requested: str | None) -> str:
    """Immutable when the URL's ``v`` is the token of the data the answer holds."""
    return IMMUTABLE if requested is not None and requested == token else CACHE_CONTROL


def pinned(raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Raw ASGI headers with their Cache-Control made immutable."""
    return [(name, IMMUTABLE.encode()) if name == b"cache-control" else (name, value)
            for name, value in raw]


def etag_of(key: tuple) -> str:
    """A strong ETag of ``key`` (its repr: ints, strings and tuples of them)."""
    return '"' + hashlib.blake2b(repr(key).encode(), digest_size=16).hexdigest() + '"'


def headers_of(etag: str) -> dict[str, str]:
    return {"ETag": etag, "Cache-Control": CACHE_CONTROL}


def not_modified(etag: str, if_none_match: str | None) -> bool:
    """Whether the client's ``If-None-Match`` names ``etag`` (a list or a single tag)."""
    return if_none_match is not None and etag in if_none_match

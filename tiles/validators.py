"""The validators of every tile and tile-like answer: one ETag and Cache-Control scheme.

An ETag is a hash of the answer's key: everything its bytes depend on, the data versions of
its layers among them (by the registry's rule, ``LayerRegistry.data_versions``). So it
changes exactly when the answer can have changed, and a client that revalidates gets a 304
until then. Vector, raster and terrain tiles all use it.
"""

from __future__ import annotations

import hashlib

# Every screen revalidates (the ETag changes exactly when the data does), but may store.
CACHE_CONTROL = "public, no-cache"


def etag_of(key: tuple) -> str:
    """A strong ETag of ``key`` (its repr: ints, strings and tuples of them)."""
    return '"' + hashlib.blake2b(repr(key).encode(), digest_size=16).hexdigest() + '"'


def headers_of(etag: str) -> dict[str, str]:
    return {"ETag": etag, "Cache-Control": CACHE_CONTROL}


def not_modified(etag: str, if_none_match: str | None) -> bool:
    """Whether the client's ``If-None-Match`` names ``etag`` (a list or a single tag)."""
    return if_none_match is not None and etag in if_none_match

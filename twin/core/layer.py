"""The layer record and the registry of published layers: one table (``layers``) that tiles,
features, the style and the listings all read.

Reading only (async, in the API); layers/registry.py registers the built-in layers and
layers/versions.py publishes uploads. The registry is resolved once at start-up and again when
the layers' data versions (twin/core/versions.py, pushed to every process) show that a layer
was published, rolled back or deleted, never per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from twin.core.errors import NotFound


@dataclass(frozen=True)
class Layer:
    id: str
    title_zh: str
    title_en: str
    kind: str
    geometry_type: str | None
    source_table: str | None
    source_filter: str | None
    fields: list[dict] = field(default_factory=list)
    bbox: list[float] | None = None
    source_crs: str = "EPSG:4326"
    source_datum: str = "wgs84"
    file_path: str | None = None
    min_zoom: int = 0
    max_zoom: int = 22
    origin: str = "builtin"
    # Uploaded layers: the version published when the registry was resolved, its data version
    # (see LayerRegistry.data_versions) and kind-specific facts (3D anchor, raster bands).
    current_version: int | None = None
    data_version: int = 0
    meta: dict = field(default_factory=dict)
    # Who may see an uploaded layer (issue 7, twin/core/scope.py): the uploader's scope
    # key (None: city-wide) and whether it is shared with the whole city anyway.
    owner_scope: str | None = None
    shared: bool = True

    @property
    def where(self) -> str:
        """The layer's row filter as SQL (always a valid predicate)."""
        return self.source_filter or "TRUE"


_SELECT_LAYERS = text("""
    SELECT id, title_zh, title_en, kind, geometry_type, source_table, source_filter, fields,
           bbox, source_crs, source_datum, file_path, min_zoom, max_zoom, origin,
           current_version, data_version, meta, owner_scope, shared
      FROM layers
     ORDER BY origin, id
""")


class LayerRegistry:
    """Published layers by id, as resolved at start-up or at the last publish."""

    def __init__(self, layers: list[Layer]):
        self._layers = {layer.id: layer for layer in layers}
        # layer id -> (data version, feature count); a write bumps the version.
        self._counts: dict[str, tuple[int, int]] = {}

    @classmethod
    async def load(cls, conn: AsyncConnection) -> LayerRegistry:
        rows = (await conn.execute(_SELECT_LAYERS)).mappings().all()
        return cls([Layer(**row) for row in rows])

    def __iter__(self):
        return iter(self._layers.values())

    def __len__(self) -> int:
        return len(self._layers)

    def get(self, layer_id: str) -> Layer:
        try:
            return self._layers[layer_id]
        except KeyError:
            known = ", ".join(sorted(self._layers))
            raise NotFound(f"unknown layer '{layer_id}'; available layers: {known}") from None

    def is_stale_for(self, layer_ids: Sequence[str], versions: dict[str, int]) -> bool:
        """Whether a requested layer was published, published anew, rolled back or deleted
        since this registry was resolved (``versions``: every layer's data version, read
        after the request arrived): by another worker process, whose change refreshes only
        its own registry.

        Ids unknown to both the registry and the database never count, so asking for unknown
        layers never reloads anything.
        """
        return any(self._changed(layer_id, versions) for layer_id in layer_ids)

    def is_stale(self, versions: dict[str, int]) -> bool:
        """Whether any layer changed since this registry was resolved (see ``is_stale_for``):
        for routes that list or may read any layer. A layer added or deleted shows as a
        different set of ids; re-publishing and rolling back move an upload's data version.
        """
        if versions.keys() != self._layers.keys():
            return True
        return any(self._changed(layer_id, versions) for layer_id in self._layers)

    def _changed(self, layer_id: str, versions: dict[str, int]) -> bool:
        layer = self._layers.get(layer_id)
        if layer_id not in versions:
            return layer is not None  # deleted since
        if layer is None:
            return True  # published since
        # Built-in layers change rows in place (their version moves on every write, and the
        # registry's entry stays right); an upload's version moves only when it is pointed at
        # another table. Equality, not order: a layer deleted and uploaded again under the
        # same id starts over at version 1. (If the deleted one was at 1 too, nothing here
        # can tell them apart: the versions are all that is read.)
        return layer.origin == "upload" and versions[layer_id] != layer.data_version

    def data_versions(self, versions: dict[str, int]) -> dict[str, int]:
        """The version to key each layer's tiles, ETags and counts by: ``versions`` (every
        layer's, as read or pushed), but an upload's as this registry resolved it.

        An uploaded layer's rows never change in place: a publish points it at another table
        and then the registry is resolved again. Until that happens this registry still reads
        the old table, so it must key by the version it was resolved at, never by a newer one
        (which would cache old rows under the new version's key).
        """
        return {layer_id: self.data_version(layer_id, versions) for layer_id in versions}

    def data_version(self, layer_id: str, versions: dict[str, int]) -> int:
        """One layer's version by the rule of ``data_versions``."""
        layer = self._layers.get(layer_id)
        if layer is not None and layer.origin == "upload":
            return layer.data_version
        return versions.get(layer_id, 0)

    async def feature_count(self, conn: AsyncConnection, layer: Layer, version: int) -> int | None:
        """Exact feature count of a vector layer, computed once per data version."""
        if layer.kind != "vector":
            return None
        cached = self._counts.get(layer.id)
        if cached is None or cached[0] != version:
            query = f'SELECT count(*) FROM "{layer.source_table}" WHERE {layer.where}'
            cached = (version, (await conn.execute(text(query))).scalar_one())
            self._counts[layer.id] = cached
        return cached[1]


class RegistryCache:
    """A process's layer registry: resolved on first use and again when it is older than the
    database, never per request.

    A request first takes every layer's data version (twin/core/versions.py: pushed to the
    process, or read per request while its listener is down), then asks for the registry
    with them: one those versions show to be older (a layer published, published anew,
    rolled back or deleted, by this process or another) is resolved again, by a load that
    starts after the versions were taken, unless a concurrent request's load already matches
    them. So a request that starts after a change committed, in any process, sees it.

    Lazy, so the app starts (and /healthz answers 503) even while the database is down.
    """

    def __init__(self, engine: AsyncEngine):
        self._engine = engine
        self._registry: LayerRegistry | None = None
        self._lock = asyncio.Lock()

    async def __call__(self) -> LayerRegistry:
        """The registry as last resolved (resolved now the first time and after invalidate)."""
        return await self._resolved(lambda registry: False)

    def held(self, layer_ids: Sequence[str], versions: dict[str, int]) -> LayerRegistry | None:
        """The held registry if ``versions`` show none of ``layer_ids`` changed since it was
        resolved, else None (then ``current``): the warm tile path, without an await."""
        registry = self._registry
        if registry is None or registry.is_stale_for(layer_ids, versions):
            return None
        return registry

    async def current(self, layer_ids: Sequence[str], versions: dict[str, int]) -> LayerRegistry:
        """The registry, resolved again first if ``versions`` (taken before this call) show
        that one of ``layer_ids`` changed since it was resolved."""
        return await self._resolved(lambda registry: registry.is_stale_for(layer_ids, versions))

    async def current_all(self, versions: dict[str, int]) -> LayerRegistry:
        """The registry, resolved again first if ``versions`` (taken before this call) show
        that any layer changed since it was resolved: for routes that list layers or take
        one by id."""
        return await self._resolved(lambda registry: registry.is_stale(versions))

    def invalidate(self) -> None:
        """After this process committed a change; safe from any thread (upload jobs call it
        from theirs). A shortcut only: the versions would show the change too."""
        self._registry = None

    async def close(self) -> None:
        await self._engine.dispose()

    async def _resolved(self, stale: Callable[[LayerRegistry], bool]) -> LayerRegistry:
        """The held registry unless ``stale``; else one that is not, or one loaded after the
        caller's versions were taken. Callers that found it stale at once share one load:
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

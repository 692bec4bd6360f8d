"""The layer record and the registry of published layers: one table (``layers``) that tiles,
features, the style and the listings all read.

Reading only (async, in the API); layers/registry.py registers the built-in layers and
layers/versions.py publishes uploads. The registry is resolved once at start-up and again when
a layer is published, never per request; only the cheap ``data_version`` column is read per
request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

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

    async def data_versions(self, conn: AsyncConnection) -> dict[str, int]:
        rows = await conn.execute(text("SELECT id, data_version FROM layers"))
        versions = dict(rows.all())
        # An uploaded layer's rows never change in place: a publish points it at another table
        # and then resolves the registry again. Until that happens this registry still reads
        # the old table, so it must key tiles by the version it was resolved at, never by a
        # newer one (which would cache old rows under the new version's key).
        for layer in self._layers.values():
            if layer.origin == "upload" and layer.id in versions:
                versions[layer.id] = layer.data_version
        return versions

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

"""A worker's registry notices another worker's publish through the shared data versions."""

from __future__ import annotations

import asyncio

from sqlalchemy import Engine, text

from twin.core.db import async_engine
from twin.core.layer import Layer, LayerRegistry, RegistryCache
from twin.core.settings import Settings
from twin.core.versions import DataVersions


def layer(layer_id: str, origin: str, data_version: int) -> Layer:
    return Layer(id=layer_id, title_zh=layer_id, title_en=layer_id, kind="vector",
                 geometry_type="Point", source_table=f"t_{layer_id}", source_filter=None,
                 origin=origin, data_version=data_version)


REGISTRY = LayerRegistry([layer("risk_points", "builtin", 1), layer("parks", "upload", 3)])


def test_an_unchanged_upload_and_builtin_writes_keep_the_registry():
    # Built-in layers change rows in place: their versions move without a new registry.
    assert not REGISTRY.is_stale_for(["risk_points", "parks"], {"risk_points": 9, "parks": 3})


def test_a_new_version_of_an_upload_elsewhere_makes_it_stale():
    assert REGISTRY.is_stale_for(["parks"], {"risk_points": 1, "parks": 4})


def test_a_layer_published_elsewhere_makes_it_stale():
    assert REGISTRY.is_stale_for(["lakes"], {"risk_points": 1, "parks": 3, "lakes": 1})


def test_an_unknown_layer_never_reloads():
    assert not REGISTRY.is_stale_for(["nowhere"], {"risk_points": 1, "parks": 3})


def test_a_layer_deleted_elsewhere_makes_it_stale():
    # Tiles of a deleted layer must 404, not read a dropped table through an old registry.
    assert REGISTRY.is_stale_for(["parks"], {"risk_points": 1})


# --- the whole registry (is_stale): every route that lists layers or takes one by id -------

def test_the_whole_registry_is_current_when_only_builtin_rows_changed():
    assert not REGISTRY.is_stale({"risk_points": 9, "parks": 3})


def test_a_new_layer_anywhere_makes_the_whole_registry_stale():
    assert REGISTRY.is_stale({"risk_points": 1, "parks": 3, "lakes": 1})


def test_a_deleted_layer_makes_the_whole_registry_stale():
    assert REGISTRY.is_stale({"risk_points": 1})


def test_a_new_version_or_a_rollback_makes_the_whole_registry_stale():
    assert REGISTRY.is_stale({"risk_points": 1, "parks": 4})
    # A rollback moves the version on too; a layer deleted and uploaded again under the same
    # id starts over at 1: equality, not order, decides.
    assert REGISTRY.is_stale({"risk_points": 1, "parks": 1})


def test_a_builtin_layer_replaced_by_another_id_makes_the_whole_registry_stale():
    assert REGISTRY.is_stale({"roads": 1, "parks": 3})


# --- the app's cache, on the database: what "another process" does is a plain commit --------

PROBE = "stale_probe"
# An uploaded layer as another process publishes it: a copy of a built-in one's definition.
COPIED = ("id, title_zh, title_en, kind, geometry_type, source_table, source_filter, fields, "
          "bbox, source_crs, source_datum, file_path, min_zoom, max_zoom")


def _write(engine: Engine, sql: str) -> None:
    with engine.begin() as conn:
        conn.execute(text(sql), {"id": PROBE})


async def _requests(cache: RegistryCache, versions: DataVersions, count: int) -> list:
    async def request() -> LayerRegistry:
        return await cache.current_all(await versions.read())
    return await asyncio.gather(*(request() for _ in range(count)))


async def _changes_seen_by_the_next_requests(engine: Engine, database_url: str) -> None:
    settings = Settings(database_url=database_url)
    cache = RegistryCache(async_engine(settings, pool_size=1, max_overflow=0))
    versions = DataVersions(async_engine(settings, pool_size=1, max_overflow=0))
    try:
        before = await _requests(cache, versions, 5)
        assert all(registry is before[0] for registry in before)  # resolved once
        assert PROBE not in {layer.id for layer in before[0]}
        assert (await _requests(cache, versions, 1))[0] is before[0]  # nothing changed

        _write(engine, f"INSERT INTO layers ({COPIED}, origin, current_version) "
                       f"SELECT :id, {COPIED[4:]}, 'upload', 1 FROM layers WHERE id = 'districts'")
        added = await _requests(cache, versions, 20)
        # Every request after the commit sees the layer, through one shared reload.
        assert all(registry is added[0] for registry in added) and added[0] is not before[0]
        assert added[0].get(PROBE).data_version == 1

        _write(engine, "UPDATE layers SET data_version = data_version + 1 WHERE id = :id")
        assert (await _requests(cache, versions, 1))[0].get(PROBE).data_version == 2

        _write(engine, "DELETE FROM layers WHERE id = :id")
        deleted = await _requests(cache, versions, 20)
        assert all(PROBE not in {layer.id for layer in registry} for registry in deleted)
    finally:
        _write(engine, "DELETE FROM layers WHERE id = :id")
        await versions.close()


def test_the_cache_resolves_a_change_once_for_every_request_after_it(engine, database_url):
    asyncio.run(_changes_seen_by_the_next_requests(engine, database_url))

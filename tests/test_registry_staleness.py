"""A worker's registry notices another worker's publish through the shared data versions."""

from __future__ import annotations

from layers.registry import Layer, LayerRegistry


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

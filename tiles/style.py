"""The MapLibre style (version 8) of the "one map", over twin's own TileJSON sources.

Sources are grouped so a write to one kind of data never invalidates another's cached tiles
(the tile cache keys on the data version of every layer in a tile): the four admin levels,
which rarely change, share one composite source; everything else has its own.
"""

from __future__ import annotations

from tiles.hexagons import AGGREGATE_BELOW_ZOOM
from tiles.metadata import union_bounds
from twin.core.layer import LayerRegistry

STYLE_ID = "risk-map"
ADMIN_LAYERS = ("districts", "streets", "communities", "grids")
# Source id -> the registry layers it serves, as one (composite) tile.
SOURCES = {
    "admin": ADMIN_LAYERS,
    "risk_points": ("risk_points",),
    "response_teams": ("response_teams",),
    "pipe_segments": ("pipe_segments",),
    "buildings": ("buildings",),
}
# Risk levels 1 (major) to 4 (low).
LEVEL_COLOURS = {1: "#e53935", 2: "#fb8c00", 3: "#fdd835", 4: "#1e88e5"}
NETWORK_COLOURS = {"water": "#1565c0", "drainage": "#6d4c41", "gas": "#f9a825"}
OTHER_NETWORK_COLOUR = "#757575"
# Coarser admin levels draw heavier lines.
ADMIN_LINES = {"districts": ("#37474f", 2.5), "streets": ("#546e7a", 1.5),
               "communities": ("#78909c", 1.0), "grids": ("#b0bec5", 0.6)}


def _by_level(key: str) -> list:
    """A ``match`` expression: the colour of the risk level held in property ``key``."""
    expression: list = ["match", ["get", key]]
    for level, colour in list(LEVEL_COLOURS.items())[:-1]:
        expression += [level, colour]
    return expression + [LEVEL_COLOURS[4]]


def _admin_layers(registry: LayerRegistry) -> list[dict]:
    layers = []
    for layer_id in ADMIN_LAYERS:
        colour, width = ADMIN_LINES[layer_id]
        layers.append({
            "id": f"{layer_id}-outline", "type": "line", "source": "admin",
            "source-layer": layer_id, "minzoom": registry.get(layer_id).min_zoom,
            "paint": {"line-color": colour, "line-width": width},
        })
    return layers


def _point_radius() -> list:
    """Grows with the zoom; a cluster (``count`` points in one cell) grows with its count."""
    by_count = ["+", 0, ["*", 1.5, ["sqrt", ["coalesce", ["get", "count"], 1]]]]
    return ["interpolate", ["linear"], ["zoom"],
            12, ["+", 1.5, by_count], 18, ["+", 6.5, by_count]]


def _risk_layers(registry: LayerRegistry, aggregate_below: int) -> list[dict]:
    points = registry.get("risk_points")
    # Below aggregate_below the tiles hold H3 hexagons; from it on, points and clusters,
    # both coloured by "level" (a cluster's is the worst level in it).
    hexagons = {"source": "risk_points", "source-layer": "risk_points",
                "minzoom": points.min_zoom, "maxzoom": aggregate_below}
    hexagon_layers = [
        {"id": "risk-hexagons", "type": "fill", **hexagons,
         "paint": {
             "fill-color": ["interpolate", ["linear"], ["get", "count"],
                            1, "#fff3e0", 10, "#ffb74d", 50, "#f57c00", 200, "#bf360c"],
             "fill-opacity": 0.6,
         }},
        {"id": "risk-hexagons-worst-level", "type": "line", **hexagons,
         "paint": {"line-color": _by_level("worst_level"), "line-width": 1.5}},
    ]
    point_layer = {
        "id": "risk-points", "type": "circle", "source": "risk_points",
        "source-layer": "risk_points", "minzoom": max(aggregate_below, points.min_zoom),
        "paint": {
            "circle-color": _by_level("level"),
            "circle-radius": _point_radius(),
            "circle-stroke-color": "#ffffff", "circle-stroke-width": 1,
        }}
    # No hexagon layers when aggregation is off (TWIN_TILES_AGGREGATE_BELOW_ZOOM=0).
    return [*hexagon_layers, point_layer] if aggregate_below > points.min_zoom else [point_layer]


def _pipe_layer(registry: LayerRegistry) -> dict:
    colour: list = ["match", ["get", "network"]]
    for network, network_colour in NETWORK_COLOURS.items():
        colour += [network, network_colour]
    return {"id": "pipe-segments", "type": "line", "source": "pipe_segments",
            "source-layer": "pipe_segments", "minzoom": registry.get("pipe_segments").min_zoom,
            "paint": {"line-color": colour + [OTHER_NETWORK_COLOUR], "line-width": 2}}


def _team_layer(registry: LayerRegistry) -> dict:
    return {"id": "response-teams", "type": "circle", "source": "response_teams",
            "source-layer": "response_teams",
            "minzoom": registry.get("response_teams").min_zoom,
            "paint": {"circle-color": "#2e7d32", "circle-radius": 6,
                      "circle-stroke-color": "#ffffff", "circle-stroke-width": 2}}


def _building_layer(registry: LayerRegistry) -> dict:
    return {"id": "buildings-3d", "type": "fill-extrusion", "source": "buildings",
            "source-layer": "buildings", "minzoom": registry.get("buildings").min_zoom,
            "paint": {
                "fill-extrusion-color": "#cfd8dc",
                "fill-extrusion-height": ["to-number", ["get", "height"], 0],
                "fill-extrusion-base": ["to-number", ["get", "base_height"], 0],
                "fill-extrusion-opacity": 0.85,
            }}


def risk_map_style(registry: LayerRegistry, base_url: str,
                   aggregate_below: int = AGGREGATE_BELOW_ZOOM) -> dict:
    """The style document; ``base_url`` (no trailing slash) makes every source URL absolute."""
    west, south, east, north = union_bounds([registry.get(i) for i in ADMIN_LAYERS])
    sources = {
        source_id: {"type": "vector",
                    "url": f"{base_url}/tiles/{','.join(layer_ids)}/tilejson.json"}
        for source_id, layer_ids in SOURCES.items()
    }
    layers = [
        {"id": "background", "type": "background", "paint": {"background-color": "#f5f5f3"}},
        *_admin_layers(registry),
        _pipe_layer(registry),
        _building_layer(registry),
        *_risk_layers(registry, aggregate_below),
        _team_layer(registry),
    ]
    return {
        "version": 8,
        "name": "twin risk map",
        "metadata": {"twin:style-id": STYLE_ID},
        "center": [(west + east) / 2, (south + north) / 2],
        "zoom": 8,
        "sources": sources,
        "layers": layers,
    }

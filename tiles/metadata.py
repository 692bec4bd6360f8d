"""Documents that describe the tiles: TileJSON 3.0.0 and OGC API - Tiles tilesets."""

from __future__ import annotations

from collections.abc import Sequence

from tiles import hexagons, points
from tiles.filters import TileFilters
from tiles.grid import MAX_ZOOM, WEB_MERCATOR
from tiles.validators import version_token
from tiles.vector import check_vector_layers, feature_id_column
from twin.core.errors import InvalidParameter
from twin.core.layer import Layer, LayerRegistry

MVT_MEDIA_TYPE = "application/vnd.mapbox-vector-tile"
WEB_MERCATOR_URI = "http://www.opengis.net/def/tilematrixset/OGC/1.0/WebMercatorQuad"
NUMERIC_TYPES = {"smallint", "integer", "bigint", "double precision", "real", "numeric"}


def split_layer_ids(layer_ids: str) -> list[str]:
    """``a,b,c`` -> the ids, in order, each once."""
    ids = list(dict.fromkeys(part.strip() for part in layer_ids.split(",") if part.strip()))
    if not ids:
        raise InvalidParameter("no layer given; ask for one id or a comma-separated list")
    return ids


def tilejson_type(column_type: str) -> str:
    return "Number" if column_type in NUMERIC_TYPES else "String"


def vector_layer(layer: Layer, aggregate_below: int = hexagons.AGGREGATE_BELOW_ZOOM) -> dict:
    fid = feature_id_column(layer)
    fields = {f["name"]: tilejson_type(f["type"]) for f in layer.fields if f["name"] != fid}
    description = layer.title_en
    if layer.source_table == hexagons.AGGREGATED_TABLE and aggregate_below > 0:
        fields.update(hexagons.HEXAGON_FIELDS)
        description += (f"; H3 hexagons (count, count_<sector>, worst_level) below zoom "
                        f"{aggregate_below}")
    if points.budgeted(layer):
        fields.update(points.CLUSTER_FIELDS)
        description += (f"; every field in tiles of at most {points.DETAIL_CAP} points, else "
                        f"{', '.join(points.THIN_FIELDS)}; over {points.POINT_CAP} points, "
                        "cells of several points are one feature with count and the worst "
                        "level")
    return {"id": layer.id, "description": description, "minzoom": layer.min_zoom,
            "maxzoom": min(layer.max_zoom, MAX_ZOOM), "fields": fields}


def union_bounds(layers: Sequence[Layer]) -> list[float]:
    boxes = [layer.bbox for layer in layers if layer.bbox]
    if not boxes:
        return [-180.0, -85.0511287798066, 180.0, 85.0511287798066]
    return [min(b[0] for b in boxes), min(b[1] for b in boxes),
            max(b[2] for b in boxes), max(b[3] for b in boxes)]


def tiles_version(registry: LayerRegistry, layers: Sequence[Layer],
                  versions: dict[str, int]) -> str:
    """The ``v=`` of these layers' tiles now: the token the tile service pins tiles by
    (tiles/validators.py), from the versions the registry keys them by."""
    return version_token((layer.id, registry.data_version(layer.id, versions))
                         for layer in layers)


def tilejson(layers: Sequence[Layer], tiles_url: str,
             aggregate_below: int = hexagons.AGGREGATE_BELOW_ZOOM) -> dict:
    """TileJSON 3.0.0 for a (composite) tile source; ``tiles_url`` has {z}/{x}/{y}."""
    check_vector_layers(layers, TileFilters())
    west, south, east, north = union_bounds(layers)
    minzoom = min(layer.min_zoom for layer in layers)
    maxzoom = min(max(layer.max_zoom for layer in layers), MAX_ZOOM)
    return {
        "tilejson": "3.0.0",
        "name": ",".join(layer.id for layer in layers),
        "description": " + ".join(layer.title_en for layer in layers),
        "scheme": "xyz",
        "tiles": [tiles_url],
        "vector_layers": [vector_layer(layer, aggregate_below) for layer in layers],
        "bounds": [west, south, east, north],
        "center": [(west + east) / 2, (south + north) / 2, max(minzoom, 8)],
        "minzoom": minzoom,
        "maxzoom": maxzoom,
    }


def tile_matrix_sets(base: str) -> dict:
    return {"tileMatrixSets": [{
        "id": WEB_MERCATOR.id, "title": "Google Maps Compatible for the World",
        "uri": WEB_MERCATOR_URI,
        "links": [{"href": f"{base}/tileMatrixSets/{WEB_MERCATOR.id}", "rel": "self",
                   "type": "application/json", "title": "Tile matrix set definition"}],
    }]}


def tile_matrix_set_document() -> dict:
    return WEB_MERCATOR.model_dump(mode="json", exclude_none=True, by_alias=True)


def tileset(layer: Layer, base: str, version: str | None = None) -> dict:
    """An OGC API - Tiles tileset metadata document for one collection; ``version``: the
    ``v=`` its tile template carries (``tiles_version``)."""
    check_vector_layers([layer], TileFilters())
    collection = f"{base}/collections/{layer.id}"
    template = f"{collection}/tiles/WebMercatorQuad/{{tileMatrix}}/{{tileRow}}/{{tileCol}}"
    if version is not None:
        template += f"?v={version}"
    west, south, east, north = union_bounds([layer])
    return {
        "title": f"{layer.title_en} (vector tiles)",
        "dataType": "vector",
        "crs": "http://www.opengis.net/def/crs/EPSG/0/3857",
        "tileMatrixSetURI": WEB_MERCATOR_URI,
        "boundingBox": {"lowerLeft": [west, south], "upperRight": [east, north],
                        "crs": "http://www.opengis.net/def/crs/OGC/1.3/CRS84"},
        "tileMatrixSetLimits": [_limits(layer, z, (west, south, east, north))
                                for z in range(layer.min_zoom, min(layer.max_zoom, MAX_ZOOM) + 1)],
        "layers": [{**vector_layer(layer), "dataType": "vector",
                    "geometryDimension": _dimension(layer.geometry_type)}],
        "links": [
            {"href": f"{collection}/tiles/WebMercatorQuad", "rel": "self",
             "type": "application/json"},
            {"href": f"{base}/tileMatrixSets/WebMercatorQuad",
             "rel": "http://www.opengis.net/def/rel/ogc/1.0/tiling-scheme",
             "type": "application/json"},
            {"href": template, "rel": "item", "type": MVT_MEDIA_TYPE, "templated": True},
        ],
    }


def _limits(layer: Layer, z: int, bounds: tuple[float, float, float, float]) -> dict:
    west, south, east, north = bounds
    top_left = WEB_MERCATOR.tile(west, north, z)
    bottom_right = WEB_MERCATOR.tile(east, south, z)
    return {"tileMatrix": str(z), "minTileRow": top_left.y, "maxTileRow": bottom_right.y,
            "minTileCol": top_left.x, "maxTileCol": bottom_right.x}


def _dimension(geometry_type: str | None) -> int | None:
    kinds = {"Point": 0, "MultiPoint": 0, "LineString": 1, "MultiLineString": 1,
             "Polygon": 2, "MultiPolygon": 2}
    return kinds.get(geometry_type or "")


def tilesets_list(layer: Layer, base: str) -> dict:
    collection = f"{base}/collections/{layer.id}"
    return {"tilesets": [{
        "title": f"{layer.title_en} (vector tiles)", "dataType": "vector",
        "crs": "http://www.opengis.net/def/crs/EPSG/0/3857",
        "tileMatrixSetURI": WEB_MERCATOR_URI,
        "links": [{"href": f"{collection}/tiles/WebMercatorQuad", "rel": "self",
                   "type": "application/json"}],
    }], "links": [{"href": f"{collection}/tiles", "rel": "self", "type": "application/json"}]}

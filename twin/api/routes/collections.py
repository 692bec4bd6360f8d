"""The collections (every published layer) as OGC API collection documents."""

from __future__ import annotations

from fastapi import APIRouter, Request

from tiles.buildings3d import is_buildings_layer
from twin.api.deps import ConnDep, RegistryDep, ScopeDep, VersionsDep
from twin.core import crs_ref
from twin.core.layer import Layer
from twin.core.scope import feature_count, visible_layer, visible_layers

router = APIRouter(tags=["collections"])

CRS84 = crs_ref.CRS84
QUERYABLES_REL = "http://www.opengis.net/def/rel/ogc/1.0/queryables"
TILESETS_REL = "http://www.opengis.net/def/rel/ogc/1.0/tilesets-vector"


def collection_document(layer: Layer, base: str, count: int | None, version: int) -> dict:
    here = f"{base}/collections/{layer.id}"
    links = [{"href": here, "rel": "self", "type": "application/json", "title": layer.title_en}]
    if layer.kind == "vector":
        # GDAL's OGCAPI driver and OWSLib find the features through these links.
        links += [
            {"href": f"{here}/items", "rel": "items", "type": "application/geo+json",
             "title": "Features"},
            {"href": f"{here}/queryables", "rel": QUERYABLES_REL,
             "type": "application/schema+json", "title": "Queryables"},
            {"href": f"{here}/tiles", "rel": TILESETS_REL, "type": "application/json",
             "title": "Vector tilesets"},
        ]
    elif layer.kind == "raster":
        links += _raster_links(layer, base)
    if layer.kind == "3d" or is_buildings_layer(layer):
        links.append({"href": f"{here}/3dtiles/tileset.json", "rel": "alternate",
                      "type": "application/json", "title": "3D Tiles 1.1 tileset (CesiumJS)"})
    document: dict[str, object] = {
        "id": layer.id,
        "title": layer.title_zh,
        "title_en": layer.title_en,
        "description": f"{layer.title_zh} · {layer.title_en}",
        "itemType": "feature" if layer.kind == "vector" else layer.kind,
        "kind": layer.kind,
        # 'builtin' (the city model) or 'upload' (published by GIS staff).
        "origin": layer.origin,
        "geometryType": layer.geometry_type,
        "featureCount": count,
        "dataVersion": version,
        "fields": layer.fields,
        "minZoom": layer.min_zoom,
        "maxZoom": layer.max_zoom,
        "sourceCrs": layer.source_crs,
        "sourceDatum": layer.source_datum,
        "extent": {"spatial": {"bbox": [layer.bbox] if layer.bbox else [], "crs": CRS84}},
        "links": links,
    }
    if layer.kind == "vector":
        # OGC API – Features Part 2: stored in CRS84, served in any of these by `crs=`.
        document |= {"storageCrs": CRS84, "crs": crs_ref.served_uris()}
    elif layer.kind == "raster":
        # Feature clients skip a collection by this member (GDAL's OAPIF driver reads
        # 'Raster' and 'Coverage' as "no features here" and would otherwise ask for its
        # items); a DEM is a coverage of elevations, other rasters are imagery.
        document["layerDataType"] = "Coverage" if layer.meta.get("dem") else "Raster"
    return document


def _raster_links(layer: Layer, base: str) -> list[dict]:
    """Where a raster collection's data is: its tiles, not items."""
    tiles = f"{base}/tiles/{layer.id}"
    links = [
        {"href": f"{tiles}/raster-tilejson.json", "rel": "alternate", "type": "application/json",
         "title": "TileJSON of its raster tiles (PNG or WebP)"},
    ]
    if layer.meta.get("dem"):
        links.append({"href": f"{tiles}/raster-tilejson.json?terrain=mapbox", "rel": "alternate",
                      "type": "application/json",
                      "title": "TileJSON of its elevation tiles (Mapbox terrain-RGB)"})
        links.append({"href": f"{base}/collections/{layer.id}/quantized-mesh/layer.json",
                      "rel": "alternate", "type": "application/json",
                      "title": "quantized-mesh-1.0 terrain (CesiumJS), CIM1"})
    return links


@router.get("/collections", summary="Every published layer the caller may see; feature "
            "counts within the caller's jurisdiction")
async def list_collections(request: Request, conn: ConnDep, registry: RegistryDep,
                           scope: ScopeDep, versions: VersionsDep) -> dict:
    base = str(request.base_url).rstrip("/")
    versions = registry.data_versions(versions)
    documents = []
    for layer in visible_layers(scope, registry):
        version = versions.get(layer.id, 0)
        count = await feature_count(conn, registry, layer, version, scope)
        documents.append(collection_document(layer, base, count, version))
    return {
        "collections": documents,
        # Part 2: every CRS the vector collections are served in.
        "crs": crs_ref.served_uris(),
        "links": [{"href": f"{base}/collections", "rel": "self", "type": "application/json"}],
    }


@router.get("/collections/{collection_id}", summary="One published layer")
async def get_collection(collection_id: str, request: Request, conn: ConnDep,
                         registry: RegistryDep, scope: ScopeDep, versions: VersionsDep) -> dict:
    layer = visible_layer(scope, registry, collection_id)
    version = registry.data_version(layer.id, versions)
    count = await feature_count(conn, registry, layer, version, scope)
    return collection_document(layer, str(request.base_url).rstrip("/"), count, version)

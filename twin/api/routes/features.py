"""OGC API – Features: GeoJSON items, single features and queryables of every vector layer."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from twin.api.deps import ConnDep, RegistryDep, ScopeDep
from twin.core.errors import InvalidParameter
from twin.core.scope import visible_layer
from twin.queries import features as queries

router = APIRouter(tags=["features"])

GEOJSON = "application/geo+json"
ITEMS_PARAMETERS = {"bbox", "limit", "offset", "properties", "sortby", "filter", "filter-lang",
                    "filter-crs", "f"}
CRS84 = "http://www.opengis.net/def/crs/OGC/1.3/CRS84"

# OGC conformance classes this module implements, collected by /conformance.
CONFORMANCE: list[str] = [
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/core",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/geojson",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/oas30",
    "http://www.opengis.net/spec/ogcapi-features-3/1.0/conf/queryables",
    "http://www.opengis.net/spec/ogcapi-features-3/1.0/conf/filter",
    "http://www.opengis.net/spec/ogcapi-features-3/1.0/conf/features-filter",
    "http://www.opengis.net/spec/cql2/1.0/conf/cql2-text",
    "http://www.opengis.net/spec/cql2/1.0/conf/basic-cql2",
    "http://www.opengis.net/spec/cql2/1.0/conf/advanced-comparison-operators",
    "http://www.opengis.net/spec/cql2/1.0/conf/basic-spatial-functions",
    "http://www.opengis.net/spec/cql2/1.0/conf/basic-spatial-functions-plus",
    "http://www.opengis.net/spec/cql2/1.0/conf/spatial-functions",
]


def _check_parameters(request: Request, filter_lang: str | None, filter_crs: str | None) -> None:
    # Core: a parameter the API does not define is an error, not silently ignored.
    unknown = sorted(set(request.query_params) - ITEMS_PARAMETERS)
    if unknown:
        raise InvalidParameter(f"unknown parameter(s) {', '.join(unknown)}; allowed: "
                               f"{', '.join(sorted(ITEMS_PARAMETERS))}")
    if filter_lang not in (None, "cql2-text"):
        raise InvalidParameter(f"filter-lang: only 'cql2-text' is supported, got {filter_lang!r}")
    if filter_crs not in (None, CRS84):
        raise InvalidParameter(f"filter-crs: only {CRS84} is supported")


def _page_links(request: Request, query: queries.ItemsQuery, returned: int,
                matched: int) -> list[dict]:
    url = request.url
    collection = str(request.base_url).rstrip("/") + url.path.removesuffix("/items")
    links = [{"href": str(url), "rel": "self", "type": GEOJSON},
             {"href": collection, "rel": "collection", "type": "application/json"}]
    if query.offset + returned < matched:
        next_url = url.include_query_params(offset=query.offset + returned, limit=query.limit)
        links.append({"href": str(next_url), "rel": "next", "type": GEOJSON})
    if query.offset > 0:
        prev_url = url.include_query_params(offset=max(query.offset - query.limit, 0),
                                            limit=query.limit)
        links.append({"href": str(prev_url), "rel": "prev", "type": GEOJSON})
    return links


@router.get("/collections/{collection_id}/items", summary="Features of a layer (GeoJSON)",
            response_class=JSONResponse)
async def items(
    collection_id: str, request: Request, conn: ConnDep, registry: RegistryDep, scope: ScopeDep,
    bbox: str | None = Query(None, description="west,south,east,north in CRS84"),
    limit: int = Query(10, description=f"1 to {queries.MAX_LIMIT}"),
    offset: int = Query(0, description="features to skip"),
    properties: str | None = Query(None, description="comma-separated fields to publish"),
    sortby: str | None = Query(None, description="comma-separated fields, '-' for descending"),
    filter: str | None = Query(None, description="a CQL2-text filter"),
    filter_lang: str | None = Query(None, alias="filter-lang"),
    filter_crs: str | None = Query(None, alias="filter-crs"),
) -> JSONResponse:
    layer = queries.vector_layer(visible_layer(scope, registry, collection_id))
    _check_parameters(request, filter_lang, filter_crs)
    query = queries.ItemsQuery(
        bbox=queries.parse_bbox(bbox) if bbox is not None else None,
        limit=limit, offset=offset,
        properties=queries.parse_properties(properties, layer) if properties is not None else None,
        sortby=queries.parse_sortby(sortby, layer) if sortby else (),
        filter=filter,
    )
    page = await queries.feature_page(conn, layer, query, scope)
    body = {
        "type": "FeatureCollection",
        "features": page.features,
        "numberMatched": page.number_matched,
        "numberReturned": len(page.features),
        "links": _page_links(request, query, len(page.features), page.number_matched),
    }
    return JSONResponse(body, media_type=GEOJSON)


@router.get("/collections/{collection_id}/items/{feature_id}", summary="One feature (GeoJSON)",
            response_class=JSONResponse)
async def item(collection_id: str, feature_id: str, request: Request, conn: ConnDep,
               registry: RegistryDep, scope: ScopeDep) -> JSONResponse:
    layer = queries.vector_layer(visible_layer(scope, registry, collection_id))
    feature = await queries.feature_by_id(conn, layer, feature_id, scope)
    collection = f"{str(request.base_url).rstrip('/')}/collections/{layer.id}"
    feature["links"] = [
        {"href": str(request.url), "rel": "self", "type": GEOJSON},
        {"href": collection, "rel": "collection", "type": "application/json"},
    ]
    return JSONResponse(feature, media_type=GEOJSON)


@router.get("/collections/{collection_id}/queryables", summary="Queryable properties",
            response_class=JSONResponse)
async def queryables(collection_id: str, request: Request, registry: RegistryDep,
                     scope: ScopeDep) -> JSONResponse:
    layer = queries.vector_layer(visible_layer(scope, registry, collection_id))
    schema = {"$id": str(request.url), **queries.queryables(layer)}
    return JSONResponse(schema, media_type="application/schema+json")

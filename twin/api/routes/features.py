"""OGC API – Features: GeoJSON items, single features and queryables of every vector layer,
in CRS84 or another CRS by reference (Part 2: ``crs``, ``bbox-crs``, ``Content-Crs``)."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from twin.api.deps import ConnDep, RegistryDep, ScopeDep
from twin.core import crs_ref
from twin.core.errors import InvalidParameter
from twin.core.scope import visible_layer
from twin.live import risk_edits
from twin.queries import features as queries

router = APIRouter(tags=["features"])

GEOJSON = "application/geo+json"
ITEMS_PARAMETERS = {"bbox", "bbox-crs", "crs", "limit", "offset", "properties", "sortby",
                    "filter", "filter-lang", "filter-crs", "f"}
CRS84 = crs_ref.CRS84

# OGC conformance classes this module implements, collected by /conformance.
CONFORMANCE: list[str] = [
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/core",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/geojson",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/oas30",
    "http://www.opengis.net/spec/ogcapi-features-2/1.0/conf/crs",
    "http://www.opengis.net/spec/ogcapi-features-3/1.0/conf/queryables",
    "http://www.opengis.net/spec/ogcapi-features-3/1.0/conf/filter",
    "http://www.opengis.net/spec/ogcapi-features-3/1.0/conf/features-filter",
    "http://www.opengis.net/spec/cql2/1.0/conf/cql2-text",
    "http://www.opengis.net/spec/cql2/1.0/conf/basic-cql2",
    "http://www.opengis.net/spec/cql2/1.0/conf/advanced-comparison-operators",
    "http://www.opengis.net/spec/cql2/1.0/conf/basic-spatial-functions",
    "http://www.opengis.net/spec/cql2/1.0/conf/basic-spatial-functions-plus",
    "http://www.opengis.net/spec/cql2/1.0/conf/spatial-functions",
    # Part 4 (draft): create, replace, update, delete on risk_points (twin/api/routes/edits.py).
    "http://www.opengis.net/spec/ogcapi-features-4/1.0/conf/create-replace-delete",
    "http://www.opengis.net/spec/ogcapi-features-4/1.0/conf/update",
    "http://www.opengis.net/spec/ogcapi-features-4/1.0/conf/features",
]


# The served CRSs, declared once for both parameters (an enum of their URIs in /api).
CRS_QUERY = Query(None, description=(
    "CRS to serve the features in, by URI (OGC API – Features Part 2); default CRS84 "
    "(lon/lat). Coordinates follow the CRS's axis order: EPSG:4326 and EPSG:4490 lat/lon, the "
    "CGCS2000 Gauss-Krüger zones (EPSG:4523–4525, 4544–4546) northing/easting. The answer "
    "names it in the Content-Crs header. 'EPSG:4523' and '[EPSG:4523]' are accepted too."),
    json_schema_extra={"enum": crs_ref.served_uris()})
BBOX_CRS_QUERY = Query(None, alias="bbox-crs", description=(
    "CRS of `bbox`, by URI (default CRS84); the bbox is given in that CRS's axis order, e.g. "
    "south,west,north,east for EPSG:4326, min northing,min easting,max northing,max easting "
    "for EPSG:4523."), json_schema_extra={"enum": crs_ref.served_uris()})


def _crs_headers(crs: crs_ref.CrsRef) -> dict[str, str]:
    return {"Content-Crs": f"<{crs.uri}>"}


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


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _page_links(request: Request, query: queries.ItemsQuery, returned: int,
                matched: int) -> list[dict]:
    url = request.url
    collection = _base(request) + url.path.removesuffix("/items")
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
    bbox: str | None = Query(None, description="west,south,east,north in CRS84, or in the "
                             "axis order of `bbox-crs`"),
    limit: int = Query(10, ge=1, le=queries.MAX_LIMIT,
                       description=f"features per page, 1 to {queries.MAX_LIMIT}"),
    offset: int = Query(0, ge=0, description="features to skip"),
    properties: str | None = Query(None, description="comma-separated fields to publish"),
    sortby: str | None = Query(None, description="comma-separated fields, '-' for descending"),
    filter: str | None = Query(None, description="a CQL2-text filter"),
    filter_lang: str | None = Query(None, alias="filter-lang"),
    filter_crs: str | None = Query(None, alias="filter-crs",
                                   description=f"CRS of the geometries in `filter`: {CRS84}"),
    bbox_crs: str | None = BBOX_CRS_QUERY,
    crs: str | None = CRS_QUERY,
) -> JSONResponse:
    layer = queries.vector_layer(visible_layer(scope, registry, collection_id), _base(request))
    _check_parameters(request, filter_lang, filter_crs)
    out_crs = crs_ref.resolve(crs, "crs")
    box_crs = crs_ref.resolve(bbox_crs, "bbox-crs")
    query = queries.ItemsQuery(
        bbox=queries.parse_bbox(bbox, box_crs) if bbox is not None else None,
        limit=limit, offset=offset,
        properties=queries.parse_properties(properties, layer) if properties is not None else None,
        sortby=queries.parse_sortby(sortby, layer) if sortby else (),
        filter=filter, bbox_crs=box_crs, crs=out_crs,
    )
    page = await queries.feature_page(conn, layer, query, scope)
    body = {
        "type": "FeatureCollection",
        "features": page.features,
        "numberMatched": page.number_matched,
        "numberReturned": len(page.features),
        "links": _page_links(request, query, len(page.features), page.number_matched),
    }
    return JSONResponse(body, media_type=GEOJSON, headers=_crs_headers(out_crs))


@router.get("/collections/{collection_id}/items/{feature_id}", summary="One feature (GeoJSON)",
            response_class=JSONResponse)
async def item(collection_id: str, feature_id: str, request: Request, conn: ConnDep,
               registry: RegistryDep, scope: ScopeDep,
               crs: str | None = CRS_QUERY) -> JSONResponse:
    layer = queries.vector_layer(visible_layer(scope, registry, collection_id), _base(request))
    out_crs = crs_ref.resolve(crs, "crs")
    headers = _crs_headers(out_crs)
    if layer.id == risk_edits.COLLECTION and layer.origin == "builtin":
        # Risk points are edited (Part 4, routes/edits.py): the ETag their If-Match compares
        # against. Read before the feature, so a write in between can only fail the If-Match.
        etag = await risk_edits.etag(conn, feature_id)
        if etag is not None:
            headers["ETag"] = etag
    feature = await queries.feature_by_id(conn, layer, feature_id, scope, out_crs)
    collection = f"{_base(request)}/collections/{layer.id}"
    feature["links"] = [
        {"href": str(request.url), "rel": "self", "type": GEOJSON},
        {"href": collection, "rel": "collection", "type": "application/json"},
    ]
    return JSONResponse(feature, media_type=GEOJSON, headers=headers)


@router.get("/collections/{collection_id}/queryables", summary="Queryable properties",
            response_class=JSONResponse)
async def queryables(collection_id: str, request: Request, registry: RegistryDep,
                     scope: ScopeDep) -> JSONResponse:
    layer = queries.vector_layer(visible_layer(scope, registry, collection_id), _base(request))
    schema = {"$id": str(request.url), **queries.queryables(layer)}
    return JSONResponse(schema, media_type="application/schema+json")

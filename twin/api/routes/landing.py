"""OGC API landing page and conformance. A browser asking for HTML gets the web map."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse

from twin.api.routes import features, tiles

router = APIRouter(tags=["capabilities"])

WEB_ROOT = Path(__file__).resolve().parents[3] / "web"

COMMON_CONFORMANCE = [
    "http://www.opengis.net/spec/ogcapi-common-1/1.0/conf/core",
    "http://www.opengis.net/spec/ogcapi-common-1/1.0/conf/landing-page",
    "http://www.opengis.net/spec/ogcapi-common-1/1.0/conf/json",
    "http://www.opengis.net/spec/ogcapi-common-1/1.0/conf/oas30",
    "http://www.opengis.net/spec/ogcapi-common-2/1.0/conf/collections",
]


def wants_html(request: Request, f: str | None) -> bool:
    if f is not None:
        return f == "html"
    accept = request.headers.get("accept", "")
    return "text/html" in accept


def web_index() -> Path:
    built = WEB_ROOT / "dist" / "index.html"
    return built if built.exists() else WEB_ROOT / "index.html"


@router.get("/", summary="Landing page (JSON for API clients, the web map for browsers)")
async def landing(request: Request, f: str | None = Query(None, pattern="^(json|html)$")):
    if wants_html(request, f):
        return FileResponse(web_index(), media_type="text/html")
    base = str(request.base_url).rstrip("/")
    return JSONResponse({
        "title": "twin",
        "description": "城市运行风险一张图 · Digital-twin risk map of Chongqing",
        "links": [
            {"href": f"{base}/", "rel": "self", "type": "application/json",
             "title": "This document"},
            {"href": f"{base}/?f=html", "rel": "alternate", "type": "text/html",
             "title": "The web map"},
            {"href": f"{base}/api", "rel": "service-desc",
             "type": "application/vnd.oai.openapi+json;version=3.0", "title": "OpenAPI"},
            {"href": f"{base}/api.html", "rel": "service-doc", "type": "text/html",
             "title": "API documentation"},
            {"href": f"{base}/conformance", "rel": "conformance", "type": "application/json",
             "title": "Conformance classes"},
            {"href": f"{base}/collections", "rel": "data", "type": "application/json",
             "title": "Collections"},
            {"href": f"{base}/healthz", "rel": "status", "type": "application/json",
             "title": "Health"},
            # The 3D command-hall view's sources (issue 13): the city's buildings as 3D Tiles
            # 1.1 and its terrain as quantized-mesh, both what CesiumJS reads.
            {"href": f"{base}/collections/buildings/3dtiles/tileset.json", "rel": "alternate",
             "type": "application/json", "title": "3D Tiles 1.1: the city's buildings, CIM2-6"},
            {"href": f"{base}/collections/terrain/quantized-mesh/layer.json",
             "rel": "alternate", "type": "application/json",
             "title": "quantized-mesh-1.0 terrain (CIM1)"},
        ],
    })


@router.get("/conformance", summary="Conformance classes")
async def conformance() -> dict:
    return {"conformsTo": [*COMMON_CONFORMANCE, *features.CONFORMANCE, *tiles.CONFORMANCE]}

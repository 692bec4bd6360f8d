"""``/_twin/auth``: what the cluster's nginx asks a node before it answers a tile from its
shared cache (issue 15; twin/core/proxy.py has nginx's side).

nginx sends the tile request's headers (Authorization among them) with the original method
and URI. The node runs the access guard on them (authentication, the rate limit charged
once for the request, the role the path needs: twin/api/access.py) and answers 204 with
``X-Twin-Scope``, a hash of the caller's jurisdiction, which nginx puts in the cache key in
place of any credential. The tiles of one jurisdiction are the same bytes for every principal
of it (tiles are keyed by ``Scope.key``, tiles/cache.py), so sharing by that hash is exact,
and a principal of another jurisdiction, or an anonymous caller, never hits that entry.

A refusal (401, 403, 429) is also 204, naming no scope: nginx then sends the request on to a
node uncached, and that node refuses it in twin's own error shape (``auth_request`` itself
turns any status but 2xx, 401 and 403 into a bare 500). Only nginx may ask: a request without
the proxy's secret is 404.
"""

from __future__ import annotations

import hashlib
from urllib.parse import urlsplit

from fastapi import FastAPI, Request, Response
from starlette.routing import Route

from twin.api import access
from twin.core.errors import TwinError
from twin.core.principal import AuthError

AUTH_PATH = "/_twin/auth"


def scope_hash(scope_key: str | None) -> str:
    """The cache-key part of a jurisdiction (the city: ``city``)."""
    if scope_key is None:
        return "city"
    return hashlib.blake2b(scope_key.encode(), digest_size=12).hexdigest()


async def proxy_auth(request: Request) -> Response:
    if not access.from_proxy(request):
        return Response(status_code=404)
    method = request.headers.get("x-original-method", "GET")
    path = urlsplit(request.headers.get("x-original-uri", "/")).path
    try:
        principal = await access.admit(request, method, path)
    except (AuthError, access.RateLimited, TwinError):
        return Response(status_code=204)  # refused: nginx passes it on, uncached
    scope_key = principal.scope.key if principal is not None else None
    return Response(status_code=204, headers={"X-Twin-Scope": scope_hash(scope_key)})


def install_proxy_auth(app: FastAPI) -> None:
    """Adds ``/_twin/auth`` (not in the OpenAPI document: only nginx calls it)."""
    app.router.routes.append(Route(AUTH_PATH, proxy_auth, methods=["GET"],
                                   include_in_schema=False))

"""Who may call which route: the one table of roles, and the guard that applies it.

Every router is included with ``GUARD`` (twin/api/app.py), so every route passes
``enforce``, which looks its role up in ``RULES`` by method and route template. A route no
rule names needs ``admin`` (closed by default), and tests/test_auth_access.py fails until
it is given a rule. Public routes (role ``PUBLIC``) need nobody: the landing page,
conformance, health, the OpenAPI document and its viewers, and the web map's static assets
(a mount, outside the routers).

Roles grow: viewer < planner < gis-editor < admin (twin/auth.py).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from functools import lru_cache

from fastapi import Depends, Request
from fastapi.responses import JSONResponse

from twin.api.deps import get_principal
from twin.core.errors import TwinError
from twin.core.principal import Principal, Unauthenticated, require_role
from twin.ratelimit import PostgresTokenBuckets, SharedTokenBuckets, TokenBuckets, retry_after

PUBLIC = "public"
READ = frozenset({"GET", "HEAD"})
WRITE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
ANY = READ | WRITE


@dataclass(frozen=True)
class Rule:
    methods: frozenset[str]
    # A route template; a trailing '*' matches every template that starts with the rest.
    path: str
    role: str

    def matches(self, method: str, path: str) -> bool:
        if method not in self.methods:
            return False
        if self.path.endswith("*"):
            return path.startswith(self.path[:-1])
        return path == self.path


# First match wins: specific rules before the prefixes they refine.
RULES: tuple[Rule, ...] = (
    # Public: how to find and describe the API, liveness for balancers, the web map shell.
    *(Rule(READ, path, PUBLIC) for path in (
        "/", "/conformance", "/healthz", "/api", "/api.html", "/docs/oauth2-redirect",
        "/redoc", "/assets*")),
    # The cluster's nginx asks it before a cached tile; it answers only a request carrying
    # the proxy's secret and runs this guard itself on the request asked about
    # (twin/api/proxy_auth.py).
    Rule(READ, "/_twin/auth", PUBLIC),
    # viewer: the map (tiles, styles, features, collections, layers) and statistics.
    Rule(READ, "/query/h3", "viewer"),
    Rule(READ, "/collections*", "viewer"),
    Rule(READ, "/tileMatrixSets*", "viewer"),
    Rule(READ, "/tiles/*", "viewer"),
    Rule(READ, "/styles/*", "viewer"),
    Rule(READ, "/layers*", "viewer"),
    # An upload job's state; its id is a random UUID handed to the uploader.
    Rule(READ, "/jobs/*", "viewer"),
    Rule(READ, "/sectors", "viewer"),
    Rule(READ, "/emergency-plans/*", "viewer"),
    # The living twin (issue 14): events, alerts and latest readings are on the map. The
    # push stream (GET /events/stream) takes a bearer header or a ticket in its URL
    # (twin/api/deps.py, TICKET_PATHS).
    Rule(READ, "/events*", "viewer"),
    Rule(READ, "/alerts*", "viewer"),
    Rule(READ, "/sensors/{sensor_id}/readings/hourly", "viewer"),
    Rule(READ, "/sensors*", "viewer"),
    Rule(WRITE, "/events/stream/tickets", "viewer"),
    # planner: every analysis (POST /query/impact posts a polygon; it writes nothing).
    Rule(ANY, "/query/*", "planner"),
    # Reporting an event and moving it through its states: the centres' operators and the
    # grid workers; the jurisdiction check is the route's (the event's place).
    Rule(WRITE, "/events*", "planner"),
    # gis-editor: uploads and layer management, sensor gateways.
    Rule(WRITE, "/layers*", "gis-editor"),
    Rule(WRITE, "/sensors/readings", "gis-editor"),
    Rule(WRITE, "/sensors/CreateObservations", "gis-editor"),
    # Editing risk points (OGC API - Features Part 4) within the editor's jurisdiction.
    Rule(WRITE, "/collections/risk_points/items*", "gis-editor"),
    # Alert rules are the city's thresholds.
    Rule(WRITE, "/alerts/rules*", "admin"),
    # admin: keys and the audit log.
    Rule(ANY, "/keys*", "admin"),
    Rule(READ, "/audit", "admin"),
)
CLOSED = "admin"


@lru_cache(maxsize=1024)
def role_for(method: str, path: str) -> str:
    """The role a route needs, from its method and template (closed: ``admin``)."""
    method = "GET" if method == "HEAD" else method
    return next((rule.role for rule in RULES if rule.matches(method, path)), CLOSED)


def declared(method: str, path: str) -> bool:
    method = "GET" if method == "HEAD" else method
    return any(rule.matches(method, path) for rule in RULES)


def is_write(method: str, path: str) -> bool:
    """Requests the audit log records: every non-read method but the analyses' POSTs."""
    return method in WRITE and not path.startswith("/query/")


class RateLimited(TwinError):
    status_code = 429

    def __init__(self, message: str, retry_after_s: str):
        super().__init__(message)
        self.retry_after = retry_after_s


async def rate_limited(request: Request, exc: RateLimited) -> JSONResponse:
    return JSONResponse({"code": "RateLimited", "description": str(exc)}, status_code=429,
                        headers={"Retry-After": exc.retry_after})


def _buckets(request: Request) -> TokenBuckets | SharedTokenBuckets | PostgresTokenBuckets:
    """The app's rate-limit buckets: ``twin serve``'s worker processes are given the
    server's shared table (twin/cli.py ``worker_app``); a single process keeps its own; the
    nodes of a cluster share the database's (``PostgresTokenBuckets``, whose take is
    awaited)."""
    buckets = getattr(request.app.state, "rate_buckets", None)
    if buckets is None:
        limits = request.app.state.settings.limits
        buckets = request.app.state.rate_buckets = TokenBuckets(limits.rate_per_s, limits.burst)
    return buckets


def _client(request: Request) -> str:
    """The bucket of an anonymous caller: its address (behind the cluster's nginx, the one
    nginx saw, else every client would share nginx's)."""
    if from_proxy(request) and (forwarded := request.headers.get("x-real-ip")):
        return "ip:" + forwarded
    return "ip:" + (request.client.host if request.client else "unknown")


async def _charge(request: Request, bucket: str) -> None:
    buckets = _buckets(request)
    if isinstance(buckets, PostgresTokenBuckets):
        wait = await buckets.take(bucket)
    else:
        wait = buckets.take(bucket)
    if wait > 0:
        limits = request.app.state.settings.limits
        raise RateLimited(
            f"rate limit: more than {limits.burst} requests at once or {limits.rate_per_s:g} "
            f"per second for this {'key' if bucket.startswith('key:') else 'client'} "
            "(TWIN_LIMITS_BURST, TWIN_LIMITS_RATE_PER_S); retry after the Retry-After "
            "seconds", retry_after(wait))


async def enforce(request: Request) -> None:
    """Authenticate, rate-limit and authorize one request against ``RULES``.

    Charged once per request: a tile request that came through the cluster's nginx was
    charged already, by the node that answered nginx's ``/_twin/auth`` for it
    (twin/api/proxy_auth.py), and a GET handled again on the primary after a standby failed
    it (twin/api/readroute.py) was charged the first time."""
    route = request.scope.get("route")
    charged = (getattr(request.state, "rate_charged", False)
               or (from_proxy(request) and bool(request.headers.get("x-twin-charged"))))
    await admit(request, request.method, getattr(route, "path_format", request.url.path),
                charge=not charged)


async def admit(request: Request, method: str, path: str,
                charge: bool = True) -> Principal | None:
    """The caller of ``request``, authenticated, rate-limited (when ``charge``) and allowed
    ``method`` on ``path`` (a route template, or a path the rules' prefixes cover); None
    for a public route. Raises Unauthenticated, Forbidden or RateLimited."""
    role = role_for(method, path)
    if role == PUBLIC:
        return None
    try:
        principal: Principal | None = await get_principal(request)
    except Unauthenticated:
        await _charge(request, _client(request))  # guessing keys costs the guesser's IP
        raise
    if not charge:
        pass
    elif principal is None or principal.anonymous:
        await _charge(request, _client(request))
    else:
        await _charge(request, "key:" + principal.name)
    request.state.rate_charged = True
    return require_role(principal, role)


def from_proxy(request: Request) -> bool:
    """Whether the request came through the cluster's nginx: it carries the secret that
    nginx and the nodes share (TWIN_PROXY_SECRET), which nginx sets on every request it
    passes (a client's own header of that name is replaced)."""
    secret = request.app.state.settings.proxy.secret
    said = request.headers.get("x-twin-proxy")
    return (secret is not None and said is not None
            and hmac.compare_digest(said.encode(), secret.get_secret_value().encode()))


GUARD = [Depends(enforce)]

"""Roles: every route declares one (twin/api/access.py), and the server enforces it.

Proved against live servers: one with anonymous access off (the default), and the suite's
``server`` (anonymous planner, like `make run`'s demo).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
from fastapi.routing import iter_route_contexts
from sqlalchemy import Engine

from tests.servers import EDITOR, LiveServer, closed_settings
from twin.api import access
from twin.api.app import create_app
from twin.core.principal import ROLES
from twin.core.settings import Settings

ROLE_KEYS = {f"role-test-{role}-key-0123456789": f"{role}:role-test-{role}" for role in ROLES}
HEADERS = {role: {"Authorization": f"Bearer role-test-{role}-key-0123456789"} for role in ROLES}
PUBLIC_PATHS = {"/", "/conformance", "/healthz", "/api", "/api.html", "/docs/oauth2-redirect",
                "/redoc", "/assets/{path}",
                # nginx's question before a cached tile: it answers only the proxy's secret
                # (tests/test_scaleout.py), and runs the guard on the tile request itself.
                "/_twin/auth"}
LOCATE = "/query/locate?lon=106.55&lat=29.56"
# One route of each class, and the smallest request each role's holder may make there.
CLASSES = {
    "viewer": ("GET", "/collections", None),
    "planner": ("GET", LOCATE, None),
    "gis-editor": ("POST", "/sensors/readings", {"readings": []}),
    "admin": ("GET", "/audit?limit=1", None),
}


def routes() -> list[tuple[str, str]]:
    """(method, template) of every route the app serves, mounts included (as GET)."""
    app = create_app(Settings())
    found = []
    for route in iter_route_contexts(app.routes):
        for method in sorted(route.methods or {"GET"}):
            if method != "HEAD":
                found.append((method, route.path_format))
    return found


def test_every_route_declares_a_role_and_public_ones_are_the_documented_few():
    served = routes()
    undeclared = [r for r in served if not access.declared(*r)]
    assert undeclared == [], "give these a rule in twin/api/access.py RULES"
    public = {path for method, path in served if access.role_for(method, path) == access.PUBLIC}
    assert public == PUBLIC_PATHS
    assert all(access.role_for("POST", path) != access.PUBLIC for _, path in served)
    unused = [rule for rule in access.RULES
              if not any(rule.matches(method, path) for method, path in served)]
    assert unused == [], "rules that match no route"


@pytest.fixture(scope="module")
def closed_server(engine: Engine, database_url: str) -> Iterator[LiveServer]:
    """Anonymous access off, as twin ships; one settings key per role."""
    with LiveServer(closed_settings(database_url, keys=ROLE_KEYS)) as live:
        yield live


@pytest.fixture()
def closed(closed_server: LiveServer) -> Iterator[httpx.Client]:
    with closed_server.client() as client:
        yield client


def concrete(template: str) -> str:
    """A request path for a route template (path parameters filled with harmless values)."""
    return re.sub(r"\{[^}]+\}", "1", template)


def test_without_credentials_every_route_but_the_public_ones_is_401(closed: httpx.Client):
    for method, template in routes():
        response = closed.request(method, concrete(template))
        if template in PUBLIC_PATHS:
            assert response.status_code != 401, (method, template)
        else:
            assert response.status_code == 401, (method, template, response.text)
            assert response.headers["www-authenticate"].startswith('Bearer realm="twin"')
            assert "anonymous access is off" in response.json()["description"]


def test_public_routes_answer_without_credentials(closed: httpx.Client):
    assert closed.get("/healthz").status_code == 200
    assert closed.get("/api").json()["openapi"]
    assert closed.get("/conformance").status_code == 200


@pytest.mark.parametrize("role", ROLES)
def test_each_role_reaches_its_class_of_route_and_is_refused_above_it(closed: httpx.Client,
                                                                      role: str):
    for needed, (method, path, body) in CLASSES.items():
        response = closed.request(method, path, json=body, headers=HEADERS[role])
        if ROLES.index(role) >= ROLES.index(needed):
            assert response.status_code == 200, (role, path, response.text)
        else:
            assert response.status_code == 403, (role, path, response.text)
            assert response.json()["description"] == (
                f"this endpoint needs the '{needed}' role; your key has '{role}'")
            assert 'error="insufficient_scope"' in response.headers["www-authenticate"]


def test_a_malformed_or_unknown_credential_is_401(closed: httpx.Client):
    basic = closed.get("/collections", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert basic.status_code == 401 and "Bearer" in basic.json()["description"]
    unknown = closed.get("/collections", headers={"Authorization": "Bearer not-a-key"})
    assert unknown.status_code == 401 and unknown.json()["description"] == "unknown API key"
    assert 'error="invalid_token"' in unknown.headers["www-authenticate"]


def test_anonymous_planner_may_query_but_not_upload(client: httpx.Client):
    """The suite's server runs like `make run`'s demo: anonymous viewer + planner."""
    assert client.get(LOCATE).status_code == 200
    assert client.get("/collections").status_code == 200
    upload = client.post("/layers", files={"file": ("a.geojson", b"{}")}, data={"title": "x"})
    assert upload.status_code == 401
    assert upload.json()["description"] == ("this endpoint needs a bearer key or token with "
                                            "the 'gis-editor' role; anonymous callers have "
                                            "'planner'")
    assert client.get("/audit").status_code == 401
    assert client.post("/sensors/readings", json={"readings": []},
                       headers=EDITOR).status_code == 200

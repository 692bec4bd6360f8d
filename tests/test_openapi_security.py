"""The OpenAPI document (``/api``) declares how to authenticate and which role each operation
needs, as twin/api/access.py's RULES say, and the server enforces exactly what it declares.

Oracles: the OpenAPI 3.1 JSON Schema (the one schemathesis ships, from the OpenAPI
Initiative; openapi-spec-validator as well when it is installed), the RULES table read here
by its own first-match loop, and the live server's answers to every operation without a key
and with a key of each role.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR
from sqlalchemy import Engine

from tests.servers import LiveServer
from twin.api.access import RULES
from twin.core.principal import ROLES
from twin.core.settings import AuthSettings, Settings

KEYS = {role: f"openapi-{role}-key-0123456789" for role in ROLES}
BEARER_SCHEMES = {"apiKey": "twin API key", "jwt": "JWT"}


@pytest.fixture(scope="module")
def closed_server(engine: Engine, database_url: str) -> Iterator[LiveServer]:
    """Anonymous access off, a settings key for every role."""
    auth = AuthSettings(keys={key: f"{role}:openapi-{role}" for role, key in KEYS.items()},
                        anonymous_role="")
    with LiveServer(Settings(database_url=database_url, auth=auth)) as live:
        yield live


@pytest.fixture(scope="module")
def closed(closed_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=closed_server.url, timeout=30) as client:
        yield client


def operations(document: dict) -> Iterator[tuple[str, str, dict]]:
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            yield method.upper(), path, operation


def rule_role(method: str, path: str) -> str:
    """The first rule of RULES that names the method and matches the template; else admin."""
    for rule in RULES:
        prefix = rule.path.removesuffix("*")
        if method in rule.methods and (path.startswith(prefix) if rule.path.endswith("*")
                                       else path == rule.path):
            return rule.role
    return "admin"


def validate(document: dict) -> None:
    errors = [error.message for error in OPENAPI_31_VALIDATOR.iter_errors(document)]
    assert errors == []
    try:
        from openapi_spec_validator import validate as spec_validate
    except ImportError:
        return
    spec_validate(document)


def check_security(document: dict, anonymous_role: str) -> None:
    schemes = document["components"]["securitySchemes"]
    assert {name: (s["type"], s["scheme"], s["bearerFormat"]) for name, s in schemes.items()
            } == {name: ("http", "bearer", fmt) for name, fmt in BEARER_SCHEMES.items()}
    anonymous_rank = ROLES.index(anonymous_role) if anonymous_role else -1
    seen_roles = set()
    for method, path, operation in operations(document):
        role = rule_role(method, path)
        seen_roles.add(role)
        if role == "public":
            assert operation["security"] == [], (method, path)
            continue
        expected = [{"apiKey": [role]}, {"jwt": [role]}]
        if ROLES.index(role) <= anonymous_rank:
            expected.append({})
        assert operation["security"] == expected, (method, path)
        assert "401" in operation["responses"], (method, path)
        assert ("403" in operation["responses"]) is (role != "viewer"), (method, path)
    assert seen_roles == {"public", *ROLES}


def test_the_document_declares_the_bearer_schemes_and_every_rule(closed: httpx.Client):
    document = closed.get("/api").json()
    validate(document)
    check_security(document, "")
    # schemathesis (tests/test_schemathesis.py) takes it as it is.
    assert len(list(schemathesis.openapi.from_dict(document).get_all_operations())) == len(
        list(operations(document)))


def test_anonymous_routes_list_the_empty_requirement_when_anonymous_is_on(
        client: httpx.Client, server: LiveServer):
    assert server.settings.auth.anonymous_role == "planner"
    document = client.get("/api").json()
    validate(document)
    check_security(document, "planner")


def concrete(path: str) -> str:
    """The path with an id no row has: the check is who may call, and an admin's DELETE or
    PUT must not change the sample city the rest of the suite reads (risk point 1)."""
    return re.sub(r"\{[^}]+\}", "987654321", path)


def status_of(client: httpx.Client, method: str, url: str, headers: dict) -> int:
    """The answer's status, read without its body: the push stream's never ends."""
    with client.stream(method, url, headers=headers) as response:
        return response.status_code


def test_the_server_enforces_what_the_document_declares(closed: httpx.Client):
    """Every operation, without a key and with a key of each role: 401 where the document
    requires a credential, 403 where the key's role is weaker than the one it names, and
    neither where the document lets the caller through."""
    document = closed.get("/api").json()
    for method, path, operation in operations(document):
        required = {role for requirement in operation["security"]
                    for role in requirement.get("apiKey", [])}
        needed = required.pop() if required else None
        assert not required
        url = concrete(path)
        anonymous = status_of(closed, method, url, {})
        assert (anonymous == 401) is (needed is not None), (method, path, anonymous)
        for role, key in KEYS.items():
            status = status_of(closed, method, url, {"Authorization": f"Bearer {key}"})
            weaker = needed is not None and ROLES.index(role) < ROLES.index(needed)
            assert status not in (401, 403) or (status == 403 and weaker), (method, path, role)
            assert (status == 403) is weaker, (method, path, role, status)

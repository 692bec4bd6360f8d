"""Who may call what, in the OpenAPI document (``/api``): derived from ``access.RULES``.

Callers authenticate one way only: ``Authorization: Bearer <credential>`` (twin/auth.py,
``bearer_token``), where the credential is an API key or a JWT. Both are HTTP bearer schemes
(RFC 6750) to OpenAPI, told apart by their ``bearerFormat``. Each operation requires one of
them, with the role its rule names (OpenAPI 3.1 lets a non-OAuth requirement list role
names); a public route requires nothing, and a route the anonymous role may call (the demo,
``TWIN_AUTH_ANONYMOUS_ROLE``) also lists the empty requirement. Nothing is declared per
route: the table is the only source, as it is for the guard that enforces it.
"""

from __future__ import annotations

from fastapi import FastAPI

from twin.api.access import PUBLIC, role_for
from twin.core.principal import ROLES

API_KEY, JWT = "apiKey", "jwt"
ROLE_EXTENSION = "x-twin-role"

_ROLES_GROW = ("Roles grow: viewer < planner < gis-editor < admin; an operation's requirement "
               "names the weakest role that may call it.")
SECURITY_SCHEMES = {
    API_KEY: {
        "type": "http", "scheme": "bearer", "bearerFormat": "twin API key",
        "description": "`Authorization: Bearer <key>`: a key made by `twin keys add` or "
                       "`POST /keys` (`twin_<prefix>_<secret>`), or one of `TWIN_AUTH_KEYS`. "
                       + _ROLES_GROW,
    },
    JWT: {
        "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
        "description": "`Authorization: Bearer <token>`: a JWT verified locally (HS256 with "
                       "TWIN_AUTH_JWT_SECRET, or RS256/ES256 with TWIN_AUTH_JWKS_FILE), with "
                       "the claims `sub`, `role`, `scope` and `exp`. " + _ROLES_GROW,
    },
}
ERROR_BODY = {"application/json": {"schema": {
    "type": "object", "required": ["code", "description"],
    "properties": {"code": {"type": "string"}, "description": {"type": "string"}}}}}
UNAUTHENTICATED = {"description": "no credential where one is needed, or an unknown, revoked, "
                                  "expired or forged one", "content": ERROR_BODY}
FORBIDDEN = {"description": "the credential's role is too weak for this operation",
             "content": ERROR_BODY}


def anonymous_may(role: str, anonymous_role: str) -> bool:
    return bool(anonymous_role) and ROLES.index(anonymous_role) >= ROLES.index(role)


def security_requirement(role: str, anonymous_role: str = "") -> list[dict]:
    """The ``security`` of an operation that needs ``role``."""
    if role == PUBLIC:
        return []
    requirement: list[dict] = [{API_KEY: [role]}, {JWT: [role]}]
    if anonymous_may(role, anonymous_role):
        requirement.append({})
    return requirement


def add_security(document: dict, anonymous_role: str = "") -> dict:
    """Declare the schemes, and each operation's requirement and refusals, in place."""
    document.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
    for path, operations in document.get("paths", {}).items():
        for method, operation in operations.items():
            role = role_for(method.upper(), path)
            operation["security"] = security_requirement(role, anonymous_role)
            operation[ROLE_EXTENSION] = role
            if role == PUBLIC:
                continue
            responses = operation.setdefault("responses", {})
            responses.setdefault("401", UNAUTHENTICATED)
            if role != ROLES[0]:  # every credential carries at least the weakest role
                responses.setdefault("403", FORBIDDEN)
    return document


def install_security(app: FastAPI, anonymous_role: str) -> None:
    """Make ``app.openapi()`` (served at ``/api``) carry the security of ``access.RULES``."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = add_security(build(), anonymous_role)
        return app.openapi_schema

    # Replacing the method on the instance is FastAPI's documented way to extend the schema.
    app.openapi = openapi  # type: ignore[method-assign]

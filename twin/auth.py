"""Who is calling: bearer keys mapped to roles. No FastAPI here; twin/api/deps.py wraps it.

The key source is settings (``TWIN_AUTH_KEYS``, a JSON object ``{"<key>": "<role>[:<name>]"}``).
Issue 7 replaces ``KeyTable`` with hashed keys in the database, JWTs and scopes; callers only
see ``authenticate`` and ``require_role``, so that change stays inside this module.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from twin.errors import TwinError

# Roles in increasing power: a role may do everything the roles before it may.
ROLES = ("viewer", "gis-editor")


class AuthError(TwinError):
    """Base of the two answers the API gives with a WWW-Authenticate challenge."""


class Unauthenticated(AuthError):
    status_code = 401


class Forbidden(AuthError):
    status_code = 403


@dataclass(frozen=True)
class Principal:
    # Shown as "uploaded by"; never the key itself.
    name: str
    role: str


class KeyTable:
    """Bearer keys from settings; compared in constant time."""

    def __init__(self, keys: Mapping[str, str]):
        self._principals: list[tuple[bytes, Principal]] = []
        for key, value in keys.items():
            role, _, name = value.partition(":")
            if role not in ROLES:
                raise ValueError(f"TWIN_AUTH_KEYS: unknown role {role!r}; roles: {ROLES}")
            name = name or "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]
            self._principals.append((key.encode(), Principal(name, role)))

    def lookup(self, key: str) -> Principal | None:
        found = None
        for known, principal in self._principals:
            if hmac.compare_digest(known, key.encode()):
                found = principal
        return found


def authenticate(authorization: str | None, keys: KeyTable) -> Principal | None:
    """The caller of an ``Authorization`` header; None when anonymous."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("Authorization: expected 'Bearer <key>'")
    principal = keys.lookup(token.strip())
    if principal is None:
        raise Unauthenticated("unknown API key")
    return principal


def require_role(principal: Principal | None, role: str) -> Principal:
    if principal is None:
        raise Unauthenticated(f"this endpoint needs a bearer key with the '{role}' role")
    if ROLES.index(principal.role) < ROLES.index(role):
        raise Forbidden(f"this endpoint needs the '{role}' role; your key has "
                        f"'{principal.role}'")
    return principal

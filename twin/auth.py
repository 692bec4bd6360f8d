"""Who is calling: bearer keys mapped to roles. No FastAPI here; twin/api/deps.py wraps it.

The key source is settings (``TWIN_AUTH_KEYS``, a JSON object
``{"<key>": "<role>[:<name>[:<scope>]]"}``, scope as in ``parse_scope``).
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
class Scope:
    """The jurisdiction a principal may see: the whole city, or districts and/or streets.

    Admin codes nest by prefix (district 6 digits, street 9, community 12, grid 15), so a
    unit, risk point (by its grid) or team lies in the scope when its code starts with one
    of ``prefixes``.
    """

    districts: frozenset[str] = frozenset()
    streets: frozenset[str] = frozenset()

    @property
    def is_city(self) -> bool:
        return not self.districts and not self.streets

    @property
    def prefixes(self) -> tuple[str, ...]:
        return tuple(sorted(self.districts | self.streets))

    @property
    def key(self) -> str | None:
        """A stable text for cache keys; None for the city (shared by every city principal)."""
        return None if self.is_city else ",".join(self.prefixes)


CITY = Scope()


def parse_scope(text: str) -> Scope:
    """``''`` or ``city``; ``district=500103,500104``; ``street=500103001``; or both kinds
    joined by ``;``. A street code is 9 digits, a district code 6."""
    districts: set[str] = set()
    streets: set[str] = set()
    for part in filter(None, (p.strip() for p in text.split(";"))):
        if part == "city":
            continue
        kind, _, codes = part.partition("=")
        width, target = {"district": (6, districts), "street": (9, streets)}.get(kind, (0, None))
        values = [c.strip() for c in codes.split(",") if c.strip()]
        if target is None or not values or any(
                len(c) != width or not c.isdigit() for c in values):
            raise ValueError(f"scope: expected 'city', 'district=<6-digit codes>' or "
                             f"'street=<9-digit codes>', got {part!r}")
        target.update(values)
    return Scope(frozenset(districts), frozenset(streets))


@dataclass(frozen=True)
class Principal:
    # Shown as "uploaded by"; never the key itself.
    name: str
    role: str
    scope: Scope = CITY


class KeyTable:
    """Bearer keys from settings; compared in constant time."""

    def __init__(self, keys: Mapping[str, str]):
        self._principals: list[tuple[bytes, Principal]] = []
        for key, value in keys.items():
            role, _, rest = value.partition(":")
            name, _, scope = rest.partition(":")
            if role not in ROLES:
                raise ValueError(f"TWIN_AUTH_KEYS: unknown role {role!r}; roles: {ROLES}")
            name = name or "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]
            principal = Principal(name, role, parse_scope(scope))
            self._principals.append((key.encode(), principal))

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

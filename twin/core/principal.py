"""Who a caller is, as plain records: roles, a ``Principal`` and the ``Scope`` (jurisdiction) it
may see. The floor: twin/auth.py finds the principal of a request, twin/core/scope.py turns a
scope into SQL, and every library takes a ``Scope`` from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from twin.core.errors import TwinError

# Roles in increasing power: a role may do everything the roles before it may.
ROLES = ("viewer", "planner", "gis-editor", "admin")
# Anonymous callers never get more than this (uploads and keys always need a key).
ANONYMOUS_ROLES = ("viewer", "planner")


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

    @property
    def text(self) -> str:
        """The ``parse_scope`` text of this scope (what ``twin keys list`` shows)."""
        parts = [f"{kind}={','.join(sorted(codes))}"
                 for kind, codes in (("district", self.districts), ("street", self.streets))
                 if codes]
        return ";".join(parts) or "city"


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


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"role: expected one of {', '.join(ROLES)}; got {role!r}")
    return role


@dataclass(frozen=True)
class Principal:
    # Shown as "uploaded by" and in the audit log; never the key itself.
    name: str
    role: str
    scope: Scope = CITY
    # A caller without credentials: refusals are 401 (a key would help), not 403.
    anonymous: bool = False


def anonymous_principal(role: str) -> Principal | None:
    """The principal of callers without credentials; None when anonymous access is off."""
    return Principal("anonymous", role, CITY, anonymous=True) if role else None


def require_role(principal: Principal | None, role: str) -> Principal:
    if principal is None:
        raise Unauthenticated(f"this endpoint needs a bearer key or token with the '{role}' "
                              "role (anonymous access is off)")
    if ROLES.index(principal.role) >= ROLES.index(role):
        return principal
    if principal.anonymous:
        raise Unauthenticated(f"this endpoint needs a bearer key or token with the '{role}' "
                              f"role; anonymous callers have '{principal.role}'")
    raise Forbidden(f"this endpoint needs the '{role}' role; your key has "
                    f"'{principal.role}'")

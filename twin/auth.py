"""Who is calling, and what they may do. No FastAPI here; twin/api/deps.py and
twin/api/access.py wrap it.

A caller is a ``Principal`` (name, role, scope) from one of:

- an API key from the database (``twin keys add``; stored as a prefix and a SHA-256 hash,
  twin/apikeys.py),
- an API key from settings (``TWIN_AUTH_KEYS``, a JSON object
  ``{"<key>": "<role>[:<name>[:<scope>]]"}``, scope as in ``parse_scope``), for bootstrapping
  and tests,
- a JWT bearer token verified locally: HS256 with ``TWIN_AUTH_JWT_SECRET`` or RS256/ES256
  with the public keys of ``TWIN_AUTH_JWKS_FILE``; claims ``sub``, ``role``, ``scope``
  (``parse_scope`` text) and ``exp`` are required,
- nobody: anonymous, allowed only when ``TWIN_AUTH_ANONYMOUS_ROLE`` is set (the demo).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

import jwt
from sqlalchemy.ext.asyncio import AsyncConnection

from twin.core.principal import (
    ROLES,
    Principal,
    Unauthenticated,
    anonymous_principal,
    check_role,
    parse_scope,
)
from twin.core.settings import AuthSettings

# --- API keys ------------------------------------------------------------------------------

# Database keys are "twin_<prefix>_<secret>": the prefix finds the row, the secret (256 random
# bits) makes the key unguessable. SHA-256 is enough to store them: slow hashes (scrypt,
# argon2) protect low-entropy passwords from guessing, and nobody can guess 256 random bits
# from a hash, with or without a slow hash; SHA-256 keeps each authenticated request cheap.
KEY_MARK = "twin_"
PREFIX_CHARS = 12


def new_api_key() -> tuple[str, str]:
    """A fresh key and its lookup prefix."""
    prefix = secrets.token_hex(PREFIX_CHARS // 2)
    return prefix, f"{KEY_MARK}{prefix}_{secrets.token_urlsafe(32)}"


def key_prefix(token: str) -> str | None:
    """The lookup prefix of a database key; None when ``token`` is not shaped like one."""
    if not token.startswith(KEY_MARK):
        return None
    prefix, sep, secret = token[len(KEY_MARK):].partition("_")
    ok = sep and secret and len(prefix) == PREFIX_CHARS and all(
        c in "0123456789abcdef" for c in prefix)
    return prefix if ok else None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_matches(key: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_key(key), stored_hash)


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


# --- JWT -----------------------------------------------------------------------------------

ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "ES256", "ES384")
REQUIRED_CLAIMS = ("exp", "sub", "role", "scope")


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("eyJ")


class JwtVerifier:
    """Verifies JWTs with locally configured keys only: no discovery, no network calls.

    The algorithm decides the key: HS256 only ever uses the secret and the asymmetric
    algorithms only the JWKS file's public keys, so a token cannot pick a weaker check
    (e.g. HS256 "signed" with a published RSA key).
    """

    def __init__(self, settings: AuthSettings):
        self._secret = settings.jwt_secret.get_secret_value() if settings.jwt_secret else None
        self._jwks: list[jwt.PyJWK] = []
        if settings.jwks_file is not None:
            document = json.loads(settings.jwks_file.read_text())
            self._jwks = list(jwt.PyJWKSet.from_dict(document).keys)
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._leeway = settings.jwt_leeway_s

    @property
    def configured(self) -> bool:
        return bool(self._secret or self._jwks)

    def _key(self, header: dict) -> Any:  # the secret, or a cryptography public key
        alg, kid = header.get("alg"), header.get("kid")
        if alg == "HS256":
            if not self._secret:
                raise Unauthenticated("bearer token: HS256 tokens are not accepted "
                                      "(no TWIN_AUTH_JWT_SECRET)")
            return self._secret
        if alg not in ASYMMETRIC_ALGORITHMS:
            raise Unauthenticated(f"bearer token: algorithm {alg!r} is not accepted; "
                                  f"accepted: HS256, {', '.join(ASYMMETRIC_ALGORITHMS)}")
        candidates = [k for k in self._jwks if (kid is None or k.key_id == kid)
                      and k.algorithm_name == alg]
        if len(candidates) != 1:
            raise Unauthenticated(f"bearer token: no single key in TWIN_AUTH_JWKS_FILE for "
                                  f"alg {alg} and kid {kid!r}")
        return candidates[0].key

    def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(
                token, self._key(header), algorithms=[str(header.get("alg"))],
                audience=self._audience, issuer=self._issuer, leeway=self._leeway,
                options={"require": list(REQUIRED_CLAIMS)})
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("bearer token: expired ('exp' is in the past)") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"bearer token: the '{exc.claim}' claim is required "
                                  f"(required: {', '.join(REQUIRED_CLAIMS)})") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("bearer token: the signature does not verify") from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"bearer token: {exc}") from None
        try:
            return Principal(str(claims["sub"]), check_role(str(claims["role"])),
                             parse_scope(str(claims["scope"])))
        except ValueError as exc:
            raise Unauthenticated(f"bearer token: {exc}") from None


# --- who is calling ------------------------------------------------------------------------

def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization`` header; None when there is none."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("Authorization: expected 'Bearer <key or token>'")
    return token.strip()


Connect = Callable[[], AbstractAsyncContextManager[AsyncConnection]]
KeyLookup = Callable[[AsyncConnection, str], Awaitable[Principal | None]]


class Authenticator:
    """Settings keys, database keys and JWTs behind one call."""

    def __init__(self, settings: AuthSettings, lookup: KeyLookup):
        self.keys = KeyTable(settings.keys)
        self.jwt = JwtVerifier(settings)
        self.anonymous = anonymous_principal(settings.anonymous_role)
        self._lookup = lookup

    async def principal(self, authorization: str | None, connect: Connect) -> Principal | None:
        """The caller, the anonymous principal, or None (anonymous access is off)."""
        token = bearer_token(authorization)
        if token is None:
            return self.anonymous
        principal = self.keys.lookup(token)
        if principal is not None:
            return principal
        if key_prefix(token) is not None:
            async with connect() as conn:
                principal = await self._lookup(conn, token)
            if principal is None:
                raise Unauthenticated("unknown or revoked API key")
            return principal
        if looks_like_jwt(token):
            if not self.jwt.configured:
                raise Unauthenticated("bearer token: JWTs are not accepted here (no "
                                      "TWIN_AUTH_JWT_SECRET or TWIN_AUTH_JWKS_FILE)")
            return self.jwt.verify(token)
        raise Unauthenticated("unknown API key")

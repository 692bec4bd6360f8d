"""API keys in the database: created, listed and revoked by ``twin keys`` (and admins over
HTTP), looked up on every keyed request.

Only the key's lookup prefix and its SHA-256 are stored (why SHA-256 suffices: see
twin/auth.py); the key itself is returned once, by ``add_key``.
"""

from __future__ import annotations

from sqlalchemy import Connection, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from twin.auth import hash_key, key_matches, key_prefix, new_api_key
from twin.core.errors import InvalidParameter, NotFound
from twin.core.principal import Principal, check_role, parse_scope

NAME_MAX = 64
COLUMNS = "id, name, prefix, role, scope, created_at, revoked_at"


def _check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > NAME_MAX or not name.isprintable() or name.isdigit():
        raise InvalidParameter(f"name: 1 to {NAME_MAX} printable characters, not all digits "
                               f"(digits name a key id); got {name!r}")
    return name


def _check_scope(scope: str) -> str:
    try:
        return parse_scope(scope).text
    except ValueError as exc:
        raise InvalidParameter(str(exc)) from None


def add_key(conn: Connection, name: str, role: str, scope: str = "city") -> tuple[dict, str]:
    """A new key: its row (without the hash) and the key, which is never seen again."""
    try:
        check_role(role)
    except ValueError as exc:
        raise InvalidParameter(str(exc)) from None
    values = {"name": _check_name(name), "role": role, "scope": _check_scope(scope)}
    prefix, key = new_api_key()
    try:
        with conn.begin_nested():
            row = conn.execute(text(
                f"INSERT INTO api_keys (name, prefix, hash, role, scope) "
                f"VALUES (:name, :prefix, :hash, :role, :scope) RETURNING {COLUMNS}"),
                {**values, "prefix": prefix, "hash": hash_key(key)}).mappings().one()
    except IntegrityError:
        raise InvalidParameter(f"name: a live key named {values['name']!r} exists; revoke it "
                               "first or choose another name") from None
    return dict(row), key


def list_keys(conn: Connection, include_revoked: bool = True) -> list[dict]:
    where = "" if include_revoked else "WHERE revoked_at IS NULL"
    rows = conn.execute(text(f"SELECT {COLUMNS} FROM api_keys {where} ORDER BY id"))
    return [dict(row) for row in rows.mappings()]


def revoke_key(conn: Connection, ident: str) -> dict:
    """Revoke a key by id (digits) or by the name of a live key; revoking twice is a no-op."""
    ident = ident.strip()
    if not ident.isprintable():
        raise InvalidParameter(f"key: an id or a name of printable characters; got {ident!r}")
    by_id = ident.isascii() and ident.isdigit() and len(ident) <= 9
    where = "id = :ident" if by_id else "name = :ident AND revoked_at IS NULL"
    params = {"ident": int(ident) if by_id else ident}
    row = conn.execute(text(
        f"UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE {where} "
        f"RETURNING {COLUMNS}"), params).mappings().one_or_none()
    if row is None:
        raise NotFound(f"key: no key with id or live name {ident!r} (see `twin keys list`)")
    return dict(row)


async def lookup(conn: AsyncConnection, token: str) -> Principal | None:
    """The principal of a live database key; None for unknown or revoked keys."""
    prefix = key_prefix(token)
    if prefix is None:
        return None
    row = (await conn.execute(text(
        "SELECT name, hash, role, scope FROM api_keys "
        "WHERE prefix = :prefix AND revoked_at IS NULL"), {"prefix": prefix})).one_or_none()
    await conn.rollback()
    if row is None or not key_matches(token, row.hash):
        return None
    return Principal(row.name, row.role, parse_scope(row.scope))

"""The audit log: every write request (who, when, what, outcome), refused and failed ones too.

twin/api/middleware.py records; admins read with ``GET /audit``.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection

MAX_LIMIT = 1000


def outcome(status: int) -> str:
    """ok (done), refused (4xx: not allowed, invalid or too much), failed (5xx)."""
    return "ok" if status < 400 else "refused" if status < 500 else "failed"


async def record(conn: AsyncConnection, *, principal: str | None, role: str | None,
                 method: str, path: str, status: int, detail: dict, request_id: str) -> None:
    statement = text(
        "INSERT INTO audit_log (principal, role, method, path, status, outcome, detail, "
        "request_id) VALUES (:principal, :role, :method, :path, :status, :outcome, :detail, "
        ":request_id)").bindparams(bindparam("detail", type_=JSONB))
    await conn.execute(statement, {
        "principal": principal, "role": role, "method": method, "path": path,
        "status": status, "outcome": outcome(status), "detail": detail,
        "request_id": request_id})


async def entries(conn: AsyncConnection, since: datetime | None = None,
                  principal: str | None = None, limit: int = 100) -> list[dict]:
    """Newest first."""
    rows = await conn.execute(text(
        "SELECT id, at, principal, role, method, path, status, outcome, detail, request_id "
        "FROM audit_log "
        "WHERE (CAST(:since AS timestamptz) IS NULL OR at >= :since) "
        "AND (CAST(:principal AS text) IS NULL OR principal = :principal) "
        "ORDER BY at DESC, id DESC LIMIT :limit"),
        {"since": since, "principal": principal, "limit": limit})
    return [dict(row) for row in rows.mappings()]

"""The audit log of writes, for admins: ``GET /audit``."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Query

from twin import audit
from twin.api.deps import ConnDep
from twin.core.errors import InvalidParameter

router = APIRouter(tags=["admin"])


Since = Query(None, description="only entries at or after this ISO 8601 time, with a time "
              "zone (e.g. 2026-11-22T08:00:00Z)")
PrincipalName = Query(None, max_length=200, pattern=r"^[^\x00]*$",
                      description="only this principal's entries")
Limit = Query(100, ge=1, le=audit.MAX_LIMIT, description=f"at most this many, 1 to "
              f"{audit.MAX_LIMIT}")


@router.get("/audit", summary="Write requests, newest first: who, when, what, outcome (admin)")
async def list_audit(conn: ConnDep, since: datetime | None = Since,
                     principal: str | None = PrincipalName, limit: int = Limit) -> dict:
    if since is not None and since.tzinfo is None:
        raise InvalidParameter(f"since: needs a time zone (e.g. {since.isoformat()}Z); "
                               f"got {since.isoformat()}")
    entries = await audit.entries(conn, since, principal, limit)
    for entry in entries:
        entry["at"] = entry["at"].isoformat()
    return {"entries": entries, "count": len(entries)}

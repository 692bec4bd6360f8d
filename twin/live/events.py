"""Events: located, linked, moved through their states, escalated (owner: events).

Stub: filled in by its owner (see the design notes)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection


async def raise_event(conn: AsyncConnection, *, kind: str, lon: float, lat: float,
                      source: str, title: str, description: str,
                      sensor_id: int | None = None, rule_code: str | None = None
                      ) -> dict[str, Any]:
    """An event raised by a rule or detector, inside the caller's transaction (no commit)."""
    raise NotImplementedError("events are not built yet")

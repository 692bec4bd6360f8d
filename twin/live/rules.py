"""Alert rules on readings as they arrive (owner: rules).

Stub: filled in by its owner (see the design notes)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncConnection


async def evaluate(conn: AsyncConnection, sensor_ids: Sequence[int], ts: Sequence[datetime],
                   values: Sequence[float]) -> int:
    """Opens and closes alerts for a batch just stored, inside the ingest's transaction;
    the number of alerts opened or closed."""
    return 0

"""Sensor readings the tests write, and the database put back after them.

A module's readings carry a mark in the sub-second part of their instants (the sample's are on
whole minutes), so they never collide with the sample's and are found again afterwards: the
module deletes them and makes each touched sensor's latest reading (``sensor_latest``) the
newest one left again.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import Connection, text

from twin.core.db import async_engine
from twin.core.settings import ReadingsSettings, Settings
from twin.live import partitions

# Every reading with a sub-second part: those the tests posted.
SUB_SECOND = "ts <> date_trunc('second', ts)"


def forget_readings(conn: Connection, where: str, params: dict[str, Any] | None = None
                    ) -> list[int]:
    """Deletes the readings ``where`` picks and rebuilds the touched sensors' latest reading
    from what is left; returns those sensors' ids, sorted."""
    touched = conn.execute(text(f"DELETE FROM sensor_readings WHERE {where} RETURNING sensor_id"),
                           params or {}).scalars().all()
    ids = sorted(set(touched))
    conn.execute(text("DELETE FROM sensor_latest WHERE sensor_id = ANY(:ids)"), {"ids": ids})
    conn.execute(text("""
        INSERT INTO sensor_latest (sensor_id, ts, value)
        SELECT DISTINCT ON (sensor_id) sensor_id, ts, value FROM sensor_readings
         WHERE sensor_id = ANY(:ids) ORDER BY sensor_id, ts DESC
    """), {"ids": ids})
    return ids


def run_maintenance(database_url: str, settings: ReadingsSettings
                    ) -> partitions.MaintenanceReport:
    """One pass of the partition keeper (premake, rollups, retention) on its own engine."""
    async def run() -> partitions.MaintenanceReport:
        engine = async_engine(Settings(database_url=database_url), pool_size=1)
        try:
            async with engine.connect() as conn:
                return await partitions.maintain(conn, settings)
        finally:
            await engine.dispose()

    return asyncio.run(run())

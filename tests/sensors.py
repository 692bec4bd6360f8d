"""Sensor readings the tests write, and the database put back after them.

A module's readings carry a mark in the sub-second part of their instants (the sample's are on
whole minutes), so they never collide with the sample's and are found again afterwards: the
module deletes them and makes each touched sensor's latest reading (``sensor_latest``) the
newest one left again.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, text

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

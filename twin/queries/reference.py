"""Reference tables the map needs beside the layers: the sector list and emergency plans.

Sectors are data, not code (a later list adds an eighth), so clients read them from here.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from twin.core.errors import InvalidParameter, NotFound

_SECTORS = text("SELECT code, name_zh, name_en, sort_order FROM sectors ORDER BY sort_order, code")

_PLAN = text("""
    SELECT p.id, p.code, p.title_zh, p.title_en, p.sector_code, p.response_level,
           p.issuer_code, u.name_zh AS issuer_name_zh, u.name_en AS issuer_name_en, p.summary
      FROM emergency_plans AS p
      LEFT JOIN admin_units AS u ON u.code = p.issuer_code
     WHERE p.id = :plan_id
""")

MAX_PLAN_ID = 2**31 - 1


async def sectors(conn: AsyncConnection) -> list[dict]:
    return [dict(row) for row in (await conn.execute(_SECTORS)).mappings()]


async def emergency_plan(conn: AsyncConnection, plan_id: int) -> dict:
    if not 1 <= plan_id <= MAX_PLAN_ID:
        raise InvalidParameter(f"plan_id: must be a positive integer id, got {plan_id}")
    row = (await conn.execute(_PLAN, {"plan_id": plan_id})).mappings().first()
    if row is None:
        raise NotFound(f"no emergency plan with id {plan_id}")
    return dict(row)

"""Reference data for clients: the sector list and emergency plans."""

from __future__ import annotations

from fastapi import APIRouter, Path

from twin.api.deps import ConnDep
from twin.queries import reference

router = APIRouter(tags=["reference"])


@router.get("/sectors", summary="The risk sectors (七大板块), in display order")
async def list_sectors(conn: ConnDep) -> dict:
    return {"sectors": await reference.sectors(conn)}


@router.get("/emergency-plans/{plan_id}", summary="One emergency plan (应急预案)")
async def get_emergency_plan(
    conn: ConnDep,
    plan_id: int = Path(ge=1, le=reference.MAX_PLAN_ID, description="the plan's id"),
) -> dict:
    return await reference.emergency_plan(conn, plan_id)

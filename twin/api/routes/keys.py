"""API keys over HTTP, for admins: the same operations as ``twin keys add|list|revoke``."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Path
from pydantic import BaseModel, Field

from twin import apikeys
from twin.api.deps import ConnDep
from twin.core.principal import ROLES

router = APIRouter(tags=["admin"])


# The roles as a Literal built from the domain's tuple (mypy cannot read it, hence the ignore).
Role = Literal[ROLES]  # type: ignore[valid-type]
# A street scope may list every street of the city (~1,031 codes of 9 digits).
SCOPE_MAX_LENGTH = 16_384


class NewKey(BaseModel):
    # apikeys checks the name further (printable, not all digits) with the same bound.
    name: str = Field(min_length=1, max_length=apikeys.NAME_MAX,
                      description="who holds the key (shown as 'uploaded by' and in the audit)")
    role: Role = Field(description="what the key may call")
    scope: str = Field("city", max_length=SCOPE_MAX_LENGTH,
                       description="city | district=<adcodes> | street=<codes>")


def _jsonable(row: dict) -> dict:
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}


@router.get("/keys", summary="Every API key, revoked ones too; never the key itself (admin)")
async def list_keys(conn: ConnDep) -> dict:
    return {"keys": [_jsonable(row) for row in await conn.run_sync(apikeys.list_keys)]}


@router.post("/keys", status_code=201,
             summary="Create an API key; the answer holds the key, shown this once (admin)")
async def add_key(body: NewKey, conn: ConnDep) -> dict:
    row, key = await conn.run_sync(apikeys.add_key, body.name, body.role, body.scope)
    await conn.commit()
    return {**_jsonable(row), "key": key}


@router.delete("/keys/{key}", summary="Revoke an API key by id or name (admin)")
async def revoke_key(
    conn: ConnDep,
    key: str = Path(min_length=1, max_length=apikeys.NAME_MAX,
                    description="the key's id or the name of a live key"),
) -> dict:
    row = await conn.run_sync(apikeys.revoke_key, key)
    await conn.commit()
    return _jsonable(row)

"""Risk points edited through OGC API - Features Part 4 (owner: edit).

Stub: filled in by its owner (see the design notes)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["edits"])

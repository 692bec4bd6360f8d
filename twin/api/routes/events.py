"""Events: report, read, move through their states (owner: events).

Stub: filled in by its owner (see the design notes)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["events"])

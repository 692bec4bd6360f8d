"""The push stream: tickets and Server-Sent Events (owner: push).

Stub: filled in by its owner (see the design notes)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["stream"])

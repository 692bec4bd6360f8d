"""Deadlines that passed, escalated grid -> street -> district -> city (owner: events).

Stub: filled in by its owner (see the design notes)."""

from __future__ import annotations

from typing import Any


class _Idle:
    async def stop(self) -> None:
        return None


async def start(ctx: Any) -> _Idle:
    return _Idle()

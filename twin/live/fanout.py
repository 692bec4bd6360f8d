"""One LISTEN connection per process fanning outbox rows out to stream clients (owner: push).

Stub: filled in by its owner (see the design notes)."""

from __future__ import annotations

from typing import Any


class _Idle:
    async def stop(self) -> None:
        return None


async def start(ctx: Any) -> _Idle:
    return _Idle()

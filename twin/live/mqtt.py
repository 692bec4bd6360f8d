"""The MQTT subscriber: readings from the broker, acknowledged after commit (owner: mqtt).

Stub: filled in by its owner (see the design notes)."""

from __future__ import annotations

from typing import Any


class _Idle:
    async def stop(self) -> None:
        return None


async def start(ctx: Any) -> _Idle:
    return _Idle()

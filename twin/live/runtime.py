"""The living twin's background work in one server process, started and stopped with the app.

Each part lives in a module of its own and is started by its ``start(ctx)``, which returns
something with an async ``stop()``:

* ``fanout``: the one LISTEN connection per process that pushes outbox rows to the streams;
* ``escalation``: the deadlines that passed, escalated (any process may claim one);
* ``detectors``: silent sensors and the incremental pipe-anomaly detector;
* ``partitions``: day partitions of the readings made ahead and dropped past retention;
* ``mqtt``: the subscriber, when ``TWIN_MQTT_URL`` names a broker.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncEngine

from twin.core.db import libpq_url
from twin.core.settings import Settings

log = logging.getLogger("twin.live")


class Background(Protocol):
    async def stop(self) -> None: ...


@dataclass(frozen=True)
class LiveContext:
    settings: Settings
    # The app's engine (its pool); a part that holds a connection for long opens its own.
    engine: AsyncEngine
    # The database for psycopg directly (LISTEN).
    url: str


@dataclass
class LiveRuntime:
    context: LiveContext
    parts: dict[str, Any] = field(default_factory=dict)

    @classmethod
    async def start(cls, settings: Settings, engine: AsyncEngine) -> LiveRuntime:
        from twin.live import detectors, escalation, fanout, mqtt, partitions

        runtime = cls(LiveContext(settings, engine, libpq_url(settings)))
        try:
            for name, module in (("fanout", fanout), ("escalation", escalation),
                                 ("detectors", detectors), ("partitions", partitions),
                                 ("mqtt", mqtt)):
                runtime.parts[name] = await module.start(runtime.context)
        except BaseException:
            await runtime.stop()
            raise
        return runtime

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["parts"][name]
        except KeyError:
            raise AttributeError(name) from None

    async def stop(self) -> None:
        for name, part in reversed(list(self.parts.items())):
            with contextlib.suppress(Exception):
                await part.stop()
            log.debug("live: %s stopped", name)
        self.parts.clear()

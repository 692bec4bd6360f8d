"""Deadlines that passed, escalated grid -> street -> district -> city (owner: events).

Every server process runs one loop (``start``): it claims the open deadlines whose time has
come (``FOR UPDATE SKIP LOCKED``, so processes share the work and never fire one twice),
fires them (twin/live/events.py ``escalate_due``: the event one level up, history, outbox),
commits, and sleeps until the next open deadline or ``TWIN_EVENTS_ESCALATION_POLL_S``,
whichever comes first (another process may have added an earlier one). Deadlines live in
the database, so the ones that passed while no server ran fire as soon as one starts.

Never early: a deadline is claimed only once the database clock has passed ``due_at``.
Never twice: a fired deadline has ``fired_at`` set in the transaction that escalated, and
only deadlines with neither ``met_at`` nor ``fired_at`` are claimed.

A lost database (restart, network) is logged and retried with a growing pause (up to
``MAX_BACKOFF_S``); the loop never dies of it. ``stop`` cancels the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from twin.core.db import async_engine
from twin.live import events

log = logging.getLogger("twin.live.escalation")

BATCH = 100
MAX_BACKOFF_S = 5.0
# The least pause between looks (deadlines due but held by another process's transaction).
MIN_PAUSE_S = 0.05


class Escalator:
    def __init__(self, engine: AsyncEngine, poll_s: float, owns_engine: bool = False):
        self.engine = engine
        self._owns_engine = owns_engine
        self.poll_s = poll_s
        self.fired = 0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="twin-escalation")

    def wake(self) -> None:
        """Look now (a deadline nearer than the one slept for was written in this process)."""
        self._wake.set()

    async def once(self) -> float:
        """Fire every due deadline this process can claim; the seconds to sleep after."""
        while True:
            async with self.engine.connect() as conn:
                fired = await events.escalate_due(conn, BATCH)
                await conn.commit()
            self.fired += fired
            if fired:
                log.info("escalated %d missed deadline(s)", fired)
            if fired < BATCH:
                break
        async with self.engine.connect() as conn:
            until = await events.seconds_to_next_due(conn)
        if until is None:
            return self.poll_s
        # A little past the due time: the claim compares against the database's clock.
        return min(self.poll_s, max(until + 0.005, MIN_PAUSE_S))

    async def _run(self) -> None:
        backoff = self.poll_s
        while True:
            try:
                pause = await self.once()
                backoff = self.poll_s
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the database went away: log, retry
                log.warning("escalation: %s; retrying in %.1f s", error, backoff)
                pause = backoff
                backoff = min(backoff * 2, MAX_BACKOFF_S)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=pause)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._owns_engine:
            await self.engine.dispose()


async def start(ctx: Any) -> Escalator:
    """The escalation loop of this process (its first look is immediate: overdue deadlines
    fire at start-up)."""
    events.configure(ctx.settings.events)
    # A pool of its own: a deadline fires on time however busy the requests keep the app's
    # pool (one connection at a time is all the loop uses).
    engine = async_engine(ctx.settings, pool_size=1, max_overflow=1,
                          application_name="twin escalation")
    escalator = Escalator(engine, ctx.settings.events.escalation_poll_s, owns_engine=True)
    escalator.start()
    return escalator

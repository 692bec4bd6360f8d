"""Messages pushed to the maps, written in the transaction of the change they announce.

``emit`` adds one row to ``outbox`` (migration 0010) inside the caller's transaction and
announces it on the ``twin_outbox`` channel; PostgreSQL delivers the announcement after the
commit and never for a rollback, so a message exists exactly when its change does. Each
server process fans the rows out to its stream clients (twin/live/fanout.py).

Ids follow commit order: ``emit`` takes the transaction-level advisory lock ``OUTBOX_LOCK``
before the row takes its id, and the lock is held until the commit is visible. So call it
last, just before the commit: the lock serialises the writers of messages from that point
on. A reader that has seen id N has seen every id below N.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

CHANNEL = "twin_outbox"
# The advisory lock every outbox writer takes (the layer trigger of migration 0010 too).
OUTBOX_LOCK = 7013
# Message kinds (the SSE event names).
KINDS = ("alert", "event", "layer", "feature", "anomaly")

_EMIT = text("""
    WITH locked AS (SELECT pg_advisory_xact_lock(:lock))
    INSERT INTO outbox (kind, area_codes, payload)
    SELECT :kind, CAST(:codes AS text[]), CAST(:payload AS jsonb) FROM locked
    RETURNING id
""")
_NOTIFY = text("SELECT pg_notify(:channel, '')")
# Several messages, ids in list order (the rows are inserted in ordinality order).
_EMIT_MANY = text("""
    WITH locked AS (SELECT pg_advisory_xact_lock(:lock))
    INSERT INTO outbox (kind, area_codes, payload)
    SELECT m.kind, CASE WHEN m.codes IS NULL THEN NULL
                        ELSE ARRAY(SELECT json_array_elements_text(m.codes)) END,
           m.payload
      FROM locked, unnest(CAST(:kinds AS text[]), CAST(:codes AS json[]),
                          CAST(:payloads AS jsonb[])) WITH ORDINALITY AS m(kind, codes, payload, n)
     ORDER BY m.n
    RETURNING id
""")


async def emit(conn: AsyncConnection, kind: str, payload: dict,
               area_codes: Iterable[str] | None = None) -> int:
    """Queue one message in the caller's open transaction; its id.

    ``area_codes``: the admin codes it belongs to (an event's grid code), None for everyone.
    """
    if kind not in KINDS:
        raise ValueError(f"outbox kind {kind!r} is not one of {KINDS}")
    codes = sorted(area_codes) if area_codes is not None else None
    message_id = (await conn.execute(_EMIT, {
        "lock": OUTBOX_LOCK, "kind": kind, "codes": codes,
        "payload": json.dumps(payload, ensure_ascii=False, default=str)})).scalar_one()
    await conn.execute(_NOTIFY, {"channel": CHANNEL})
    return int(message_id)


async def emit_many(conn: AsyncConnection,
                    messages: list[tuple[str, dict, Iterable[str] | None]]) -> list[int]:
    """``emit`` for several messages ``(kind, payload, area_codes)`` in two round trips; their
    ids, in order."""
    if not messages:
        return []
    for kind, _, _ in messages:
        if kind not in KINDS:
            raise ValueError(f"outbox kind {kind!r} is not one of {KINDS}")
    ids = (await conn.execute(_EMIT_MANY, {
        "lock": OUTBOX_LOCK, "kinds": [kind for kind, _, _ in messages],
        "codes": [None if codes is None else json.dumps(sorted(codes))
                  for _, _, codes in messages],
        "payloads": [json.dumps(payload, ensure_ascii=False, default=str)
                     for _, payload, _ in messages]})).scalars().all()
    await conn.execute(_NOTIFY, {"channel": CHANNEL})
    return sorted(int(i) for i in ids)

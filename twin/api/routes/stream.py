"""The push stream: tickets and Server-Sent Events (issue 14).

``GET /events/stream`` is one Server-Sent Events stream per client carrying the outbox's
messages for the caller's jurisdiction (twin/live/fanout.py). EventSource cannot send an
Authorization header, so a client first trades its key or token for a short-lived ticket
(``POST /events/stream/tickets``) and opens the stream with ``?ticket=``; other clients may
send the bearer header instead. The access guard takes either (twin/api/deps.py,
``get_principal``), so the stream is rate-limited and role-checked like every route.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from pydantic import BaseModel, Field
from sqlalchemy.exc import DBAPIError
from sse_starlette import EventSourceResponse, ServerSentEvent

from twin.api.deps import ConnDep, get_principal
from twin.core.errors import InvalidParameter
from twin.core.principal import Scope, require_role
from twin.live import fanout as push
from twin.live.fanout import Fanout

router = APIRouter(tags=["stream"])
log = logging.getLogger("twin.api.stream")

STREAM = "/events/stream"
# A ticket is 43 URL-safe characters (32 random bytes); a little room, nothing unbounded.
TICKET_MAX = 128
ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
EVENT_STREAM_DOC = (
    "`text/event-stream`: one event per outbox message for the caller's jurisdiction, "
    "`id: <message id>`, `event: <kind>` (alert, event, layer, feature, anomaly), "
    '`data: {"id", "kind", "created_at", "payload"}`; comment lines keep the connection '
    "alive and a `retry:` line says how long to wait before reconnecting. Reconnect with "
    "`Last-Event-ID` (or `last_event_id`) to receive every message after it, once, in order.")


class StreamTicket(BaseModel):
    ticket: str = Field(description="opens (and reopens) the stream until it expires")
    expires_at: datetime
    stream: str = Field(description="the stream's URL (path and query) with the ticket")


@router.post(STREAM + "/tickets", status_code=201,
             summary="A short-lived ticket that opens the push stream (viewer)")
async def new_ticket(request: Request, conn: ConnDep) -> StreamTicket:
    principal = require_role(await get_principal(request), "viewer")
    settings = request.app.state.settings.stream
    ticket, expires_at = await push.issue_ticket(conn, principal, settings.ticket_ttl_s)
    await conn.commit()
    return StreamTicket(ticket=ticket, expires_at=expires_at,
                        stream=f"{STREAM}?ticket={ticket}")


def _last_event_id(header: str | None, query: int | None) -> int | None:
    """The header wins: an EventSource reconnecting sends it with the URL it first opened."""
    if header is None or not header.strip():
        return query
    try:
        value = int(header.strip())
    except ValueError:
        value = -1
    if value < 0:
        raise InvalidParameter(f"Last-Event-ID: expected a message id (an integer >= 0), "
                               f"got {header[:40]!r}")
    return value


async def _events(fanout: Fanout, scope: Scope, after: int | None,
                  retry_ms: int) -> AsyncIterator[ServerSentEvent]:
    # Subscribed here, where closing is certain (this generator's end), not in the route: a
    # client gone before the body starts would leave a subscriber nobody reads.
    subscription = fanout.subscribe(scope, after)
    try:
        yield ServerSentEvent(comment="twin push stream", retry=retry_ms)
        async for message in subscription:
            yield ServerSentEvent(data=message.data, id=str(message.id), event=message.kind)
    except (DBAPIError, OSError) as error:
        # A replay the database could not answer: the stream ends and the client, told to
        # retry, resumes from its last id once the database is back.
        log.warning("push: a stream's replay failed; the client will resume: %s", error)
    finally:
        subscription.close()


@router.get(
    STREAM, response_class=EventSourceResponse,
    summary="Server-Sent Events: alerts, events, layer versions and feature edits in the "
            "caller's jurisdiction (viewer; a ticket or a bearer header)",
    responses={
        200: {"description": EVENT_STREAM_DOC,
              "content": {"text/event-stream": {"schema": {"type": "string"}}}},
        401: {"description": "no credential, or an unknown, expired or revoked ticket, key "
                             "or token", "content": ERROR},
    })
async def stream(
    request: Request,
    ticket: Annotated[str | None, Query(
        min_length=1, max_length=TICKET_MAX,
        description="a ticket from POST /events/stream/tickets (EventSource cannot send "
                    "an Authorization header)")] = None,
    last_event_id: Annotated[int | None, Query(
        ge=0, description="resume after this message id (the Last-Event-ID header wins)")
    ] = None,
    last_event_id_header: Annotated[str | None, Header(
        alias="Last-Event-ID", max_length=40,
        description="sent by a reconnecting EventSource: resume after this message id")
    ] = None,
) -> EventSourceResponse:
    # The guard has checked the ticket (or header) and the role; the ticket's principal.
    principal = require_role(await get_principal(request), "viewer")
    after = _last_event_id(last_event_id_header, last_event_id)
    settings = request.app.state.settings.stream
    fanout: Fanout = request.app.state.live.fanout
    if after is None:
        # "From now on" is from what this process has read so far: a message committed once
        # the client has the headers is never missed (replayed if the listener read it
        # before the subscription starts).
        after = fanout.last
    return EventSourceResponse(_events(fanout, principal.scope, after, settings.retry_ms),
                               ping=settings.keepalive_s)

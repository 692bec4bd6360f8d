"""Read-your-writes tokens and the read target of each request (issue 15), as plain ASGI.

With standbys configured (``TWIN_DB_STANDBY_URLS``, twin/core/replicas.py):

* A write (any method but GET and HEAD; and a GET of an upload job, ``PRIMARY_READS``, read
  on the primary) answered 2xx carries ``Twin-LSN``: the primary's
  ``pg_current_wal_lsn()`` read after the write committed, and the same in a cookie
  ``twin_lsn`` (Path=/, HttpOnly, SameSite=Lax), which a browser sends on every later request,
  to whichever node.
* A GET or HEAD reads where the ``Twin-LSN`` header's (else the cookie's) position is replayed
  (``ReadRouter.choose``): its engine is put in the request state (``read_engine``), where
  twin/api/deps.py's connection takes it. Writes always use the primary.
* A GET or HEAD whose handling on a standby failed in a way the primary would not (a recovery
  conflict, the standby going away or not having replayed a table yet: ``retry_on_primary``)
  is handled once more on the primary, provided no byte of the failed answer was sent. The
  error reaches this middleware through the request state: twin/api/errors.py turns database
  errors into answers inside the app and notes the error there first (``note_failure``).

Without standbys it passes everything through untouched.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from twin.core.replicas import ReadRouter, parse_lsn, retry_on_primary

log = logging.getLogger("twin.api")

HEADER = "Twin-LSN"
COOKIE = "twin_lsn"
READS = frozenset({"GET", "HEAD"})
# Reads of work the server finishes after the request that started it (an upload job, whose
# publish the client learns of here): read on the primary and answered with a token as a
# write is, so that what the client reads next is at least as new as what it saw here.
PRIMARY_READS = ("/jobs/",)
# Keys of the request state (``request.state.<key>``, ``scope["state"][key]``).
READ_ENGINE = "read_engine"
FAILURE = "standby_failure"


def token_of(scope: Scope) -> str | None:
    """The WAL position a read must see: the ``Twin-LSN`` header, else the ``twin_lsn``
    cookie (None when neither holds one)."""
    header = cookie = None
    for name, value in scope["headers"]:
        if name == b"twin-lsn":
            header = value.decode("latin-1")
        elif name == b"cookie":
            cookie = cookie_parser(value.decode("latin-1")).get(COOKIE, cookie)
    for given in (header, cookie):
        if parse_lsn(given) is not None:
            return given
    return None


def note_failure(scope: Scope, error: BaseException) -> None:
    """Called by the database error handler: a read on a standby failed with ``error``."""
    state = scope.get("state")
    reads = getattr(scope["app"].state, "reads", None)
    if state is not None and reads is not None and reads.is_standby(state.get(READ_ENGINE)):
        state[FAILURE] = error


class ReadRouteMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        reads: ReadRouter | None = None
        if scope["type"] == "http":
            reads = getattr(scope["app"].state, "reads", None)
        if reads is None or not reads.active:
            await self.app(scope, receive, send)
        elif scope["method"] in READS and not scope["path"].startswith(PRIMARY_READS):
            await self._read(reads, scope, receive, send)
        else:
            await self._write(reads, scope, receive, send)

    async def _write(self, reads: ReadRouter, scope: Scope, receive: Receive,
                     send: Send) -> None:
        async def send_with_token(message: Message) -> None:
            if message["type"] == "http.response.start" and 200 <= message["status"] < 300:
                try:
                    lsn = await reads.current_lsn()
                except Exception as error:  # the write stands; only the token is missing
                    log.warning("no read-your-writes token for %s %s: %s", scope["method"],
                                scope["path"], error)
                else:
                    token = lsn.encode("latin-1")
                    message["headers"] = [
                        *message.get("headers", []), (b"twin-lsn", token),
                        (b"set-cookie", b"twin_lsn=" + token
                         + b"; Path=/; HttpOnly; SameSite=Lax")]
            await send(message)

        await self.app(scope, receive, send_with_token)

    async def _read(self, reads: ReadRouter, scope: Scope, receive: Receive,
                    send: Send) -> None:
        state: dict[str, Any] = scope.setdefault("state", {})
        engine = await reads.choose(token_of(scope))
        state[READ_ENGINE] = engine
        if not reads.is_standby(engine):
            await self.app(scope, receive, send)
            return
        started = discarded = False

        async def guarded_send(message: Message) -> None:
            nonlocal started, discarded
            if message["type"] == "http.response.start" and not discarded:
                failure = state.get(FAILURE)
                if failure is not None and retry_on_primary(failure):
                    discarded = True  # the answer to the failure: never sent
                else:
                    started = True
            if not discarded:
                await send(message)

        failure: BaseException | None = None
        try:
            await self.app(scope, receive, guarded_send)
        except Exception as error:
            failure = state.get(FAILURE) or error
            if started or not retry_on_primary(failure):
                raise
            discarded = True
        if not discarded:
            return
        failure = state.pop(FAILURE, None) or failure
        reason = retry_on_primary(failure) if failure is not None else None
        log.info("%s %s: %s on standby, read again on the primary", scope["method"],
                 scope["path"], reason)
        if failure is not None:
            reads.report_failure(engine, failure)
        state[READ_ENGINE] = reads.primary
        state.pop("read_connection", None)  # the standby's (twin/api/deps.py), closed by now
        await self.app(scope, _replayed(receive), send)


def _replayed(receive: Receive) -> Receive:
    """The request's (empty) body again for the second handling, then the client's events."""
    given = False

    async def again() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return await receive()

    return again

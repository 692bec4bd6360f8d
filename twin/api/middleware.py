"""ASGI middleware: request body limits and the audit log of writes (with request ids).

Plain ASGI rather than BaseHTTPMiddleware, so uploads and tiles stream through untouched.
"""

from __future__ import annotations

import json
import logging
import re
import uuid

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from twin import audit
from twin.api.access import is_write
from twin.core.errors import TwinError

log = logging.getLogger("twin.api")

# POST /layers and PUT /layers/{id} carry a whole file: TWIN_UPLOADS_MAX_FILE_BYTES applies.
UPLOAD_PATH = re.compile(r"^/layers(/[^/]+)?/?$")
UPLOAD_METHODS = ("POST", "PUT")
# Room for the multipart framing and form fields around the file, a little more than the
# uploads' own check allows (layers/), so that check, which names the file, answers first
# and this one is the backstop.
UPLOAD_SLACK_BYTES = 128 * 1024
REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# Bytes of an error body kept to quote its reason in the audit log.
REASON_BYTES = 2048


class BodyTooLarge(TwinError, HTTPException):
    """Also an HTTPException: FastAPI passes those on as they are while it reads a JSON or
    form body (anything else there becomes a 400 "error parsing the body")."""

    status_code = 413

    def __init__(self, message: str):
        HTTPException.__init__(self, 413, message)

    def __str__(self) -> str:
        return self.detail


def _body_limit(scope: Scope) -> tuple[int, str]:
    settings = scope["app"].state.settings
    if scope["method"] in UPLOAD_METHODS and UPLOAD_PATH.match(scope["path"]):
        return (settings.uploads.max_file_bytes + UPLOAD_SLACK_BYTES,
                "TWIN_UPLOADS_MAX_FILE_BYTES and 128 KiB for the form")
    return settings.limits.max_body_bytes, "TWIN_LIMITS_MAX_BODY_BYTES"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def _send_json(send: Send, status: int, body: dict, headers: list | None = None) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
        *(headers or [])]})
    await send({"type": "http.response.body", "body": payload})


class BodyLimitMiddleware:
    """413 for a body over the limit: at once from Content-Length, else while it streams in.

    Applied before routing and authentication, so an oversized body is never read at all.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = _body_limit(scope)
        message = f"request body: over the limit of {limit} bytes ({setting})"
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_json(send, 413, {"code": "BodyTooLarge",
                                         "description": f"{message}: {declared} bytes"})
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message_in = await receive()
            received += len(message_in.get("body", b""))
            if received > limit:
                raise BodyTooLarge(message)
            return message_in

        await self.app(scope, limited_receive, send)


def _request_id(scope: Scope) -> str:
    given = _header(scope, b"x-request-id")
    return given if given and REQUEST_ID.match(given) else uuid.uuid4().hex


def _reason(body: bytes) -> str | None:
    try:
        document = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", "replace") or None
    if isinstance(document, dict):
        return str(document.get("description") or document.get("detail") or "")[:500] or None
    return None


def _text(value: str, limit: int) -> str:
    """Storable text: PostgreSQL text and jsonb refuse NUL, and a hostile path can be long."""
    return value.replace("\x00", "\\x00")[:limit]


class AuditMiddleware:
    """Gives every request an ``X-Request-ID`` and records every write in the audit log.

    The row is written before the response leaves (so a client that sees the answer finds
    the row), with the status and, for refusals and failures, the reason the client got.
    The principal comes from the access guard (twin/api/access.py) through the request
    state. A lost audit write is logged, not turned into a failed request.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        id_header = (b"x-request-id", request_id.encode())
        if not is_write(scope["method"], scope["path"]):
            async def send_with_id(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", []), id_header]
                await send(message)

            await self.app(scope, receive, send_with_id)
            return
        await self._audited(scope, receive, send, request_id, id_header)

    async def _audited(self, scope: Scope, receive: Receive, send: Send, request_id: str,
                       id_header: tuple[bytes, bytes]) -> None:
        start: Message | None = None
        recorded = False

        async def record(status: int, reason: str | None) -> None:
            nonlocal recorded
            recorded = True
            await self._record(scope, request_id, status, reason)

        async def audited_send(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), id_header]
                if message["status"] < 400:
                    await record(message["status"], None)
                    await send(message)
                else:
                    start = message  # held until the body names the reason
                return
            if start is not None and not recorded:
                await record(start["status"], _reason(message.get("body", b"")[:REASON_BYTES]))
                await send(start)
            await send(message)

        try:
            await self.app(scope, receive, audited_send)
        except BodyTooLarge as exc:
            if start is not None or recorded:
                raise
            await record(413, str(exc))
            await _send_json(send, 413, {"code": "BodyTooLarge", "description": str(exc)},
                             [id_header])
        except Exception as exc:
            if not recorded:
                await record(500, f"internal error: {type(exc).__name__}")
            raise

    async def _record(self, scope: Scope, request_id: str, status: int,
                      reason: str | None) -> None:
        principal = scope.get("state", {}).get("principal")
        detail = {"client": scope["client"][0] if scope.get("client") else None}
        if scope.get("query_string"):
            detail["query"] = _text(scope["query_string"].decode("latin-1"), 500)
        if reason:
            detail["reason"] = _text(reason, 500)
        try:
            async with scope["app"].state.engine.begin() as conn:
                await audit.record(
                    conn, principal=_text(principal.name, 200) if principal else None,
                    role=principal.role if principal else None, method=scope["method"],
                    path=_text(scope["path"], 1000), status=status, detail=detail,
                    request_id=request_id)
        except Exception:
            log.exception("audit log: could not record %s %s (%s) -> %d", scope["method"],
                          scope["path"], request_id, status)

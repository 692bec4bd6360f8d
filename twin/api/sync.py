"""Writes answer only once every server process can see them (twin/core/versions.py).

A write through twin commits, then, before its response leaves, waits until the versions
listener of every process of the database has acknowledged a barrier sent after the commit:
so the client's next request, to whichever process, finds the new data versions in memory.
Job reads (``GET /jobs/{id}``) wait too: an upload publishes in a background job, and the
client learns of it by reading the job; once it reads "succeeded", every process has the
new version.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from twin.api.access import is_write


def _syncs(scope: Scope) -> bool:
    """Writes (the analyses' POSTs write nothing) and job reads."""
    return is_write(scope["method"], scope["path"]) or (
        scope["method"] == "GET" and scope["path"].startswith("/jobs/"))


class VersionsSyncMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _syncs(scope):
            await self.app(scope, receive, send)
            return
        versions = getattr(scope["app"].state, "layer_versions", None)

        async def synced_send(message: Message) -> None:
            if message["type"] == "http.response.start" and versions is not None:
                await versions.sync()
            await send(message)

        await self.app(scope, receive, synced_send)

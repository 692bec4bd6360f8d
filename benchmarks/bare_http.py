"""A bare HTTP/1.1 client for the benchmarks (GET only, keep-alive, one request at a time)."""

from __future__ import annotations

import asyncio


class HttpConnection:
    """A bare HTTP/1.1 keep-alive client on asyncio streams.

    httpx spends ~1.4 ms of CPU on each request, more than twin spends serving a cached
    tile; on a 2-core machine that client, not the servers, would set the warm figures.
    This one costs a few tens of microseconds, for both servers alike.
    """

    def __init__(self, host: str, port: int, accept_encoding: str):
        self.host, self.port = host, port
        self.head = (f"Host: {host}:{port}\r\nAccept-Encoding: {accept_encoding}\r\n"
                     "Connection: keep-alive\r\n\r\n").encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> tuple[int, bytes]:
        """Status and body (as sent: gzipped when the server gzipped)."""
        status, _, body = await self.request(path)
        return status, body

    async def request(self, path: str) -> tuple[int, dict[str, str], bytes]:
        """Status, headers (lower-case names) and body of ``GET path``."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(b"GET " + path.encode() + b" HTTP/1.1\r\n" + self.head)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = await self._chunked()
        else:
            body = b""
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, headers, body

    async def _chunked(self) -> bytes:
        parts = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None

"""A small Server-Sent Events client for tests: parses ``text/event-stream`` as the WHATWG
HTML standard's "interpreting an event stream" says, over an httpx streaming response.

Written here rather than taken from the server's library, so the tests read the stream the
way a browser's EventSource does: fields ``id``, ``event``, ``data`` (lines joined by
``\\n``), ``retry``; comment lines (``:``) ignored; an event dispatched at a blank line,
and only when it has data.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass(frozen=True)
class Event:
    id: str | None
    event: str
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


class EventStream:
    """``with EventStream(client, "/events/stream", headers=...) as stream:`` then
    ``stream.take(n, timeout)`` or ``stream.until(predicate, timeout)``.

    The server's keep-alive comments (set short in tests) wake the reader up, so a timeout
    is checked between lines without threads.
    """

    def __init__(self, client: httpx.Client, url: str, headers: dict | None = None,
                 params: dict | None = None):
        self._context = client.stream("GET", url, headers=headers, params=params)
        self.response: httpx.Response | None = None
        self.last_event_id: str | None = None
        self.retry_ms: int | None = None
        self._events: Iterator[Event | None] | None = None

    def __enter__(self) -> EventStream:
        self.response = self._context.__enter__()
        if self.response.status_code == 200:
            assert self.response.headers["content-type"].startswith("text/event-stream")
            self._events = self._parse(self.response.iter_lines())
        else:
            self.response.read()
        return self

    def __exit__(self, *exc) -> None:
        self._context.__exit__(*exc)

    def _parse(self, lines: Iterator[str]) -> Iterator[Event | None]:
        """Events, and None for every comment or field-less line (a chance to stop)."""
        event_type, data, event_id = "", [], self.last_event_id
        for line in lines:
            if line == "":
                if data:
                    yield Event(event_id, event_type or "message", "\n".join(data))
                event_type, data = "", []
                continue
            if line.startswith(":"):
                yield None
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event_type = value
            elif name == "data":
                data.append(value)
            elif name == "id" and "\0" not in value:
                event_id = self.last_event_id = value
            elif name == "retry" and value.isdigit():
                self.retry_ms = int(value)

    def until(self, done, timeout: float = 10.0) -> list[Event]:
        """Events until ``done(event)`` holds for one (included); AssertionError on timeout."""
        assert self._events is not None, "the stream did not open"
        got: list[Event] = []
        deadline = time.monotonic() + timeout
        for event in self._events:
            if event is not None:
                got.append(event)
                if done(event):
                    return got
            if time.monotonic() > deadline:
                break
        raise AssertionError(f"stream: no end within {timeout} s; got {len(got)} events")

    def take(self, n: int, timeout: float = 10.0) -> list[Event]:
        """The next ``n`` events."""
        if n == 0:
            return []
        count = 0

        def done(_: Event) -> bool:
            nonlocal count
            count += 1
            return count >= n

        return self.until(done, timeout)

    def quiet(self, seconds: float) -> list[Event]:
        """Every event within ``seconds`` (keep-alives must come more often than that)."""
        assert self._events is not None, "the stream did not open"
        got: list[Event] = []
        deadline = time.monotonic() + seconds
        for event in self._events:
            if event is not None:
                got.append(event)
            if time.monotonic() > deadline:
                return got
        return got

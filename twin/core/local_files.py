"""Where a layer's file lies on this node: the one question every reader of one asks.

An uploaded version's files (a COG, a 3D model) are kept in the database so that every twin
node can serve them; each node copies them into its own uploads folder on first use
(layers/blobs.py). Tiles and the API read files through ``local_path(layer)``. The floor
cannot import layers, so the app's upload service installs its resolver here when it starts,
for the event loop the app runs on: a server process runs one app, but the tests run several
apps in one process, each on an event loop of its own, over different folders and databases.
Code running in the app's worker threads (anyio.to_thread, where tiles are rendered) finds
the resolver of the loop that handed it the work.

Without a resolver (built-in layers, a process with no app, such as the CLI) the path
recorded in the layer is the file.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from weakref import WeakKeyDictionary

import anyio.from_thread

from twin.core.errors import NotFound
from twin.core.layer import Layer

Resolver = Callable[[Layer], Path]

_resolvers: WeakKeyDictionary[asyncio.AbstractEventLoop, Resolver] = WeakKeyDictionary()
_lock = threading.Lock()
_thread = threading.local()


def install(resolver: Resolver) -> None:
    """The running app's resolver (call on the app's event loop, e.g. in its lifespan)."""
    with _lock:
        _resolvers[asyncio.get_running_loop()] = resolver


def uninstall(resolver: Resolver) -> None:
    with _lock:
        for loop, installed in list(_resolvers.items()):
            if installed is resolver:
                del _resolvers[loop]


def stored_path(layer: Layer) -> Path:
    """The path the layer's row records (a built-in layer's file, or one on this machine)."""
    if not layer.file_path:
        raise NotFound(f"layer '{layer.id}' has no file")
    return Path(layer.file_path)


def local_path(layer: Layer) -> Path:
    """The layer's file on this node, fetched first if it is not here yet."""
    if layer.origin != "upload":
        return stored_path(layer)
    return _resolver()(layer)


def _resolver() -> Resolver:
    with _lock:
        installed = list(_resolvers.items())
    if not installed:
        return stored_path
    if len(installed) == 1:  # a server process: its one app
        return installed[0][1]
    loop = _loop()
    return next((resolver for owner, resolver in installed if owner is loop), stored_path)


def _loop() -> asyncio.AbstractEventLoop | None:
    """The event loop this code runs for: the running one, or the one whose anyio worker
    thread this is (asked once per thread: a worker serves one loop for its life)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        pass
    loop = getattr(_thread, "loop", None)
    if loop is None:
        try:
            loop = anyio.from_thread.run_sync(asyncio.get_running_loop)
        except RuntimeError:  # not a worker thread of an event loop
            return None
        _thread.loop = loop
    return loop

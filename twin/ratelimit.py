"""Per-caller rate limits: one token bucket per key (per client IP for anonymous callers).

A limit is one per server, not one per process: ``twin serve`` runs several worker processes
and a key's connections land on any of them. Two stores with one interface (``take``):

- ``SharedTokenBuckets``: a fixed table of bucket slots in a file in shared memory, which
  ``twin serve`` creates before it starts its workers (``create_table``) and removes when it
  stops; every worker maps it, and each update holds a lock on the slots it reads.
- ``TokenBuckets``: in one process's memory, for a single-process server (TWIN_WORKERS=1, the
  tests' in-thread server), and the fallback when the table cannot be used.

Neither needs the database, so limits keep working while it is down.
"""

from __future__ import annotations

import fcntl
import logging
import math
import mmap
import os
import re
import secrets
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import suppress
from hashlib import blake2b
from pathlib import Path

log = logging.getLogger(__name__)


def _spend(tokens: float, last: float, now: float, rate: float, burst: float
           ) -> tuple[float, float]:
    """Refills a bucket to ``now`` and takes one token: (tokens left, seconds to wait)."""
    tokens = min(burst, tokens + (now - last) * rate)
    if tokens >= 1:
        return tokens - 1, 0.0
    return tokens, (1 - tokens) / rate


class TokenBuckets:
    """``burst`` requests at once, refilled at ``rate`` per second, per key.

    Not thread-safe: the API calls it from the event loop only. The least recently used
    buckets beyond ``max_keys`` are dropped (a dropped bucket was idle, so nearly full).
    """

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000,
                 clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = burst
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float:
        """0 when the request may go ahead; else the seconds until it may (Retry-After)."""
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        tokens, last = self._buckets.pop(key, (float(self.burst), now))
        tokens, wait = _spend(tokens, last, now, self.rate, self.burst)
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return wait


# --- the shared table ------------------------------------------------------------------------
# A header, then slots of 32 bytes: the key's hash (0: a free slot), its tokens and the time
# they were counted (time.monotonic: CLOCK_MONOTONIC, one clock for every process of the
# machine). A key lives in one of PROBE slots from its home slot (linear probing without
# wrapping: the table has PROBE - 1 slots past the last home). Slots are never freed, so a
# lookup stops at the first free one; a full bucket is the same as no bucket, so a key that
# finds no free slot takes over a full one.
MAGIC = b"twinrl1\0"
HEADER = struct.Struct("<8sII16s")  # magic, home slots, probe length, hash key
HEADER_BYTES = 64
SLOT = struct.Struct("<Qdd")  # key hash, tokens, last update
SLOT_BYTES = 32
SLOTS = 65_536  # 2 MiB; pages are only allocated where keys land
PROBE = 8
TABLE_NAME = "twin-ratelimit-{pid}-{port}"
TABLE_PATTERN = re.compile(r"twin-ratelimit-(\d+)-\d+")


def table_bytes(slots: int, probe: int) -> int:
    return HEADER_BYTES + (slots + probe - 1) * SLOT_BYTES


def table_dirs(home: Path) -> list[Path]:
    """Where a table may go: memory (/dev/shm), else twin's home."""
    return [Path("/dev/shm"), home / "run"]


def create_table(home: Path, port: int, slots: int = SLOTS, probe: int = PROBE) -> Path | None:
    """Creates this server's empty table and returns its path; None (logged) when no
    directory takes it. Tables left by servers no longer running are removed first."""
    for directory in table_dirs(home):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            remove_stale_tables(directory)
            path = directory / TABLE_NAME.format(pid=os.getpid(), port=port)
            with suppress(FileNotFoundError):  # this pid's, from an earlier boot
                path.unlink()
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            log.info("rate-limit table: cannot create one in %s (%s)", directory, exc)
            continue
        try:
            os.ftruncate(fd, table_bytes(slots, probe))  # zeros: every slot free
            os.pwrite(fd, HEADER.pack(MAGIC, slots, probe, secrets.token_bytes(16)), 0)
        except OSError as exc:
            log.warning("rate-limit table %s: cannot write it (%s)", path, exc)
            remove_table(path)
            continue
        finally:
            os.close(fd)
        return path
    log.warning("rate-limit table: none could be created in %s",
                " or ".join(map(str, table_dirs(home))))
    return None


def remove_table(path: Path) -> None:
    with suppress(FileNotFoundError):
        path.unlink()


def remove_stale_tables(directory: Path) -> None:
    """A server killed outright (SIGKILL) leaves its table: remove those whose server is gone."""
    for path in directory.glob("twin-ratelimit-*"):
        match = TABLE_PATTERN.fullmatch(path.name)
        if match and not _alive(int(match.group(1))):
            with suppress(OSError):
                path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class SharedTokenBuckets:
    """``TokenBuckets`` over the table at ``path``, shared by every process that opens it.

    Each take locks the byte range of the key's PROBE slots (fcntl.lockf: a lock between
    processes; the kernel drops it if the process dies) and reads the clock under it, so the
    updates of all processes to one bucket are serialised in time order. fcntl locks belong
    to the process, not the thread, so a thread lock serialises this process's own callers.
    Keep one instance per process: closing any other descriptor of the file would drop the
    process's locks.

    A key that finds no slot (its PROBE slots all hold keys whose buckets are not full) gets
    an in-process bucket instead, logged once.
    """

    def __init__(self, path: Path, rate: float, burst: int,
                 clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = burst
        self.path = path
        self._clock = clock
        self._fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(self._fd).st_size
            if size < HEADER_BYTES:
                raise ValueError(f"{size} bytes, not a rate-limit table")
            self._table = mmap.mmap(self._fd, size)
            magic, self._slots, probe, self._hash_key = HEADER.unpack_from(self._table, 0)
            if magic != MAGIC or size != table_bytes(self._slots, probe):
                self._table.close()
                raise ValueError("not a rate-limit table of this twin version")
        except BaseException:
            os.close(self._fd)
            raise
        self._window = probe * SLOT_BYTES
        self._lock = threading.Lock()
        self._fallback = TokenBuckets(rate, burst, clock=clock)
        self._overflowed = False

    def take(self, key: str) -> float:
        """0 when the request may go ahead; else the seconds until it may (Retry-After)."""
        if self.rate <= 0:
            return 0.0
        digest = blake2b(key.encode(), digest_size=8, key=self._hash_key).digest()
        hashed = int.from_bytes(digest, "little") or 1  # 0 marks a free slot
        start = HEADER_BYTES + hashed % self._slots * SLOT_BYTES
        with self._lock:
            fcntl.lockf(self._fd, fcntl.LOCK_EX, self._window, start)
            try:
                wait = self._take_slot(hashed, start)
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, self._window, start)
            return self._take_fallback(key) if wait is None else wait

    def _take_slot(self, hashed: int, start: int) -> float | None:
        """Under the lock: the key's bucket among its slots, taken; None when it has none."""
        table, rate, burst = self._table, self.rate, self.burst
        now = self._clock()
        full = None
        for offset in range(start, start + self._window, SLOT_BYTES):
            slot_key, tokens, last = SLOT.unpack_from(table, offset)
            if slot_key == hashed:
                break
            if slot_key == 0:
                tokens, last = burst, now
                break
            if full is None and tokens + (now - last) * rate >= burst:
                full = offset
        else:
            if full is None:
                return None
            offset, tokens, last = full, burst, now
        tokens, wait = _spend(tokens, last, now, rate, burst)
        SLOT.pack_into(table, offset, hashed, tokens, now)
        return wait

    def _take_fallback(self, key: str) -> float:
        if not self._overflowed:
            self._overflowed = True
            log.warning("rate-limit table %s: no free slot for a key; keys without one are "
                        "limited per worker process until slots free up", self.path)
        return self._fallback.take(key)

    def close(self) -> None:
        self._table.close()
        os.close(self._fd)


def open_buckets(table: Path | None, rate: float, burst: int
                 ) -> TokenBuckets | SharedTokenBuckets:
    """The shared table's buckets when there is a table and it opens; else in-process ones
    (logged: then each worker process limits on its own)."""
    if table is None or rate <= 0:
        return TokenBuckets(rate, burst)
    try:
        return SharedTokenBuckets(table, rate, burst)
    except (OSError, ValueError) as exc:
        log.warning("rate-limit table %s: cannot use it (%s); this worker process keeps "
                    "its own buckets, so a key may get more than its limit", table, exc)
        return TokenBuckets(rate, burst)


def retry_after(wait_s: float) -> str:
    """Retry-After in whole seconds, never 0 (0 invites an immediate retry storm)."""
    return str(max(1, math.ceil(wait_s)))

"""Per-caller rate limits: one token bucket per key (per client IP for anonymous callers).

In process: twin runs as one server process, and a limit that needs no shared store keeps
working while the database is down. Several processes behind a balancer would each allow
the rate (say so when scaling out).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable


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
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return wait


def retry_after(wait_s: float) -> str:
    """Retry-After in whole seconds, never 0 (0 invites an immediate retry storm)."""
    return str(max(1, math.ceil(wait_s)))

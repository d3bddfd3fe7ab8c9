"""The per-key rate limit: a token bucket per API key, in memory the workers of one server share.

``stream-ml serve --workers N`` forks its workers after making the limiter, so every worker
draws from the same buckets: a key's limit is the one configured, whichever worker its calls
reach (a bucket per worker would let a key through N times as fast).

>>> limiter = RateLimiter(2.0, ["k"])
>>> [limiter.allow("k") == 0.0 for _ in range(3)]
[True, True, False]
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Sequence

ANONYMOUS = "anonymous"  # the one bucket of every call when the scorer runs without keys


class RateLimiter:
    """``rate`` calls a second per key, in bursts of up to one second's worth."""

    def __init__(self, rate: float, keys: Sequence[str]) -> None:
        self.rate = rate
        self._slot = {key: 2 * i for i, key in enumerate(dict.fromkeys([*keys, ANONYMOUS]))}
        now = time.monotonic()  # the same clock in every process of the machine
        shared = multiprocessing.RawArray("d", [rate, now] * len(self._slot))  # tokens, when
        self._buckets = memoryview(shared).cast("B").cast("d")  # an item in ~30 ns, a ctypes one ~100
        self._lock = multiprocessing.Lock()

    def allow(self, key: str) -> float:
        """0 if a call of ``key`` may go now, else the seconds until it may (a key not given at
        start has no bucket: the caller authenticates first)."""
        i = self._slot[key]
        buckets = self._buckets
        self._lock.acquire()  # not `with`: the lock's __exit__ is a Python call, its release is not
        try:
            now = time.monotonic()
            tokens = min(self.rate, buckets[i] + (now - buckets[i + 1]) * self.rate)
            buckets[i + 1] = now
            if tokens >= 1.0:
                buckets[i] = tokens - 1.0
                return 0.0
            buckets[i] = tokens
        finally:
            self._lock.release()
        return (1.0 - tokens) / self.rate

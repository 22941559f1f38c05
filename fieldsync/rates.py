"""Rate limits: a token bucket per connection (WebSocket messages) and per client address (the
token relay)."""

from __future__ import annotations

import math
import time
from collections import OrderedDict


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = time.monotonic()

    def take(self, count: int = 1) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < count:
            return False
        self.tokens -= count
        return True

    def wait(self, count: int = 1) -> int:
        """Whole seconds until `count` tokens are there again (at least 1)."""
        return max(1, math.ceil((count - self.tokens) / self.rate))


class PerKey:
    """A bucket per key (a client address), the least recently used forgotten beyond
    `max_keys`: a flood from many addresses costs bounded memory, and a forgotten key starts
    with a full bucket, as a new one would."""

    def __init__(self, rate: float, burst: float, max_keys: int = 10_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key: str) -> int:
        """0 when `key` may go on; else the seconds it should wait."""
        bucket = self._buckets.pop(key, None) or TokenBucket(self.rate, self.burst)
        self._buckets[key] = bucket
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return 0 if bucket.take() else bucket.wait()

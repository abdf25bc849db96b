"""Per-key rate limiting for log lines and node reports; bounded memory."""

from __future__ import annotations

from collections import OrderedDict


class RateLimiter:
    """At most one pass per key per interval; remembers a bounded number of keys."""

    def __init__(self, interval: float, size: int) -> None:
        self.interval, self.size = interval, size
        self._last: OrderedDict[str, float] = OrderedDict()

    def allow(self, key: str, now: float) -> bool:
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            return False
        self._last[key] = now
        self._last.move_to_end(key)
        while len(self._last) > self.size:
            self._last.popitem(last=False)
        return True


class TokenBucket:
    """Per-key token buckets: `burst` at once, then `rate` per second; bounded keys."""

    def __init__(self, rate: float, burst: float, size: int) -> None:
        self.rate, self.burst, self.size = rate, burst, size
        self._state: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, key: str, now: float) -> bool:
        tokens, last = self._state.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        self._state[key] = (tokens - 1.0 if allowed else tokens, now)
        self._state.move_to_end(key)
        while len(self._state) > self.size:
            self._state.popitem(last=False)
        return allowed

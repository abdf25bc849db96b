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

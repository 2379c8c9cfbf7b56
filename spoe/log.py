"""Log throttling: a dead peer or a flood of bad connections must not become one log line per event."""

from __future__ import annotations

import time
from collections.abc import Callable


class LogThrottle:
    """Allows one log event per key per `interval` seconds and counts what it held back, so the next
    line that gets through can say how many were suppressed."""

    def __init__(self, interval: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """None if this event should be suppressed; else how many were suppressed before it."""
        now = self._clock()
        if now < self._next.get(key, 0.0):
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        if len(self._next) > 10_000:
            self._next.clear()
        self._next[key] = now + self.interval
        return self._suppressed.pop(key, 0)

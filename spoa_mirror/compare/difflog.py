"""One JSON line per difference, for log pipelines: rate-limited, redacted like the examples.

A comparison's differences are written together when a token is available (`rate` per second,
bursts of one second's worth); comparisons over the rate are counted in `suppressed`, never queued.
The line goes to stdout (`path: "-"`) or is appended to a file (created 0600: it shows values).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import IO, Any

from .config import DiffLogConfig


class DiffLog:
    def __init__(self, config: DiffLogConfig, clock: Any = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._tokens = config.rate
        self._last = clock()
        self.written = 0
        self.suppressed = 0
        self._own = config.path != "-"
        if self._own:
            fd = os.open(config.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._stream: IO[str] = os.fdopen(fd, "a", buffering=1)
        else:
            self._stream = sys.stdout

    def take(self) -> bool:
        """A comparison with differences: may its lines be written now?"""
        now = self._clock()
        self._tokens = min(self.config.rate, self._tokens + (now - self._last) * self.config.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self.suppressed += 1
        return False

    def write(self, record: dict[str, Any]) -> None:
        try:
            self._stream.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
        except (OSError, ValueError):  # a full disk or a closed stdout loses the line, counted
            self.suppressed += 1
            return
        self.written += 1

    def close(self) -> None:
        if self._own:
            self._stream.close()

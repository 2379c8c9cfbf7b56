"""The event loop's pulse: a task on the SPOP loop that wakes every second, so that something
outside the loop can tell a loop that runs from one that is stuck.

Every ACK HAProxy waits for is written by that loop, so a loop blocked for seconds (a runaway
handler, a synchronous call that hangs) is an agent that is down while its process, its admin thread
and its sockets all look alive. Three things read the pulse:
- systemd's watchdog: each tick sends WATCHDOG=1 (or, in a worker, a byte to the supervisor), so a
  stuck loop stops the pings and systemd restarts the service;
- `/livez` (and `/healthz`) on the admin listener, which runs in its own thread: it fails once the
  last tick is older than `STALL_LIMIT`, so Kubernetes' liveness probe and Docker's HEALTHCHECK
  see the stuck loop;
- `spoa_mirror_event_loop_lag_seconds`: how late each tick woke, i.e. how long anything that became
  ready on the loop (an ACK included) waited for it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from .accounting import Histogram

TICK = 1.0  # seconds between ticks; a WATCHDOG_USEC below 2 s gets ticks at half its interval
STALL_LIMIT = 5.0  # seconds without a tick after which the loop counts as stuck
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Heartbeat:
    def __init__(self, interval: float = TICK, stall_limit: float = STALL_LIMIT) -> None:
        self.interval = interval
        self.stall_limit = stall_limit
        self.last_tick = time.monotonic()
        self.lag = Histogram(LAG_BUCKETS)
        self._on_tick: list[Callable[[], object]] = []
        self._task: asyncio.Task[None] | None = None

    def on_tick(self, callback: Callable[[], object]) -> None:
        """`callback` runs on the loop at every tick (and once at start)."""
        self._on_tick.append(callback)

    def start(self) -> None:
        self.last_tick = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="heartbeat")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def stalled_for(self) -> float:
        """Seconds since the last tick beyond the expected interval; readable from any thread."""
        return max(0.0, time.monotonic() - self.last_tick - self.interval)

    def alive(self) -> bool:
        return self.stalled_for() < self.stall_limit

    async def _run(self) -> None:
        self._tick()
        while True:
            before = time.monotonic()
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            self.lag.observe(max(0.0, now - before - self.interval))
            self.last_tick = now
            self._tick()

    def _tick(self) -> None:
        for callback in self._on_tick:
            callback()

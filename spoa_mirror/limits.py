"""Keeping a shadow's load bounded, and a dead shadow cheap.

Mirroring must never hurt production, so excess is dropped, never queued: a rate limiter that queued
would turn a slow shadow into memory growth in the agent. And a shadow that is down should cost
almost nothing per request, which is what the circuit breaker is for: while it is open, `allow()` is
a clock read and a comparison.

Neither class locks: the agent runs them on one event loop thread.

Configuration (`where` names the mapping, e.g. `targets[0].rate_limit`):

- rate limit: `requests_per_second` and/or `bytes_per_second` (at least one, both > 0; bytes are body
  bytes, and a bodiless request spends none), `burst_seconds` (default 1.0, > 0): how many seconds'
  worth of traffic may pass at once after a quiet spell (never less than one request).
- circuit breaker: `failure_threshold` (default 5, consecutive failures that open it), `backoff`
  (default 1.0 s, first open window), `max_backoff` (default 30.0 s, or `backoff` if larger; cap of the
  doubling window, at least `backoff`). Times are numbers of seconds.

The builders take a keyword-only `clock` (default `time.monotonic`) so tests can drive time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from pydantic import Field

from spoa_mirror.config_types import PositiveNumber, Section, int_between
from spoa_mirror.errors import ConfigError, check_spec_keys

Clock = Callable[[], float]
RateLimiter = Callable[[int], bool]

DEFAULT_BURST_SECONDS = 1.0
DEFAULT_FAILURE_THRESHOLD = 5
DEFAULT_BACKOFF = 1.0
DEFAULT_MAX_BACKOFF = 30.0


class TokenBucket:
    """`rate` tokens a second, holding at most `burst`, starting full.

    A take larger than the whole bucket would otherwise never pass (a 2 MB body against a 1 MB/s
    bucket), so a full bucket lets any single take through and goes into debt: the long-run rate is
    still `rate`, and the next takes wait until the debt is paid.

    `take` costs ~0.13 us on the 2-core development machine (Python 3.11)::

        .venv/bin/python -m timeit -s "from spoa_mirror.limits import TokenBucket; \
            b = TokenBucket(1e9, 1e9)" "b.take()"
    """

    __slots__ = ("_clock", "_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, clock: Clock = time.monotonic) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be positive, got {rate!r}")
        if not burst > 0:
            raise ValueError(f"burst must be positive, got {burst!r}")
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._tokens = self.burst
        self._last = clock()

    @property
    def tokens(self) -> float:
        """Tokens available now (negative while in debt)."""
        self.take(0.0)
        return self._tokens

    def take(self, amount: float = 1.0) -> bool:
        """Take `amount` tokens if there are enough (or the bucket is full); False takes nothing."""
        now = self._clock()
        burst = self.burst
        tokens = self._tokens + (now - self._last) * self.rate
        self._last = now
        if tokens >= burst:
            self._tokens = burst - amount
            return True
        if tokens >= amount:
            self._tokens = tokens - amount
            return True
        self._tokens = tokens
        return False

    def refund(self, amount: float = 1.0) -> None:
        """Give back a take whose request was not sent after all (another limit refused it), so one
        limit does not spend another's budget."""
        self._tokens = min(self.burst, self._tokens + amount)


def build_rate_limiter(spec: dict | None, where: str, *, clock: Clock = time.monotonic) -> RateLimiter | None:
    """`limiter(body_size) -> bool`: False means over a limit, and the mirror is dropped. A refused
    request consumes nothing from either bucket. None when there is no spec.

    ~0.32 us a call with both limits, ~0.16 us with one::

        .venv/bin/python -m timeit -s "from spoa_mirror.limits import build_rate_limiter; \
            f = build_rate_limiter({'requests_per_second': 1e9, 'bytes_per_second': 1e12}, 't')" "f(512)"
    """
    if spec is None:
        return None
    check_spec_keys(spec, where, ("requests_per_second", "bytes_per_second", "burst_seconds"))
    rps = spec.get("requests_per_second")
    bps = spec.get("bytes_per_second")
    if rps is None and bps is None:
        raise ConfigError(where, "needs requests_per_second or bytes_per_second (or both)")
    burst_seconds = _positive(spec.get("burst_seconds", DEFAULT_BURST_SECONDS), f"{where}.burst_seconds")

    if rps is not None:
        rps = _positive(rps, f"{where}.requests_per_second")
        # Under one request of burst, no request would ever pass: at 0.5/s, one every two seconds.
        requests = TokenBucket(rps, max(1.0, rps * burst_seconds), clock)
        take_request, refund_request = requests.take, requests.refund
        if bps is None:

            def requests_only(size: int) -> bool:
                return take_request()

            return requests_only

    bps = _positive(bps, f"{where}.bytes_per_second")
    take_bytes = TokenBucket(bps, bps * burst_seconds, clock).take
    if rps is None:

        def bytes_only(size: int) -> bool:
            return size <= 0 or take_bytes(size)

        return bytes_only

    def both(size: int) -> bool:
        if not take_request():
            return False
        if size <= 0 or take_bytes(size):
            return True
        refund_request()
        return False

    return both


class CircuitBreaker:
    """Stops sending to a shadow that keeps failing, and probes it with one request at a time.

    closed: everything is allowed; `failure_threshold` consecutive failures open it.
    open: nothing is allowed for the window (`backoff` seconds at first); once it has elapsed, the
    next `allow()` lets one probe through and the breaker is half_open.
    half_open: nothing else is allowed while the probe is in flight. Its success closes the breaker
    and resets the window; its failure reopens it with the window doubled, up to `max_backoff`. A probe
    that never reports is given up after `max_backoff` seconds and another is allowed, so a lost
    callback cannot shut a target off for good.

    Outcomes reported while open are of requests sent before it opened, and are ignored; in half_open
    the next outcome reported is taken as the probe's.

    `allow()` on an open breaker costs ~0.11 us on the 2-core development machine (Python 3.11;
    ~0.14 us of CPU by `time.process_time` over a million calls, and `test_limits` checks it stays
    under 5 us), so a dead shadow costs almost nothing; closed, it costs ~0.04 us::

        .venv/bin/python -m timeit -s "from spoa_mirror.limits import CircuitBreaker; \
            b = CircuitBreaker(1, 3600, 3600); b.record_failure()" "b.allow()"
    """

    __slots__ = ("_clock", "_failures", "_probe_started", "_reopen_at", "_state", "_window", "backoff",
                 "failure_threshold", "max_backoff", "on_change")  # fmt: skip

    def __init__(
        self, failure_threshold: int, backoff: float, max_backoff: float, clock: Clock = time.monotonic
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be at least 1, got {failure_threshold!r}")
        if not backoff > 0:
            raise ValueError(f"backoff must be positive, got {backoff!r}")
        if not max_backoff >= backoff:
            raise ValueError(f"max_backoff must be at least backoff ({backoff!r}), got {max_backoff!r}")
        self.failure_threshold = failure_threshold
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self._clock = clock
        self._state = "closed"
        self._failures = 0
        self._window = self.backoff
        self._reopen_at = 0.0
        self._probe_started = 0.0
        # Called with "open" when failures open a closed breaker and "closed" when a probe closes
        # it (not for each failed probe of an open one): one log event per outage and recovery.
        self.on_change: Callable[[str], None] | None = None

    @property
    def state(self) -> str:
        """ "closed", "open" or "half_open". An open breaker whose window has elapsed still says "open"
        until `allow()` sends the probe."""
        return self._state

    def allow(self) -> bool:
        state = self._state
        if state == "closed":
            return True
        now = self._clock()
        if state == "open":
            if now < self._reopen_at:
                return False
        elif now - self._probe_started < self.max_backoff:
            return False
        self._state = "half_open"
        self._probe_started = now
        return True

    def record_success(self) -> None:
        state = self._state
        if state == "closed":
            self._failures = 0
        elif state == "half_open":
            self._state = "closed"
            self._failures = 0
            self._window = self.backoff
            if self.on_change is not None:
                self.on_change("closed")

    def record_failure(self) -> None:
        state = self._state
        if state == "closed":
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._open(self.backoff)
                if self.on_change is not None:
                    self.on_change("open")
        elif state == "half_open":
            self._open(min(self._window * 2, self.max_backoff))

    def _open(self, window: float) -> None:
        self._state = "open"
        self._window = window
        self._reopen_at = self._clock() + window


def build_circuit_breaker(spec: dict | None, where: str, *, clock: Clock = time.monotonic) -> CircuitBreaker:
    """A breaker for one target; `None` gets the defaults, since every target should have one."""
    if spec is None:
        spec = {}
    check_spec_keys(spec, where, ("failure_threshold", "backoff", "max_backoff"))
    threshold = spec.get("failure_threshold", DEFAULT_FAILURE_THRESHOLD)
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ConfigError(
            f"{where}.failure_threshold", f"must be a whole number, 1 or more, got {threshold!r}"
        )
    backoff = _positive(spec.get("backoff", DEFAULT_BACKOFF), f"{where}.backoff")
    max_backoff = _positive(
        spec.get("max_backoff", max(DEFAULT_MAX_BACKOFF, backoff)), f"{where}.max_backoff"
    )
    if max_backoff < backoff:
        raise ConfigError(
            f"{where}.max_backoff", f"must be at least backoff ({backoff:g}), got {max_backoff:g}"
        )
    return CircuitBreaker(threshold, backoff, max_backoff, clock)


def _positive(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(key, f"must be a positive number, got {value!r}")
    if value <= 0:
        raise ConfigError(key, f"must be positive, got {value!r}")
    return float(value)


class RateLimitSpec(Section):
    """Excess over the rate is dropped, never queued: at least one of the two rates."""

    requests_per_second: PositiveNumber | None = Field(
        None, description="requests mirrored per second at most"
    )
    bytes_per_second: PositiveNumber | None = Field(
        None, description="body bytes mirrored per second at most"
    )
    burst_seconds: PositiveNumber = Field(
        DEFAULT_BURST_SECONDS,
        description="seconds' worth of traffic that may pass at once after a quiet spell",
    )


class CircuitBreakerSpec(Section):
    """A shadow that keeps failing is left alone for a growing window."""

    failure_threshold: int_between(1, 1_000_000) = Field(
        DEFAULT_FAILURE_THRESHOLD, description="consecutive failures that open the breaker"
    )
    backoff: PositiveNumber = Field(DEFAULT_BACKOFF, description="first open window, in seconds")
    max_backoff: PositiveNumber = Field(
        DEFAULT_MAX_BACKOFF, description="cap of the doubling window, in seconds (at least backoff)"
    )

"""Token buckets and the circuit breaker, driven by a fake clock so time is exact."""

from __future__ import annotations

import pytest

from spoa_mirror.errors import ConfigError
from spoa_mirror.limits import CircuitBreaker, TokenBucket, build_circuit_breaker, build_rate_limiter


class CountingClock:
    """A frozen clock that counts how often it is read."""

    def __init__(self) -> None:
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return 1000.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# Token bucket


def test_bucket_starts_full_then_refills_at_rate_up_to_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock)
    assert [bucket.take() for _ in range(6)] == [True] * 5 + [False]
    clock.advance(0.25)  # 2.5 tokens
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    clock.advance(60)
    assert bucket.tokens == 5
    assert sum(bucket.take() for _ in range(10)) == 5


def test_refused_take_takes_nothing() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1, burst=3, clock=clock)
    assert bucket.take(2)
    assert not bucket.take(2)
    assert bucket.tokens == 1
    assert bucket.take(1)


def test_take_larger_than_burst_passes_only_from_full_and_goes_into_debt() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=100, burst=100, clock=clock)
    assert bucket.take(250)
    assert bucket.tokens == -150
    assert not bucket.take(1)
    clock.advance(1.5)  # debt paid
    assert not bucket.take(250)  # empty, not full
    clock.advance(1.0)
    assert bucket.take(250)


def test_long_run_rate_holds() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=50, burst=10, clock=clock)
    passed = 0
    for _ in range(10_000):  # 10 s of offered load at 1000/s
        clock.advance(0.001)
        passed += bucket.take()
    assert 500 <= passed <= 511  # rate * 10 s, plus at most the burst


@pytest.mark.parametrize(
    ("rate", "burst", "message"),
    [(0, 1, "rate must be positive, got 0"), (-1, 1, "rate must be positive, got -1"),
     (1, 0, "burst must be positive, got 0")],
)  # fmt: skip
def test_bucket_rejects_non_positive(rate: float, burst: float, message: str) -> None:
    with pytest.raises(ValueError) as info:
        TokenBucket(rate, burst)
    assert str(info.value) == message


# Rate limiter


def test_no_spec_no_limiter() -> None:
    assert build_rate_limiter(None, "t") is None


def test_requests_per_second_with_burst_seconds() -> None:
    clock = FakeClock()
    limit = build_rate_limiter({"requests_per_second": 10, "burst_seconds": 2}, "t", clock=clock)
    assert limit is not None
    assert sum(limit(100) for _ in range(50)) == 20
    clock.advance(0.5)
    assert sum(limit(100) for _ in range(50)) == 5


def test_slow_rate_still_lets_one_request_through() -> None:
    clock = FakeClock()
    limit = build_rate_limiter({"requests_per_second": 0.5}, "t", clock=clock)
    assert limit is not None
    assert [limit(0), limit(0)] == [True, False]
    clock.advance(2)
    assert limit(0)


def test_bytes_per_second_counts_body_bytes() -> None:
    clock = FakeClock()
    limit = build_rate_limiter({"bytes_per_second": 1000}, "t", clock=clock)
    assert limit is not None
    assert [limit(400), limit(400), limit(400)] == [True, True, False]
    assert limit(0)  # a bodiless request spends no byte budget
    clock.advance(0.4)
    assert limit(400)


@pytest.mark.parametrize(
    "spec", [{"bytes_per_second": 10}, {"bytes_per_second": 10, "requests_per_second": 100}]
)
def test_one_body_byte_is_charged_and_none_passes_even_in_debt(spec: dict[str, float]) -> None:
    """The byte budget counts every body byte, and a bodiless request needs none of it, even while
    a large body has put the bucket in debt."""
    limit = build_rate_limiter(spec, "t", clock=FakeClock())
    assert limit is not None
    assert limit(10)  # the whole burst
    assert not limit(1)
    assert limit(0)
    limit = build_rate_limiter(spec, "t", clock=FakeClock())
    assert limit is not None
    assert limit(500)  # from a full bucket, any body passes and leaves a debt
    assert not limit(1)
    assert limit(0)


def test_over_either_limit_drops_and_spends_nothing_from_the_other() -> None:
    clock = FakeClock()
    limit = build_rate_limiter({"requests_per_second": 3, "bytes_per_second": 1000}, "t", clock=clock)
    assert limit is not None
    assert limit(900)
    assert not limit(900)  # bytes refuse: the request token is given back
    assert limit(50)
    assert limit(50)
    assert not limit(0)  # now the request budget is spent


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({}, "t: needs requests_per_second or bytes_per_second"),
        ({"burst_seconds": 2}, "t: needs requests_per_second or bytes_per_second"),
        ({"requests_per_second": 0}, "t.requests_per_second: must be positive, got 0"),
        ({"requests_per_second": -5}, "t.requests_per_second: must be positive, got -5"),
        ({"bytes_per_second": "1MB"}, "t.bytes_per_second: must be a positive number, got '1MB'"),
        ({"bytes_per_second": float("inf")}, "t.bytes_per_second: must be a positive number"),
        ({"requests_per_second": True}, "t.requests_per_second: must be a positive number, got True"),
        ({"requests_per_second": 1, "burst_seconds": 0}, "t.burst_seconds: must be positive, got 0"),
        ({"requests_per_second": 1, "rps": 2}, "t.rps: unknown key"),
        ([1], "t: must be a mapping"),
    ],
)
def test_rate_limit_config_errors(spec: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_rate_limiter(spec, "t")  # type: ignore[arg-type]
    assert str(info.value).startswith(message)


# Circuit breaker


def open_breaker(
    clock: FakeClock, threshold: int = 3, backoff: float = 1.0, max_backoff: float = 8.0
) -> CircuitBreaker:
    breaker = CircuitBreaker(threshold, backoff, max_backoff, clock)
    for _ in range(threshold):
        breaker.record_failure()
    assert breaker.state == "open"
    return breaker


def test_opens_after_consecutive_failures_only() -> None:
    breaker = CircuitBreaker(3, 1.0, 8.0, FakeClock())
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # resets the run
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == "closed" and breaker.allow()
    breaker.record_failure()
    assert breaker.state == "open"
    assert not breaker.allow()


def test_one_probe_after_the_window_then_closes_on_success() -> None:
    clock = FakeClock()
    breaker = open_breaker(clock)
    clock.advance(0.999)
    assert not breaker.allow()
    clock.advance(0.001)
    assert breaker.allow()
    assert breaker.state == "half_open"
    assert not breaker.allow()  # only one probe in flight
    breaker.record_success()
    assert breaker.state == "closed"
    assert all(breaker.allow() for _ in range(10))


def test_on_change_reports_each_transition_by_state_name() -> None:
    """The mirror logs `circuit.opened` as a warning on "open" and `circuit.closed` otherwise: the
    names are the interface. A failed probe reopens without a second report."""
    clock = FakeClock()
    changes: list[str] = []
    breaker = CircuitBreaker(1, 1.0, 8.0, clock)
    breaker.on_change = changes.append
    breaker.record_failure()
    assert changes == ["open"]
    clock.advance(1.0)
    assert breaker.allow()
    breaker.record_failure()
    clock.advance(2.0)
    assert breaker.allow()
    breaker.record_success()
    assert changes == ["open", "closed"]


def test_failed_probes_double_the_window_up_to_max() -> None:
    clock = FakeClock()
    breaker = open_breaker(clock)
    windows = []
    for _ in range(6):
        waited = 0.0
        while not breaker.allow():
            clock.advance(0.5)
            waited += 0.5
        windows.append(waited)
        breaker.record_failure()
        assert breaker.state == "open"
    assert windows == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_success_resets_the_window() -> None:
    clock = FakeClock()
    breaker = open_breaker(clock, threshold=1)
    clock.advance(1)
    assert breaker.allow()
    breaker.record_failure()  # window now 2 s
    clock.advance(2)
    assert breaker.allow()
    breaker.record_success()
    breaker.record_failure()  # threshold 1: open again, with the first window
    clock.advance(1)
    assert breaker.allow()


def test_outcomes_while_open_are_ignored() -> None:
    clock = FakeClock()
    breaker = open_breaker(clock)
    breaker.record_success()  # a straggler sent before the breaker opened
    assert breaker.state == "open"
    breaker.record_failure()
    clock.advance(1)
    assert breaker.allow()  # the window was not extended


def test_a_lost_probe_is_given_up_after_max_backoff() -> None:
    clock = FakeClock()
    breaker = open_breaker(clock, max_backoff=8.0)
    clock.advance(1)
    assert breaker.allow()
    clock.advance(7.9)
    assert not breaker.allow()
    clock.advance(0.1)
    assert breaker.allow()
    assert breaker.state == "half_open"


def test_allow_on_an_open_breaker_is_one_clock_read_and_changes_nothing() -> None:
    """A dead shadow must cost almost nothing per request: while the breaker is open, `allow()` reads
    the clock once and refuses, leaving every field as it was (its ~0.1 us is measured by the timeit
    command in limits.py's docstring, not asserted here)."""
    clock = CountingClock()
    breaker = CircuitBreaker(1, 3600, 3600, clock)
    breaker.record_failure()
    before = {name: getattr(breaker, name) for name in CircuitBreaker.__slots__}
    reads = clock.reads
    assert not any(breaker.allow() for _ in range(100))
    assert clock.reads - reads == 100
    assert {name: getattr(breaker, name) for name in CircuitBreaker.__slots__} == before


def test_a_success_between_failures_restarts_the_count() -> None:
    breaker = CircuitBreaker(2, 1.0, 8.0, FakeClock())
    for _ in range(3):
        breaker.record_failure()
        breaker.record_success()
    assert breaker.state == "closed"
    breaker.record_failure()
    assert breaker.state == "closed"
    breaker.record_failure()
    assert breaker.state == "open"


def test_a_successful_probe_starts_the_failure_count_afresh() -> None:
    clock = FakeClock()
    breaker = open_breaker(clock, threshold=2)
    clock.advance(1.0)
    assert breaker.allow() and breaker.state == "half_open"
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state == "closed"
    breaker.record_failure()
    assert breaker.state == "open"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 1.0, 1.0), "failure_threshold must be at least 1, got 0"),
        ((1, 0.0, 1.0), "backoff must be positive, got 0.0"),
        ((1, -1.0, 1.0), "backoff must be positive, got -1.0"),
        ((1, 2.0, 1.0), "max_backoff must be at least backoff (2.0), got 1.0"),
    ],
)
def test_breaker_rejects_bad_arguments_saying_which(args: tuple[int, float, float], message: str) -> None:
    with pytest.raises(ValueError) as info:
        CircuitBreaker(*args)
    assert str(info.value) == message


def test_build_circuit_breaker_defaults() -> None:
    breaker = build_circuit_breaker(None, "t")
    assert (breaker.failure_threshold, breaker.backoff, breaker.max_backoff) == (5, 1.0, 30.0)
    assert breaker.state == "closed"
    assert build_circuit_breaker({"backoff": 60}, "t").max_backoff == 60.0


def test_build_circuit_breaker_uses_the_spec_and_clock() -> None:
    clock = FakeClock()
    breaker = build_circuit_breaker(
        {"failure_threshold": 2, "backoff": 0.5, "max_backoff": 4}, "t", clock=clock
    )
    breaker.record_failure()
    breaker.record_failure()
    assert not breaker.allow()
    clock.advance(0.5)
    assert breaker.allow()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"failure_threshold": 0}, "t.failure_threshold: must be a whole number, 1 or more, got 0"),
        ({"failure_threshold": 2.5}, "t.failure_threshold: must be a whole number, 1 or more, got 2.5"),
        ({"backoff": 0}, "t.backoff: must be positive, got 0"),
        ({"backoff": "1s"}, "t.backoff: must be a positive number, got '1s'"),
        ({"backoff": 5, "max_backoff": 2}, "t.max_backoff: must be at least backoff (5), got 2"),
        ({"max_backoff": "2m"}, "t.max_backoff: must be a positive number, got '2m'"),
        ({"threshold": 3}, "t.threshold: unknown key"),
        ("on", "t: must be a mapping"),
    ],
)
def test_circuit_breaker_config_errors(spec: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_circuit_breaker(spec, "t")  # type: ignore[arg-type]
    assert str(info.value).startswith(message)

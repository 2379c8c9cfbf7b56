"""Small bounded statistics for the comparator: latency percentiles and confidence intervals."""

from __future__ import annotations

import math

_BASE = 1e-5  # 10 µs: the first bucket's upper bound
_GROWTH = 1.04  # each bucket 4% wider than the one before: percentiles within 4%
_LOG_GROWTH = math.log(_GROWTH)
_LAST = 440  # 1e-5 * 1.04**440 ≈ 320 s: everything slower shares the last bucket


class LogHistogram:
    """Latencies in log-spaced buckets, kept sparse: percentiles within 4% in a few hundred bytes,
    however many observations (a sample list would grow, a reservoir would forget the tail)."""

    __slots__ = ("buckets", "count", "total")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        index = 0 if seconds <= _BASE else min(_LAST, math.ceil(math.log(seconds / _BASE) / _LOG_GROWTH))
        self.buckets[index] = self.buckets.get(index, 0) + 1
        self.count += 1
        self.total += seconds

    def quantile(self, q: float) -> float | None:
        """The upper bound of the bucket holding the q-th quantile; None without observations."""
        if not self.count:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                return _BASE * _GROWTH**index
        return _BASE * _GROWTH**_LAST  # unreachable: the counts add up to count


def wilson(successes: int, trials: int, z: float = 2.576) -> tuple[float, float]:
    """The Wilson score interval of a proportion (99% by default): honest with few trials and with
    rates near 0 or 1, where the normal approximation says nonsense."""
    if trials <= 0:
        return 0.0, 1.0
    p = min(1.0, max(0.0, successes / trials))
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    spread = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - spread), min(1.0, centre + spread)


def clearly_more(a: int, n_a: int, b: int, n_b: int, margin: float) -> bool:
    """Rate a/n_a exceeds b/n_b by more than `margin`, and their 99% intervals do not overlap."""
    if n_a <= 0:
        return False
    rate_a, rate_b = a / n_a, (b / n_b if n_b > 0 else 0.0)
    return rate_a - rate_b > margin and wilson(a, n_a)[0] > wilson(b, n_b)[1]

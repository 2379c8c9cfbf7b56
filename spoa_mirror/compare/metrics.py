"""The comparator's Prometheus families, built from the engine's plain counters at scrape time (wrapped
in metrics.OnLoop, so a scrape reads them on the loop that writes them).

    spoa_mirror_compare_requests_sent_total{target}                 each ends with one outcome:
    spoa_mirror_compare_comparisons_total{target, endpoint, outcome}  every outcome, compared or not
    spoa_mirror_compare_pending{target}                             sent = sum(comparisons) + pending
    spoa_mirror_compare_differences_total{target, endpoint, kind}
    spoa_mirror_compare_errors_total{target, endpoint, side}       5xx answers among compared pairs
    spoa_mirror_compare_latency_seconds{target, endpoint, side}    histogram; side: primary or shadow
    spoa_mirror_compare_examples_bytes, spoa_mirror_compare_diff_log_lines_total{result}

Series are bounded: endpoints per target by `compare.endpoints.max` (then `other`), outcomes and
kinds by the engine's fixed lists. The goals' PromQL (goals.py) is written over these. The three
account families come from one pass on the loop, so the invariant holds within every scrape.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ..metrics import OnLoop
from .diff import KINDS
from .engine import OUTCOMES, SIDES, CompareEngine


class CompareCollector(Collector):
    """The families, built on `loop` (metrics.OnLoop); nothing at all, and no trip to the loop, while
    no comparison is configured. Built on the loop's thread."""

    def __init__(self, engine: Callable[[], CompareEngine | None], loop: asyncio.AbstractEventLoop) -> None:
        self._engine = engine
        self._on_loop = OnLoop(_Families(engine), loop)

    def collect(self) -> Iterator[Metric]:
        if self._engine() is not None:
            yield from self._on_loop.collect()


class _Families(Collector):
    def __init__(self, engine: Callable[[], CompareEngine | None]) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self._engine()
        if engine is None:
            return
        sent = CounterMetricFamily(
            "spoa_mirror_compare_requests_sent",
            "Requests a compared target sent; compare_requests_sent = sum(compare_comparisons) + "
            "compare_pending",
            labels=["target"],
        )
        comparisons = CounterMetricFamily(
            "spoa_mirror_compare_comparisons",
            "Compared target's requests by outcome: compared (identical, different = a regression, "
            "noise_only) or not (primary_missing, shadow_failed, too_large, table_full, shutdown)",
            labels=["target", "endpoint", "outcome"],
        )
        pending = GaugeMetricFamily(
            "spoa_mirror_compare_pending",
            "Compared target's requests waiting in the pairing table for the shadow's or the primary's "
            "response",
            labels=["target"],
        )
        for target, requests, waiting in engine.accounts():
            sent.add_metric([target], requests)
            pending.add_metric([target], waiting)
        differences = CounterMetricFamily(
            "spoa_mirror_compare_differences",
            "Differences found, by kind (one comparison may find several)",
            labels=["target", "endpoint", "kind"],
        )
        errors = CounterMetricFamily(
            "spoa_mirror_compare_errors",
            "5xx answers among the compared pairs, by side (primary or shadow)",
            labels=["target", "endpoint", "side"],
        )
        latency = HistogramMetricFamily(
            "spoa_mirror_compare_latency_seconds",
            "Response time of the compared pairs: primary (HAProxy's request to response message) and shadow",
            labels=["target", "endpoint", "side"],
        )
        for target, name, endpoint in engine.series():
            for outcome in OUTCOMES:
                comparisons.add_metric([target, name, outcome], endpoint.outcomes[outcome])
            for kind in KINDS:
                if kind in endpoint.kinds:
                    differences.add_metric([target, name, kind], endpoint.kinds[kind])
            for side in SIDES:
                errors.add_metric([target, name, side], endpoint.errors[side])
                histogram = endpoint.prom_latency[side]
                latency.add_metric([target, name, side], histogram.cumulative(), histogram.total)
        yield from (sent, comparisons, pending, differences, errors, latency)
        examples = GaugeMetricFamily(
            "spoa_mirror_compare_examples_bytes",
            "Bytes held by the report's example pairs (compare.examples.budget)",
        )
        examples.add_metric([], engine.example_bytes)
        yield examples
        log = engine.diff_log
        if log is not None:
            lines = CounterMetricFamily(
                "spoa_mirror_compare_diff_log_lines",
                "Diff log lines written, and comparisons not logged over the rate (suppressed)",
                labels=["result"],
            )
            lines.add_metric(["written"], log.written)
            lines.add_metric(["suppressed"], log.suppressed)
            yield lines

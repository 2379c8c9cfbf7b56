"""Prometheus exposition: a custom collector that reads the plain counters at scrape time.

The hot path only bumps ints (see accounting.py for the figures); the collector turns them into
`spoa_mirror_*` families when Prometheus asks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from spoe import AgentStats

from .accounting import MessageStats, TargetStats


class MirrorCollector(Collector):
    def __init__(
        self,
        agent_stats: Callable[[], AgentStats],
        messages: Callable[[], MessageStats],
        targets: Callable[[], dict[str, TargetStats]],
        queue_depth: Callable[[], dict[str, int]],
        memory: Callable[[], tuple[int, int, dict[str, int]]] | None = None,
    ) -> None:
        self._agent_stats = agent_stats
        self._messages = messages
        self._targets = targets
        self._queue_depth = queue_depth
        self._memory = memory

    def collect(self) -> Iterator[Metric]:
        yield from self._spop()
        yield from self._mirror()

    def _spop(self) -> Iterator[Metric]:
        stats = self._agent_stats()
        open_ = GaugeMetricFamily("spoa_mirror_spop_connections_open", "Open SPOP connections from HAProxy")
        open_.add_metric([], stats.connections_open)
        yield open_
        total = CounterMetricFamily("spoa_mirror_spop_connections", "SPOP connections accepted")
        total.add_metric([], stats.connections_total)
        yield total
        refused = CounterMetricFamily(
            "spoa_mirror_spop_connections_refused", "SPOP connections refused (limit, allowlist, stopping)"
        )
        refused.add_metric([], stats.connections_refused)
        yield refused
        frames = CounterMetricFamily("spoa_mirror_spop_frames", "SPOP frames handled", labels=["type"])
        frames.add_metric(["notify"], stats.notifies)
        frames.add_metric(["ack"], stats.acks)
        frames.add_metric(["aborted"], stats.aborted)
        yield frames
        healthchecks = CounterMetricFamily("spoa_mirror_spop_healthchecks", "SPOP health-check HELLOs")
        healthchecks.add_metric([], stats.healthchecks)
        yield healthchecks
        closed = CounterMetricFamily(
            "spoa_mirror_spop_closed",
            "SPOP connections closed, by status (non-zero statuses are frame errors)",
            labels=["status"],
        )
        for status, count in sorted(stats.closed_by_status.items()):
            closed.add_metric([status.lower()], count)
        yield closed
        errors = CounterMetricFamily("spoa_mirror_handler_errors", "Exceptions raised by message handlers")
        errors.add_metric([], stats.handler_errors)
        yield errors

    def _mirror(self) -> Iterator[Metric]:
        messages = self._messages()
        family = CounterMetricFamily(
            "spoa_mirror_messages", "SPOP messages seen by the mirror handler", labels=["result", "reason"]
        )
        family.add_metric(["mirrored", ""], messages.mirrored)
        family.add_metric(["not_mirror", ""], messages.not_mirror)
        for reason, count in sorted(messages.invalid.items()):
            family.add_metric(["invalid", reason], count)
        yield family

        targets = self._targets()
        received = CounterMetricFamily(
            "spoa_mirror_requests_received", "Mirror requests offered to a target", labels=["target"]
        )
        outcomes = CounterMetricFamily(
            "spoa_mirror_requests",
            "Mirror requests by final outcome; received = sum(outcomes) + in_flight",
            labels=["target", "outcome"],
        )
        in_flight = GaugeMetricFamily(
            "spoa_mirror_in_flight", "Mirror requests queued or being sent", labels=["target"]
        )
        redactions = CounterMetricFamily(
            "spoa_mirror_redactions", "Redactions applied, by rule", labels=["target", "rule"]
        )
        truncated = CounterMetricFamily(
            "spoa_mirror_truncated_sent", "Truncated bodies sent with the marker header", labels=["target"]
        )
        latency = HistogramMetricFamily(
            "spoa_mirror_shadow_latency_seconds", "Shadow response time", labels=["target"]
        )
        for name, stats in sorted(targets.items()):
            received.add_metric([name], stats.received)
            for outcome, count in stats.outcomes.items():
                outcomes.add_metric([name, outcome], count)
            in_flight.add_metric([name], stats.pending)
            for rule, count in sorted(stats.redactions.items()):
                redactions.add_metric([name, rule], count)
            truncated.add_metric([name], stats.truncated_sent)
            latency.add_metric([name], stats.latency.cumulative(), stats.latency.total)
        yield from (received, outcomes, in_flight, redactions, truncated, latency)

        depth = GaugeMetricFamily(
            "spoa_mirror_queue_depth", "Requests waiting in a target's queue", labels=["target"]
        )
        for name, count in sorted(self._queue_depth().items()):
            depth.add_metric([name], count)
        yield depth

        if self._memory is not None:
            used, limit, per_target = self._memory()
            held = GaugeMetricFamily(
                "spoa_mirror_memory_held_bytes",
                "Bytes of mirror requests held (queued or being sent), per target",
                labels=["target"],
            )
            for name, count in sorted(per_target.items()):
                held.add_metric([name], count)
            yield held
            agent = GaugeMetricFamily(
                "spoa_mirror_memory_budget_used_bytes", "Bytes of mirror requests held by the whole agent"
            )
            agent.add_metric([], used)
            yield agent
            budget = GaugeMetricFamily("spoa_mirror_memory_budget_bytes", "The agent's memory_budget")
            budget.add_metric([], limit)
            yield budget


def build_registry(collector: MirrorCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry

"""Prometheus exposition: a custom collector that reads the plain counters at scrape time.

The hot path only bumps ints (see accounting.py for the figures); the collector turns them into
`spoa_mirror_*` families when Prometheus asks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import platform
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import PLATFORM_COLLECTOR, PROCESS_COLLECTOR
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from spoe import AgentStats

from . import __version__
from .accounting import MessageStats, TargetStats
from .heartbeat import Heartbeat

CIRCUIT_STATES = ("closed", "open", "half_open")


@dataclass
class ReloadStats:
    """SIGHUP reloads by result, and when the config running now was loaded (start or reload)."""

    last_success: float
    success: int = 0
    failure: int = 0


class MirrorCollector(Collector):
    def __init__(
        self,
        agent_stats: Callable[[], AgentStats],
        messages: Callable[[], MessageStats],
        targets: Callable[[], dict[str, TargetStats]],
        queue_depth: Callable[[], dict[str, int]],
        circuits: Callable[[], dict[str, str]] = dict,
        reloads: Callable[[], ReloadStats | None] = lambda: None,
        memory: Callable[[], tuple[int, int, dict[str, int]]] | None = None,
    ) -> None:
        self._agent_stats = agent_stats
        self._messages = messages
        self._targets = targets
        self._queue_depth = queue_depth
        self._circuits = circuits
        self._reloads = reloads
        self._memory = memory

    def collect(self) -> Iterator[Metric]:
        yield build_info()
        yield from self._spop()
        yield from self._mirror()
        yield from self._lifecycle()

    def _lifecycle(self) -> Iterator[Metric]:
        circuit = GaugeMetricFamily(
            "spoa_mirror_circuit_breaker_state",
            "1 for each target's circuit breaker state (closed, open, half_open), 0 for the others",
            labels=["target", "state"],
        )
        for name, state in sorted(self._circuits().items()):
            for candidate in CIRCUIT_STATES:
                circuit.add_metric([name, candidate], 1.0 if state == candidate else 0.0)
        yield circuit
        reloads = self._reloads()
        if reloads is None:
            return
        count = CounterMetricFamily(
            "spoa_mirror_config_reloads", "Configuration reloads (SIGHUP), by result", labels=["result"]
        )
        count.add_metric(["success"], reloads.success)
        count.add_metric(["failure"], reloads.failure)
        yield count
        last = GaugeMetricFamily(
            "spoa_mirror_config_last_reload_success_timestamp_seconds",
            "When the configuration running now was loaded (at start or by the last good reload)",
        )
        last.add_metric([], reloads.last_success)
        yield last

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
        evicted = CounterMetricFamily(
            "spoa_mirror_spop_connections_evicted",
            "SPOP connections closed at max_connections to give their slot to a new one",
        )
        evicted.add_metric([], stats.connections_evicted)
        yield evicted
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
        family.add_metric(["mirrored", "none"], messages.mirrored)
        family.add_metric(["not_mirror", "none"], messages.not_mirror)
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
        sent_bytes = CounterMetricFamily(
            "spoa_mirror_sent_bytes",
            "Bytes of mirrored requests handed to a target's connections (head and body)",
            labels=["target"],
        )
        grpc = CounterMetricFamily(
            "spoa_mirror_grpc_responses",
            "gRPC responses from the shadow by grpc-status (sent_* outcomes; missing: none sent)",
            labels=["target", "code"],
        )
        resent = CounterMetricFamily(
            "spoa_mirror_pipeline_resent",
            "Pipelined requests sent again because the shadow's Connection: close response ended the "
            "pipeline ahead of them (not processed, RFC 9112 9.6); each still ends with one outcome",
            labels=["target"],
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
            sent_bytes.add_metric([name], stats.bytes_sent)
            resent.add_metric([name], stats.resent)
            for code, count in sorted(stats.grpc_status.items()):
                grpc.add_metric([name, code], count)
            latency.add_metric([name], stats.latency.cumulative(), stats.latency.total)
        yield from (received, outcomes, in_flight, redactions, truncated, sent_bytes, resent, grpc, latency)
        yield from _pairing(messages)
        yield from _capture(targets)

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


def _capture(targets: dict[str, TargetStats]) -> Iterator[Metric]:
    """Capture targets' files and recorded responses (their requests are in spoa_mirror_requests)."""
    capturing = {name: stats.capture for name, stats in sorted(targets.items()) if stats.capture is not None}
    if not capturing:
        return
    files = CounterMetricFamily(
        "spoa_mirror_capture_files",
        "Capture files rotated, removed for max_total_size, or left uncompressed (compress_failed)",
        labels=["target", "event"],
    )
    data = CounterMetricFamily(
        "spoa_mirror_capture_bytes",
        "Bytes written to capture files, and removed with them",
        labels=["target", "event"],
    )
    responses = CounterMetricFamily(
        "spoa_mirror_capture_responses", "The primary's responses for capture.responses, by result",
        labels=["target", "result"],
    )  # fmt: skip
    for name, stats in capturing.items():
        files.add_metric([name, "rotated"], stats.files_rotated)
        files.add_metric([name, "removed"], stats.files_removed)
        files.add_metric([name, "compress_failed"], stats.compress_errors)
        data.add_metric([name, "written"], stats.bytes_written)
        data.add_metric([name, "removed"], stats.bytes_removed)
        for result, count in sorted(stats.responses.items()):
            responses.add_metric([name, result], count)
    yield from (files, data, responses)


def _pairing(messages: MessageStats) -> Iterator[Metric]:
    """The compare section's pairing table (compare/pairing.py): its fill and the primary's response
    messages. The compared targets' account (requests sent, comparisons by outcome, pending) is the
    engine's, in compare/metrics.py."""
    table = messages.pairing
    if table is None:
        return
    responses = CounterMetricFamily(
        "spoa_mirror_compare_primary_responses",
        "The primary's response messages (paired: a compared request waited for it; unmatched: none "
        "did; invalid; refused: intake full). None at all while comparing: HAProxy does not send them",
        labels=["result"],
    )
    for result, count in table.primary_responses.items():
        responses.add_metric([result], count)
    entries = GaugeMetricFamily("spoa_mirror_compare_table_entries", "Entries in the pairing table")
    entries.add_metric([], table.entries)
    held = GaugeMetricFamily("spoa_mirror_compare_table_bytes", "Bytes the pairing table holds")
    held.add_metric([], table.held_bytes)
    limit = GaugeMetricFamily("spoa_mirror_compare_table_max_bytes", "compare.table.max_bytes")
    limit.add_metric([], table.max_bytes)
    max_entries = GaugeMetricFamily("spoa_mirror_compare_table_max_entries", "compare.table.max_entries")
    max_entries.add_metric([], table.max_entries)
    yield from (responses, entries, held, limit, max_entries)


def build_info() -> Metric:
    info = GaugeMetricFamily(
        "spoa_mirror_build_info",
        "Always 1; the labels say which spoa-mirror runs, on which Python and event loop",
        labels=["version", "python", "event_loop"],
    )
    info.add_metric([__version__, platform.python_version(), event_loop_name()], 1)
    return info


def event_loop_name() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    return f"uvloop {uvloop.__version__}"


def build_registry(collector: Collector) -> CollectorRegistry:
    """The agent's families plus prometheus_client's own process (CPU, RSS, open fds) and platform
    collectors."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    registry.register(PROCESS_COLLECTOR)
    registry.register(PLATFORM_COLLECTOR)
    return registry


class OnLoop(Collector):
    """A collector whose families are built on the event loop that owns the counters it reads, so
    one scrape sees one moment: read from the admin thread, a scrape could land between a
    request's `received` and its outcome, or count a request moving from a queue into a pool twice
    (received = sum(outcomes) + in flight must hold on every scrape). While the loop is stuck (the
    TIMEOUT), the families are read directly, so /metrics still answers. Built on the loop's thread."""

    TIMEOUT = 2.0

    def __init__(self, collector: Collector, loop: asyncio.AbstractEventLoop) -> None:
        self._collector = collector
        self._loop = loop
        self._loop_thread = threading.get_ident()

    def collect(self) -> Iterator[Metric]:
        if threading.get_ident() == self._loop_thread:
            yield from self._collector.collect()
            return
        future: concurrent.futures.Future[list[Metric]] = concurrent.futures.Future()

        def snapshot() -> None:
            try:
                future.set_result(list(self._collector.collect()))
            except BaseException as error:  # handed to the scraping thread
                future.set_exception(error)

        try:
            self._loop.call_soon_threadsafe(snapshot)
            families = future.result(self.TIMEOUT)
        except (RuntimeError, concurrent.futures.TimeoutError):  # loop closed, or stuck
            families = list(self._collector.collect())
        yield from families


class LoopCollector(Collector):
    """The SPOP event loop's pulse (heartbeat.py): how late its ticks wake, and how long since the
    last one. Read from the admin thread, so it reports a stuck loop while the loop is stuck."""

    def __init__(self, heartbeat: Heartbeat) -> None:
        self._heartbeat = heartbeat

    def collect(self) -> Iterator[Metric]:
        lag = HistogramMetricFamily(
            "spoa_mirror_event_loop_lag_seconds",
            "How late the event loop's 1 s tick woke: what anything ready on the loop (an ACK) waited",
        )
        histogram = self._heartbeat.lag
        lag.add_metric([], histogram.cumulative(), histogram.total)
        yield lag
        stalled = GaugeMetricFamily(
            "spoa_mirror_event_loop_stalled_seconds",
            "Seconds since the event loop's last tick beyond the tick interval (0 while it runs)",
        )
        stalled.add_metric([], self._heartbeat.stalled_for())
        yield stalled


class QueueCapacityCollector(Collector):
    """Each target's `queue_size`, beside `spoa_mirror_queue_depth`, so an alert can say how full a
    queue is without knowing the config."""

    def __init__(self, capacity: Callable[[], dict[str, int]]) -> None:
        self._capacity = capacity

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "spoa_mirror_queue_capacity", "Requests a target's queue holds at most", labels=["target"]
        )
        for name, size in sorted(self._capacity().items()):
            family.add_metric([name], size)
        yield family

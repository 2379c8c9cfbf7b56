"""The exact account of every mirror request: one outcome per request per target.

Counters are plain ints bumped on the hot path and read by the Prometheus collector at scrape time:
measured here, `prometheus_client.Counter.labels(...).inc()` costs ~1 us (a lock and a label lookup)
where a dict increment costs ~0.05 us, and a mirrored request bumps several counters.

Invariant, per target: received == sum(outcomes) + pending, where pending is queued or being sent.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

SENT = ("sent_1xx", "sent_2xx", "sent_3xx", "sent_4xx", "sent_5xx")
ERRORS = (
    "error_connect",
    "error_timeout",
    "error_reset",
    "error_tls",
    "error_protocol",
    "error_stream_reset",
    "error_closed",
    "error_internal",
)
DROPS = (
    "sampled_out",
    "filtered",
    "rate_limited",
    "circuit_open",
    "queue_full",
    "budget_exceeded",
    "stale",
    "loop",
    "body_truncated",
    "body_too_large",
    "invalid",
    "unredactable",
    "shutdown",
)
# A capture target's requests end written to its file, or not: the disk was full (or a file size
# limit was reached), or another write error.
CAPTURED = ("written", "disk_full", "write_error")
OUTCOMES = SENT + ERRORS + DROPS + CAPTURED
STATUS_OUTCOME = {code: SENT[code // 100 - 1] for code in range(100, 600)}

# gRPC status codes by number (grpc/doc/statuscodes.md); the label of a gRPC response's status.
GRPC_CODES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
)  # fmt: skip

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """Cumulative-bucket latency histogram in the Prometheus layout, without the per-observation
    lock of prometheus_client's (the agent is single-threaded; the scrape only reads)."""

    __slots__ = ("buckets", "count", "counts", "total")

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.count = 0
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.buckets, seconds)] += 1
        self.count += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


class TargetStats:
    """Everything counted for one target; kept across config reloads (keyed by target name)."""

    __slots__ = (
        "bytes_sent", "capture", "grpc_status", "latency", "outcomes", "pending", "received",
        "redactions", "resent", "truncated_sent",
    )  # fmt: skip

    def __init__(self) -> None:
        self.received = 0
        self.pending = 0
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.redactions: dict[str, int] = {}
        self.truncated_sent = 0
        self.bytes_sent = 0
        # Pipelined requests sent again because a Connection: close response ended the pipeline
        # ahead of them (transport_pipeline.py); each still ends with one outcome.
        self.resent = 0
        self.latency = Histogram()
        # gRPC responses by grpc-status name; "missing" (none sent) and "other" (not one of the 17)
        # keep the label set bounded whatever a shadow answers.
        self.grpc_status: dict[str, int] = {}
        self.capture: Any = None  # capture/writer.py's CaptureStats while the target captures

    def count_grpc_status(self, code: int | None) -> None:
        name = "missing" if code is None else GRPC_CODES[code] if 0 <= code < len(GRPC_CODES) else "other"
        self.grpc_status[name] = self.grpc_status.get(name, 0) + 1

    def count_resent(self, count: int) -> None:
        self.resent += count

    def count_redaction(self, rule: str) -> None:
        self.redactions[rule] = self.redactions.get(rule, 0) + 1

    @property
    def settled(self) -> int:
        return sum(self.outcomes.values())

    def balanced(self) -> bool:
        return self.received == self.settled + self.pending


class MessageStats:
    """SPOP messages seen by the mirror handler, before any target."""

    __slots__ = ("invalid", "mirrored", "not_mirror", "pairing")

    def __init__(self) -> None:
        self.mirrored = 0
        self.not_mirror = 0
        self.invalid: dict[str, int] = {}
        self.pairing: PairingStats | None = None  # set while a `compare` section is configured


class PairingStats:
    """The pairing table as a whole: the primary's response messages by result (paired: a compared
    request waited for it; unmatched: none did, e.g. not sampled for any compared target; invalid;
    refused: the intake was full), and what the table holds now."""

    __slots__ = ("entries", "held_bytes", "max_bytes", "max_entries", "primary_responses")

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.primary_responses: dict[str, int] = dict.fromkeys(
            ("paired", "unmatched", "invalid", "refused"), 0
        )
        self.entries = 0
        self.held_bytes = 0
        self.max_entries = max_entries
        self.max_bytes = max_bytes

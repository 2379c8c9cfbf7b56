"""`spoa-mirror replay`: the requests of capture files sent again, in timestamp order, at their
original pace (or faster, or at a fixed rate), through the agent's own target machinery.

A replay is one mirror Target built from `--to` and the target options: its filters, sampling,
redaction, rewriting, serialiser and keep-alive pool (concurrency bound, HTTP/1.1 or HTTP/2) are
the agent's, so a replayed request leaves as a mirrored one would have. Unlike the agent, a replay
never drops for a full queue: the scheduler waits for room, and how late that made it is reported
(`max_lag`). Timing: request n is due at start + (t_n - t_0) / speed, or start + n / rate; requests
already due go out at once, so a rate above the timer's resolution (1 ms) is held on average.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..accounting import ERRORS, TargetStats
from ..config import Config, parse_config
from ..mirror import MemoryBudget, Target, loop_marker_value
from . import gor
from .http1 import BadMessage, parse_request

# Latencies kept for the percentiles: every one up to this many, then a uniform reservoir sample.
LATENCY_SAMPLES = 200_000
_EARLY = 0.0005  # a request due within this is sent now rather than after a sleep


@dataclass
class ReplayOptions:
    files: list[str]
    to: str
    speed: float = 1.0
    rate: float | None = None
    loop: bool = False
    limit: int | None = None
    duration: float | None = None
    target: dict[str, Any] = field(default_factory=dict)  # target keys: filters, protocol, headers...
    max_payload: int = gor.MAX_PAYLOAD


@dataclass
class ReplaySummary:
    read: int = 0  # request payloads read from the files
    offered: int = 0  # handed to the target (filters and sampling decide after this)
    outcomes: dict[str, int] = field(default_factory=dict)
    statuses: Counter[int] = field(default_factory=Counter)
    bad_requests: Counter[str] = field(default_factory=Counter)
    input_errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    latency_max: float = 0.0
    elapsed: float = 0.0
    max_lag: float = 0.0
    responses_recorded: int = 0

    @property
    def responded(self) -> int:
        return sum(self.statuses.values())

    @property
    def errors(self) -> dict[str, int]:
        failed = {name: count for name, count in self.outcomes.items() if name in ERRORS and count}
        for reason, count in self.bad_requests.items():
            failed[f"bad_request_{reason}"] = count
        for name in ("circuit_open", "invalid", "unredactable", "budget_exceeded", "shutdown", "stale"):
            if self.outcomes.get(name):
                failed[name] = self.outcomes[name]
        return failed

    def percentile(self, fraction: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    @property
    def rate(self) -> float:
        sent = self.responded + sum(c for n, c in self.outcomes.items() if n in ERRORS)
        return sent / self.elapsed if self.elapsed > 0 else 0.0

    def unreachable(self) -> bool:
        """Requests went out and none got a response: the target could not be reached."""
        return self.responded == 0 and bool(self.errors)

    def as_dict(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "offered": self.offered,
            "responded": self.responded,
            "statuses": {str(code): count for code, count in sorted(self.statuses.items())},
            "outcomes": {name: count for name, count in self.outcomes.items() if count},
            "errors": self.errors,
            "input_errors": self.input_errors,
            "latency": {
                "p50": self.percentile(0.50),
                "p99": self.percentile(0.99),
                "max": self.latency_max,
            },
            "elapsed": self.elapsed,
            "rate": self.rate,
            "max_lag": self.max_lag,
            "unreachable": self.unreachable(),
        }


class _ReplayTarget(Target):
    """The agent's Target, recording each response's exact status and latency for the summary."""

    summary: ReplaySummary
    on_response: Callable[[], None] = staticmethod(lambda: None)

    def _sent(self, result: int | Exception, elapsed: float) -> None:
        if type(result) is int and not self.abandoned:
            summary = self.summary
            summary.statuses[result] += 1
            if elapsed > summary.latency_max:
                summary.latency_max = elapsed
            samples = summary.latencies
            if len(samples) < LATENCY_SAMPLES:
                samples.append(elapsed)
            else:
                index = random.randrange(summary.responded)
                if index < LATENCY_SAMPLES:
                    samples[index] = elapsed
        super()._sent(result, elapsed)
        self.on_response()


def target_config(options: ReplayOptions) -> Config:
    """The replay target as the agent's config parser sees it: `--to` as its url, the rest of the
    target keys from the options (so a bad key is the same one-line error as in the agent config).
    A replay waits for queue room instead of dropping, so the queue and its age are generous."""
    block = {"name": "replay", "queue_size": 100_000, "max_queue_age": 3600, **options.target}
    block["url"] = options.to
    return parse_config({"targets": [block], "truncated_body": "send_marked"}, env={})


def requests_of(
    options: ReplayOptions, summary: ReplaySummary, on_error: Callable[[gor.FormatError], None]
) -> Iterator[gor.Payload]:
    """Request payloads in timestamp order; with `loop`, again and again, each pass shifted to follow
    the previous one (the gap between passes is the first pass's mean interval)."""
    files = gor.capture_files(options.files)
    shift = 0
    while True:
        first = last = None
        count = 0
        for payload in gor.merge(files, on_error, max_payload=options.max_payload):
            if payload.kind == gor.RESPONSE:
                summary.responses_recorded += 1
                continue
            if payload.kind != gor.REQUEST:
                continue
            first = payload.timestamp if first is None else first
            last = payload.timestamp
            count += 1
            if shift:
                payload = gor.Payload(
                    payload.kind, payload.id, payload.timestamp + shift, payload.latency, payload.message,
                    payload.source, payload.offset,
                )  # fmt: skip
            yield payload
        if not options.loop or first is None or last is None:
            return
        on_error = _ignore  # each damaged part is reported once, on the first pass
        gap = (last - first) // max(1, count - 1) if count > 1 else 1_000_000
        shift += last - first + gap


def _ignore(_: gor.FormatError) -> None:
    pass


async def replay(
    options: ReplayOptions,
    *,
    on_progress: Callable[[ReplaySummary], None] = lambda _: None,
    on_input_error: Callable[[str], None] = lambda _: None,
) -> ReplaySummary:
    config = target_config(options)
    summary = ReplaySummary()
    stats = TargetStats()
    budget = MemoryBudget(config.memory_budget)
    target = _ReplayTarget(
        config.targets[0],
        loop_header=config.loop_header,
        truncated_body=config.truncated_body,
        hmac_key=None,
        stats=stats,
        budget=budget,
        outgoing=config.outgoing,
        loop_value=loop_marker_value(os.urandom(32)),
    )
    target.summary = summary
    budget.update([target], [])

    def input_error(error: gor.FormatError) -> None:
        text = str(error)
        summary.input_errors.append(text)
        on_input_error(text)

    loop = asyncio.get_running_loop()
    clock = loop.time
    start = clock()
    deadline = start + options.duration if options.duration else float("inf")
    first: int | None = None
    room = asyncio.Event()
    target.on_response = room.set
    queue_size = target.queue_size
    try:
        for index, payload in enumerate(requests_of(options, summary, input_error)):
            if options.limit is not None and summary.read >= options.limit:
                break
            first = payload.timestamp if first is None else first
            if options.rate:
                due = start + index / options.rate
            else:
                due = start + (payload.timestamp - first) / 1e9 / options.speed
            if due > deadline:
                break
            wait = due - clock()
            if wait > _EARLY:
                await asyncio.sleep(wait)
            summary.read += 1
            try:
                request = parse_request(payload.message)
            except BadMessage as error:
                summary.bad_requests[error.reason.split(":")[0].split(" ")[0]] += 1
                input_error(str(gor.FormatError(payload.source, payload.offset, f"bad request: {error}")))
                continue
            while len(target.queue) >= queue_size:  # back-pressure, never a drop
                room.clear()
                await room.wait()
            summary.max_lag = max(summary.max_lag, clock() - due)
            summary.offered += 1
            target.offer(request)
            if summary.read % 64 == 0:
                on_progress(summary)
                await asyncio.sleep(0)  # let responses in between sends that are all due already
        while stats.pending and clock() < deadline + target.config.timeout + 1:
            await asyncio.sleep(0.01)
    finally:
        summary.elapsed = clock() - start
        await target.drain(clock())
        summary.outcomes = dict(stats.outcomes)
        on_progress(summary)
    return summary


def format_summary(summary: ReplaySummary, to: str) -> str:
    lines = [
        f"replayed {summary.offered} of {summary.read} requests to {to} in {summary.elapsed:.2f} s "
        f"({summary.rate:.1f} req/s)",
        "statuses: " + (", ".join(f"{code}: {n}" for code, n in sorted(summary.statuses.items())) or "none"),
        "errors: " + (", ".join(f"{name}: {n}" for name, n in sorted(summary.errors.items())) or "none"),
        f"latency: p50 {summary.percentile(0.5) * 1e3:.2f} ms, p99 {summary.percentile(0.99) * 1e3:.2f} ms, "
        f"max {summary.latency_max * 1e3:.2f} ms",
    ]
    skipped = {n: c for n, c in summary.outcomes.items() if n in ("filtered", "sampled_out", "rate_limited")}
    if any(skipped.values()):
        lines.append("not sent: " + ", ".join(f"{n}: {c}" for n, c in skipped.items() if c))
    if summary.max_lag > 0.05:
        lines.append(f"behind schedule by up to {summary.max_lag * 1000:.0f} ms (the target or this machine)")
    if summary.input_errors:
        lines.append(f"input errors: {len(summary.input_errors)} (each printed above)")
    if summary.unreachable():
        lines.append(f"FAILED: no response from {to}")
    return "\n".join(lines)

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
import contextlib
import hashlib
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..accounting import ERRORS, TargetStats
from ..compare.capture import CapturingPool
from ..compare.model import Response
from ..config import Config, parse_config
from ..errors import ConfigError
from ..mirror import TRUNCATED_MARKER, MemoryBudget, Target, loop_marker_value
from ..request import MirrorRequest
from . import gor
from .http1 import BadMessage, parse_request, parse_response

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
    compare: dict[str, Any] | None = None  # the compare: section's keys (candidates set here)


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
    cpu: float = 0.0  # this process's CPU seconds over the replay (threads included)
    max_lag: float = 0.0
    responses_recorded: int = 0
    compare_report: dict[str, Any] | None = None
    interrupted: bool = False  # stopped by Ctrl-C (SIGINT)

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
            "cpu_us_per_request": self.cpu / self.offered * 1e6 if self.offered else 0.0,
            "rate": self.rate,
            "max_lag": self.max_lag,
            "unreachable": self.unreachable(),
            "interrupted": self.interrupted,
            **({"compare": self.compare_report} if self.compare_report is not None else {}),
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


class _Tagged(bytes):
    """A built request carrying what its comparison needs back from the pool: the payload's id, the
    method and the path (the CapturingPool settles with the payload it was given)."""

    key: tuple[str, str, str] | None


class _ComparingReplayTarget(_ReplayTarget):
    """`replay --compare`: the whole replayed response (compare/capture.py's pool), compared by the
    engine with the primary's response recorded beside the request (a type 2 payload, same id)."""

    recorded: dict[str, Response]
    engine: Any

    def _build_pool(self, config: Any, outgoing: Any) -> Any:
        base = super()._build_pool(config, outgoing)
        return CapturingPool(
            config.host, config.port, body_limit=self.engine.config.body_limit,
            ssl_context=base._ssl_context, server_hostname=base._server_hostname,
            max_connections=config.concurrency, connect_timeout=config.connect_timeout,
            timeout=config.timeout,
        )  # fmt: skip

    def _build_builder(self, config: Any, loop_marker: tuple[str, str], truncated_body: str) -> Any:
        build = super()._build_builder(config, loop_marker, truncated_body)

        def tagged(req: MirrorRequest, redacted_truncated: bool | None = None) -> bytes:
            out = _Tagged(build(req, redacted_truncated))
            out.key = (req.unique_id or "", req.method, req.path)
            return out

        return tagged

    def _dispatch(self, payload: bytes, head: bool) -> None:
        """A request sent (or queued) is pending in the engine's account until _sent settles it."""
        pending = self.pending
        super()._dispatch(payload, head)
        if self.pending > pending and getattr(payload, "key", None) is not None:
            self.engine.request_sent(self.name)

    def _sent(self, result: Any, elapsed: float) -> None:
        response, payload = result
        key = getattr(payload, "key", None)
        if key is not None and not self.abandoned:
            payload_id, method, path = key
            primary = self.recorded.get(payload_id)
            if primary is None:
                self.engine.count(self.name, method, path, "primary_missing")
            elif type(response) is not Response:
                self.engine.count(self.name, method, path, "shadow_failed")
            elif primary.body_length > len(primary.body) and primary.body_sha256 is None:
                self.engine.count(self.name, method, path, "too_large")
            else:
                self.engine.compare(self.name, method, path, primary, response)
        super()._sent(response.status if type(response) is Response else response, elapsed)


def recorded_responses(
    options: ReplayOptions, body_limit: int, on_error: Callable[[gor.FormatError], None]
) -> dict[str, Response]:
    """The primary's responses in the files (type 2 payloads) by id, for --compare: a first pass,
    since a response is written after its request, and the replay needs it when the replayed one
    comes back. A body HAProxy cut (marked X-Mirror-Truncated) is kept as cut: counted too_large."""
    responses: dict[str, Response] = {}
    for payload in gor.merge(gor.capture_files(options.files), on_error, max_payload=options.max_payload):
        if payload.kind != gor.RESPONSE:
            continue
        try:
            status, headers, body = parse_response(payload.message)
        except BadMessage as error:
            on_error(gor.FormatError(payload.source, payload.offset, f"bad response: {error}"))
            continue
        cut = any(name.lower() == TRUNCATED_MARKER[0].lower() for name, _ in headers)
        headers = [(name, value) for name, value in headers if name.lower() != TRUNCATED_MARKER[0].lower()]
        digest = None
        length = len(body) + (1 if cut else 0)
        if len(body) > body_limit:
            digest, body = hashlib.sha256(body).digest(), body[:body_limit]
        responses[payload.id] = Response(status, tuple(headers), body, length, digest, payload.latency / 1e9)
    return responses


def compare_config(options: ReplayOptions) -> Any:
    from ..compare.config import parse_compare

    if options.target.get("protocol", "http1") != "http1":
        raise ConfigError("--protocol", "--compare reads whole responses over HTTP/1.1 only")
    section = {**(options.compare or {}), "candidates": ["replay"]}
    section.pop("baseline", None)
    return parse_compare(section, ("replay",), key="--compare-config")


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

    def input_error(error: gor.FormatError) -> None:
        text = str(error)
        summary.input_errors.append(text)
        on_input_error(text)

    target_class: type[_ReplayTarget] = _ReplayTarget
    engine = None
    recorded: dict[str, Response] = {}
    if options.compare is not None:
        from ..compare.engine import CompareEngine

        engine = CompareEngine(compare_config(options))
        recorded = recorded_responses(options, engine.config.body_limit, input_error)
        # Set before Target.__init__ builds the pool, which needs the engine's body limit.
        target_class = type(
            "ComparingReplay", (_ComparingReplayTarget,), {"engine": engine, "recorded": recorded}
        )
    target = target_class(
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

    loop = asyncio.get_running_loop()
    clock = loop.time
    cpu = time.process_time()
    start = clock()
    deadline = start + options.duration if options.duration else float("inf")
    first: int | None = None
    room = asyncio.Event()
    target.on_response = room.set
    queue_size = target.queue_size
    # Ctrl-C stops sending; what was sent is waited for (up to its timeout) and summarised.
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGINT, stop.set)
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
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
            if stop.is_set():
                summary.interrupted = True
                break
            summary.read += 1
            try:
                request = parse_request(payload.message)
                request.unique_id = payload.id
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
            on_progress(summary)
            if summary.read % 64 == 0:
                await asyncio.sleep(0)  # let responses in between sends that are all due already
        while stats.pending and clock() < deadline + target.config.timeout + 1:
            await asyncio.sleep(0.01)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        summary.elapsed = clock() - start
        summary.cpu = time.process_time() - cpu
        await target.drain(clock())
        summary.outcomes = dict(stats.outcomes)
        if engine is not None:
            summary.compare_report = engine.report()
            engine.close()
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
    if summary.interrupted:
        lines.append("interrupted (Ctrl-C): the rest was not sent")
    if summary.unreachable():
        lines.append(f"FAILED: no response from {to}")
    return "\n".join(lines)

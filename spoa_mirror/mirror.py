"""The mirror pipeline: SPOP message in, replays out, every request accounted for.

The SPOP handler only appends the message to an intake and returns, so the ACK goes out before any
replay work; the intake is processed right after, in the same loop iteration batch (`call_soon`).
Per target, a chain of small checks built once from the config decides the request's fate in order:
filtered, sampled_out, body_too_large / body_truncated, rate_limited, queue_full, circuit_open;
what survives is redacted, rewritten and serialised, then sent on the target's connection pool, or
queued while all `concurrency` of its connections are busy.

Memory is bounded in bytes, not only in requests: the serialised bytes of every request a target
holds (queued or being sent) count against its `memory_budget` and against the agent's, and a
request that would go over either is dropped as `budget_exceeded`. A queued request older than
`max_queue_age` is dropped as `stale`, and a breaker that opens sheds its target's queue as
`circuit_open`, so an outage neither holds memory nor replays minutes-old traffic afterwards.

A reload keeps what did not change: a target whose config is equal keeps its object (queue, pool,
breaker, limiter); a changed one is rebuilt and takes over its predecessor's queue, its pool when
the connection settings are equal, its breaker and limiter when their specs are, and the slots of
what the predecessor still has in flight, so the shadow never sees more than `concurrency`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import hmac
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import structlog

from spoe import Message, SetVar, VarScope
from spoe.log import LogThrottle

from .accounting import STATUS_OUTCOME, MessageStats, TargetStats
from .config import NO_OUTGOING, OutgoingConfig
from .errors import ConfigError
from .filters import build_filter, methods_allowed
from .header_templates import split_added_headers
from .limits import build_circuit_breaker, build_rate_limiter
from .message import BadMessage, is_mirror_message, to_primary_response, to_request
from .protocols import build_grpc_guard, build_pool, build_serialiser
from .redact import INLINE_BODY_LIMIT, Unredactable, build_redactor, redact_in_worker
from .request import MirrorRequest
from .sampling import always_sampled, build_sampler
from .tls import client_context
from .transport import TransportError
from .wire import WireError

log = structlog.get_logger("spoa_mirror")

TRUNCATED_MARKER = ("X-Mirror-Truncated", "true")
# The header HAProxy's shipped config sets to its unique-id: a client cannot remove it from a mirror.
REQUEST_ID_HEADER = "x-request-id"
# Requests waiting between the SPOP handler and the targets; beyond either bound, HAProxy sends
# faster than the pipeline drains and requests are dropped (counted as queue_full) instead of
# buffered. In bytes too (bodies and header blocks): 10,000 messages of 1 MiB bodies would be 10 GB,
# and 4,000 POSTs of 24 KiB to four slow targets held ~100 MB here before the pipeline caught up.
INTAKE_LIMIT = 10_000
INTAKE_BYTES = 16 * 1024 * 1024
# One intake callback runs at most this long, then yields the loop to the SPOP side: 10,000 queued
# messages of 1,000 headers each would otherwise hold it, and every ACK, for seconds.
INTAKE_SLICE = 0.002

Check = Callable[[MirrorRequest], str | None]

# Every ACK carries one action, never none: HAProxy 3.1.0's SPOE never wakes the waiting stream on
# an ACK without actions, so each request waited the full `timeout processing` (fixed upstream by
# commit 851e52b5, a NOOP action, in 3.2-dev7 and later 3.1 releases). The action is useful too:
# txn.<agent prefix>.accepted is 1 when the agent took the copy in (what became of it is in its
# metrics), 0 when it refused it at once (intake full, or not a message it mirrors). HAProxy sets it
# only where its config names it, e.g. in a log-format. Constant tuples: encoded once by the engine.
ACK_ACCEPTED = (SetVar(VarScope.TRANSACTION, "accepted", 1),)
ACK_REFUSED = (SetVar(VarScope.TRANSACTION, "accepted", 0),)
# With a `compare` section, an accepted request also sets txn.<prefix>.compare, which the shipped
# haproxy.cfg's http-response rules test before they wait for the primary's body and send it back as
# the response message: without one, HAProxy sends no response and holds none back.
ACK_ACCEPTED_COMPARE = (*ACK_ACCEPTED, SetVar(VarScope.TRANSACTION, "compare", 1))


class MemoryBudget:
    """The agent-wide `memory_budget` over the bytes every target holds (queued, or in flight in its
    pool), current targets and those a reload retired alike.

    Summing every target per request would cost a loop on the hot path, so each current target gets
    a share, (limit - what retired targets hold) / number of targets: while a target holds no more
    than its share the sum cannot be over the limit, and only a target past its share pays for the
    exact sum. Retired targets only ever release bytes, so a share computed at a reload (and again
    as each retired target finishes) stays safe."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.targets: list[Target] = []
        self.retired: list[Target] = []

    def used(self) -> int:
        return _held(self.targets + self.retired)

    def update(self, targets: list[Target], retired: list[Target]) -> None:
        """After a reload or a retired target finishing: recompute every current target's share."""
        self.targets, self.retired = targets, retired
        # A retired target's queue and the bodies it has in the redaction worker stay its own until
        # they settle, even when its successor kept its pool (then counted once, under the successor).
        retired_held = _held(retired, but_pools={id(target.pool) for target in targets})
        share = max(0, self.limit - retired_held) // max(1, len(targets))
        for target in targets:
            target.share = min(share, target.memory_budget)


def _held(targets: list[Target], but_pools: set[int] | frozenset[int] = frozenset()) -> int:
    """Bytes these targets hold: their queues, the bodies in the redaction worker, and their pools
    (a pool shared by a target and the one it replaced counted once; those in `but_pools`, by id,
    not at all: counted with the targets that kept them)."""
    pools = {id(t.pool): t.pool.bytes_held for t in targets if id(t.pool) not in but_pools}
    own = sum(target.queued_bytes + target.offloaded_bytes for target in targets)
    return own + sum(pools.values())


def _pool_settings(config: Any) -> tuple[Any, ...]:
    """What a connection pool is built from: equal settings let a reloaded target keep its pool."""
    return (
        config.scheme,
        config.host,
        config.port,
        config.tls_verify,
        config.ca_file,
        config.concurrency,
        config.pipeline_depth,
        config.connect_timeout,
        config.timeout,
        config.capture,
    )


class Target:
    """One shadow backend: its checks, its request builder, its queue and its connection pool."""

    def __init__(
        self,
        config: Any,
        *,
        loop_header: str,
        truncated_body: str,
        hmac_key: bytes | None,
        stats: TargetStats,
        outgoing: OutgoingConfig = NO_OUTGOING,
        budget: MemoryBudget,
        loop_value: str = "1",
    ) -> None:
        self.name: str = config.name
        self.config = config
        self.inputs = (config, loop_header, truncated_body, hmac_key)  # equal on reload: kept as is
        self.stats = stats
        # (payload, head, loop time when queued), oldest first: the stale sweep's timer runs on the
        # same clock, so a test can drive the event loop's clock instead of waiting max_queue_age.
        self.queue: deque[tuple[bytes, bool, float]] = deque()
        self.queue_size: int = config.queue_size
        # Requests in flight at most: with pipelining, `pipeline_depth` per connection.
        self.concurrency: int = config.concurrency * config.pipeline_depth
        self.memory_budget: int = config.memory_budget
        self.max_queue_age: float = config.max_queue_age
        self.budget = budget
        self.share = 0  # see MemoryBudget; set once the target is in place
        self.queued_bytes = 0
        self.active = 0  # slots taken: requests in flight (a predecessor's too), at most concurrency
        self.offloaded_bytes = 0  # bodies of requests being redacted in the worker process
        self.offloaded = 0
        self.pending = 0  # this target object's share of stats.pending (stats outlive reloads)
        self.closing = False
        self.abandoned = False  # drained: results still to come were already counted as shutdown
        self.successor: Target | None = None  # set when a reload replaced this target by a new one
        self.owns_pool = True
        self._stale_sweep: asyncio.TimerHandle | None = None
        self._drain: asyncio.Task[int] | None = None
        self.drain_deadline = 0.0
        self.breaker = build_circuit_breaker(config.circuit_breaker, f"targets.{self.name}.circuit_breaker")
        self.breaker.on_change = self._circuit_changed
        self.checks = self._build_checks(config, truncated_body)
        self.rate_limit = build_rate_limiter(config.rate_limit, f"targets.{self.name}.rate_limit")
        self.redact = build_redactor(
            config.redact, f"targets.{self.name}.redact", hmac_key, stats.count_redaction
        )
        self.redact_spec = (config.redact, f"targets.{self.name}.redact", hmac_key)
        self.mark_truncated = truncated_body != "drop"
        self.build = self._build_builder(config, (loop_header, loop_value), truncated_body)
        self.pool = self._build_pool(config, outgoing)
        self.errors = LogThrottle()

    def _build_pool(self, config: Any, outgoing: OutgoingConfig) -> Any:
        """Where built requests go: a connection pool here, a file writer for a capture target."""
        ssl_context = client_context(config) if config.scheme == "https" else None
        stats = self.stats
        return build_pool(config, ssl_context, stats.count_grpc_status, outgoing, stats.count_resent)

    def take_over(self, old: Target) -> None:
        """After a reload, from the target this one replaces (same name, changed config): its
        queue, its pool if the connection settings are equal, its breaker and rate limiter if their
        specs are, and the slots of what it still has in flight (its `_sent` hands them on)."""
        # Not a pool of the other kind: a compared target's pool settles with the whole response.
        if _pool_settings(old.config) == _pool_settings(self.config) and type(old.pool) is type(self.pool):
            self.pool, old.owns_pool = old.pool, False
        if old.config.circuit_breaker == self.config.circuit_breaker:
            self.breaker = old.breaker
        if old.config.rate_limit == self.config.rate_limit:
            self.rate_limit = old.rate_limit
        self.queue, old.queue = old.queue, self.queue
        self.queued_bytes, old.queued_bytes = old.queued_bytes, 0
        moved = len(self.queue)
        self.pending += moved
        old.pending -= moved
        if old._stale_sweep is not None:
            old._stale_sweep.cancel()
            old._stale_sweep = None
        if self.queue:
            self._schedule_stale_sweep()
        self.active = old.active
        old.successor = self

    def _build_checks(self, config: Any, truncated_body: str) -> list[Check]:
        """Only the checks this target's config asks for, so the hot path has no config branches."""
        checks: list[Check] = []
        if config.methods:
            method_allowed = methods_allowed(config.methods)
            checks.append(lambda req: None if method_allowed(req) else "filtered")
        if config.grpc_methods is not None:
            checks.append(build_grpc_guard(config.grpc_methods))
        passes = build_filter(config.filters, f"targets.{self.name}.filters")
        if passes is not None:
            checks.append(lambda req: None if passes(req) else "filtered")
        sample = build_sampler(config.sample_percentage, config.sample_key, f"targets.{self.name}")
        if sample is not always_sampled:  # 100% without a key: no check to run
            checks.append(lambda req: None if sample(req) else "sampled_out")
        max_body = config.max_body_size
        checks.append(lambda req: "body_too_large" if len(req.body) > max_body else None)
        if truncated_body == "drop":
            checks.append(lambda req: "body_truncated" if is_truncated(req) else None)
        return checks

    def _build_builder(
        self, config: Any, loop_marker: tuple[str, str], truncated_body: str
    ) -> Callable[..., bytes]:
        """The request bytes for this target: `build(req)` redacts and serialises on the event loop;
        `build(redacted, truncated)` serialises a request the worker process already redacted, with
        whether the original was truncated (redaction changes the body's length). One closure, so the
        common path pays no extra call. Header scans are skipped where the config makes their answer
        known (with `truncated_body: drop` the checks have already dropped what is truncated; with
        `host: target` the client's Host is not needed): 23k instead of 27k instructions for wrk's GET
        (~1.9 us instead of ~2.3 us), 79k instead of 89k for a browser's ten-header GET (callgrind).

        What the agent and the operator add wins over the client: a client header with the name of an
        operator header, of the loop marker or of the truncation marker is not forwarded (the
        operator's value is the only one the shadow sees), and the client's `Connection` header
        cannot name any of them, nor X-Forwarded-For or HAProxy's X-Request-ID, away."""
        base_path = config.base_path.rstrip("/")
        rewrite = config.path_rewrite
        static, templated = split_added_headers(config.headers)
        add = [*static, loop_marker]
        added_names = {name.lower() for name, _ in (*add, *templated)} | {TRUNCATED_MARKER[0].lower()}
        removed = {name.lower() for name in config.remove_headers} | added_names
        protected = frozenset(added_names | {REQUEST_ID_HEADER})
        protected_with_forwarded_for = protected | {"x-forwarded-for"}
        host_policy = config.host_policy
        target_host = config.authority
        mirror_body = config.mirror_body
        mirror_headers = config.mirror_headers
        stats = self.stats
        serialise = build_serialiser(config)
        mark_truncated = self.mark_truncated
        redact = self.redact

        def build(req: MirrorRequest, redacted_truncated: bool | None = None) -> bytes:
            if redacted_truncated is None:
                truncated = mark_truncated and is_truncated(req)
                req = redact(req)
            else:
                truncated = redacted_truncated
            path = req.path
            if rewrite is not None:
                path = rewrite[0].sub(rewrite[1], path, count=1)
            if base_path:
                path = base_path + path
            host = target_host
            if host_policy != "target":
                original_host = req.header("host")
                if host_policy == "original" and original_host:
                    host = original_host
                elif host_policy == "suffix" and original_host:
                    host = shadow_host(original_host)
            headers = [h for h in req.headers if h[0].lower() not in removed] if mirror_headers else []
            keep = protected
            if req.src:
                headers = _append_forwarded_for(headers, req.src)
                keep = protected_with_forwarded_for
            headers.extend(add)
            if templated:  # only targets whose added headers carry a template pay for this
                headers.extend([(name, render()) for name, render in templated])
            if truncated:
                stats.truncated_sent += 1
                headers.append(TRUNCATED_MARKER)
            return serialise(req.method, path, headers, req.body if mirror_body else b"", host, keep)

        return build

    def offer(self, req: MirrorRequest) -> None:
        """Decide this request's fate for this target; runs inside the intake batch."""
        stats = self.stats
        stats.received += 1
        # The checks in order, inline rather than in a method of their own: one Python call less
        # per request and target, which pays for the memory budget's bookkeeping below.
        for check in self.checks:
            outcome = check(req)
            if outcome is not None:
                stats.outcomes[outcome] += 1
                return
        rate_limit = self.rate_limit
        if rate_limit is not None and not rate_limit(len(req.body)):
            stats.outcomes["rate_limited"] += 1
            return
        if len(self.queue) >= self.queue_size or self.closing:
            stats.outcomes["queue_full"] += 1
            return
        if not self.breaker.allow():
            stats.outcomes["circuit_open"] += 1
            return
        if len(req.body) > INLINE_BODY_LIMIT:
            self._redact_off_loop(req)
            return
        try:
            payload = self.build(req)
        except (WireError, Unredactable) as error:
            # A probe the breaker let through is given up after its max_backoff: no release needed.
            self._count_unsendable(error)
            return
        self._dispatch(payload, req.method == "HEAD")

    def _count_unsendable(self, error: WireError | Unredactable) -> None:
        if isinstance(error, Unredactable):
            self.stats.outcomes["unredactable"] += 1
            self._log_error("mirror.unredactable", error.reason, reason=error.reason)
        else:
            self.stats.outcomes["invalid"] += 1
            self._log_error("mirror.invalid_request", error.reason, reason=error.reason)

    def _redact_off_loop(self, req: MirrorRequest) -> None:
        """A large body is redacted in the worker process so the event loop, and every other
        connection's ACK, never waits on it: a 1.2 MB JSON body takes 30-100 ms to parse, redact and
        re-serialise, and a thread would hold the GIL through most of it (json's C code), which is
        what the ACKs wait on. One worker keeps these requests in order; while it works the request
        counts as in flight, and its body as held under the memory budget."""
        size = len(req.body)
        held = self.queued_bytes + self.pool.bytes_held + self.offloaded_bytes + size
        if held > self.share and not self._fits(held, size):
            self.stats.outcomes["budget_exceeded"] += 1
            return
        truncated = self.mark_truncated and is_truncated(req)
        self.stats.pending += 1
        self.pending += 1
        self.offloaded += 1
        self.offloaded_bytes += size
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(_redaction_executor(), redact_in_worker, *self.redact_spec, req)
        except BrokenProcessPool:  # the worker died while idle (killed for memory?): start another
            _reset_redaction_executor()
            future = loop.run_in_executor(_redaction_executor(), redact_in_worker, *self.redact_spec, req)
        future.add_done_callback(functools.partial(self._redacted, req, truncated, size))

    def _redacted(self, req: MirrorRequest, truncated: bool, size: int, future: Future) -> None:
        self.offloaded -= 1
        self.offloaded_bytes -= size
        if self.abandoned:  # drained meanwhile: already counted as shutdown
            return
        stats = self.stats
        stats.pending -= 1
        self.pending -= 1
        try:
            redacted, events = future.result()
            for event in events:
                stats.count_redaction(event)
            payload = self.build(redacted, truncated)
        except (WireError, Unredactable) as error:
            self._count_unsendable(error)
            return
        except BrokenProcessPool as error:  # the worker died (killed for memory?): start another
            _reset_redaction_executor()
            stats.outcomes["error_internal"] += 1
            self._log_error("mirror.redaction_worker_died", "worker", error=repr(error))
            return
        except Exception as error:  # a bug of ours must still leave the account exact
            stats.outcomes["error_internal"] += 1
            self._log_error("mirror.redaction_crashed", "internal", error=repr(error), exc_info=error)
            return
        if len(self.queue) >= self.queue_size:
            stats.outcomes["queue_full"] += 1
            return
        self._dispatch(payload, req.method == "HEAD")

    def _dispatch(self, payload: bytes, head: bool) -> None:
        """Send now on a free connection, or queue (the caller checked the queue's room), unless the
        memory budget has no room for it."""
        stats = self.stats
        size = len(payload)
        held = self.queued_bytes + self.pool.bytes_held + self.offloaded_bytes + size
        if held > self.share and not self._fits(held, size):
            stats.outcomes["budget_exceeded"] += 1
            return
        stats.pending += 1
        self.pending += 1
        if self.active < self.concurrency:  # then nothing is queued: _sent refills from the queue
            self.active += 1
            stats.bytes_sent += size
            # A callback rather than a sender task awaiting Pool.send: ~17% fewer instructions per
            # replayed request (113k -> 94k, callgrind), ~2.5 us.
            self.pool.submit(payload, self._sent, head=head)
        else:
            queue = self.queue
            if not queue:
                self._schedule_stale_sweep()
            queue.append((payload, head, asyncio.get_running_loop().time()))
            self.queued_bytes += size

    def _fits(self, held: int, size: int) -> bool:
        """Past its share (see MemoryBudget): the target's own budget, then the exact sum, keeping
        free what the other targets may still take within their shares without asking (their fast
        path): borrowing that too let four targets end at 65 MiB of a 64 MiB budget."""
        if held > self.memory_budget:
            return False
        budget = self.budget
        reserved = sum(
            max(0, other.share - other.held_bytes()) for other in budget.targets if other is not self
        )
        return budget.used() + size + reserved <= budget.limit

    def held_bytes(self) -> int:
        """What this target holds: queued, in the redaction worker, and in its pool."""
        return self.queued_bytes + self.offloaded_bytes + self.pool.bytes_held

    def _sent(self, result: int | Exception, elapsed: float) -> None:
        """The pool's callback, once per submitted request: its outcome, then the next queued one on
        the slot it frees, so at most `concurrency` requests are in flight."""
        if self.abandoned:
            self._release_slot()
            return
        stats = self.stats
        if type(result) is int:
            outcome = STATUS_OUTCOME.get(result, "error_protocol")
            self.breaker.record_success()
            stats.latency.observe(elapsed)
        elif isinstance(result, TransportError):
            outcome = f"error_{result.reason}"
            # Every failure of the shadow opens the breaker, not only connect and timeout: a bad
            # certificate cost ~1 ms of agent CPU per request (a full failed handshake) forever.
            # `closed` is our own pool shutting down, not the shadow's fault.
            if result.reason != "closed":
                breaker = self.breaker
                breaker.record_failure()
                if self.queue and breaker.state == "open":  # what waits would meet the same fate
                    self._shed("circuit_open")
            self._log_error("mirror.send_failed", result.reason, reason=result.reason, error=str(result))
        else:
            # A bug of ours must still leave the account exact and the target sending.
            outcome = "error_internal"
            self._log_error("mirror.send_crashed", "internal", error=repr(result), exc_info=result)
        stats.pending -= 1
        self.pending -= 1
        stats.outcomes[outcome] += 1
        # The freed slot, inlined from _release_slot (the hot path).
        queue = self.queue
        if queue and self.active <= self.concurrency:
            payload, head, _ = queue.popleft()
            self.queued_bytes -= len(payload)
            stats.bytes_sent += len(payload)
            self.pool.submit(payload, self._sent, head=head)
        else:
            self.active -= 1
            if self.successor is not None:
                self.successor._release_slot()

    def _release_slot(self) -> None:
        """A request counted in `active` settled: the next queued one takes its slot, unless more
        slots are taken than `concurrency` allows (a reload lowered it); else the slot is given up,
        and on to the successor, which counted it too."""
        queue = self.queue
        if queue and self.active <= self.concurrency:
            payload, head, _ = queue.popleft()
            self.queued_bytes -= len(payload)
            self.stats.bytes_sent += len(payload)
            self.pool.submit(payload, self._sent, head=head)
        else:
            self.active -= 1
            if self.successor is not None:
                self.successor._release_slot()

    def _shed(self, outcome: str, keep_newer_than: float | None = None) -> int:
        """Drop what is queued (only what was queued at or before `keep_newer_than`, if given),
        counted as `outcome`; returns how many."""
        queue = self.queue
        dropped = released = 0
        while queue and (keep_newer_than is None or queue[0][2] <= keep_newer_than):
            released += len(queue.popleft()[0])
            dropped += 1
        self.queued_bytes -= released
        self.pending -= dropped
        self.stats.pending -= dropped
        self.stats.outcomes[outcome] += dropped
        return dropped

    def _schedule_stale_sweep(self) -> None:
        if self._stale_sweep is None:
            self._stale_sweep = asyncio.get_running_loop().call_later(self.max_queue_age, self._sweep_stale)

    def _sweep_stale(self) -> None:
        """Queued requests older than max_queue_age are dropped as `stale` (a hung shadow drains its
        queue at `concurrency` per timeout: a full queue would wait minutes, and a recovered shadow
        would get minutes-old traffic). One timer per target, at the oldest request's expiry."""
        self._stale_sweep = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._shed("stale", keep_newer_than=now - self.max_queue_age)
        if self.queue:
            self._stale_sweep = loop.call_later(
                self.queue[0][2] + self.max_queue_age - now, self._sweep_stale
            )

    def _circuit_changed(self, state: str) -> None:
        if state == "open":
            log.warning(
                "circuit.opened",
                target=self.name,
                failures=self.breaker.failure_threshold,
                retry_in=self.breaker.backoff,
            )
        else:
            log.info("circuit.closed", target=self.name)

    def _log_error(self, event: str, key: str, **fields: Any) -> None:
        suppressed = self.errors.allow(key)
        if suppressed is not None:
            log.warning(event, target=self.name, suppressed=suppressed, **fields)

    async def drain(self, deadline: float) -> int:
        """Stop taking requests, let what is queued and in flight finish until `deadline` (loop
        time), then count what is left as `shutdown`. Returns how many were dropped. Called again
        (a target retired by a reload, then SIGTERM), it keeps the earlier deadline and returns
        the same count: what was dropped is counted once."""
        if self._drain is None:
            self.drain_deadline = deadline
            self._drain = asyncio.get_running_loop().create_task(self._drain_until_deadline())
        else:
            self.drain_deadline = min(self.drain_deadline, deadline)
        return await self._drain

    async def _drain_until_deadline(self) -> int:
        self.closing = True
        loop = asyncio.get_running_loop()
        while (self.queue or self.active or self.offloaded) and loop.time() < self.drain_deadline:
            await asyncio.sleep(0.01)
        if self._stale_sweep is not None:
            self._stale_sweep.cancel()
            self._stale_sweep = None
        queued = self._shed("shutdown")
        in_flight = self.pending
        # Results still to come were counted here; their slots still go to the successor.
        self.abandoned = True
        self.pending = 0
        self.stats.pending -= in_flight
        self.stats.outcomes["shutdown"] += in_flight
        if self.owns_pool:
            await self.pool.close()  # fails what is in flight
        return queued + in_flight


class Mirror:
    """Intake, loop protection and fan-out to the targets; owns the per-target stats registry."""

    def __init__(self, config: Any, hmac_key: bytes | None) -> None:
        self.messages = MessageStats()
        self.budget = MemoryBudget(config.memory_budget)
        self.target_stats: dict[str, TargetStats] = {}
        self.targets: list[Target] = []
        self.retired: list[Target] = []
        self._intake: deque[tuple[dict[str, Any], int]] = deque()  # (args, _message_bytes(args))
        self._intake_bytes = 0
        self._scheduled = False
        self._log_throttle = LogThrottle()
        self.pairing: Any = None  # compare/pairing.py's PairingTable while a `compare` section is set
        self.compare_engine: Any = None
        self._ack_accepted = ACK_ACCEPTED
        self.response_message: str | None = None
        self.recorders: list[Any] = []  # capture targets recording the primary's responses
        # Without a configured secret the loop marker is this process's own: stable across reloads.
        self._process_loop_key = os.urandom(32)
        self.apply(config, hmac_key)

    def apply(self, config: Any, hmac_key: bytes | None) -> None:
        """Build targets from a config (at start and on reload). Everything that can fail is built
        first, with nothing registered, so a bad config raises before anything is replaced and
        leaves no trace (not even a target name in /metrics). A target whose inputs are unchanged
        is kept as it is; a changed one takes over from its predecessor (see take_over)."""
        loop_value = loop_marker_value(hmac_key or self._process_loop_key)
        current = {target.name: target for target in self.targets}
        pairing = self._pairing_for(config)
        compared = frozenset(config.compare.compared) if config.compare is not None else frozenset()
        plan: list[tuple[Target, Target | None]] = []
        for target_config in config.targets:
            old = current.get(target_config.name)
            if (
                old is not None
                and old.inputs == (target_config, config.loop_header, config.truncated_body, hmac_key)
                and getattr(old, "pairing", None) is (pairing if target_config.name in compared else None)
            ):
                plan.append((old, None))
                continue
            options: dict[str, Any] = {}
            target_class: Any = _target_class(target_config)
            if target_config.name in compared:
                from .compare.pairing import ComparingTarget

                target_class, options = ComparingTarget, {"pairing": pairing}
            target = target_class(
                target_config,
                loop_header=config.loop_header,
                truncated_body=config.truncated_body,
                hmac_key=hmac_key,
                stats=self.target_stats.get(target_config.name) or TargetStats(),
                budget=self.budget,
                outgoing=config.outgoing,
                loop_value=loop_value,
                **options,
            )
            plan.append((target, old))
        # Nothing below raises.
        for target, old in plan:
            self.target_stats.setdefault(target.name, target.stats)
            if old is not None:
                target.take_over(old)
        targets = [target for target, _ in plan]
        retiring = [target for target in self.targets if target not in targets]
        self.targets = targets
        # The pools whose writes the intake holds while it places a batch (see _process_intake).
        self._batching_pools = tuple(target.pool for target in targets)
        self._use_pairing(pairing, config)
        self._use_recorders(targets)
        # The pairing table's bytes are part of the agent's budget: the targets share the rest.
        self.budget.limit = config.memory_budget - (pairing.max_bytes if pairing is not None else 0)
        if retiring:
            self._retire(retiring, config.drain_timeout)
        self.budget.update(self.targets, self.retired)
        self.loop_header = config.loop_header.lower()
        self.loop_value = loop_value.encode()
        self.message_names = frozenset(config.messages)

    def _pairing_for(self, config: Any) -> Any:
        """The pairing table for `config`'s compare section: the current one when the section is
        unchanged, a new one (with a new engine) when it changed, None without one. Raises a
        ConfigError before anything is replaced."""
        compare = config.compare
        if compare is None:
            return None
        if compare.table.max_bytes >= config.memory_budget:
            raise ConfigError(
                "compare.table.max_bytes",
                f"must be below memory_budget ({config.memory_budget} bytes): the table is part of it",
            )
        if self.pairing is not None and self.pairing.config == compare:
            return self.pairing
        from .accounting import PairingStats
        from .compare.engine import CompareEngine
        from .compare.pairing import PairingTable

        # A changed section keeps the engine's statistics (its rules change); the table is new.
        engine = (
            CompareEngine(compare, redact_response=self._redact_response)
            if self.compare_engine is None
            else self.compare_engine
        )
        stats = PairingStats(compare.table.max_entries, compare.table.max_bytes)
        return PairingTable(compare, engine, stats)

    def _redact_response(self, target_name: str, response: Any) -> Any:
        """The engine's hook before it keeps or shows anything of a pair (its examples): the
        target's own redaction rules, applied to the response's headers and body as to a request's
        (credential headers, json_fields, patterns). A response they cannot redact shows nothing."""
        target = next((t for t in self.targets if t.name == target_name), None)
        if target is None:
            return response
        as_request = MirrorRequest("GET", "/", "1.1", list(response.headers), response.body)
        try:
            redacted = target.redact(as_request)
        except Unredactable:
            return dataclasses.replace(response, headers=(), body=b"")
        return dataclasses.replace(response, headers=tuple(redacted.headers), body=redacted.body)

    def _use_pairing(self, pairing: Any, config: Any) -> None:
        if pairing is self.pairing:
            return
        if pairing is not None and pairing.engine is self.compare_engine:
            pairing.engine.apply(config.compare)
        if self.pairing is not None:
            self.pairing.flush("shutdown")
        self.pairing = pairing
        self.compare_engine = None if pairing is None else pairing.engine
        self.messages.pairing = None if pairing is None else pairing.stats
        self._ack_accepted = ACK_ACCEPTED if pairing is None else ACK_ACCEPTED_COMPARE
        self.response_message = None if pairing is None else config.compare.response_message
        if pairing is not None:
            log.info(
                "compare.enabled",
                candidates=list(config.compare.candidates),
                baseline=config.compare.baseline,
                response_message=config.compare.response_message,
            )

    def _use_recorders(self, targets: list[Target]) -> None:
        """Capture targets with `capture.responses` get the primary's response message too: the
        ACK asks HAProxy for it (the compare variable), and it goes to them as well as to compare."""
        self.recorders = [target for target in targets if getattr(target, "records_responses", False)]
        if self.pairing is None:
            self._ack_accepted = ACK_ACCEPTED_COMPARE if self.recorders else ACK_ACCEPTED
            self.response_message = self.recorders[0].response_message if self.recorders else None

    def _retire(self, targets: list[Target], timeout: float) -> None:
        """Targets replaced by a reload finish their queues in the background, then close."""
        self.retired.extend(targets)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for target in targets:
            task = loop.create_task(target.drain(deadline))
            task.add_done_callback(lambda _, target=target: self._retired_done(target))

    def _retired_done(self, target: Target) -> None:
        self.retired.remove(target)
        self.budget.update(self.targets, self.retired)  # what it held is free for the others

    def handle(self, message: Message) -> tuple[SetVar, ...]:
        """The SPOP handler: no work before the ACK, whose one action says whether the copy was
        taken in (ACK_ACCEPTED above)."""
        if self.response_message is not None and message.name == self.response_message:
            return self._take_primary_response(message.args)
        if self.message_names and message.name not in self.message_names:
            self.messages.not_mirror += 1
            return ACK_REFUSED
        args = message.args
        size = _message_bytes(args)
        if len(self._intake) >= INTAKE_LIMIT or self._intake_bytes + size > INTAKE_BYTES:
            self.messages.mirrored += 1
            self._drop_for_every_target("queue_full")
            return ACK_REFUSED
        self._intake_bytes += size
        self._intake.append((args, size))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._process_intake)
        return self._ack_accepted

    def _take_primary_response(self, args: dict[str, Any]) -> tuple[SetVar, ...]:
        """The primary's response goes through the intake like a request, behind the request it
        answers (so the request's pairing entry exists when it is processed), its args paired with the
        time it arrived, from which the primary's latency is measured."""
        size = _message_bytes(args)
        if len(self._intake) >= INTAKE_LIMIT or self._intake_bytes + size > INTAKE_BYTES:
            if self.pairing is not None:
                self.pairing.stats.primary_responses["refused"] += 1
            for recorder in self.recorders:
                counts = recorder.capture_stats.responses
                counts["refused"] = counts.get("refused", 0) + 1
            return ACK_REFUSED
        self._intake_bytes += size
        loop = asyncio.get_running_loop()
        self._intake.append(((args, loop.time()), size))  # type: ignore[arg-type]
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._process_intake)
        return ACK_ACCEPTED

    def _pair_primary_response(self, args: dict[str, Any], arrived: float) -> None:
        pairing = self.pairing
        if self.recorders:
            from .capture.target import record_response

            record_response(self.recorders, args)
        if pairing is None:  # compare switched off by a reload meanwhile
            return
        try:
            key, response = to_primary_response(args, 0.0, pairing.body_limit)
        except BadMessage as error:
            pairing.stats.primary_responses["invalid"] += 1
            suppressed = self._log_throttle.allow(f"response:{error.reason}")
            if suppressed is not None:
                log.warning("compare.bad_response_message", reason=error.reason, error=str(error),
                            suppressed=suppressed)  # fmt: skip
            return
        started = pairing.primary_latency_base(key)
        if started is not None:
            response = dataclasses.replace(response, latency=max(0.0, arrived - started))
        pairing.primary(key, response)

    def _process_intake(self, slice_seconds: float = INTAKE_SLICE) -> None:
        self._scheduled = False
        intake = self._intake
        clock = time.perf_counter
        deadline = clock() + slice_seconds
        # The pools write what this batch places when it ends, in this loop iteration, instead of
        # from a callback in the next (the capture writer's thread is woken once, then).
        batching = self._batching_pools
        for pool in batching:
            pool.hold_writes()
        try:
            while intake:
                if clock() > deadline:
                    self._scheduled = True
                    asyncio.get_running_loop().call_soon(self._process_intake)
                    return
                args, size = intake.popleft()
                self._intake_bytes -= size
                if type(args) is tuple:  # the primary's response (compare), see _take_primary_response
                    self._pair_primary_response(*args)
                    continue
                try:
                    req = to_request(args)
                except BadMessage as error:
                    # Without a method or a path (to_request's first checks) it is no mirror request,
                    # unless message names say which messages are: asked here, not of every message.
                    if not self.message_names and not is_mirror_message(args):
                        self.messages.not_mirror += 1
                        continue
                    self.messages.invalid[error.reason] = self.messages.invalid.get(error.reason, 0) + 1
                    suppressed = self._log_throttle.allow(error.reason)
                    if suppressed is not None:
                        log.warning(
                            "mirror.bad_message", reason=error.reason, error=str(error), suppressed=suppressed
                        )
                    continue
                self.messages.mirrored += 1
                marker = req.header(self.loop_header)
                # Only our own marker is a loop: a client sending the header with any other value is
                # mirrored (the targets replace its value), so it cannot opt out of mirroring.
                if marker is not None and hmac.compare_digest(
                    marker.encode("utf-8", "surrogateescape"), self.loop_value
                ):
                    self._drop_for_every_target("loop")
                    continue
                for target in self.targets:
                    target.offer(req)
        finally:
            for pool in batching:
                pool.release_writes()

    def _drop_for_every_target(self, outcome: str) -> None:
        """A request dropped before the targets see it still gets one outcome on each of them."""
        for target in self.targets:
            target.stats.received += 1
            target.stats.outcomes[outcome] += 1

    async def drain(self, timeout: float) -> tuple[int, int]:
        """After the SPOP side stopped: finish the intake, send what is queued until the deadline.
        Returns (drained, dropped)."""
        self._process_intake(slice_seconds=float("inf"))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        queued = sum(t.pending for t in (*self.targets, *self.retired))
        dropped = 0
        for target in (*self.targets, *self.retired):
            dropped += await target.drain(deadline)
        if self.pairing is not None:  # what still waits for its pair will not get it now
            self.pairing.flush("shutdown")
        return queued - dropped, dropped


def _target_class(config: Any) -> type[Target]:
    """A shadow target, or a capture target (its requests written to files instead of sent)."""
    if config.capture is None:
        return Target
    from .capture.target import CaptureTarget

    return CaptureTarget


_executor: ProcessPoolExecutor | None = None
_executor_pid = 0  # the process that started _executor


def _redaction_executor() -> ProcessPoolExecutor:
    """The one worker process that redacts large bodies, started on first use. Spawned, not forked:
    a fresh interpreter holds none of the agent's sockets or threads. A pool inherited through fork
    is useless (its manager thread stayed in the parent: work given to it never runs), so a forked
    child starts its own."""
    global _executor, _executor_pid
    if _executor is None or _executor_pid != os.getpid():
        _executor = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        _executor_pid = os.getpid()
    return _executor


def _reset_redaction_executor() -> None:
    global _executor
    if _executor is not None:
        _executor.shutdown(wait=False, cancel_futures=True)
    _executor = None


def loop_marker_value(key: bytes) -> str:
    """The loop marker's value: a MAC of a fixed label under `key`, so only an agent holding the key
    can produce it. Replicas given the same `secrets` key recognise each other's mirrors; without a
    key each process draws its own. HMAC-SHA-512, not the SHA-256 of `hmac` redaction, so no value a
    client sends through redaction can be made to come out as the marker."""
    return "v1-" + hmac.new(key, b"spoa-mirror loop marker", hashlib.sha512).hexdigest()[:32]


def is_truncated(req: MirrorRequest) -> bool:
    """HAProxy hands over at most its buffer; the client may have declared more. The client's
    Content-Length is always checked: HAProxy's `req.body_len`, the usual `body_len` argument, is
    the length HAProxy *has* (equal to the cut body), so `body_len` only reveals a cut when it is
    `req.body_size`, the advertised length. A chunked body cut short cannot be told apart."""
    size = len(req.body)
    if req.body_len is not None and req.body_len > size:
        return True
    length = req.header("content-length")
    # ASCII digits only, and no more than int() takes: "\u00b2".isdigit() is true but int() refuses it,
    # as it refuses over 4,300 digits, and either ValueError would escape the intake with the
    # request received but never accounted. Over 19 significant digits is more than any body here.
    if length is None or not length.isascii() or not length.isdigit():
        return False
    digits = length.lstrip("0")
    # With Transfer-Encoding, Content-Length means nothing (RFC 9112 section 6.3): HAProxy framed
    # the body by its chunks and hands over all of it. Looked up only when the length says "cut".
    return (len(digits) > 19 or int(digits or "0") > size) and req.header("transfer-encoding") is None


# A tuple, not `bytes | str`: that expression builds a union object at every call, and isinstance
# with one takes 103 ns against 18 with the tuple (timeit), twice for every message in the intake.
_SIZED = (bytes, str)


def _message_bytes(args: dict[str, Any]) -> int:
    """What a message in the intake holds, near enough: its body and header block (the C agent's
    arg names, or the plain ones). The usual message, a BINARY arg_body and a STRING arg_hdrs that
    is not empty, is measured first without the general lookup; an empty arg_body counts `body`
    when the message has one too, as the or-chains below read it."""
    body = args.get("arg_body")
    headers = args.get("arg_hdrs")
    if type(body) is bytes and type(headers) is str and headers and (body or "body" not in args):
        return len(body) + len(headers)
    body = body or args.get("body") or b""
    headers = headers or args.get("hdrs") or args.get("headers") or b""
    return (len(body) if isinstance(body, _SIZED) else 0) + (
        len(headers) if isinstance(headers, _SIZED) else 0
    )


def _append_forwarded_for(headers: list[tuple[str, str]], src: str) -> list[tuple[str, str]]:
    for index, (name, value) in enumerate(headers):
        if name.lower() == "x-forwarded-for":
            headers = list(headers)
            headers[index] = (name, f"{value}, {src}")
            return headers
    return [*headers, ("X-Forwarded-For", src)]


def shadow_host(host: str) -> str:
    """`host: suffix`: the client's Host with `-shadow` after its name, its port kept. IP literals
    (`[2001:db8::1]:8443`, `192.0.2.1`) have no name to suffix and are sent as they are."""
    if host.startswith("["):
        return host
    name, colon, port = host.partition(":")
    if not name or name.replace(".", "").isdigit():
        return host
    return f"{name}-shadow{colon}{port}"

"""The pairing table: each compared shadow's response held until the primary's arrives, or the other
way round, then handed to the engine; one outcome per request and compared target, always.

HAProxy sends the primary's response as its own SPOE message (haproxy/mirror.spoe.conf's
mirror-response) carrying the request's unique-id; the shadows' responses come back from the
compared targets' pools (capture.py). An entry is made, per unique id, when a compared target sends
the request; it holds the request's method and path, the response of each compared target that sent
it, and the primary's, and is settled, and freed, as soon as every one of them is in. Only entries
are keyed by id: a primary response for an id nobody waits for (the request was not sampled for
any compared target, or was dropped) is counted `unmatched` and never stored.

Bounded three ways, inside the agent's memory budget (mirror.py gives the targets the budget minus
`table.max_bytes`): at most `table.max_entries` entries and `table.max_bytes` bytes (bodies, header
blocks and a fixed overhead per entry), a request or response that would go over is counted
`table_full` at once; and an entry still incomplete `table.deadline` after it was made is settled as
`primary_missing` (no primary response: HAProxy not configured to send it, or the response message
lost) or `shadow_failed` (the shadow never answered in time). Entries are made in deadline order, so
one timer at the oldest entry's deadline sweeps them, at most SWEEP_BATCH per callback.

Outcomes are the engine's (engine.OUTCOMES): identical, different, noise_only from a comparison;
primary_missing, shadow_failed, too_large (the primary's body was cut by HAProxy: the agent never had
all of it), table_full, shutdown without one. A request whose unique id is missing or already in the
table for the same target cannot be paired and counts as primary_missing (logged, rate-limited).
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from spoe.log import LogThrottle

from ..accounting import PairingStats
from ..mirror import Target
from ..request import MirrorRequest
from ..transport import TransportError
from .capture import CapturingPool
from .config import CompareConfig
from .engine import CompareEngine
from .model import Response

log = structlog.get_logger("spoa_mirror")

# What an entry costs beyond the responses it holds: the entry, its dict slots, the key and path
# (measured with tracemalloc: ~600 bytes for an entry with one target and a 60-character id).
ENTRY_OVERHEAD = 640
RESPONSE_OVERHEAD = 200
SWEEP_BATCH = 5000
# The smallest body HAProxy can have cut: its smallest practical buffer (tune.bufsize 4096... minus
# headers and maxrewrite) holds at least this much of a body.
MIN_CUT_BODY = 2048
_WAITING = None  # a target's slot in an entry before its response (or failure) arrived


def response_size(response: Response) -> int:
    return (
        RESPONSE_OVERHEAD
        + len(response.body)
        + sum(len(name) + len(value) + 8 for name, value in response.headers)
    )


class Entry:
    __slots__ = (
        "created",
        "expires",
        "key",
        "method",
        "path",
        "primary",
        "settled",
        "size",
        "table",
        "targets",
    )

    def __init__(self, table: PairingTable, key: str, method: str, path: str, now: float) -> None:
        self.table = table
        self.key = key
        self.method = method
        self.path = path
        self.created = now
        self.expires = now + table.deadline
        self.primary: Response | None = None
        # target name -> None (waiting), its Response, or an outcome string (shadow_failed, table_full)
        self.targets: dict[str, Response | str | None] = {}
        self.size = ENTRY_OVERHEAD + len(key) + len(path)
        self.settled = False


class PairingTable:
    def __init__(self, config: CompareConfig, engine: CompareEngine, stats: PairingStats) -> None:
        self.config = config
        self.engine = engine  # keeps each compared target's account: sent = sum(outcomes) + pending
        self.stats = stats
        self.candidates = frozenset(config.candidates)
        self.baseline = config.baseline
        self.max_entries = config.table.max_entries
        self.max_bytes = config.table.max_bytes
        self.deadline = config.table.deadline
        self.body_limit = config.body_limit
        self.entries: dict[str, Entry] = {}
        self.bytes = 0
        self._sweep: asyncio.TimerHandle | None = None
        self._warned_no_primary = False
        self._log_throttle = LogThrottle()

    # -- the request side ---------------------------------------------------------------------------

    def register(self, target: str, req: MirrorRequest) -> Entry | None:
        """`target` sent `req`: its comparison is now pending. Returns the entry to hand the
        shadow's response to, or None when the outcome is already settled (table_full, no id)."""
        self.engine.request_sent(target)
        key = req.unique_id
        if not key:
            self._unpairable(target, req, "missing_unique_id")
            return None
        entry = self.entries.get(key)
        if entry is None:
            size = ENTRY_OVERHEAD + len(key) + len(req.path)
            if len(self.entries) >= self.max_entries or self.bytes + size > self.max_bytes:
                self.engine.count(target, req.method, req.path, "table_full")
                return None
            loop = asyncio.get_running_loop()
            entry = Entry(self, key, req.method, req.path, loop.time())
            self.entries[key] = entry
            self.bytes += entry.size
            self.stats.entries = len(self.entries)
            self.stats.held_bytes = self.bytes
            if self._sweep is None:
                self._sweep = loop.call_at(entry.expires, self._sweep_expired)
        elif target in entry.targets:
            self._unpairable(target, req, "duplicate_unique_id")
            return None
        entry.targets[target] = _WAITING
        return entry

    def shadow_done(self, entry: Entry, target: str, result: Response | BaseException) -> None:
        """The shadow's response to an entry's request, or the failure that ended it."""
        if entry.settled:
            return  # expired or flushed: its outcome is already counted
        if type(result) is Response:
            size = response_size(result)
            if self.bytes + size > self.max_bytes:
                entry.targets[target] = "table_full"
            else:
                entry.targets[target] = result
                entry.size += size
                self.bytes += size
                self.stats.held_bytes = self.bytes
        else:
            entry.targets[target] = "shadow_failed"
            if not isinstance(result, TransportError):
                log.error("compare.shadow_crashed", target=target, error=repr(result))
        self._complete_if_ready(entry)

    # -- the primary side ---------------------------------------------------------------------------

    def primary(self, key: str, response: Response) -> None:
        entry = self.entries.get(key)
        if entry is None or entry.primary is not None:
            self.stats.primary_responses["unmatched"] += 1
            return
        self.stats.primary_responses["paired"] += 1
        size = response_size(response)
        if self.bytes + size > self.max_bytes:
            self._settle(entry, "table_full")
            return
        entry.primary = response
        entry.size += size
        self.bytes += size
        self.stats.held_bytes = self.bytes
        self._complete_if_ready(entry)

    def primary_latency_base(self, key: str) -> float | None:
        """When the request of `key` was registered (loop time), for the primary's latency."""
        entry = self.entries.get(key)
        return None if entry is None else entry.created

    # -- settling -----------------------------------------------------------------------------------

    def _complete_if_ready(self, entry: Entry) -> None:
        if entry.primary is None or _WAITING in entry.targets.values():
            return
        primary = entry.primary
        cut = primary.body_sha256 is None and len(primary.body) < primary.body_length
        baseline = entry.targets.get(self.baseline) if self.baseline else None
        if type(baseline) is not Response:
            baseline = None
        self._remove(entry)
        engine = self.engine
        for target, result in entry.targets.items():
            if type(result) is str:
                engine.count(target, entry.method, entry.path, result)
            elif cut or _cut_without_length(primary, result):
                engine.count(target, entry.method, entry.path, "too_large")
            else:
                try:
                    if target in self.candidates:
                        engine.compare(target, entry.method, entry.path, primary, result, baseline)
                    else:
                        engine.compare(target, entry.method, entry.path, primary, result)
                except Exception as error:  # counted (different) by the engine; the other targets go on
                    if (suppressed := self._log_throttle.allow("engine")) is not None:
                        log.error(
                            "compare.engine_crashed", target=target, error=repr(error), suppressed=suppressed
                        )

    def _settle(self, entry: Entry, outcome_for_waiting: str) -> None:
        """End an entry before it is complete: targets still waiting get `outcome_for_waiting`, those
        whose response arrived get primary_missing when the primary is what is missing."""
        self._remove(entry)
        for target, result in entry.targets.items():
            if type(result) is str:
                outcome = result
            elif result is _WAITING:
                outcome = outcome_for_waiting
            else:
                outcome = "primary_missing" if entry.primary is None else outcome_for_waiting
            self.engine.count(target, entry.method, entry.path, outcome)

    def _remove(self, entry: Entry) -> None:
        entry.settled = True
        del self.entries[entry.key]
        self.bytes -= entry.size
        self.stats.entries = len(self.entries)
        self.stats.held_bytes = self.bytes

    def _sweep_expired(self) -> None:
        self._sweep = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        entries = self.entries
        for _ in range(SWEEP_BATCH):
            if not entries:
                return
            entry = entries[next(iter(entries))]
            if entry.expires > now:
                self._sweep = loop.call_at(entry.expires, self._sweep_expired)
                return
            if entry.primary is None:
                self._warn_if_no_primary_ever()
                self._settle(entry, "primary_missing")
            else:
                self._settle(entry, "shadow_failed")
        self._sweep = loop.call_soon(self._sweep_expired)  # type: ignore[assignment]

    def _warn_if_no_primary_ever(self) -> None:
        """Comparison configured, yet HAProxy never sent a primary response: say so once, loudly,
        rather than report nothing but primary_missing."""
        if (
            self._warned_no_primary
            or self.stats.primary_responses["paired"] + self.stats.primary_responses["unmatched"]
        ):
            return
        self._warned_no_primary = True
        log.warning(
            "compare.no_primary_responses",
            message=self.config.response_message,
            waited=self.deadline,
            hint="HAProxy sent no response message: add the mirror-response spoe-group and the "
            "http-response wait-for-body / send-spoe-group rules of haproxy/ (README, Compare)",
        )

    def flush(self, outcome: str = "shutdown") -> int:
        """Settle every entry (shutdown, or the table replaced by a reload); returns how many."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        count = len(self.entries)
        for entry in list(self.entries.values()):
            self._settle(entry, outcome)
        return count

    def _unpairable(self, target: str, req: MirrorRequest, reason: str) -> None:
        if (suppressed := self._log_throttle.allow(reason)) is not None:
            log.warning("compare.unpairable", target=target, reason=reason, unique_id=req.unique_id,
                        suppressed=suppressed)  # fmt: skip
        self.engine.count(target, req.method, req.path, "primary_missing")


def _cut_without_length(primary: Response, shadow: Response) -> bool:
    """A primary body without Content-Length (chunked) that HAProxy cut at its buffer: res.body_size
    then counts only up to the chunk in progress, so a cut at a chunk boundary shows nowhere but
    here, as a body that is a strict prefix of the shadow's (tests/test_compare_haproxy_fetches.py).
    Judged too_large rather than different: a candidate that only appends to a chunked body this
    long is reported as not compared, never a false difference."""
    body = primary.body
    return (
        primary.body_sha256 is None
        and len(body) < shadow.body_length
        and len(body) >= MIN_CUT_BODY
        and shadow.body.startswith(body)
        and not any(name.lower() == "content-length" for name, _ in primary.headers)
    )


class _Tagged(bytes):
    """A compared request's payload, carrying its pairing entry through the queue and the pool."""

    entry: Entry | None


class ComparingTarget(Target):
    """A target whose responses are compared: the capturing pool, and the request's entry in the
    pairing table made when the request is sent. Chosen when the target is built, so a target that
    is not compared runs `Target` unchanged."""

    def __init__(self, config: Any, *, pairing: PairingTable, **options: Any) -> None:
        super().__init__(config, **options)
        self.pairing = pairing
        self.concurrency = config.concurrency  # the capturing pool does not pipeline
        self.pool = CapturingPool(
            config.host,
            config.port,
            body_limit=pairing.body_limit,
            ssl_context=self.pool._ssl_context,
            server_hostname=self.pool._server_hostname,
            max_connections=config.concurrency,
            connect_timeout=config.connect_timeout,
            timeout=config.timeout,
        )
        self._request: MirrorRequest | None = None

    def offer(self, req: MirrorRequest) -> None:
        self._request = req
        super().offer(req)

    def _redacted(self, req: MirrorRequest, truncated: bool, size: int, future: Any) -> None:
        self._request = req
        super()._redacted(req, truncated, size, future)

    def _dispatch(self, payload: bytes, head: bool) -> None:
        tagged = _Tagged(payload)
        tagged.entry = None
        pending = self.pending
        super()._dispatch(tagged, head)
        if self.pending > pending and self._request is not None:  # sent or queued, not dropped
            tagged.entry = self.pairing.register(self.name, self._request)

    def _sent(self, result: Any, elapsed: float) -> None:
        response, payload = result
        entry = getattr(payload, "entry", None)
        if entry is not None:
            entry.table.shadow_done(entry, self.name, response)
        super()._sent(response.status if type(response) is Response else response, elapsed)

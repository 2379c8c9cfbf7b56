"""A capture target: a mirror target whose requests are written to GoReplay files instead of sent.

It is a `Target` with two parts swapped: its pool is a CaptureWriter, and each built request is
framed as a GoReplay request payload (header line, the bytes a shadow would have received, the
separator). Checks, sampling, redaction, rate limit, queue, memory budget, stale sweep and drain
are the shadow's, so a capture holds what a shadow with the same settings would have received.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ..config import OutgoingConfig
from ..message import BadMessage, to_primary_response
from ..mirror import TRUNCATED_MARKER, Target
from ..redact import Unredactable
from ..request import MirrorRequest
from ..wire import WireError
from .gor import REQUEST, RESPONSE, Unframeable, encode
from .http1 import build_response
from .writer import CaptureStats, CaptureWriter

# Requests whose primary response is awaited, per target: the response message follows its request
# within HAProxy's response time; past this many the oldest is forgotten (its response unmatched).
AWAITED_RESPONSES = 65536
# HAProxy hands over at most its buffer of a response body; this only bounds a misconfigured sender.
RESPONSE_BODY_LIMIT = 16 * 1024 * 1024

CAPTURED_MARKER = "captured"


def payload_id(unique_id: str | None) -> str:
    """A payload's id, 24 hex characters as GoReplay draws them: derived from HAProxy's unique-id
    when the message carries one (so the primary's response, which carries it too, pairs with its
    request), else random."""
    if unique_id:
        return hashlib.blake2b(unique_id.encode("utf-8", "surrogateescape"), digest_size=12).hexdigest()
    return os.urandom(12).hex()


class CaptureTarget(Target):
    def __init__(self, config: Any, **options: Any) -> None:
        self.records_responses: bool = config.capture.responses
        self.response_message: str = config.capture.response_message
        # unique-id -> when its request was captured (ns), for the requests whose response is awaited
        self.awaited: OrderedDict[str, int] = OrderedDict()
        super().__init__(config, **options)

    def _build_pool(self, config: Any, outgoing: OutgoingConfig) -> CaptureWriter:
        # Kept on the target's stats, which outlive reloads: the counters never go back.
        self.stats.capture = self.stats.capture or CaptureStats()
        writer = CaptureWriter(self.name, config.capture, self.stats.capture)
        self.capture_stats: CaptureStats = writer.stats
        return writer

    def record(self, unique_id: str, response: Any) -> None:
        """The primary's response to a request this target captured: written after it, redacted by
        the target's rules as a request would be (headers, JSON and form fields, patterns)."""
        counts = self.capture_stats.responses
        captured = self.awaited.pop(unique_id, None)
        if captured is None:
            counts["unmatched"] = counts.get("unmatched", 0) + 1
            return
        headers = list(response.headers)
        if response.body_length > len(response.body) and response.body_sha256 is None:
            headers.append(TRUNCATED_MARKER)  # HAProxy handed over only what its buffer held
        try:
            redacted = self.redact(MirrorRequest("GET", "/", "1.1", headers, response.body))
            now = time.time_ns()
            message = build_response(response.status, redacted.headers, redacted.body)
            payload = encode(RESPONSE, payload_id(unique_id), now, max(0, now - captured), message)
        except (Unredactable, Unframeable):
            counts["dropped"] = counts.get("dropped", 0) + 1
            return
        if self.pool.bytes_held + len(payload) > self.memory_budget:
            counts["dropped"] = counts.get("dropped", 0) + 1
            return
        self.pool.submit(payload, self._response_done)

    def _response_done(self, outcome: str, _elapsed: float) -> None:
        counts = self.capture_stats.responses
        counts[outcome] = counts.get(outcome, 0) + 1

    def _build_builder(
        self, config: Any, loop_marker: tuple[str, str], truncated_body: str
    ) -> Callable[..., bytes]:
        # The loop header says "captured" instead of the agent's MAC, which is worth keeping out of
        # files: any request carrying it would skip the agents sharing the key.
        build = super()._build_builder(config, (loop_marker[0], CAPTURED_MARKER), truncated_body)
        clock = time.time_ns

        records = config.capture.responses
        awaited = self.awaited

        def frame(req: MirrorRequest, redacted_truncated: bool | None = None) -> bytes:
            now = clock()
            try:
                payload = encode(REQUEST, payload_id(req.unique_id), now, 0, build(req, redacted_truncated))
            except Unframeable:
                raise WireError("unframeable", "the request holds the GoReplay separator") from None
            if records and req.unique_id:
                awaited[req.unique_id] = now
                if len(awaited) > AWAITED_RESPONSES:
                    awaited.popitem(last=False)
            return payload

        return frame

    def _sent(self, result: Any, elapsed: float) -> None:
        """The writer's outcomes are names (written, disk_full, write_error); anything else (the
        pool closed under a drain) is the shadow's accounting."""
        if type(result) is str and not self.abandoned:
            stats = self.stats
            stats.pending -= 1
            self.pending -= 1
            stats.outcomes[result] += 1
            if result == "written":
                stats.latency.observe(elapsed)
            self._release_slot()
            return
        super()._sent(result, elapsed)


def record_response(recorders: list[CaptureTarget], args: dict[str, Any]) -> None:
    """The response message, decoded once, to every capture target recording responses."""
    try:
        unique_id, response = to_primary_response(args, 0.0, RESPONSE_BODY_LIMIT)
    except BadMessage:
        for target in recorders:
            counts = target.capture_stats.responses
            counts["invalid"] = counts.get("invalid", 0) + 1
        return
    for target in recorders:
        target.record(unique_id, response)

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
from collections.abc import Callable
from typing import Any

from ..config import OutgoingConfig
from ..mirror import Target
from ..request import MirrorRequest
from ..wire import WireError
from .gor import REQUEST, Unframeable, encode
from .writer import CaptureWriter

CAPTURED_MARKER = "captured"


def payload_id(unique_id: str | None) -> str:
    """A payload's id, 24 hex characters as GoReplay draws them: derived from HAProxy's unique-id
    when the message carries one (so the primary's response, which carries it too, pairs with its
    request), else random."""
    if unique_id:
        return hashlib.blake2b(unique_id.encode("utf-8", "surrogateescape"), digest_size=12).hexdigest()
    return os.urandom(12).hex()


class CaptureTarget(Target):
    def _build_pool(self, config: Any, outgoing: OutgoingConfig) -> CaptureWriter:
        return CaptureWriter(self.name, config.capture)

    def _build_builder(
        self, config: Any, loop_marker: tuple[str, str], truncated_body: str
    ) -> Callable[..., bytes]:
        # The loop header says "captured" instead of the agent's MAC, which is worth keeping out of
        # files: any request carrying it would skip the agents sharing the key.
        build = super()._build_builder(config, (loop_marker[0], CAPTURED_MARKER), truncated_body)
        clock = time.time_ns

        def frame(req: MirrorRequest, redacted_truncated: bool | None = None) -> bytes:
            try:
                return encode(REQUEST, payload_id(req.unique_id), clock(), 0, build(req, redacted_truncated))
            except Unframeable:
                raise WireError("unframeable", "the request holds the GoReplay separator") from None

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

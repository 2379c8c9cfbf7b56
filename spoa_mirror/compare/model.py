"""What the comparator compares: one HTTP response, from the primary (sent by HAProxy in the response
message) or from a shadow (read by the transport), as plain immutable data.

A body longer than `compare.body_limit` is kept cut at the limit with the digest of the whole body, so
two large bodies are still compared exactly (by length and digest) without holding them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: tuple[tuple[str, str], ...]  # in order received; names as sent (compared case-insensitively)
    body: bytes  # raw as received (still Content-Encoded), possibly cut at the body limit
    body_length: int  # length of the whole body
    body_sha256: bytes | None  # digest of the whole body when `body` was cut, else None
    latency: float  # seconds; primary: request to response message; shadow: send to response complete

    @property
    def truncated(self) -> bool:
        return self.body_sha256 is not None

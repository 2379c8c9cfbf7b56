"""The mirror request: what HAProxy told us about one client request, decoded once from the SPOP
message and then only read (or copied) by the pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class MirrorRequest:
    method: str
    path: str  # the request target as received: path plus query string
    version: str  # "1.1", "2.0", ...
    headers: list[tuple[str, str]] = field(default_factory=list)  # in order, duplicates kept
    body: bytes = b""
    # The `body_len` arg: the client's declared length with HAProxy's `req.body_size`, or the length
    # HAProxy holds with `req.body_len` (then only Content-Length reveals a truncated body).
    body_len: int | None = None
    unique_id: str | None = None
    src: str | None = None  # client address, for X-Forwarded-For

    def header(self, name: str) -> str | None:
        """First value of a header, case-insensitively. A name of another length is passed over
        without lowering it: a browser's ten-header GET costs 5.7k instead of 7.5k instructions a
        lookup (callgrind), and the intake looks up two or three names per request."""
        lname = name.lower()
        if lname.isascii():
            # Only "İ" lowers to more characters than it has, and to a non-ASCII string: a key
            # that lowers to an ASCII name has that name's length.
            size = len(lname)
            for key, value in self.headers:
                if len(key) == size and key.lower() == lname:
                    return value
            return None
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None

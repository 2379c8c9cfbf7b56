"""The raw HTTP/1.1 messages of a capture file taken apart: a request into what the mirror pipeline
works on (a MirrorRequest), a response into status, headers and body for the comparison.

Capture files come from anywhere (GoReplay's own captures are raw TCP reassembly), so parsing is
strict and failures are a `BadMessage` with a short reason, reported with the payload's file and
offset by the caller; a replayed request is then built again by the agent's own serialiser, which
validates every piece (wire.build_request), so nothing read here reaches a socket unchecked.
"""

from __future__ import annotations

import re

from ..request import MirrorRequest

_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) (\S+) HTTP/(\d\.\d)")
_STATUS_LINE = re.compile(rb"HTTP/(\d\.\d) (\d{3})(?: [^\r\n]*)?")
_MAX_CHUNK_DIGITS = 16


class BadMessage(ValueError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _split(raw: bytes) -> tuple[bytes, list[tuple[str, str]], bytes]:
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        raise BadMessage("no end of header block (CRLF CRLF)")
    lines = raw[:end].split(b"\r\n")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise BadMessage(f"malformed header line {line[:40]!r}")
        headers.append((name.decode("latin-1"), value.strip(b" \t").decode("utf-8", "surrogateescape")))
    return lines[0], headers, raw[end + 4 :]


def _body(headers: list[tuple[str, str]], rest: bytes, *, until_end: bool) -> bytes:
    """The body as the peer meant it: chunked decoded, or Content-Length bytes; without either, the
    rest of the message for a response (read until close), nothing for a request."""
    lowered = {name.lower(): value for name, value in headers}
    if "chunked" in lowered.get("transfer-encoding", "").lower():
        return _dechunk(rest)
    length = lowered.get("content-length")
    if length is not None:
        if not length.isascii() or not length.isdigit() or len(length) > 18:
            raise BadMessage(f"bad Content-Length {length[:20]!r}")
        size = int(length)
        if len(rest) < size:
            raise BadMessage(f"body cut short: {len(rest)} of {size} bytes")
        return rest[:size]
    return rest if until_end else b""


def _dechunk(data: bytes) -> bytes:
    out = []
    position = 0
    while True:
        line_end = data.find(b"\r\n", position)
        if line_end < 0:
            raise BadMessage("chunked body cut short")
        size_text = data[position:line_end].split(b";", 1)[0].strip()
        if not size_text or len(size_text) > _MAX_CHUNK_DIGITS:
            raise BadMessage("bad chunk size")
        try:
            size = int(size_text, 16)
        except ValueError:
            raise BadMessage("bad chunk size") from None
        position = line_end + 2
        if size == 0:
            return b"".join(out)
        if position + size > len(data):
            raise BadMessage("chunked body cut short")
        out.append(data[position : position + size])
        position += size + 2


def parse_request(raw: bytes) -> MirrorRequest:
    first, headers, rest = _split(raw)
    match = _REQUEST_LINE.fullmatch(first)
    if match is None:
        raise BadMessage(f"not an HTTP/1.x request line: {first[:40]!r}")
    method, target, version = match.groups()
    body = _body(headers, rest, until_end=False)
    return MirrorRequest(
        method=method.decode("ascii"),
        path=target.decode("utf-8", "surrogateescape"),
        version=version.decode("ascii"),
        headers=headers,
        body=body,
    )


def parse_response(raw: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    first, headers, rest = _split(raw)
    match = _STATUS_LINE.fullmatch(first)
    if match is None:
        raise BadMessage(f"not an HTTP/1.x status line: {first[:40]!r}")
    return int(match[2]), headers, _body(headers, rest, until_end=True)


def build_response(status: int, headers: list[tuple[str, str]], body: bytes) -> bytes:
    """A response as HTTP/1.1 bytes for a capture file: the headers as recorded, framing replaced by
    a Content-Length for the body as it is."""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
    for name, value in headers:
        if name.lower() in ("content-length", "transfer-encoding") or "\r" in value or "\n" in value:
            continue
        lines.append(f"{name}: {value}")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


_REASONS = {200: "OK", 201: "Created", 204: "No Content", 301: "Moved Permanently", 302: "Found",
            304: "Not Modified", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found", 409: "Conflict", 429: "Too Many Requests", 500: "Internal Server Error",
            502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}  # fmt: skip

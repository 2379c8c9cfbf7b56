"""GoReplay's file format, read and written from its definition (GoReplay's protocol.go,
input_file.go and output_file.go), so `gor --input-file` replays our captures and we replay theirs.

A file is a sequence of payloads. Each payload is a header line, the raw HTTP/1.1 message as it was
on the wire, then the separator line:

    1 8b1f0c2e9a4d6f3b5c7e9a1d 1733340000123456789 0\\n
    POST /orders HTTP/1.1\\r\\n ... \\r\\n\\r\\n{"qty": 2}
    \\n🐵🙈🙉\\n

The header line is `<type> <id> <timestamp ns> [<latency ns>]`, space separated: type `1` is a
request, `2` the original (production) response, `3` a replayed response; the id (GoReplay draws 24
hex characters) pairs a request with its responses; the timestamp is Unix nanoseconds; GoReplay
leaves the latency out of request headers (its `-1`), and we write `0` there. The separator is a
newline, the three monkeys (U+1F435 U+1F648 U+1F649, UTF-8) and a newline: the newline before the
monkeys belongs to the separator, not to the message. There is no escaping, so a message holding
the separator cannot be framed; the writer refuses it (`Unframeable`) rather than write a file
that reads back as two damaged payloads. Files ending in .gz are gzip streams of the same bytes
(the reader also knows gzip by its magic number).
"""

from __future__ import annotations

import gzip
import heapq
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

SEPARATOR = "\n🐵🙈🙉\n".encode()
REQUEST, RESPONSE, REPLAYED_RESPONSE = b"1", b"2", b"3"
PAYLOAD_TYPES = (REQUEST, RESPONSE, REPLAYED_RESPONSE)
GZIP_MAGIC = b"\x1f\x8b"
# A payload larger than this is reported and skipped, never buffered: HAProxy hands the agent at most
# its buffer (16 KiB by default, tune.bufsize up to a few MiB), so 64 MiB is far past any capture.
MAX_PAYLOAD = 64 * 1024 * 1024
_READ_CHUNK = 1024 * 1024
# A damaged file is reported, not flooded: its first damaged part in full, the others in one line at
# the end; past this many damaged parts the rest of the file is skipped.
MAX_ERRORS_PER_FILE = 1000
_MAX_ID = 256


class Unframeable(ValueError):
    """A message that holds the separator: written, it would read back as two damaged payloads."""


@dataclass(frozen=True, slots=True)
class Payload:
    kind: bytes  # REQUEST, RESPONSE or REPLAYED_RESPONSE
    id: str
    timestamp: int  # Unix nanoseconds
    latency: int  # nanoseconds; 0 when not given
    message: bytes  # the raw HTTP/1.1 message
    source: str = ""  # the file it came from
    offset: int = 0  # byte offset of its header line in the (uncompressed) file


@dataclass(frozen=True, slots=True)
class FormatError:
    """A damaged part of a capture file: reported with the file and byte offset, then skipped."""

    source: str
    offset: int
    problem: str

    def __str__(self) -> str:
        return f"{self.source}: byte {self.offset}: {self.problem}"


def header(kind: bytes, payload_id: str, timestamp: int, latency: int = 0) -> bytes:
    return b"%s %s %d %d\n" % (kind, payload_id.encode("ascii"), timestamp, latency)


def encode(kind: bytes, payload_id: str, timestamp: int, latency: int, message: bytes) -> bytes:
    """One payload with its separator, ready to append to a file."""
    record = header(kind, payload_id, timestamp, latency) + message + SEPARATOR
    # A reader ends the payload at the first separator: it must be the one appended here (one that
    # ends in the appended bytes counts too, e.g. a message ending in a newline and the monkeys).
    if record.find(SEPARATOR) != len(record) - len(SEPARATOR):
        raise Unframeable("the message holds the GoReplay separator line")
    return record


def _parse_header(line: bytes) -> tuple[bytes, str, int, int] | str:
    """(kind, id, timestamp, latency) from a header line, or what is wrong with it."""
    fields = line.split(b" ")
    if not 3 <= len(fields) <= 4:
        return f"header line {_show(line)} is not '<type> <id> <timestamp ns> [<latency ns>]'"
    kind, raw_id, raw_time = fields[:3]
    if kind not in PAYLOAD_TYPES:
        return f"payload type {_show(kind)} is not 1, 2 or 3"
    if not raw_id or len(raw_id) > _MAX_ID or not raw_id.isascii() or not raw_id.isalnum():
        return f"payload id {_show(raw_id)} is not 1 to {_MAX_ID} ASCII letters and digits"
    numbers = []
    for name, raw in (("timestamp", raw_time), ("latency", fields[3] if len(fields) == 4 else b"0")):
        digits = raw[1:] if raw.startswith(b"-") else raw
        if not digits.isdigit() or len(digits) > 19:
            return f"{name} {_show(raw)} is not a number of nanoseconds"
        numbers.append(int(raw))
    if numbers[0] < 0:
        return f"timestamp {_show(raw_time)} is negative"
    return kind, raw_id.decode("ascii"), numbers[0], max(numbers[1], 0)


def _show(raw: bytes, limit: int = 60) -> str:
    text = raw[:limit].decode("utf-8", "backslashreplace")
    return repr(text + ("..." if len(raw) > limit else ""))


def open_capture(path: str) -> BinaryIO:
    """The file's bytes, gunzipped when it is a gzip stream (by its magic, whatever its name)."""
    file = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    if file.read(2) == GZIP_MAGIC:
        file.seek(0)
        return gzip.GzipFile(fileobj=file, mode="rb")  # type: ignore[return-value]
    file.seek(0)
    return file


def read_payloads(
    path: str,
    on_error: Callable[[FormatError], None],
    *,
    max_payload: int = MAX_PAYLOAD,
    stream: BinaryIO | None = None,
) -> Iterator[Payload]:
    """The payloads of one file in file order. Damage never raises: each damaged part is reported to
    `on_error` with its byte offset in the uncompressed stream, and reading resumes at the next
    separator, so one bad payload costs that payload only: the first damaged part of a file in full,
    any others in one more error at its end. A file whose first payload is not GoReplay at all is
    reported once as foreign and not read further; a gzip stream that breaks off ends the file with
    one error; past MAX_ERRORS_PER_FILE damaged parts the rest of the file is skipped."""
    errors = 0
    more_from = 0  # offset of the second damaged part

    def report(offset: int, problem: str) -> bool:
        nonlocal errors, more_from
        errors += 1
        if errors == 1:
            on_error(FormatError(path, offset, problem))
        elif errors == 2:
            more_from = offset
        return errors < MAX_ERRORS_PER_FILE

    def report_more() -> None:
        if errors > 1:
            skipped = "; the rest of the file is skipped" if errors >= MAX_ERRORS_PER_FILE else ""
            on_error(FormatError(path, more_from, f"{errors - 1} more damaged parts from here on{skipped}"))

    try:
        file = stream if stream is not None else open_capture(path)
    except OSError as error:
        on_error(FormatError(path, 0, f"cannot open: {error.strerror or error}"))
        return
    try:
        with file:
            buffer = b""
            start = 0  # file offset of buffer[0]
            pos = 0  # where the next payload starts in buffer (sliced off only when reading more)
            skipping = False  # inside an oversized payload: drop bytes until the next separator
            seen = 0  # payloads read, good or bad
            eof = False
            while True:
                cut = buffer.find(SEPARATOR, pos)
                if cut < 0:
                    if pos:
                        buffer, start, pos = buffer[pos:], start + pos, 0
                    if eof:
                        break
                    if len(buffer) > max_payload + len(SEPARATOR):
                        if not skipping:
                            if seen == 0 and not _looks_like_header(buffer):
                                report(start, "not a GoReplay capture (no payload header, no separator)")
                                return
                            if not report(start, f"payload larger than {max_payload} bytes, skipped"):
                                return
                            skipping = True
                        keep = len(SEPARATOR) - 1  # the separator may straddle two reads
                        start += len(buffer) - keep
                        buffer = buffer[-keep:]
                    try:
                        # read1: a gzip stream broken further on still gives what came before the break.
                        chunk = file.read1(_READ_CHUNK)
                    except (OSError, EOFError, zlib.error) as error:
                        report(start + len(buffer), f"compressed stream is damaged: {error}")
                        return
                    if not chunk:
                        eof = True
                    buffer += chunk
                    continue
                record, offset = buffer[pos:cut], start + pos
                pos = cut + len(SEPARATOR)
                seen += 1
                if skipping:
                    skipping = False
                    continue
                if len(record) > max_payload:
                    if not report(offset, f"payload larger than {max_payload} bytes, skipped"):
                        return
                    continue
                newline = record.find(b"\n")
                parsed = _parse_header(record if newline < 0 else record[:newline])
                if isinstance(parsed, str):
                    if seen == 1 and not _looks_like_header(record):
                        report(offset, f"not a GoReplay capture: {parsed}")
                        return
                    if not report(offset, parsed):
                        return
                    continue
                if newline < 0:
                    if not report(offset, "payload has a header line and no message"):
                        return
                    continue
                kind, payload_id, timestamp, latency = parsed
                yield Payload(kind, payload_id, timestamp, latency, record[newline + 1 :], path, offset)
            if buffer.strip(b"\n") and not skipping:
                if seen == 0 and not _looks_like_header(buffer):
                    report(start, "not a GoReplay capture (no payload header, no separator)")
                else:
                    report(start, f"truncated: the last {len(buffer)} bytes end without a separator")
    finally:
        report_more()


def _looks_like_header(data: bytes) -> bool:
    """Whether data starts like a payload header: `1 `, `2 ` or `3 ` then an id."""
    return len(data) > 2 and data[:1] in PAYLOAD_TYPES and data[1:2] == b" "


def merge(
    paths: Iterable[str],
    on_error: Callable[[FormatError], None],
    *,
    max_payload: int = MAX_PAYLOAD,
    reorder_depth: int = 100,
) -> Iterator[Payload]:
    """The payloads of several files (replicas, rotated parts) in timestamp order. Each file is read
    through a small reorder window (GoReplay's read depth) for payloads written slightly out of order;
    files are then merged lazily, so memory holds a window per file, not the files."""
    streams = [
        _reordered(read_payloads(path, on_error, max_payload=max_payload), reorder_depth) for path in paths
    ]
    return heapq.merge(*streams, key=lambda payload: payload.timestamp)


def _reordered(payloads: Iterator[Payload], depth: int) -> Iterator[Payload]:
    window: list[tuple[int, int, Payload]] = []
    for index, payload in enumerate(payloads):
        heapq.heappush(window, (payload.timestamp, index, payload))
        if len(window) > depth:
            yield heapq.heappop(window)[2]
    while window:
        yield heapq.heappop(window)[2]


def capture_files(paths: Iterable[str]) -> list[str]:
    """Files given on the command line, directories expanded to the capture files in them (oldest
    name first, which is the writer's order)."""
    found: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            names = sorted(n for n in os.listdir(path) if n.endswith((".gor", ".gor.gz")))
            found.extend(os.path.join(path, name) for name in names)
        else:
            found.append(path)
    return found

"""GoReplay's file format both ways, from its definition (GoReplay's protocol.go and input_file.go):
fixtures written by hand byte for byte, damaged files, and a fuzz test of the reader."""

from __future__ import annotations

import contextlib
import gzip
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spoa_mirror.capture import gor
from spoa_mirror.capture.http1 import BadMessage, build_response, parse_request, parse_response
from spoa_mirror.capture.info import capture_info

MONKEYS = "🐵🙈🙉".encode()

# A GoReplay capture as `gor --output-file` writes it: a request header line without its latency (GoReplay
# leaves out a latency of -1), the raw request, the separator; the response with its latency.
GOR_FILE = (
    b"1 6a3fc4b1e2d7089a5b1c3d4e 1733340000000000000\n"
    b'POST /orders?id=7 HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 9\r\n\r\n{"qty":2}'
    b"\n" + MONKEYS + b"\n"
    b"2 6a3fc4b1e2d7089a5b1c3d4e 1733340000001000000 2500000\n"
    b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
    b"\n" + MONKEYS + b"\n"
    b"1 7b4ad5c2f3e8190b6c2d4e5f 1733340000500000000\n"
    b"GET /health HTTP/1.1\r\nHost: shop.example\r\n\r\n"
    b"\n" + MONKEYS + b"\n"
)


def read(path: Path, **options: int) -> tuple[list[gor.Payload], list[gor.FormatError]]:
    errors: list[gor.FormatError] = []
    return list(gor.read_payloads(str(path), errors.append, **options)), errors


def test_reads_a_goreplay_file_written_by_hand(tmp_path: Path) -> None:
    path = tmp_path / "gor.gor"
    path.write_bytes(GOR_FILE)
    payloads, errors = read(path)
    assert errors == []
    assert [(p.kind, p.id, p.timestamp, p.latency) for p in payloads] == [
        (b"1", "6a3fc4b1e2d7089a5b1c3d4e", 1733340000000000000, 0),
        (b"2", "6a3fc4b1e2d7089a5b1c3d4e", 1733340000001000000, 2500000),
        (b"1", "7b4ad5c2f3e8190b6c2d4e5f", 1733340000500000000, 0),
    ]
    request = parse_request(payloads[0].message)
    assert (request.method, request.path, request.body) == ("POST", "/orders?id=7", b'{"qty":2}')
    assert request.headers == [("Host", "shop.example"), ("Content-Length", "9")]
    assert parse_response(payloads[1].message) == (201, [("Content-Length", "2")], b"ok")
    # The newline before the monkeys is the separator's, not the message's.
    assert payloads[2].message.endswith(b"\r\n\r\n")
    assert payloads[1].offset == GOR_FILE.index(b"2 6a3f")


def test_writes_what_goreplay_reads(tmp_path: Path) -> None:
    """Our bytes, checked against the format's definition literally (not by our own reader)."""
    message = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
    record = gor.encode(gor.REQUEST, "00ff", 1733340000000000123, 0, message)
    assert (
        record
        == b"1 00ff 1733340000000000123 0\n"
        + message
        + b"\n\xf0\x9f\x90\xb5\xf0\x9f\x99\x88\xf0\x9f\x99\x89\n"
    )
    # GoReplay's reader: lines until one equals the monkeys and a newline; the payload is what came
    # before, less its last newline; the header is split at spaces, at least three fields.
    lines = record.splitlines(keepends=True)
    assert lines[-1] == MONKEYS + b"\n"
    payload = b"".join(lines[:-1])[:-1]
    meta = payload[: payload.index(b"\n")].split(b" ")
    assert meta[0] == b"1" and meta[1] == b"00ff" and int(meta[2]) == 1733340000000000123
    assert payload[payload.index(b"\n") + 1 :] == message
    response = gor.encode(gor.RESPONSE, "00ff", 5, 42, build_response(200, [("X-A", "b")], b"hi\n"))
    assert response.startswith(b"2 00ff 5 42\nHTTP/1.1 200 OK\r\nX-A: b\r\nContent-Length: 3\r\n\r\nhi\n\n")


def test_round_trip_gzip_and_merge_in_timestamp_order(tmp_path: Path) -> None:
    """Two replicas' files, one gzipped, interleaved in time: read back merged by timestamp."""
    first, second = tmp_path / "a.gor", tmp_path / "b.gor.gz"
    first.write_bytes(
        b"".join(
            gor.encode(b"1", f"a{t}", t, 0, b"GET /a%d HTTP/1.1\r\nHost: x\r\n\r\n" % t) for t in (1, 4, 5)
        )
    )
    with gzip.open(second, "wb") as file:
        file.write(
            b"".join(
                gor.encode(b"1", f"b{t}", t, 0, b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n") for t in (2, 3, 6)
            )
        )
    errors: list[gor.FormatError] = []
    merged = list(gor.merge([str(first), str(second)], errors.append))
    assert [p.timestamp for p in merged] == [1, 2, 3, 4, 5, 6]
    assert [p.id for p in merged][:3] == ["a1", "b2", "b3"]
    assert errors == []


def test_a_message_holding_the_separator_is_refused() -> None:
    for message in (b"x\n" + MONKEYS + b"\ny", b"x\n" + MONKEYS, MONKEYS + b"\nx"):
        with pytest.raises(gor.Unframeable):
            gor.encode(b"1", "a", 1, 0, b"GET / HTTP/1.1\r\n\r\n" + message)
    gor.encode(b"1", "a", 1, 0, b"GET / HTTP/1.1\r\n\r\nx" + MONKEYS + b"\n")  # not a line of its own


# Damaged input: one error naming the file and byte offset, the rest still read.


def test_truncated_file_reports_the_offset_of_the_cut_payload(tmp_path: Path) -> None:
    path = tmp_path / "cut.gor"
    cut = GOR_FILE.rindex(b"1 7b4a") + 20
    path.write_bytes(GOR_FILE[:cut])
    payloads, errors = read(path)
    assert len(payloads) == 2
    assert [str(e) for e in errors] == [
        f"{path}: byte {GOR_FILE.rindex(b'1 7b4a')}: truncated: the last 20 bytes end without a separator"
    ]


def test_corrupt_header_skips_that_payload_only(tmp_path: Path) -> None:
    path = tmp_path / "bad.gor"
    damaged = GOR_FILE.replace(
        b"2 6a3fc4b1e2d7089a5b1c3d4e 1733340000001000000", b"2 6a3fc4b1e2d7089a5b1c3d4e 17333x0000001000000"
    )
    path.write_bytes(damaged)
    payloads, errors = read(path)
    assert [p.kind for p in payloads] == [b"1", b"1"]
    assert len(errors) == 1
    assert errors[0].offset == damaged.index(b"2 6a3f") and "timestamp" in errors[0].problem


def test_oversized_payload_is_skipped_without_buffering_it(tmp_path: Path) -> None:
    big = gor.encode(b"1", "big", 2, 0, b"POST / HTTP/1.1\r\nContent-Length: 300000\r\n\r\n" + b"x" * 300_000)
    small = gor.encode(b"1", "small", 3, 0, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    path = tmp_path / "big.gor"
    path.write_bytes(GOR_FILE[: GOR_FILE.index(b"1 7b4a")] + big + small)
    payloads, errors = read(path, max_payload=65536)
    assert [p.id for p in payloads] == ["6a3fc4b1e2d7089a5b1c3d4e", "6a3fc4b1e2d7089a5b1c3d4e", "small"]
    assert len(errors) == 1 and "larger than 65536 bytes" in errors[0].problem
    assert errors[0].offset == GOR_FILE.index(b"1 7b4a")


@pytest.mark.parametrize(
    "content",
    [b'{"json": "document"}\n' * 100, os.urandom(4096), b"", b"1 only a header line\n"],
    ids=["json", "random", "empty", "header-only"],
)
def test_foreign_file_gets_one_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "foreign.bin"
    path.write_bytes(content)
    payloads, errors = read(path)
    assert payloads == []
    assert len(errors) == (0 if not content else 1)
    if errors:
        assert str(errors[0]).startswith(f"{path}: byte 0: ")


def test_corrupt_gzip_keeps_what_came_before(tmp_path: Path) -> None:
    path = tmp_path / "broken.gor.gz"
    compressed = gzip.compress(GOR_FILE * 200)
    path.write_bytes(compressed[: len(compressed) // 2] + b"\x00garbage" * 50)
    payloads, errors = read(path)
    assert 0 < len(payloads) < 600
    # The break is reported where it is; what garbage it decoded to is one more line, not a flood.
    assert 1 <= len(errors) <= 2, errors
    assert str(errors[0]).startswith(f"{path}: byte ")


def test_one_damaged_file_does_not_stop_the_others(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.gor", tmp_path / "bad.gor"
    good.write_bytes(GOR_FILE)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(1000))
    info = capture_info([str(bad), str(good)])
    assert info.requests == 2 and info.responses == 1 and info.paired == 1
    assert len(info.errors) == 1 and info.errors[0].startswith(f"{bad}: byte 0: not a GoReplay capture")


def test_parse_request_refuses_what_is_not_http() -> None:
    for raw in (
        b"GET / HTTP/1.1\r\nHost: x\r\n",
        b"GET /\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 9\r\n\r\nab",
    ):
        with pytest.raises(BadMessage):
            parse_request(raw)
    chunked = parse_request(
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    assert chunked.body == b"abcde"


# Fuzz: whatever the bytes, the reader neither raises nor loses a good payload after damage.

_records = st.lists(
    st.tuples(
        st.sampled_from([b"1", b"2", b"3"]),
        st.from_regex(r"[0-9a-f]{1,24}", fullmatch=True),
        st.integers(0, 2**62),
        st.binary(max_size=200),
    ),
    max_size=6,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=_records, damage=st.binary(max_size=300), cut=st.integers(0, 2000), gzipped=st.booleans())
def test_fuzz_reader_never_raises(
    tmp_path: Path, records: list, damage: bytes, cut: int, gzipped: bool
) -> None:
    kept, framed = [], []
    for kind, payload_id, timestamp, message in records:
        try:
            framed.append(gor.encode(kind, payload_id, timestamp, 0, message))
        except gor.Unframeable:
            continue
        kept.append((kind, payload_id, timestamp, message))
    good = b"".join(framed)
    data = good[:cut] + damage + good[cut:]
    path = tmp_path / ("f.gor.gz" if gzipped else "f.gor")
    path.write_bytes(gzip.compress(data)[: max(0, len(data) - cut)] if gzipped else data)
    errors: list[gor.FormatError] = []
    payloads = list(gor.read_payloads(str(path), errors.append, max_payload=512))
    for error in errors:
        assert str(error).startswith(f"{path}: byte ")
    assert len(errors) <= gor.MAX_ERRORS_PER_FILE
    if not damage and not gzipped:
        assert errors == []
        assert [(p.kind, p.id, p.timestamp, p.message) for p in payloads] == kept


@settings(max_examples=500, deadline=None)
@given(
    head=st.sampled_from(
        [
            b"GET / HTTP/1.1\r\n",
            b"POST /a?b HTTP/1.0\r\n",
            b"HTTP/1.1 200 OK\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n",
            b"",
        ]
    ),
    rest=st.binary(max_size=300)
    | st.lists(
        st.sampled_from([b"\r\n", b"0", b"5", b"z", b"ff", b";ext", b"abcde", b"X-A: b", b":", b" "]),
        max_size=40,
    ).map(b"".join),
)
def test_fuzz_http_parsers_fail_only_with_bad_message(head: bytes, rest: bytes) -> None:
    """A payload's message is whatever the file held: taking it apart fails as BadMessage only."""
    for parse in (parse_request, parse_response):
        with contextlib.suppress(BadMessage):
            parse(head + rest)

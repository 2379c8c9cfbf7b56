"""The contract with HAProxy's spoe-message (spoa_mirror/message.py): which arguments make a mirror
request, under which names and types, and the reason a message that cannot be mirrored is counted
under. Unit tests, so mutation testing can run them by the hundred; tests/test_bad_requests.py drives
the same contract through a running agent."""

from __future__ import annotations

import hashlib
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import pytest

from spoa_mirror.compare.model import Response
from spoa_mirror.message import (
    MAX_HEADERS,
    BadMessage,
    is_mirror_message,
    parse_binary_headers,
    parse_headers,
    parse_text_headers,
    to_primary_response,
    to_request,
)
from spoa_mirror.request import MirrorRequest
from spoe.data import Int64, Uint32
from spoe.errors import InvalidFrame

GET = {"method": "GET", "path": "/"}
C_AGENT_ARGS = {
    "arg_method": "POST",
    "arg_path": "/p?q=1",
    "arg_ver": "1.1",
    "arg_hdrs": "Host: h\r\nX-A:  spaced \t\r\nno colon line\r\n\r\nX-After: ignored\r\n",
    "arg_body": b"body",
}


def test_the_c_agents_arguments() -> None:
    assert to_request(C_AGENT_ARGS) == MirrorRequest(
        "POST", "/p?q=1", "1.1", [("Host", "h"), ("X-A", "spaced")], b"body", None, None, None
    )


@pytest.mark.parametrize(
    "args",
    [
        {"method": "GET", "path": "/x", "ver": "2.0", "hdrs": "Host: h\r\n\r\n", "body": b""},
        {"method": b"GET", "url": b"/x", "version": b"2.0", "headers": b"Host: h\r\n\r\n"},
        {"arg_method": None, "method": "GET", "arg_path": None, "path": "/x", "arg_ver": None,
         "ver": "2.0", "arg_hdrs": None, "hdrs": "Host: h\r\n\r\n", "arg_body": None},
    ],
)  # fmt: skip
def test_plain_names_and_aliases_and_bytes(args: dict[str, Any]) -> None:
    assert to_request(args) == MirrorRequest("GET", "/x", "2.0", [("Host", "h")], b"", None, None, None)


def test_optional_arguments_and_defaults() -> None:
    req = to_request({"method": "GET", "path": "/", "body_len": Int64(12), "src": IPv6Address("::1"),
                      "unique_id": "u-1"})  # fmt: skip
    assert (req.version, req.headers, req.body, req.body_len, req.src, req.unique_id) == (
        "1.1", [], b"", 12, "::1", "u-1"
    )
    assert type(req.body_len) is int
    req = to_request({"arg_method": "GET", "arg_path": "/", "arg_unique_id": "u-2", "arg_src": "10.0.0.1",
                      "arg_body_len": 0, "body": "text é"})  # fmt: skip
    assert (req.unique_id, req.src, req.body_len, req.body) == ("u-2", "10.0.0.1", 0, "text é".encode())
    assert to_request({"method": "GET", "path": "/", "unique-id": b"u-3"}).unique_id == "u-3"
    assert to_request({"method": "GET", "path": "/", "src": IPv4Address("192.0.2.1")}).src == "192.0.2.1"


@pytest.mark.parametrize(
    ("args", "reason", "detail"),
    [
        ({"path": "/"}, "missing_method", "no method argument (one of arg_method, method)"),
        ({"method": "GET"}, "missing_path", "no path argument (one of arg_path, path, url)"),
        ({"method": 5, "path": "/"}, "bad_method", "method must be a string, got int"),
        ({**GET, "ver": Uint32(2)}, "bad_version", "version must be a string, got Uint32"),
        ({**GET, "body": 5}, "bad_body", "body must be BINARY, got int"),
        ({**GET, "hdrs": 5}, "bad_headers", "headers must be STRING or BINARY, got int"),
        ({**GET, "body_len": "9"}, "bad_body_len", "body_len must be an integer, got str"),
        ({**GET, "body_len": True}, "bad_body_len", "body_len must be an integer, got bool"),
        ({**GET, "src": 5}, "bad_src", "src must be an address, got int"),
        ({**GET, "unique_id": 5}, "bad_unique_id", "unique_id must be a string, got int"),
    ],
)  # fmt: skip
def test_what_cannot_be_mirrored_says_why(args: dict[str, Any], reason: str, detail: str) -> None:
    with pytest.raises(BadMessage) as info:
        to_request(args)
    assert (info.value.reason, str(info.value)) == (reason, f"{reason}: {detail}")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({"arg_method": "GET", "arg_path": "/"}, True),
        ({"method": "GET", "url": "/"}, True),
        ({"arg_method": "GET"}, False),
        ({"arg_path": "/"}, False),
        ({"ip": "10.0.0.1"}, False),
        ({"arg_method": None, "method": "GET", "arg_path": None, "path": "/"}, True),
    ],
)
def test_a_mirror_message_has_a_method_and_a_path(args: dict[str, Any], expected: bool) -> None:
    assert is_mirror_message(args) is expected


def test_binary_header_blocks() -> None:
    block = b"\x04Host\x01h\x04X-\xc3\xa9\x02\xc3\xa9" + b"\x00\x00"
    assert parse_binary_headers(block) == [("Host", "h"), ("X-é", "é")]
    assert parse_headers(block) == [("Host", "h"), ("X-é", "é")]
    assert parse_binary_headers(b"\x00\x00\x04Host\x01h") == []
    with pytest.raises(InvalidFrame) as info:
        parse_binary_headers(b"\x04Host\x01h")
    assert str(info.value) == "binary header block without its end marker"
    # An empty value is a header, not the end of the block.
    assert parse_binary_headers(b"\x07X-Empty\x00\x01B\x011\x00\x00") == [("X-Empty", ""), ("B", "1")]
    # Not a binary block after all: read as text.
    assert parse_headers(b"Host: h\r\n\r\n") == [("Host", "h")]
    assert parse_headers("Host: h\r\n") == [("Host", "h")]


def test_text_header_blocks_keep_order_duplicates_and_inner_colons() -> None:
    block = "A: 1\r\nB: x:y\r\nA: 2\r\n:empty name\r\n\r\n"
    assert parse_text_headers(block) == [("A", "1"), ("B", "x:y"), ("A", "2"), ("", "empty name")]
    assert parse_text_headers("") == []


def test_bytes_that_are_not_utf8_travel_unchanged() -> None:
    """STRING and BINARY arguments are bytes on the wire: what is not UTF-8 is kept as surrogates and
    written back byte for byte by the wire layer (surrogateescape), never refused or replaced."""
    raw = b"\xff\xfe"
    text = raw.decode("utf-8", "surrogateescape")
    req = to_request({"method": raw, "path": b"/" + raw, "ver": raw, "unique_id": raw, "body": text,
                      "hdrs": b"X-Raw: " + raw + b"\r\n\r\n"})  # fmt: skip
    assert (req.method, req.path, req.version, req.unique_id) == (text, "/" + text, text, text)
    assert req.body == raw
    assert req.headers == [("X-Raw", text)]
    binary = b"\x02\xff\xfe\x02\xff\xfe\x00\x00"
    assert parse_binary_headers(binary) == [(text, text)]


def test_header_values_lose_only_spaces_and_tabs_around_them() -> None:
    assert parse_text_headers("A: \x0b v \t\x0c\r\n\r\n") == [("A", "\x0b v \t\x0c")]
    assert parse_text_headers("A: X-y X\r\n\r\n") == [("A", "X-y X")]


def test_text_header_blocks_are_capped_at_max_headers_lines() -> None:
    """Exactly MAX_HEADERS lines pass; one more is refused; lines after the block's blank line are
    not headers and never count."""
    lines = [f"x-{n}: v" for n in range(MAX_HEADERS + 1)]
    at_cap = "\r\n".join(lines[:MAX_HEADERS]) + "\r\n\r\n"
    assert parse_text_headers(at_cap) == [(f"x-{n}", "v") for n in range(MAX_HEADERS)]
    with pytest.raises(BadMessage) as caught:
        parse_text_headers("\r\n".join(lines) + "\r\n\r\n")
    assert str(caught.value) == f"too_many_headers: more than {MAX_HEADERS} header lines"
    after_the_blank_line = "a: 1\r\n\r\n" + "\r\n".join(lines) + "\r\n"
    assert parse_text_headers(after_the_blank_line) == [("a", "1")]
    assert parse_text_headers("a: 1\r\nb: 2") == [("a", "1"), ("b", "2")]


def test_header_lookup_is_case_insensitive_whatever_the_lengths() -> None:
    """MirrorRequest.header passes over names of another length unlowered; what lowers to the name
    asked for is still found: the Kelvin sign K lowers to an ASCII k of the same length, and a
    non-ASCII name ("İ" lowers to two characters) takes the full comparison."""
    req = MirrorRequest("GET", "/", "1.1", [("X-a", "1"), ("Content-Length", "7"), ("\u212aey", "k"),
                                             ("\u0130d", "i"), ("Content-Length", "8")])  # fmt: skip
    assert req.header("content-length") == "7"
    assert req.header("CONTENT-LENGTH") == "7"
    assert req.header("key") == "k"
    assert req.header("i\u0307d") == "i"
    assert req.header("\u0130D") == "i"
    assert req.header("x-b") is None and req.header("content-lengt") is None


def test_optional_args_under_either_name() -> None:
    """body_len, src and unique_id are read under the C agent's name first, then the plain one (and
    unique-id); absent, they are None."""
    plain = to_request({**GET, "body_len": Uint32(3), "src": IPv4Address("192.0.2.1"), "unique-id": b"u1"})
    assert (plain.body_len, plain.src, plain.unique_id) == (3, "192.0.2.1", "u1")
    prefixed = to_request({**GET, "arg_body_len": 4, "arg_src": "192.0.2.2", "arg_unique_id": "u2"})
    assert (prefixed.body_len, prefixed.src, prefixed.unique_id) == (4, "192.0.2.2", "u2")
    bare = to_request(GET)
    assert (bare.body_len, bare.src, bare.unique_id) == (None, None, None)


def test_a_unique_id_haproxy_sent_as_null_is_no_unique_id() -> None:
    """HAProxy sends an argument whose sample fetch failed as NULL: `unique-id` with no
    unique-id-format set is then no unique id, and the request is still mirrored."""
    request = to_request({**GET, "unique-id": None})
    assert (request.path, request.unique_id) == ("/", None)


RESPONSE_HEADERS = (("Content-Type", "text/plain"), ("X-A", "1"))


def test_the_primary_response_message_under_each_name() -> None:
    """The compare section's response message (haproxy/mirror.spoe.conf's mirror-response): the
    unique id, status and headers under each of their names, the body, and the latency given; an
    int subclass from the SPOP decoder becomes a plain int."""
    block = "Content-Type: text/plain\r\nX-A: 1\r\n\r\n"
    for id_name in ("arg_unique_id", "unique_id", "unique-id"):
        for status_name in ("arg_status", "status"):
            for headers_name in ("arg_hdrs", "hdrs", "headers"):
                args = {id_name: "u1", status_name: Int64(201), headers_name: block, "body": b"abc"}
                key, response = to_primary_response(args, 0.25, 1024)
                assert key == "u1"
                assert response == Response(201, RESPONSE_HEADERS, b"abc", 3, None, 0.25)
                assert type(response.status) is int
    key, response = to_primary_response({"unique-id": b"u2", "status": 204}, 0.5, 1024)
    assert (key, response) == ("u2", Response(204, (), b"", 0, None, 0.5))


def test_the_primary_response_status_must_be_an_http_status_code() -> None:
    """100 to 999 pass; anything else, a bool, a string or none at all is refused as bad_status."""
    for status in (100, 999):
        assert to_primary_response({"unique_id": "u", "status": status}, 0.0, 16)[1].status == status
    for status in (99, 1000, True, "200", None):
        with pytest.raises(BadMessage) as caught:
            to_primary_response({"unique_id": "u", "status": status}, 0.0, 16)
        assert str(caught.value) == f"bad_status: status must be an HTTP status code, got {status!r}"


def test_the_primary_response_needs_a_unique_id() -> None:
    """Without a unique id a response pairs with nothing: none at all and an empty one (HAProxy's
    unique-id-format unset) are each refused, with a message saying which."""
    with pytest.raises(BadMessage) as caught:
        to_primary_response({"status": 200}, 0.0, 16)
    names = "arg_unique_id, unique_id, unique-id"
    assert str(caught.value) == f"missing_unique_id: no unique_id argument (one of {names})"
    with pytest.raises(BadMessage) as caught:
        to_primary_response({"unique_id": "", "status": 200}, 0.0, 16)
    assert str(caught.value) == "missing_unique_id: empty unique_id (HAProxy's unique-id-format unset?)"


def test_a_primary_body_cut_by_haproxy_or_over_the_limit() -> None:
    """A `body_len` over the bytes sent is a body HAProxy cut: its length is the declared one, with no
    digest (the whole body never came). One at or under the bytes sent, or a bool, changes nothing.
    A body over `body_limit` is kept cut at it with the digest of the whole; one at it is whole."""
    base = {"unique_id": "u", "status": 200, "body": b"abcdef"}
    for name in ("arg_body_len", "body_len"):
        cut_by_haproxy = to_primary_response({**base, name: Uint32(9)}, 0.0, 16)[1]
        assert cut_by_haproxy == Response(200, (), b"abcdef", 9, None, 0.0)
    for declared in (6, 2):
        assert to_primary_response({**base, "body_len": declared}, 0.0, 16)[1].body_length == 6
    assert to_primary_response({**base, "body": b"", "body_len": True}, 0.0, 16)[1].body_length == 0
    cut = to_primary_response(base, 0.0, 4)[1]
    assert cut == Response(200, (), b"abcd", 6, hashlib.sha256(b"abcdef").digest(), 0.0)
    assert to_primary_response(base, 0.0, 6)[1] == Response(200, (), b"abcdef", 6, None, 0.0)

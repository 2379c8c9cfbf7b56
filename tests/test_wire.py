"""build_request: what goes on the wire to the shadow, checked byte for byte and, for the safety rules,
by what a real server parses out of it."""

from __future__ import annotations

import socket

import httptools
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spoa_mirror import wire
from spoa_mirror.wire import WireError, build_request
from tests.support.shadow import ShadowServer


def parse(raw: bytes) -> list[tuple[str, str, list[tuple[str, str]], bytes]]:
    """Every request llhttp finds in `raw`, as (method, target, headers, body)."""

    class Collector:
        def __init__(self) -> None:
            self.requests: list[tuple[str, str, list[tuple[str, str]], bytes]] = []
            self.target = b""
            self.headers: list[tuple[str, str]] = []
            self.body = b""

        def on_url(self, url: bytes) -> None:
            self.target += url

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers.append((name.decode(), value.decode("utf-8", "surrogateescape")))

        def on_body(self, body: bytes) -> None:
            self.body += body

        def on_message_complete(self) -> None:
            method = parser.get_method().decode()
            self.requests.append((method, self.target.decode(), self.headers, self.body))
            self.target, self.headers, self.body = b"", [], b""

    collector = Collector()
    parser = httptools.HttpRequestParser(collector)
    parser.feed_data(raw)
    return collector.requests


def test_typical_get_exact_bytes() -> None:
    raw = build_request(
        "GET", "/search?q=a&b=c", [("Accept", "*/*"), ("User-Agent", "curl/8")], b"", "shadow:8080"
    )
    assert raw == (
        b"GET /search?q=a&b=c HTTP/1.1\r\n"
        b"Host: shadow:8080\r\n"
        b"Accept: */*\r\n"
        b"User-Agent: curl/8\r\n"
        b"\r\n"
    )


def test_no_headers_at_all() -> None:
    assert build_request("GET", "/", [], b"", "h") == b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"


def test_host_is_replaced_and_first() -> None:
    headers = [("X-A", "1"), ("Host", "prod.example"), ("host", "again")]
    raw = build_request("GET", "/", headers, b"", "shadow")
    [(_, _, headers, _)] = parse(raw)
    assert headers == [("Host", "shadow"), ("X-A", "1")]


def test_content_length_is_recomputed_from_the_body() -> None:
    raw = build_request("POST", "/upload", [("Content-Length", "999"), ("X-A", "1")], b"hello", "h")
    assert raw.endswith(b"\r\n\r\nhello")
    [(method, _, headers, body)] = parse(raw)
    assert (method, body) == ("POST", b"hello")
    assert headers == [("Host", "h"), ("Content-Length", "5"), ("X-A", "1")]


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
def test_body_methods_get_content_length_zero_when_empty(method: str) -> None:
    [(_, _, headers, body)] = parse(build_request(method, "/", [], b"", "h"))
    assert ("Content-Length", "0") in headers and body == b""


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE", "OPTIONS"])
def test_bodiless_methods_get_no_content_length(method: str) -> None:
    raw = build_request(method, "/", [("Content-Length", "0")], b"", "h")
    assert b"content-length" not in raw.lower()


def test_a_get_with_a_body_keeps_it_framed() -> None:
    [(_, _, headers, body)] = parse(build_request("GET", "/", [], b"{}", "h"))
    assert ("Content-Length", "2") in headers and body == b"{}"


def test_duplicates_kept_in_order() -> None:
    headers = [("Cookie", "a=1"), ("X-B", "2"), ("Cookie", "b=2"), ("x-b", "3")]
    [(_, _, parsed, _)] = parse(build_request("GET", "/", headers, b"", "h"))
    assert parsed[1:] == headers


@pytest.mark.parametrize(
    "name",
    [
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Expect",
        "connection",
        "TRANSFER-ENCODING",
    ],
)
def test_hop_by_hop_and_expect_dropped(name: str) -> None:
    raw = build_request("POST", "/", [("X-Before", "1"), (name, "whatever"), ("X-After", "2")], b"ab", "h")
    [(_, _, headers, body)] = parse(raw)
    assert headers == [("Host", "h"), ("Content-Length", "2"), ("X-Before", "1"), ("X-After", "2")]
    assert body == b"ab"


def test_headers_named_by_connection_are_dropped() -> None:
    headers = [("X-Trace", "t"), ("Connection", "close, X-Trace"), ("X-Keep", "k"), ("x-debug", "d")]
    headers.append(("Connection", " X-Debug ,"))
    [(_, _, parsed, _)] = parse(build_request("GET", "/", headers, b"", "h"))
    assert parsed == [("Host", "h"), ("X-Keep", "k")]


def test_connection_keep_alive_alone_drops_nothing_else() -> None:
    headers = [("Connection", "keep-alive"), ("Keep-Alive", "timeout=5"), ("X-A", "1")]
    [(_, _, parsed, _)] = parse(build_request("GET", "/", headers, b"", "h"))
    assert parsed == [("Host", "h"), ("X-A", "1")]


@pytest.mark.parametrize("connection", [None, "close, X-Trace"])
def test_http2_pseudo_headers_never_reach_the_http1_wire(
    connection: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`:authority`, `:path`... are not HTTP/1.1 fields: dropped, with or without a Connection header
    naming more headers (which rebuilds the header lines on another path). The name cache starts
    empty, so each name is classified here, not by whichever test saw it first."""
    monkeypatch.setattr(wire, "_validated_lowercase_names", {})
    headers = [
        (":method", "GET"),
        (":authority", "app.test"),
        ("X-A", "1"),
        (":path", "/evil"),
        ("X-Trace", "t"),
    ]
    if connection is not None:
        headers.append(("Connection", connection))
    raw = build_request("GET", "/", headers, b"", "h")
    [(_, _, parsed, _)] = parse(raw)
    assert b":" not in raw.split(b"\r\n", 1)[1].replace(b": ", b"")
    assert parsed == [("Host", "h"), ("X-A", "1")] + ([("X-Trace", "t")] if connection is None else [])


def test_non_utf8_bytes_round_trip() -> None:
    """The SPOP decoder turns bytes into str with surrogateescape; the original bytes must come back."""
    target = b"/caf\xe9?x=\xff".decode("utf-8", "surrogateescape")
    value = b"na\xefve \xc3\xa9".decode("utf-8", "surrogateescape")
    raw = build_request("GET", target, [("X-Raw", value)], b"", "h")
    assert raw == b"GET /caf\xe9?x=\xff HTTP/1.1\r\nHost: h\r\nX-Raw: na\xefve \xc3\xa9\r\n\r\n"


@pytest.mark.parametrize("method", ["GET", "PURGE", "M-SEARCH", "X_CUSTOM!"])
def test_token_methods_accepted(method: str) -> None:
    assert build_request(method, "/", [], b"", "h").startswith(f"{method} / HTTP/1.1\r\n".encode())


@pytest.mark.parametrize("method", ["", "GET /x HTTP/1.1\r\nX:", "G T", "GET\r", "GÉT", "(GET)", "GET\x00"])
def test_bad_methods_refused(method: str) -> None:
    with pytest.raises(WireError) as caught:
        build_request(method, "/", [], b"", "h")
    assert caught.value.reason == "bad_method"


@pytest.mark.parametrize(
    "target",
    [
        "",
        "x",
        "http://absolute/form",
        "/a b",
        "/a\tb",
        "/a\rb",
        "/a\nb",
        "/a\x00b",
        "/a\x7fb",
        "/a\x01",
        "/x HTTP/1.1\r\nHost: evil\r\n\r\nGET /smuggled",
        "*",
    ],
)
def test_bad_targets_refused(target: str) -> None:
    with pytest.raises(WireError) as caught:
        build_request("GET", target, [], b"", "h")
    assert caught.value.reason == "bad_target"


def test_asterisk_target_only_for_options() -> None:
    assert build_request("OPTIONS", "*", [], b"", "h").startswith(b"OPTIONS * HTTP/1.1\r\n")


@pytest.mark.parametrize(
    "value", ["a\r\nX-Injected: 1", "a\rb", "a\nb", "a\x00b", "\r\n\r\nGET /smuggled HTTP/1.1"]
)
def test_breaking_header_values_refused(value: str) -> None:
    with pytest.raises(WireError) as caught:
        build_request("GET", "/", [("X-Fine", "ok"), ("X-Evil", value)], b"", "h")
    assert caught.value.reason == "bad_header"
    assert "X-Evil" in str(caught.value)


def test_breaking_value_refused_even_in_a_dropped_header() -> None:
    with pytest.raises(WireError):
        build_request("GET", "/", [("Connection", "close\r\nX-Injected: 1")], b"", "h")


@pytest.mark.parametrize(
    "name", ["", "X Space", "X:Colon", "X\r\nY", "Ünicode", "X\x00", "(x)", ":", ":a b", "::x", ":\r\nX"]
)
def test_bad_header_names_refused(name: str) -> None:
    with pytest.raises(WireError) as caught:
        build_request("GET", "/", [(name, "v")], b"", "h")
    assert caught.value.reason == "bad_header"


@pytest.mark.parametrize("host", ["", "h\r\nX-Injected: 1", "h\x00"])
def test_bad_host_refused(host: str) -> None:
    with pytest.raises(WireError) as caught:
        build_request("GET", "/", [], b"", host)
    assert caught.value.reason in ("bad_host", "bad_header")


def test_lone_surrogate_refused() -> None:
    with pytest.raises(WireError) as caught:
        build_request("GET", "/", [("X-A", "\ud800")], b"", "h")
    assert caught.value.reason == "bad_encoding"


def test_wire_error_is_a_value_error() -> None:
    assert issubclass(WireError, ValueError)


@given(
    method=st.text(min_size=1, max_size=8),
    target=st.text(max_size=20),
    headers=st.lists(st.tuples(st.text(max_size=8), st.text(max_size=12)), max_size=4),
    body=st.binary(max_size=8),
)
def test_never_more_or_less_than_one_request(
    method: str, target: str, headers: list[tuple[str, str]], body: bytes
) -> None:
    """Whatever comes in, the output is refused or parses as exactly one request with the target,
    body and (end-to-end) header values it was given."""
    try:
        raw = build_request(method, target, headers, body, "shadow")
    except WireError:
        return
    [(parsed_method, parsed_target, parsed_headers, parsed_body)] = parse(raw)
    assert parsed_method == method
    assert parsed_target.encode("latin-1") == target.encode("utf-8", "surrogateescape")
    assert parsed_body == body
    assert parsed_headers[0] == ("Host", "shadow")


def test_a_real_server_sees_exactly_what_was_built() -> None:
    headers = [("Accept", "*/*"), ("Cookie", "a=1"), ("Cookie", "b=2"), ("Connection", "close")]
    raw = build_request("PUT", "/items/7?x=1", headers, b'{"a": 1}', "shadow.test")
    with ShadowServer() as shadow, socket.create_connection((shadow.host, shadow.port), timeout=5) as sock:
        sock.sendall(raw)
        [request] = shadow.wait_for(1)
    assert request.raw == raw
    assert (request.method, request.target, request.body) == ("PUT", "/items/7?x=1", b'{"a": 1}')
    assert request.headers == [
        ("Host", "shadow.test"),
        ("Content-Length", "8"),
        ("Accept", "*/*"),
        ("Cookie", "a=1"),
        ("Cookie", "b=2"),
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("G T", "/", [], b"", "h"), "bad_method: 'G T'"),
        (("GET", "x", [], b"", "h"), "bad_target: 'x'"),
        (("GET", "/", [], b"", ""), "bad_host: empty"),
        (("GET", "/", [("X A", "1")], b"", "h"), "bad_header: name 'X A'"),
        (("GET", "/", [("Te", "a\r\nb")], b"", "h"), "bad_header: value of 'Te'"),
        (("GET", "/", [("X-A", "a\nb")], b"", "h"), "bad_header: value of 'X-A'"),
        (("GET", "/", [], b"", "h\r\nX: y"), "bad_header: value of 'Host'"),
        (("GET", "/", [("X-A", "\ud800")], b"", "h"),
         "bad_encoding: 'utf-8' codec can't encode character '\\ud800' in position 30: surrogates not "
         "allowed"),
    ],
)  # fmt: skip
def test_each_refusal_says_what_and_where(args: tuple, message: str) -> None:
    """The reason is the metrics label; the text names the offending field for logs and errors."""
    with pytest.raises(WireError) as info:
        build_request(*args)
    assert str(info.value) == message
    assert str(WireError("bad_method")) == "bad_method"


def test_connection_options_without_spaces_are_dropped_too() -> None:
    headers = [("Connection", "close,X-Trace"), ("X-Trace", "1"), ("X-Keep", "2")]
    raw = build_request("GET", "/", headers, b"", "h")
    assert raw == b"GET / HTTP/1.1\r\nHost: h\r\nX-Keep: 2\r\n\r\n"


def test_hop_by_hop_names_in_any_case_are_dropped_the_first_time_they_are_seen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Header names are validated and lowercased once, then cached (bounded): a name's first
    appearance must be classified as well as its later ones, and the cache stops at its limit."""
    monkeypatch.setattr(wire, "_validated_lowercase_names", {})
    monkeypatch.setattr(wire, "_VALIDATED_NAMES_LIMIT", 3)
    headers = [("CONNECTION", "close"), ("tRaNsFeR-eNcOdInG", "chunked"), ("X-A", "1"), ("X-B", "2")]
    for _ in range(2):
        raw = build_request("GET", "/", headers, b"", "h")
        assert raw == b"GET / HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nX-B: 2\r\n\r\n"
    cached = {"CONNECTION": "connection", "tRaNsFeR-eNcOdInG": "transfer-encoding", "X-A": "x-a"}
    assert wire._validated_lowercase_names == cached


@pytest.mark.parametrize("name", ["Host", "Content-Length", "Transfer-Encoding", "Expect"])
@pytest.mark.parametrize("value", ["a\rb", "a\nb", "a\x00b", "\r\n"])
def test_each_breaking_character_refused_in_every_dropped_header(name: str, value: str) -> None:
    """Dropped headers are checked by three substring tests, one per character: each must refuse."""
    with pytest.raises(WireError) as caught:
        build_request("GET", "/", [(name, value)], b"", "h")
    assert caught.value.reason == "bad_header"


@pytest.mark.parametrize("target", ["/caf\u00e9", "/a\u00a0b", "/a\x85b", "/a\u2028b", "/%20?q=\u00e9"])
def test_targets_the_printable_shortcut_passes_over_still_go_out(target: str) -> None:
    """Non-ASCII that is not a control character or space in the ASCII range goes out as before,
    whether isprintable() (the shortcut) says so or the pattern decides."""
    assert build_request("GET", target, [], b"", "h").startswith(f"GET {target} HTTP/1.1\r\n".encode())

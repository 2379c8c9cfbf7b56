"""Redaction's output byte for byte on the shapes a request body, path and query take: each part of
a multipart body by its own rule, bodies under gzip and deflate (re-encoded in the framing they came
in), percent-encoded paths, JSON by media type and size, text that is not UTF-8, `;`-separated
queries, the worker process's entry point. The canary tests (test_redact_defaults.py) prove no
secret leaves; these prove everything else arrives as it was sent, and each is exact so that a
change in the redactor's walk shows (written against the survivors of `scripts/mutation.sh
spoa_mirror/redact.py`)."""

from __future__ import annotations

import gzip
import hmac
import json
import zlib

import pytest

from spoa_mirror import redact as redact_module
from spoa_mirror.redact import (
    DECODED_BODY_LIMIT,
    JSON_PARSE_LIMIT,
    MASK,
    MULTIPART_DEPTH_LIMIT,
    Unredactable,
    build_redactor,
    redact_in_worker,
)
from spoa_mirror.request import MirrorRequest

KEY = b"k" * 32
CARD = "4111 1111 1111 1111"
ENCODED_MASK = "%5BREDACTED%5D"
NEVER_MATCHES = {"patterns": {"never": {"regex": "NEVER-SEEN-ANYWHERE", "action": "mask"}}}


def redacted(
    spec: dict | None, headers: list[tuple[str, str]], body: bytes = b"", path: str = "/"
) -> tuple[MirrorRequest, MirrorRequest, list[str]]:
    """(the request, what the redactor made of it, the rules it reported)"""
    seen: list[str] = []
    redact = build_redactor(spec, "r", KEY, seen.append)
    req = MirrorRequest("POST", path, "1.1", headers, body, len(body))
    return req, redact(req), seen


def hmac_of(value: bytes) -> str:
    return "hmac-sha256:" + hmac.digest(KEY, value, "sha256").hex()[:32]


def part(name: str, content: bytes, extra: bytes = b"") -> bytes:
    return b'Content-Disposition: form-data; name="' + name.encode() + b'"' + extra + b"\r\n\r\n" + content


# Multipart ---------------------------------------------------------------------------------------


def test_each_multipart_part_is_handled_by_its_own_rule_and_the_rest_keeps_its_bytes() -> None:
    """remove drops the part and its delimiter, hmac hashes it, keep exempts a secret-looking name, a
    part without a blank line is left as it is and the parts after it are still handled, a part's
    own headers are scanned (a card in a file name) and its content by its own type, and a part
    that does not end in CRLF gets none added."""
    spec = {"form_fields": {"drop_me": "remove", "hashed": "hmac", "pin": "keep"}}
    parts = [
        part("drop_me", b"value1\r\n"),
        part("hashed", b"value2\r\n"),
        part("pin", b"1234\r\n"),
        b"no blank line here\r\n",
        part(
            "file", b"password=hunter2\r\n", f'; filename="{CARD}.txt"\r\nContent-Type: text/plain'.encode()
        ),
        part("password", b"s3cret"),
    ]
    body = b"".join(b"--b1\r\n" + each for each in parts) + b"--b1--\r\n"
    headers = [("Content-Type", "multipart/form-data; boundary=b1")]
    req, out, seen = redacted(spec, headers, body)
    expected = [
        part("hashed", hmac_of(b"value2").encode() + b"\r\n"),
        parts[2],
        parts[3],
        part(
            "file",
            f"password={ENCODED_MASK}\r\n".encode(),
            b'; filename="[REDACTED].txt"\r\nContent-Type: text/plain',
        ),
        part("password", MASK.encode()),
    ]
    assert out.body == b"".join(b"--b1\r\n" + each for each in expected) + b"--b1--\r\n"
    assert seen == ["form:drop_me", "form:hashed", "text:default", "pattern:cards", "multipart:default"]
    assert out.body_len == len(out.body) and req.body == body


def test_multipart_parts_of_every_shape_are_read_without_failing() -> None:
    """A part whose value holds a blank line is masked whole; a part with no name, one whose name is
    not UTF-8, a form part redacted as a form (its own Content-Type) rather than as text, and a
    part whose headers alone need masking (a card as the file name)."""
    parts = [
        part("password", b"line1\r\n\r\nline2\r\n"),
        b"Content-Type: text/plain\r\n\r\nno name\r\n",
        b'Content-Disposition: form-data; name="n\xffme"\r\n\r\nv\r\n',
        part("f", b"user=bob&password=x\r\n", b"\r\nContent-Type: application/x-www-form-urlencoded"),
        part("upload", b"plain\r\n", f'; filename="{CARD}"'.encode()),
    ]
    body = b"".join(b"--b\r\n" + each for each in parts) + b"--b--"
    _, out, seen = redacted(None, [("Content-Type", "multipart/form-data; boundary=b")], body)
    expected = [
        part("password", MASK.encode() + b"\r\n"),
        parts[1],
        parts[2],
        part(
            "f",
            f"user=bob&password={ENCODED_MASK}\r\n".encode(),
            b"\r\nContent-Type: application/x-www-form-urlencoded",
        ),
        part("upload", b"plain\r\n", b'; filename="[REDACTED]"'),
    ]
    assert out.body == b"".join(b"--b\r\n" + each for each in expected) + b"--b--"
    assert seen == ["multipart:default", "form:default", "pattern:cards"]


def test_a_boundary_that_is_not_latin_1_does_not_stop_redaction() -> None:
    """HAProxy's header bytes arrive as str with surrogates for what is not UTF-8: such a boundary
    cannot split the body, which is then scanned as text."""
    body = b"--b\xff\r\n" + part("pin", b"1234\r\n") + b" pan 4111111111111111 --b\xff--"
    content_type = "multipart/form-data; boundary=b" + b"\xff".decode("utf-8", "surrogateescape")
    _, out, seen = redacted(None, [("Content-Type", content_type)], body)
    assert (out.body, seen) == (body.replace(b"4111111111111111", MASK.encode()), ["pattern:cards"])


@pytest.mark.parametrize(
    "content_type", ["multipart/form-data", None], ids=["no boundary parameter", "no content type"]
)
def test_a_multipart_boundary_is_found_from_the_first_line(content_type: str | None) -> None:
    body = (
        b"--xyz\r\n"
        + part("note", b"hi\r\n")
        + b"--xyz\r\n"
        + part("user[pin]", b"1234\r\n")
        + b"--xyz--\r\n"
    )
    headers = [] if content_type is None else [("Content-Type", content_type)]
    _, out, seen = redacted(None, headers, body)
    assert out.body == body.replace(b"1234", MASK.encode())
    assert seen == ["multipart:default"]


def test_a_multipart_body_with_a_single_part_is_split_too() -> None:
    body = b"--b\r\n" + part("pin", b"1234\r\n") + b"--b--"
    _, out, seen = redacted(None, [("Content-Type", 'multipart/form-data; boundary="b"')], body)
    assert (out.body, seen) == (body.replace(b"1234", MASK.encode()), ["multipart:default"])


@pytest.mark.parametrize(
    "content_type",
    ["multipart/form-data; boundary=absent", "multipart/mixed"],
    ids=["boundary not in the body", "no boundary anywhere"],
)
def test_multipart_that_does_not_split_is_scanned_as_text(content_type: str) -> None:
    body = b"user=bob&password=hunter2"
    _, out, seen = redacted(None, [("Content-Type", content_type)], body)
    assert (out.body, seen) == (f"user=bob&password={ENCODED_MASK}".encode(), ["text:default"])


def test_multipart_with_nothing_to_redact_comes_back_as_the_same_request() -> None:
    """A pattern makes the redactor look at every body; nothing in this one matches."""
    body = (
        b"--b\r\n"
        + part("a", b"1\r\n")
        + b"--b\r\n"
        + part("b", b'{"c": 2}\r\n', b"\r\nContent-Type: application/json")
        + b"--b--"
    )
    req, out, seen = redacted(NEVER_MATCHES, [("Content-Type", "multipart/form-data; boundary=b")], body)
    assert out is req and seen == []


# Nested and loosely written multipart ------------------------------------------------------------
# Each shape below carried a secret-named field through unmasked before multipart parts were
# split recursively and their names read the way servers read them (issue 17's redaction audit).

SECRET = b"S3cr3t-Value"


def mixed(boundary: bytes, *parts: bytes) -> bytes:
    return b"".join(b"--" + boundary + b"\r\n" + each for each in parts) + b"--" + boundary + b"--\r\n"


def nested_in(content: bytes, inner_type: bytes) -> bytes:
    """A form-data body whose one part, `files`, has `content` of type `inner_type`."""
    return mixed(b"out", part("files", content, b"\r\nContent-Type: " + inner_type))


FORM_DATA = [("Content-Type", "multipart/form-data; boundary=out")]


@pytest.mark.parametrize(
    "inner_disposition",
    [b'form-data; name="password"', b'file; name="password"; filename="p.txt"', b"attachment; name=password"],
    ids=["form-data", "file", "unquoted"],
)
def test_a_secret_named_part_inside_a_nested_multipart_is_masked(inner_disposition: bytes) -> None:
    """RFC 7578's multipart/mixed inside form-data (older clients send several files so): the inner
    parts are split at their own boundary and handled by name like the outer ones."""
    inner = mixed(b"in", b"Content-Disposition: " + inner_disposition + b"\r\n\r\n" + SECRET + b"\r\n")
    body = nested_in(inner, b"multipart/mixed; boundary=in")
    req, out, seen = redacted(None, FORM_DATA, body)
    assert out.body == body.replace(SECRET, MASK.encode())
    assert seen == ["multipart:default"] and out.body_len == len(out.body) and req.body == body


def test_json_and_form_parts_inside_a_nested_multipart_are_redacted_by_their_type() -> None:
    inner = mixed(
        b"in",
        b'Content-Type: application/json\r\n\r\n{"user": {"password": "' + SECRET + b'"}}\r\n',
        b"Content-Type: application/x-www-form-urlencoded\r\n\r\nuser=bob&password=" + SECRET + b"\r\n",
        b'Content-Disposition: form-data; name="note"\r\n\r\nhello\r\n',
    )
    body = nested_in(inner, b'multipart/mixed; boundary="in"')
    _, out, seen = redacted(None, FORM_DATA, body)
    expected = body.replace(
        b'{"user": {"password": "' + SECRET + b'"}}', b'{"user":{"password":"[REDACTED]"}}'
    ).replace(b"password=" + SECRET, f"password={ENCODED_MASK}".encode())
    assert out.body == expected
    assert seen == ["json:default", "form:default"]


def test_a_nested_multipart_without_a_boundary_parameter_is_split_from_its_first_line() -> None:
    inner = mixed(b"in", part("api_key", SECRET + b"\r\n"))
    body = nested_in(inner, b"multipart/mixed")
    _, out, seen = redacted(None, FORM_DATA, body)
    assert (out.body, seen) == (body.replace(SECRET, MASK.encode()), ["multipart:default"])


def test_configured_form_rules_reach_parts_of_a_nested_multipart() -> None:
    inner = mixed(b"in", part("ssn_field", b"123-45-6789\r\n"), part("keep_me", b"x\r\n"))
    body = nested_in(inner, b"multipart/mixed; boundary=in")
    _, out, seen = redacted({"form_fields": {"ssn_field": "hmac"}}, FORM_DATA, body)
    assert out.body == body.replace(b"123-45-6789", hmac_of(b"123-45-6789").encode())
    assert seen == ["form:ssn_field"]


def levels_deep(levels: int) -> bytes:
    """A multipart body `levels` deep (the body itself is the first), a secret-named part innermost;
    its Content-Type boundary is b1."""
    content = mixed(f"b{levels}".encode(), part("password", SECRET + b"\r\n"))
    for level in range(levels - 1, 0, -1):
        inner_type = f"Content-Type: multipart/mixed; boundary=b{level + 1}\r\n\r\n".encode()
        content = mixed(f"b{level}".encode(), inner_type + content)
    return content


def test_multipart_nested_deeper_than_the_limit_is_refused_not_passed_through() -> None:
    """Each level is one more split of the body (memory and time): MULTIPART_DEPTH_LIMIT levels are
    redacted, one more is refused as unredactable (the caller drops and counts it) rather than sent
    unchecked."""
    headers = [("Content-Type", "multipart/form-data; boundary=b1")]
    at_limit = levels_deep(MULTIPART_DEPTH_LIMIT)
    _, out, seen = redacted(None, headers, at_limit)
    assert (out.body, seen) == (at_limit.replace(SECRET, MASK.encode()), ["multipart:default"])
    with pytest.raises(Unredactable) as refused:
        redacted(None, headers, levels_deep(MULTIPART_DEPTH_LIMIT + 1))
    assert refused.value.reason == "multipart_too_deep"


@pytest.mark.parametrize(
    "head",
    [
        b"Content-Disposition: form-data; name=password",
        b'content-disposition: form-data;name = "password"',
        b"Content-Disposition: form-data; name*=UTF-8''pass%77ord",
        b'Content-Type: text/plain; name="note"\r\nContent-Disposition: form-data; name="password"',
        b"Content-Disposition: form-data; name=\"note\"; name*=utf-8'en'password",
        b'Content-Disposition: form-data; name="to\\ken"',
        b"Content-Disposition: form-data; name*=UTF-8''password%FF",
    ],
    ids=[
        "unquoted",
        "spaced",
        "RFC 2231 name*",
        "a name in another header first",
        "name and name*",
        "quoted with a backslash escape",
        "RFC 2231 name* with a byte that is not UTF-8",
    ],
)
def test_a_part_name_is_read_the_ways_servers_read_it(head: bytes) -> None:
    body = b"--b\r\n" + head + b"\r\n\r\n" + SECRET + b"\r\n--b--\r\n"
    _, out, seen = redacted(None, [("Content-Type", "multipart/form-data; boundary=b")], body)
    assert (out.body, seen) == (body.replace(SECRET, MASK.encode()), ["multipart:default"])


def test_a_multipart_body_with_bare_lf_line_ends_is_split_too() -> None:
    """Go's and Python's multipart readers accept LF where RFC 2046 says CRLF; the parts keep LF. A
    part's head ends at its first blank line: a secret value holding blank lines is masked whole."""
    body = b'--b\nContent-Disposition: form-data; name="password"\n\n' + SECRET + b"\n--b\n"
    body += b'Content-Disposition: form-data; name="note"\n\nhi\n--b\n'
    body += b'Content-Disposition: form-data; name="token"\n\nfirst line\n\nsecond line\n--b--\n'
    _, out, seen = redacted(None, [("Content-Type", "multipart/form-data; boundary=b")], body)
    expected = body.replace(SECRET, MASK.encode()).replace(b"first line\n\nsecond line", MASK.encode())
    assert (out.body, seen) == (expected, ["multipart:default", "multipart:default"])


def test_a_part_kept_by_its_rule_is_not_scanned_either() -> None:
    """`keep` for a form field leaves its part as it came: a secret-looking name's card number too."""
    body = b"--b\r\n" + part("pin", CARD.encode() + b"\r\n") + b"--b--\r\n"
    headers = [("Content-Type", "multipart/form-data; boundary=b")]
    _, out, seen = redacted({"form_fields": {"pin": "keep"}}, headers, body)
    assert (out.body, seen) == (body, [])


# Content-Encoding -------------------------------------------------------------------------------


def deflate(data: bytes, wbits: int) -> bytes:
    encoder = zlib.compressobj(6, zlib.DEFLATED, wbits)
    return encoder.compress(data) + encoder.flush()


@pytest.mark.parametrize(
    ("encoding", "wbits"),
    [("gzip", 31), ("x-gzip", 31), ("deflate", 15), ("deflate", -15), (" Deflate ", -15)],
    ids=["gzip", "x-gzip", "zlib deflate", "raw deflate", "raw deflate, spaced and capitalised"],
)
def test_an_encoded_body_is_redacted_and_encoded_again_in_the_framing_it_came_in(
    encoding: str, wbits: int
) -> None:
    """The decoded body is redacted by its Content-Type (a form here: `form:default`, where text
    would say `text:default`); the result decodes with the same framing (zlib-wrapped deflate stays
    wrapped, raw stays raw)."""
    plain = b"user=bob&password=hunter2"
    headers = [("Content-Encoding", encoding), ("Content-Type", "application/x-www-form-urlencoded")]
    _, out, seen = redacted(None, headers, deflate(plain, wbits))
    assert zlib.decompress(out.body, wbits) == f"user=bob&password={ENCODED_MASK}".encode()
    assert seen == ["form:default"]


@pytest.mark.parametrize("encoding", ["identity", "IDENTITY", " "])
def test_identity_encoding_is_plain(encoding: str) -> None:
    _, out, seen = redacted(None, [("Content-Encoding", encoding)], b"password=hunter2")
    assert (out.body, seen) == (f"password={ENCODED_MASK}".encode(), ["text:default"])


@pytest.mark.parametrize(
    ("encoding", "body", "reason"),
    [
        ("br", b"\x1b\x00", "encoding"),
        ("gzip", b"not gzip at all", "bad_encoding"),
        ("deflate", b"\xff\xff not deflate either way", "bad_encoding"),
    ],
)
def test_a_body_that_cannot_be_decoded_is_refused_with_its_reason(
    encoding: str, body: bytes, reason: str
) -> None:
    with pytest.raises(Unredactable) as refused:
        redacted(None, [("Content-Encoding", encoding)], body)
    assert refused.value.reason == reason and str(refused.value) == reason


def test_a_raw_deflate_body_is_decoded_within_the_same_bound() -> None:
    """Raw deflate (no zlib header) is the fallback decoder; it stops at DECODED_BODY_LIMIT too."""
    bomb = deflate(b"0" * (DECODED_BODY_LIMIT + 1), -15)
    with pytest.raises(Unredactable) as refused:
        redacted(None, [("Content-Encoding", "deflate")], bomb)
    assert refused.value.reason == "decoded_too_large"


def test_a_gzip_body_cut_before_its_trailer_is_redacted_and_sent_whole() -> None:
    """HAProxy cuts a body at its buffer: a gzip stream without its 8-byte trailer decodes all the
    same, and goes out redacted and encoded again as a whole stream."""
    text = b"user=bob&password=hunter2"
    _, out, seen = redacted(None, [("Content-Encoding", "gzip")], gzip.compress(text)[:-8])
    assert gzip.decompress(out.body) == b"user=bob&password=" + ENCODED_MASK.encode()
    assert seen == ["text:default"]


def test_an_encoded_multipart_body_is_nested_as_deep_as_a_plain_one() -> None:
    """The decoded body is the first level, as a plain body is: MULTIPART_DEPTH_LIMIT levels under
    gzip are redacted, not refused."""
    headers = [("Content-Encoding", "gzip"), ("Content-Type", "multipart/form-data; boundary=b1")]
    at_limit = levels_deep(MULTIPART_DEPTH_LIMIT)
    _, out, seen = redacted(None, headers, gzip.compress(at_limit))
    assert gzip.decompress(out.body) == at_limit.replace(SECRET, MASK.encode())
    assert seen == ["multipart:default"]


def test_a_card_number_at_the_very_start_of_a_body_is_masked() -> None:
    """The card pre-scan's matches at offset 0, spaced and dashed."""
    for card in (CARD, CARD.replace(" ", "-")):
        _, out, seen = redacted(None, [("Content-Type", "text/plain")], card.encode() + b" is it")
        assert (out.body, seen) == (MASK.encode() + b" is it", ["pattern:cards"])


def test_a_gzipped_multipart_body_is_split_into_its_parts() -> None:
    body = b"--b\r\n" + part("pin", b"1234\r\n") + b"--b\r\n" + part("note", b"hi\r\n") + b"--b--"
    headers = [("Content-Encoding", "gzip"), ("Content-Type", "multipart/form-data; boundary=b")]
    _, out, seen = redacted(None, headers, gzip.compress(body))
    assert gzip.decompress(out.body) == body.replace(b"1234", MASK.encode())
    assert seen == ["multipart:default"]


def test_an_encoded_body_with_nothing_to_redact_is_sent_as_it_came() -> None:
    body = gzip.compress(b"user=bob")
    req, out, seen = redacted(NEVER_MATCHES, [("Content-Encoding", "gzip")], body)
    assert out is req and seen == []


# Paths and queries ------------------------------------------------------------------------------


def test_a_card_in_a_percent_encoded_path_is_masked_and_the_rest_encoded_as_it_was() -> None:
    """Decoded to find the card, encoded again with the path's own safe characters left alone and
    bytes that are not UTF-8 (`%FF`) kept."""
    path = "/a;b:c@d!$&'()*+,=-._~/%FF/4111%201111%201111%201111/x?page=2"
    _, out, seen = redacted(None, [], path=path)
    assert out.path == "/a;b:c@d!$&'()*+,=-._~/%FF/%5BREDACTED%5D/x?page=2"
    assert seen == ["pattern:cards"]


@pytest.mark.parametrize("query", ["?x=1", ""], ids=["with a query", "without"])
def test_a_card_in_a_plain_path_is_masked(query: str) -> None:
    _, out, seen = redacted(None, [], path=f"/pay/4111111111111111{query}")
    assert (out.path, seen) == (f"/pay/[REDACTED]{query}", ["pattern:cards"])


def test_query_separators_are_kept_and_each_value_is_scanned() -> None:
    """`&` and `;` as sent; a secret name percent-encoded is still found; a value with userinfo or a
    card is masked inside the value; an empty value and a kept name stay as they are."""
    query = "a=1;pass%77ord=x&b=;next=http://u:p@h/&pan=4111111111111111;c=2&keep_me=4111111111111111"
    _, out, seen = redacted({"query": {"keep_me": "keep"}}, [], path=f"/s?{query}")
    assert out.path == (
        f"/s?a=1;pass%77ord={ENCODED_MASK}&b=;next=http:%2F%2F{ENCODED_MASK}%40h%2F&pan={ENCODED_MASK};c=2"
        "&keep_me=4111111111111111"
    )
    assert seen == ["query:default", "pattern:userinfo", "pattern:cards"]


NO_SCANS = {"patterns": {"cards": "keep", "userinfo": "keep"}}


@pytest.mark.parametrize(
    ("spec", "query", "expected"),
    [
        (None, "n=4111111111111111", f"n={ENCODED_MASK}"),
        ({"query": {"tok": "mask"}, **NO_SCANS}, "tok=x=y&a=1", f"tok={ENCODED_MASK}&a=1"),
        (NO_SCANS, "pass%77ord=x&a=1", f"pass%77ord={ENCODED_MASK}&a=1"),
        (NO_SCANS, "a+b=1&pass%77ord=x", f"a+b=1&pass%77ord={ENCODED_MASK}"),
    ],
    ids=["a card alone", "a value holding '='", "an encoded name, scans off", "a '+' and an encoded name"],
)
def test_the_query_pre_scan_lets_through_every_query_with_something_to_redact(
    spec: dict | None, query: str, expected: str
) -> None:
    _, out, _ = redacted(spec, [], path=f"/s?{query}")
    assert out.path == f"/s?{expected}"


def test_a_card_in_a_header_value_is_masked_and_the_other_headers_stay() -> None:
    headers = [("X-Note", f"card {CARD} here"), ("Accept", "*/*"), ("X-Kept", CARD)]
    _, out, seen = redacted({"headers": {"X-Kept": "keep"}}, headers)
    assert out.headers == [("X-Note", f"card {MASK} here"), ("Accept", "*/*"), ("X-Kept", CARD)]
    assert seen == ["pattern:cards"]


def test_userinfo_in_a_header_is_masked_written_plainly_or_json_escaped_unless_switched_off() -> None:
    headers = [("X-U", "see https://u:p@h/"), ("X-J", '{"u":"https:\\/\\/u:p@h\\/"}')]
    _, out, seen = redacted(None, headers)
    assert out.headers == [
        ("X-U", f"see https://{MASK}@h/"),
        ("X-J", '{"u":"https:\\/\\/' + MASK + '@h\\/"}'),
    ]
    assert seen == ["pattern:userinfo", "pattern:userinfo"]
    req, out, seen = redacted({"patterns": {"userinfo": "keep"}}, headers)
    assert out is req and seen == []


# JSON and text ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "events"),
    [
        ("Application/Vnd.Api+JSON; charset=utf-8", ["json:unparsed", "text:default"]),
        ("APPLICATION/JSON", ["json:unparsed", "text:default"]),
        ("text/plain", ["text:default"]),
    ],
)
def test_json_that_does_not_parse_is_reported_only_when_it_claims_to_be_json(
    content_type: str, events: list[str]
) -> None:
    body = b'{"user": "bob", "password": "hunter2", "n": 1'
    _, out, seen = redacted(None, [("Content-Type", content_type)], body)
    assert out.body == body.replace(b'"hunter2"', b'"[REDACTED]"')
    assert seen == events


def test_json_under_a_json_media_type_is_parsed_whatever_its_first_byte() -> None:
    """A JSON string as the whole document, with a card in it."""
    body = json.dumps(f" {CARD}").encode()
    _, out, seen = redacted(None, [("Content-Type", "application/merge-patch+json")], body)
    assert (out.body, seen) == (json.dumps(f" {MASK}").encode(), ["pattern:cards"])


def test_json_that_mentions_content_disposition_is_still_json() -> None:
    """Only a body starting with `--` is sniffed as multipart by its Content-Disposition."""
    body = b'{"note": "Content-Disposition: form-data", "ref": "r-1"}'
    _, out, seen = redacted({"json_fields": {"ref": "mask"}}, [("Content-Type", "application/json")], body)
    assert (out.body, seen) == (b'{"note":"Content-Disposition: form-data","ref":"[REDACTED]"}', ["json:ref"])


def test_json_of_exactly_the_parse_limit_is_parsed_one_byte_more_is_scanned() -> None:
    def document(size: int) -> bytes:
        head = b'{"password":"hunter2","fill":"'
        return head + b"x" * (size - len(head) - 2) + b'"}'

    at_limit = document(JSON_PARSE_LIMIT)
    _, out, seen = redacted(None, [("Content-Type", "application/json")], at_limit)
    assert (out.body, seen) == (at_limit.replace(b"hunter2", MASK.encode()), ["json:default"])
    _, out, seen = redacted(None, [("Content-Type", "application/json")], document(JSON_PARSE_LIMIT + 1))
    assert seen == ["json:unparsed", "text:default"]


def test_json_numbers_that_are_card_numbers_are_masked_others_are_not() -> None:
    """13 to 19 digits that pass the Luhn check: 2000000000008 is the smallest such 13-digit number
    starting 2-6. A float of a card's digits, a 12-digit number, a non-card 16-digit one, and numbers
    outside 13-19 digits that pass the check anyway (240; 20 digits) stay, and so do null and
    booleans. With the card scan switched off, a document that the userinfo scan still reads keeps
    its card numbers."""
    document = {"a": 4111111111111111, "b": 2000000000008, "c": 200000000008, "d": 4111111111111112,
                "e": 4111111111111111.0, "f": "x", "g": 240, "h": 20000000000000000006, "i": None,
                "j": True}  # fmt: skip
    body = json.dumps(document).encode()
    _, out, seen = redacted(None, [("Content-Type", "application/json")], body)
    assert json.loads(out.body) == {**document, "a": MASK, "b": MASK}
    assert seen == ["pattern:cards", "pattern:cards"]
    no_cards = {"patterns": {"cards": "keep"}}
    _, out, seen = redacted(no_cards, [("Content-Type", "application/json")], body)
    assert out.body == body and seen == []
    with_url = json.dumps({**document, "u": "https://u:p@h/"}).encode()
    _, out, seen = redacted(no_cards, [("Content-Type", "application/json")], with_url)
    assert json.loads(out.body) == {**document, "u": f"https://{MASK}@h/"}
    assert seen == ["pattern:userinfo"]


@pytest.mark.parametrize("body", [b'{"a": [1, "x", null], "b": {"c": true, "d": 2.5}}', b'"a string"', b"42"])
def test_json_with_nothing_to_redact_comes_back_as_the_same_request(body: bytes) -> None:
    req, out, seen = redacted(NEVER_MATCHES, [("Content-Type", "application/json")], body)
    assert out is req and seen == []


def test_json_keys_after_a_kept_or_configured_key_are_still_redacted() -> None:
    spec = {"json_fields": {"a": "keep", "b": "mask"}}
    body = json.dumps({"a": "x", "b": "v", "password": "p", "c": {"password": "q", "n": 1}}).encode()
    _, out, seen = redacted(spec, [("Content-Type", "application/json")], body)
    assert json.loads(out.body) == {"a": "x", "b": MASK, "password": MASK, "c": {"password": MASK, "n": 1}}
    assert seen == ["json:b", "json:default", "json:default"]


@pytest.mark.parametrize(
    ("value", "masked"),
    [
        ("411\\u0031 111\\u0031 111\\u0031 111\\u0031", MASK),
        ("https://u:p@h/", f"https://{MASK}@h/"),
        ("https:\\/\\/u:p@h\\/", f"https://{MASK}@h/"),
    ],
    ids=["card behind a JSON unicode escape", "plain userinfo", "userinfo behind escaped slashes"],
)
def test_json_strings_are_scanned_whatever_gives_their_secret_away(value: str, masked: str) -> None:
    """The document is only scanned string by string when its raw bytes hold card digits, `://`,
    `:\\/\\/` or a `\\u` escape; each of these alone must be enough."""
    body = b'{"v": "' + value.encode() + b'", "n": 1}'
    _, out, seen = redacted(None, [("Content-Type", "application/json")], body)
    assert json.loads(out.body) == {"v": masked, "n": 1}
    assert len(seen) == 1


def test_card_scans_inside_json_strings_reach_every_element_of_a_list() -> None:
    body = json.dumps({"notes": ["a", f"pan {CARD}", "b", f"again {CARD}"], "k": 1}).encode()
    _, out, seen = redacted(None, [("Content-Type", "application/json")], body)
    assert json.loads(out.body) == {"notes": ["a", f"pan {MASK}", "b", f"again {MASK}"], "k": 1}
    assert seen == ["pattern:cards", "pattern:cards"]


def test_text_pairs_with_escaped_names_are_masked_in_place() -> None:
    """A name with a JSON escape is read unescaped; one whose escape is not JSON, as written."""
    body = b'note: "pass\\u0077ord": "hunter2", "user": "bob", "password\\q": "x", token=abc; a=b'
    _, out, seen = redacted(None, [("Content-Type", "text/plain")], body)
    expected = (
        b'note: "pass\\u0077ord": "[REDACTED]", "user": "bob", "password\\q": "[REDACTED]", '
        + f"token={ENCODED_MASK}; a=b".encode()
    )
    assert (out.body, seen) == (expected, ["text:default", "text:default", "text:default"])


def test_binary_bodies_skip_the_pair_scan_but_not_the_card_scan() -> None:
    body = b"\xff\xfe password=hunter2 " + CARD.encode() + b" \x00"
    _, out, seen = redacted(None, [("Content-Type", "application/octet-stream")], body)
    assert (out.body, seen) == (body.replace(CARD.encode(), MASK.encode()), ["pattern:cards"])


# The worker process's entry point ---------------------------------------------------------------


def test_redact_in_worker_compiles_each_spec_and_returns_the_events(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process here (the mirror calls it in its worker): two specs in turn, each with its own
    rules, and the first again from the cache, which starts empty here (not filled by another test)."""
    monkeypatch.setattr(redact_module, "_worker_cores", {})
    req = MirrorRequest("POST", "/?a=1&b=2", "1.1", [], b"")
    masks_a = {"query": {"a": "mask"}}
    masks_b = {"query": {"b": "hmac"}}
    for spec, path, events in [
        (masks_a, f"/?a={ENCODED_MASK}&b=2", ["query:a"]),
        (masks_b, f"/?a=1&b={hmac_of(b'2')}", ["query:b"]),
        (masks_a, f"/?a={ENCODED_MASK}&b=2", ["query:a"]),
    ]:
        out, seen = redact_in_worker(spec, "targets.t.redact", KEY, req)
        assert (out.path, seen) == (path, events)


# Text bodies, header names and the pre-scans -----------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "body", "expected", "events"),
    [
        (None, "café password=hunter2", f"café password={ENCODED_MASK}", ["text:default"]),
        (None, "pan 4111-1111-1111-1111 ok", f"pan {MASK} ok", ["pattern:cards"]),
        (None, '{"u":"https:\\/\\/u:p@h\\/"', '{"u":"https:\\/\\/' + MASK + '@h\\/"', ["pattern:userinfo"]),
        (
            {"patterns": {"cards": "keep"}},
            "pan 4111111111111111 at https://u:p@h/",
            f"pan 4111111111111111 at https://{MASK}@h/",
            ["pattern:userinfo"],
        ),
        (
            {"patterns": {"userinfo": "keep"}},
            "pan 4111111111111111 at https://u:p@h/",
            f"pan {MASK} at https://u:p@h/",
            ["pattern:cards"],
        ),
    ],
    ids=["UTF-8 text", "a card with dashes", "escaped slashes", "cards off", "userinfo off"],
)
def test_text_bodies_are_scanned_as_configured(
    spec: dict | None, body: str, expected: str, events: list[str]
) -> None:
    _, out, seen = redacted(spec, [("Content-Type", "text/plain")], body.encode())
    assert (out.body.decode(), seen) == (expected, events)


@pytest.mark.parametrize("media_type", ["application/json", "application/problem+json"])
def test_a_json_media_type_is_tried_as_json_whatever_the_first_byte(media_type: str) -> None:
    """JSON by media type that is not JSON (here it does not even start like it) is reported as
    unparsed, and its pairs masked as text."""
    body = b'"password": "hunter2", "a": 1'
    _, out, seen = redacted(None, [("Content-Type", media_type)], body)
    assert (out.body, seen) == (body.replace(b"hunter2", MASK.encode()), ["json:unparsed", "text:default"])


def test_patterns_run_over_each_multipart_part_and_then_the_whole_body() -> None:
    spec = {"patterns": {"tok": {"regex": "TOKEN-[0-9]+", "action": "mask"}}}
    parts = b"--b\r\n" + part("note", b"see TOKEN-123\r\n") + b"--b\r\n" + part("pin", b"1234\r\n") + b"--b--"
    body = b"preamble TOKEN-9\r\n" + parts
    _, out, seen = redacted(spec, [("Content-Type", "multipart/form-data; boundary=b")], body)
    expected = body.replace(b"TOKEN-123", MASK.encode()).replace(b"1234", MASK.encode())
    assert out.body == expected.replace(b"TOKEN-9", MASK.encode())
    assert seen == ["pattern:tok", "multipart:default", "pattern:tok"]  # the preamble's, last


def test_header_rules_match_names_with_underscores_or_dashes_and_defaults_are_labelled() -> None:
    """`X_Custom` in the config matches the `X-Custom` header (and is reported as it is written); a
    secret-looking header not on the default list is reported as header:default, one on it by its
    own name."""
    headers = [("X-Custom", "v"), ("X-My-Secret", "s"), ("Authorization", "Bearer t"), ("Accept", "*/*")]
    _, out, seen = redacted({"headers": {"X_Custom": "remove"}}, headers)
    assert out.headers == [("X-My-Secret", MASK), ("Authorization", MASK), ("Accept", "*/*")]
    assert seen == ["header:x_custom", "header:default", "header:authorization"]


def test_a_header_remembered_as_clean_does_not_hide_the_headers_after_it() -> None:
    """The pre-scan remembers clean (name, value) pairs; the next request's secret header after one
    of them is still found."""
    seen: list[str] = []
    redact = build_redactor(None, "r", KEY, seen.append)
    first = MirrorRequest("GET", "/", "1.1", [("Accept", "*/*"), ("User-Agent", "t")], b"")
    assert redact(first) is first
    second = MirrorRequest("GET", "/", "1.1", [("Accept", "*/*"), ("Authorization", "Bearer t")], b"")
    assert redact(second).headers == [("Accept", "*/*"), ("Authorization", MASK)]
    assert seen == ["header:authorization"]


def test_patterns_after_a_switched_off_builtin_scan_still_apply() -> None:
    spec = {"patterns": {"cards": "keep", "tok": {"regex": "TOKEN-[0-9]+", "action": "mask"}}}
    _, out, seen = redacted(spec, [("Content-Type", "text/plain")], b"TOKEN-1 4111111111111111")
    assert (out.body, seen) == (MASK.encode() + b" 4111111111111111", ["pattern:tok"])

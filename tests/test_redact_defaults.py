"""The default redaction list (issue 10, item 4), on the redactor itself: a canary in every place it
covers never survives, with no `redact` block and with the example config's block; `keep` opts a
field back out; a body that cannot be checked is refused; the cheap pre-scan leaves requests with
nothing to redact untouched (the same object back). The same places go through the real HAProxy and
agent in test_security.py."""

from __future__ import annotations

import gzip
import json
import secrets
import zlib
from pathlib import Path

import pytest
import yaml

from spoa_mirror.redact import DECODED_BODY_LIMIT, JSON_PARSE_LIMIT, Unredactable, build_redactor
from spoa_mirror.redact_rules import is_secret_header, is_secret_name, luhn_valid
from spoa_mirror.request import MirrorRequest
from spoa_mirror.wire import build_request
from tests.support.canaries import leaks, luhn_card, places

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_REDACT = yaml.safe_load((ROOT / "examples" / "config.yaml").read_text())["redact"]
SECRET = f"Zq{secrets.token_hex(10)}"
CARD = luhn_card()


def to_request(place) -> MirrorRequest:
    body = place.body
    return MirrorRequest(
        place.method, place.target, "1.1", list(place.headers), body, len(body) if body else None
    )


def wire(req: MirrorRequest) -> bytes:
    return build_request(req.method, req.path, req.headers, req.body, "shadow")


@pytest.mark.parametrize("spec", [None, EXAMPLE_REDACT], ids=["no redact block", "example block"])
def test_no_canary_survives_in_any_place(spec: dict | None) -> None:
    seen: list[str] = []
    redact = build_redactor(spec, "redact", None, seen.append)
    leaked = {}
    for place in places(SECRET, CARD):
        out = redact(to_request(place))
        found = leaks(wire(out), [SECRET, CARD])
        if found:
            leaked[place.name] = wire(out)
    assert leaked == {}
    # Labels are a bounded set: no client-chosen name becomes a metric series.
    assert all(":" in rule and SECRET not in rule for rule in seen)
    assert {rule.partition(":")[2] for rule in seen if rule.startswith(("query:", "form:", "text:"))} <= {
        "default",
        "access_token",
        "password",
    }


def test_the_places_do_leak_without_redaction() -> None:
    """The canary machinery can fail: with the defaults off, every place leaks."""
    redact = build_redactor({"defaults": False}, "redact", None, lambda rule: None)
    for place in places(SECRET, CARD):
        assert leaks(wire(redact(to_request(place))), [SECRET, CARD]), place.name


def test_secret_names_and_headers() -> None:
    for name in (
        "password",
        "Access_Token",
        "access_token[]",
        "user[password]",
        "User.password",
        "client-secret",
        "db_passwd",
        "githubToken",
        "X-Amz-Signature",
        "pin",
        "key",
        "user[pin]",
        "card.cvv",
        "a[b][otp]",
    ):
        assert is_secret_name(name), name
    for name in ("user", "page", "id", "name", "keyboard", "pinned", "monkey", "tokenize"[:0] or "sort"):
        assert not is_secret_name(name), name
    for header in ("authorization", "x-forwarded-authorization", "x-auth", "x-my-token", "x-session-id"):
        assert is_secret_header(header), header
    for header in ("host", "accept", "content-type", "user-agent", "x-request-id", "x-author"):
        assert not is_secret_header(header), header
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")


def test_millisecond_timestamps_are_not_card_numbers() -> None:
    """1733312345676 passes the Luhn check, but no card network issues numbers starting with 1."""
    assert luhn_valid("1733312345676")
    redact = build_redactor(None, "r", None, lambda rule: None)
    body = b'{"createdAt": 1733312345676, "at": "1733312345676"}'
    req = MirrorRequest("POST", "/", "1.1", [("X-Request-Start", "t=1733312345676")], body)
    assert redact(req) is req


def test_a_non_luhn_number_is_left_alone() -> None:
    redact = build_redactor(None, "r", None, lambda rule: None)
    req = MirrorRequest(
        "GET", "/orders/4111111111111112?n=1234567812345678", "1.1", [("X-Id", "1234 5678 1234 5678")]
    )
    assert redact(req) is req


def test_keep_opts_a_field_back_out() -> None:
    spec = {
        "query": {"token": "keep"},
        "form_fields": {"password": "keep"},
        "json_fields": {"user.password": "keep"},
        "headers": {"X-Auth-Token": "keep"},
        "patterns": {"cards": "keep"},
    }
    redact = build_redactor(spec, "r", None, lambda rule: None)
    req = MirrorRequest("GET", f"/p?token={SECRET}&api_key={SECRET}", "1.1", [("X-Auth-Token", SECRET)])
    out = redact(req)
    assert out.path == f"/p?token={SECRET}&api_key=%5BREDACTED%5D"
    assert out.headers == [("X-Auth-Token", SECRET)]
    body = json.dumps({"user": {"password": SECRET, "token": SECRET}, "card": CARD}).encode()
    out = redact(MirrorRequest("POST", "/", "1.1", [("Content-Type", "application/json")], body))
    assert json.loads(out.body) == {"user": {"password": SECRET, "token": "[REDACTED]"}, "card": CARD}
    out = redact(
        MirrorRequest(
            "POST",
            "/",
            "1.1",
            [("Content-Type", "application/x-www-form-urlencoded")],
            f"password={SECRET}&token={SECRET}".encode(),
        )
    )
    assert out.body == f"password={SECRET}&token=%5BREDACTED%5D".encode()


def test_duplicate_json_keys_cannot_smuggle_a_value() -> None:
    seen: list[str] = []
    redact = build_redactor(None, "r", None, seen.append)
    body = (f'{{"user":{{"password":"{SECRET}"}},"user":{{"name":"ann"}}}}').encode()
    out = redact(MirrorRequest("POST", "/", "1.1", [("Content-Type", "application/json")], body))
    assert json.loads(out.body) == {"user": {"name": "ann"}}
    assert "json:duplicate_key" in seen


def test_compressed_bodies_are_decoded_redacted_and_encoded_again() -> None:
    redact = build_redactor(None, "r", None, lambda rule: None)
    for encoding, encode, decode in (
        ("gzip", gzip.compress, gzip.decompress),
        ("deflate", zlib.compress, zlib.decompress),
    ):
        body = encode(json.dumps({"password": SECRET, "keep": "me"}).encode())
        headers = [("Content-Type", "application/json"), ("Content-Encoding", encoding)]
        out = redact(MirrorRequest("POST", "/", "1.1", headers, body, len(body)))
        assert json.loads(decode(out.body)) == {"password": "[REDACTED]", "keep": "me"}
        assert out.body_len == len(out.body)
        plain = encode(b'{"nothing": "secret-free"}')
        req = MirrorRequest("POST", "/", "1.1", headers, plain)
        assert redact(req) is req


@pytest.mark.parametrize(
    ("encoding", "body", "reason"),
    [
        ("gzip", gzip.compress(b"0" * (DECODED_BODY_LIMIT + 1)), "decoded_too_large"),
        ("gzip", b"not gzip at all", "bad_encoding"),
        ("br", b"\x0b\x02\x80hello\x03", "encoding"),
    ],
)
def test_bodies_that_cannot_be_checked_are_refused(encoding: str, body: bytes, reason: str) -> None:
    redact = build_redactor(None, "r", None, lambda rule: None)
    with pytest.raises(Unredactable) as raised:
        redact(MirrorRequest("POST", "/", "1.1", [("Content-Encoding", encoding)], body))
    assert raised.value.reason == reason


def test_requests_with_nothing_to_redact_come_back_as_they_are() -> None:
    redact = build_redactor(None, "r", None, lambda rule: None)
    for req in (
        MirrorRequest(
            "GET",
            "/api/items?id=42&page=2",
            "1.1",
            [
                ("Host", "h"),
                ("Accept", "*/*"),
                ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36"),
            ],
        ),
        MirrorRequest(
            "POST", "/x", "1.1", [("Content-Type", "application/json")], b'{"user": "bob", "n": [1, 2]}'
        ),
        MirrorRequest(
            "POST", "/x", "1.1", [("Content-Type", "application/x-www-form-urlencoded")], b"user=bob"
        ),
        MirrorRequest("POST", "/x", "1.1", [], b"plain text"),
    ):
        assert redact(req) is req


def test_multipart_fields_by_name_and_content_with_a_preamble() -> None:
    """Parts are found from the Content-Type's boundary (here after a preamble, where sniffing the
    body's first line would not find it): a secret-named field is masked whole, a JSON part is
    redacted as JSON, other parts keep their bytes."""
    seen: list[str] = []
    redact = build_redactor(None, "r", None, seen.append)
    body = (
        b'preamble\r\n--XyZ\r\nContent-Disposition: form-data; name="user[pin]"\r\n\r\n1234\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="meta"\r\nContent-Type: application/json\r\n\r\n'
        b'{"otp": "99", "a": 1}\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n--XyZ--\r\n'
    )
    headers = [("Content-Type", 'multipart/form-data; boundary="XyZ"')]
    out = redact(MirrorRequest("POST", "/", "1.1", headers, body))
    assert out.body == body.replace(b"\r\n\r\n1234", b"\r\n\r\n[REDACTED]").replace(
        b'{"otp": "99", "a": 1}', b'{"otp":"[REDACTED]","a":1}'
    )
    assert seen == ["multipart:default", "json:default"]


def test_json_over_the_parse_limit_is_scanned_as_text() -> None:
    """Parsing costs ~15 times a document's size in the worker's memory: above the limit the secret
    pairs are masked in place instead, counted as unparsed."""
    seen: list[str] = []
    redact = build_redactor(None, "r", None, seen.append)
    filler = "x" * (JSON_PARSE_LIMIT + 10)
    body = json.dumps({"fill": filler, "user": {"Password": SECRET, "n": 1}, "pan": CARD}).encode()
    out = redact(MirrorRequest("POST", "/", "1.1", [("Content-Type", "application/json")], body))
    assert json.loads(out.body) == {
        "fill": filler,
        "user": {"Password": "[REDACTED]", "n": 1},
        "pan": "[REDACTED]",
    }
    assert seen == ["json:unparsed", "text:default", "pattern:cards"]

"""Redaction: every kind and action, the secure defaults, the no-op path, that the shared input is
never touched, and that a canary secret placed everywhere redactable never leaves."""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import re
from collections.abc import Callable
from urllib.parse import unquote_plus

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spoa_mirror.errors import ConfigError
from spoa_mirror.redact import build_redactor, merge_redaction
from spoa_mirror.request import MirrorRequest

KEY = b"k" * 32
CANARY = "c4n4ry-s3cr3t"
CARD = "4111111111111111"
HMAC_FORM = re.compile(r"hmac-sha256:[0-9a-f]{32}")


def request(
    path: str = "/",
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    method: str = "POST",
) -> MirrorRequest:
    return MirrorRequest(method, path, "1.1", headers or [], body, len(body) if body else None)


def redactor(
    spec: dict | None, key: bytes | None = KEY
) -> tuple[Callable[[MirrorRequest], MirrorRequest], list[str]]:
    seen: list[str] = []
    return build_redactor(spec, "t", key, seen.append), seen


def expected_hmac(value: str | bytes) -> str:
    data = value.encode() if isinstance(value, str) else value
    return "hmac-sha256:" + hmac.new(KEY, data, hashlib.sha256).hexdigest()[:32]


def json_request(document: object, content_type: str = "application/json") -> MirrorRequest:
    return request(headers=[("Content-Type", content_type)], body=json.dumps(document).encode())


def form_request(body: str) -> MirrorRequest:
    return request(headers=[("Content-Type", "application/x-www-form-urlencoded")], body=body.encode())


# Headers


def test_defaults_mask_the_four_credential_headers() -> None:
    redact, seen = redactor(None)
    headers = [
        ("Host", "h"),
        ("authorization", "Bearer abc"),
        ("Proxy-Authorization", "Basic xyz"),
        ("Cookie", "sid=1; theme=dark"),
        ("X-API-Key", "k-123"),
        ("Accept", "*/*"),
        ("cookie", "second=2"),
    ]
    out = redact(request(headers=headers))
    assert out.headers == [
        ("Host", "h"),
        ("authorization", "[REDACTED]"),
        ("Proxy-Authorization", "[REDACTED]"),
        ("Cookie", "[REDACTED]"),
        ("X-API-Key", "[REDACTED]"),
        ("Accept", "*/*"),
        ("cookie", "[REDACTED]"),
    ]
    assert seen == [
        "header:authorization",
        "header:proxy-authorization",
        "header:cookie",
        "header:x-api-key",
        "header:cookie",
    ]


def test_defaults_off_leaves_them_and_returns_the_same_object() -> None:
    redact, seen = redactor({"defaults": False})
    req = request(headers=[("Authorization", "Bearer abc")])
    assert redact(req) is req
    assert seen == []


def test_headers_remembered_as_clean_are_still_copied_and_scanned_per_value() -> None:
    """The redactor remembers headers it left alone (a Referer without userinfo, once scanned); the
    second and third requests must come out as the first did, and a new value is scanned again."""
    redact, seen = redactor(None)
    referer = ("Referer", "https://shop.example.com/basket?step=2")
    for _ in range(3):
        out = redact(request(headers=[("Host", "h"), referer, ("Cookie", "sid=1"), ("Accept", "*/*")]))
        assert out.headers == [("Host", "h"), referer, ("Cookie", "[REDACTED]"), ("Accept", "*/*")]
    leaky = ("Referer", "https://bob:hunter2@shop.example.com/")
    for _ in range(2):
        out = redact(request(headers=[referer, leaky, ("Cookie", "sid=1")]))
        masked = ("Referer", "https://[REDACTED]@shop.example.com/")
        assert out.headers == [referer, masked, ("Cookie", "[REDACTED]")]
    assert seen == ["header:cookie"] * 3 + ["pattern:userinfo", "header:cookie"] * 2


def test_config_entry_overrides_its_default_only() -> None:
    redact, _ = redactor({"headers": {"cookie": "remove", "AUTHORIZATION": "keep", "X-Api-Key": "hmac"}})
    out = redact(
        request(
            headers=[
                ("Authorization", "Bearer abc"),
                ("Cookie", "sid=1"),
                ("X-Api-Key", "k-123"),
                ("Proxy-Authorization", "Basic xyz"),
            ]
        )
    )
    assert out.headers == [
        ("Authorization", "Bearer abc"),
        ("X-Api-Key", expected_hmac("k-123")),
        ("Proxy-Authorization", "[REDACTED]"),
    ]


def test_hmac_is_correlatable_and_unreadable() -> None:
    redact, _ = redactor({"headers": {"X-Session": "hmac"}})
    other, _ = redactor({"headers": {"X-Session": "hmac"}})
    first = redact(request(headers=[("X-Session", CANARY)])).headers[0][1]
    again = other(request(headers=[("x-session", CANARY)])).headers[0][1]
    different = redact(request(headers=[("X-Session", CANARY + "x")])).headers[0][1]
    assert first == again == expected_hmac(CANARY)
    assert HMAC_FORM.fullmatch(first)
    assert different != first
    assert CANARY not in first
    rekeyed, _ = redactor({"headers": {"X-Session": "hmac"}}, key=b"another key, 16+ bytes")
    assert rekeyed(request(headers=[("X-Session", CANARY)])).headers[0][1] != first


def test_no_op_returns_the_input_itself() -> None:
    redact, seen = redactor(
        {
            "query": {"token": "mask"},
            "json_fields": {"password": "mask"},
            "form_fields": {"password": "mask"},
            "patterns": {"card": {"regex": r"\b[0-9]{13,19}\b", "action": "mask"}},
        }
    )
    for req in (
        request("/items?id=42&page=2", [("Host", "h"), ("Accept", "*/*")]),
        request("/items", [("Content-Type", "application/json")], b'{"user": "bob"}'),
        request("/items", [("Content-Type", "application/x-www-form-urlencoded")], b"user=bob"),
        request("/items", [], b"plain text"),
    ):
        assert redact(req) is req
    assert seen == []


def test_the_input_is_never_mutated() -> None:
    redact, _ = redactor(
        {
            "query": {"token": "remove"},
            "json_fields": {"card.number": "mask", "pw": "remove"},
            "patterns": {"card": {"regex": r"\b[0-9]{13,19}\b", "action": "mask"}},
        }
    )
    req = request(
        "/p?token=abc&q=1",
        [("Authorization", "Bearer abc"), ("Content-Type", "application/json")],
        json.dumps({"card": [{"number": CARD}], "pw": "x", "note": CARD}).encode(),
    )
    before = copy.deepcopy(req)
    headers_list = req.headers
    out = redact(req)
    assert out is not req
    assert req == before
    assert req.headers is headers_list
    assert out.headers is not req.headers


# Query


def test_query_actions_keep_other_parameters_byte_for_byte() -> None:
    redact, seen = redactor({"query": {"token": "mask", "sig": "hmac", "session id": "remove"}})
    out = redact(request("/p?a=%41+b&token=abc&sig=x%2Fy&session+id=s&flag&token=def"))
    assert out.path == f"/p?a=%41+b&token=%5BREDACTED%5D&sig={expected_hmac('x/y')}&flag&token=%5BREDACTED%5D"
    assert seen == ["query:token", "query:sig", "query:session id", "query:token"]


_QUERY_NAME = st.text(alphabet="abtoken%+2F5-_.~é", max_size=8)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_QUERY_NAME, st.text(alphabet="ab=%+2F5é", max_size=8)), min_size=1, max_size=6))
def test_query_rules_touch_only_their_parameters(pairs: list[tuple[str, str]]) -> None:
    redact, _ = redactor({"query": {"token": "mask"}, "defaults": False})
    query = "&".join(f"{name}={value}" for name, value in pairs)
    out = redact(request(f"/p?{query}")).path
    assert out.startswith("/p?")
    out_pairs = out[3:].split("&")
    for (name, value), got in zip(pairs, out_pairs, strict=True):
        if unquote_plus(name, errors="surrogateescape") == "token":
            assert got == f"{name}=%5BREDACTED%5D"
        else:
            assert got == f"{name}={value}"


def test_removing_the_only_parameter_drops_the_question_mark() -> None:
    redact, _ = redactor({"query": {"token": "remove"}})
    assert redact(request("/p?token=abc")).path == "/p"


# JSON


def test_json_fields_nested_and_inside_arrays() -> None:
    redact, seen = redactor(
        {
            "json_fields": {"card.number": "mask", "user.email": "hmac", "password": "remove"},
            "defaults": False,
        }
    )
    document = {
        "card": [{"number": CARD, "exp": "12/30"}, {"number": 4012888888881881}],
        "user": {"email": "a@example.com", "name": "Ann"},
        "password": "hunter2",
        "other": {"password": "stays: paths start at the root"},
    }
    out = redact(json_request(document))
    assert json.loads(out.body) == {
        "card": [{"number": "[REDACTED]", "exp": "12/30"}, {"number": "[REDACTED]"}],
        "user": {"email": expected_hmac("a@example.com"), "name": "Ann"},
        "other": {"password": "stays: paths start at the root"},
    }
    assert b" " not in out.body.replace(b"stays: paths start at the root", b"")  # compact
    assert sorted(seen) == ["json:card.number", "json:card.number", "json:password", "json:user.email"]


def test_json_top_level_array_leaf_arrays_and_non_strings() -> None:
    redact, seen = redactor({"json_fields": {"tokens": "mask", "card": "hmac"}})
    document = [{"tokens": ["a", ["b", "c"]]}, {"card": {"number": 1, "cvv": "123"}}, "scalar"]
    out = json.loads(redact(json_request(document, "application/vnd.api+json; charset=utf-8")).body)
    assert out == [
        {"tokens": ["[REDACTED]", ["[REDACTED]", "[REDACTED]"]]},
        {"card": expected_hmac(b'{"cvv":"123","number":1}')},
        "scalar",
    ]
    assert seen.count("json:tokens") == 3


@pytest.mark.parametrize("content_type", ["text/plain", "application/octet-stream", None])
def test_json_is_recognised_by_content_whatever_the_content_type(content_type: str | None) -> None:
    """The red-team pass sent JSON as text/plain and without a Content-Type past every JSON rule."""
    for spec, rule in (
        ({"json_fields": {"pin": "mask"}, "defaults": False}, "json:pin"),
        (None, "json:default"),
    ):
        redact, seen = redactor(spec)
        headers = [] if content_type is None else [("Content-Type", content_type)]
        out = redact(request(headers=headers, body=b' \n{"pin": "x", "n": 1}'))
        assert json.loads(out.body) == {"pin": "[REDACTED]", "n": 1}
        assert seen == [rule]
    req = request(headers=[("Content-Type", "text/plain")], body=b"just {text}")
    assert redactor(None)[0](req) is req


def test_unparsed_json_is_counted_and_left_to_patterns() -> None:
    redact, seen = redactor(
        {
            "json_fields": {"card": "mask"},
            "patterns": {"card": {"regex": r"\b[0-9]{13,19}\b", "action": "mask"}},
        }
    )
    truncated = f'{{"card": "{CARD}", "note": "cut he'.encode()
    req = request(headers=[("Content-Type", "application/json")], body=truncated)
    req.body_len = 4096
    out = redact(req)
    assert out.body == b'{"card": "[REDACTED]", "note": "cut he'
    assert seen == ["json:unparsed", "pattern:card"]
    assert out.body_len == 4096 + len(out.body) - len(truncated)


def test_json_too_deep_for_the_stack_counts_as_unparsed() -> None:
    redact, seen = redactor({"json_fields": {"a": "mask"}})
    body = b"[" * 5000 + b'{"a": 1}' + b"]" * 5000
    req = request(headers=[("Content-Type", "application/json")], body=body)
    assert redact(req) is req
    assert seen == ["json:unparsed"]


# Forms


@pytest.mark.parametrize("name", ["zip_code", "Work-Phone", "cvv", "X_Token"])
def test_the_body_pre_scan_finds_names_with_rare_letters(name: str) -> None:
    """The pre-scan searches for a name holding a rare letter (z, k, v, w, x...) only when that letter
    is in the body: found in JSON and in text, whatever the case, and at the body's first byte."""
    redact, seen = redactor({"json_fields": {name: "mask"}, "form_fields": {name: "mask"}})
    assert json.loads(redact(json_request({"a": 1, name: "555-0100"})).body)[name] == "[REDACTED]"
    assert redact(form_request(f"a=1&{name}=555-0100")).body == f"a=1&{name}=%5BREDACTED%5D".encode()
    assert redact(form_request(f"{name}=555-0100&a=1")).body == f"{name}=%5BREDACTED%5D&a=1".encode()
    assert len(seen) == 3


def test_form_fields() -> None:
    redact, seen = redactor({"form_fields": {"password": "mask", "otp": "remove", "email": "hmac"}})
    out = redact(form_request("user=bob&password=hun+ter%32&otp=123456&email=a%40b.c&x=%7E"))
    assert out.body == f"user=bob&password=%5BREDACTED%5D&email={expected_hmac('a@b.c')}&x=%7E".encode()
    assert out.body_len == len(out.body)
    assert seen == ["form:password", "form:otp", "form:email"]


def test_form_rules_need_the_form_content_type_but_defaults_read_text() -> None:
    redact, _ = redactor({"form_fields": {"pass": "mask"}, "defaults": False})
    req = request(headers=[("Content-Type", "text/plain")], body=b"pass=x")
    assert redact(req) is req
    redact, seen = redactor(None)
    out = redact(request(headers=[("Content-Type", "text/plain")], body=b"a=1&Pass%77ord=x y"))
    assert out.body == b"a=1&Pass%77ord=%5BREDACTED%5D y"
    assert seen == ["text:default"]


# Patterns


def test_card_pattern_over_body_and_decoded_query_values() -> None:
    redact, seen = redactor(
        {
            "patterns": {"card": {"regex": r"\b(?:[0-9][ -]?){12,18}[0-9]\b", "action": "mask"}},
            "defaults": False,
        }
    )
    out = redact(
        request(
            "/pay?card=4111+1111+1111+1111&id=42",
            [("Content-Type", "text/plain")],
            b"cards: 4111-1111-1111-1111 and 5500005555555559.",
        )
    )
    assert out.path == "/pay?card=%5BREDACTED%5D&id=42"
    assert out.body == b"cards: [REDACTED] and [REDACTED]."
    assert seen == ["pattern:card"] * 3


def test_pattern_hmac_and_remove() -> None:
    redact, seen = redactor(
        {
            "patterns": {
                "card": {"regex": "[0-9]{16}", "action": "hmac"},
                "ssn": {"regex": r"[0-9]{3}-[0-9]{2}-[0-9]{4}", "action": "remove"},
            }
        }
    )
    out = redact(request(body=f"c={CARD};s=123-45-6789;".encode()))
    assert out.body == f"c={expected_hmac(CARD)};s=;".encode()
    assert seen == ["pattern:card", "pattern:ssn"]


# The canary: a secret in every redactable place never leaves.


@pytest.mark.parametrize("free_text", [False, True], ids=["named places", "named and free text"])
def test_a_canary_in_every_redactable_place_never_leaves(free_text: bool) -> None:
    """Without free text, each named rule must catch its own place (no pattern to hide behind);
    with it, the canary pattern must catch what no named rule covers, in every kind of body."""
    spec: dict = {
        "headers": {"X-Session": "hmac", "X-Internal-Token": "remove"},
        "query": {"token": "mask", "sig": "hmac", "drop": "remove"},
        "json_fields": {"user.password": "mask", "items.secret": "hmac", "api.key": "remove"},
        "form_fields": {"password": "mask", "pin": "hmac", "otp": "remove"},
    }
    extra = ""
    if free_text:
        spec["patterns"] = {"canary": {"regex": re.escape(CANARY), "action": "mask"}}
        extra = CANARY
    redact, _ = redactor(spec)
    path = f"/p?token={CANARY}&sig={CANARY}&drop={CANARY}&free=x-{extra}-y"
    headers = [
        ("Authorization", f"Bearer {CANARY}"),
        ("Proxy-Authorization", CANARY),
        ("Cookie", f"sid={CANARY}"),
        ("X-Api-Key", CANARY),
        ("X-Session", CANARY),
        ("X-Internal-Token", CANARY),
    ]
    document = {
        "user": {"password": CANARY},
        "items": [{"secret": CANARY}, {"secret": [CANARY]}],
        "api": {"key": CANARY},
        "note": f"free text {extra}",
    }
    bodies = [
        (("Content-Type", "application/json"), json.dumps(document).encode()),
        (
            ("Content-Type", "application/x-www-form-urlencoded"),
            f"password={CANARY}&pin={CANARY}&otp={CANARY}&note={extra}".encode(),
        ),
    ]
    if free_text:
        bodies += [
            (("Content-Type", "application/octet-stream"), f"\x00raw {CANARY}\xff".encode("latin-1")),
            (("Content-Type", "application/json"), f'{{"broken": "{CANARY}'.encode()),
        ]
    needle = CANARY.encode()
    for content_type, body in bodies:
        out = redact(request(path, [*headers, content_type], body))
        wire = "\r\n".join(f"{name}: {value}" for name, value in out.headers).encode() + out.path.encode()
        assert needle not in wire + out.body, (content_type, out)


# merge_redaction


def test_merge_target_overrides_global_per_name() -> None:
    global_spec = {
        "headers": {"Authorization": "hmac", "X-Session": "mask"},
        "query": {"token": "mask"},
        "patterns": {"card": {"regex": "[0-9]{16}", "action": "mask"}},
        "defaults": True,
    }
    target_spec = {
        "headers": {"authorization": "keep"},
        "query": {"sig": "hmac"},
        "patterns": {"card": "keep"},
        "defaults": False,
    }
    snapshot = copy.deepcopy(global_spec)
    merged = merge_redaction(global_spec, target_spec)
    assert merged == {
        "headers": {"X-Session": "mask", "authorization": "keep"},
        "query": {"token": "mask", "sig": "hmac"},
        "patterns": {"card": "keep"},
        "defaults": False,
    }
    assert global_spec == snapshot
    redact, _ = redactor(merged)
    out = redact(request("/p?token=a&sig=b", [("Authorization", "Bearer x"), ("Cookie", "c")], CARD.encode()))
    assert out.headers == [("Authorization", "Bearer x"), ("Cookie", "c")]
    assert out.path == f"/p?token=%5BREDACTED%5D&sig={expected_hmac('b')}"
    assert out.body == CARD.encode()


def test_merge_with_nothing_on_one_side() -> None:
    spec = {"query": {"token": "mask"}}
    assert merge_redaction(None, None) is None
    assert merge_redaction(spec, None) is spec
    assert merge_redaction(None, spec) is spec


# Config errors


@pytest.mark.parametrize(
    ("spec", "key", "message"),
    [
        ({"headers": {"X-Token": "hmac"}}, None, "t.headers.X-Token: action 'hmac' needs an HMAC key"),
        ({"json_fields": {"a.b": "hmac"}}, b"", "t.json_fields.a.b: action 'hmac' needs an HMAC key"),
        (
            {"patterns": {"card": {"regex": "[0-9]{16}", "action": "hmac"}}},
            None,
            "t.patterns.card.action: action 'hmac' needs an HMAC key",
        ),
        ({"query": {"token": "hide"}}, KEY, "t.query.token: unknown action 'hide'; expected one of remove"),
        ({"header": {}}, KEY, "t.header: unknown key; expected one of defaults, headers"),
        ({"defaults": "yes"}, KEY, "t.defaults: must be true or false, got 'yes'"),
        ({"headers": ["Authorization"]}, KEY, "t.headers: must be a mapping of name to action"),
        ({"headers": {"Bad Name": "mask"}}, KEY, "t.headers: not a header name: 'Bad Name'"),
        ({"headers": {"X-A": "mask", "x-a": "remove"}}, KEY, "t.headers.x-a: listed twice"),
        (
            {"json_fields": {"a..b": "mask"}},
            KEY,
            "t.json_fields: not a dotted path of non-empty keys: 'a..b'",
        ),
        (
            {"patterns": {"card": {"regex": "(", "action": "mask"}}},
            KEY,
            "t.patterns.card.regex: bad regex '('",
        ),
        (
            {"patterns": {"x": {"regex": "a*", "action": "mask"}}},
            KEY,
            "t.patterns.x.regex: 'a*' can match the empty",
        ),
        ({"patterns": {"x": {"regex": "a"}}}, KEY, "t.patterns.x.action: missing"),
        (
            {"patterns": {"x": {"regex": "a", "action": "mask", "flags": "i"}}},
            KEY,
            "t.patterns.x.flags: unknown key",
        ),
        ({"patterns": {"x y": {"regex": "a", "action": "mask"}}}, KEY, "t.patterns: pattern names must be"),
        ({"patterns": {"x": "a+"}}, KEY, "t.patterns.x: must be a mapping with regex and action"),
        ("mask", KEY, "t: must be a mapping"),
    ],
)
def test_config_errors_name_the_key(spec: object, key: bytes | None, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_redactor(spec, "t", key, lambda rule: None)  # type: ignore[arg-type]
    assert str(info.value).startswith(message)


# Bytes that are not UTF-8, and JSON that is not ASCII (mutation-testing survivors)


def test_form_bodies_that_are_not_utf8_keep_their_other_bytes() -> None:
    redact, seen = redactor({"form_fields": {"password": "mask"}})
    body = b"name=\xff\xfe&password=hunter2&note=caf%C3%A9"
    req = redact(request(headers=[("Content-Type", "application/x-www-form-urlencoded")], body=body))
    assert req.body == b"name=\xff\xfe&password=%5BREDACTED%5D&note=caf%C3%A9"
    assert seen == ["form:password"]


def test_json_keeps_non_ascii_text_as_utf8_and_compact() -> None:
    redact, _ = redactor({"json_fields": {"password": "mask"}})
    req = redact(json_request({"name": "café", "password": "x", "list": [1, 2]}))
    assert req.body == '{"name":"café","password":"[REDACTED]","list":[1,2]}'.encode()


def test_json_with_a_lone_surrogate_escape_stays_escaped() -> None:
    redact, _ = redactor({"json_fields": {"password": "mask"}})
    body = b'{"name": "\\ud800 caf\\u00e9", "password": "x"}'
    req = redact(request(headers=[("Content-Type", "application/json")], body=body))
    assert req.body == b'{"name":"\\ud800 caf\\u00e9","password":"[REDACTED]"}'


def test_query_values_holding_an_equals_sign_and_encoded_names_are_redacted() -> None:
    redact, seen = redactor({"query": {"token": "mask"}})
    assert redact(request("/a?token=x=y&id=1")).path == "/a?token=%5BREDACTED%5D&id=1"
    assert redact(request("/a?t%6Fken=x&id=1")).path == "/a?t%6Fken=%5BREDACTED%5D&id=1"
    assert seen == ["query:token", "query:token"]


def test_a_keep_pattern_does_not_stop_the_patterns_after_it() -> None:
    patterns = {
        "first": {"regex": "a+", "action": "keep"},
        "digits": {"regex": "[0-9]+", "action": "mask"},
        "second": {"regex": "b+", "action": "keep"},
        "zed": {"regex": "z", "action": "remove"},
    }
    redact, seen = redactor({"patterns": patterns})
    assert redact(request(body=b"aa 123 bb z")).body == b"aa [REDACTED] bb "
    assert seen == ["pattern:digits", "pattern:zed"]


def test_hmac_digests_the_original_bytes_even_when_they_are_not_utf8() -> None:
    """A header value, a query value and a JSON string can hold bytes that are not UTF-8 (kept as
    surrogates): the digest is of the bytes the client sent."""
    spec = {"headers": {"X-Id": "hmac"}, "query": {"id": "hmac"}, "json_fields": {"id": "hmac"}}
    redact, _ = redactor(spec)
    byte_ff, lone_surrogate = expected_hmac(b"\xff"), expected_hmac(b"\xed\xa0\x80")
    out = redact(request("/a?id=%FF&q=1?x", [("X-Id", "\udcff")]))
    assert out.headers == [("X-Id", byte_ff)]
    assert out.path == f"/a?id={byte_ff}&q=1?x"
    out = redact(request(headers=[("Content-Type", "application/json")], body=b'{"id": "\\ud800"}'))
    assert out.body == f'{{"id":"{lone_surrogate}"}}'.encode()


def test_the_query_starts_at_the_first_question_mark() -> None:
    redact, _ = redactor({"query": {"token": "mask"}})
    assert redact(request("/a?token=x?y&id=1")).path == "/a?token=%5BREDACTED%5D&id=1"


def test_json_without_a_matching_field_is_left_byte_for_byte() -> None:
    redact, seen = redactor({"json_fields": {"password": "mask", "user.card": "mask"}})
    bodies = (b'{"user": {"name": "a"},  "items": [ {"x": 1} ]}', b'{"user": ["x", {"name": "a"}]}',
              b'{"user": "scalar" }')  # fmt: skip
    for body in bodies:
        assert redact(request(headers=[("Content-Type", "application/json")], body=body)).body == body
    assert seen == []


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"query": {"": "mask"}}, "t.query: names must be non-empty strings, got ''"),
        ({"form_fields": {"": "mask"}}, "t.form_fields: names must be non-empty strings, got ''"),
        ({"patterns": {"x": {"regex": "", "action": "mask"}}},
         "t.patterns.x.regex: must be a non-empty string"),
        ({"query": {"a": "zap"}}, "t.query.a: unknown action 'zap'; expected one of remove, mask, hmac, "),
    ],
)
def test_empty_names_and_regexes_are_config_errors(spec: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_redactor(spec, "t", KEY, lambda rule: None)
    assert str(info.value).startswith(message)


def test_a_pattern_hmac_in_a_query_value_keeps_its_colon() -> None:
    redact, _ = redactor({"patterns": {"card": {"regex": "[0-9]{16}", "action": "hmac"}}})
    assert redact(request(f"/pay?card={CARD}")).path == f"/pay?card={expected_hmac(CARD)}"


def test_a_keep_entry_does_not_stop_the_rules_after_it() -> None:
    """`keep` switches one inherited rule off, not the rest of its section."""
    patterns = {"off": "keep", "digits": {"regex": "[0-9]+", "action": "mask"}}
    redact, seen = redactor({"json_fields": {"name": "keep", "password": "mask"}, "patterns": patterns})
    out = redact(json_request({"name": "n", "password": "p", "note": "call 123"}))
    assert out.body == b'{"name":"n","password":"[REDACTED]","note":"call [REDACTED]"}'
    assert seen == ["json:password", "pattern:digits"]


def test_keep_leaves_query_and_form_values_alone_even_with_an_hmac_key() -> None:
    redact, seen = redactor({"query": {"token": "keep"}, "form_fields": {"token": "keep"}})
    req = redact(form_request("token=abc"))
    assert (req.body, redact(request("/a?token=abc")).path, seen) == (b"token=abc", "/a?token=abc", [])

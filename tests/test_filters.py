"""Filters: every rule kind, AND across kinds and OR within one, allow and deny, and config errors
that name their key."""

from __future__ import annotations

import pytest

from spoa_mirror.errors import ConfigError
from spoa_mirror.filters import Filter, build_filter
from spoa_mirror.request import MirrorRequest


def request(
    method: str = "GET", path: str = "/", headers: list[tuple[str, str]] | None = None
) -> MirrorRequest:
    return MirrorRequest(method, path, "1.1", headers or [])


def build(spec: dict) -> Filter:
    passes = build_filter(spec, "targets[0].filters")
    assert passes is not None
    return passes


def test_no_spec_means_no_filter() -> None:
    assert build_filter(None, "t") is None
    assert build_filter({}, "t") is None
    assert build_filter({"allow": None, "deny": None}, "t") is None


def test_path_prefix_ignores_the_query_string() -> None:
    passes = build({"allow": {"path_prefix": ["/api/", "/v2/"]}})
    assert passes(request(path="/api/items"))
    assert passes(request(path="/v2/x?y=1"))
    assert not passes(request(path="/web?next=/api/"))
    assert not passes(request(path="/apix"))


def test_path_regex_is_searched_on_the_path_only() -> None:
    passes = build({"allow": {"path_regex": [r"/items/[0-9]+$", "^/admin"]}})
    assert passes(request(path="/shop/items/42?x=1"))
    assert passes(request(path="/admin/users"))
    assert not passes(request(path="/shop/items/42/edit"))
    assert not passes(request(path="/search?q=/admin"))


def test_methods_are_upper_cased_in_config_and_compared_as_sent() -> None:
    passes = build({"allow": {"methods": ["get", "Head"]}})
    assert passes(request("GET"))
    assert passes(request("HEAD"))
    assert not passes(request("POST"))
    assert not passes(request("get"))  # methods are case-sensitive on the wire


def test_headers_presence_and_regex() -> None:
    passes = build({"allow": {"headers": {"X-Canary": True, "User-Agent": "^Mozilla/"}}})
    assert passes(request(headers=[("x-canary", "")]))
    assert passes(request(headers=[("User-Agent", "curl/8"), ("user-agent", "Mozilla/5.0")]))
    assert not passes(request(headers=[("User-Agent", "curl/8 Mozilla/5.0")]))
    assert not passes(request(headers=[("X-Other", "1")]))


def test_kinds_are_anded_and_entries_ored() -> None:
    passes = build({"allow": {"path_prefix": ["/a", "/b"], "methods": ["GET"], "headers": {"X-T": True}}})
    t = [("X-T", "1")]
    assert passes(request("GET", "/a", t))
    assert passes(request("GET", "/b/c", t))
    assert not passes(request("POST", "/a", t))
    assert not passes(request("GET", "/c", t))
    assert not passes(request("GET", "/a"))


def test_deny_alone() -> None:
    passes = build({"deny": {"path_prefix": ["/health"]}})
    assert passes(request(path="/api"))
    assert not passes(request(path="/healthz"))


def test_allow_then_deny() -> None:
    passes = build(
        {"allow": {"path_prefix": ["/api/"]}, "deny": {"path_prefix": ["/api/admin"], "methods": ["DELETE"]}}
    )
    assert passes(request("GET", "/api/items"))
    assert passes(request("GET", "/api/admin/x"))  # deny needs both its kinds
    assert passes(request("DELETE", "/api/items"))
    assert not passes(request("DELETE", "/api/admin/x"))
    assert not passes(request("GET", "/web"))


W = "targets[0].filters"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"allow": {"methods": ["GET", "GOT"]}}, f"{W}.allow.methods: unknown method 'GOT'"),
        ({"allow": {"methods": ["G T"]}}, f"{W}.allow.methods: not a method token: 'G T'"),
        ({"deny": {"path_regex": ["(unclosed"]}}, f"{W}.deny.path_regex: bad regex '(unclosed'"),
        ({"allow": {"headers": {"X-A": "[z-a]"}}}, f"{W}.allow.headers.X-A: bad regex '[z-a]'"),
        ({"allow": {"headers": {"X-A": False}}}, f"{W}.allow.headers.X-A: must be true or a regex string"),
        ({"allow": {"headers": {"X A": True}}}, f"{W}.allow.headers: not a header name: 'X A'"),
        ({"allow": {"headers": {}}}, f"{W}.allow.headers: must be a non-empty mapping"),
        ({"allow": {"path_prefix": "/api"}}, f"{W}.allow.path_prefix: must be a list of strings, got '/api'"),
        ({"allow": {"path_prefix": []}}, f"{W}.allow.path_prefix: must not be empty"),
        ({"allow": {"path_prefix": ["api/"]}}, f"{W}.allow.path_prefix: prefix must start with '/'"),
        ({"allow": {"path_prefix": ["/a?b"]}}, f"{W}.allow.path_prefix: paths are matched without the query"),
        ({"allow": {"paths": ["/a"]}}, f"{W}.allow.paths: unknown key"),
        ({"allow": {}}, f"{W}.allow: must list at least one of path_prefix"),
        ({"deny": []}, f"{W}.deny: must be a mapping"),
        ({"alow": {"methods": ["GET"]}}, f"{W}.alow: unknown key; expected one of allow, deny"),
        (["allow"], f"{W}: must be a mapping with allow and/or deny"),
    ],
)
def test_config_errors_name_the_key(spec: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_filter(spec, W)  # type: ignore[arg-type]
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    "path",
    [
        "/api/admin",
        "/api//admin",
        "/api/./admin",
        "/api/%61dmin",
        "/api/%61%64min/x",
        "//api/admin",
        "/x/../api/admin",
        "/x/y/../../api/admin?q=1",
        "/../api/admin",
        "/api/admin/.",
        "/api/%2e/admin",
        "/api/.%2e/api/admin",
    ],
)
def test_deny_matches_every_spelling_of_the_denied_path(path: str) -> None:
    """Spellings a server resolves to /api/admin..., which the red-team pass got past the filter."""
    for rules in ({"path_prefix": ["/api/admin"]}, {"path_regex": ["^/api/admin"]}):
        passes = build({"deny": rules})
        assert not passes(request(path=path)), (rules, path)


def test_normalisation_keeps_reserved_escapes_and_different_paths_apart() -> None:
    passes = build({"deny": {"path_prefix": ["/api/admin"]}})
    assert passes(request(path="/api%2Fadmin"))  # an escaped slash is not a separator
    assert passes(request(path="/api/users/../adm"))
    assert passes(request(path="/API/admin"))  # case-sensitive unless asked
    assert passes(request(path="/api/x?next=/api/admin"))


def test_ignore_path_case_folds_prefixes_and_regexes() -> None:
    for rules in ({"path_prefix": ["/api/Admin"]}, {"path_regex": ["^/api/admin"]}):
        passes = build({"deny": rules, "ignore_path_case": True})
        for path in ("/API/admin", "/api/ADMIN/x", "/Api//%41dmin"):
            assert not passes(request(path=path)), (rules, path)
        assert passes(request(path="/api/user"))


@pytest.mark.parametrize("header", ["X-HTTP-Method-Override", "x-http-method", "X-Method-Override"])
def test_method_overrides_count_as_methods(header: str) -> None:
    """The side-effect guard: under `allow: methods: [GET, HEAD]` a GET claiming DELETE does not pass;
    a deny on DELETE matches it."""
    allow = build({"allow": {"methods": ["GET", "HEAD"]}})
    deny = build({"deny": {"methods": ["DELETE"]}})
    assert allow(request("GET", headers=[(header, "GET")]))
    assert not allow(request("GET", headers=[(header, "DELETE")]))
    assert not allow(request("GET", headers=[(header, " delete ")]))
    assert not allow(request("GET", headers=[("X-Other", "1"), (header, "GET"), (header, "PUT")]))
    assert not deny(request("GET", headers=[(header, "DELETE")]))
    assert deny(request("GET", headers=[(header, "GET")]))


def test_ignore_path_case_must_be_a_boolean() -> None:
    with pytest.raises(ConfigError, match=r"^targets\[0\]\.filters\.ignore_path_case: must be true or false"):
        build({"ignore_path_case": "yes", "deny": {"methods": ["GET"]}})

"""Which requests a target is allowed to see at all, before sampling.

Configuration (`where` names the filter mapping, e.g. `targets[0].filters`)::

    allow:            # optional; when present, only matching requests pass
      path_prefix: ["/api/", "/v2/"]
      path_regex: ["^/items/[0-9]+$"]
      methods: [GET, HEAD]
      headers: {X-Canary: true, User-Agent: "^Mozilla/"}
    deny:             # optional; matching requests never pass, even when allowed
      path_prefix: ["/api/admin"]

A request passes when it matches `allow` (if present) and does not match `deny` (if present).
Within one block every criterion kind listed must match (AND) and, within a kind, any one entry is
enough (OR): `{path_prefix: [/a, /b], methods: [GET]}` means "GET on /a... or /b...". That reads
like an HAProxy ACL line and is what an on-call engineer expects from a block that narrows traffic;
rules of different shapes go in the other block (e.g. exclusions in `deny`).

- Paths are matched normalised, the way a server resolves them, so that no spelling of a denied
  path slips past a rule: the query string cut off, percent-escapes of unreserved characters
  decoded (`%61` is `a`; `%2F` stays, as servers keep it apart from `/`), runs of slashes made one,
  and `.` and `..` segments resolved (RFC 3986 5.2.4). `deny: {path_prefix: [/api/admin]}` stops
  `/api//admin`, `/api/./admin`, `/api/%61dmin`, `//api/admin` and `/x/../api/admin`.
  `ignore_path_case: true` (beside allow and deny) also compares paths case-insensitively, for
  servers that do (`/API/admin`). The request goes to the shadow as received. Prefixes must start
  with `/`.
- `path_regex` and header regexes are searched (unanchored, like HAProxy's `-m reg`); anchor with
  `^`/`$` when needed. They are compiled at build time, so a bad one is a config error.
- `methods` are upper-cased and must be registered HTTP methods (IANA registry, plus PURGE): a typo
  such as `GOT` is an error rather than a filter that silently matches nothing. Requests are compared
  as sent, since methods are case-sensitive. Method-override headers (`X-HTTP-Method-Override`,
  `X-HTTP-Method`, `X-Method-Override`), which many frameworks obey, count as methods too: an `allow`
  (and a target's `methods`) needs the request's method and every override to be listed, a `deny`
  matches when any of them is. So a `GET` carrying `X-HTTP-Method-Override: DELETE` never passes
  `methods: [GET, HEAD]`, the side-effect guard.
- `headers`: `NAME: true` matches when the header is present (even empty); `NAME: "regex"` when any of
  its values matches. Names are case-insensitive.
- Empty blocks and empty lists are errors: `deny: {}` would otherwise deny everything.

Cost per call on the 2-core development machine (Python 3.11), measured with::

    .venv/bin/python -m timeit -s "from spoa_mirror.filters import build_filter; \
        from spoa_mirror.request import MirrorRequest; \
        r = MirrorRequest('GET', '/api/items/42?x=1', '1.1', \
            [('Host', 'h'), ('Accept', '*/*'), ('User-Agent', 'Mozilla/5.0'), ('X-Canary', '1')]); \
        f = build_filter({'allow': {'path_prefix': ['/api/', '/v2/'], 'methods': ['GET', 'HEAD']}, \
            'deny': {'path_regex': ['^/api/admin']}}, 't')" "f(r)"

~0.5 us for that allow+deny filter; ~0.08 us for a lone `path_prefix`; ~0.46 us for a lone
`headers: {User-Agent: "^Mozilla/"}`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from pydantic import Field

from spoa_mirror.config_types import Bool, Section
from spoa_mirror.errors import ConfigError
from spoa_mirror.request import MirrorRequest

Filter = Callable[[MirrorRequest], bool]
_Criterion = Callable[[MirrorRequest], bool]

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_KINDS = ("path_prefix", "path_regex", "methods", "headers")
_FILTER_KEYS = ("allow", "deny", "ignore_path_case")
METHOD_OVERRIDE_HEADERS = frozenset({"x-http-method-override", "x-http-method", "x-method-override"})
# A length test first: most header names cannot be an override, and len() is cheaper than lower().
_OVERRIDE_NAME_LENGTHS = frozenset(len(name) for name in METHOD_OVERRIDE_HEADERS)
_PERCENT_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_SLASHES = re.compile(r"//+")
# https://www.iana.org/assignments/http-methods, plus PURGE, which caches use without registering it.
KNOWN_METHODS = frozenset(
    {
        "ACL", "BASELINE-CONTROL", "BIND", "CHECKIN", "CHECKOUT", "CONNECT", "COPY", "DELETE", "GET",
        "HEAD", "LABEL", "LINK", "LOCK", "MERGE", "MKACTIVITY", "MKCALENDAR", "MKCOL", "MKREDIRECTREF",
        "MKWORKSPACE", "MOVE", "OPTIONS", "ORDERPATCH", "PATCH", "POST", "PRI", "PROPFIND", "PROPPATCH",
        "PUT", "QUERY", "REBIND", "REPORT", "SEARCH", "TRACE", "UNBIND", "UNCHECKOUT", "UNLINK",
        "UNLOCK", "UPDATE", "UPDATEREDIRECTREF", "VERSION-CONTROL", "PURGE",
    }
)  # fmt: skip


def build_filter(spec: dict | None, where: str) -> Filter | None:
    """The per-request admission test for one target (True: passes), or None when the target has
    no filter, so the caller can skip the call entirely."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ConfigError(where, f"must be a mapping with allow and/or deny, got {spec!r}")
    for name in spec:
        if name not in _FILTER_KEYS:
            raise ConfigError(f"{where}.{name}", f"unknown key; expected one of {', '.join(_FILTER_KEYS)}")
    fold_case = spec.get("ignore_path_case", False)
    if not isinstance(fold_case, bool):
        raise ConfigError(f"{where}.ignore_path_case", f"must be true or false, got {fold_case!r}")
    allow_spec, deny_spec = spec.get("allow"), spec.get("deny")
    allow = None if allow_spec is None else _build_rules(allow_spec, f"{where}.allow", False, fold_case)
    deny = None if deny_spec is None else _build_rules(deny_spec, f"{where}.deny", True, fold_case)

    if allow is None and deny is None:
        return None
    if deny is None:
        return allow
    if allow is None:

        def not_denied(req: MirrorRequest) -> bool:
            return not deny(req)

        return not_denied

    def allowed_not_denied(req: MirrorRequest) -> bool:
        return allow(req) and not deny(req)

    return allowed_not_denied


def _build_rules(rules: object, where: str, deny: bool, fold_case: bool) -> Filter:
    if not isinstance(rules, dict):
        raise ConfigError(where, f"must be a mapping of {', '.join(_KINDS)}, got {rules!r}")
    if not rules:
        raise ConfigError(where, f"must list at least one of {', '.join(_KINDS)}")
    criteria: list[_Criterion] = []
    for kind, value in rules.items():
        key = f"{where}.{kind}"
        if kind == "path_prefix":
            criteria.append(_path_prefix(value, key, fold_case))
        elif kind == "path_regex":
            criteria.append(_path_regex(value, key, fold_case))
        elif kind == "methods":
            methods = _methods(value, key)
            criteria.append(any_method_in(methods) if deny else methods_allowed(methods))
        elif kind == "headers":
            criteria.append(_headers(value, key))
        else:
            raise ConfigError(key, f"unknown key; expected one of {', '.join(_KINDS)}")

    if len(criteria) == 1:
        return criteria[0]
    if len(criteria) == 2:
        first, second = criteria

        def both(req: MirrorRequest) -> bool:
            return first(req) and second(req)

        return both
    frozen = tuple(criteria)

    def every(req: MirrorRequest) -> bool:
        return all(criterion(req) for criterion in frozen)

    return every


def _strings(value: object, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(key, f"must be a list of strings, got {value!r}")
    if not value:
        raise ConfigError(key, "must not be empty")
    return value


def _compile(pattern: str, key: str, flags: int = 0) -> re.Pattern[str]:
    try:
        return re.compile(pattern, flags)
    except re.error as exc:
        raise ConfigError(key, f"bad regex {pattern!r}: {exc}") from None


def _path_of(target: str) -> str:
    mark = target.find("?")
    return target if mark < 0 else target[:mark]


def _decode_unreserved(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else match.group().upper()


def normalised_path(target: str) -> str:
    """The path of a request target as a server resolves it (see the module docstring). A path with
    no `%`, no `//` and no `/.` is already normal and comes back as is (~0.1 us)."""
    path = _path_of(target)
    if "%" in path:
        path = _PERCENT_ESCAPE.sub(_decode_unreserved, path)
    if "//" in path:
        path = _SLASHES.sub("/", path)
    if "/." in path:
        path = _without_dot_segments(path)
    return path


def _without_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 for an absolute path: `..` above the root stays at the root."""
    resolved: list[str] = []
    segments = path.split("/")
    for segment in segments[1:]:
        if segment == "..":
            if resolved:
                resolved.pop()
        elif segment != ".":
            resolved.append(segment)
    trailing = "/" if segments[-1] in (".", "..") else ""
    return "/" + "/".join(resolved) + trailing


def _path_prefix(value: object, key: str, fold_case: bool) -> _Criterion:
    prefixes = _strings(value, key)
    for prefix in prefixes:
        if not prefix.startswith("/"):
            raise ConfigError(key, f"prefix must start with '/', got {prefix!r}")
        if "?" in prefix:
            raise ConfigError(key, f"paths are matched without the query string, so {prefix!r} never matches")
    if fold_case:
        folded = tuple(prefix.lower() for prefix in prefixes)

        def path_prefix_any_case(req: MirrorRequest) -> bool:
            return normalised_path(req.path).lower().startswith(folded)

        return path_prefix_any_case
    frozen = tuple(prefixes)

    def path_prefix(req: MirrorRequest) -> bool:
        return normalised_path(req.path).startswith(frozen)

    return path_prefix


def _path_regex(value: object, key: str, fold_case: bool) -> _Criterion:
    flags = re.IGNORECASE if fold_case else 0
    regexes = tuple(_compile(pattern, key, flags).search for pattern in _strings(value, key))
    if len(regexes) == 1:
        search = regexes[0]

        def path_regex(req: MirrorRequest) -> bool:
            return search(normalised_path(req.path)) is not None

        return path_regex

    def path_regexes(req: MirrorRequest) -> bool:
        path = normalised_path(req.path)
        return any(search(path) is not None for search in regexes)

    return path_regexes


def override_methods(req: MirrorRequest) -> list[str]:
    """The methods a request's override headers claim, upper-cased; empty for nearly every request."""
    claimed = []
    for name, value in req.headers:
        if len(name) in _OVERRIDE_NAME_LENGTHS and name.lower() in METHOD_OVERRIDE_HEADERS:
            claimed.append(value.strip().upper())
    return claimed


def methods_allowed(methods: frozenset[str]) -> _Criterion:
    """The side-effect guard: the method and every override it claims are in `methods`."""

    def method_and_overrides_in(req: MirrorRequest) -> bool:
        if req.method not in methods:
            return False
        return all(claimed in methods for claimed in override_methods(req))

    return method_and_overrides_in


def any_method_in(methods: frozenset[str]) -> _Criterion:
    """For `deny`: the method or any override it claims is in `methods`."""

    def method_or_override_in(req: MirrorRequest) -> bool:
        if req.method in methods:
            return True
        return any(claimed in methods for claimed in override_methods(req))

    return method_or_override_in


def _methods(value: object, key: str) -> frozenset[str]:
    methods = set()
    for method in _strings(value, key):
        if _TOKEN.fullmatch(method) is None:
            raise ConfigError(key, f"not a method token: {method!r}")
        upper = method.upper()
        if upper not in KNOWN_METHODS:
            raise ConfigError(key, f"unknown method {method!r}")
        methods.add(upper)
    return frozenset(methods)


def _headers(value: object, key: str) -> _Criterion:
    if not isinstance(value, dict) or not value:
        raise ConfigError(
            key, f"must be a non-empty mapping of header name to true or a regex, got {value!r}"
        )
    present: set[str] = set()
    matching: dict[str, re.Pattern[str]] = {}
    for name, test in value.items():
        if not isinstance(name, str) or _TOKEN.fullmatch(name) is None:
            raise ConfigError(key, f"not a header name: {name!r}")
        if test is True:
            present.add(name.lower())
        elif isinstance(test, str):
            matching[name.lower()] = _compile(test, f"{key}.{name}")
        else:
            raise ConfigError(f"{key}.{name}", f"must be true or a regex string, got {test!r}")
    frozen_present = frozenset(present)

    def header_matches(req: MirrorRequest) -> bool:
        for name, header_value in req.headers:
            lname = name.lower()
            if lname in frozen_present:
                return True
            regex = matching.get(lname)
            if regex is not None and regex.search(header_value) is not None:
                return True
        return False

    return header_matches


class FilterRules(Section):
    """One block of criteria: every kind listed must match (AND); within a kind, any entry (OR)."""

    path_prefix: list[str] | None = Field(
        None, description="normalised path starts with one of these; each starts with /"
    )
    path_regex: list[str] | None = Field(None, description="normalised path matches one of these (searched)")
    methods: list[str] | None = Field(
        None, description="request method (and any method-override header) among these registered methods"
    )
    headers: dict[str, bool | str] | None = Field(
        None, description="NAME: true (present) or NAME: regex (a value matches); names case-insensitive"
    )


class FilterSpec(Section):
    """Which requests a target sees at all, matched on the normalised path (see filters.py)."""

    allow: FilterRules | None = Field(None, description="when present, only matching requests pass")
    deny: FilterRules | None = Field(None, description="matching requests never pass, even when allowed")
    ignore_path_case: Bool = Field(False, description="compare paths case-insensitively")

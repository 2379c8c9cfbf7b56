"""Removing secrets from a mirrored request before a single byte of it leaves the agent.

Shadows are test systems: their logs, traces and databases are read by more people and kept with
less care than production's. So credentials and personal data are taken out here, per target, and the
defaults are safe: with no configuration at all, the default list of redact_rules.py applies
(credential headers, secret-named query, form, multipart and JSON fields, card numbers, userinfo).

Configuration (`where` names the mapping, e.g. `targets[0].redact`; every key optional)::

    defaults: true                  # the default list; false switches all of it off
    headers: {Authorization: hmac, X-Session: remove}       # names case-insensitive, _ and - alike
    query: {token: mask}                                     # query parameters, by decoded name
    json_fields: {card.number: mask, user.email: hmac}       # dotted paths from the root
    form_fields: {password: remove}                          # form and multipart fields
    patterns: {card: {regex: '\\b[0-9]{13,19}\\b', action: mask}}

Actions: `mask` replaces the value with `[REDACTED]` (percent-encoded in queries and forms); `hmac`
replaces it with `hmac-sha256:` and the first 32 hex digits of HMAC-SHA256(key, value), so equal values
stay correlatable across requests without being readable (it needs `hmac_key`, else a config error);
`remove` drops the header, parameter, field or matched bytes; `keep` exempts that header, parameter,
field or JSON path from every default rule (the card scan included), or, through `merge_redaction`,
a global rule for one target. `patterns: {cards: keep}` and `patterns: {userinfo: keep}` switch the
built-in card and userinfo scans off.

Where each kind applies, and the decisions an operator should know:

- Query parameters (`&`- or `;`-separated) and form fields are matched by percent-decoded name (`+`
  as space), every occurrence; the other parameters keep their exact bytes. `hmac` hashes the
  decoded value.
- Bodies are recognised by content as well as by Content-Type: a body starting with `{` or `[` is
  tried as JSON whatever its type (text/plain or none), `multipart/*` parts are split at their
  boundary (CRLF or bare LF line ends) and each field handled by name (quoted, bare or RFC 2231
  `name*=`, from any of the part's header lines) and content; a part that is multipart itself
  (multipart/mixed in form-data) is split in turn, up to `MULTIPART_DEPTH_LIMIT` (4) levels, and a
  body nested deeper raises `Unredactable("multipart_too_deep")`. A gzip or deflate body is decoded (at most
  `DECODED_BODY_LIMIT` bytes), redacted and encoded again when anything changed; one that cannot be
  decoded within the bound, or in another encoding, raises `Unredactable` so the caller drops and
  counts it: a body that cannot be checked does not leave.
- JSON: arrays are transparent at every level: `card.number` reaches `{"card": [{"number": ..}]}` and
  `[{"card": {"number": ..}}]`, and a leaf that is an array has each element masked or hashed
  (objects as leaves are replaced whole; `hmac` of a non-string hashes its compact, key-sorted JSON).
  Default rules apply to keys at any depth. A document with a duplicated key is always re-serialised
  (last value wins, as most parsers read it), so `{"user":{"password":"S"},"user":{}}` cannot carry
  S past the rules; counted as `json:duplicate_key`. A changed body is re-serialised compactly, so it
  is the same JSON, not the same bytes. A body that claims JSON but does not parse (often one HAProxy
  truncated), or one over `JSON_PARSE_LIMIT` (2 MiB), is reported once as `json:unparsed` and scanned
  as text: `"name": value` and `name=value` pairs with a secret name are masked in place (a secret
  name whose value is an object or array is not: the parser is needed for that), then cards,
  userinfo and patterns.
- `patterns` are byte regexes (write them in ASCII) run over the raw body whatever its type, after
  the field rules, and over each percent-decoded query value. Patterns that can match the empty
  string are refused. `remove` on a JSON body can leave it invalid; prefer `mask`.
- Headers are replaced whole (a masked `Cookie` loses all its cookies).

`on_redact(rule)` is called once per value replaced or removed, with `header:<lower-case name>`
(`header:default` for a secret-looking name not on the list), `query:<name>`, `form:<name>`,
`json:<dotted.path>` (`query:default`, `form:default`, `json:default`, `text:default` for default
names), `pattern:<name>` (`pattern:cards`, `pattern:userinfo`), `json:unparsed` or
`json:duplicate_key`: a bounded set of labels whatever clients send. The input request is never
mutated (targets share it): a changed request is a new one, and a request that nothing applies to is
returned as is. When the body changes, `body_len` moves by the same amount, so a truncated body still
shows as truncated; callers recompute Content-Length.

Cost: a cheap pre-scan (one lookup per header name and per header value, remembered; the query's
names looked up one by one; substring tests over the body for the fragments every secret name
contains, card digits and `://`) sends requests with nothing to redact back as they came. Bodies over
`INLINE_BODY_LIMIT` are redacted off the event loop: the mirror hands them to `redact_in_worker` in
a worker process. Measured on the 2-core development machine (Python 3.11)::

    .venv/bin/python -m timeit -s "from spoa_mirror.redact import build_redactor; \\
        from spoa_mirror.request import MirrorRequest; \\
        h = [(f'X-Header-{i}', 'v') for i in range(10)]; \\
        r = MirrorRequest('GET', '/api/items?id=42&page=2', '1.1', h); \\
        f = build_redactor(None, 't', None, lambda rule: None)" "f(r)"

~1.3 us with the defaults, nothing to redact (the request comes back as is; 1.0 us before the
default list, on the same loaded machine); ~5.4 us when an `Authorization` header is added and
masked (a new request is built; 3.6 us before).
"""

from __future__ import annotations

import dataclasses
import functools
import hmac as _hmac
import json
import re
import zlib
from collections.abc import Callable
from operator import attrgetter
from typing import Any, Literal
from urllib.parse import quote, quote_plus, unquote, unquote_plus

from spoa_mirror import redact_rules
from spoa_mirror.errors import ConfigError, check_spec_keys
from spoa_mirror.redact_rules import DEFAULT_HEADERS, is_card_number, is_secret_header, is_secret_name
from spoa_mirror.request import MirrorRequest

MASK = "[REDACTED]"
HMAC_PREFIX = "hmac-sha256:"
ACTIONS = ("remove", "mask", "hmac", "keep")
SECTIONS = ("defaults", "headers", "query", "json_fields", "form_fields", "patterns")
BUILTIN_PATTERNS = ("cards", "userinfo")
# Bodies larger than this are redacted in a worker thread (Redactor.offloads): ~1 ms of loop time.
INLINE_BODY_LIMIT = 64 * 1024
# A gzip/deflate body is decoded to at most this many bytes; a larger one is dropped, counted.
DECODED_BODY_LIMIT = 16 * 1024 * 1024
# Larger JSON is not parsed (a parsed document takes ~15 times its size in memory) but scanned as text,
# like JSON that does not parse: `"secret-name": value` pairs masked in place, then cards and userinfo.
JSON_PARSE_LIMIT = 2 * 1024 * 1024
# Multipart inside multipart (RFC 7578 allows multipart/mixed in a form-data part) is split level by
# level, each level one more pass over the body; a body nested deeper is refused, not sent unchecked.
MULTIPART_DEPTH_LIMIT = 4
_MAPPING_SECTIONS = ("headers", "query", "json_fields", "form_fields", "patterns")

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_PATTERN_NAME = re.compile(r"[A-Za-z0-9_.:-]+")
_ENCODED_MASK = quote_plus(MASK)
# Zero-width matches would insert the replacement next to the secret and leave the secret in place.
_EMPTY_MATCH_PROBES = (b"", b"a", b"0", b" ", b'a0 _-.\n{}":,')
_KEEP = "keep"

_CARD_TEXT = re.compile(redact_rules.CARD)
_CARD_BYTES = re.compile(redact_rules.CARD.encode())
_USERINFO_TEXT = re.compile(redact_rules.USERINFO)
_USERINFO_BYTES = re.compile(redact_rules.USERINFO.encode())
_SCAN_ONLY_TEXT = re.compile(f"{redact_rules.CARD_PRESCAN}|://|:\\\\/\\\\/")  # and `:\/\/`, JSON-escaped
_CARD_PRESCAN_TEXT = re.compile(redact_rules.CARD_PRESCAN)
# `"name": value` and `name=value` in text that did not parse as JSON or a form.
_JSON_PAIR = re.compile(
    rb'"((?:[^"\\]|\\.){1,128})"(\s*:\s*)("(?:[^"\\]|\\.)*(?:"|$)|[-+0-9.eE]+|true|false)'
)
_FORM_PAIR = re.compile(rb"(?<![A-Za-z0-9_.\[\]%+-])([A-Za-z0-9_.\[\]%+-]{1,128})=([^&;\s\"'<>]*)")
_BOUNDARY = re.compile(r'boundary="?([^";]{1,200})"?', re.IGNORECASE)
# A part's field name as servers read it: quoted or not, spaced or not, RFC 2231's `name*=` too, in
# whichever header line carries it (every one found is checked, so a decoy cannot hide the real one).
_PART_NAME = re.compile(rb'(?<![\w-])name(\*?)\s*=\s*(?:"((?:[^"\\\r\n]|\\.)*)"|([^;\s"]+))', re.IGNORECASE)
_RFC2231_VALUE = re.compile(r"[^']*'[^']*'(.*)", re.DOTALL)
_PART_TYPE = re.compile(rb"^content-type:\s*([^\r\n]+)", re.IGNORECASE | re.MULTILINE)
_PAIR_SEPARATOR = re.compile("([&;])")
_JSON_START = re.compile(rb"\s*[\[{]")
_DECODERS = {"gzip": 31, "x-gzip": 31, "deflate": 15}

OnRedact = Callable[[str], None]
Events = list[str]
# A value transform, from the value's bytes to its replacement; None means "remove it".
_Op = Callable[[bytes], str] | None
_Rule = tuple[str, _Op] | str  # (metric rule, transform), or _KEEP
_Rules = dict[str, _Rule]
_Pattern = tuple[str, re.Pattern[bytes], bytes | Callable[[re.Match[bytes]], bytes]]
# A copy through the constructor with every field, positionally: ~0.3 us where dataclasses.replace
# takes ~1.3 us, and still right when MirrorRequest gains a field.
_init_fields = attrgetter(*(f.name for f in dataclasses.fields(MirrorRequest) if f.init))
_MISSING = object()
_MEMO_LIMIT = 4096


class Unredactable(Exception):
    """A body that cannot be checked for secrets (compressed beyond the bound, corrupt, or in an
    encoding we do not decode): the request must be dropped and counted, not sent as it is."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def merge_redaction(global_spec: dict | None, target_spec: dict | None) -> dict | None:
    """A target's redaction spec on top of the global one: within each section the target's entries
    replace the global ones of the same name (header names case-insensitively), other global entries
    stay, and `defaults` is the target's when it sets it. Values are not validated here: pass the
    result to `build_redactor`, which reports problems under the `where` it is given (so validate the
    global spec on its own first, to get its errors under its own key)."""
    if target_spec is None:
        return global_spec
    if not isinstance(global_spec, dict) or not isinstance(target_spec, dict):
        return target_spec
    merged = dict(global_spec)
    for section, entries in target_spec.items():
        base = merged.get(section)
        if section in _MAPPING_SECTIONS and isinstance(entries, dict) and isinstance(base, dict):
            if section == "headers":
                overridden = {_header_key(str(name)) for name in entries}
                base = {name: v for name, v in base.items() if _header_key(str(name)) not in overridden}
            merged[section] = {**base, **entries}
        else:
            merged[section] = entries
    return merged


def build_redactor(spec: dict | None, where: str, hmac_key: bytes | None, on_redact: OnRedact) -> Redactor:
    """The redaction step for one target, with every rule validated and compiled now, so the hot path
    only looks up names it already knows. An empty `hmac_key` counts as none."""
    return _redactor(_build_core(spec, where, hmac_key), on_redact)


def _build_core(spec: dict | None, where: str, hmac_key: bytes | None) -> _Core:
    if spec is None:
        spec = {}
    check_spec_keys(spec, where, SECTIONS)
    ops = _Ops(hmac_key or None)
    defaults = spec.get("defaults", True)
    if not isinstance(defaults, bool):
        raise ConfigError(f"{where}.defaults", f"must be true or false, got {defaults!r}")
    patterns, builtins = _patterns(spec.get("patterns"), f"{where}.patterns", ops)
    return _Core(
        defaults=defaults,
        header_rules=_header_rules(spec.get("headers"), f"{where}.headers", ops),
        query_rules=_pair_rules(spec.get("query"), f"{where}.query", "query", ops),
        form_rules=_pair_rules(spec.get("form_fields"), f"{where}.form_fields", "form", ops),
        json_trie=_json_rules(spec.get("json_fields"), f"{where}.json_fields", ops),
        patterns=patterns,
        cards=defaults and "cards" in builtins,
        userinfo=defaults and "userinfo" in builtins,
    )


def redact_in_worker(
    spec: dict | None, where: str, hmac_key: bytes | None, req: MirrorRequest
) -> tuple[MirrorRequest, Events]:
    """The entry point of the redaction worker process (see mirror.py): the rules are compiled once
    per distinct spec and kept, the events go back with the request for the agent to count."""
    cache_key = (json.dumps(spec, sort_keys=True, default=str), where, hmac_key)
    core = _worker_cores.get(cache_key)
    if core is None:
        if len(_worker_cores) >= 64:  # reloads with new specs: keep the cache bounded
            _worker_cores.clear()
        core = _worker_cores[cache_key] = _build_core(spec, where, hmac_key)
    events: Events = []
    return core.redact(req, events), events


Redactor = Callable[[MirrorRequest], MirrorRequest]


def _redactor(core: _Core, on_redact: OnRedact) -> Redactor:
    """A plain closure: calling it costs a function call, not an instance's `__call__`."""
    core_redact = core.redact

    def redact(req: MirrorRequest) -> MirrorRequest:
        events: Events = []
        out = core_redact(req, events)
        if events:
            for event in events:
                on_redact(event)
        return out

    return redact


class _Ops:
    """The value transforms, built once per redactor so the HMAC key is bound in."""

    def __init__(self, key: bytes | None) -> None:
        self.key = key

    def hmac_of(self, value: bytes) -> str:
        assert self.key is not None
        return HMAC_PREFIX + _hmac.digest(self.key, value, "sha256").hex()[:32]

    def op(self, action: str, key: str, *, mask: str = MASK) -> _Op:
        """The transform for a checked action other than keep; an `hmac` without a key is reported
        under `key`, the entry that asked for it."""
        if action == "remove":
            return None
        if action == "mask":
            return lambda value: mask
        if self.key is None:
            raise ConfigError(key, "action 'hmac' needs an HMAC key, and none is configured")
        return self.hmac_of


def _mask_op(value: bytes) -> str:
    return MASK


def _encoded_mask_op(value: bytes) -> str:
    return _ENCODED_MASK


def _action(action: object, key: str) -> str:
    if action not in ACTIONS:
        raise ConfigError(key, f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")
    return str(action)


def _mapping(value: object, key: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(key, f"must be a mapping of name to action, got {value!r}")
    return value


def _header_key(name: str) -> str:
    return name.lower().replace("_", "-")


def _header_rules(value: object, key: str, ops: _Ops) -> _Rules:
    rules: _Rules = {}
    for name, action in _mapping(value, key).items():
        if not isinstance(name, str) or _TOKEN.fullmatch(name) is None:
            raise ConfigError(key, f"not a header name: {name!r}")
        normal = _header_key(name)
        if normal in rules:
            raise ConfigError(f"{key}.{name}", "listed twice (header names are case-insensitive)")
        if _action(action, f"{key}.{name}") == _KEEP:
            rules[normal] = _KEEP
        else:
            rules[normal] = (f"header:{name.lower()}", ops.op(action, f"{key}.{name}"))
    return rules


def _pair_rules(value: object, key: str, kind: str, ops: _Ops) -> _Rules:
    """Query parameters and form fields: the values go back percent-encoded, so the mask is too."""
    rules: _Rules = {}
    for name, action in _mapping(value, key).items():
        if not isinstance(name, str) or not name:
            raise ConfigError(key, f"names must be non-empty strings, got {name!r}")
        if _action(action, f"{key}.{name}") == _KEEP:
            rules[name] = _KEEP
        else:
            rules[name] = (f"{kind}:{name}", ops.op(action, f"{key}.{name}", mask=_ENCODED_MASK))
    return rules


@dataclasses.dataclass(slots=True)
class _JsonNode:
    rule: _Rule | None = None
    children: dict[str, _JsonNode] = dataclasses.field(default_factory=dict)


def _json_rules(value: object, key: str, ops: _Ops) -> dict[str, _JsonNode]:
    """A trie of the dotted paths, so one walk of the document applies every rule."""
    root: dict[str, _JsonNode] = {}
    for path, action in _mapping(value, key).items():
        if not isinstance(path, str) or not all(path.split(".")):
            raise ConfigError(key, f"not a dotted path of non-empty keys: {path!r}")
        checked = _action(action, f"{key}.{path}")
        rule: _Rule = _KEEP if checked == _KEEP else (f"json:{path}", ops.op(checked, f"{key}.{path}"))
        level = root
        segments = path.split(".")
        for segment in segments[:-1]:
            level = level.setdefault(segment, _JsonNode()).children
        level.setdefault(segments[-1], _JsonNode()).rule = rule
    return root


def _patterns(value: object, key: str, ops: _Ops) -> tuple[list[_Pattern], set[str]]:
    """(metric rule, regex, replacement): the same replacement serves the raw body and a decoded
    query value, which is percent-encoded again afterwards. An entry may be just `keep`, to switch
    off a global pattern (or a built-in one, `cards` or `userinfo`) for one target. Returns the
    configured patterns and the built-in scans left on."""
    compiled: list[_Pattern] = []
    builtins = set(BUILTIN_PATTERNS)
    for name, entry in _mapping(value, key).items():
        entry_key = f"{key}.{name}"
        if not isinstance(name, str) or _PATTERN_NAME.fullmatch(name) is None:
            raise ConfigError(key, f"pattern names must be letters, digits or _.:-, got {name!r}")
        if name in BUILTIN_PATTERNS:
            if entry != _KEEP:
                raise ConfigError(entry_key, f"{name!r} is the built-in scan; it takes only 'keep'")
            builtins.discard(name)
            continue
        if entry == _KEEP:
            continue
        if not isinstance(entry, dict):
            raise ConfigError(entry_key, f"must be a mapping with regex and action, or keep, got {entry!r}")
        for field in entry:
            if field not in ("regex", "action"):
                raise ConfigError(f"{entry_key}.{field}", "unknown key; expected regex or action")
        source = entry.get("regex")
        if not isinstance(source, str) or not source:
            raise ConfigError(f"{entry_key}.regex", f"must be a non-empty string, got {source!r}")
        try:
            regex = re.compile(source.encode("utf-8"))
        except re.error as exc:
            raise ConfigError(f"{entry_key}.regex", f"bad regex {source!r}: {exc}") from None
        if any(m.start() == m.end() for probe in _EMPTY_MATCH_PROBES for m in regex.finditer(probe)):
            raise ConfigError(f"{entry_key}.regex", f"{source!r} can match the empty string")
        if "action" not in entry:
            raise ConfigError(f"{entry_key}.action", f"missing; expected one of {', '.join(ACTIONS)}")
        action = _action(entry["action"], f"{entry_key}.action")
        if action == _KEEP:
            continue
        ops.op(action, f"{entry_key}.action")
        replacement: bytes | Callable[[re.Match[bytes]], bytes]
        if action == "remove":
            replacement = b""
        elif action == "mask":
            replacement = MASK.encode()
        else:
            hmac_of = ops.hmac_of

            def replacement(match: re.Match[bytes], hmac_of: Callable[[bytes], str] = hmac_of) -> bytes:
                return hmac_of(match.group()).encode()

        compiled.append((f"pattern:{name}", regex, replacement))
    return compiled, builtins


def _json_names(trie: dict[str, _JsonNode]) -> set[str]:
    names = set()
    for name, node in trie.items():
        names.add(name)
        names |= _json_names(node.children)
    return names


class _Core:
    """The compiled rules of one redactor and the walk over a request. Holds no per-request state,
    so one instance serves the event loop and the worker thread alike."""

    def __init__(
        self,
        *,
        defaults: bool,
        header_rules: _Rules,
        query_rules: _Rules,
        form_rules: _Rules,
        json_trie: dict[str, _JsonNode],
        patterns: list[_Pattern],
        cards: bool,
        userinfo: bool,
    ) -> None:
        self.defaults = defaults
        self.header_rules = header_rules
        self.query_rules = query_rules
        self.form_rules = form_rules
        self.json_trie = json_trie
        self.patterns = patterns
        self.cards = cards
        self.userinfo = userinfo
        self.scans = cards or userinfo
        self._header_memo: dict[str, _Rule | None] = {}
        self._clean_headers: set[tuple[str, str]] = set()
        self._name_memo: dict[str, bool] = {}
        # The pre-scan: fragments of every name a rule could match, card digits and `://`. Patterns
        # are arbitrary regexes, so a redactor with patterns always looks.
        fragments: set[str] = set()
        if defaults:
            fragments.update(redact_rules.PRESCAN_FRAGMENTS)
        fragments.update(name.lower() for name in (*query_rules, *form_rules, *_json_names(json_trie)))
        fragments_bytes = sorted(fragment.encode("utf-8", "surrogateescape") for fragment in fragments)
        # A fragment holding a letter rare in text (`k` in token, `v` in cvv) is searched for only when
        # one memchr finds that letter in the body: a substring search costs ~6k instructions per KB.
        probed: dict[int, list[bytes]] = {}
        for fragment in fragments_bytes:
            letter = next((letter for letter in _RARE_LETTERS if letter in fragment), None)
            if letter is not None:
                probed.setdefault(letter, []).append(fragment)
        self.fragments_bytes = tuple(fragment for fragment in fragments_bytes if not _has_rare(fragment))
        self.fragments_by_letter = tuple((letter, tuple(group)) for letter, group in probed.items())
        self.always_look = bool(patterns)

    # -- names ---------------------------------------------------------------------------------

    def header_rule(self, name: str) -> _Rule | None:
        rule = self._header_memo.get(name, _MISSING)
        if rule is _MISSING:
            normal = _header_key(name)
            rule = self.header_rules.get(normal)
            if rule is None and self.defaults:
                if normal in _DEFAULT_HEADER_KEYS:
                    rule = (f"header:{normal}", _mask_op)
                elif is_secret_header(normal):
                    rule = ("header:default", _mask_op)
            if len(self._header_memo) < _MEMO_LIMIT:
                self._header_memo[name] = rule
        return rule  # type: ignore[return-value]

    def secret_name(self, name: str) -> bool:
        if not self.defaults:
            return False
        secret = self._name_memo.get(name)
        if secret is None:
            secret = is_secret_name(name)
            if len(self._name_memo) < _MEMO_LIMIT:
                self._name_memo[name] = secret
        return secret

    def _query_needs_work(self, query: str) -> bool:
        """The query's pre-scan: its names looked up one by one (remembered), then one search for
        card digits and `://`; anything encoded takes the full path."""
        if self.always_look or "%" in query or "+" in query or ";" in query:
            return True
        rules = self.query_rules
        name_memo = self._name_memo
        for pair in query.split("&"):
            name = pair.partition("=")[0]
            if name in rules:
                return True
            secret = name_memo.get(name)
            if secret is None:
                secret = self.secret_name(name)
            if secret:
                return True
        return self.scans and query not in _SCAN_CLEAN and _needs_scan(query)

    def looks_bytes(self, data: bytes) -> bool:
        """The pre-scan over a body: substring tests (a regex alternation took 20 ms per MB), with
        `find`, not `in`: `bytes in bytes` first tries the operand as an integer and builds and clears
        a TypeError, ~1.3k instructions a test, a fifth of the pre-scan of a 1 KB body."""
        if self.always_look or data.find(b"\\u") >= 0 or 0x25 in data:  # 0x25: `%`, an int test is memchr
            return True
        lowered = data.lower()
        find = lowered.find
        for fragment in self.fragments_bytes:
            if find(fragment) >= 0:
                return True
        for letter, group in self.fragments_by_letter:
            if letter in lowered:
                for fragment in group:
                    if find(fragment) >= 0:
                        return True
        # JSON may escape the slashes of a URL (`https:\/\/user:pass@host`): that is userinfo too.
        return (self.cards and _has_card_digits(data)) or (
            self.userinfo and (data.find(b"://") >= 0 or data.find(b":\\/\\/") >= 0)
        )

    # -- the request ---------------------------------------------------------------------------

    def redact(self, req: MirrorRequest, events: Events) -> MirrorRequest:
        # The pre-scan of the headers, inline: headers (name and value) seen before with nothing to
        # redact are remembered, so the usual header costs one set lookup (Host, Accept, User-Agent
        # repeat from request to request).
        new_headers = None
        clean = self._clean_headers
        scans = self.scans
        for header in req.headers:
            if header in clean:
                continue
            name, value = header
            rule = self._header_memo.get(name, _MISSING)
            if rule is _MISSING:
                rule = self.header_rule(name)
            if rule is not None or (scans and value not in _SCAN_CLEAN and _needs_scan(value)):
                new_headers = self._headers(req.headers, events)
                break
            self._remember_clean(header)

        new_path = None
        path = req.path
        mark = path.find("?")
        if mark >= 0:
            query = path[mark + 1 :]
            if query and self._query_needs_work(query):
                redacted = self._pairs(query, self.query_rules, "query", self.patterns, events)
                if redacted is not None:
                    new_path = f"{path[:mark]}?{redacted}" if redacted else path[:mark]
        bare = path if mark < 0 else path[:mark]
        if scans and bare not in _SCAN_CLEAN and _needs_scan(bare):
            scanned = self._path(bare, events)
            if scanned is not None:
                rest = (new_path or path)[len(bare) :]
                new_path = scanned + rest

        new_body = None
        body = req.body
        if body:
            new_body = self._body(req, body, events)

        if new_headers is None and new_path is None and new_body is None:
            return req
        copy = MirrorRequest(*_init_fields(req))
        if new_headers is not None:
            copy.headers = new_headers
        if new_path is not None:
            copy.path = new_path
        if new_body is not None:
            copy.body = new_body
            if req.body_len is not None:
                copy.body_len = req.body_len + len(new_body) - len(body)
        return copy

    def _remember_clean(self, header: tuple[str, str]) -> None:
        """A header this redactor leaves as it is; bounded, as unique values (request ids) would fill it."""
        clean = self._clean_headers
        if len(clean) >= _SCAN_CLEAN_LIMIT:
            clean.clear()
        clean.add(header)

    def _headers(self, headers: list[tuple[str, str]], events: Events) -> list | None:
        """The new header list, or None when nothing changed."""
        header_rule = self.header_rule
        scans = self.scans
        clean = self._clean_headers
        changed = False
        new: list[tuple[str, str]] = []
        for header in headers:
            if header in clean:
                new.append(header)
                continue
            name, value = header
            rule = header_rule(name)
            if rule is None or rule == _KEEP:
                if rule is None and scans and value not in _SCAN_CLEAN and _needs_scan(value):
                    scanned = self._scan_text(value, events)
                    if scanned is not None:
                        changed = True
                        value = scanned
                    else:  # a URL without userinfo (Referer, Origin): scanned once, not per request
                        self._remember_clean(header)
                new.append((name, value))
                continue
            metric, op = rule  # type: ignore[misc]
            events.append(metric)
            changed = True
            if op is not None:
                new.append((name, op(value.encode("utf-8", "surrogateescape"))))
        return new if changed else None

    def _path(self, path: str, events: Events) -> str | None:
        """Cards and userinfo in the path, as sent or percent-decoded."""
        scanned = self._scan_text(path, events)
        if scanned is not None:
            return scanned
        if "%" not in path:
            return None
        decoded = unquote(path, errors="surrogateescape")
        scanned = self._scan_text(decoded, events)
        if scanned is None:
            return None
        return quote(scanned, safe="/;:@!$&'()*+,=-._~", errors="surrogateescape")

    # -- text scans ----------------------------------------------------------------------------

    def _scan_text(self, text: str, events: Events) -> str | None:
        """Card numbers and userinfo in a str; None when there were none."""
        changed = False
        if self.cards and _CARD_PRESCAN_TEXT.search(text) is not None:
            out = _CARD_TEXT.sub(lambda m: _card_replacement(m.group(), MASK, events), text)
            changed = out != text
            text = out
        if self.userinfo and ("://" in text or ":\\/\\/" in text):
            out, count = _USERINFO_TEXT.subn(_userinfo_text, text)
            if count:
                events.extend(["pattern:userinfo"] * count)
                changed = True
                text = out
        return text if changed else None

    def _scan_bytes(self, data: bytes, events: Events) -> bytes | None:
        changed = False
        if self.cards and _has_card_digits(data):
            out = _CARD_BYTES.sub(lambda m: _card_replacement_bytes(m.group(), events), data)
            changed = out != data
            data = out
        if self.userinfo and (b"://" in data or b":\\/\\/" in data):
            out, count = _USERINFO_BYTES.subn(_userinfo_bytes, data)
            if count:
                events.extend(["pattern:userinfo"] * count)
                changed = True
                data = out
        return data if changed else None

    def _patterns(self, data: bytes, patterns: list[_Pattern], events: Events) -> bytes | None:
        changed = False
        for metric, regex, replacement in patterns:
            data, count = regex.subn(replacement, data)
            if count:
                changed = True
                events.extend([metric] * count)
        return data if changed else None

    # -- pairs (queries and forms) -------------------------------------------------------------

    def _pairs(
        self, text: str, rules: _Rules, kind: str, patterns: list[_Pattern], events: Events
    ) -> str | None:
        """`a=1&b=2;c=3` with the named pairs' values replaced or removed and the scans and patterns
        applied to every decoded value; None when nothing changed. Untouched pairs keep their exact
        bytes, and so do the separators."""
        if ";" in text:
            pieces = _PAIR_SEPARATOR.split(text)
            pairs, separators = pieces[0::2], ["", *pieces[1::2]]
        else:
            pairs = text.split("&")
            separators = ["", *["&"] * (len(pairs) - 1)]
        changed = False
        kept: list[tuple[str, str]] = []  # (separator before, pair)
        for separator, pair in zip(separators, pairs, strict=True):
            raw_name, _, raw_value = pair.partition("=")
            name = raw_name if "%" not in raw_name and "+" not in raw_name else _decoded_text(raw_name)
            rule = rules.get(name)
            if rule is None and self.secret_name(name):
                rule = (f"{kind}:default", _encoded_mask_op)
            if rule is not None and rule != _KEEP:
                changed = True
                metric, op = rule  # type: ignore[misc]
                events.append(metric)
                if op is not None:
                    kept.append((separator, f"{raw_name}={op(_decoded(raw_value))}"))
                continue
            if raw_value and rule is None and (patterns or self.scans):
                value = _decoded(raw_value)
                patterned = self._patterns(value, patterns, events) if patterns else None
                scanned = self._scan_bytes(patterned or value, events) if self.scans else None
                if patterned is not None or scanned is not None:
                    changed = True
                    kept.append((separator, f"{raw_name}={quote_plus(scanned or patterned, safe=':')}"))
                    continue
            kept.append((separator, pair))
        if not changed:
            return None
        return "".join(
            pair if index == 0 else separator + pair for index, (separator, pair) in enumerate(kept)
        )

    # -- bodies --------------------------------------------------------------------------------

    def _body(self, req: MirrorRequest, body: bytes, events: Events) -> bytes | None:
        encoding = req.header("content-encoding")
        if encoding is not None and encoding.strip().lower() not in ("", "identity"):
            return self._encoded_body(req, body, encoding.strip().lower(), events)
        return self._content(req.header("content-type"), body, events, depth=0)

    def _encoded_body(self, req: MirrorRequest, body: bytes, encoding: str, events: Events) -> bytes | None:
        wbits = _DECODERS.get(encoding)
        if wbits is None:
            raise Unredactable("encoding")
        decoder = zlib.decompressobj(wbits)
        try:
            decoded = decoder.decompress(body, DECODED_BODY_LIMIT)
        except zlib.error:
            if encoding != "deflate":
                raise Unredactable("bad_encoding") from None
            decoder = zlib.decompressobj(-15)  # deflate as many clients send it: raw, no zlib header
            try:
                decoded = decoder.decompress(body, DECODED_BODY_LIMIT)
            except zlib.error:
                raise Unredactable("bad_encoding") from None
        # Output past the bound can be pending inside zlib with every input byte consumed (raw
        # deflate of a long run of one byte): asking for one byte more tells.
        if decoder.unconsumed_tail or decoder.decompress(b"", 1):
            raise Unredactable("decoded_too_large")
        redacted = self._content(req.header("content-type"), decoded, events, depth=0)
        if redacted is None:
            return None
        if wbits == 31:
            encoder = zlib.compressobj(6, zlib.DEFLATED, 31)
        else:
            encoder = zlib.compressobj(6, zlib.DEFLATED, 15 if wbits == 15 and body[:1] == b"\x78" else -15)
        return encoder.compress(redacted) + encoder.flush()

    def _content(self, content_type: str | None, body: bytes, events: Events, *, depth: int) -> bytes | None:
        """One body (`depth` 0), or one multipart part (`depth` levels of multipart around it), by what
        it is; a multipart part that is multipart itself is split in turn, up to MULTIPART_DEPTH_LIMIT
        levels, past which the request is refused."""
        media_type = "" if content_type is None else content_type.partition(";")[0].strip().lower()
        multipart = media_type.startswith("multipart/") or (
            body.startswith(b"--") and b"content-disposition" in body[:1024].lower()
        )
        # A quoted part name may hide a secret name behind backslash escapes (`name="to\ken"`, which
        # busboy and RFC 2045 read as `token`), which no substring of the pre-scan finds.
        if not self.looks_bytes(body) and not (multipart and body.find(b"\\") >= 0):
            return None
        if multipart:
            if depth >= MULTIPART_DEPTH_LIMIT:
                raise Unredactable("multipart_too_deep")
            return self._finish(body, self._multipart(content_type or "", body, events, depth), events)
        if media_type == "application/x-www-form-urlencoded":
            text = self._pairs(body.decode("utf-8", "surrogateescape"), self.form_rules, "form", [], events)
            redacted = None if text is None else text.encode("utf-8", "surrogateescape")
            return self._finish(body, redacted, events)
        if media_type == "application/json" or media_type.endswith("+json") or _JSON_START.match(body):
            if len(body) <= JSON_PARSE_LIMIT:
                redacted, parsed = self._json(body, events)
                if parsed:
                    return self._finish(body, redacted, events)
            if media_type == "application/json" or media_type.endswith("+json"):
                events.append("json:unparsed")
        # The operator's patterns before the built-in scans, so an `hmac` pattern sees the value.
        patterned = self._patterns(body, self.patterns, events) if self.patterns else None
        redacted = self._text(body if patterned is None else patterned, events)
        return patterned if redacted is None else redacted

    def _finish(self, body: bytes, redacted: bytes | None, events: Events) -> bytes | None:
        """The configured patterns last, over whatever the field rules left."""
        if not self.patterns:
            return redacted
        patterned = self._patterns(body if redacted is None else redacted, self.patterns, events)
        return redacted if patterned is None else patterned

    def _text(self, body: bytes, events: Events) -> bytes | None:
        """A body that is neither a form nor JSON that parsed: secret-named pairs masked in place,
        then the scans. The pair scans run over text only: over binary data (not UTF-8) their regexes
        cost ~50 us per KB (1.2 ms for 24 KB of random bytes, where text of that size takes ~0.1
        ms), and binary has no `name=value` pairs to find; the card and userinfo scans still run."""
        changed = False
        if self.defaults and _is_text(body):

            def json_pair(match: re.Match[bytes]) -> bytes:
                try:
                    name = json.loads(b'"' + match.group(1) + b'"')
                except ValueError:
                    name = match.group(1).decode("utf-8", "surrogateescape")
                if not self.secret_name(name):
                    return match.group()
                events.append("text:default")
                return b'"' + match.group(1) + b'"' + match.group(2) + b'"' + MASK.encode() + b'"'

            def form_pair(match: re.Match[bytes]) -> bytes:
                if not match.group(2) or not self.secret_name(
                    _decoded_text(match.group(1).decode("latin-1"))
                ):
                    return match.group()
                events.append("text:default")
                return match.group(1) + b"=" + _ENCODED_MASK.encode()

            out = _FORM_PAIR.sub(form_pair, _JSON_PAIR.sub(json_pair, body))
            changed = out != body
            body = out
        scanned = self._scan_bytes(body, events) if self.scans else None
        if scanned is not None:
            return scanned
        return body if changed else None

    def _multipart(self, content_type: str, body: bytes, events: Events, depth: int) -> bytes | None:
        found = _BOUNDARY.search(content_type)
        if found is not None:
            delimiter = b"--" + found.group(1).encode("latin-1", "replace")
        elif body.startswith(b"--"):
            delimiter = body.split(b"\r\n", 1)[0]
        else:
            return self._text(body, events)
        pieces = body.split(delimiter)
        if len(pieces) < 3:
            return self._text(body, events)
        changed = False
        out = [pieces[0]]
        for piece in pieces[1:-1]:
            head, separator, content = piece.partition(b"\r\n\r\n")
            line_end = b"\r\n"
            if not separator:  # bare LF line ends, which Go's and Python's readers accept
                head, separator, content = piece.partition(b"\n\n")
                line_end = b"\n"
            if not separator:
                out.append(piece)
                continue
            trailer = line_end if content.endswith(line_end) else b""
            content = content[: len(content) - len(trailer)]
            rule = self._part_rule(head)
            if rule == _KEEP:
                out.append(piece)
                continue
            if rule is not None:
                metric, op = rule  # type: ignore[misc]
                events.append(metric)
                changed = True
                if op is None:
                    continue
                replaced = unquote_plus(op(content))  # the form mask is percent-encoded
                out.append(head + separator + replaced.encode() + trailer)
                continue
            typed = _PART_TYPE.search(head)
            part_type = typed.group(1).decode("latin-1") if typed else None
            redacted = self._content(part_type, content, events, depth=depth + 1)
            scanned_head = self._scan_bytes(head, events) if self.scans else None
            if redacted is None and scanned_head is None:
                out.append(piece)
                continue
            changed = True
            out.append(
                (scanned_head or head) + separator + (content if redacted is None else redacted) + trailer
            )
        out.append(pieces[-1])
        return delimiter.join(out) if changed else None

    def _part_rule(self, head: bytes) -> _Rule | None:
        """The rule for a part by its field name: the first name with a rule that redacts, else
        `keep` if one name is kept, else none. An unnamed part has none."""
        kept = False
        for match in _PART_NAME.finditer(head):
            name = _part_name(match)
            rule = self.form_rules.get(name)
            if rule is None and self.secret_name(name):
                rule = ("multipart:default", _mask_op)
            if rule == _KEEP:
                kept = True
            elif rule is not None:
                return rule
        return _KEEP if kept else None

    # -- JSON ----------------------------------------------------------------------------------

    def _json(self, body: bytes, events: Events) -> tuple[bytes | None, bool]:
        """(the redacted document or None when unchanged, whether it parsed). A document nested
        deeper than the stack allows is treated like one that does not parse."""
        duplicates = False

        def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            nonlocal duplicates
            document = dict(pairs)
            if len(document) != len(pairs):
                duplicates = True
            return document

        # Cards and userinfo are looked for in the strings only when the raw body holds card digits,
        # `://` or an escape that could hide them: most documents have none, and a check per string
        # was most of the cost of a large one.
        scan = self.scans and (
            b"\\u" in body or b"://" in body or b":\\/\\/" in body or _has_card_digits(body)
        )
        try:
            document = json.loads(body, object_pairs_hook=pairs_hook)
            local: Events = []
            if type(document) is dict or type(document) is list:
                changed = self._walk(document, self.json_trie, local, scan)
            else:
                changed, document = self._leaf(document, local, scan)
        except (ValueError, RecursionError):
            return None, False
        events.extend(local)
        if duplicates:
            events.append("json:duplicate_key")
        if not changed and not duplicates:
            return None, True
        try:
            return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8"), True
        except UnicodeEncodeError:  # a lone surrogate from a \ud800 escape: keep it escaped
            return json.dumps(document, separators=(",", ":")).encode("ascii"), True

    def _walk(self, node: dict | list, trie: dict[str, _JsonNode] | None, events: Events, scan: bool) -> bool:
        """Applies the rules to a container in place; whether anything changed. Only containers
        recurse, and a leaf costs a type test unless `scan`."""
        changed = False
        if type(node) is list:
            for index, item in enumerate(node):
                kind = type(item)
                if kind is dict or kind is list:
                    if self._walk(item, trie, events, scan):
                        changed = True
                elif scan:
                    item_changed, node[index] = self._leaf(item, events, scan)
                    changed = changed or item_changed
            return changed
        name_memo = self._name_memo
        removed = []
        for key, value in node.items():
            child = trie.get(key) if trie else None
            if child is not None and child.rule is not None:
                rule = child.rule
                if rule == _KEEP:
                    continue
                metric, op = rule  # type: ignore[misc]
                if op is None:
                    removed.append(key)
                    events.append(metric)
                else:
                    node[key] = _replace_json_value(value, op, metric, events)
                changed = True
                continue
            secret = name_memo.get(key)
            if secret is None:
                secret = self.secret_name(key)
            if secret:
                events.append("json:default")
                node[key] = MASK
                changed = True
                continue
            kind = type(value)
            if kind is dict or kind is list:
                if self._walk(value, child.children if child is not None else None, events, scan):
                    changed = True
            elif scan:
                value_changed, replaced = self._leaf(value, events, scan)
                if value_changed:
                    node[key] = replaced
                    changed = True
        for key in removed:
            del node[key]
        return changed

    def _leaf(self, value: Any, events: Events, scan: bool) -> tuple[bool, Any]:
        if not scan:
            return False, value
        if type(value) is str:
            scanned = self._scan_text(value, events)
            return (False, value) if scanned is None else (True, scanned)
        is_card = self.cards and type(value) is int and 10**12 <= value < 10**19
        if is_card and _card_replacement(str(value), MASK, events) == MASK:
            return True, MASK
        return False, value


# Texts (header values, paths) the card and userinfo pre-scan found nothing in: most repeat from
# request to request, and a set lookup costs a tenth of the regex. Bounded; shared by every redactor.
_SCAN_CLEAN: set[str] = set()
_SCAN_CLEAN_LIMIT = 8192
_DIGITS_AS_ZERO = bytes(0x30 if 0x30 <= byte <= 0x39 else byte for byte in range(256))


def _is_text(data: bytes) -> bool:
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# Letters rarest in English text and JSON first; the pre-scan's memchr probes (see _Core.__init__).
_RARE_LETTERS = b"zqjxkvw"


def _has_rare(fragment: bytes) -> bool:
    return any(letter in fragment for letter in _RARE_LETTERS)


def _has_card_digits(data: bytes) -> bool:
    """What CARD_PRESCAN matches (4 digits, maybe a space or dash, 4 digits), by translating every
    digit to 0 and three substring tests: ~1 ms per MB where the regex took 25."""
    find = data.translate(_DIGITS_AS_ZERO).find
    return find(b"00000000") >= 0 or find(b"0000 0000") >= 0 or find(b"0000-0000") >= 0


def _needs_scan(text: str) -> bool:
    if "%" in text or _SCAN_ONLY_TEXT.search(text) is not None:
        return True
    if len(_SCAN_CLEAN) >= _SCAN_CLEAN_LIMIT:  # unique values (request ids) filled it: start over
        _SCAN_CLEAN.clear()
    _SCAN_CLEAN.add(text)
    return False


_DEFAULT_HEADER_KEYS = frozenset(_header_key(name) for name in DEFAULT_HEADERS)


def _card_replacement(candidate: str, mask: str, events: Events) -> str:
    digits = candidate.replace(" ", "").replace("-", "")
    if not is_card_number(digits):
        return candidate
    events.append("pattern:cards")
    return mask


def _card_replacement_bytes(candidate: bytes, events: Events) -> bytes:
    return _card_replacement(candidate.decode("ascii"), MASK, events).encode("ascii")


def _userinfo_text(match: re.Match[str]) -> str:
    return f"{match.group(1)}{MASK}@"


def _userinfo_bytes(match: re.Match[bytes]) -> bytes:
    return match.group(1) + MASK.encode() + b"@"


def _decoded(raw: str) -> bytes:
    if "%" in raw or "+" in raw:
        raw = unquote_plus(raw, errors="surrogateescape")
    return raw.encode("utf-8", "surrogateescape")


def _part_name(match: re.Match[bytes]) -> str:
    """A `name` parameter's value: quoted (backslash escapes undone) or a token, or RFC 2231's
    `name*=charset'language'percent-encoded`."""
    quoted, token = match.group(2), match.group(3)
    raw = token if quoted is None else re.sub(rb"\\(.)", rb"\1", quoted)
    name = raw.decode("utf-8", "surrogateescape")
    if match.group(1):
        extended = _RFC2231_VALUE.fullmatch(name)
        if extended is not None:
            return unquote(extended.group(1), errors="surrogateescape")
    return name


def _decoded_text(raw: str) -> str:
    return unquote_plus(raw, errors="surrogateescape")


def _replace_json_value(value: Any, op: Callable[[bytes], str], metric: str, events: Events) -> Any:
    if isinstance(value, list):
        return [_replace_json_value(item, op, metric, events) for item in value]
    events.append(metric)
    if isinstance(value, str):
        return op(value.encode("utf-8", "surrogatepass"))
    return op(json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8"))


_worker_cores: dict[tuple[str, str, bytes | None], _Core] = {}


Action = Literal["remove", "mask", "hmac", "keep"]


@functools.cache
def redact_spec_model() -> type[Any]:
    """The `redact` block's model (for targets.py and config.py). Built on first use, with pydantic
    imported only then, because the redaction worker process imports this module too and would
    otherwise carry pydantic (~11 MiB of RSS, measured with ru_maxrss) for nothing."""
    from pydantic import Field

    from spoa_mirror.config_types import Bool, Section

    class RedactSpec(Section):
        """Redaction rules (see redact.py); a target's are merged over the global ones."""

        defaults: Bool = Field(
            True, description="the default list of redact_rules.py; false switches all of it off"
        )
        headers: dict[str, Action] | None = Field(
            None, description="header name (case-insensitive, _ and - alike): action"
        )
        query: dict[str, Action] | None = Field(None, description="query parameter (decoded name): action")
        json_fields: dict[str, Action] | None = Field(
            None, description="dotted JSON path from the root: action"
        )
        form_fields: dict[str, Action] | None = Field(None, description="form or multipart field: action")
        patterns: dict[str, Any] | None = Field(
            None,
            description="name: {regex, action} (a byte regex, ASCII, that cannot match the empty string; "
            "action mask, remove or hmac), or cards: keep / userinfo: keep to switch a built-in scan off",
        )

    return RedactSpec

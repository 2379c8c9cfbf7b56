"""What differs between two responses: status, headers, then the body by content.

Pure functions of the two responses and the ignore rules, no state: the engine decides what a
difference means (regression or noise) from how often each field differs.

Each `Difference` names a `field`, the key statistics are kept under (`status`, `header etag`,
`items[*].price`, `body text`), and `where`, the concrete place (`items[3].price`, `line 12`).

- A status change is reported alone: the body of a 500 against a 200's says nothing more.
- Headers: compared case-insensitively, repeated headers as one list; the naturally varying ones
  (`DEFAULT_IGNORED_HEADERS`) skipped unless configured otherwise; Set-Cookie by cookie names and
  attributes, never by value (a session id differs by nature, and must not be shown).
- Bodies: a body over the limit (cut, with the whole body's digest) by length and SHA-256; otherwise
  `Content-Encoding` (gzip, deflate, br when the brotli module is installed) decoded first, bounded;
  JSON structurally (changed value, changed type, missing or extra key, array length); text by
  lines (bounded); anything else by length and digest.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import zlib
from collections.abc import Iterable
from typing import Any, NamedTuple

from .config import IgnoreConfig
from .model import Response
from .shapes import volatile_numbers, volatile_strings

try:  # optional: br bodies are compared undecoded (by bytes) without it
    import brotli  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the environment
    brotli = None

KINDS = (
    "status",
    "header_changed",
    "header_missing",
    "header_extra",
    "json_value",
    "json_type",
    "json_missing",
    "json_extra",
    "json_array_length",
    "body_type",
    "text_lines",
    "body_bytes",
    "body_over_limit",
)

# Headers whose values differ between any two servers or any two moments. `*` ends a prefix.
DEFAULT_IGNORED_HEADERS = (
    "date", "age", "server", "etag", "last-modified", "expires", "via", "x-powered-by",
    "content-length", "transfer-encoding", "connection", "keep-alive",
    "x-request-id", "request-id", "x-correlation-id", "correlation-id", "x-trace-id", "traceparent",
    "tracestate", "b3", "x-b3-*", "x-amzn-trace-id", "x-amzn-requestid", "x-amz-request-id",
    "x-amz-id-2", "x-cloud-trace-context", "x-datadog-*", "cf-ray", "x-served-by", "x-cache",
    "x-cache-hits", "x-timer", "x-runtime", "x-response-time", "server-timing",
    "x-envoy-upstream-service-time", "x-envoy-attempt-count", "x-request-start", "report-to", "nel",
)  # fmt: skip

MAX_DIFFERENCES = 64  # per comparison: a changed list of 10,000 items is reported by its first 64
MAX_TEXT_LINES = 2000  # per side; text beyond is compared by digest
MAX_DEPTH = 64
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_MEDIA_JSON = re.compile(r"[/+]json\b|^application/json", re.I)
_MEDIA_TEXT = re.compile(r"^text/|[/+]xml\b|javascript|x-www-form-urlencoded|yaml|csv", re.I)


class Difference(NamedTuple):
    kind: str  # one of KINDS
    field: str  # where statistics are kept: array indices as [*]
    where: str  # the concrete place
    primary: Any  # the primary's value (shown only redacted and truncated)
    candidate: Any
    volatile: bool  # the two values differ only in volatile shapes (timestamps, UUIDs, ...)


class Differ:
    """Built once from the `ignore` rules and the body limit; `diff` is then called per pair."""

    def __init__(self, ignore: IgnoreConfig, body_limit: int) -> None:
        names = (*(DEFAULT_IGNORED_HEADERS if ignore.default_headers else ()), *ignore.headers)
        self.ignored_headers = frozenset(name for name in names if not name.endswith("*"))
        self.ignored_prefixes = tuple(name[:-1] for name in names if name.endswith("*"))
        self.patterns = ignore.patterns
        self.ignored_paths = _path_matcher(ignore.json_paths)
        self._ignored_cache: dict[str, bool] = {}
        self.decoded_limit = max(4 * body_limit, 1 << 20)

    def diff(self, primary: Response, candidate: Response) -> list[Difference]:
        if primary.status != candidate.status:
            return [Difference("status", "status", "status", primary.status, candidate.status, False)]
        out: list[Difference] = []
        self._headers(primary.headers, candidate.headers, out)
        self._body(primary, candidate, out)
        return out

    # -- headers ---------------------------------------------------------------------------------

    def header_ignored(self, name: str) -> bool:
        return name in self.ignored_headers or name.startswith(self.ignored_prefixes or ("\0",))

    def _header_map(self, headers: Iterable[tuple[str, str]]) -> dict[str, str]:
        found: dict[str, list[str]] = {}
        for name, value in headers:
            lower = name.lower()
            if self.header_ignored(lower):
                continue
            if lower == "set-cookie":
                value = cookie_shape(value)
            found.setdefault(lower, []).append(value.strip())
        return {
            name: ", ".join(sorted(values) if name == "set-cookie" else values)
            for name, values in found.items()
        }

    def _headers(
        self, a: tuple[tuple[str, str], ...], b: tuple[tuple[str, str], ...], out: list[Difference]
    ) -> None:
        if a == b:
            return
        mine, theirs = self._header_map(a), self._header_map(b)
        if mine == theirs:
            return
        for name, value in mine.items():
            other = theirs.get(name)
            field = f"header {name}"
            if other is None:
                out.append(Difference("header_missing", field, field, value, None, False))
            elif other != value and not self._same_after_patterns(value, other):
                out.append(
                    Difference("header_changed", field, field, value, other, volatile_strings(value, other))
                )
        for name, value in theirs.items():
            if name not in mine:
                field = f"header {name}"
                out.append(Difference("header_extra", field, field, None, value, False))

    def _same_after_patterns(self, a: str, b: str) -> bool:
        return bool(self.patterns) and self._blank(a) == self._blank(b)

    def _blank(self, text: str) -> str:
        for pattern in self.patterns:
            text = pattern.sub("", text)
        return text

    # -- bodies ----------------------------------------------------------------------------------

    def _body(self, a: Response, b: Response, out: list[Difference]) -> None:
        if a.truncated or b.truncated:
            mine, theirs = _digest(a), _digest(b)
            if (a.body_length, mine) != (b.body_length, theirs):
                out.append(
                    Difference(
                        "body_over_limit", "body (over the limit)", "body",
                        f"{a.body_length} bytes, sha256 {mine.hex()[:16]}",
                        f"{b.body_length} bytes, sha256 {theirs.hex()[:16]}", False,
                    )
                )  # fmt: skip
            return
        encoding_a, encoding_b = _header(a, "content-encoding"), _header(b, "content-encoding")
        if a.body == b.body and encoding_a == encoding_b:
            return
        body_a = _decode(a.body, encoding_a, self.decoded_limit)
        body_b = _decode(b.body, encoding_b, self.decoded_limit)
        if body_a is None or body_b is None:  # undecodable or too large decoded: the bytes as sent
            body_a, body_b = a.body, b.body
        if body_a == body_b:
            return
        type_a, type_b = _header(a, "content-type"), _header(b, "content-type")
        json_a, json_b = _json_or_none(body_a, type_a), _json_or_none(body_b, type_b)
        if json_a is not _NOT_JSON and json_b is not _NOT_JSON:
            before = len(out)
            self._json(json_a, json_b, "", "", out, 0, prune=True)
            if len(out) == before:  # equal as Python values; True == 1 hides in that: look strictly
                self._json(json_a, json_b, "", "", out, 0, prune=False)
            return
        if (json_a is _NOT_JSON) != (json_b is _NOT_JSON) and (
            _is_json_type(type_a) or _is_json_type(type_b)
        ):
            shown_a = "JSON" if json_a is not _NOT_JSON else type_a or "not JSON"
            shown_b = "JSON" if json_b is not _NOT_JSON else type_b or "not JSON"
            out.append(Difference("body_type", "body (type)", "body", shown_a, shown_b, False))
            return
        text_a, text_b = _text_or_none(body_a, type_a), _text_or_none(body_b, type_b)
        if text_a is not None and text_b is not None:
            self._text(text_a, text_b, out)
            return
        out.append(
            Difference(
                "body_bytes", "body (bytes)", "body",
                f"{len(body_a)} bytes, sha256 {hashlib.sha256(body_a).hexdigest()[:16]}",
                f"{len(body_b)} bytes, sha256 {hashlib.sha256(body_b).hexdigest()[:16]}", False,
            )
        )  # fmt: skip

    def _json(
        self, a: Any, b: Any, where: str, field: str, out: list[Difference], depth: int, prune: bool
    ) -> None:
        if len(out) >= MAX_DIFFERENCES or depth > MAX_DEPTH or self._path_ignored(field):
            return
        type_a, type_b = _json_type(a), _json_type(b)
        here = where or "$"
        if type_a != type_b:
            out.append(Difference("json_type", field or "$", here, a, b, False))
            return
        if type_a == "object":
            for key, value in a.items():
                child, child_field = _key_path(where, key), _key_path(field, key)
                if key not in b:
                    if not self._path_ignored(child_field):
                        out.append(Difference("json_missing", child_field, child, value, None, False))
                elif not prune or value != b[key] or type(value) is not type(b[key]):
                    self._json(value, b[key], child, child_field, out, depth + 1, prune)
            for key, value in b.items():
                if key not in a:
                    child_field = _key_path(field, key)
                    if not self._path_ignored(child_field):
                        out.append(
                            Difference("json_extra", child_field, _key_path(where, key), None, value, False)
                        )
            return
        if type_a == "array":
            items = f"{field}[*]"
            for index in range(min(len(a), len(b))):
                if not prune or a[index] != b[index] or type(a[index]) is not type(b[index]):
                    self._json(a[index], b[index], f"{where}[{index}]", items, out, depth + 1, prune)
            if len(a) != len(b):
                out.append(
                    Difference("json_array_length", f"{field or '$'} (length)", here, len(a), len(b), False)
                )
            return
        if a == b:
            return
        if type_a == "string":
            if self._same_after_patterns(a, b):
                return
            volatile = volatile_strings(a, b)
        else:
            volatile = type_a == "number" and volatile_numbers(a, b)
        out.append(Difference("json_value", field or "$", here, a, b, volatile))

    def _path_ignored(self, field: str) -> bool:
        if self.ignored_paths is None or not field:
            return False
        ignored = self._ignored_cache.get(field)
        if ignored is None:
            ignored = self.ignored_paths.fullmatch(field) is not None
            if len(self._ignored_cache) < 4096:
                self._ignored_cache[field] = ignored
        return ignored

    def _text(self, a: str, b: str, out: list[Difference]) -> None:
        if self.patterns:
            a, b = self._blank(a), self._blank(b)
            if a == b:
                return
        lines_a, lines_b = a.splitlines(), b.splitlines()
        if len(lines_a) > MAX_TEXT_LINES or len(lines_b) > MAX_TEXT_LINES:
            summary_a = f"{len(lines_a)} lines, sha256 {hashlib.sha256(a.encode()).hexdigest()[:16]}"
            summary_b = f"{len(lines_b)} lines, sha256 {hashlib.sha256(b.encode()).hexdigest()[:16]}"
            out.append(Difference("text_lines", "body text", "body", summary_a, summary_b, False))
            return
        # autojunk (lines in over 1% of a long text are not anchors) keeps this near-linear: without
        # it, 2,000 lines of a few repeated values took 6 s of the event loop's CPU.
        matcher = difflib.SequenceMatcher(None, lines_a, lines_b)
        for tag, a0, a1, b0, b1 in matcher.get_opcodes():
            if tag == "equal":
                continue
            if len(out) >= MAX_DIFFERENCES:
                return
            if tag == "replace" and a1 - a0 == b1 - b0:
                for offset in range(min(a1 - a0, MAX_DIFFERENCES - len(out))):
                    line_a, line_b = lines_a[a0 + offset], lines_b[b0 + offset]
                    volatile = volatile_strings(line_a, line_b)
                    field = "body text (volatile tokens)" if volatile else "body text"
                    out.append(
                        Difference("text_lines", field, f"line {a0 + offset + 1}", line_a, line_b, volatile)
                    )
                continue
            out.append(
                Difference(
                    "text_lines", "body text", f"lines {a0 + 1}-{a1}" if a1 > a0 + 1 else f"line {a0 + 1}",
                    "\n".join(lines_a[a0:a1]) or None, "\n".join(lines_b[b0:b1]) or None, False,
                )
            )  # fmt: skip


_NOT_JSON: Any = object()


def cookie_shape(value: str) -> str:
    """A Set-Cookie header without its value: `session; Path=/; HttpOnly` (expiry dropped too)."""
    parts = [part.strip() for part in value.split(";")]
    name = parts[0].partition("=")[0].strip()
    kept = [
        part
        for part in parts[1:]
        if part and part.partition("=")[0].strip().lower() not in ("expires", "max-age")
    ]
    return "; ".join([name, *sorted(kept, key=str.lower)])


def _header(response: Response, name: str) -> str:
    for key, value in response.headers:
        if key.lower() == name:
            return value.strip().lower()
    return ""


def _digest(response: Response) -> bytes:
    return response.body_sha256 or hashlib.sha256(response.body).digest()


def _decode(body: bytes, encoding: str, limit: int) -> bytes | None:
    """The body with its Content-Encoding undone, at most `limit` bytes; None when it cannot be."""
    if encoding in ("", "identity"):
        return body
    try:
        if encoding in ("gzip", "x-gzip"):
            decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":  # zlib-wrapped as the RFC says, or raw as some servers send
            decoder = zlib.decompressobj(zlib.MAX_WBITS if body[:1] == b"\x78" else -zlib.MAX_WBITS)
        elif encoding == "br" and brotli is not None:
            decoded = brotli.Decompressor().process(body)
            return decoded if len(decoded) <= limit else None
        else:
            return None
        decoded = decoder.decompress(body, limit + 1)
    except (zlib.error, Exception):  # brotli.error is not a zlib.error
        return None
    return decoded if len(decoded) <= limit and not decoder.unconsumed_tail else None


def _is_json_type(content_type: str) -> bool:
    return bool(content_type) and _MEDIA_JSON.search(content_type) is not None


def _json_or_none(body: bytes, content_type: str) -> Any:
    if not _is_json_type(content_type) and body.lstrip()[:1] not in (b"{", b"["):
        return _NOT_JSON
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return _NOT_JSON


def _text_or_none(body: bytes, content_type: str) -> str | None:
    if content_type and not _MEDIA_TEXT.search(content_type) and not _is_json_type(content_type):
        return None
    try:
        text = body.decode()
    except UnicodeDecodeError:
        return None
    return None if "\x00" in text else text


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _key_path(path: str, key: str) -> str:
    if _IDENTIFIER.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


def _path_matcher(paths: tuple[str, ...]) -> re.Pattern[str] | None:
    """One regex over field keys (`items[*].price`) from the ignore.json_paths: `*` one key, `[*]` or
    `[N]` any index, `**` any depth."""
    if not paths:
        return None
    alternatives = []
    for path in paths:
        path = path.removeprefix("$.").removeprefix("$")
        path = re.sub(r"\[\d+\]", "[*]", path)
        pattern = re.escape(path)
        pattern = pattern.replace(r"\*\*", "\0").replace(r"\[\*\]", "\1").replace(r"\*", r"[^.\[]+")
        pattern = pattern.replace("\0", ".*").replace("\1", r"\[\*\]")
        alternatives.append(pattern)
    return re.compile("|".join(f"(?:{alt})" for alt in alternatives))

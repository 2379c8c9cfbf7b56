"""SPOP message -> MirrorRequest: the contract with HAProxy's `spoe-message`.

Drop-in for the C agent's `args arg_method=method arg_path=url arg_ver=req.ver arg_hdrs=req.hdrs
arg_body=req.body`, and the plain names too. The path may be HAProxy's `pathq` (origin form,
`/path?q=1`) or `url`, which for a request that came over HTTP/2 or HTTP/3 is the absolute form
`https://host/path?q=1`: that is turned into origin form here, its authority standing in for a
missing Host header, and an absolute form with another scheme or with userinfo is refused.
`arg_hdrs` may be `req.hdrs` (a STRING header block ending in an empty line) or `req.hdrs_bin`
(BINARY: varint-length-prefixed name/value pairs ending with two empty strings).
"""

from __future__ import annotations

import hashlib
import re
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from spoe.data import decode_bytes
from spoe.errors import InvalidFrame

from .compare.model import Response
from .request import MirrorRequest

METHOD_ARGS = ("arg_method", "method")
PATH_ARGS = ("arg_path", "path", "url")
VERSION_ARGS = ("arg_ver", "ver", "version")
HEADER_ARGS = ("arg_hdrs", "hdrs", "headers")
BODY_ARGS = ("arg_body", "body")
BODY_LEN_ARGS = ("arg_body_len", "body_len")
UNIQUE_ID_ARGS = ("arg_unique_id", "unique_id", "unique-id")
# Header lines one message may carry. HAProxy allows 101 by default (tune.http.maxhdr); the cap keeps
# one message's work in milliseconds: 1.5 million tiny headers in one 9 MB NOTIFY held the event loop
# for 0.9 s. Over it, the message is `invalid` (reason too_many_headers).
MAX_HEADERS = 1024

# RFC 9112 3.2.2 absolute-form: scheme "://" authority, then the path-abempty and query.
_ABSOLUTE_FORM = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(.*)", re.DOTALL)
# RFC 3986 authority without userinfo: an IP literal, or a reg-name / IPv4 address, and a port.
_AUTHORITY = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%!$&'()*+,;=-]+)(?::[0-9]{0,5})?")
_ABSOLUTE_SCHEMES = frozenset({"http", "https"})
# A tuple, not `IPv4Address | IPv6Address | str`, which builds two union objects at every call:
# isinstance with it takes ~110 ns more (timeit), for every request whose message carries `src`.
_ADDRESS_TYPES = (IPv4Address, IPv6Address, str)


class BadMessage(ValueError):
    """A message we cannot mirror; `reason` is a short metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def is_mirror_message(args: dict[str, Any]) -> bool:
    """Any message carrying a method and a path is a mirror request by default."""
    get = args.get
    return (get("arg_method") is not None or _first(args, METHOD_ARGS) is not None) and (
        get("arg_path") is not None or _first(args, PATH_ARGS) is not None
    )


def to_request(args: dict[str, Any]) -> MirrorRequest:
    """Runs once per mirrored request. Each argument is read under the C agent's name first, where
    the usual message puts it with the usual type, and only otherwise through the general lookup
    (`_first`, `_text`) with its aliases and conversions: ~1.3 us instead of ~2.3 us for wrk's GET
    (five args, one header) on the 2-core development machine, ~2.2 us instead of ~3.4 us with the
    `body_len`, `src` and `unique_id` of haproxy/mirror.spoe.conf (`str()` of the src address is
    ~0.5 us of that)."""
    get = args.get
    method = get("arg_method")
    if type(method) is not str:
        method = _text(args, METHOD_ARGS, "method", required=True)
    path = get("arg_path")
    if type(path) is not str:
        path = _text(args, PATH_ARGS, "path", required=True)
    version = get("arg_ver")
    if type(version) is not str:
        version = _text(args, VERSION_ARGS, "version", required=False)
    headers_arg = get("arg_hdrs")
    if type(headers_arg) is str:
        headers = parse_text_headers(headers_arg)
    else:
        headers_arg = _first(args, HEADER_ARGS)
        headers = parse_headers(headers_arg) if headers_arg is not None else []
    body = get("arg_body")
    if type(body) is not bytes:
        body = _body(args)
    # The optional args: the C agent's name, then the plain one, inline (a `_first` call each cost
    # wrk's GET ~1k instructions when the message has neither).
    body_len = get("arg_body_len")
    if body_len is None:
        body_len = get("body_len")
    if body_len is not None and type(body_len) is not int:
        if isinstance(body_len, bool) or not isinstance(body_len, int):
            raise BadMessage("bad_body_len", f"body_len must be an integer, got {type(body_len).__name__}")
        body_len = int(body_len)
    src = get("arg_src")
    if src is None:
        src = get("src")
    if src is not None:
        if not isinstance(src, _ADDRESS_TYPES):
            raise BadMessage("bad_src", f"src must be an address, got {type(src).__name__}")
        src = str(src)
    unique_id = get("arg_unique_id")
    if unique_id is None:
        unique_id = get("unique_id")
    if type(unique_id) is not str and (unique_id is not None or "unique-id" in args):
        unique_id = _text(args, UNIQUE_ID_ARGS, "unique_id", required=False)
    # "://" first: a substring test costs a third of slicing off the first character (timeit), and
    # origin-form targets seldom hold it. Measured with callgrind, the slice first made to_request +
    # admit + build of a wrk GET ~530 instructions (0.9%) dearer than before absolute forms existed.
    if "://" in path and path[:1] != "/":
        path = _origin_form(path, headers)
    return MirrorRequest(method, path, version or "1.1", headers, body, body_len, unique_id, src)


def to_primary_response(args: dict[str, Any], latency: float, body_limit: int) -> tuple[str, Response]:
    """The compare section's response message (haproxy/mirror.spoe.conf's mirror-response:
    `unique_id`, `status`, `hdrs` = res.hdrs, `body` = res.body, `body_len` = res.body_size) ->
    (unique id, the primary's Response). A body HAProxy cut at its buffer shows as a `body_len` over
    the bytes it sent: the Response's body_length is then the declared length and its digest None
    (the whole body never reached the agent), which the pairing table counts as too_large. A body
    over `body_limit` is kept cut at it, with the digest of the whole."""
    unique_id = _text(args, UNIQUE_ID_ARGS, "unique_id", required=True)
    if not unique_id:
        raise BadMessage("missing_unique_id", "empty unique_id (HAProxy's unique-id-format unset?)")
    status = _first(args, ("arg_status", "status"))
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 999:
        raise BadMessage("bad_status", f"status must be an HTTP status code, got {status!r}")
    headers_arg = _first(args, ("arg_hdrs", "hdrs", "headers"))
    headers = parse_headers(headers_arg) if headers_arg is not None else []
    body = _body(args)
    declared = _first(args, BODY_LEN_ARGS)
    # SPOP integers decode to int subclasses (their wire type): isinstance, and int() to drop it.
    cut = isinstance(declared, int) and not isinstance(declared, bool) and declared > len(body)
    length = int(declared) if cut else len(body)
    digest = None
    if len(body) > body_limit:
        digest = hashlib.sha256(body).digest()
        body = body[:body_limit]
    return unique_id, Response(int(status), tuple(headers), body, length, digest, latency)


def _origin_form(target: str, headers: list[tuple[str, str]]) -> str:
    """`http://host:8080/a?b` -> `/a?b`, appending `host: host:8080` to `headers` when they have no
    Host (HAProxy makes one from `:authority` for HTTP/2, so this is for other senders). Only http
    and https, and never userinfo: `url` holds what the client wrote, and a target naming another
    scheme or carrying credentials is not a request HAProxy routed to a web service."""
    match = _ABSOLUTE_FORM.fullmatch(target)
    if match is None:
        return target  # not absolute form after all; the wire layer judges it
    scheme, authority, rest = match.groups()
    if scheme.lower() not in _ABSOLUTE_SCHEMES:
        raise BadMessage("bad_target_scheme", f"absolute-form target with scheme {scheme[:32]!r}")
    if "@" in authority:
        raise BadMessage("bad_target_userinfo", "absolute-form target with userinfo")
    if _AUTHORITY.fullmatch(authority) is None:
        raise BadMessage("bad_target_authority", f"absolute-form target with authority {authority[:64]!r}")
    if not any(name.lower() == "host" for name, _ in headers):
        headers.append(("host", authority))
    return rest if rest[:1] == "/" else "/" + rest


def _body(args: dict[str, Any]) -> bytes:
    body = _first(args, BODY_ARGS)
    if body is None:
        return b""
    if isinstance(body, str):
        return body.encode("utf-8", "surrogateescape")
    if not isinstance(body, bytes):
        raise BadMessage("bad_body", f"body must be BINARY, got {type(body).__name__}")
    return body


def parse_headers(value: Any) -> list[tuple[str, str]]:
    if isinstance(value, bytes):
        try:
            return parse_binary_headers(value)
        except InvalidFrame:
            return parse_text_headers(value.decode("utf-8", "surrogateescape"))
    if isinstance(value, str):
        return parse_text_headers(value)
    raise BadMessage("bad_headers", f"headers must be STRING or BINARY, got {type(value).__name__}")


def parse_binary_headers(raw: bytes) -> list[tuple[str, str]]:
    """`req.hdrs_bin`: <str:name><str:value>... then two empty strings. Decoded like SPOP STRINGs
    (UTF-8, surrogateescape), the inverse of the wire layer's encoding, so the shadow gets the bytes
    HAProxy saw: latin-1 here turned a UTF-8 "é" into four bytes of mojibake."""
    headers: list[tuple[str, str]] = []
    pos, end = 0, len(raw)
    while pos < end:
        name, pos = decode_bytes(raw, pos)
        value, pos = decode_bytes(raw, pos)
        if not name and not value:
            return headers
        if len(headers) == MAX_HEADERS:
            raise _too_many_headers()
        headers.append((name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")))
    raise InvalidFrame("binary header block without its end marker")


def parse_text_headers(block: str) -> list[tuple[str, str]]:
    """`req.hdrs`: "Name: value\\r\\n" lines ending with an empty line. Lines without a colon are
    dropped rather than forwarded: the wire layer rebuilds every header line itself. At most
    MAX_HEADERS lines are split off: the rest of a huge block is copied once, never scanned line by
    line (str.find or str.count of CRLF in 10 MB of tiny lines take 20-40 ms; this split ~1 ms)."""
    headers = []
    lines = block.split("\r\n", MAX_HEADERS)
    if len(lines) > MAX_HEADERS:
        rest = lines.pop()
        if rest and not rest.startswith("\r\n") and "" not in lines:
            raise _too_many_headers()
    for line in lines:
        if not line:
            break
        name, sep, value = line.partition(":")
        if sep:
            headers.append((name.strip(), value.strip(" \t")))
    return headers


def _too_many_headers() -> BadMessage:
    return BadMessage("too_many_headers", f"more than {MAX_HEADERS} header lines")


def _first(args: dict[str, Any], names: tuple[str, ...]) -> Any:
    for name in names:
        value = args.get(name)
        if value is not None:
            return value
    return None


def _text(args: dict[str, Any], names: tuple[str, ...], label: str, *, required: bool) -> str | None:
    value = _first(args, names)
    if value is None:
        if required:
            raise BadMessage(f"missing_{label}", f"no {label} argument (one of {', '.join(names)})")
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if not isinstance(value, str):
        raise BadMessage(f"bad_{label}", f"{label} must be a string, got {type(value).__name__}")
    return value

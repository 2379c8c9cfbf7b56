"""The header list and body a mirrored request goes out as over HTTP/2 (`protocol: h2`, `h2c`).

The same distrust as wire.py (every byte came from a production client), with HTTP/2's own rules
(RFC 9113 8.2): names lower-case, no connection-specific fields (Connection, Keep-Alive,
Proxy-Connection, Transfer-Encoding, Upgrade, and TE unless it is exactly `trailers`, which gRPC
servers require), no Host (its value goes in `:authority`), no pseudo-header from the client. A
request that breaks them raises `WireError` at build time, so it is counted `invalid` instead of
failing later as a protocol error. Values are checked for CR, LF and NUL, which HPACK would carry
but no HTTP/1.1 hop behind the shadow could.

gRPC requests (`content-type: application/grpc*`) are marked for the transport, which reads their
`grpc-status`, and their `grpc-timeout` is parsed (and lowered to the target's timeout when longer,
so the shadow gives up when we do).
"""

from __future__ import annotations

import re

from .wire import WireError, _validate_name, _validated_lowercase_names

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_ORIGIN_FORM = re.compile(r"/[^\x00-\x20\x7f]*")
_FIELD_VALUE_BREAKER = re.compile(r"[\r\n\x00]")
_COMMON_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"})
_METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
# wire.py's name cache maps every pseudo-header to this one name.
_PSEUDO_HEADER = ":pseudo-header"
_CONNECTION_SPECIFIC = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "http2-settings",
        "expect",
        "host",
        "content-length",
        "trailer",
        _PSEUDO_HEADER,
    }
)
# grpc-timeout: at most 8 digits and a unit (gRPC's PROTOCOL-HTTP2.md).
_GRPC_TIMEOUT = re.compile(r"([0-9]{1,8})([HMSmun])")
_GRPC_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


class H2Request:
    """What the HTTP/2 transport sends: the header block (bytes, pseudo-headers first) and the body;
    `grpc` when the content type is gRPC, `timeout` the seconds of its grpc-timeout if any. Its
    len() is the bytes it holds (header names and values, body), which the memory budget counts."""

    __slots__ = ("body", "grpc", "headers", "size", "timeout")

    def __init__(
        self, headers: list[tuple[bytes, bytes]], body: bytes, grpc: bool, timeout: float | None
    ) -> None:
        self.headers = headers
        self.body = body
        self.grpc = grpc
        self.timeout = timeout
        self.size = len(body) + sum(len(name) + len(value) for name, value in headers)

    def __len__(self) -> int:
        return self.size


def build_h2_request(
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: bytes,
    authority: str,
    *,
    scheme: str,
    timeout_cap: float,
    protected: frozenset[str] = frozenset(),
) -> H2Request:
    if method not in _COMMON_METHODS and _TOKEN.fullmatch(method) is None:
        raise WireError("bad_method", repr(method))
    if method == "CONNECT":
        raise WireError("bad_method", "CONNECT cannot be mirrored over HTTP/2")
    if _ORIGIN_FORM.fullmatch(target) is None and not (target == "*" and method == "OPTIONS"):
        raise WireError("bad_target", repr(target))
    if not authority or _FIELD_VALUE_BREAKER.search(authority):
        raise WireError("bad_host", repr(authority))
    fields: list[tuple[str, str]] = [
        (":method", method),
        (":scheme", scheme),
        (":authority", authority),
        (":path", target),
    ]
    if body or method in _METHODS_WITH_BODY:
        fields.append(("content-length", str(len(body))))
    connection_options: set[str] = set()
    grpc = False
    grpc_timeout: float | None = None
    lowercase_name = _validated_lowercase_names.get
    for name, value in headers:
        lname = lowercase_name(name) or _validate_name(name)
        if _FIELD_VALUE_BREAKER.search(value):
            raise WireError("bad_header", f"value of {name!r}")
        if lname in _CONNECTION_SPECIFIC:
            if lname == "connection":
                connection_options.update(option.strip().lower() for option in value.split(","))
            continue
        if lname == "te":
            if value.strip().lower() == "trailers":
                fields.append(("te", "trailers"))
            continue
        if lname == "content-type" and value[:16].lower() == "application/grpc":
            grpc = True
        elif lname == "grpc-timeout":
            match = _GRPC_TIMEOUT.fullmatch(value.strip())
            if match is None:
                raise WireError("bad_header", f"grpc-timeout {value[:32]!r}")
            grpc_timeout = int(match[1]) * _GRPC_TIMEOUT_UNITS[match[2]]
            if grpc_timeout > timeout_cap:
                grpc_timeout = timeout_cap
                value = f"{max(1, int(timeout_cap * 1000))}m"
        fields.append((lname, value.strip(" \t")))  # RFC 9113 8.2.1: no whitespace at either end
    connection_options -= protected  # what the agent and the operator add cannot be named away
    if connection_options:
        fields = [field for field in fields if field[0][0] == ":" or field[0] not in connection_options]
    try:
        encoded = [(name.encode("ascii"), value.encode("utf-8", "surrogateescape")) for name, value in fields]
    except UnicodeEncodeError as exc:  # a lone surrogate that no byte string decodes to
        raise WireError("bad_encoding", str(exc)) from None
    return H2Request(encoded, body, grpc, grpc_timeout)

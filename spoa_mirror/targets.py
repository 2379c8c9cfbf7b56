"""A target: one shadow backend, declared once as a model (its keys, defaults, documentation and
checks), with its URL taken apart at load so the request path connects without parsing.

The sub-specs its stages compile (sample_key, filters, redact, rate_limit, circuit_breaker) are
declared by those stages' own models and kept as the mappings written, for their builders. Mappings
are plain dicts so the config pickles across worker processes: treat them as read-only.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal, NamedTuple
from urllib.parse import urlsplit

from pydantic import Field, PlainValidator, WithJsonSchema, model_validator

from .capture.settings import CaptureSettings
from .config_types import (
    HOSTNAME,
    TOKEN,
    Bool,
    Derived,
    Duration,
    ExistingFile,
    KiB,
    MiB,
    NonEmptyStr,
    Percentage,
    Section,
    Size,
    bounded_size,
    int_between,
    problem,
    show,
    spec_of,
)
from .filters import FilterSpec
from .header_templates import AddedHeaders
from .limits import CircuitBreakerSpec, RateLimitSpec
from .redact import redact_spec_model
from .sampling import SampleKeySpec

# HTTP/1.1 requests in flight per connection by default. Measured (bench/e2e_bench.py --scenarios
# mirror --duration 5 --shadow-keepalive-requests 1000, nginx shadow): 27-28 us of agent CPU per
# mirrored GET at 8 against 35-36 at 1, every request delivered once at both.
DEFAULT_PIPELINE_DEPTH = 8

_GRPC_METHOD = re.compile(r"/[A-Za-z0-9_.]+/(?:[A-Za-z0-9_]+|\*)")
_NAME = re.compile(r"[\x21-\x7e]{1,128}")


class PathRewrite(NamedTuple):
    pattern: re.Pattern[str]
    replacement: str


def _string_list(value: object) -> list[Any]:
    if not isinstance(value, list):
        raise problem(f"must be a list, got {show(value)}")
    return value


def _item_error(index: int, text: str) -> Exception:
    return problem(text, f"[{index}]")


def _methods(value: object) -> frozenset[str]:
    methods = _string_list(value)
    if not methods:
        raise problem("must list at least one method (leave it out to mirror every method)")
    for index, method in enumerate(methods):
        if not isinstance(method, str) or not method:
            raise _item_error(index, f"must be a non-empty string, got {show(method)}")
        if not TOKEN.fullmatch(method):
            raise _item_error(index, f"must be an HTTP method, got {method!r}")
    return frozenset(method.upper() for method in methods)


def _grpc_methods(value: object) -> frozenset[str]:
    methods = _string_list(value)
    if not methods:
        raise problem("must list at least one method (leave it out to mirror every gRPC method)")
    for index, method in enumerate(methods):
        if not isinstance(method, str) or not _GRPC_METHOD.fullmatch(method):
            raise _item_error(
                index, f"must be /package.Service/Method or /package.Service/*, got {show(method)}"
            )
    return frozenset(methods)


def _header_set(value: object) -> frozenset[str]:
    names = _string_list(value)
    for index, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise _item_error(index, f"must be a non-empty string, got {show(name)}")
        if not TOKEN.fullmatch(name):
            raise _item_error(index, f"must be a valid header name, got {name!r}")
    return frozenset(name.lower() for name in names)


def _path_rewrite(value: object) -> PathRewrite:
    if isinstance(value, PathRewrite):
        return value
    if not isinstance(value, dict):
        raise problem(f"must be a mapping, got {show(value)}")
    for name in value:
        if name not in ("regex", "replacement"):
            raise problem("unknown key (expected regex, replacement)", str(name))
    regex, replacement = value.get("regex"), value.get("replacement")
    if regex is None or replacement is None:
        raise problem("needs both regex and replacement")
    if not isinstance(regex, str) or not regex:
        raise problem(f"must be a non-empty string, got {show(regex)}", "regex")
    if not isinstance(replacement, str):
        raise problem(f"must be a string, got {show(replacement)}", "replacement")
    try:
        pattern = re.compile(regex)
    except re.error as error:
        raise problem(f"invalid regular expression: {error}", "regex") from None
    # Expand the replacement against an empty match with the same groups, so a reference to a
    # group that does not exist fails now rather than on the first matching request.
    names = {index: name for name, index in pattern.groupindex.items()}
    groups = "".join(f"(?P<{names[i]}>)" if i in names else "()" for i in range(1, pattern.groups + 1))
    try:
        re.compile(groups).match("").expand(replacement)  # type: ignore[union-attr]
    except (re.error, IndexError) as error:
        raise problem(f"invalid replacement: {error}", "replacement") from None
    return PathRewrite(pattern, replacement)


def _target_name(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise problem(f"must be a non-empty string, got {show(value)}")
    if not _NAME.fullmatch(value):
        raise problem(f"must be 1 to 128 printable characters without spaces, got {value!r}")
    return value


def _string_list_schema(**items: Any) -> WithJsonSchema:
    return WithJsonSchema({"type": "array", "minItems": 1, "items": {"type": "string", **items}})


Methods = Annotated[
    frozenset[str], PlainValidator(_methods), _string_list_schema(pattern=f"^{TOKEN.pattern}$")
]
GrpcMethods = Annotated[
    frozenset[str], PlainValidator(_grpc_methods), _string_list_schema(pattern=f"^{_GRPC_METHOD.pattern}$")
]
HeaderSet = Annotated[
    frozenset[str],
    PlainValidator(_header_set),
    WithJsonSchema({"type": "array", "items": {"type": "string", "pattern": f"^{TOKEN.pattern}$"}}),
]
PathRewriteSpec = Annotated[
    PathRewrite,
    PlainValidator(_path_rewrite),
    WithJsonSchema(
        {
            "type": "object",
            "properties": {"regex": {"type": "string", "minLength": 1}, "replacement": {"type": "string"}},
            "required": ["regex", "replacement"],
            "additionalProperties": False,
        }
    ),
]
TargetName = Annotated[
    str, PlainValidator(_target_name), WithJsonSchema({"type": "string", "pattern": r"^[\x21-\x7e]{1,128}$"})
]


class Upstream(Section):
    """GAL's `upstream: {host, port}`, meaning http://host:port."""

    host: NonEmptyStr = Field(description="host name or IP address")
    port: int_between(1, 65535) = Field(description="port")

    @classmethod
    def prepare(cls, data: dict[str, Any]) -> dict[str, Any]:
        if data.get("host") is None or data.get("port") is None:
            raise problem("needs both host and port")
        return data


class TargetConfig(Section):
    """One shadow backend."""

    name: TargetName | None = Field(
        None, description="unique name used in logs and metrics (default host:port of the URL)"
    )
    url: NonEmptyStr | None = Field(
        None, description="http:// or https:// URL; its path, if any, is put before every request path"
    )
    upstream: Upstream | None = Field(None, description="{host, port} instead of url (the GAL form)")
    sample_percentage: Percentage = Field(100.0, description="share of requests mirrored, 0 to 100")
    sample_key: spec_of(SampleKeySpec) | None = Field(
        None, description="{header|cookie|query: NAME, missing: random|skip}: sample a stable subset of users"
    )
    timeout: Duration = Field(5.0, description="whole-exchange timeout of one mirrored request")
    connect_timeout: Duration = Field(1.0, description="TCP and TLS connect timeout")
    headers: AddedHeaders = Field(
        {},
        description='headers added to every mirrored request (string values); "{{uuid}}" in a value is '
        "a fresh UUID per mirrored request",
    )
    remove_headers: HeaderSet = Field(
        frozenset(), description="client headers not forwarded (case-insensitive)"
    )
    host_policy: Literal["target", "original", "suffix"] = Field(
        "target",
        alias="host",
        description="Host header sent: target (the URL's authority), original (the client's), or suffix "
        "(the client's with -shadow appended, as Envoy and kgateway do)",
    )
    path_rewrite: PathRewriteSpec | None = Field(
        None, description="{regex, replacement}: the first match in the path is replaced, re.sub syntax"
    )
    methods: Methods | None = Field(
        None,
        description="only these methods are mirrored (default all); a method-override header claiming "
        "another method is filtered",
    )
    max_body_size: Size = Field(10 * MiB, description="requests with a larger body are not mirrored")
    tls_verify: Bool = Field(True, description="verify an https target's certificate and host name")
    ca_file: ExistingFile | None = Field(
        None, description="CA bundle for an https target (default: the system's)"
    )
    concurrency: int_between(1, 100_000) = Field(
        64, description="connections open to the target at most; over HTTP/2, requests in flight at most"
    )
    pipeline_depth: int_between(1, 64) = Field(
        DEFAULT_PIPELINE_DEPTH,
        description="HTTP/1.1 requests in flight on one connection at most (pipelining); 1 is off, other "
        "protocols and capture targets do not pipeline. The requests one loop iteration gives a "
        "connection go in one write, up to concurrency x pipeline_depth are in flight; those behind a "
        "Connection: close response are sent again once (the shadow did not process them), a "
        "connection lost mid-pipeline ends its unanswered requests as errors, never retried",
    )
    queue_size: int_between(1, 10_000_000) = Field(
        8192, description="mirrors waiting for a connection at most; more are dropped, counted"
    )
    rate_limit: spec_of(RateLimitSpec) | None = Field(
        None, description="{requests_per_second, bytes_per_second, burst_seconds}"
    )
    circuit_breaker: spec_of(CircuitBreakerSpec) | None = Field(
        None, description="{failure_threshold, backoff, max_backoff}"
    )
    filters: spec_of(FilterSpec) | None = Field(
        None,
        description="{allow: RULES, deny: RULES, ignore_path_case}: which requests the target sees at all",
    )
    redact: spec_of(redact_spec_model()) | None = Field(
        None, description="per-target redaction, merged over the global redact"
    )
    mirror_body: Bool = Field(True, description="send the request body; false sends the request without it")
    mirror_headers: Bool = Field(
        True, description="forward the client's headers; false forwards none but Host"
    )
    protocol: Literal["http1", "h2", "h2c", "auto"] = Field(
        "http1",
        description="http1; h2 (HTTP/2 over TLS, https URLs); h2c (HTTP/2 with prior knowledge, http URLs); "
        "auto (h2 when the https server offers it with ALPN, else HTTP/1.1)",
    )
    grpc_methods: GrpcMethods | None = Field(
        None,
        description="gRPC methods mirrored (/package.Service/Method or /package.Service/*); set, a gRPC "
        "request for any other method is filtered",
    )
    memory_budget: bounded_size(minimum=64 * KiB) = Field(
        32 * MiB,
        description="bytes of this target's mirror requests held, queued or being sent (budget_exceeded)",
    )
    max_queue_age: Duration = Field(
        5.0, description="a mirror queued longer than this is dropped, counted as stale"
    )
    capture: CaptureSettings | None = Field(
        None,
        description="instead of a url: write this target's requests to rotating GoReplay files "
        "(spoa-mirror replay and capture-info read them)",
    )

    # Taken from url (or upstream) at load, for the request path.
    scheme: Derived[str] = ""  # "http" or "https"
    host: Derived[str] = Field("", validation_alias="(derived) host")  # IPv6 literals without brackets
    port: Derived[int] = 0
    base_path: Derived[str] = ""  # URL path without its trailing slash, "" for none
    authority: Derived[str] = ""  # host[:port] for the Host header and logs; default port left out
    config_key: Derived[str] = ""  # where the target was written, e.g. "targets[2]", for messages

    @classmethod
    def prepare(cls, data: dict[str, Any]) -> dict[str, Any]:
        if data.get("url") is not None and data.get("upstream") is not None:
            raise problem("give url or upstream, not both", "upstream")
        if data.get("capture") is not None:
            if data.get("url") is not None or data.get("upstream") is not None:
                raise problem("a target either sends (url) or captures, not both", "capture")
            if data.get("pipeline_depth", 1) != 1:
                raise problem("a capture target has no connections to pipeline on", "pipeline_depth")
            if data.get("host") == "target":
                raise problem("a capture target has no Host of its own: original or suffix", "host")
            return {**data, "host": data.get("host") or "original", "pipeline_depth": 1}
        if data.get("url") is None and data.get("upstream") is None:
            raise problem("needs a url (or an upstream with host and port, or a capture block)")
        if "pipeline_depth" not in data and data.get("protocol", "http1") != "http1":
            return {**data, "pipeline_depth": 1}  # the default pipelines HTTP/1.1 targets only
        return data

    @model_validator(mode="after")
    def _take_url_apart(self) -> TargetConfig:
        if self.capture is not None:  # written to files: no URL, no connection, the client's Host
            url = f"capture:{self.capture.directory}"
            self.derive(url=url, name=self.name or url, scheme="capture")
            return self
        if self.upstream is not None:
            host = self.upstream.host.strip("[]").lower()
            _check_host(host, "upstream.host", ipv6=":" in host)
            scheme, port, base_path = "http", self.upstream.port, ""
            url = f"http://{join_host(host)}:{port}"
        else:
            url = self.url or ""
            scheme, host, port, base_path = _parse_url(url)
        if self.protocol == "h2" and scheme != "https":
            raise problem("h2 needs an https URL; use h2c for HTTP/2 without TLS", "protocol")
        if self.protocol == "h2c" and scheme != "http":
            raise problem("h2c needs an http URL; use h2 for HTTP/2 over TLS", "protocol")
        if self.pipeline_depth > 1 and self.protocol != "http1":
            raise problem("pipelining is HTTP/1.1's: it needs protocol http1", "pipeline_depth")
        default_port = 443 if scheme == "https" else 80
        self.derive(
            url=url,
            name=self.name or f"{join_host(host)}:{port}",
            scheme=scheme,
            host=host,
            port=port,
            base_path=base_path,
            authority=join_host(host) if port == default_port else f"{join_host(host)}:{port}",
        )
        return self


def join_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _parse_url(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, base path), parsed here once so the pipeline connects without parsing."""
    if any(ch <= " " or ch == "\x7f" for ch in url):
        raise problem(f"must not contain spaces or control characters, got {url!r}", "url")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise problem(f"is not a valid URL, got {url!r}", "url") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.netloc:
        raise problem(f"must be an http:// or https:// URL, got {url!r}", "url")
    if parts.username is not None or parts.password is not None:
        raise problem(
            "must not contain credentials (user:password@); add a header under headers instead", "url"
        )
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise problem(f"must not have a query string or fragment, got {url!r}", "url")
    try:
        port = parts.port
    except ValueError:
        raise problem(f"has an invalid port, got {url!r}", "url") from None
    host = parts.hostname or ""
    bracketed = parts.netloc.rpartition("@")[2].startswith("[")
    _check_host(host, "url", ipv6=bracketed)
    if port == 0:
        raise problem(f"has an invalid port, got {url!r}", "url")
    return scheme, host, port or (443 if scheme == "https" else 80), parts.path.rstrip("/")


def _check_host(host: str, key: str, *, ipv6: bool) -> None:
    if ipv6:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise problem(f"has an invalid IPv6 address, got {host!r}", key) from None
    elif not HOSTNAME.fullmatch(host):
        raise problem(f"has an invalid host name {host!r} (international names go in their xn-- form)", key)

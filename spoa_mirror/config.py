"""Configuration: a YAML file plus command-line overrides, validated once into frozen dataclasses.

Everything that can be wrong with a config is found at load time (by `spoa-mirror check-config` and
before a SIGHUP reload replaces anything), and reported as one `ConfigError` line naming the full key:
`targets[1].timeout: must be a positive number of seconds, got -1`. Unknown keys are errors with a
suggestion, because a misspelt key silently taking its default is how a shadow ends up receiving
100% of production traffic instead of 1%. The dataclasses then hold parsed values (ports, floats,
compiled regexes) so the request path never parses or checks configuration again.

A key set to `null` takes its default. Durations are seconds, as a number or a string such as
`"500ms"`, `"2s"`, `"1.5m"`, `"1h"`. Sizes are bytes, as an integer or a string such as `"512k"`,
`"1MiB"`, `"10MB"`: `k`/`KiB`, `m`/`MiB`, `g`/`GiB` are powers of 1024 (the HAProxy and nginx
convention), `kB`/`MB`/`GB` powers of 1000.

Reference, one entry per key as `key` (default): meaning, the source for the README's table
(`examples/config.yaml` shows every key):

listen.address (127.0.0.1): address the SPOP listener binds. Loopback by default, unlike the C
    agent's 0.0.0.0: exposing the agent is a decision.
listen.port (12345): SPOP port; 0 picks a free one.
listen.max_frame_size (16384): largest SPOP frame announced in AGENT-HELLO, 256 bytes to 16 MiB.
listen.capabilities ([pipelining, async, fragmentation]): SPOP capabilities announced, a subset of
    those three.
listen.workers (1): worker processes, each with its own SO_REUSEPORT socket bound by the
    supervisor (see listeners.py); the supervisor serves admin for all of them.
listen.runtime (0): stop after this long (duration); 0 runs until signalled.
listen.backlog (1024): the SPOP listen backlog (the C agent's -b; its default is 10).
listen.processing_delay (0): wait this long before handling each NOTIFY, up to 1 s (the C agent's -t).
listen.monitor_interval (5): how often each worker logs `agent.monitor` at debug level, 1 s to 1 h
    (the C agent's -i).
listen.worker_restarts (5): with workers > 1, how many times in a row a crashing worker is
    restarted (back-off 0.5 s doubling to 30 s) before the supervisor gives up and stops.
listen.max_connections (1000): SPOP connections open at once. At the limit a new connection takes the
    slot of the one longest without a HELLO or NOTIFY (if over 1 s and nothing unanswered), else
    it is refused: idle or dribbling peers cannot lock HAProxy out.
listen.hello_timeout (5): time a new connection has to send HAPROXY-HELLO (duration).
listen.idle_timeout (60): an SPOP connection silent this long is closed (duration).
listen.max_inflight (256): NOTIFY frames one connection may have unanswered before reading pauses.
listen.frame_timeout (5): a frame, or a fragmented NOTIFY, must arrive whole this long after its first
    byte, or the connection is closed (duration).
listen.reassembly_budget (32MiB): bytes all connections together may hold in fragmented NOTIFYs not
    yet complete (size); one connection holds at most the largest body a target accepts plus
    max(1 MiB, max_frame_size) for the other arguments, and nothing without fragmentation. A
    fragmented body larger than this budget cannot arrive: raise it with max_body_size.
listen.allow_networks ([]): CIDRs allowed to connect; empty allows any peer.
listen.tls.cert_file, listen.tls.key_file (unset): serve SPOP over TLS; both are required.
listen.tls.ca_file (unset): when set, HAProxy must present a client certificate signed by this CA.
admin.enabled (true): serve /metrics, /livez (= /healthz) and /readyz over HTTP.
admin.address (127.0.0.1): admin listener address.
admin.port (9180): admin listener port.
outgoing.address (unset): source address of connections to the shadows: an IP address or an
    interface name (its IPv4 address is used) (the C agent's -I).
outgoing.ports (unset): source port, or range "LOW-HIGH", of connections to the shadows; a connection
    fails with error_connect when every port of the range is in use (the C agent's -P).
messages ([]): SPOE message names treated as mirror requests; empty accepts any message carrying a
    method and a path.
log.format (auto): json, console, or auto (console on a terminal, JSON otherwise).
log.level (info): debug, info, warning, error or critical.
secrets.hmac_key_file (unset): file holding the key for hmac redaction (trailing newline ignored,
    at least 16 bytes).
secrets.hmac_key_env (unset): name of an environment variable holding that key instead. The key
    itself is never accepted in the file. With neither set, $CREDENTIALS_DIRECTORY/hmac.key is read
    when it exists (systemd's LoadCredential=, or a Kubernetes Secret mounted there).
secrets.file_permissions (warn): a secret file (hmac_key_file, listen.tls.key_file) its group or
    others may read is logged as a warning (warn) or refused as a config error (refuse).
memory_budget (64MiB): bytes of mirror requests the whole agent may hold, queued or being sent, over
    every target; a request that would go over is dropped, counted as budget_exceeded (size).
redact (unset): redaction for every target (see redact.py); a target's redact is merged over it.
defaults ({}): target keys (any but name, url, upstream) for every target that does not set them;
    a target's value replaces the default whole (nested mappings are not merged).
truncated_body (drop): a body HAProxy cut short (larger than its buffer) is either dropped with its
    mirror (drop) or sent marked X-Mirror-Truncated: true (send_marked).
drain_timeout (5): on SIGTERM, how long queued mirrors may still be sent (duration).
loop_header (X-Spoa-Mirror): header added to every mirrored request, its value a MAC only this agent
    (or a replica with the same secrets key) can make; a request carrying that value is never
    mirrored again, one carrying any other value is mirrored with the value replaced.
targets (required): the shadow backends, at least one unless mirroring.enabled is false.
targets[].name (host:port of the URL): unique name used in logs and metrics.
targets[].url (required): http:// or https:// URL; its path, if any, is put before every request
    path.
targets[].upstream (unset): {host, port} instead of url (the GAL form), meaning http://host:port.
targets[].sample_percentage (100): share of requests mirrored, 0 to 100.
targets[].sample_key (unset): {header|cookie|query: NAME, missing: random|skip}, to sample a stable
    subset of users instead of random requests (see sampling.py).
targets[].timeout (5): whole-exchange timeout of one mirrored request (duration).
targets[].connect_timeout (1): TCP and TLS connect timeout (duration).
targets[].headers ({}): headers added to every mirrored request (string values).
targets[].remove_headers ([]): client headers not forwarded (names, case-insensitive).
targets[].host (target): Host header sent: target (the URL's authority), original (the client's),
    or suffix (the client's with -shadow appended, as Envoy and kgateway do).
targets[].path_rewrite (unset): {regex, replacement}; the first match in the path is replaced,
    re.sub syntax (\\1, \\g<name>).
targets[].methods (all): only these methods are mirrored; a method-override header
    (X-HTTP-Method-Override, ...) claiming another method is filtered.
targets[].max_body_size (10MiB): requests with a larger body are not mirrored (size).
targets[].tls_verify (true): verify an https target's certificate and host name.
targets[].ca_file (system CAs): CA bundle for an https target.
targets[].concurrency (64): connections open to the target at most; over HTTP/2, requests in flight
    at most (streams on as few connections as the server allows).
targets[].queue_size (8192): mirrors waiting for a connection at most; more are dropped, counted.
targets[].memory_budget (32MiB): bytes of this target's mirror requests held, queued or being sent;
    a request that would go over is dropped, counted as budget_exceeded (size).
targets[].max_queue_age (5): a mirror queued longer than this is dropped, counted as stale
    (duration).
targets[].rate_limit (unset): {requests_per_second, bytes_per_second, burst_seconds} (limits.py).
targets[].circuit_breaker (unset): {failure_threshold, backoff, max_backoff} (limits.py).
targets[].filters (unset): {allow: RULES, deny: RULES, ignore_path_case: false}: which requests
    the target sees at all, matched on the normalised path (filters.py).
targets[].redact (unset): per-target redaction, merged over the global redact.
targets[].mirror_body (true): send the request body; false sends the request without it.
targets[].mirror_headers (true): forward the client's headers; false forwards none but Host.
targets[].protocol (http1): http1; h2 (HTTP/2 over TLS, https URLs); h2c (HTTP/2 with prior
    knowledge, http URLs); auto (h2 when the https server offers it with ALPN, else HTTP/1.1).
targets[].grpc_methods (unset): gRPC methods mirrored (`/package.Service/Method`, or
    `/package.Service/*`); set, a gRPC request (content-type application/grpc*) for any other method
    is filtered. Every gRPC call is a POST, so `methods` cannot tell reads from writes.
mirroring.enabled (true): false validates everything but mirrors nothing.
mirroring.mirror_request_body (unset): GAL spelling of mirror_body, for every target.
mirroring.mirror_headers (unset): GAL spelling of mirror_headers, for every target.
mirroring.targets (unset): the GAL place for the target list (there or at the top level, not both).
compare (unset): compare candidate targets' responses with the primary's (compare/config.py has its
    keys); absent, no response is compared and no shadow response body reaches Python.

Precedence, lowest first: built-in default, `defaults`, `mirroring.mirror_request_body` /
`mirroring.mirror_headers`, the target's own key; command-line overrides win over the file.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import fcntl
import ipaddress
import json
import math
import os
import re
import socket
import ssl
import struct
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import yaml

from spoe.connection import CAPABILITIES
from spoe.frames import MIN_FRAME_SIZE

from .compare.config import CompareConfig, describe_compare, parse_compare
from .config_types import parse_duration, parse_size
from .errors import ConfigError

KiB = 1024
MiB = 1024 * KiB
MAX_FRAME_SIZE = 16 * MiB
MIN_HMAC_KEY_BYTES = 16
TRUNCATED_MARKER_HEADER = "X-Mirror-Truncated"
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
HOST_POLICIES = ("target", "original", "suffix")
PROTOCOLS = ("http1", "h2", "h2c", "auto")
_GRPC_METHOD = re.compile(r"/[A-Za-z0-9_.]+/(?:[A-Za-z0-9_]+|\*)")
TRUNCATED_BODY_POLICIES = ("drop", "send_marked")
# Headers whose value the agent computes; configuring them would produce a broken or ambiguous request.
AGENT_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})
OVERRIDE_KEYS = (
    "address", "port", "mirror_urls", "max_frame_size", "capabilities", "workers", "runtime",
    "backlog", "processing_delay", "monitor_interval", "outgoing_address", "outgoing_ports",
    "log_format", "log_level",
)  # fmt: skip

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HOSTNAME = re.compile(
    r"(?=.{1,253}\.?$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?"
)
_NAME = re.compile(r"[\x21-\x7e]{1,128}")
_MISSING: Any = object()
_SIOCGIFADDR = 0x8915  # linux/sockios.h: an interface's address

_TOP_KEYS = (
    "listen", "admin", "messages", "log", "secrets", "redact", "defaults", "truncated_body",
    "drain_timeout", "loop_header", "targets", "mirroring", "outgoing", "memory_budget", "compare",
)  # fmt: skip
_LISTEN_KEYS = (
    "address", "port", "max_frame_size", "capabilities", "workers", "runtime", "max_connections",
    "hello_timeout", "idle_timeout", "max_inflight", "allow_networks", "tls", "backlog",
    "processing_delay", "monitor_interval", "worker_restarts", "frame_timeout", "reassembly_budget",
)  # fmt: skip
_TARGET_KEYS = (
    "name", "url", "upstream", "sample_percentage", "sample_key", "timeout", "connect_timeout",
    "headers", "remove_headers", "host", "path_rewrite", "methods", "max_body_size", "tls_verify",
    "ca_file", "concurrency", "queue_size", "rate_limit", "circuit_breaker", "filters", "redact",
    "mirror_body", "mirror_headers", "protocol", "grpc_methods", "memory_budget", "max_queue_age",
)  # fmt: skip
_DEFAULTS_KEYS = tuple(key for key in _TARGET_KEYS if key not in ("name", "url", "upstream"))
_MIRRORING_KEYS = ("enabled", "mirror_request_body", "mirror_headers", "targets")
_SPEC_KEYS = ("sample_key", "rate_limit", "circuit_breaker", "filters", "redact")


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert_file: str
    key_file: str
    ca_file: str | None = None  # set: HAProxy must present a client certificate signed by it


@dataclass(frozen=True, slots=True)
class ListenConfig:
    address: str = "127.0.0.1"
    port: int = 12345
    max_frame_size: int = 16384
    capabilities: frozenset[str] = CAPABILITIES
    workers: int = 1
    runtime: float = 0.0  # seconds; 0 = unlimited
    max_connections: int = 1000
    hello_timeout: float = 5.0
    idle_timeout: float = 60.0
    max_inflight: int = 256
    allow_networks: tuple[str, ...] = ()  # normalised CIDRs; empty = any peer
    tls: TlsConfig | None = None
    backlog: int = 1024
    processing_delay: float = 0.0
    monitor_interval: float = 5.0
    worker_restarts: int = 5
    frame_timeout: float = 5.0
    reassembly_budget: int = 32 * MiB


@dataclass(frozen=True, slots=True)
class OutgoingConfig:
    """Where connections to the shadows come from (the C agent's -I and -P)."""

    address: str | None = None  # as written: an IP address or an interface name
    source_ip: str | None = None  # the address bound
    ports: tuple[int, int] | None = None  # first and last source port


NO_OUTGOING = OutgoingConfig()

@dataclass(frozen=True, slots=True)
class AdminConfig:
    enabled: bool = True
    address: str = "127.0.0.1"
    port: int = 9180


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: str = "auto"
    level: str = "info"


@dataclass(frozen=True, slots=True)
class SecretsConfig:
    """Where the HMAC key came from, and the key itself kept out of every repr and summary."""

    hmac_key_file: str | None = None
    hmac_key_env: str | None = None
    hmac_key: bytes | None = field(default=None, repr=False)
    file_permissions: str = "warn"
    # Secret files readable by group or others, for the agent to log (it configures logging after
    # loading the config): (key, path, mode).
    readable_files: tuple[tuple[str, str, str], ...] = ()


class PathRewrite(NamedTuple):
    pattern: re.Pattern[str]
    replacement: str


@dataclass(frozen=True, slots=True)
class TargetConfig:
    """One shadow backend, with the URL already taken apart and the raw sub-specs (sample_key,
    filters, redact, rate_limit, circuit_breaker) validated and kept for their builders. Mappings are
    plain dicts so the config pickles across worker processes: treat them as read-only."""

    name: str
    url: str
    scheme: str  # "http" or "https"
    host: str  # IPv6 literals without brackets, as socket calls want them
    port: int
    base_path: str  # URL path without its trailing slash, "" for none
    authority: str  # host[:port] for the Host header and logs; port omitted when the scheme's default
    sample_percentage: float = 100.0
    sample_key: dict[str, Any] | None = None
    timeout: float = 5.0
    connect_timeout: float = 1.0
    headers: dict[str, str] = field(default_factory=dict)
    remove_headers: frozenset[str] = frozenset()  # lower-cased
    host_policy: str = "target"
    path_rewrite: PathRewrite | None = None
    methods: frozenset[str] | None = None  # None = every method
    max_body_size: int = 10 * MiB
    tls_verify: bool = True
    ca_file: str | None = None
    concurrency: int = 64
    queue_size: int = 8192  # ~0.4 s of 20k req/s: rides out a stalled core without queue_full
    memory_budget: int = 32 * MiB
    max_queue_age: float = 5.0
    rate_limit: dict[str, Any] | None = None
    circuit_breaker: dict[str, Any] | None = None
    filters: dict[str, Any] | None = None
    redact: dict[str, Any] | None = None  # the global `redact` with this target's merged over it
    mirror_body: bool = True
    mirror_headers: bool = True
    protocol: str = "http1"
    grpc_methods: frozenset[str] | None = None  # None = every gRPC method
    config_key: str = ""  # where the target was written, e.g. "targets[2]", for messages


@dataclass(frozen=True, slots=True)
class Config:
    listen: ListenConfig = ListenConfig()
    admin: AdminConfig = AdminConfig()
    log: LogConfig = LogConfig()
    secrets: SecretsConfig = SecretsConfig()
    messages: tuple[str, ...] = ()  # empty = any message carrying a method and a path
    redact: dict[str, Any] | None = None
    truncated_body: str = "drop"
    drain_timeout: float = 5.0
    loop_header: str = "X-Spoa-Mirror"
    memory_budget: int = 64 * MiB
    mirroring_enabled: bool = True
    targets: tuple[TargetConfig, ...] = ()  # empty when mirroring is disabled, so nothing can mirror
    source: str | None = None  # the file loaded, if any
    outgoing: OutgoingConfig = NO_OUTGOING
    compare: CompareConfig | None = None  # None: no target's responses are compared

    @property
    def hmac_key(self) -> bytes | None:
        return self.secrets.hmac_key


def load_config(
    path: str | None, overrides: Mapping[str, Any] | None = None, env: Mapping[str, str] = os.environ
) -> Config:
    """Read, validate and freeze the configuration; `path=None` runs on defaults and overrides alone,
    as the C agent does with its flags."""
    data = {} if path is None else _read_yaml(path)
    return parse_config(data, overrides, env, source=path)


def parse_config(
    data: Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] = os.environ,
    *,
    source: str | None = None,
) -> Config:
    """Validate an already-loaded YAML document; a bad value raises ConfigError naming its key."""
    if not isinstance(data, Mapping):
        raise ConfigError(source or "config", f"must be a mapping at the top level, got {_show(data)}")
    data, overridden = _apply_overrides(data, overrides or {})
    try:
        config, spec_keys = _parse(data, env, source)
        _validate_stages(config, spec_keys)
    except ConfigError as error:
        for key in overridden:
            if error.key == key or error.key.startswith((f"{key}.", f"{key}[")):
                raise ConfigError(error.key, f"{error.problem} (set on the command line)") from None
        raise
    return config


def describe(config: Config) -> str:
    """What the agent would do with this config, for `spoa-mirror check-config`: the operator's
    last look before a reload, so it states behaviour rather than echoing keys. Header values and the
    HMAC key are never shown (added headers often carry credentials for the shadow)."""
    listen = config.listen
    lines = [f"Configuration {config.source or '(no file: defaults and command line)'} is valid."]
    workers = f"{listen.workers} worker process{'es' if listen.workers != 1 else ''}"
    lines.append(f"SPOP listener: {_join_host(listen.address)}:{listen.port}, {workers}")
    caps = ", ".join(sorted(listen.capabilities)) or "none"
    lines.append(
        f"  max frame {_fmt_size(listen.max_frame_size)}; capabilities: {caps}; "
        f"fragments in progress up to {_fmt_size(listen.reassembly_budget)} in all"
    )
    lines.append(
        f"  up to {listen.max_connections} connections, {listen.max_inflight} unanswered NOTIFYs each; "
        f"hello timeout {_fmt_duration(listen.hello_timeout)}, "
        f"idle timeout {_fmt_duration(listen.idle_timeout)}, "
        f"frame timeout {_fmt_duration(listen.frame_timeout)}"
    )
    peers = ", ".join(listen.allow_networks) if listen.allow_networks else "any address"
    lines.append(f"  accepts connections from: {peers}")
    if listen.tls is None:
        lines.append("  TLS: off")
    else:
        client = (
            f"client certificate required (CA {listen.tls.ca_file})"
            if listen.tls.ca_file
            else "no client certificate"
        )
        lines.append(f"  TLS: certificate {listen.tls.cert_file}, {client}")
    runtime = "until stopped" if listen.runtime == 0 else f"stops after {_fmt_duration(listen.runtime)}"
    lines.append(
        f"  runs {runtime}; on SIGTERM, drains queued mirrors for up to {_fmt_duration(config.drain_timeout)}"
    )
    lines.append(f"  holds at most {_fmt_size(config.memory_budget)} of mirror requests over all targets")
    if config.admin.enabled:
        port = config.admin.port
        every = "" if listen.workers == 1 else f" (the supervisor, for all {listen.workers} workers)"
        lines.append(f"Admin (metrics, health): http://{_join_host(config.admin.address)}:{port}{every}")
    else:
        lines.append("Admin (metrics, health): disabled")
    outgoing = config.outgoing
    if outgoing.source_ip is not None or outgoing.ports is not None:
        ports = "any port" if outgoing.ports is None else "ports {}-{}".format(*outgoing.ports)
        source = outgoing.source_ip or "the default address"
        via = f" ({outgoing.address})" if outgoing.address not in (None, outgoing.source_ip) else ""
        lines.append(f"Connections to shadows from {source}{via}, {ports}")
    lines.append(f"Logs: {config.log.format} format at level {config.log.level}")
    names = ", ".join(config.messages) if config.messages else "any message carrying a method and a path"
    lines.append(f"SPOE messages mirrored: {names}")
    lines.append(f"Loop protection: adds {config.loop_header} (a MAC); requests carrying it are not mirrored")
    if config.truncated_body == "drop":
        lines.append("Bodies truncated by HAProxy: not mirrored")
    else:
        lines.append(
            f"Bodies truncated by HAProxy: mirrored as received, marked {TRUNCATED_MARKER_HEADER}: true"
        )
    secrets = config.secrets
    if secrets.hmac_key_file:
        lines.append(f"HMAC key: read from file {secrets.hmac_key_file}")
    elif secrets.hmac_key_env:
        lines.append(f"HMAC key: read from environment variable {secrets.hmac_key_env}")
    else:
        lines.append("HMAC key: none")
    if config.redact is None:
        lines.append("Redaction for every target: the built-in defaults (credential headers masked)")
    else:
        lines.append(f"Redaction for every target: {_fmt_spec(config.redact)}")
    lines.extend(describe_compare(config.compare))
    if not config.mirroring_enabled:
        lines.append("Mirroring: DISABLED (mirroring.enabled: false); nothing is sent")
        return "\n".join(lines)
    lines.append(f"Targets ({len(config.targets)}):")
    for target in config.targets:
        lines.extend(_describe_target(target, config.redact))
    return "\n".join(lines)


def _describe_target(target: TargetConfig, global_redact: dict[str, Any] | None) -> list[str]:
    sampling = f"{target.sample_percentage:g}% of requests"
    if target.sample_key is not None:
        sampling += f", keyed by {_fmt_spec(target.sample_key)}"
    methods = ", ".join(sorted(target.methods)) if target.methods else "all methods"
    host = {
        "target": f"Host {target.authority}",
        "original": "the client's Host",
        "suffix": "the client's Host with -shadow appended",
    }[target.host_policy]
    headers = "client headers forwarded" if target.mirror_headers else "no client headers forwarded but Host"
    body = f"bodies up to {_fmt_size(target.max_body_size)}" if target.mirror_body else "bodies not sent"
    lines = [
        f"  {target.name} -> {target.url}",
        f"    mirrors {sampling}; {methods}; {body}",
        f"    timeout {_fmt_duration(target.timeout)} (connect {_fmt_duration(target.connect_timeout)}); "
        f"up to {target.concurrency} connections, {target.queue_size} queued",
        f"    holds at most {_fmt_size(target.memory_budget)} of requests; "
        f"drops what waited over {_fmt_duration(target.max_queue_age)} in the queue",
        f"    sends {host}; {headers}",
    ]
    if target.scheme == "https":
        verify = "certificate verified" if target.tls_verify else "certificate NOT verified"
        lines.append(f"    TLS: {verify}" + (f" against {target.ca_file}" if target.ca_file else ""))
    if target.protocol != "http1":
        lines.append(f"    protocol: {target.protocol}")
    if target.grpc_methods is not None:
        lines.append(f"    gRPC methods mirrored: {', '.join(sorted(target.grpc_methods))}")
    if target.headers:
        lines.append(f"    adds headers: {', '.join(target.headers)}")
    if target.remove_headers:
        lines.append(f"    removes headers: {', '.join(sorted(target.remove_headers))}")
    if target.path_rewrite is not None:
        rewrite = target.path_rewrite
        lines.append(f"    rewrites paths: {rewrite.pattern.pattern!r} -> {rewrite.replacement!r}")
    for label, spec in (
        ("filters", target.filters),
        ("rate limit", target.rate_limit),
        ("circuit breaker", target.circuit_breaker),
        ("redaction (merged with the global one)", None if target.redact is global_redact else target.redact),
    ):
        if spec is not None:
            lines.append(f"    {label}: {_fmt_spec(spec)}")
    return lines


def _read_yaml(path: str) -> Any:
    try:
        with open(path, "rb") as file:
            text = file.read()
    except OSError as error:
        raise ConfigError(path, f"cannot read the config file: {error.strerror or error}") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = path if mark is None else f"{path}:{mark.line + 1}:{mark.column + 1}"
        raise ConfigError(where, f"invalid YAML: {error.problem or error.context}") from None
    except yaml.YAMLError as error:
        raise ConfigError(path, f"invalid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(path, f"must contain a mapping at the top level, got {_show(data)}")
    return data


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: YAML silently keeps the last one, so a second
    `sample_percentage:` further down a target would quietly win."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[str, yaml.Mark] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if key_node.value in seen:
                first = seen[key_node.value].line + 1
                problem = f"duplicate key {key_node.value!r} (first on line {first})"
                raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
            seen[key_node.value] = key_node.start_mark
        return super().construct_mapping(node, deep)


def _apply_overrides(
    data: Mapping[str, Any], overrides: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """Write the overrides into a copy of the document, so they are validated like file values;
    returns the keys they set, to say so in an error."""
    merged = copy.deepcopy(dict(data))
    overridden: list[str] = []
    for name, value in overrides.items():
        if name not in OVERRIDE_KEYS:
            raise ConfigError(f"overrides.{name}", _unknown(name, OVERRIDE_KEYS))
        if value is None:
            continue
        if name == "mirror_urls":
            merged["targets"] = [{"url": url} for url in value]
            if isinstance(merged.get("mirroring"), dict):
                merged["mirroring"].pop("targets", None)
            overridden.append("targets")
            continue
        section, key = ("listen", name)
        for prefix in ("log_", "outgoing_"):
            if name.startswith(prefix):
                section, key = prefix[:-1], name[len(prefix) :]
        if merged.get(section) is None:
            merged[section] = {}
        if isinstance(merged[section], dict):
            merged[section][key] = value
            overridden.append(f"{section}.{key}")
    return merged, overridden


class _Block:
    """One YAML mapping being read: refuses unknown keys up front and hands out values with the
    key path to blame."""

    def __init__(self, data: object, key: str, known: Collection[str]) -> None:
        if data is None or data is _MISSING:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(key, f"must be a mapping, got {_show(data)}")
        for name in data:
            if not isinstance(name, str):
                raise ConfigError(key, f"keys must be strings, got {_show(name)}")
            if name not in known:
                raise ConfigError(self._path(key, name), _unknown(name, known))
        self.data: dict[str, Any] = data
        self.key = key

    @staticmethod
    def _path(key: str, name: str) -> str:
        return f"{key}.{name}" if key else name

    def path(self, name: str) -> str:
        return self._path(self.key, name)

    def get(self, name: str) -> Any:
        """The value, or _MISSING when absent or null (null takes the default)."""
        value = self.data.get(name)
        return _MISSING if value is None else value

    def read(self, name: str, default: Any, convert: Callable[[Any, str], Any]) -> Any:
        value = self.get(name)
        return default if value is _MISSING else convert(value, self.path(name))

    def entries(self) -> dict[str, tuple[Any, str]]:
        """name -> (value, key path) for every key this block sets (null sets nothing)."""
        found = ((name, self.get(name)) for name in self.data)
        return {name: (value, self.path(name)) for name, value in found if value is not _MISSING}


def _parse(
    data: dict[str, Any], env: Mapping[str, str], source: str | None
) -> tuple[Config, dict[tuple[str, str], str]]:
    top = _Block(data, "", _TOP_KEYS)
    listen = _parse_listen(top.get("listen"))
    admin = _parse_admin(top.get("admin"))
    _check_ports(listen, admin)
    log = _parse_log(top.get("log"))
    outgoing = _parse_outgoing(top.get("outgoing"))
    secrets = _parse_secrets(top.get("secrets"), env)
    if listen.tls is not None:  # the listener's private key is a secret file too
        key_file = listen.tls.key_file
        try:
            mode = os.stat(key_file).st_mode
        except OSError as error:
            raise ConfigError("listen.tls.key_file", f"cannot read {key_file}: {error.strerror}") from None
        opened = _open_to_others("listen.tls.key_file", key_file, mode, secrets.file_permissions)
        secrets = dataclasses.replace(secrets, readable_files=secrets.readable_files + opened)
    messages = top.read("messages", (), lambda v, k: tuple(_str_list(v, k)))
    global_redact = top.read("redact", None, _mapping)
    truncated_body = top.read("truncated_body", "drop", lambda v, k: _choice(v, k, TRUNCATED_BODY_POLICIES))
    drain_timeout = top.read("drain_timeout", 5.0, lambda v, k: parse_duration(v, k, allow_zero=True))
    loop_header = top.read("loop_header", "X-Spoa-Mirror", _header_name)
    memory_budget = top.read("memory_budget", Config().memory_budget, _budget)

    mirroring = _Block(top.get("mirroring"), "mirroring", _MIRRORING_KEYS)
    enabled = mirroring.read("enabled", True, _bool)
    inherited: dict[str, tuple[Any, str]] = {}
    raw_defaults = top.get("defaults")
    for name in ("name", "url", "upstream"):
        if isinstance(raw_defaults, dict) and name in raw_defaults:
            raise ConfigError(f"defaults.{name}", "cannot have a default; set it on each target")
    defaults = _Block(raw_defaults, "defaults", _DEFAULTS_KEYS)
    inherited.update(defaults.entries())
    mirroring_set = mirroring.entries()
    for gal_key, key in (("mirror_request_body", "mirror_body"), ("mirror_headers", "mirror_headers")):
        if gal_key in mirroring_set:
            inherited[key] = mirroring_set[gal_key]

    if top.get("targets") is not _MISSING and mirroring.get("targets") is not _MISSING:
        raise ConfigError("mirroring.targets", "targets are also listed at the top level; keep one list")
    targets_key = "mirroring.targets" if mirroring.get("targets") is not _MISSING else "targets"
    raw_targets = mirroring.get("targets") if targets_key == "mirroring.targets" else top.get("targets")
    if raw_targets is _MISSING:
        raw_targets = []
    if not isinstance(raw_targets, list):
        raise ConfigError(targets_key, f"must be a list of targets, got {_show(raw_targets)}")
    if not raw_targets and enabled:
        raise ConfigError(
            targets_key,
            "at least one target is required (or pass --mirror-url, or set mirroring.enabled: false)",
        )

    spec_keys: dict[tuple[str, str], str] = {}
    targets: list[TargetConfig] = []
    named: dict[str, str] = {}
    for index, raw in enumerate(raw_targets):
        key = f"{targets_key}[{index}]"
        target = _parse_target(raw, key, inherited, global_redact, spec_keys)
        if target.name in named:
            raise ConfigError(
                f"{key}.name",
                f"duplicate target name {target.name!r} (also {named[target.name]}); "
                "give each target a distinct name",
            )
        named[target.name] = key
        targets.append(target)
    compare = parse_compare(top.read("compare", None, lambda v, k: v), tuple(named))
    if compare is not None and listen.workers > 1:
        # HAProxy may send a request's two messages on different connections, which the kernel
        # spreads over the worker processes, each with a pairing table of its own.
        raise ConfigError("compare", f"needs listen.workers: 1 (got {listen.workers}): one process pairs")
    for target in targets if compare is not None else ():
        if target.name in compare.compared and target.protocol != "http1":  # type: ignore[union-attr]
            raise ConfigError(
                f"{target.config_key}.protocol",
                f"is {target.protocol}: only http1 targets are compared (compare names {target.name!r})",
            )

    config = Config(
        listen=listen,
        admin=admin,
        log=log,
        secrets=secrets,
        messages=messages,
        redact=global_redact,
        truncated_body=truncated_body,
        drain_timeout=drain_timeout,
        loop_header=loop_header,
        memory_budget=memory_budget,
        mirroring_enabled=enabled,
        targets=tuple(targets) if enabled else (),
        source=source,
        outgoing=outgoing,
        compare=compare,
    )
    return config, spec_keys


def _parse_listen(data: object) -> ListenConfig:
    block = _Block(data, "listen", _LISTEN_KEYS)
    default = ListenConfig()
    return ListenConfig(
        address=block.read("address", default.address, _address),
        port=block.read("port", default.port, _port),
        max_frame_size=block.read("max_frame_size", default.max_frame_size, _frame_size),
        capabilities=block.read("capabilities", default.capabilities, _capabilities),
        workers=block.read("workers", default.workers, lambda v, k: _int(v, k, 1, 1024)),
        runtime=block.read("runtime", default.runtime, lambda v, k: parse_duration(v, k, allow_zero=True)),
        max_connections=block.read(
            "max_connections", default.max_connections, lambda v, k: _int(v, k, 1, 1_000_000)
        ),
        hello_timeout=block.read("hello_timeout", default.hello_timeout, parse_duration),
        idle_timeout=block.read("idle_timeout", default.idle_timeout, parse_duration),
        max_inflight=block.read("max_inflight", default.max_inflight, lambda v, k: _int(v, k, 1, 1_000_000)),
        allow_networks=block.read("allow_networks", default.allow_networks, _networks),
        tls=block.read("tls", None, _listen_tls),
        backlog=block.read("backlog", default.backlog, lambda v, k: _int(v, k, 1, 65535)),
        processing_delay=block.read(
            "processing_delay", default.processing_delay, lambda v, k: _duration_in(v, k, 0.0, 1.0)
        ),
        monitor_interval=block.read(
            "monitor_interval", default.monitor_interval, lambda v, k: _duration_in(v, k, 1.0, 3600.0)
        ),
        worker_restarts=block.read(
            "worker_restarts", default.worker_restarts, lambda v, k: _int(v, k, 0, 1000)
        ),
        frame_timeout=block.read("frame_timeout", default.frame_timeout, parse_duration),
        reassembly_budget=block.read("reassembly_budget", default.reassembly_budget, parse_size),
    )


def _duration_in(value: object, key: str, low: float, high: float) -> float:
    seconds = parse_duration(value, key, allow_zero=True)
    if not low <= seconds <= high:
        raise ConfigError(key, f"must be between {low:g} and {high:g} seconds, got {_show(value)}")
    return seconds


def _parse_outgoing(data: object) -> OutgoingConfig:
    block = _Block(data, "outgoing", ("address", "ports"))
    address = block.read("address", None, _string)
    return OutgoingConfig(
        address=address,
        source_ip=None if address is None else _source_ip(address, block.path("address")),
        ports=block.read("ports", None, _port_range),
    )


def _source_ip(address: str, key: str) -> str:
    """An IP address as it is, or the IPv4 address of the interface of that name (curl's
    CURLOPT_INTERFACE, which the C agent's -I sets, takes either)."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        pass
    if address not in {name for _index, name in socket.if_nameindex()}:
        raise ConfigError(key, f"must be an IP address or a network interface name, got {address!r}")
    request = struct.pack("256s", address.encode()[:15])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            answer = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, request)
        except OSError as error:
            raise ConfigError(key, f"interface {address} has no IPv4 address ({error.strerror})") from None
    return socket.inet_ntoa(answer[20:24])


def _port_range(value: object, key: str) -> tuple[int, int]:
    """A port, or "LOW-HIGH", as the C agent's -P takes it."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else _string(value, key)
    match = re.fullmatch(r"\s*(\d{1,5})\s*(?:-\s*(\d{1,5})\s*)?", text)
    low = int(match[1]) if match else 0
    high = int(match[2]) if match and match[2] else low
    if match is None or not 1 <= low <= high <= 65535:
        raise ConfigError(key, f'must be a port or a range "LOW-HIGH" within 1-65535, got {_show(value)}')
    return low, high


def _parse_admin(data: object) -> AdminConfig:
    block = _Block(data, "admin", ("enabled", "address", "port"))
    default = AdminConfig()
    return AdminConfig(
        enabled=block.read("enabled", default.enabled, _bool),
        address=block.read("address", default.address, _address),
        port=block.read("port", default.port, _port),
    )


def _check_ports(listen: ListenConfig, admin: AdminConfig) -> None:
    """Catch the admin and SPOP listeners wanting the same port now rather than as an EADDRINUSE at
    start."""
    if not admin.enabled or admin.port == 0:
        return
    wildcard = ("0.0.0.0", "::")
    same_host = listen.address == admin.address or listen.address in wildcard or admin.address in wildcard
    if same_host and admin.port == listen.port:
        raise ConfigError("admin.port", f"is listen.port {listen.port} too; give the admin listener its own")


def _parse_log(data: object) -> LogConfig:
    block = _Block(data, "log", ("format", "level"))
    return LogConfig(
        format=block.read("format", "auto", lambda v, k: _choice(v, k, LOG_FORMATS)),
        level=block.read(
            "level", "info", lambda v, k: _choice(v.lower() if isinstance(v, str) else v, k, LOG_LEVELS)
        ),
    )


HMAC_CREDENTIAL = "hmac.key"  # the credential name: LoadCredential=hmac.key:/etc/spoa-mirror/hmac.key


def _parse_secrets(data: object, env: Mapping[str, str]) -> SecretsConfig:
    if isinstance(data, dict) and "hmac_key" in data:
        raise ConfigError(
            "secrets.hmac_key",
            "secrets are never read from the config file; put the key in a file (hmac_key_file) "
            "or an environment variable (hmac_key_env)",
        )
    block = _Block(data, "secrets", ("hmac_key_file", "hmac_key_env", "file_permissions"))
    key_file = block.read("hmac_key_file", None, _string)
    key_env = block.read("hmac_key_env", None, _string)
    permissions = block.read("file_permissions", "warn", lambda v, k: _choice(v, k, ("warn", "refuse")))
    readable: tuple[tuple[str, str, str], ...] = ()
    if key_file is not None and key_env is not None:
        raise ConfigError("secrets", "set hmac_key_file or hmac_key_env, not both")
    if key_file is None and key_env is None and env.get("CREDENTIALS_DIRECTORY"):
        credential = os.path.join(env["CREDENTIALS_DIRECTORY"], HMAC_CREDENTIAL)
        key_file = credential if os.path.exists(credential) else None
    if key_file is not None:
        try:
            with open(key_file, "rb") as file:
                mode = os.fstat(file.fileno()).st_mode
                key = file.read().rstrip(b"\r\n")
        except OSError as error:
            raise ConfigError(
                "secrets.hmac_key_file", f"cannot read {key_file}: {error.strerror or error}"
            ) from None
        source = "secrets.hmac_key_file"
        readable = _open_to_others(source, key_file, mode, permissions)
    elif key_env is not None:
        if key_env not in env:
            raise ConfigError("secrets.hmac_key_env", f"environment variable {key_env} is not set")
        key = env[key_env].encode()
        source = "secrets.hmac_key_env"
    else:
        return SecretsConfig(file_permissions=permissions)
    if len(key) < MIN_HMAC_KEY_BYTES:
        raise ConfigError(source, f"the HMAC key must be at least {MIN_HMAC_KEY_BYTES} bytes long")
    return SecretsConfig(
        hmac_key_file=key_file,
        hmac_key_env=key_env,
        hmac_key=key,
        file_permissions=permissions,
        readable_files=readable,
    )


def _open_to_others(key: str, path: str, mode: int, permissions: str) -> tuple[tuple[str, str, str], ...]:
    """A secret file its group or others may read or write: a config error with
    `secrets.file_permissions: refuse`, else the (key, path, mode) the agent warns about."""
    if not mode & 0o077:
        return ()
    shown = oct(mode & 0o777)[2:].zfill(4)
    if permissions == "refuse":
        raise ConfigError(
            key,
            f"{path} is open to its group or others (mode {shown}); chmod 600 it, "
            "or set secrets.file_permissions: warn",
        )
    return ((key, path, shown),)


def _parse_target(
    raw: object,
    key: str,
    inherited: Mapping[str, tuple[Any, str]],
    global_redact: dict[str, Any] | None,
    spec_keys: dict[tuple[str, str], str],
) -> TargetConfig:
    block = _Block(raw, key, _TARGET_KEYS)
    entries = {**inherited, **block.entries()}

    def read(name: str, default: Any, convert: Callable[[Any, str], Any]) -> Any:
        if name not in entries:
            return default
        value, path = entries[name]
        return convert(value, path)

    if "url" in entries and "upstream" in entries:
        raise ConfigError(f"{key}.upstream", "give url or upstream, not both")
    if "url" in entries:
        url = read("url", None, _string)
        scheme, host, port, base_path = _parse_url(url, f"{key}.url")
    elif "upstream" in entries:
        url, host, port = read("upstream", None, _upstream)
        scheme, base_path = "http", ""
    else:
        raise ConfigError(key, "needs a url (or an upstream with host and port)")
    default_port = 443 if scheme == "https" else 80
    authority = _join_host(host) if port == default_port else f"{_join_host(host)}:{port}"

    for name in _SPEC_KEYS:
        if name in entries:
            spec_keys[(key, name)] = entries[name][1]
    target_redact = read("redact", None, _mapping)
    if target_redact is None:
        redact = global_redact
    else:
        from .redact import merge_redaction

        redact = merge_redaction(global_redact, target_redact)

    default = TargetConfig(name="", url="", scheme="", host="", port=0, base_path="", authority="")
    return TargetConfig(
        name=read("name", f"{_join_host(host)}:{port}", _target_name),
        url=url,
        scheme=scheme,
        host=host,
        port=port,
        base_path=base_path,
        authority=authority,
        sample_percentage=read("sample_percentage", default.sample_percentage, _percentage),
        sample_key=read("sample_key", None, _mapping),
        timeout=read("timeout", default.timeout, parse_duration),
        connect_timeout=read("connect_timeout", default.connect_timeout, parse_duration),
        headers=read("headers", {}, _added_headers),
        remove_headers=read("remove_headers", frozenset(), _header_set),
        host_policy=read("host", default.host_policy, lambda v, k: _choice(v, k, HOST_POLICIES)),
        path_rewrite=read("path_rewrite", None, _path_rewrite),
        methods=read("methods", None, _methods),
        max_body_size=read("max_body_size", default.max_body_size, parse_size),
        tls_verify=read("tls_verify", default.tls_verify, _bool),
        ca_file=read("ca_file", None, _existing_file),
        concurrency=read("concurrency", default.concurrency, lambda v, k: _int(v, k, 1, 100_000)),
        queue_size=read("queue_size", default.queue_size, lambda v, k: _int(v, k, 1, 10_000_000)),
        memory_budget=read("memory_budget", default.memory_budget, _budget),
        max_queue_age=read("max_queue_age", default.max_queue_age, parse_duration),
        rate_limit=read("rate_limit", None, _mapping),
        circuit_breaker=read("circuit_breaker", None, _mapping),
        filters=read("filters", None, _mapping),
        redact=redact,
        mirror_body=read("mirror_body", default.mirror_body, _bool),
        mirror_headers=read("mirror_headers", default.mirror_headers, _bool),
        protocol=_protocol(
            read("protocol", default.protocol, lambda v, k: _choice(v, k, PROTOCOLS)), scheme, key
        ),
        grpc_methods=read("grpc_methods", None, _grpc_methods),
        config_key=key,
    )


def _protocol(protocol: str, scheme: str, key: str) -> str:
    if protocol == "h2" and scheme != "https":
        raise ConfigError(f"{key}.protocol", "h2 needs an https URL; use h2c for HTTP/2 without TLS")
    if protocol == "h2c" and scheme != "http":
        raise ConfigError(f"{key}.protocol", "h2c needs an http URL; use h2 for HTTP/2 over TLS")
    return protocol


def _grpc_methods(value: object, key: str) -> frozenset[str]:
    methods = _str_list(value, key)
    if not methods:
        raise ConfigError(key, "must list at least one method (leave it out to mirror every gRPC method)")
    for index, method in enumerate(methods):
        if not _GRPC_METHOD.fullmatch(method):
            raise ConfigError(
                f"{key}[{index}]", f"must be /package.Service/Method or /package.Service/*, got {method!r}"
            )
    return frozenset(methods)


def _validate_stages(config: Config, spec_keys: Mapping[tuple[str, str], str]) -> None:
    """Build every sampler, filter, redactor, rate limiter and circuit breaker the config asks for,
    and throw them away: their modules own the sub-spec formats, and building them here makes a bad
    sub-block fail at load (and a bad reload keep the old config) instead of at first use. Imported
    lazily so loading a config that uses none of them does not depend on them; a spec inherited from
    `defaults` is blamed on its `defaults.` key."""
    if config.redact is not None:
        from .redact import build_redactor

        build_redactor(config.redact, "redact", config.hmac_key, _ignore_redaction)
    for target in config.targets:
        key = target.config_key

        def where(name: str, target_key: str = key) -> str:
            return spec_keys.get((target_key, name), f"{target_key}.{name}")

        if target.sample_key is not None:
            from .sampling import build_sampler

            sample_key = where("sample_key")
            try:
                build_sampler(target.sample_percentage, target.sample_key, sample_key)
            except ConfigError as error:
                # The sampler names its keys `<where>.key...`; ours is `sample_key` itself.
                prefix = f"{sample_key}.key"
                blamed = sample_key + error.key[len(prefix) :] if error.key.startswith(prefix) else error.key
                raise ConfigError(blamed, error.problem) from None
        if target.filters is not None:
            from .filters import build_filter

            build_filter(target.filters, where("filters"))
        if target.redact is not None and target.redact is not config.redact:
            from .redact import build_redactor

            build_redactor(target.redact, where("redact"), config.hmac_key, _ignore_redaction)
        if target.rate_limit is not None:
            from .limits import build_rate_limiter

            build_rate_limiter(target.rate_limit, where("rate_limit"))
        if target.circuit_breaker is not None:
            from .limits import build_circuit_breaker

            build_circuit_breaker(target.circuit_breaker, where("circuit_breaker"))
        if target.scheme == "https" and target.ca_file is not None:
            try:
                ssl.create_default_context(cafile=target.ca_file)
            except (ssl.SSLError, OSError, ValueError) as error:
                raise ConfigError(
                    where("ca_file"), f"cannot load CA certificates from {target.ca_file}: {error}"
                ) from None


def _ignore_redaction(*_: object) -> None:
    """Redactors built only to validate never redact anything."""


def _parse_url(url: str, key: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, base path), parsed here once so the pipeline connects without parsing."""
    if any(ch <= " " or ch == "\x7f" for ch in url):
        raise ConfigError(key, f"must not contain spaces or control characters, got {url!r}")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ConfigError(key, f"is not a valid URL, got {url!r}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(key, f"must be an http:// or https:// URL, got {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            key, "must not contain credentials (user:password@); add a header under headers instead"
        )
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ConfigError(key, f"must not have a query string or fragment, got {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(key, f"has an invalid port, got {url!r}") from None
    host = parts.hostname or ""
    bracketed = parts.netloc.rpartition("@")[2].startswith("[")
    _check_host(host, key, ipv6=bracketed)
    if port == 0:
        raise ConfigError(key, f"has an invalid port, got {url!r}")
    return scheme, host, port or (443 if scheme == "https" else 80), parts.path.rstrip("/")


def _check_host(host: str, key: str, *, ipv6: bool) -> None:
    if ipv6:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(key, f"has an invalid IPv6 address, got {host!r}") from None
    elif not _HOSTNAME.fullmatch(host):
        raise ConfigError(
            key, f"has an invalid host name {host!r} (international names go in their xn-- form)"
        )


def _upstream(value: object, key: str) -> tuple[str, str, int]:
    """GAL's `upstream: {host, port}`, as the URL it stands for."""
    block = _Block(value, key, ("host", "port"))
    host = block.get("host")
    port = block.get("port")
    if host is _MISSING or port is _MISSING:
        raise ConfigError(key, "needs both host and port")
    host = _string(host, block.path("host")).strip("[]").lower()
    _check_host(host, block.path("host"), ipv6=":" in host)
    port = _int(port, block.path("port"), 1, 65535)
    return f"http://{_join_host(host)}:{port}", host, port


def _join_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _string(value: object, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"must be a non-empty string, got {_show(value)}")
    return value


def _bool(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, got {_show(value)}")
    return value


def _int(value: object, key: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(key, f"must be an integer, got {_show(value)}")
    if not low <= value <= high:
        raise ConfigError(key, f"must be between {low} and {high}, got {value}")
    return value


def _port(value: object, key: str) -> int:
    return _int(value, key, 0, 65535)


def _percentage(value: object, key: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(key, f"must be a number from 0 to 100, got {_show(value)}")
    if not 0 <= value <= 100:
        raise ConfigError(key, f"must be between 0 and 100, got {_show(value)}")
    return float(value)


def _frame_size(value: object, key: str) -> int:
    size = parse_size(value, key)
    if not MIN_FRAME_SIZE <= size <= MAX_FRAME_SIZE:
        raise ConfigError(
            key, f"must be between {MIN_FRAME_SIZE} and {MAX_FRAME_SIZE} bytes, got {_show(value)}"
        )
    return size


def _choice(value: object, key: str, choices: Collection[str]) -> str:
    if value not in choices:
        raise ConfigError(key, f"must be one of {', '.join(choices)}, got {_show(value)}")
    return value  # type: ignore[return-value]


def _mapping(value: object, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(key, f"must be a mapping, got {_show(value)}")
    return value


def _str_list(value: object, key: str) -> list[str]:
    if not isinstance(value, list):
        raise ConfigError(key, f"must be a list, got {_show(value)}")
    return [_string(item, f"{key}[{index}]") for index, item in enumerate(value)]


def _address(value: object, key: str) -> str:
    address = _string(value, key)
    try:
        ipaddress.ip_address(address)
    except ValueError:
        if not _HOSTNAME.fullmatch(address):
            raise ConfigError(key, f"must be an IP address or a host name, got {address!r}") from None
    return address


def _capabilities(value: object, key: str) -> frozenset[str]:
    names = _str_list(value, key)
    for index, name in enumerate(names):
        if name not in CAPABILITIES:
            raise ConfigError(
                f"{key}[{index}]", f"must be one of {', '.join(sorted(CAPABILITIES))}, got {name!r}"
            )
    return frozenset(names)


def _networks(value: object, key: str) -> tuple[str, ...]:
    networks = []
    for index, text in enumerate(_str_list(value, key)):
        try:
            networks.append(str(ipaddress.ip_network(text, strict=False)))
        except ValueError:
            raise ConfigError(
                f"{key}[{index}]", f"must be an IP network such as 10.0.0.0/8, got {text!r}"
            ) from None
    return tuple(networks)


def _budget(value: object, key: str) -> int:
    size = parse_size(value, key)
    if size < 64 * KiB:
        raise ConfigError(key, f"must be at least 64KiB, got {_show(value)}")
    return size


def _existing_file(value: object, key: str) -> str:
    path = _string(value, key)
    if not os.path.isfile(path):
        raise ConfigError(key, f"file not found: {path}")
    return path


def _listen_tls(value: object, key: str) -> TlsConfig:
    block = _Block(value, key, ("cert_file", "key_file", "ca_file"))
    if block.get("cert_file") is _MISSING or block.get("key_file") is _MISSING:
        raise ConfigError(key, "needs both cert_file and key_file")
    return TlsConfig(
        cert_file=block.read("cert_file", None, _existing_file),
        key_file=block.read("key_file", None, _existing_file),
        ca_file=block.read("ca_file", None, _existing_file),
    )


def _header_name(value: object, key: str) -> str:
    name = _string(value, key)
    if not _TOKEN.fullmatch(name):
        raise ConfigError(key, f"must be a valid header name, got {name!r}")
    return name


def _header_set(value: object, key: str) -> frozenset[str]:
    return frozenset(
        _header_name(name, f"{key}[{index}]").lower() for index, name in enumerate(_str_list(value, key))
    )


def _added_headers(value: object, key: str) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, header_value in _mapping(value, key).items():
        path = f"{key}.{name}"
        _header_name(name, path)
        if name.lower() in AGENT_HEADERS:
            hint = "; use the target's host key" if name.lower() == "host" else ""
            raise ConfigError(path, f"is set by the agent and cannot be added{hint}")
        if not isinstance(header_value, str):
            raise ConfigError(path, f"must be a string (quote it in YAML), got {_show(header_value)}")
        if any(ch in header_value for ch in "\r\n\0"):
            raise ConfigError(path, "must not contain CR, LF or NUL")
        headers[name] = header_value
    return headers


def _methods(value: object, key: str) -> frozenset[str]:
    methods = _str_list(value, key)
    if not methods:
        raise ConfigError(key, "must list at least one method (leave it out to mirror every method)")
    for index, method in enumerate(methods):
        if not _TOKEN.fullmatch(method):
            raise ConfigError(f"{key}[{index}]", f"must be an HTTP method, got {method!r}")
    return frozenset(method.upper() for method in methods)


def _path_rewrite(value: object, key: str) -> PathRewrite:
    block = _Block(value, key, ("regex", "replacement"))
    if block.get("regex") is _MISSING or "replacement" not in block.data:
        raise ConfigError(key, "needs both regex and replacement")
    regex = _string(block.get("regex"), block.path("regex"))
    replacement = block.data["replacement"]
    if not isinstance(replacement, str):
        raise ConfigError(block.path("replacement"), f"must be a string, got {_show(replacement)}")
    try:
        pattern = re.compile(regex)
    except re.error as error:
        raise ConfigError(block.path("regex"), f"invalid regular expression: {error}") from None
    # Expand the replacement against an empty match with the same groups, so a reference to a
    # group that does not exist fails now rather than on the first matching request.
    names = {index: name for name, index in pattern.groupindex.items()}
    groups = "".join(f"(?P<{names[i]}>)" if i in names else "()" for i in range(1, pattern.groups + 1))
    try:
        re.compile(groups).match("").expand(replacement)  # type: ignore[union-attr]
    except (re.error, IndexError) as error:
        raise ConfigError(block.path("replacement"), f"invalid replacement: {error}") from None
    return PathRewrite(pattern, replacement)


def _target_name(value: object, key: str) -> str:
    name = _string(value, key)
    if not _NAME.fullmatch(name):
        raise ConfigError(key, f"must be 1 to 128 printable characters without spaces, got {name!r}")
    return name


def _unknown(name: str, known: Collection[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return (
        f"unknown key (did you mean {close[0]}?)"
        if close
        else f"unknown key (expected one of {', '.join(known)})"
    )


def _show(value: object) -> str:
    """A value as the operator wrote it in YAML, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, int | float):
        return f"{value:g}" if isinstance(value, float) else str(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _fmt_duration(seconds: float) -> str:
    if 0 < seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


def _fmt_size(size: int) -> str:
    for unit, factor in (("GiB", 1024 * MiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} bytes"


def _fmt_spec(spec: Mapping[str, Any]) -> str:
    return json.dumps(spec, sort_keys=True, default=str)

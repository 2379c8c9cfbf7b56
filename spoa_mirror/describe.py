"""`spoa-mirror check-config`'s account of a loaded configuration: what the agent would do with it,
in plain words, the operator's last look before a reload."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .capture.settings import describe_capture
from .compare.config import describe_compare
from .config_types import format_duration, format_size
from .targets import join_host

if TYPE_CHECKING:
    from .config import Config
    from .targets import TargetConfig

TRUNCATED_MARKER_HEADER = "X-Mirror-Truncated"


def describe(config: Config) -> str:
    """What the agent would do with this config, for `spoa-mirror check-config`: the operator's
    last look before a reload, so it states behaviour rather than echoing keys. Header values and the
    HMAC key are never shown (added headers often carry credentials for the shadow)."""
    listen = config.listen
    lines = [f"Configuration {config.source or '(no file: defaults and command line)'} is valid."]
    workers = f"{listen.workers} worker process{'es' if listen.workers != 1 else ''}"
    lines.append(f"SPOP listener: {join_host(listen.address)}:{listen.port}, {workers}")
    caps = ", ".join(sorted(listen.capabilities)) or "none"
    lines.append(
        f"  max frame {format_size(listen.max_frame_size)}; capabilities: {caps}; "
        f"fragments in progress up to {format_size(listen.reassembly_budget)} in all"
    )
    lines.append(
        f"  up to {listen.max_connections} connections, {listen.max_inflight} unanswered NOTIFYs each; "
        f"hello timeout {format_duration(listen.hello_timeout)}, "
        f"idle timeout {format_duration(listen.idle_timeout)}, "
        f"frame timeout {format_duration(listen.frame_timeout)}"
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
    runtime = "until stopped" if listen.runtime == 0 else f"stops after {format_duration(listen.runtime)}"
    drain = format_duration(config.drain_timeout)
    lines.append(f"  runs {runtime}; on SIGTERM, drains queued mirrors for up to {drain}")
    lines.append(f"  holds at most {format_size(config.memory_budget)} of mirror requests over all targets")
    if config.admin.enabled:
        port = config.admin.port
        every = "" if listen.workers == 1 else f" (the supervisor, for all {listen.workers} workers)"
        lines.append(f"Admin (metrics, health): http://{join_host(config.admin.address)}:{port}{every}")
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
    if target.capture is not None:
        return describe_capture(target)
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
    body = f"bodies up to {format_size(target.max_body_size)}" if target.mirror_body else "bodies not sent"
    lines = [
        f"  {target.name} -> {target.url}",
        f"    mirrors {sampling}; {methods}; {body}",
        f"    timeout {format_duration(target.timeout)} (connect {format_duration(target.connect_timeout)}); "
        f"up to {target.concurrency} connections, {target.queue_size} queued",
        f"    holds at most {format_size(target.memory_budget)} of requests; "
        f"drops what waited over {format_duration(target.max_queue_age)} in the queue",
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


def _fmt_spec(spec: Mapping[str, Any]) -> str:
    return json.dumps(spec, sort_keys=True, default=str)

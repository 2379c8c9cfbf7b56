"""The listening sockets, bound before anything else starts, so a port in use is one line naming the
setting and exit status 2, before the process daemonizes or forks.

With `-n` workers, the supervisor binds one SO_REUSEPORT socket per worker (the kernel spreads
HAProxy's connections over them) and hands each to its worker. SO_REUSEPORT alone would let any
process of the same user join the group and silently take a share of HAProxy's connections: another
spoa-mirror started on the same port by mistake, an old instance not yet stopped. So every socket is
bound, then checked against the kernel's table of listening sockets (/proc/net/tcp, /proc/net/tcp6:
this network namespace, every user), and only then listens: a port on which anything else already
listens is refused, before our socket could ever be handed a connection. Whichever instance starts
second fails; the first is never joined by a spoa-mirror. A process that sets SO_REUSEPORT itself
after we started is not seen (the kernel gives no way to close a group).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import Field, PlainValidator, WithJsonSchema

from spoe.connection import CAPABILITIES
from spoe.frames import MIN_FRAME_SIZE

from .config_types import (
    Address,
    Duration,
    DurationOrZero,
    ExistingFile,
    MiB,
    Port,
    Section,
    Size,
    bounded_duration,
    bounded_size,
    int_between,
    problem,
    show,
)
from .errors import StartupError

_LISTEN_STATE = "0A"  # include/net/tcp_states.h: TCP_LISTEN
_PROC_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")


def bind_listener(
    address: str,
    port: int,
    *,
    key: str,
    backlog: int,
    reuse_port: bool = False,
    own_inodes: Iterable[int] = (),
) -> socket.socket:
    """A listening TCP socket on `address:port` (its first address if a name resolves to several).
    `key` names the setting in errors; `own_inodes` are our other sockets in the same SO_REUSEPORT
    group, the only listeners allowed on the port."""
    where = f"{_join(address)}:{port}"
    try:
        family, kind, proto, _name, sockaddr = socket.getaddrinfo(
            address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        raise StartupError(key, f"cannot resolve {address!r}: {error.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind(sockaddr)
        except OSError as error:
            raise StartupError(key, _bind_problem(where, error)) from None
        if reuse_port:
            host, bound_port = sock.getsockname()[:2]
            others = foreign_listeners(host, bound_port, {*own_inodes, os.fstat(sock.fileno()).st_ino})
            if others:
                raise StartupError(
                    key,
                    f"{_join(host)}:{bound_port} is already in use by another process "
                    f"(a listening socket with SO_REUSEPORT, inode {others[0]}); "
                    "only this agent's own workers may share the port",
                )
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def foreign_listeners(host: str, port: int, own_inodes: set[int]) -> list[int]:
    """Inodes of the sockets listening on `port` at `host` (or a wildcard address, or `host` being
    one) that are not ours; empty where /proc is not mounted."""
    wanted = ipaddress.ip_address(host.split("%", 1)[0])
    found = []
    for table in _PROC_TABLES:
        try:
            with open(table) as lines:
                next(lines)  # the header
                rows = [line.split() for line in lines]
        except OSError:
            continue
        for row in rows:
            local, state, node = row[1], row[3], int(row[9])
            if state != _LISTEN_STATE or node in own_inodes:
                continue
            hex_address, hex_port = local.split(":")
            if int(hex_port, 16) != port:
                continue
            address = _proc_address(hex_address)
            if address == wanted or address.is_unspecified or wanted.is_unspecified:
                found.append(node)
    return found


def _proc_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """/proc/net/tcp's hex address: 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(text)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(words)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _bind_problem(where: str, error: OSError) -> str:
    if error.errno == errno.EADDRINUSE:
        return f"{where} is already in use"
    if error.errno == errno.EACCES:
        return f"{where}: permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)"
    if error.errno == errno.EADDRNOTAVAIL:
        return f"{where}: no such address on this host"
    return f"cannot listen on {where}: {error.strerror or error}"


def _join(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _capability(value: object) -> str:
    if value not in CAPABILITIES:
        raise problem(f"must be one of {', '.join(sorted(CAPABILITIES))}, got {show(value)}")
    return value  # type: ignore[return-value]


def _network(value: object) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=False))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise problem(f"must be an IP network such as 10.0.0.0/8, got {show(value)}") from None


Capability = Annotated[str, PlainValidator(_capability), WithJsonSchema({"enum": sorted(CAPABILITIES)})]
Network = Annotated[str, PlainValidator(_network), WithJsonSchema({"type": "string", "format": "ip-network"})]


class TlsConfig(Section):
    """SPOP over TLS (HAProxy: `server ... ssl ca-file ... crt ...`)."""

    cert_file: ExistingFile = Field(description="the agent's certificate (PEM)")
    key_file: ExistingFile = Field(
        description="its private key (PEM); a secret file, see secrets.file_permissions"
    )
    ca_file: ExistingFile | None = Field(
        None, description="when set, HAProxy must present a client certificate signed by this CA"
    )

    @classmethod
    def prepare(cls, data: dict[str, Any]) -> dict[str, Any]:
        if data.get("cert_file") is None or data.get("key_file") is None:
            raise problem("needs both cert_file and key_file")
        return data


class ListenConfig(Section):
    """The SPOP listener HAProxy's `filter spoe` connects to."""

    address: Address = Field(
        "127.0.0.1",
        description="address the SPOP listener binds; loopback by default, unlike the C agent's 0.0.0.0: "
        "exposing the agent is a decision",
    )
    port: Port = Field(12345, description="SPOP port; 0 picks a free one")
    max_frame_size: bounded_size(minimum=MIN_FRAME_SIZE, maximum=16 * MiB) = Field(
        16384, description="largest SPOP frame announced in AGENT-HELLO; match HAProxy's tune.bufsize"
    )
    capabilities: frozenset[Capability] = Field(
        CAPABILITIES, description="SPOP capabilities announced in AGENT-HELLO, a subset of the three"
    )
    workers: int_between(1, 1024) = Field(
        1,
        description="worker processes, each with its own SO_REUSEPORT socket bound by the supervisor, "
        "which serves admin for all of them",
    )
    runtime: DurationOrZero = Field(0.0, description="stop after this long; 0 runs until signalled")
    max_connections: int_between(1, 1_000_000) = Field(
        1000,
        description="SPOP connections open at once; at the limit a new connection takes the slot of the "
        "one longest without a HELLO or NOTIFY (if over 1 s and nothing unanswered), else it is refused",
    )
    hello_timeout: Duration = Field(5.0, description="time a new connection has to send HAPROXY-HELLO")
    idle_timeout: Duration = Field(60.0, description="an SPOP connection silent this long is closed")
    max_inflight: int_between(1, 1_000_000) = Field(
        256, description="NOTIFY frames one connection may have unanswered before reading pauses"
    )
    allow_networks: tuple[Network, ...] = Field(
        (), description="CIDRs allowed to connect, e.g. [10.0.0.0/8, '::1/128']; empty allows any peer"
    )
    tls: TlsConfig | None = Field(None, description="serve SPOP over TLS")
    backlog: int_between(1, 65535) = Field(
        1024, description="the SPOP listen backlog (the C agent's -b; its default is 10)"
    )
    processing_delay: bounded_duration(low=0.0, high=1.0) = Field(
        0.0, description="wait this long before handling each NOTIFY, up to 1 s (the C agent's -t)"
    )
    monitor_interval: bounded_duration(low=1.0, high=3600.0) = Field(
        5.0,
        description="how often each worker logs agent.monitor at debug level, 1 s to 1 h (the C agent's -i)",
    )
    worker_restarts: int_between(0, 1000) = Field(
        5,
        description="with workers > 1, how many times in a row a crashing worker is restarted (back-off "
        "0.5 s doubling to 30 s) before the supervisor gives up and stops",
    )
    frame_timeout: Duration = Field(
        5.0,
        description="a frame, or a fragmented NOTIFY, must arrive whole this long after its first byte, "
        "or the connection is closed",
    )
    reassembly_budget: Size = Field(
        32 * MiB,
        description="bytes all connections together may hold in fragmented NOTIFYs not yet complete; a "
        "fragmented body larger than this cannot arrive",
    )

"""Which wire a target speaks (`protocol: http1 | h2 | h2c | auto`): its request serialiser and its
pool, built once per target so the hot path never asks again.

`http1` is wire.build_request and transport.Pool, as before. `h2` and `h2c` are wire_h2 and
transport_h2.H2Pool (ALPN `h2` required with TLS; prior knowledge without). `auto` on an https
target builds both forms of each request and lets `AutoPool` send whichever the server chose with
ALPN on a probe connection, made once per pool; on plain http it is HTTP/1.1, as browsers do.

The HTTP/2 modules (and the h2 library) are imported only when a target speaks HTTP/2: an agent
replaying HTTP/1.1 only keeps its heap, and so its garbage collector's work per request, as it was.
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import re
import socket
import ssl
import struct
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field, PlainValidator, WithJsonSchema, model_validator

from .config_types import Derived, NonEmptyStr, Section, problem, show
from .request import MirrorRequest
from .tls import client_context
from .transport import ConnectError, Done, Pool, RequestTimeout, TLSError
from .wire import build_request

if TYPE_CHECKING:
    from .transport_h2 import H2Pool

# Called with the grpc-status of each gRPC response (None when it had none).
GrpcObserver = Callable[[int | None], None]

# (method, target, headers, body, host, protected header names) -> what the target's pool sends
Serialiser = Callable[[str, str, list[tuple[str, str]], bytes, str, frozenset[str]], Any]
GRPC_CONTENT_TYPE = "application/grpc"


def speaks_h2(config: Any) -> bool:
    return config.protocol in ("h2", "h2c") or (config.protocol == "auto" and config.scheme == "https")


def build_serialiser(config: Any) -> Serialiser:
    if not speaks_h2(config):
        return build_request
    from .wire_h2 import build_h2_request

    scheme, cap = config.scheme, config.timeout

    def h2(
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes,
        host: str,
        protected: frozenset[str] = frozenset(),
    ) -> Any:
        return build_h2_request(
            method, target, headers, body, host, scheme=scheme, timeout_cap=cap, protected=protected
        )

    if config.protocol != "auto":
        return h2

    def both(
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes,
        host: str,
        protected: frozenset[str] = frozenset(),
    ) -> Any:
        http1 = build_request(method, target, headers, body, host, protected)
        return AutoRequest(http1, h2(method, target, headers, body, host, protected))

    return both


class AutoRequest:
    """`protocol: auto`: a request in both forms until the server has chosen; its len() is what
    the memory budget counts (the HTTP/1.1 bytes; the HTTP/2 form shares the body)."""

    __slots__ = ("h2", "http1")

    def __init__(self, http1: bytes, h2: Any) -> None:
        self.http1 = http1
        self.h2 = h2

    def __len__(self) -> int:
        return len(self.http1)


def build_pool(
    config: Any,
    ssl_context: ssl.SSLContext | None,
    on_grpc_status: GrpcObserver,
    outgoing: Any,
    on_resent: Callable[[int], None] | None = None,
) -> Any:
    """The pool for a target: `Pool`, `PipelinedPool`, `H2Pool`, or `AutoPool` over both; same
    interface. `outgoing` (the C agent's -I/-P source address and ports) applies to HTTP/1.1
    connections; `on_resent` hears of requests a pipelined pool sends again."""
    server_hostname = config.host if ssl_context is not None else None
    options = dict(
        ssl_context=ssl_context,
        server_hostname=server_hostname,
        max_connections=config.concurrency,
        connect_timeout=config.connect_timeout,
        timeout=config.timeout,
    )
    http1_options = {**options, "source_ip": outgoing.source_ip, "source_ports": outgoing.ports}
    if not speaks_h2(config):
        if config.pipeline_depth > 1:
            from .transport_pipeline import PipelinedPool

            return PipelinedPool(
                config.host, config.port, depth=config.pipeline_depth, on_resent=on_resent, **http1_options
            )
        return Pool(config.host, config.port, **http1_options)
    from .transport_h2 import H2Pool

    if ssl_context is not None:
        ssl_context.set_alpn_protocols(["h2", "http/1.1"] if config.protocol == "auto" else ["h2"])
    h2_pool = H2Pool(config.host, config.port, on_grpc_status=on_grpc_status, **options)
    if config.protocol != "auto":
        return h2_pool
    http1_pool = Pool(config.host, config.port, **{**http1_options, "ssl_context": _http1_context(config)})
    return AutoPool(h2_pool, http1_pool, ssl_context)


def _http1_context(config: Any) -> ssl.SSLContext:
    context = client_context(config)
    context.set_alpn_protocols(["http/1.1"])
    return context


def build_grpc_guard(methods: frozenset[str]) -> Callable[[MirrorRequest], str | None]:
    """The check for `grpc_methods`: a gRPC request for an unlisted method is `filtered`."""
    services = frozenset(method[:-1] for method in methods if method.endswith("/*"))

    def guard(req: MirrorRequest) -> str | None:
        content_type = req.header("content-type")
        if content_type is None or content_type[:16].lower() != GRPC_CONTENT_TYPE:
            return None
        path = req.path.partition("?")[0]
        if path in methods or path[: path.rfind("/") + 1] in services:
            return None
        return "filtered"

    return guard


class AutoPool:
    """`protocol: auto` on https: one probe connection asks the server with ALPN (h2, http/1.1), then
    every request goes to the H2Pool or the HTTP/1.1 Pool accordingly. Requests submitted before the
    answer wait for it (the target bounds how many); a probe that fails fails them with its error,
    and the next request probes again."""

    def __init__(self, h2_pool: H2Pool, http1_pool: Pool, ssl_context: ssl.SSLContext) -> None:
        self.h2_pool = h2_pool
        self.http1_pool = http1_pool
        self.protocol: str | None = None  # "h2" or "http1" once known
        self._ssl_context = ssl_context
        self._waiting: deque[tuple[Any, Done, bool]] = deque()
        self._probe: asyncio.Task[None] | None = None

    @property
    def connections_opened(self) -> int:
        return self.h2_pool.connections_opened + self.http1_pool.connections_opened

    @property
    def bytes_held(self) -> int:
        waiting = sum(len(request) for request, _, _ in self._waiting)
        return self.h2_pool.bytes_held + self.http1_pool.bytes_held + waiting

    def submit(self, request: AutoRequest, done: Done, *, head: bool = False) -> None:
        if self.protocol == "h2":
            self.h2_pool.submit(request.h2, done, head=head)
        elif self.protocol == "http1":
            self.http1_pool.submit(request.http1, done, head=head)
        else:
            self._waiting.append((request, done, head))
            if self._probe is None:
                self._probe = asyncio.get_running_loop().create_task(self._run_probe())

    def hold_writes(self) -> None:
        """Both pools hold (see `Mirror._process_intake`); requests still waiting for the probe's
        answer are not written before it anyway."""
        self.h2_pool.hold_writes()
        self.http1_pool.hold_writes()

    def release_writes(self) -> None:
        self.h2_pool.release_writes()
        self.http1_pool.release_writes()

    async def send(self, request: AutoRequest, *, head: bool = False) -> int:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def done(result: int | Exception, _elapsed: float) -> None:
            if not future.done():
                future.set_exception(result) if isinstance(result, Exception) else future.set_result(result)

        self.submit(request, done, head=head)
        return await future

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        await self.h2_pool.close()
        await self.http1_pool.close()
        self._release()  # to the closed pools: they fail what waited with PoolClosed

    async def _run_probe(self) -> None:
        pool = self.h2_pool
        where = f"{pool.host}:{pool.port}"
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(pool.connect_timeout):
                transport, _ = await loop.create_connection(
                    asyncio.Protocol,
                    pool.host,
                    pool.port,
                    ssl=self._ssl_context,
                    server_hostname=pool._server_hostname,
                )
        except asyncio.CancelledError:
            raise
        except Exception as error:
            failure = _connect_failure(error, where)
            self._probe = None
            while self._waiting:
                _, done, _ = self._waiting.popleft()
                done(failure, 0.0)
            return
        selected = transport.get_extra_info("ssl_object").selected_alpn_protocol()
        transport.close()
        self.protocol = "h2" if selected == "h2" else "http1"
        self._probe = None
        self._release()

    def _release(self) -> None:
        while self._waiting:
            request, done, head = self._waiting.popleft()
            if self.protocol == "h2":
                self.h2_pool.submit(request.h2, done, head=head)
            else:
                self.http1_pool.submit(request.http1, done, head=head)


def _connect_failure(error: Exception, where: str) -> Exception:
    if isinstance(error, TimeoutError):
        return RequestTimeout(f"connecting to {where} timed out")
    if isinstance(error, ssl.SSLError):
        return TLSError(f"TLS with {where} failed: {error}")
    if isinstance(error, OSError):
        return ConnectError(f"connecting to {where} failed: {error}")
    return error


_SIOCGIFADDR = 0x8915  # linux/sockios.h: an interface's address
_PORT_RANGE = re.compile(r"\s*(\d{1,5})\s*(?:-\s*(\d{1,5})\s*)?")


def _port_range(value: object) -> tuple[int, int]:
    """A port, or "LOW-HIGH", as the C agent's -P takes it."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    match = _PORT_RANGE.fullmatch(text) if isinstance(text, str) else None
    low = int(match[1]) if match else 0
    high = int(match[2]) if match and match[2] else low
    if match is None or not 1 <= low <= high <= 65535:
        raise problem(f'must be a port or a range "LOW-HIGH" within 1-65535, got {show(value)}')
    return low, high


def _source_ip(address: str) -> str:
    """An IP address as it is, or the IPv4 address of the interface of that name (curl's
    CURLOPT_INTERFACE, which the C agent's -I sets, takes either)."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        pass
    if address not in {name for _index, name in socket.if_nameindex()}:
        raise problem(f"must be an IP address or a network interface name, got {address!r}", "address")
    request = struct.pack("256s", address.encode()[:15])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            answer = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, request)
        except OSError as error:
            raise problem(f"interface {address} has no IPv4 address ({error.strerror})", "address") from None
    return socket.inet_ntoa(answer[20:24])


PortRange = Annotated[
    tuple[int, int],
    PlainValidator(_port_range),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 1, "maximum": 65535},
                {"type": "string", "pattern": r"^\s*\d{1,5}\s*(-\s*\d{1,5}\s*)?$"},
            ]
        }
    ),
]


class OutgoingConfig(Section):
    """Where connections to the shadows come from (the C agent's -I and -P); unset: the kernel chooses."""

    address: NonEmptyStr | None = Field(
        None,
        description="source address of connections to the shadows: an IP address or an interface name "
        "(its IPv4 address is used) (the C agent's -I)",
    )
    ports: PortRange | None = Field(
        None,
        description='source port, or range "LOW-HIGH", of connections to the shadows; a connection fails '
        "with error_connect when every port of the range is in use (the C agent's -P)",
    )
    source_ip: Derived[str | None] = None  # the address bound: `address`, or its interface's IPv4 address

    @model_validator(mode="after")
    def _resolve_interface(self) -> OutgoingConfig:
        if self.address is not None:
            self.derive(source_ip=_source_ip(self.address))
        return self


NO_OUTGOING = OutgoingConfig()

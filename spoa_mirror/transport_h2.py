"""Replay transport over HTTP/2 (`protocol: h2` with TLS and ALPN, `h2c` with prior knowledge).

The same contract as transport.Pool (`submit` with a callback and no task per request, `send`,
`close`, the same `TransportError` reasons, one deadline sweep per pool), on the sans-IO `h2`
library driven from asyncio Protocol callbacks, as our SPOP core is. What HTTP/2 changes:

- Requests are streams, multiplexed on a connection up to the server's SETTINGS_MAX_CONCURRENT_STREAMS
  (and `MAX_STREAMS_PER_CONNECTION`); a new connection is opened only when every open one is full,
  up to `max_connections`. Writes are coalesced: one `transport.write` per loop iteration and
  connection, whatever number of streams began in it; those the agent's intake begins go out when
  it ends (`hold_writes`, `release_writes`), not from a callback in the next iteration.
- Flow control both ways: request bodies are sent as the peer's windows allow (the rest waits for
  WINDOW_UPDATE), response bodies are acknowledged as they arrive and dropped.
- GOAWAY: the connection takes no new streams; those above the server's last stream id were not
  processed and are retried once on another connection, those at or below it finish normally.
  REFUSED_STREAM is retried once too (RFC 9113 8.7: the server did nothing with it). A stream the
  shadow resets otherwise fails as `stream_reset`; a broken frame fails the connection's streams
  as `protocol`.
- A timed-out stream is reset (CANCEL) rather than the whole connection dropped, and a PING goes
  out: a server that does not even answer that within a timeout is hung, and its connection goes.
- A frame header announcing more than our SETTINGS_MAX_FRAME_SIZE fails the connection at once
  (h2 would buffer up to 16 MiB before saying so), so garbage from a shadow is `protocol`.
- gRPC: the `grpc-status` of a gRPC response (trailers, or headers of a trailers-only response) is
  reported to `on_grpc_status`; a request's grpc-timeout shortens its deadline.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from functools import partial

from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import H2Error, TooManyStreamsError
from h2.settings import SettingCodes, Settings

from .transport import (
    ConnectError,
    Done,
    PoolClosed,
    ProtocolError,
    RequestTimeout,
    ResetError,
    TLSError,
    TransportError,
    _resolve,
    check_pool_limits,
)
from .wire_h2 import H2Request

MAX_STREAMS_PER_CONNECTION = 128
# Our receive window: a response body is acknowledged as it arrives, so this only bounds what one
# stream may have in flight towards us; 1 MiB saves WINDOW_UPDATE round trips on larger bodies.
RECEIVE_WINDOW = 1024 * 1024
# Stream ids are 31 bits and never reused: a connection this close to the end takes no new streams.
LAST_STREAM_ID = 2**31 - 1 - 2 * MAX_STREAMS_PER_CONNECTION
GrpcObserver = Callable[[int | None], None]  # called with each gRPC response's grpc-status, or None


class StreamResetError(TransportError):
    """The shadow reset the stream (RST_STREAM) with an error code other than REFUSED_STREAM, or
    refused it twice."""

    reason = "stream_reset"


class H2Pool:
    """HTTP/2 connections to one shadow backend; see the module docstring."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        max_connections: int,
        connect_timeout: float,
        timeout: float,
        idle_timeout: float = 30.0,
        on_grpc_status: GrpcObserver | None = None,
    ) -> None:
        check_pool_limits(max_connections, connect_timeout, timeout, idle_timeout)
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self.on_grpc_status = on_grpc_status
        self.connections_opened = 0
        self.streams_retried = 0  # after GOAWAY, REFUSED_STREAM or a stale connection: for tests
        self._ssl_context = ssl_context
        self._server_hostname = (server_hostname or host) if ssl_context is not None else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connections: list[_H2Connection] = []  # open; usable or finishing after GOAWAY
        self._connecting: set[asyncio.Task[None]] = set()
        self._backlog: deque[_Stream] = deque()
        self._tick = min(0.1, timeout / 10)
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False
        self.bytes_held = 0  # of the requests submitted and not settled (the memory budget reads it)
        self.writes = 0  # to connections, for tests and benchmarks
        self._holding = False  # between hold_writes and release_writes
        self._held: list[_H2Connection] = []  # connections with output waiting for release_writes

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    async def send(self, request: H2Request, *, head: bool = False) -> int:
        """`submit` as a coroutine: the final status, or a TransportError raised."""
        if self._closed:
            raise PoolClosed(f"pool for {self.where} is closed")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        stream = self.submit(request, partial(_resolve, future), head=head)
        try:
            return await future
        except asyncio.CancelledError:
            self._cancel(stream)
            raise

    def submit(self, request: H2Request, done: Done, *, head: bool = False) -> _Stream:
        """Calls `done(status or exception, seconds)` exactly once, from a later callback."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        now = loop.time()
        timeout = self.timeout if request.timeout is None else min(self.timeout, request.timeout)
        stream = _Stream(request, head, done, now, now + timeout)
        self.bytes_held += request.size
        if self._closed:
            loop.call_soon(self._settle, stream, PoolClosed(f"pool for {self.where} is closed"))
            return stream
        connection = None if self._backlog else self._available()
        if connection is not None:
            self._begin(connection, stream)
        else:
            self._backlog.append(stream)
            self._dispatch()
        if self._sweep is None:
            self._sweep = loop.call_later(self._tick, self._sweep_deadlines, loop)
        return stream

    def hold_writes(self) -> None:
        """Streams begun from now until `release_writes` are written by it, not by a callback in the
        next loop iteration: the agent's intake begins a batch and writes it in the iteration that
        ran it, as it does with the pipelined HTTP/1.1 pool."""
        self._holding = True

    def release_writes(self) -> None:
        """One write per connection that has output since `hold_writes`."""
        self._holding = False
        held, self._held = self._held, []
        for connection in held:
            connection._flush()

    async def close(self) -> None:
        """Fails everything in flight or waiting with PoolClosed and closes every connection."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        closed = PoolClosed(f"pool for {self.where} closed")
        while self._backlog:
            self._settle(self._backlog.popleft(), closed)
        for connection in list(self._connections):
            connection.fail_all(closed)
            connection.shut()
        self._connections.clear()
        for task in list(self._connecting):
            task.cancel()
        await asyncio.sleep(0)

    # -- scheduling ------------------------------------------------------------------------------

    def _available(self) -> _H2Connection | None:
        for connection in self._connections:
            if connection.usable and len(connection.streams) < connection.max_streams:
                return connection
        return None

    def _begin(self, connection: _H2Connection, stream: _Stream) -> None:
        try:
            connection.begin(stream)
        except TooManyStreamsError:  # the server's limit is lower than it announced so far
            connection.max_streams = len(connection.streams)
            self._backlog.appendleft(stream)
        except Exception as error:  # h2 refused (stream ids exhausted, state): retry elsewhere once
            connection.usable = False
            self._retry_or_settle(stream, ProtocolError(f"cannot open a stream: {error}"))

    def _dispatch(self) -> None:
        """Streams waiting for capacity go where there is some; a connection is opened when there is
        none and the limit allows."""
        backlog = self._backlog
        while backlog:
            if backlog[0].done is None:  # cancelled while waiting
                backlog.popleft()
                continue
            connection = self._available()
            if connection is None:
                break
            self._begin(connection, backlog.popleft())
        room = len(self._connections) < self.max_connections
        if backlog and room and not self._connecting and not self._closed:
            task = self._loop.create_task(self._connect_then_dispatch())  # type: ignore[union-attr]
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)

    async def _connect_then_dispatch(self) -> None:
        try:
            connection = await self._connect()
        except asyncio.CancelledError:
            return
        except Exception as error:  # a TransportError, or a bug of ours: what waits still ends
            if not any(c.usable for c in self._connections):
                while self._backlog:
                    self._settle(self._backlog.popleft(), error)
            return
        if self._closed:
            connection.shut()
            return
        self._connections.append(connection)
        self._dispatch()

    async def _connect(self) -> _H2Connection:
        loop = self._loop
        assert loop is not None
        connection = _H2Connection(self)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await loop.create_connection(
                    lambda: connection,
                    self.host,
                    self.port,
                    ssl=self._ssl_context,
                    server_hostname=self._server_hostname,
                )
        except asyncio.CancelledError:
            if connection.transport is not None:
                connection.transport.abort()
            raise
        except TimeoutError:
            raise RequestTimeout(f"connecting to {self.where} timed out") from None
        except ssl.SSLError as exc:
            raise TLSError(f"TLS with {self.where} failed: {exc}") from exc
        except OSError as exc:
            raise ConnectError(f"connecting to {self.where} failed: {exc}") from exc
        if self._ssl_context is not None:
            ssl_object = connection.transport.get_extra_info("ssl_object")
            selected = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
            if selected != "h2":
                connection.transport.abort()
                raise ProtocolError(f"{self.where} did not negotiate h2 with ALPN (got {selected!r})")
        self.connections_opened += 1
        return connection

    # -- results ---------------------------------------------------------------------------------

    def _on_result(self, stream: _Stream, result: int | Exception) -> None:
        self._settle(stream, result)
        if self._backlog:
            self._dispatch()

    def _retry_or_settle(self, stream: _Stream, error: TransportError) -> None:
        """A stream the server never processed (above a GOAWAY's last id, REFUSED_STREAM, lost with
        a stale connection) is sent once more, at the front of the line."""
        if stream.retried or self._closed or stream.done is None:
            self._settle(stream, error)
            return
        stream.retried = True
        stream.connection = None
        stream.body_sent = 0
        self.streams_retried += 1
        self._backlog.appendleft(stream)
        self._dispatch()

    def _settle(self, stream: _Stream, result: int | Exception) -> None:
        done = stream.done
        if done is None:
            return
        stream.done = None
        stream.connection = None
        self.bytes_held -= stream.request.size
        done(result, self._loop.time() - stream.submitted)  # type: ignore[union-attr]

    def _cancel(self, stream: _Stream) -> None:
        """`send`'s caller was cancelled: reset its stream if it has one."""
        if stream.done is None:
            return
        stream.done = None
        self.bytes_held -= stream.request.size
        connection = stream.connection
        if connection is not None:
            connection.cancel(stream)

    def _forget(self, connection: _H2Connection) -> None:
        if connection in self._connections:
            self._connections.remove(connection)
        if self._backlog and not self._closed:
            self._dispatch()

    def _sweep_deadlines(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        while self._backlog and self._backlog[0].deadline <= now:
            self._settle(self._backlog.popleft(), RequestTimeout("no connection in time"))
        expired_idle = now - self.idle_timeout
        for connection in list(self._connections):
            connection.sweep(now, expired_idle)
        # While connections are open, for their idle expiry too: ten wake-ups a second at most.
        alive = self._backlog or self._connections
        self._sweep = loop.call_later(self._tick, self._sweep_deadlines, loop) if alive else None


class _Stream:
    """One request from `submit` until `done` is called."""

    __slots__ = (
        "body_sent",
        "connection",
        "deadline",
        "done",
        "grpc_status",
        "head",
        "request",
        "retried",
        "status",
        "stream_id",
        "submitted",
    )

    def __init__(self, request: H2Request, head: bool, done: Done, submitted: float, deadline: float) -> None:
        self.request = request
        self.head = head
        self.done: Done | None = done
        self.submitted = submitted
        self.deadline = deadline
        self.retried = False
        self.connection: _H2Connection | None = None
        self.stream_id = 0
        self.status = 0
        self.body_sent = 0
        self.grpc_status: int | None = None


_CONFIG = H2Configuration(
    client_side=True,
    header_encoding=None,
    # wire_h2 built the header list to HTTP/2's rules already; h2 checking it again costs CPU.
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
    # Of a response only :status and grpc-status are read; checking every field of it cost ~10% of
    # the CPU per request (cProfile, bench/transport_bench.py --protocols h2c).
    validate_inbound_headers=False,
    normalize_inbound_headers=False,
)


class _H2Connection(asyncio.Protocol):
    def __init__(self, pool: H2Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.h2 = H2Connection(config=_CONFIG)
        self.streams: dict[int, _Stream] = {}
        self.blocked: dict[int, _Stream] = {}  # streams with body bytes waiting for window
        self.max_streams = MAX_STREAMS_PER_CONNECTION
        self.usable = True  # takes new streams: not after GOAWAY, an error, or when lost
        self.lost = False
        self.flush_scheduled = False
        self.idle_since = 0.0
        self.last_received = 0.0
        self.ping_sent = 0.0  # loop time of an unanswered liveness PING
        self.completed = 0

    # -- driven by the pool ----------------------------------------------------------------------

    def begin(self, stream: _Stream) -> None:
        h2 = self.h2
        stream_id = h2.get_next_available_stream_id()
        if stream_id >= LAST_STREAM_ID:
            self.usable = False
        request = stream.request
        h2.send_headers(stream_id, request.headers, end_stream=not request.body)
        stream.stream_id = stream_id
        stream.connection = self
        self.streams[stream_id] = stream
        if request.body:
            self._send_body(stream)
        self._schedule_flush()

    def cancel(self, stream: _Stream) -> None:
        self.streams.pop(stream.stream_id, None)
        self.blocked.pop(stream.stream_id, None)
        if not self.lost:
            with suppress(H2Error):  # already closed on the h2 side
                self.h2.reset_stream(stream.stream_id, ErrorCodes.CANCEL)
            self._schedule_flush()

    def sweep(self, now: float, expired_idle: float) -> None:
        if self.ping_sent:
            if self.last_received >= self.ping_sent:
                self.ping_sent = 0.0  # answered: the server is alive, only slow
            elif now - self.ping_sent >= self.pool.timeout:  # not even a PING ACK: a hung server
                # Unusable before the callbacks run, which may submit the next requests at once.
                self.usable = False
                self.fail_all(RequestTimeout("connection silent: no answer to PING within the timeout"))
                self.shut()
                self.pool._forget(self)
                return
        expired = [stream for stream in self.streams.values() if stream.deadline <= now]
        if expired:
            for stream in expired:
                self.cancel(stream)
                self.pool._settle(stream, RequestTimeout("no complete response in time"))
            if not self.ping_sent and not self.lost:
                self.ping_sent = now
                with suppress(H2Error):
                    self.h2.ping(b"spoamirr")
                self._schedule_flush()
        if not self.streams and (not self.usable or self.idle_since <= expired_idle):
            self.shut()
            self.pool._forget(self)

    def fail_all(self, error: TransportError) -> None:
        streams, self.streams = self.streams, {}
        self.blocked.clear()
        for stream in streams.values():
            self.pool._settle(stream, error)

    def shut(self) -> None:
        """Closes the connection politely (GOAWAY) unless it is already gone."""
        self.usable = False
        if self.lost or self.transport is None:
            return
        try:
            self.h2.close_connection()
            self.transport.write(self.h2.data_to_send())
        except H2Error:
            pass
        self.transport.close()

    # -- sending ---------------------------------------------------------------------------------

    def _send_body(self, stream: _Stream) -> None:
        h2 = self.h2
        body = stream.request.body
        stream_id = stream.stream_id
        while stream.body_sent < len(body):
            window = min(h2.local_flow_control_window(stream_id), h2.max_outbound_frame_size)
            if window <= 0:
                self.blocked[stream_id] = stream
                return
            end = min(len(body), stream.body_sent + window)
            h2.send_data(stream_id, body[stream.body_sent : end], end_stream=end == len(body))
            stream.body_sent = end
        self.blocked.pop(stream_id, None)

    def _schedule_flush(self) -> None:
        if not self.flush_scheduled:
            self.flush_scheduled = True
            pool = self.pool
            if pool._holding:
                pool._held.append(self)
            else:
                pool._loop.call_soon(self._flush)  # type: ignore[union-attr]

    def _flush(self) -> None:
        self.flush_scheduled = False
        if self.lost:
            return
        data = self.h2.data_to_send()
        if data:
            self.transport.write(data)
            self.pool.writes += 1

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        now = self.pool._loop.time()  # type: ignore[union-attr]
        self.idle_since = self.last_received = now
        self.h2.local_settings = Settings(
            client=True,
            initial_values={SettingCodes.ENABLE_PUSH: 0, SettingCodes.INITIAL_WINDOW_SIZE: RECEIVE_WINDOW},
        )
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(RECEIVE_WINDOW)
        self.transport.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        pool = self.pool
        self.last_received = pool._loop.time()  # type: ignore[union-attr]
        try:
            events = self.h2.receive_data(data)
        except H2Error as exc:  # a frame h2 refuses: the connection is unusable
            self.usable = False
            self.fail_all(ProtocolError(f"HTTP/2 protocol error from {pool.where}: {exc}"))
            self._flush()  # h2's GOAWAY
            self.transport.close()
            pool._forget(self)
            return
        pending = self.h2.incoming_buffer._data  # the start of a frame h2 waits to complete
        if len(pending) >= 9 and int.from_bytes(pending[:3], "big") > self.h2.max_inbound_frame_size:
            self.usable = False
            self.fail_all(ProtocolError(f"HTTP/2 protocol error from {pool.where}: overlong frame header"))
            self.transport.abort()
            pool._forget(self)
            return
        finished: list[tuple[_Stream, int | Exception]] = []
        for event in events:
            kind = type(event)
            if kind is DataReceived:
                if event.flow_controlled_length:
                    # Raises when the stream ended meanwhile; the connection window is credited anyway.
                    with suppress(H2Error):
                        self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif kind is ResponseReceived:
                self._on_response(event)
            elif kind is StreamEnded:
                stream = self.streams.pop(event.stream_id, None)
                if stream is not None:
                    self.completed += 1
                    self.blocked.pop(event.stream_id, None)
                    finished.append((stream, stream.status or ProtocolError("stream ended without a status")))
            elif kind is TrailersReceived:
                stream = self.streams.get(event.stream_id)
                if stream is not None and stream.request.grpc:
                    stream.grpc_status = _grpc_status(event.headers)
            elif kind is StreamReset:
                self._on_reset(event, finished)
            elif kind is WindowUpdated:
                for stream in list(self.blocked.values()):
                    self._send_body(stream)
            elif kind is RemoteSettingsChanged:
                changed = event.changed_settings.get(SettingCodes.MAX_CONCURRENT_STREAMS)
                if changed is not None:
                    self.max_streams = min(MAX_STREAMS_PER_CONNECTION, changed.new_value)
            elif kind is ConnectionTerminated:
                self._on_goaway(event)
        self._flush()
        if not self.streams:
            self.idle_since = self.last_received
        observe = pool.on_grpc_status
        for stream, result in finished:
            if observe is not None and stream.request.grpc and type(result) is int:
                observe(stream.grpc_status)
            pool._on_result(stream, result)
        if not self.usable and not self.streams and not self.lost:
            self.transport.close()
            pool._forget(self)
        elif pool._backlog and self.usable:
            pool._dispatch()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.usable = False
        streams, self.streams = self.streams, {}
        self.blocked.clear()
        detail = f": {exc}" if exc else ""
        for stream in streams.values():
            if stream.done is None:
                continue
            if not stream.status and self.completed:
                # Lost before any response on a connection that had served others: most likely
                # closed as idle just as the stream went out; worth a second try, as for HTTP/1.1.
                lost = ResetError(f"connection closed before any response{detail}")
                self.pool._retry_or_settle(stream, lost)
            else:
                self.pool._settle(stream, ResetError(f"connection closed mid-response{detail}"))
        self.pool._forget(self)

    # -- events ----------------------------------------------------------------------------------

    def _on_response(self, event: ResponseReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            return
        for name, value in event.headers:
            if name == b":status":
                stream.status = int(value)
                break
        if stream.request.grpc:  # a trailers-only response carries grpc-status in its headers
            stream.grpc_status = _grpc_status(event.headers)

    def _on_reset(self, event: StreamReset, finished: list[tuple[_Stream, int | Exception]]) -> None:
        stream = self.streams.pop(event.stream_id, None)
        self.blocked.pop(event.stream_id, None)
        if stream is None:
            return
        code = event.error_code
        name = code.name if isinstance(code, ErrorCodes) else str(code)
        error = StreamResetError(f"stream reset by {self.pool.where}: {name}")
        if code == ErrorCodes.REFUSED_STREAM and not stream.retried:
            self.pool._retry_or_settle(stream, error)
        else:
            finished.append((stream, error))

    def _on_goaway(self, event: ConnectionTerminated) -> None:
        """No new streams here; those above last_stream_id go elsewhere once. h2 treats the
        connection as closed after a GOAWAY and would refuse the frames of the streams the server
        still answers, so its state machine is put back to open for them (we open no new ones)."""
        self.usable = False
        last = event.last_stream_id if event.last_stream_id is not None else 0
        unprocessed = [stream_id for stream_id in self.streams if stream_id > last]
        for stream_id in unprocessed:
            stream = self.streams.pop(stream_id)
            self.blocked.pop(stream_id, None)
            self.pool._retry_or_settle(stream, ResetError(f"GOAWAY from {self.pool.where} before the stream"))
        if self.streams and self.h2.state_machine.state is ConnectionState.CLOSED:
            self.h2.state_machine.state = ConnectionState.CLIENT_OPEN


def _grpc_status(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"grpc-status":
            return int(value) if value.isdigit() and len(value) <= 3 else None
    return None

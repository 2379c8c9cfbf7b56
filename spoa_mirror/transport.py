"""Replay transport: HTTP/1.1 keep-alive connection pools to the shadow backends, the agent's hot path.

Built on asyncio Protocols and llhttp (`httptools.HttpResponseParser`) rather than an HTTP client
library because the client's CPU per request is what limits how much traffic one agent can mirror.
Measured on the 2-core development machine against nginx with 32 concurrent requests: httpx managed
350 req/s (~0.7 ms CPU per request), aiohttp ~75 us CPU per request, a lean asyncio-Protocol
keep-alive client ~10 us. This is the lean one: per request one `transport.write`, no timer, and
with `Pool.submit` no task, future or coroutine either (see `Pool`), and response bodies parsed and
dropped without being buffered or even handed to Python (no `on_body`, no `on_header` callback).
bench/transport_bench.py measures `send` at ~11-13 us of client CPU per request with uvloop on that
machine, most of it the socket syscalls.

Failures are `TransportError`s whose `reason` is a short, stable metrics label: "connect", "tls",
"timeout", "reset", "protocol", and "closed" for requests still in flight when the pool is closed.

A shadow is the system under test and may misbehave, so what it sends before its final response is
capped: the bytes of the head (interim 1xx responses included) and the number of interim responses.
Without the caps, a shadow streaming header lines forever took the agent to 1.9 GB in 5 s with 4
requests, and endless `100 Continue` to 566 MB with one; past a cap the request fails as "protocol"
and the connection, with what it held, is dropped at once.
"""

from __future__ import annotations

import asyncio
import errno
import re
import ssl
from collections import deque
from collections.abc import Callable, Iterator
from functools import partial
from urllib.parse import urlsplit

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser


class TransportError(Exception):
    """A mirrored request that got no final response; `reason` is the metrics label."""

    reason = "transport"


class ConnectError(TransportError):
    reason = "connect"


class TLSError(TransportError):
    reason = "tls"


class RequestTimeout(TransportError):
    reason = "timeout"


class ResetError(TransportError):
    """The connection ended (EOF or RST) before the response was complete."""

    reason = "reset"


class ProtocolError(TransportError):
    """The shadow answered with something that is not a valid HTTP/1.x response."""

    reason = "protocol"


def check_pool_limits(
    max_connections: int, connect_timeout: float, timeout: float, idle_timeout: float
) -> None:
    """What every pool (HTTP/1.1 here, HTTP/2 in transport_h2) refuses to be built with."""
    if max_connections < 1:
        raise ValueError(f"max_connections must be at least 1, got {max_connections}")
    if timeout <= 0 or connect_timeout <= 0 or idle_timeout <= 0:
        raise ValueError("timeouts must be positive")


class PoolClosed(TransportError):
    reason = "closed"


# Caps on what a shadow sends before its final response head is complete. 64 KiB is twice the
# largest head nginx accepts by default (4 x 8k) and four times HAProxy's default header limit;
# legitimate servers send one 100 Continue or a few 103 Early Hints.
MAX_RESPONSE_HEAD = 64 * 1024
MAX_INTERIM_RESPONSES = 16


class _StaleConnection(ResetError):
    """A reused keep-alive connection died before any byte of the response: most likely the server
    closed it as idle while our request was on its way, so the request is worth one more try."""


# Called once per request with its final status code, or with the exception that ended it (a
# TransportError; anything else is a bug of ours), and the seconds since it was submitted.
Done = Callable[[int | Exception, float], None]


class Pool:
    """Keep-alive connections to one shadow backend, at most `max_connections` open at once.

    Requests that find every connection slot taken wait for one rather than failing, so the caller
    bounds how many may queue here. Idle connections are reused most-recently-used first (the least
    likely to have been closed by the server) and closed after `idle_timeout` seconds unused.

    Two ways in: `send`, a coroutine, and `submit`, which takes a callback and costs no task, future
    or coroutine per request; everything below `submit` runs from protocol callbacks. In the agent's
    replay loop (batches of 22 GETs to nginx) a sender task awaiting `send` per request executed
    ~113k user-space instructions per request and `submit` ~94k (callgrind), ~2.5 us less CPU.

    Timeouts and idle expiry are checked by one `call_later` sweep per pool rather than one timer per
    request: with uvloop, arming and cancelling a timer costs ~1 us, a tenth of a whole request. The
    price is precision: a request times out up to a tenth of `timeout` (at most 100 ms) late."""

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
        source_ip: str | None = None,
        source_ports: tuple[int, int] | None = None,
        max_response_head: int = MAX_RESPONSE_HEAD,
        max_interim_responses: int = MAX_INTERIM_RESPONSES,
    ) -> None:
        """`source_ip`, `source_ports`: where connections come from (the C agent's -I and -P); each
        connect tries the ports of the range in turn, from where the previous one left off."""
        check_pool_limits(max_connections, connect_timeout, timeout, idle_timeout)
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self.max_response_head = max_response_head
        self.max_interim_responses = max_interim_responses
        self.connections_opened = 0  # for tests and metrics: how well keep-alive is working
        # Bytes of the requests submitted and not settled yet: what this pool keeps alive, for the
        # caller's memory budget.
        self.bytes_held = 0
        self._ssl_context = ssl_context
        self._server_hostname = (server_hostname or host) if ssl_context is not None else None
        # The loop of the first request (a pool's connections belong to one loop); kept because
        # asyncio.get_running_loop() makes a getpid() system call each time on Python 3.11.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._free_slots = max_connections
        self._backlog: deque[_Exchange] = deque()  # submitted while every slot was taken
        self._idle: deque[_Connection] = deque()
        self._busy: set[_Connection] = set()
        self._connecting: set[asyncio.Task[None]] = set()
        self._deadline_tick = min(0.1, timeout / 10)
        self._deadline_sweep: asyncio.TimerHandle | None = None
        self._idle_sweep: asyncio.TimerHandle | None = None
        self._closed = False
        self._source_ip = source_ip
        self._source_ports = source_ports
        self._next_source_port = 0 if source_ports is None else source_ports[0]

    async def send(self, request: bytes, *, head: bool = False) -> int:
        """Sends one complete request and returns the final status code once the whole response has
        arrived (interim 1xx responses are skipped, the body is discarded). `head` must be true for a
        HEAD request, whose response has no body whatever its headers say.

        A request that fails on a reused connection before any byte of the response arrived is sent
        once more on a new connection: the server most likely closed the idle connection just as the
        request went out, and a fire-and-forget mirror has no other chance to deliver it. Raises a
        `TransportError` subclass, `PoolClosed` once `close` was called. Cancelling the caller
        gives up the request and drops its connection."""
        if self._closed:
            raise PoolClosed(f"pool for {self.host}:{self.port} is closed")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        exchange = self.submit(request, partial(_resolve, future), head=head)
        try:
            return await future
        except asyncio.CancelledError:
            self._cancel(exchange)
            raise

    def hold_writes(self) -> None:
        """Part of every pool's interface (see `Mirror._process_intake`); this pool writes each
        request as it starts, on a connection of its own, so there is nothing to hold."""

    def release_writes(self) -> None:
        """See `hold_writes`."""

    def submit(self, request: bytes, done: Done, *, head: bool = False) -> _Exchange:
        """`send` without a coroutine: the same request, retry and failures, reported by calling
        `done(status or exception, seconds)` exactly once, from a later event loop callback (never
        from within `submit`). Returns the request's handle, which `send` cancels through."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        exchange = _Exchange(request, head, done, loop.time())
        self.bytes_held += len(request)
        if self._closed:
            loop.call_soon(self._settle, exchange, PoolClosed(f"pool for {self.host}:{self.port} is closed"))
        elif self._free_slots:
            self._free_slots -= 1
            exchange.slot = True
            self._start(exchange)
        else:
            self._backlog.append(exchange)
        return exchange

    async def close(self) -> None:
        """Closes idle connections and aborts busy ones; their requests, and those waiting for a
        connection, fail with `PoolClosed`."""
        self._closed = True
        for sweep in (self._idle_sweep, self._deadline_sweep):
            if sweep is not None:
                sweep.cancel()
        self._idle_sweep = self._deadline_sweep = None
        while self._idle:
            self._idle.pop().transport.close()
        closed = PoolClosed(f"pool for {self.host}:{self.port} closed")
        while self._backlog:
            self._settle(self._backlog.popleft(), closed)
        for connection in list(self._busy):
            connection.fail(closed)
        for task in list(self._connecting):
            task.cancel()
        await asyncio.sleep(0)  # lets the transports run connection_lost

    def _start(self, exchange: _Exchange) -> None:
        """The exchange holds a connection slot: send it on an idle connection or a new one."""
        now = self._loop.time()  # type: ignore[union-attr]  # set by submit
        exchange.deadline = now + self.timeout
        connection = self._take_idle(now)
        if connection is not None:
            self._begin(connection, exchange)
        else:
            self._connect_for(exchange)

    def _begin(self, connection: _Connection, exchange: _Exchange) -> None:
        exchange.connection = connection
        try:
            connection.begin(exchange)
        except Exception as error:  # a write the transport refused: the request must still end
            connection.abandon()
            self._loop.call_soon(self._settle, exchange, error)  # type: ignore[union-attr]
            return
        self._busy.add(connection)
        if self._deadline_sweep is None:
            self._deadline_sweep = self._loop.call_later(  # type: ignore[union-attr]
                self._deadline_tick, self._sweep_deadlines, self._loop
            )

    def _connect_for(self, exchange: _Exchange) -> None:
        task = self._loop.create_task(self._connect_then_begin(exchange))  # type: ignore[union-attr]
        exchange.connecting = task
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _connect_then_begin(self, exchange: _Exchange) -> None:
        try:
            connection = await self._connect(self._loop, exchange.deadline)  # type: ignore[arg-type]
        except asyncio.CancelledError:  # by close(), or by a cancelled send (then settling is a no-op)
            self._settle(exchange, PoolClosed(f"pool for {self.host}:{self.port} closed"))
            return
        except Exception as error:  # a TransportError, or a bug of ours: the request still ends
            self._settle(exchange, error)
            return
        exchange.connecting = None
        if exchange.done is None or self._closed:
            connection.transport.close()
            self._settle(exchange, PoolClosed(f"pool for {self.host}:{self.port} closed"))
            return
        self._begin(connection, exchange)

    def _on_result(self, connection: _Connection, exchange: _Exchange, result: int | Exception) -> None:
        """From the connection, once its exchange has a result: keep or close the connection, retry a
        request a stale connection lost, else settle the request."""
        self._busy.discard(connection)
        if type(result) is _StaleConnection:
            self._connect_for(exchange)  # once: a new connection cannot be stale
            return
        if connection.reusable and not self._closed:
            connection.idle_since = self._loop.time()  # type: ignore[union-attr]
            self._idle.append(connection)
            if self._idle_sweep is None:
                self._idle_sweep = self._loop.call_later(  # type: ignore[union-attr]
                    self.idle_timeout, self._sweep_idle, self._loop
                )
        else:
            connection.transport.close()
        self._settle(exchange, result)

    def _settle(self, exchange: _Exchange, result: int | Exception) -> None:
        done = exchange.done
        if done is None:  # cancelled: its slot is already free
            return
        exchange.done = None
        self.bytes_held -= len(exchange.request)
        exchange.connection = exchange.connecting = None
        if exchange.slot:
            exchange.slot = False
            if self._backlog:
                self._release_slot()
            else:
                self._free_slots += 1
        done(result, self._loop.time() - exchange.submitted)  # type: ignore[union-attr]

    def _cancel(self, exchange: _Exchange) -> None:
        """`send`'s caller was cancelled: give the request up, drop its connection, free its slot."""
        if exchange.done is None:
            return
        exchange.done = None
        self.bytes_held -= len(exchange.request)
        if exchange.connecting is not None:
            exchange.connecting.cancel()
        connection = exchange.connection
        if connection is not None and connection.exchange is exchange:
            self._busy.discard(connection)
            connection.abandon()
        if exchange.slot:  # else still in the backlog, where _release_slot skips it
            exchange.slot = False
            self._release_slot()

    def _release_slot(self) -> None:
        while self._backlog and not self._closed:
            exchange = self._backlog.popleft()
            if exchange.done is not None:
                exchange.slot = True
                self._start(exchange)
                return
        self._free_slots += 1

    def _new_connection(self) -> _Connection:
        """The protocol object of a new connection (compare/capture.py's pool makes its own)."""
        return _Connection(self)

    async def _connect(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Connection:
        connection = self._new_connection()
        where = f"{self.host}:{self.port}"
        try:
            async with asyncio.timeout(min(self.connect_timeout, deadline - loop.time())):
                for local_addr in self._local_addresses():
                    try:
                        await loop.create_connection(
                            lambda: connection,
                            self.host,
                            self.port,
                            ssl=self._ssl_context,
                            server_hostname=self._server_hostname,
                            local_addr=local_addr,
                        )
                    except OSError as exc:
                        if exc.errno != errno.EADDRINUSE or local_addr is None or local_addr[1] == 0:
                            raise
                        continue
                    break
        except asyncio.CancelledError:  # it may have connected just as it was cancelled
            if connection.transport is not None:
                connection.transport.close()
            raise
        except TimeoutError:
            raise RequestTimeout(f"connecting to {where} timed out") from None
        except ssl.SSLError as exc:  # before OSError: SSLError is one; CertificateError is one too
            raise TLSError(f"TLS with {where} failed: {exc}") from exc
        except OSError as exc:
            raise ConnectError(f"connecting to {where} failed: {exc}") from exc
        self.connections_opened += 1
        return connection

    def _local_addresses(self) -> Iterator[tuple[str, int] | None]:
        """None (the kernel chooses), the source address alone, or each port of the source range
        once, starting after the one used last."""
        if self._source_ports is None:
            yield None if self._source_ip is None else (self._source_ip, 0)
            return
        low, high = self._source_ports
        for _ in range(high - low + 1):
            port = self._next_source_port
            self._next_source_port = low if port >= high else port + 1
            yield (self._source_ip or "0.0.0.0", port)
        raise OSError(errno.EADDRINUSE, f"every source port {low}-{high} is in use")

    def _take_idle(self, now: float) -> _Connection | None:
        expired_before = now - self.idle_timeout
        while self._idle:
            connection = self._idle.pop()
            if connection.reusable and connection.idle_since > expired_before:
                return connection
            connection.transport.close()
        return None

    def _sweep_deadlines(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for connection in [c for c in self._busy if c.deadline <= now]:
            connection.time_out()
        self._deadline_sweep = (
            loop.call_later(self._deadline_tick, self._sweep_deadlines, loop) if self._busy else None
        )

    def _sweep_idle(self, loop: asyncio.AbstractEventLoop) -> None:
        expired_before = loop.time() - self.idle_timeout
        while self._idle and (not self._idle[0].reusable or self._idle[0].idle_since <= expired_before):
            self._idle.popleft().transport.close()
        self._idle_sweep = (
            loop.call_at(self._idle[0].idle_since + self.idle_timeout, self._sweep_idle, loop)
            if self._idle
            else None
        )


class _Exchange:
    """One request from `submit` until `done` is called: its slot, its connection or connect task."""

    __slots__ = ("connecting", "connection", "deadline", "done", "head", "request", "slot", "submitted")

    def __init__(self, request: bytes, head: bool, done: Done, submitted: float) -> None:
        self.request = request
        self.head = head
        self.done: Done | None = done  # None once settled or cancelled
        self.submitted = submitted
        self.deadline = 0.0
        self.slot = False  # holds one of the pool's connection slots
        self.connection: _Connection | None = None
        self.connecting: asyncio.Task[None] | None = None


def _resolve(future: asyncio.Future[int], result: int | Exception, _elapsed: float) -> None:
    if not future.done():
        if isinstance(result, Exception):
            future.set_exception(result)
        else:
            future.set_result(result)


class _ResponseConnection(asyncio.Protocol):
    """What Pool's and PipelinedPool's connections share: the pool, the socket, a response parser
    whose callbacks are the subclass's, and what is known of the response being read (its status,
    the bytes before its body, interim responses ahead of it), whether the connection can carry
    another request, and its idle and deadline times (loop time)."""

    __slots__ = (
        "deadline",
        "head_parser_abandoned",
        "idle_since",
        "interim",
        "parser",
        "pool",
        "received_before_body",
        "reusable",
        "status",
        "transport",
    )

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        self.parser = HttpResponseParser(self)
        self.status = 0
        # What arrived of the response until its final head was parsed: evidence for connection_lost
        # (were there any bytes? was the body length declared?) that costs nothing to keep.
        self.received_before_body: list[bytes] = []
        self.interim = 0  # interim (1xx) or stray responses ahead of the final one
        self.head_parser_abandoned = False  # feed_data of the parser a HEAD response ended is unwinding
        self.reusable = True
        self.idle_since = 0.0
        self.deadline = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def _count_interim(self) -> None:
        """One more interim (or stray) response; ProtocolError past the pool's bound, raised from the
        parser's callback so that it stops the parser (see data_received)."""
        limit = self.pool.max_interim_responses
        if self.interim >= limit:
            raise ProtocolError(f"more than {limit} interim responses")
        self.interim += 1


class _Connection(_ResponseConnection):
    """One connection and the one request in flight on it (no pipelining).

    The parser's callbacks end the exchange; llhttp decides where each response ends (Content-Length,
    chunked, 1xx, 204/304) except in two cases it cannot see: a HEAD response, which ends with its
    headers, and a close-delimited body, which ends at EOF. The pool hears of a response only once
    `feed_data` has returned, so that what follows it in the same read is judged with this exchange
    (a stray response makes the connection unusable) before the pool can start the next one here."""

    __slots__ = ("exchange", "exchanges", "finished", "head")

    def __init__(self, pool: Pool) -> None:
        super().__init__(pool)
        self.exchange: _Exchange | None = None
        self.finished: _Exchange | None = None  # complete, not yet handed to the pool
        self.head = False
        self.exchanges = 0

    # -- driven by Pool --------------------------------------------------------------------------

    def begin(self, exchange: _Exchange) -> None:
        self.exchange = exchange
        self.head = exchange.head
        self.deadline = exchange.deadline
        self.status = 0
        self.interim = 0
        self.exchanges += 1
        self.transport.write(exchange.request)

    def time_out(self) -> None:
        if self.exchange is not None:  # else the response is complete and about to be handed over
            self.fail(RequestTimeout("no complete response in time"))

    def fail(self, error: TransportError) -> None:
        exchange = self.exchange
        self.abandon()
        self.received_before_body.clear()
        if exchange is not None:
            self.pool._on_result(self, exchange, error)

    def abandon(self) -> None:
        """Drops the connection at once: whatever is in flight on it is of no use any more."""
        self.reusable = False
        self.exchange = None
        self.transport.abort()

    def _complete(self) -> None:
        self.received_before_body.clear()
        self.finished, self.exchange = self.exchange, None
        if not self.reusable:
            self.transport.close()

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.exchange is None:  # nothing asked for: the connection is out of step, never reuse it
            self.reusable = False
            self.transport.close()
            return
        if not self.status:
            self.received_before_body.append(data)
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade:
            self.fail(ProtocolError("unexpected protocol upgrade"))
        except HttpParserError as exc:
            # A cap hit inside a parser callback comes back wrapped in HttpParserCallbackError.
            cause = exc.__context__
            if not isinstance(cause, ProtocolError):
                cause = ProtocolError(f"invalid HTTP response: {exc}")
            self.fail(cause)
        self.head_parser_abandoned = False
        if not self.status and self.exchange is not None:  # the final head is not complete yet
            self._check_head_caps()
        # Handed over inline, with the slot release inlined in _settle: 24.8k instead of 25.6k
        # instructions per request through Pool.submit (callgrind).
        exchange = self.finished
        if exchange is not None:
            self.finished = None
            self.pool._on_result(self, exchange, self.status)

    def _check_head_caps(self) -> None:
        error = head_over_cap(self.received_before_body, self.pool.max_response_head)
        if error is not None:
            self.fail(error)

    def eof_received(self) -> bool:
        self.reusable = False
        return False  # close our side too; connection_lost decides what the EOF meant

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        exchange = self.exchange
        if exchange is None:
            return
        if exc is None and self.status and _body_ends_at_eof(b"".join(self.received_before_body)):
            self._complete()
            self.finished = None
            self.pool._on_result(self, exchange, self.status)
        elif not self.received_before_body and self.exchanges > 1:
            self.exchange = None
            self.pool._on_result(
                self, exchange, _StaleConnection("reused connection closed before any response")
            )
        else:
            self.exchange = None
            detail = f": {exc}" if exc else ""
            self.pool._on_result(self, exchange, ResetError(f"connection closed mid-response{detail}"))

    # -- httptools callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.exchange is None and not self.head_parser_abandoned:
            # More after the response we wanted, in the same read: the connection is out of step and
            # the next request would be credited with this stray response's status.
            self.reusable = False

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        # Interim (100 Continue, 103 Early Hints): llhttp ends it, the final follows. No exchange: a
        # stray response, whose status must not replace that of the response not yet handed over.
        if status < 200 or self.exchange is None:
            self._count_interim()
            return
        self.status = status
        if self.head:
            # llhttp cannot know the request was HEAD and would wait for a body of Content-Length
            # bytes; the response ends here and the next one needs a fresh parser.
            self.reusable = self.parser.should_keep_alive()
            self.parser = HttpResponseParser(self)
            self.head_parser_abandoned = True
            self._complete()

    def on_message_complete(self) -> None:
        # No exchange: a stray response, already marked by on_message_begin, or the HEAD response that
        # on_headers_complete already ended. No status yet: an interim 1xx response.
        if self.exchange is not None and self.status:
            self.reusable = self.parser.should_keep_alive()
            self._complete()


def head_over_cap(received: list[bytes], limit: int) -> ProtocolError | None:
    """After a read that did not complete the final head, everything received so far is head: the
    error when it is over `limit` bytes. (Checked per read: a read that also completes the final
    head is at most asyncio's read size, and its head cannot be told from its body without a
    callback per header.) Shared by Pool's and PipelinedPool's connections."""
    if len(received) > 16:  # a shadow dribbling its head: keep the sum below cheap
        received[:] = [b"".join(received)]
    return ProtocolError(f"response head over {limit} bytes") if sum(map(len, received)) > limit else None


def final_head(received: bytes) -> bytes | None:
    """The final response head in `received`, after any interim (1xx) heads; None while it is not
    complete. Read only on the rare EOF paths, so no header callback is paid for on every response."""
    start = 0
    while True:
        end = received.find(b"\r\n\r\n", start)
        if end < 0:
            return None
        head = received[start:end].lstrip(b"\r\n")
        if head[9:10] != b"1":  # "HTTP/1.1 1xx": an interim response, the final one follows
            return head
        start = end + 4


_FRAMING_HEADER = re.compile(rb"\r\n(?:content-length|transfer-encoding)[ \t]*:", re.IGNORECASE)


def _body_ends_at_eof(received: bytes) -> bool:
    """Whether the final response's head (after any 1xx heads) declares no body length, so EOF ends
    the body rather than truncating it.

    Looked up here, on the rare EOF-mid-body path, rather than in an `on_header` callback: handing
    every header to Python cost ~1.5 us of the ~14 us a request cost in the benchmark."""
    head = final_head(received)
    return head is not None and _FRAMING_HEADER.search(head) is None


def parse_target_url(url: str) -> tuple[str, str, int, str]:
    """`(scheme, host, port, base_path)` of a shadow URL such as `https://[::1]:8443/prefix`.

    The host comes back without IPv6 brackets (ready for connecting), the port defaults to 80/443,
    and base_path has no trailing slash, so `base_path + request_target` is the shadow's target."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"invalid shadow URL {url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"invalid shadow URL {url!r}: scheme must be http or https, got {parts.scheme!r}")
    if not parts.hostname:
        raise ValueError(f"invalid shadow URL {url!r}: no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"invalid shadow URL {url!r}: credentials in the URL are not supported")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ValueError(f"invalid shadow URL {url!r}: a query or fragment has no meaning in a base URL")
    if port is None:
        port = 443 if scheme == "https" else 80
    return scheme, parts.hostname, port, parts.path.rstrip("/")


def authority(scheme: str, host: str, port: int) -> str:
    """The Host header value for a target: IPv6 literals bracketed, the scheme's default port left out."""
    hostpart = f"[{host}]" if ":" in host else host
    return hostpart if port == (443 if scheme == "https" else 80) else f"{hostpart}:{port}"

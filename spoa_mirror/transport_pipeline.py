"""HTTP/1.1 pipelining to a shadow (a target's `pipeline_depth` above 1): fewer system calls per request.

`transport.Pool` sends one request per connection at a time: one write and one read system call per
mirrored request. `PipelinedPool` lets up to `depth` requests wait on one connection for responses
that come back in order, and sends the requests one event loop iteration gives a connection in one
write. Placement fills the connection written to in this iteration first, then an idle one, then
opens one (up to `max_connections`), and only then queues behind requests already in flight on the
least loaded connection, so pipelining adds head-of-line waiting only when every connection is busy.

What it promises when a connection goes wrong, since requests may have reached the shadow:
- Responses are matched to requests in order; a response nobody asked for makes the connection
  unusable and is never credited to a request.
- A connection lost, timed out, or answered with a response the parser rejects ends every unanswered
  request on it, each settled once with that failure's reason ("reset", "timeout", "protocol").
  Nothing is retried that the shadow may have processed: the stale-connection retry (a reused idle
  connection the server closed before any byte of a response) applies only when that connection
  carried exactly one unanswered request, as in `Pool`.
- A response that ends its connection by declaring so (`Connection: close`, or HTTP/1.0 without
  keep-alive) ends the pipeline: the requests behind it were not processed (see `_complete`), so each
  is sent again, once, ahead of the backlog and in its order; one that meets a close response a
  second time ends as "reset". A response whose body ends at EOF without such a declaration leaves
  the requests behind it as "reset", since nothing says the shadow did not process them.
- The pool learns how many requests a shadow serves per connection (nginx: `keepalive_requests`,
  1000 by default; an HTTP/1.0 server: one) from the last close response, and pipelines no more than
  that on a connection, so requests are rarely put behind a close at all; a connection past the
  count still takes one request at a time when idle, which is how a larger count is learned again.
- Nothing is pipelined behind a HEAD request: llhttp cannot be told that a response has no body
  without a parser of its own, so the HEAD response ends its connection's pipeline and any bytes
  after it are stray.

Memory: every request submitted and not settled is in `bytes_held` (the target's memory budget), and
a connection takes another request only while its unanswered requests total at most
`max_pipeline_bytes` (a single larger request goes alone), so a dropped connection loses little.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections import deque
from collections.abc import Callable

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from .transport import (
    Done,
    Pool,
    PoolClosed,
    ProtocolError,
    RequestTimeout,
    ResetError,
    TransportError,
    _body_ends_at_eof,
    _Exchange,
    _ResponseConnection,
    _StaleConnection,
    final_head,
    head_over_cap,
)

# Unanswered request bytes one connection may carry: pipelining buys nothing for large bodies, and
# the bound keeps what a lost connection takes with it small.
MAX_PIPELINE_BYTES = 64 * 1024
MAX_PIPELINE_DEPTH = 64
UNLEARNED = 1 << 62  # requests per connection before the shadow closed one with a close response

_CONNECTION_OPTIONS = re.compile(rb"\r\nconnection[ \t]*:([^\r\n]*)", re.IGNORECASE)


class PipelinedPool(Pool):
    """`Pool`'s interface (`send`, `submit`, `close`, `bytes_held`), with up to `depth` requests in
    flight per connection, so `max_connections * depth` in flight at most; more wait in a backlog
    the caller bounds. `writes` counts the writes to connections (for tests and benchmarks)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        depth: int,
        max_pipeline_bytes: int = MAX_PIPELINE_BYTES,
        ssl_context: ssl.SSLContext | None = None,
        on_resent: Callable[[int], None] | None = None,
        **options: object,
    ) -> None:
        if not 1 <= depth <= MAX_PIPELINE_DEPTH:
            raise ValueError(f"pipeline depth must be 1 to {MAX_PIPELINE_DEPTH}, got {depth}")
        super().__init__(host, port, ssl_context=ssl_context, **options)  # type: ignore[arg-type]
        self.depth = depth
        self.max_pipeline_bytes = max_pipeline_bytes
        self.writes = 0
        self.resent = 0  # requests sent again because a close response ended the pipeline ahead of them
        self._on_resent = on_resent  # the target's count (spoa_mirror_pipeline_resent), kept across reloads
        # Requests the shadow answers on one connection before closing it, learned from its close
        # responses; a connection takes no more pipelined requests than that.
        self.requests_per_connection = UNLEARNED
        self._filling: list[_PipelinedConnection] = []  # written to in this loop iteration
        self._flush_handle: asyncio.Handle | None = None
        self._holding = False  # between hold_writes and release_writes

    def submit(self, request: bytes, done: Done, *, head: bool = False) -> _Exchange:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        exchange = _PipelinedExchange(request, head, done, loop.time())
        exchange.resent = False
        self.bytes_held += len(request)
        if self._closed:
            loop.call_soon(self._settle, exchange, PoolClosed(f"pool for {self.host}:{self.port} is closed"))
        elif self._backlog or not self._place(exchange):
            self._backlog.append(exchange)
        return exchange

    async def close(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._filling.clear()
        await super().close()

    def hold_writes(self) -> None:
        """Requests placed from now until `release_writes` are written by it, not by a callback in
        the next loop iteration: the agent's intake places a batch and writes it in the iteration
        that ran it. One loop iteration less per read at moderate rates (each costs uvloop's
        ready-queue turn and an epoll_wait)."""
        self._holding = True

    def release_writes(self) -> None:
        """One write per connection placed on since `hold_writes`, unless a flush is already
        scheduled (requests placed earlier in this iteration): it then writes these too."""
        self._holding = False
        if self._filling and self._flush_handle is None:
            self._flush()

    # -- placement and writes --------------------------------------------------------------------

    def _place(self, exchange: _Exchange) -> bool:
        """Puts the exchange on a connection (or a new one's connect task); False if none has room."""
        now = self._loop.time()  # type: ignore[union-attr]  # set by submit
        exchange.deadline = now + self.timeout
        filling = self._filling
        if filling and filling[-1].has_room(exchange):
            self._push(filling[-1], exchange)
            return True
        connection = self._take_idle(now)
        if connection is not None:
            self._busy.add(connection)
            self._push(connection, exchange)  # type: ignore[arg-type]
            return True
        if len(self._idle) + len(self._busy) + len(self._connecting) < self.max_connections:
            self._connect_for(exchange)
            return True
        best: _PipelinedConnection | None = None
        for candidate in self._busy:
            if candidate.has_room(exchange) and (
                best is None or len(candidate.inflight) < len(best.inflight)
            ):
                best = candidate  # type: ignore[assignment]
        if best is None:
            return False
        self._push(best, exchange)
        return True

    def _push(self, connection: _PipelinedConnection, exchange: _Exchange) -> None:
        connection.push(exchange)
        if not connection.filling:
            connection.filling = True
            self._filling.append(connection)
            if self._flush_handle is None and not self._holding:
                self._flush_handle = self._loop.call_soon(self._flush)  # type: ignore[union-attr]
        if self._deadline_sweep is None:
            self._deadline_sweep = self._loop.call_later(  # type: ignore[union-attr]
                self._deadline_tick, self._sweep_deadlines, self._loop
            )

    def _flush(self) -> None:
        """Once per loop iteration in which requests were placed: one write per connection."""
        self._flush_handle = None
        filling, self._filling = self._filling, []
        for connection in filling:
            connection.filling = False
            if connection.flush():
                self.writes += 1

    def _fill_from_backlog(self) -> None:
        backlog = self._backlog
        while backlog and not self._closed:
            exchange = backlog[0]
            if exchange.done is not None and not self._place(exchange):
                return
            backlog.popleft()

    async def _connect_then_begin(self, exchange: _Exchange) -> None:
        try:
            connection = await self._connect(self._loop, exchange.deadline)  # type: ignore[arg-type]
        except asyncio.CancelledError:
            self._settle(exchange, PoolClosed(f"pool for {self.host}:{self.port} closed"))
            return
        except Exception as error:  # a TransportError, or a bug of ours: the request still ends
            self._connecting.discard(exchange.connecting)  # type: ignore[arg-type]
            self._settle(exchange, error)
            self._fill_from_backlog()
            return
        self._connecting.discard(exchange.connecting)  # type: ignore[arg-type]  # counted as busy now
        exchange.connecting = None
        if exchange.done is None or self._closed:
            connection.transport.close()
            self._settle(exchange, PoolClosed(f"pool for {self.host}:{self.port} closed"))
            self._fill_from_backlog()
            return
        self._busy.add(connection)
        self._push(connection, exchange)  # type: ignore[arg-type]
        self._fill_from_backlog()

    def _new_connection(self) -> _PipelinedConnection:  # type: ignore[override]
        return _PipelinedConnection(self)

    # -- results ---------------------------------------------------------------------------------

    def _hand_over(
        self,
        connection: _PipelinedConnection,
        finished: list[tuple[_Exchange, int]],
        lost: list[_Exchange],
        error: TransportError | None,
        behind_close: list[_PipelinedExchange] | tuple[()] = (),
    ) -> None:
        """From the connection: the exchanges answered (in order), those it lost with `error`, and
        those a close response left unprocessed. The connection is put where it belongs first, and
        the requests to send again go to the front of the backlog before any callback runs, so the
        requests the callbacks submit queue behind them."""
        if not connection.inflight:
            self._busy.discard(connection)
            if connection.reusable and not self._closed:
                connection.idle_since = self._loop.time()  # type: ignore[union-attr]
                self._idle.append(connection)
                if self._idle_sweep is None:
                    self._idle_sweep = self._loop.call_later(  # type: ignore[union-attr]
                        self.idle_timeout, self._sweep_idle, self._loop
                    )
            else:
                connection.transport.close()
        closed_twice: list[_PipelinedExchange] = []
        if behind_close:
            again: list[_PipelinedExchange] = []
            for exchange in behind_close:
                if exchange.done is None:  # cancelled
                    continue
                exchange.connection = None
                (closed_twice if exchange.resent else again).append(exchange)
                exchange.resent = True
            self._backlog.extendleft(reversed(again))
            self.resent += len(again)
            if self._on_resent is not None and again:
                self._on_resent(len(again))
        for exchange, status in finished:
            self._settle(exchange, status)
        if closed_twice:
            closed = ResetError("the shadow closed the connection ahead of this request a second time")
            for exchange in closed_twice:
                self._settle(exchange, closed)
        if type(error) is _StaleConnection:  # exactly one unanswered request (see the connection)
            exchange = lost[0]
            exchange.connection = None
            if exchange.done is not None:
                self._connect_for(exchange)  # once: a new connection cannot be stale
        else:
            for exchange in lost:
                self._settle(exchange, error)  # type: ignore[arg-type]
        if self._backlog:  # usually empty: no call then
            self._fill_from_backlog()

    def _settle(self, exchange: _Exchange, result: int | Exception) -> None:
        done = exchange.done
        if done is None:  # cancelled
            return
        exchange.done = None
        self.bytes_held -= len(exchange.request)
        exchange.connection = exchange.connecting = None
        done(result, self._loop.time() - exchange.submitted)  # type: ignore[union-attr]

    def _cancel(self, exchange: _Exchange) -> None:
        """`send`'s caller was cancelled: the request is given up. On a connection it stays in the
        pipeline (it cannot be unsent) and its response, when it comes, is dropped."""
        if exchange.done is None:
            return
        exchange.done = None
        self.bytes_held -= len(exchange.request)
        if exchange.connecting is not None:
            exchange.connecting.cancel()


class _PipelinedExchange(_Exchange):
    """`resent`: sent again once already, after a close response ended the pipeline ahead of it."""

    __slots__ = ("resent",)


class _PipelinedConnection(_ResponseConnection):
    """One connection and the requests in flight on it, oldest (the one being answered) first.

    As in `transport._Connection`, the pool hears of responses only once `feed_data` has returned;
    here a read may complete several. `mid_read_start`: the response being parsed began in a read
    that completed an earlier one, so `received_before_body` does not start with its head and EOF
    cannot be judged an end of its body (counted as "reset")."""

    __slots__ = (
        "behind_close",
        "completed_in_read",
        "filling",
        "finished",
        "inflight",
        "mid_read_start",
        "outbox",
        "pushed",
        "quiet",
        "served",
        "tail_is_head",
        "unanswered_bytes",
    )
    pool: PipelinedPool

    def __init__(self, pool: PipelinedPool) -> None:
        super().__init__(pool)
        self.inflight: deque[_Exchange] = deque()
        self.outbox: list[bytes] = []  # placed in this loop iteration, not written yet
        self.unanswered_bytes = 0
        self.filling = False
        self.tail_is_head = False  # the last request placed is a HEAD: nothing may follow it
        self.finished: list[tuple[_Exchange, int]] = []  # answered in this read, not handed over yet
        self.behind_close: list[_PipelinedExchange] = []  # behind a close response, not handed over yet
        self.completed_in_read = False
        self.mid_read_start = False
        self.quiet = True  # nothing received since the connection last had nothing in flight
        self.served = 0
        self.pushed = 0  # requests placed on this connection, ever

    # -- driven by the pool ----------------------------------------------------------------------

    def has_room(self, exchange: _Exchange) -> bool:
        pool = self.pool
        return (
            self.reusable
            and not self.tail_is_head
            and len(self.inflight) < pool.depth
            and self.pushed < pool.requests_per_connection
            and self.unanswered_bytes + len(exchange.request) <= pool.max_pipeline_bytes
        )

    def push(self, exchange: _Exchange) -> None:
        inflight = self.inflight
        if not inflight:
            self.deadline = exchange.deadline
            self.quiet = True
        inflight.append(exchange)
        self.pushed += 1
        exchange.connection = self  # type: ignore[assignment]
        self.unanswered_bytes += len(exchange.request)
        self.tail_is_head = exchange.head
        self.outbox.append(exchange.request)

    def flush(self) -> bool:
        outbox = self.outbox
        if not outbox or self.transport.is_closing():
            outbox.clear()
            return False
        self.transport.write(outbox[0] if len(outbox) == 1 else b"".join(outbox))
        outbox.clear()
        return True

    def time_out(self) -> None:
        if self.inflight:
            self.fail(RequestTimeout("no complete response in time"))

    def fail(self, error: TransportError) -> None:
        """Drops the connection; every unanswered request on it ends with `error`."""
        lost = list(self.inflight)
        self._drop()
        self.transport.abort()
        self.pool._hand_over(self, [], lost, error)

    def _drop(self) -> None:
        self.reusable = False
        self.inflight.clear()
        self.outbox.clear()
        self.unanswered_bytes = 0
        self.received_before_body.clear()

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        inflight = self.inflight
        if not inflight:  # nothing asked for: the connection is out of step, never reuse it
            self.reusable = False
            self.transport.close()
            return
        self.quiet = False
        self.completed_in_read = False
        if not self.status:
            self.received_before_body.append(data)
        error: TransportError | None = None
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade:
            error = ProtocolError("unexpected protocol upgrade")
        except HttpParserError as exc:
            cause = exc.__context__  # a cap hit inside a callback comes back wrapped
            error = (
                cause if isinstance(cause, ProtocolError) else ProtocolError(f"invalid HTTP response: {exc}")
            )
        self.head_parser_abandoned = False
        if error is not None and not inflight and not self.reusable:
            error = None  # bytes after a response that ended the connection: llhttp refuses them, unread
        if error is None and not self.status and inflight:
            error = head_over_cap(self.received_before_body, self.pool.max_response_head)
        finished, behind_close = self.finished, self.behind_close
        lost: list[_Exchange] = []
        if error is not None:
            lost.extend(inflight)
            self._drop()
            self.transport.abort()
        if finished or lost or behind_close:
            self.finished, self.behind_close = [], []
            self.pool._hand_over(self, finished, lost, error, behind_close)

    def eof_received(self) -> bool:
        self.reusable = False
        return False  # close our side too; connection_lost decides what the EOF meant

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        inflight = self.inflight
        if not inflight:
            return
        finished: list[tuple[_Exchange, int]] = []
        received = b"".join(self.received_before_body)
        if exc is None and self.status and not self.mid_read_start and _body_ends_at_eof(received):
            finished.append((inflight.popleft(), self.status))
            self.served += 1
            if _declares_close(received):  # see _complete: the rest were not processed
                self.pool.requests_per_connection = self.served
                behind_close: list[_PipelinedExchange] = list(inflight)  # type: ignore[arg-type]
                self._drop()
                self.pool._hand_over(self, finished, [], None, behind_close)
                return
            error: TransportError = ResetError(
                f"connection closed after a response without a length, {len(inflight)} requests behind it"
            )
        elif self.quiet and self.served and len(inflight) == 1:
            error = _StaleConnection("reused connection closed before any response")
        else:
            detail = f": {exc}" if exc else ""
            error = ResetError(f"connection closed mid-response{detail}")
        lost = list(inflight)
        self._drop()
        self.pool._hand_over(self, finished, lost, error)

    # -- httptools callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if not self.inflight:
            if not self.head_parser_abandoned:  # a response nobody asked for: out of step
                self.reusable = False
        elif self.completed_in_read:
            self.mid_read_start = True

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200 or not self.inflight:  # interim, or a stray whose status must not count
            self._count_interim()
            return
        self.status = status
        if self.inflight[0].head:  # nothing is pipelined behind a HEAD: see the module docstring
            if not self.parser.should_keep_alive():  # close, or just no length: not learned from
                self.reusable = False
            self.parser = HttpResponseParser(self)
            self.head_parser_abandoned = True
            self._complete(False)

    def on_message_complete(self) -> None:
        if self.inflight and self.status:
            # A complete message: llhttp's "no keep-alive" can only mean `Connection: close` or
            # HTTP/1.0 without keep-alive here (a body ending at EOF never completes in feed_data).
            self._complete(not self.parser.should_keep_alive())

    def _complete(self, closing: bool) -> None:
        """The oldest request's response is complete. `closing`: it ends the connection, and then
        the requests pipelined behind it go back to the pool to be sent again. RFC 9112 section 9.6:
        "A server that sends a "close" connection option MUST initiate closure of the connection
        (see below) after it sends the response containing the "close" connection option. The
        server MUST NOT process any further requests received on that connection." An HTTP/1.0
        response without keep-alive says the same of a server that serves one request per
        connection (RFC 9112 section 9.3: "otherwise, the connection will close after the current
        response"; RFC 1945 section 1.3: the connection is "closed by the server after sending the
        response")."""
        inflight = self.inflight
        exchange = inflight.popleft()
        self.unanswered_bytes -= len(exchange.request)
        self.finished.append((exchange, self.status))
        self.served += 1
        self.status = self.interim = 0
        self.received_before_body.clear()
        self.completed_in_read = True
        self.mid_read_start = False
        if closing:
            self.reusable = False
            self.pool.requests_per_connection = self.served
            if inflight:
                self.behind_close.extend(inflight)  # type: ignore[arg-type]
                inflight.clear()
                self.unanswered_bytes = 0
                self.transport.close()
            self.tail_is_head = False
        elif not inflight:
            self.tail_is_head = False
        else:
            self.deadline = inflight[0].deadline


def _declares_close(received: bytes) -> bool:
    """Whether the final response head in `received` (after any 1xx heads) ends its connection by
    declaring so: a `close` connection option, or HTTP/1.0 without `keep-alive`. On the rare path of
    a body that ended at EOF only, so no header callback is paid for on every response."""
    head = final_head(received)
    if head is None:
        return False
    options = b",".join(match.group(1) for match in _CONNECTION_OPTIONS.finditer(head)).lower()
    tokens = {token.strip() for token in options.split(b",")}
    if b"close" in tokens:
        return True
    return head.startswith(b"HTTP/1.0") and b"keep-alive" not in tokens

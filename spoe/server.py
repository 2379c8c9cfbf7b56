"""The asyncio edge: one `asyncio.Protocol` per SPOP connection around a sans-IO `Connection`.

As in uvicorn's httptools protocol: callbacks at the edge, all output of one read joined and written
once, idempotent pause/resume flow control, timers with `call_later`, background tasks kept in a set
with `add_done_callback(discard)`. Handlers run synchronously inside `data_received`, so the ACK of
a NOTIFY is written as soon as its handlers return; work that must not delay the ACK (mirroring) is
handed to `Agent.spawn` or to the application's own queues.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import socket
import ssl as ssl_module
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import structlog

from .connection import CAPABILITIES, Connection, ReassemblyBudget
from .data import Uint32
from .errors import Status
from .events import NEED_DATA, Closed, Hello, Notify, NotifyAborted
from .frames import Action, FrameType, Message, encode_frame
from .log import LogThrottle
from .spec import build_kv_list

Handler = Callable[[Message], Iterable[Action] | Awaitable[Iterable[Action] | None] | None]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

log = structlog.get_logger("spoe")
_PLAIN_RESULTS = (type(None), list, tuple)


@dataclass
class AgentStats:
    """Plain counters, read at scrape time by whoever exports metrics (no cost on the hot path)."""

    connections_total: int = 0
    connections_open: int = 0
    connections_refused: int = 0
    connections_evicted: int = 0
    healthchecks: int = 0
    notifies: int = 0
    acks: int = 0
    aborted: int = 0
    handler_errors: int = 0
    closed_by_status: dict[str, int] = field(default_factory=dict)


class Agent:
    """An SPOP agent: register handlers by message name, then `start()`.

    A handler takes the `Message` and returns the actions for the ACK (or None). It may be a
    coroutine function; the ACK then waits for it, and `max_inflight` bounds how many such NOTIFYs a
    connection may have open before the agent stops reading from it.

    Slots and memory are held against misbehaving peers: a frame (or a fragmented NOTIFY) must
    arrive whole within `frame_timeout` seconds of its first byte; fragmented NOTIFYs of all
    connections together hold at most `reassembly_budget` bytes; and at `max_connections` a new
    connection takes the slot of the one that has gone longest without a HELLO or a NOTIFY (if that
    is over `EVICT_AFTER` seconds and nothing of it is unanswered) instead of being refused, so idle
    or dribbling peers cannot lock HAProxy out.
    """

    EVICT_AFTER = 1.0

    def __init__(
        self,
        *,
        max_frame_size: int = 16384,
        capabilities: Iterable[str] = CAPABILITIES,
        max_connections: int = 1000,
        hello_timeout: float = 5.0,
        idle_timeout: float = 60.0,
        max_inflight: int = 256,
        max_reassembly: int = 1 << 20,
        reassembly_budget: int = 32 << 20,
        frame_timeout: float = 5.0,
        max_notify_entries: int = 1024,
        allow_networks: Iterable[str] = (),
    ) -> None:
        self.max_frame_size = max_frame_size
        self.capabilities = frozenset(capabilities)
        Connection(max_frame_size=max_frame_size, capabilities=self.capabilities)  # validate early
        self.max_connections = max_connections
        self.hello_timeout = hello_timeout
        self.idle_timeout = idle_timeout
        self.max_inflight = max_inflight
        self.max_reassembly = max_reassembly
        self.reassembly_budget = ReassemblyBudget(reassembly_budget)
        self.frame_timeout = frame_timeout
        self.max_notify_entries = max_notify_entries
        self.allow_networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(net, strict=False) for net in allow_networks
        )
        self.stats = AgentStats()
        self.log_throttle = LogThrottle()
        self._handlers: dict[str, tuple[Handler, bool]] = {}
        self._default: tuple[Handler, bool] | None = None
        self._protocols: set[SpopProtocol] = set()
        self._servers: list[asyncio.base_events.Server] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._stopping = False

    def handler(self, name: str) -> Callable[[Handler], Handler]:
        """Decorator: `@agent.handler("check-request")`."""

        def register(fn: Handler) -> Handler:
            self.add_handler(name, fn)
            return fn

        return register

    def add_handler(self, name: str, fn: Handler) -> None:
        self._handlers[name] = (fn, inspect.iscoroutinefunction(fn))

    def set_default_handler(self, fn: Handler | None) -> None:
        """Called for messages that have no handler of their own."""
        self._default = None if fn is None else (fn, inspect.iscoroutinefunction(fn))

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run work in the background, never delaying an ACK; the task is kept until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    @property
    def connections(self) -> int:
        return len(self._protocols)

    async def start(
        self,
        host: str | list[str] | None = "127.0.0.1",
        port: int = 12345,
        *,
        reuse_port: bool = False,
        ssl: ssl_module.SSLContext | None = None,
        sock: socket.socket | None = None,
        backlog: int = 1024,
    ) -> list[tuple[str, int]]:
        """Listen; returns the bound (host, port) pairs (port 0 picks a free one)."""
        loop = asyncio.get_running_loop()
        if sock is not None:
            server = await loop.create_server(self._new_protocol, sock=sock, ssl=ssl, backlog=backlog)
        else:
            server = await loop.create_server(
                self._new_protocol, host, port, reuse_port=reuse_port or None, ssl=ssl, backlog=backlog
            )
        self._servers.append(server)
        return [s.getsockname()[:2] for s in server.sockets]

    async def stop(self, timeout: float = 5.0) -> None:
        """Graceful stop: stop accepting, AGENT-DISCONNECT (status 0) on every connection, close."""
        self._stopping = True
        for server in self._servers:
            server.close()
        for protocol in list(self._protocols):
            protocol.shutdown(Status.NORMAL, "agent stopping")
        deadline = asyncio.get_running_loop().time() + timeout
        while self._protocols and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        for protocol in list(self._protocols):
            protocol.abort()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    def _new_protocol(self) -> SpopProtocol:
        return SpopProtocol(self)

    def _admits(self, peer: Any) -> bool:
        if not self.allow_networks:
            return True
        try:
            address = ipaddress.ip_address(peer[0])
        except (TypeError, ValueError, IndexError):
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in net for net in self.allow_networks)

    def _reclaim_slot(self) -> bool:
        """At max_connections: close the connection that has gone longest without completing a
        HELLO or a NOTIFY (a connection waiting for its HELLO counts from its connect), when that is
        over EVICT_AFTER seconds and it has no NOTIFY unanswered. A real HAProxy sends its HELLO and
        NOTIFYs at once, so idle, dribbling or silent peers are closed before any working HAProxy
        connection; one of HAProxy's own idle connections may be closed too, which it replaces
        when it next needs one. Returns whether a slot was freed."""
        now = asyncio.get_running_loop().time()
        candidates = [p for p in self._protocols if p.conn.unacked == 0 and not p._pending]
        if not candidates:
            return False
        victim = min(candidates, key=_last_progress)
        idle_for = now - victim._last_progress
        if idle_for < self.EVICT_AFTER:
            return False
        victim.evict(idle_for)
        return True


def _last_progress(protocol: SpopProtocol) -> float:
    return protocol._last_progress


_next_connection_id = 0


class SpopProtocol(asyncio.Protocol):
    """The I/O edge of one connection."""

    def __init__(self, agent: Agent) -> None:
        global _next_connection_id
        _next_connection_id += 1
        self.agent = agent
        self.id = _next_connection_id
        self.conn = Connection(
            max_frame_size=agent.max_frame_size,
            capabilities=agent.capabilities,
            max_reassembly=agent.max_reassembly,
            reassembly_budget=agent.reassembly_budget,
            max_notify_entries=agent.max_notify_entries,
        )
        self.transport: asyncio.Transport | None = None
        self.log = log
        self._loop = asyncio.get_event_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._last_activity = 0.0
        self._last_progress = 0.0  # the connect, the HELLO, or the last NOTIFY
        # The frame deadline: `conn.incomplete_mark` as last seen, since when, and one timer that is
        # armed when a frame starts being incomplete and no timer is pending (never cancelled per
        # frame: it re-arms itself for the frame then incomplete, if any).
        self._incomplete_mark: int | None = None
        self._incomplete_since = 0.0
        self._frame_timer: asyncio.TimerHandle | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._pending: set[asyncio.Task[Any]] = set()
        self._closed_event: Closed | None = None

    # asyncio callbacks -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport: an isinstance check would refuse them.
        self.transport = cast(asyncio.Transport, transport)
        agent = self.agent
        peer = transport.get_extra_info("peername")
        self.log = log.bind(conn=self.id, peer=_format_peer(peer))
        refusal = None
        if agent._stopping:
            refusal = (Status.NORMAL, "agent stopping")
        elif not agent._admits(peer):
            refusal = (Status.UNKNOWN, "client address not allowed")
        elif len(agent._protocols) >= agent.max_connections and not agent._reclaim_slot():
            refusal = (Status.RESOURCE_ALLOCATION, "too many connections")
        if refusal is not None:
            agent.stats.connections_refused += 1
            self._log_throttled("spop.connection.refused", "warning", reason=refusal[1])
            # Counted and logged as a refusal: connection_lost must not report it as a close.
            self._closed_event = Closed(*refusal, by_peer=False)
            transport.write(_disconnect_frame(*refusal))
            transport.close()
            return
        agent._protocols.add(self)
        agent.stats.connections_total += 1
        agent.stats.connections_open += 1
        self._last_activity = self._last_progress = self._loop.time()
        self._timer = self._loop.call_later(agent.hello_timeout, self._on_timer)
        self.log.debug("spop.connection.open")

    def data_received(self, data: bytes) -> None:
        self._last_activity = self._loop.time()
        self.conn.receive_data(data)
        self._process()

    def eof_received(self) -> bool | None:
        self.conn.receive_data(b"")
        self._process()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        agent = self.agent
        if self in agent._protocols:
            agent._protocols.discard(self)
            agent.stats.connections_open -= 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._frame_timer is not None:
            self._frame_timer.cancel()
            self._frame_timer = None
        for task in self._pending:
            task.cancel()
        if self._closed_event is None:
            # HAProxy 3.x ends SPOP connections without a DISCONNECT, with a reset on a soft stop: normal.
            reason = "reset by peer" if isinstance(exc, ConnectionResetError) else "closed by peer"
            if exc is not None and not isinstance(exc, ConnectionResetError):
                reason = f"{type(exc).__name__}: {exc}"
            self._count_close(Status.NORMAL)
            self.log.debug("spop.connection.closed", reason=reason, by_peer=True)

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._process()

    # processing --------------------------------------------------------------------------------

    def _process(self) -> None:
        """Pull every ready event, run the handlers, write all output once."""
        conn = self.conn
        agent = self.agent
        max_inflight = agent.max_inflight
        # conn._unacked_count is what the `unacked` property reads: one call less per NOTIFY.
        while not self._writing_paused and conn._unacked_count < max_inflight:
            event = conn.next_event()
            if event is NEED_DATA:
                break
            if type(event) is Notify:
                agent.stats.notifies += 1
                self._last_progress = self._last_activity
                self._on_notify(event)
            elif type(event) is Hello:
                self._on_hello(event)
            elif type(event) is Closed:
                self._on_closed(event)
                return
            elif type(event) is NotifyAborted:
                agent.stats.aborted += 1
        self._flush()
        if self._writing_paused or conn._unacked_count >= max_inflight:
            self._pause_reading()
            self._incomplete_mark = None  # bytes waiting on us, not on the peer
        else:
            if self._reading_paused:  # asked here, not by a call on every read
                self._resume_reading()
            mark = conn.incomplete_mark
            if mark != self._incomplete_mark:
                self._incomplete_mark = mark
                if mark is not None:
                    self._incomplete_since = self._loop.time()
                    if self._frame_timer is None:
                        deadline = self._on_frame_deadline
                        self._frame_timer = self._loop.call_later(agent.frame_timeout, deadline)

    def _on_notify(self, event: Notify) -> None:
        # A handler's own list or tuple goes to the ACK as it is (a constant tuple is then encoded
        # once, see encode_ack_actions); several handlers' results are joined into a new list.
        actions: Sequence[Action] = ()
        awaiting: list[Awaitable[Any]] | None = None
        handlers = self.agent._handlers
        default = self.agent._default
        for message in event.messages:
            entry = handlers.get(message.name, default)
            if entry is None:
                continue
            fn, is_async = entry
            try:
                result = fn(message)
            except Exception:
                self._handler_failed(message.name, event)
                continue
            # inspect.isawaitable costs ~0.3 us a call; None, a list or a tuple never is awaitable.
            if is_async or (type(result) not in _PLAIN_RESULTS and inspect.isawaitable(result)):
                if awaiting is None:
                    awaiting = []
                awaiting.append(result)  # type: ignore[arg-type]
            elif result:
                actions = [*actions, *result] if actions else result
        if awaiting:
            task = self._loop.create_task(self._ack_later(event, actions, awaiting))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        else:
            self._ack(event, actions)

    async def _ack_later(
        self, event: Notify, actions: Sequence[Action], awaiting: list[Awaitable[Any]]
    ) -> None:
        for awaitable in awaiting:
            try:
                result = await awaitable
            except Exception:
                self._handler_failed("async", event)
                continue
            if result:
                actions = [*actions, *result]
        self._ack(event, actions)
        self._process()

    def _ack(self, event: Notify, actions: Sequence[Action]) -> None:
        try:
            self.conn.send_ack(event.stream_id, event.frame_id, actions)
        except Exception as error:
            self._handler_failed("ack", event, error=str(error))
            self.conn.send_ack(event.stream_id, event.frame_id, ())
        self.agent.stats.acks += 1

    def _handler_failed(self, name: str, event: Notify, **fields: Any) -> None:
        """Logged with the stream and frame ids, so one failure can be found in HAProxy's logs."""
        self.agent.stats.handler_errors += 1
        self._log_throttled(
            "spop.handler.error",
            "error",
            key=name,
            message_name=name,
            stream_id=event.stream_id,
            frame_id=event.frame_id,
            exc_info=True,
            **fields,
        )

    def _on_hello(self, event: Hello) -> None:
        self._last_progress = self._last_activity
        if event.healthcheck:
            self.agent.stats.healthchecks += 1
        else:
            self._timer_to_idle()
        self.log.debug(
            "spop.hello",
            version=event.version,
            max_frame_size=event.max_frame_size,
            capabilities=sorted(event.capabilities),
            engine_id=event.engine_id,
            healthcheck=event.healthcheck,
        )

    def _on_closed(self, event: Closed) -> None:
        self._closed_event = event
        self._flush()
        self._count_close(event.status)
        if event.status is Status.NORMAL or event.by_peer:
            self.log.debug(
                "spop.connection.closed",
                status=event.status.name,
                reason=event.message,
                by_peer=event.by_peer,
            )
        else:
            self._log_throttled(
                "spop.protocol_error",
                "warning",
                status=int(event.status),
                status_name=event.status.name,
                reason=event.message,
            )
        if self.transport is not None:
            self.transport.close()
            if self.transport.get_write_buffer_size():
                # close() waits for the peer to read what is buffered: one that never reads would
                # keep the connection, its buffer and its max_connections slot forever.
                if self._timer is not None:
                    self._timer.cancel()
                self._timer = self._loop.call_later(self.agent.idle_timeout, self.abort)

    def _flush(self) -> None:
        out = self.conn.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.transport.is_closing():
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.transport.is_closing():
            self._reading_paused = False
            self.transport.resume_reading()

    # timers and shutdown -----------------------------------------------------------------------

    def _timer_to_idle(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(self.agent.idle_timeout, self._on_timer)

    def _on_timer(self) -> None:
        """Hello timeout before the handshake, idle timeout after it. The idle deadline is checked
        against the last read rather than re-armed on every read, which would cost a timer per read."""
        self._timer = None
        if self.conn.hello is None:
            self.shutdown(Status.TIMEOUT, "hello timeout")
            return
        idle_for = self._loop.time() - self._last_activity
        remaining = self.agent.idle_timeout - idle_for
        if remaining > 0 or self._pending:
            self._timer = self._loop.call_later(max(remaining, 0.1), self._on_timer)
            return
        self.shutdown(Status.TIMEOUT, "idle timeout")

    def _on_frame_deadline(self) -> None:
        """A frame, or a fragmented NOTIFY, started arriving `frame_timeout` ago and is still not
        whole: the peer dribbles (one byte a second kept a connection forever), so it is cut."""
        self._frame_timer = None
        if self._incomplete_mark is None:
            return
        remaining = self._incomplete_since + self.agent.frame_timeout - self._loop.time()
        if remaining > 0:
            self._frame_timer = self._loop.call_later(remaining, self._on_frame_deadline)
            return
        self.shutdown(Status.TIMEOUT, f"frame incomplete after {self.agent.frame_timeout:g} s")

    def evict(self, idle_for: float) -> None:
        """Give this connection's slot to a new one (see `Agent._reclaim_slot`)."""
        agent = self.agent
        agent._protocols.discard(self)
        agent.stats.connections_open -= 1
        agent.stats.connections_evicted += 1
        hello = self.conn.hello is not None
        self._log_throttled("spop.connection.evicted", "warning", idle_for=round(idle_for, 3), hello=hello)
        self.shutdown(Status.RESOURCE_ALLOCATION, "connection slot given to a new connection")

    def shutdown(self, status: Status, message: str) -> None:
        event = self.conn.close(status, message)
        if event is not None:
            self._on_closed(event)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _count_close(self, status: Status) -> None:
        counts = self.agent.stats.closed_by_status
        counts[status.name] = counts.get(status.name, 0) + 1

    def _log_throttled(self, event: str, level: str, key: str = "", **fields: Any) -> None:
        """At most one line a minute per event (and key): a flood must not flood the log."""
        suppressed = self.agent.log_throttle.allow(f"{event}:{key}")
        if suppressed is None:
            return
        if suppressed:
            fields["suppressed"] = suppressed
        getattr(self.log, level)(event, **fields)


def _disconnect_frame(status: Status, message: str) -> bytes:
    payload = build_kv_list({"status-code": Uint32(int(status)), "message": message})
    return encode_frame(FrameType.AGENT_DISCONNECT, 1, 0, 0, payload)


def _format_peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


def run(main: Coroutine[Any, Any, Any]) -> Any:
    """`asyncio.run`, on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)

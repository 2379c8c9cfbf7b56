"""A scripted HAProxy for tests.

It builds the frames HAProxy sends (HAProxy 2.x and 3.x flavours, health checks, NOTIFYs whole or
fragmented at arbitrary byte offsets, ABORT, DISCONNECT) and parses what the agent answers, so tests
can assert the exact frames the engine replies with rather than "something came back". The same
builders drive `spoe.Connection` directly (`exchange`) and `spoe.Agent` over TCP (`TcpPeer`).

What the two HAProxy generations do differently, and why the flavours exist:
  * 2.x (Debian's 2.6) offers "pipelining,async" and, towards agents announcing "fragmentation",
    may split a NOTIFY payload anywhere, even inside a value: NOTIFY without FIN, then UNSET frames
    with the same ids, the last one with FIN; an UNSET with FIN|ABORT cancels it.
  * 3.1+ offers "pipelining" only, never fragments, sets FIN on every frame, pipelines up to 20
    streams per connection, and ends a connection without a DISCONNECT: a plain close when idle or
    on a reload, a reset on a soft stop. It sends HAPROXY-DISCONNECT only for an AGENT-HELLO it
    refuses (tests/test_haproxy_spop.py pins all this on the real 3.2).
    3.1.0 never wakes the SPOE filter on an ACK without actions (each such request waits the full
    `timeout processing`; fixed by upstream commit 851e52b5), so a `TcpPeer` that said HELLO as 3.x
    fails on an empty ACK.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import Any

from spoe import Connection, Event, Message, SetVar, Status, UnsetVar, VarScope
from spoe.data import Int32, Int64, Uint32, Uint64
from spoe.events import NEED_DATA
from spoe.frames import (
    FLAG_ABORT,
    FLAG_FIN,
    LENGTH_PREFIX,
    Action,
    Frame,
    FrameType,
    encode_frame,
    encode_kv_list,
    encode_messages,
)
from tests.support import spop_oracle

HAPROXY_2X_CAPABILITIES = "pipelining,async"
HAPROXY_3X_CAPABILITIES = "pipelining"
HAPROXY_MAX_FRAME_SIZE = 16380  # HAProxy's default: tune.bufsize (16384) minus the length prefix
HAPROXY_3X_MAX_PIPELINED_STREAMS = 20
UNKNOWN_FRAME_TYPE = 42  # not in SPOE.txt 3.2.2: "Unknown frames may be silently skipped"


# Frames HAProxy sends ------------------------------------------------------------------------------


def haproxy_hello(
    *,
    versions: str = "2.0",
    max_frame_size: Any = HAPROXY_MAX_FRAME_SIZE,
    capabilities: str = HAPROXY_2X_CAPABILITIES,
    engine_id: str | None = "3D2E1C5A-0B4F-4C8E-9A6D-7F1E2B3C4D5E",
    healthcheck: bool | None = None,
    omit: Iterable[str] = (),
    **overrides: Any,
) -> bytes:
    """A HAPROXY-HELLO. For the handshake error paths, `omit` drops mandatory items, `overrides`
    replaces items by name (underscores for dashes), and a `max_frame_size` that is not a plain int
    goes out as given instead of as a UINT32."""
    items: dict[str, Any] = {
        "supported-versions": versions,
        "max-frame-size": Uint32(max_frame_size) if type(max_frame_size) is int else max_frame_size,
        "capabilities": capabilities,
    }
    if healthcheck is not None:
        items["healthcheck"] = healthcheck
    if engine_id is not None:
        items["engine-id"] = engine_id
    for name, value in overrides.items():
        items[name.replace("_", "-")] = value
    for name in omit:
        del items[name]
    return encode_frame(FrameType.HAPROXY_HELLO, FLAG_FIN, 0, 0, encode_kv_list(items))


def hello_2x(*, offer_fragmentation: bool = False, **overrides: Any) -> bytes:
    """HAProxy 2.x: offers pipelining and async. It never offers fragmentation itself (it cannot
    receive fragments); `offer_fragmentation` checks that an offer would change nothing for us."""
    capabilities = HAPROXY_2X_CAPABILITIES + (",fragmentation" if offer_fragmentation else "")
    return haproxy_hello(capabilities=capabilities, **overrides)


def hello_3x(**overrides: Any) -> bytes:
    """HAProxy 3.1+: pipelining only, no async, no fragmentation."""
    return haproxy_hello(capabilities=HAPROXY_3X_CAPABILITIES, **overrides)


def healthcheck_hello() -> bytes:
    """What `option spop-check` sends: healthcheck=true, version 2.0, 16380, empty capabilities."""
    return haproxy_hello(
        versions="2.0", max_frame_size=16380, capabilities="", engine_id=None, healthcheck=True
    )


def notify(stream_id: int, frame_id: int, messages: Sequence[Message], *, flags: int = FLAG_FIN) -> bytes:
    return encode_frame(FrameType.NOTIFY, flags, stream_id, frame_id, encode_messages(list(messages)))


def unset(stream_id: int, frame_id: int, payload: bytes = b"", *, flags: int = 0) -> bytes:
    """A continuation fragment: frame type UNSET (0), same ids as the NOTIFY it continues."""
    return encode_frame(FrameType.UNSET, flags, stream_id, frame_id, payload)


def abort(stream_id: int, frame_id: int) -> bytes:
    """HAProxy 2.x cancelling a fragmented NOTIFY: an empty UNSET with ABORT, and FIN as the spec
    requires whenever ABORT is set."""
    return unset(stream_id, frame_id, flags=FLAG_FIN | FLAG_ABORT)


def split_payload(payload: bytes, cuts: Iterable[int]) -> list[bytes]:
    """`payload` cut at the given byte offsets (sorted, duplicates allowed: they make empty pieces)."""
    bounds = [0, *sorted(cuts), len(payload)]
    return [payload[start:end] for start, end in pairwise(bounds)]


def notify_fragments(
    stream_id: int, frame_id: int, messages: Sequence[Message], cuts: Iterable[int]
) -> list[bytes]:
    """A NOTIFY whose payload is split at `cuts` (byte offsets into the message list, so a cut can
    fall inside a name or a value): NOTIFY without FIN, UNSETs without FIN, the last with FIN."""
    pieces = split_payload(encode_messages(list(messages)), cuts)
    if len(pieces) < 2:
        raise ValueError("a fragmented NOTIFY needs at least one cut")
    frames = [encode_frame(FrameType.NOTIFY, 0, stream_id, frame_id, pieces[0])]
    frames += [unset(stream_id, frame_id, piece) for piece in pieces[1:-1]]
    frames.append(unset(stream_id, frame_id, pieces[-1], flags=FLAG_FIN))
    return frames


def haproxy_disconnect(status: int = Status.NORMAL, message: str = "normal") -> bytes:
    payload = encode_kv_list({"status-code": Uint32(int(status)), "message": message})
    return encode_frame(FrameType.HAPROXY_DISCONNECT, FLAG_FIN, 0, 0, payload)


def raw_frame(frame_type: int, payload: bytes = b"", *, stream_id: int = 0, frame_id: int = 0) -> bytes:
    """Any frame type with any payload, for unknown types and malformed payloads."""
    return encode_frame(frame_type, FLAG_FIN, stream_id, frame_id, payload)


# Parsing what the agent sends -----------------------------------------------------------------------


class FrameParser:
    """Incremental: feed bytes as they arrive, get back each complete frame once."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self.buffer += data
        frames = []
        while len(self.buffer) >= LENGTH_PREFIX:
            (length,) = struct.unpack_from(">I", self.buffer)
            end = LENGTH_PREFIX + length
            if len(self.buffer) < end:
                break
            frames.append(_decode_frame(bytes(self.buffer[LENGTH_PREFIX:end])))
            del self.buffer[:end]
        return frames


def parse_frames(data: bytes) -> list[Frame]:
    """Every frame in `data`, which must hold whole frames only: the agent never writes half a
    frame (HAProxy 3.2.26 and 2.6 both accept an AGENT-HELLO in pieces, but nothing guarantees that
    every release does)."""
    parser = FrameParser()
    frames = parser.feed(data)
    if parser.buffer:
        raise AssertionError(f"{len(parser.buffer)} trailing bytes after {len(frames)} whole frames")
    return frames


# What the agent sends is decoded by tests/support/spop_oracle.py, written from SPOE.txt and sharing
# no code with spoe/, so a codec bug is not cancelled out by the same bug in the checker. The values
# come back as the engine's own types only to compare them with what a handler returned.
_AS_ENGINE_TYPE = {"int32": Int32, "uint32": Uint32, "int64": Int64, "uint64": Uint64,
                   "ipv4": ipaddress.IPv4Address, "ipv6": ipaddress.IPv6Address}  # fmt: skip


def _decode_frame(body: bytes) -> Frame:
    header = spop_oracle.frame(body)
    flags = int.from_bytes(body[1:5], "big")
    return Frame(body[0], flags, header.stream_id, header.frame_id, header.payload)


def _engine_value(typed: tuple[str, Any]) -> Any:
    kind, value = typed
    convert = _AS_ENGINE_TYPE.get(kind)
    return value if convert is None else convert(value)


def kv(frame: Frame) -> dict[str, Any]:
    return {name: _engine_value(typed) for name, typed in spop_oracle.kv_list(frame.payload).items()}


def ack_actions(frame: Frame) -> list[Action]:
    assert frame.type == FrameType.ACK, f"expected ACK, got frame type {frame.type}"
    scopes = {name: VarScope(number) for number, name in spop_oracle.SCOPES.items()}
    return [
        SetVar(scopes[action[1]], action[2], _engine_value(action[3]))
        if action[0] == "set-var"
        else UnsetVar(scopes[action[1]], action[2])
        for action in spop_oracle.actions(frame.payload)
    ]


def disconnect_status(frame: Frame) -> tuple[Status, str]:
    """The (status, message) of an AGENT-DISCONNECT, checking the frame is one and well formed."""
    assert frame.type == FrameType.AGENT_DISCONNECT, f"expected AGENT-DISCONNECT, got {frame.type}"
    assert (frame.flags, frame.stream_id, frame.frame_id) == (FLAG_FIN, 0, 0)
    items = kv(frame)
    assert set(items) == {"status-code", "message"}, items
    assert isinstance(items["status-code"], Uint32), "status-code must be a UINT32"
    assert isinstance(items["message"], str)
    return Status(items["status-code"]), items["message"]


# Driving a sans-IO Connection ------------------------------------------------------------------------

MAX_EVENTS_PER_DRAIN = 10_000


def drain(conn: Connection) -> list[Event]:
    """Every event `next_event` has until NEED_DATA; bounded, so an engine that loops fails the
    test instead of hanging it."""
    events: list[Event] = []
    for _ in range(MAX_EVENTS_PER_DRAIN):
        event = conn.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)  # type: ignore[arg-type]
    raise AssertionError(f"next_event produced more than {MAX_EVENTS_PER_DRAIN} events without NEED_DATA")


def exchange(conn: Connection, *chunks: bytes, eof: bool = False) -> tuple[list[Event], list[Frame]]:
    """Feed `chunks` one `receive_data` call each (then EOF if asked), draining events after each,
    and return the events and the frames the agent wrote meanwhile."""
    events: list[Event] = []
    for chunk in chunks:
        conn.receive_data(chunk)
        events += drain(conn)
    if eof:
        conn.receive_data(b"")
        events += drain(conn)
    return events, parse_frames(conn.data_to_send())


# Talking to an Agent over TCP ------------------------------------------------------------------------


class TcpPeer:
    """HAProxy's side of one TCP connection, on a plain non-blocking socket driven by the running
    event loop (so the agent under test keeps running), every wait bounded by a timeout. A plain
    socket rather than asyncio streams because some tests care about single `recv` calls."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.parser = FrameParser()
        self._loop = asyncio.get_running_loop()
        self._ready: list[Frame] = []
        self.haproxy_3x = False  # set by handshake(): then an empty ACK is an error

    @classmethod
    async def connect(cls, address: tuple[str, int], timeout: float = 2.0) -> TcpPeer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, address), timeout)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def send(self, *frames: bytes) -> None:
        """All `frames` in one write."""
        await asyncio.wait_for(self._loop.sock_sendall(self.sock, b"".join(frames)), 2.0)

    async def recv_once(self, timeout: float = 2.0) -> bytes:
        """Exactly one `recv` call; b"" at EOF."""
        return await asyncio.wait_for(self._loop.sock_recv(self.sock, 1 << 16), timeout)

    async def recv_frame(self, timeout: float = 2.0) -> Frame:
        deadline = self._loop.time() + timeout
        while not self._ready:
            data = await self.recv_once(max(deadline - self._loop.time(), 0.001))
            if not data:
                raise AssertionError("connection closed while a frame was expected")
            self._ready += self.parser.feed(data)
        frame = self._ready.pop(0)
        if self.haproxy_3x and frame.type == FrameType.ACK and not frame.payload:
            raise AssertionError(
                f"empty ACK (stream {frame.stream_id}, frame {frame.frame_id}): HAProxy 3.1.0 would "
                "leave the request waiting until timeout processing"
            )
        return frame

    async def recv_frames(self, count: int, timeout: float = 2.0) -> list[Frame]:
        deadline = self._loop.time() + timeout
        return [await self.recv_frame(max(deadline - self._loop.time(), 0.001)) for _ in range(count)]

    async def handshake(self, hello: bytes | None = None) -> dict[str, Any]:
        """Send a HELLO (2.x flavour by default) and return the AGENT-HELLO's items."""
        hello = hello or hello_2x()
        sent = kv(_decode_frame(hello[LENGTH_PREFIX:]))
        self.haproxy_3x = sent["capabilities"] == HAPROXY_3X_CAPABILITIES and not sent.get("healthcheck")
        await self.send(hello)
        reply = await self.recv_frame()
        assert reply.type == FrameType.AGENT_HELLO, f"expected AGENT-HELLO, got frame type {reply.type}"
        return kv(reply)

    async def expect_disconnect_and_close(self, timeout: float = 2.0) -> tuple[Status, str]:
        """The agent's AGENT-DISCONNECT, then the end of the connection."""
        status = disconnect_status(await self.recv_frame(timeout))
        await self.expect_closed(timeout)
        return status

    async def expect_closed(self, timeout: float = 2.0) -> None:
        """EOF (or a reset) with no further frame."""
        assert not self._ready, f"unexpected frames before close: {self._ready}"
        try:
            data = await self.recv_once(timeout)
        except ConnectionResetError:
            return
        if data:
            raise AssertionError(f"expected the connection to close, got {self.parser.feed(data)}")

    async def expect_silence(self, duration: float) -> None:
        """Nothing arrives, and the connection stays open, for `duration` seconds."""
        try:
            data = await self.recv_once(duration)
        except TimeoutError:
            return
        raise AssertionError(f"expected silence, got {data!r}")

    def reset(self) -> None:
        """Close with a TCP RST, as HAProxy 3.2 does on a soft stop (SIGUSR1) or after a refused HELLO."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()

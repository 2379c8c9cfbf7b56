"""The SPOP connection state machine, sans I/O: bytes in (`receive_data`), events out
(`next_event`), decisions in (`send_ack`, `close`), bytes out (`data_to_send`).

Modelled on h11/h2: no sockets, no clocks, no tasks. The cold frames (HELLO, DISCONNECT) go through
the `construct` declarations of `spoe.spec`, the executable specification; NOTIFY and ACK, once per
mirrored request, through the hand-written codec the property tests hold to that specification.

Every protocol error the peer can cause is an `SpopError` carrying its SPOE.txt status; `_fail` is
the one place that turns it into an AGENT-DISCONNECT frame. Nothing the peer sends can raise out of
`next_event`, and memory is bounded: a frame longer than the negotiated max-frame-size is refused
from its 4-byte length alone, and fragment reassembly has a byte cap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import Enum
from typing import Any

from .data import UINT32_BE, Uint32, decode_varint, encode_varint
from .errors import (
    FragmentationNotSupported,
    FrameIdNotFound,
    FrameTooBig,
    HelloError,
    InterlacedFrames,
    InvalidFrame,
    LocalProtocolError,
    ResourceExhausted,
    SpopError,
    Status,
)
from .events import NEED_DATA, Closed, Event, Hello, NotifyAborted, _NeedData, new_notify
from .frames import (
    FLAG_FIN,
    LENGTH_PREFIX,
    MIN_FRAME_SIZE,
    Action,
    Frame,
    FrameType,
    decode_frame,
    decode_messages,
    encode_ack_actions,
    encode_frame,
)
from .spec import build_kv_list, parse_kv_list

SPOP_VERSION = "2.0"
SUPPORTED_MAJOR = 2
CAPABILITIES = frozenset({"pipelining", "async", "fragmentation"})
# Fragmentation is asymmetric (SPOE.txt 3.2.1): announcing it says *we* can receive fragments, so
# it does not depend on HAProxy offering it (HAProxy 2.x never does: it cannot receive fragments).
ASYMMETRIC_CAPABILITIES = frozenset({"fragmentation"})
_KNOWN_TYPES = frozenset(int(t) for t in FrameType)
_NOTIFY = int(FrameType.NOTIFY)
_ACK_HEAD = bytes((FrameType.ACK,)) + UINT32_BE.pack(FLAG_FIN)  # type and flags of every ACK


class ReassemblyBudget:
    """The bytes that every connection of one agent may hold in incomplete fragmented NOTIFYs
    together. The per-connection cap bounds one peer; this bounds all of them: 30 peers each parking
    a fragmented NOTIFY just under a 10 MiB cap held 366 MB before it existed."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


class State(Enum):
    AWAIT_HELLO = "await-hello"
    READY = "ready"
    CLOSED = "closed"


# The states the per-frame paths test, read once: under CPython 3.11 a member read off its Enum
# class takes the metaclass's slow attribute path (EnumType has __getattr__), 48-73 ns against 8
# for a module global (timeit), and receive_data, next_event, _handle and send_ack test one three
# to four times per NOTIFY.
_READY = State.READY
_CLOSED = State.CLOSED


def parse_list(value: str) -> list[str]:
    """SPOP comma-separated lists; "spaces must be ignored"."""
    return [item.strip() for item in value.split(",") if item.strip()]


def _supports_our_version(versions: str) -> bool:
    """A major version announced by HAProxy covers all its minors, so "2.0" or "2.3" both admit our
    2.0 reply; "1.5" or "3.0" do not."""
    for version in parse_list(versions):
        major, _, minor = version.partition(".")
        # ASCII only: "²".isdigit() is true but int("²") raises, and HAProxy sends ASCII anyway.
        if version.isascii() and major.isdigit() and minor.isdigit() and int(major) == SUPPORTED_MAJOR:
            return True
    return False


class Connection:
    """One agent-side SPOP connection."""

    def __init__(
        self,
        *,
        max_frame_size: int = 16384,
        capabilities: Iterable[str] = CAPABILITIES,
        max_reassembly: int = 1 << 20,
        reassembly_budget: ReassemblyBudget | None = None,
        max_notify_entries: int = 1024,
    ) -> None:
        """`max_notify_entries`: messages plus arguments one NOTIFY may carry. HAProxy sends a few
        (the mirror message has eight arguments); decoding costs ~0.6 us an argument and ~2 us a
        message, so a 9 MB NOTIFY of empty messages held the event loop for seconds."""
        if max_frame_size < MIN_FRAME_SIZE:
            raise ValueError(f"max_frame_size must be at least {MIN_FRAME_SIZE}, got {max_frame_size}")
        unknown = set(capabilities) - CAPABILITIES
        if unknown:
            raise ValueError(f"unknown capabilities: {', '.join(sorted(unknown))}")
        self.local_max_frame_size = max_frame_size
        self.local_capabilities = frozenset(capabilities)
        self.max_reassembly = max_reassembly
        self.max_notify_entries = max_notify_entries
        self._budget = reassembly_budget
        self.state = State.AWAIT_HELLO
        self.hello: Hello | None = None
        self.frame_limit = max_frame_size
        self._in: bytes | bytearray = b""  # bytes as received, or a buffer once a frame spans reads
        self._in_pos = 0
        self._eof = False
        self._out: list[bytes] = []
        self._events: list[Event] = []
        # Pending NOTIFYs by (stream id, frame id): how many, and the two ids as the NOTIFY carried
        # them (varints), which its ACK echoes instead of encoding them again.
        self._unacked: dict[tuple[int, int], tuple[int, bytes]] = {}
        # The sum of `_unacked`, kept since the adapter reads it before every event: summing 256
        # pending NOTIFYs costs 1.3 us.
        self._unacked_count = 0
        self._last_actions: object = None  # the last ACK's action tuple, and its payload
        self._last_payload = b""
        self._fragment: tuple[int, int] | None = None
        self._fragment_parts: list[bytes] = []
        self._fragment_size = 0
        self._fragment_mark = 0
        # Whole frames taken from the buffer: `incomplete_mark` tells one incomplete frame from the next.
        self._frames_in = 0
        self._dispatch: dict[State, dict[int, Callable[[Frame], Any]]] = {
            State.AWAIT_HELLO: {
                FrameType.HAPROXY_HELLO: self._on_hello,
                FrameType.HAPROXY_DISCONNECT: self._on_disconnect,
            },
            State.READY: {
                FrameType.NOTIFY: self._on_notify,
                FrameType.UNSET: self._on_fragment,
                FrameType.HAPROXY_DISCONNECT: self._on_disconnect,
            },
        }

    @property
    def unacked(self) -> int:
        """NOTIFY frames handed out and not acknowledged yet (the adapter's in-flight count)."""
        return self._unacked_count

    @property
    def incomplete_mark(self) -> int | None:
        """None when no frame is partly received and no fragmented NOTIFY is open; otherwise a number
        that stays the same for as long as the same frame (or the same fragmented NOTIFY) is
        incomplete, so the adapter can cut a peer that dribbles one frame for too long. Bytes of
        whole frames not taken yet (the adapter paused) also count: the adapter ignores the mark
        while it is not reading."""
        if self._fragment is not None:
            return self._fragment_mark
        if len(self._in) > self._in_pos:
            return self._frames_in
        return None

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the socket; `b""` means the peer closed its side."""
        if self.state is _CLOSED:
            return
        if not data:
            self._eof = True
            return
        buf = self._in
        if self._in_pos == len(buf):
            # Nothing held (the usual read holds whole frames): frames are sliced from the bytes as
            # they came instead of from a copy of them (wrk's GET ~1k instructions less a request).
            self._in = data if type(data) is bytes else bytes(data)
            self._in_pos = 0
        elif type(buf) is bytes:  # the rest of such a read, and more: held in a buffer from now on
            held = bytearray(memoryview(buf)[self._in_pos :])
            held += data
            self._in = held
            self._in_pos = 0
        else:
            buf += data

    def next_event(self) -> Event | _NeedData:
        while not self._events:
            if self.state is _CLOSED:
                return NEED_DATA
            try:
                # Nothing held (a read of whole frames, all taken) and no EOF: no frame to look for,
                # the usual end of a read, without a call (`_next_frame` empties `_in` when it takes
                # the last byte).
                frame = self._next_frame() if self._in or self._eof else None
                if frame is None:
                    if self._events:  # EOF: `_next_frame` queued a Closed without a frame
                        break
                    return NEED_DATA
                self._handle(frame)
            except SpopError as error:
                self._fail(error)
        return self._events.pop(0)

    def send_ack(self, stream_id: int, frame_id: int, actions: Iterable[Action] = ()) -> None:
        """Queue the ACK. Actions that cannot be encoded, or do not fit the frame size, raise before
        the NOTIFY stops being pending, so the caller can still acknowledge it without them."""
        key = (stream_id, frame_id)
        pending = self._unacked.get(key)
        if pending is None:
            raise LocalProtocolError(f"ACK for stream {stream_id} frame {frame_id}, which is not pending")
        count, ids = pending
        if self.state is not _CLOSED:
            # The handler's constant tuple, as in the ACK before: its payload is already known
            # (wrk's GET 149.1k -> ~147k instructions per request, bench/hotpath_count.py).
            if actions is self._last_actions:
                payload = self._last_payload
            else:
                if type(actions) is not tuple and type(actions) is not list:
                    actions = tuple(actions)
                payload = encode_ack_actions(actions) if actions else b""  # type: ignore[arg-type]
                if len(payload) + 30 > self.frame_limit:
                    raise LocalProtocolError(
                        f"ACK of {len(payload)} bytes exceeds max-frame-size {self.frame_limit}"
                    )
                if type(actions) is tuple:  # a list may change before the next ACK
                    self._last_actions, self._last_payload = actions, payload
            # The frame built here rather than by encode_frame, its fixed head a constant:
            # wrk's GET 162.7k -> 159.5k instructions per request (bench/hotpath_count.py, callgrind).
            self._out.append(UINT32_BE.pack(5 + len(ids) + len(payload)) + _ACK_HEAD + ids + payload)
        if count == 1:
            del self._unacked[key]
        else:
            self._unacked[key] = (count - 1, ids)
        self._unacked_count -= 1

    def close(self, status: Status = Status.NORMAL, message: str = "normal") -> Closed | None:
        """Close from our side (a stop, a timeout): queue AGENT-DISCONNECT. Returns the `Closed`
        event, or None if the connection was already closed."""
        if self.state is _CLOSED:
            return None
        self._disconnect(status, message)
        return Closed(status, message, by_peer=False)

    def data_to_send(self) -> bytes:
        """Everything queued, joined: the adapter writes it in one call (HAProxy 3.2+ resets a
        connection whose AGENT-HELLO arrives split over several segments)."""
        if not self._out:
            return b""
        out = b"".join(self._out) if len(self._out) > 1 else self._out[0]
        self._out.clear()
        return out

    def _next_frame(self) -> bytes | None:
        """The next whole frame, without its length prefix."""
        buf, pos = self._in, self._in_pos
        available = len(buf) - pos
        if available >= LENGTH_PREFIX:
            length = UINT32_BE.unpack_from(buf, pos)[0]
            if length > self.frame_limit:
                raise FrameTooBig(f"frame of {length} bytes exceeds max-frame-size {self.frame_limit}")
            end = pos + LENGTH_PREFIX + length
            if len(buf) >= end:
                self._frames_in += 1
                frame = buf[pos + LENGTH_PREFIX : end]
                if type(frame) is not bytes:
                    frame = bytes(frame)
                if end == len(buf):
                    self._in = b""
                    self._in_pos = 0
                else:
                    self._in_pos = end
                    if end > 65536:  # what was taken is not held: a paused reader holds at most the rest
                        if type(buf) is bytearray:
                            del buf[:end]
                        else:
                            self._in = buf[end:]
                        self._in_pos = 0
                return frame
        if self._eof:
            partial = " mid-frame" if available else ""
            self._terminate(Closed(Status.NORMAL, f"peer closed the connection{partial}", by_peer=True))
        return None

    def _handle(self, data: bytes) -> None:
        if (
            len(data) >= 7
            and data[0] == _NOTIFY
            and data[4] & FLAG_FIN  # the low byte of the 4-byte big-endian flags
            and self._fragment is None
            and self.state is _READY
        ):
            # An unfragmented NOTIFY, nearly every frame, skips the Frame model and the dispatch
            # table; `_on_notify` would only deliver it. Measured: sans-IO NOTIFY->ACK 12.8 -> 11.6 us.
            stream_id, pos = decode_varint(data, 5)
            # The frame id is nearly always one byte (HAProxy counts frames per stream from 1): read
            # inline, one call less per NOTIFY: wrk's GET 151.0k -> 149.9k instructions at one
            # NOTIFY a read (bench/hotpath_count.py --count-instructions --batch 1).
            frame_id = data[pos] if pos < len(data) else 240
            if frame_id < 240:
                pos += 1
            else:
                frame_id, pos = decode_varint(data, pos)
            self._deliver(stream_id, frame_id, data, pos, data[5:pos])
            return
        frame = decode_frame(data)
        handler = self._dispatch[self.state].get(frame.type)
        if handler is not None:
            handler(frame)
        elif frame.type in _KNOWN_TYPES:
            name = FrameType(frame.type).name.replace("_", "-")
            raise InvalidFrame(f"unexpected {name} frame in state {self.state.value}")
        # Unknown frame types "may be silently skipped" (SPOE.txt 3.2.2).

    def _on_hello(self, frame: Frame) -> None:
        items = parse_kv_list(frame.payload)
        versions = _require(items, "supported-versions", str, Status.NO_VERSION)
        remote_max = _require(items, "max-frame-size", int, Status.NO_MAX_FRAME_SIZE)
        offered = _require(items, "capabilities", str, Status.NO_CAPABILITIES)
        if not _supports_our_version(versions):
            raise HelloError(f"no supported SPOP version in {versions!r}", Status.UNSUPPORTED_VERSION)
        max_frame_size = min(self.local_max_frame_size, int(remote_max))
        if max_frame_size < MIN_FRAME_SIZE:
            raise HelloError(
                f"max-frame-size {remote_max} is below the minimum of {MIN_FRAME_SIZE}",
                Status.BAD_MAX_FRAME_SIZE,
            )
        remote_capabilities = set(parse_list(offered))
        capabilities = frozenset(
            cap
            for cap in self.local_capabilities
            if cap in remote_capabilities or cap in ASYMMETRIC_CAPABILITIES
        )
        engine_id = items.get("engine-id")
        healthcheck = items.get("healthcheck") is True
        self.hello = Hello(
            SPOP_VERSION,
            max_frame_size,
            capabilities,
            engine_id if isinstance(engine_id, str) else None,
            healthcheck,
        )
        reply = {
            "version": SPOP_VERSION,
            "max-frame-size": Uint32(max_frame_size),
            "capabilities": ",".join(sorted(capabilities)),
        }
        self._out.append(encode_frame(FrameType.AGENT_HELLO, FLAG_FIN, 0, 0, build_kv_list(reply)))
        self.frame_limit = max_frame_size
        self._last_actions = None  # its payload was checked against the old frame limit
        self._events.append(self.hello)
        if healthcheck:
            # "the agent can safely close the connection without DISCONNECT frame" (SPOE.txt 3.2.5).
            self._terminate(Closed(Status.NORMAL, "health check answered", by_peer=False))
        else:
            self.state = State.READY

    def _on_notify(self, frame: Frame) -> None:
        if self._fragment is not None:
            raise InterlacedFrames(
                f"NOTIFY for stream {frame.stream_id} frame {frame.frame_id} while the fragmented "
                f"frame {self._fragment} is incomplete"
            )
        if frame.fin:
            self._deliver(frame.stream_id, frame.frame_id, frame.payload)
            return
        if frame.abort:
            return
        assert self.hello is not None
        if "fragmentation" not in self.hello.capabilities:
            raise FragmentationNotSupported("fragmented NOTIFY but fragmentation was not negotiated")
        self._fragment = (frame.stream_id, frame.frame_id)
        self._fragment_mark = self._frames_in
        self._fragment_parts = []
        self._fragment_size = 0
        self._add_fragment(frame.payload)

    def _on_fragment(self, frame: Frame) -> None:
        key = (frame.stream_id, frame.frame_id)
        if self._fragment is None:
            raise FrameIdNotFound(f"fragment for stream {key[0]} frame {key[1]}, which was never started")
        if key != self._fragment:
            raise InterlacedFrames(f"fragment for {key} while the fragmented frame {self._fragment} is open")
        if frame.abort:
            self._drop_fragment()
            self._events.append(NotifyAborted(*key))
            return
        self._add_fragment(frame.payload)
        if frame.fin:
            payload = b"".join(self._fragment_parts)
            self._drop_fragment()
            self._deliver(key[0], key[1], payload)

    def _add_fragment(self, payload: bytes) -> None:
        size = len(payload)
        held = self._fragment_size + size
        if held > self.max_reassembly:
            raise ResourceExhausted(
                f"fragmented NOTIFY exceeds the reassembly cap of {self.max_reassembly} bytes"
            )
        budget = self._budget
        if budget is not None and size:
            if budget.used + size > budget.limit:
                raise ResourceExhausted(
                    f"the reassembly budget of {budget.limit} bytes for all connections is used up"
                )
            budget.used += size
        self._fragment_size = held
        # Each held part costs ~40 bytes beyond its data, which the byte cap does not count: a part
        # shorter than the smallest frame joins a short predecessor instead, so a flood of empty or
        # tiny UNSET frames holds at most two parts per MIN_FRAME_SIZE bytes, not one per frame.
        parts = self._fragment_parts
        if parts and len(payload) < MIN_FRAME_SIZE and len(parts[-1]) < MIN_FRAME_SIZE:
            parts[-1] += payload
        else:
            parts.append(payload)

    def _drop_fragment(self) -> None:
        """Forget the fragmented NOTIFY (complete, aborted or failed) and give its bytes back."""
        if self._budget is not None:
            self._budget.used -= self._fragment_size
        self._fragment = None
        self._fragment_parts = []
        self._fragment_size = 0

    def _deliver(
        self, stream_id: int, frame_id: int, payload: bytes, start: int = 0, ids: bytes | None = None
    ) -> None:
        """The messages of `payload[start:]` as a Notify event (`start`: an unfragmented NOTIFY's
        payload is decoded inside its frame, not copied out of it first). `ids`: the two varints as
        the frame carried them, for the ACK to echo; a NOTIFY that came through the Frame model (the
        first, a fragmented one) has them encoded again here."""
        messages = decode_messages(payload, self.max_notify_entries, start)
        key = (stream_id, frame_id)
        if ids is None:
            ids = encode_varint(stream_id) + encode_varint(frame_id)
        pending = self._unacked.get(key)
        self._unacked[key] = (1, ids) if pending is None else (pending[0] + 1, ids)
        self._unacked_count += 1
        self._events.append(new_notify(stream_id, frame_id, messages))

    def _on_disconnect(self, frame: Frame) -> None:
        items = parse_kv_list(frame.payload)
        code = items.get("status-code")
        message = items.get("message")
        status = _to_status(code)
        text = message if isinstance(message, str) else ""
        # HAProxy 3.1+ waits for this reply to its own DISCONNECT before closing.
        self._queue_disconnect(status, text or status.name.lower().replace("_", " "))
        self._terminate(Closed(status, text, by_peer=True))

    def _fail(self, error: SpopError) -> None:
        self._disconnect(error.status, error.message)
        self._events.append(Closed(error.status, error.message, by_peer=False))

    def _disconnect(self, status: Status, message: str) -> None:
        self._queue_disconnect(status, message)
        self._terminate(None)

    def _queue_disconnect(self, status: int, message: str) -> None:
        payload = build_kv_list({"status-code": Uint32(int(status)), "message": message[:200]})
        self._out.append(encode_frame(FrameType.AGENT_DISCONNECT, FLAG_FIN, 0, 0, payload))

    def _terminate(self, event: Closed | None) -> None:
        self.state = State.CLOSED
        self._in = b""
        self._in_pos = 0
        self._drop_fragment()
        if event is not None:
            self._events.append(event)


def _require(items: dict[str, Any], key: str, kind: type, status: Status) -> Any:
    value = items.get(key)
    if value is None:
        raise HelloError(f"HAPROXY-HELLO lacks {key!r}", status)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise HelloError(f"HAPROXY-HELLO {key!r} has the wrong type {type(value).__name__}", status)
    return value


def _to_status(code: object) -> Status:
    if isinstance(code, int) and not isinstance(code, bool):
        try:
            return Status(code)
        except ValueError:
            return Status.UNKNOWN
    return Status.UNKNOWN

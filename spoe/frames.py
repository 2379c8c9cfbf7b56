"""SPOP frames and payloads (SPOE.txt section 3.2): the models and the hot-path codec.

A frame on the wire is `<LENGTH:4 bytes BE><TYPE:1><FLAGS:4 BE><STREAM-ID:varint><FRAME-ID:varint>
<PAYLOAD>`. `Frame` keeps the payload as raw bytes because a fragmented NOTIFY is reassembled at the
byte level (HAProxy 2.x splits inside a value) before the message list is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from .data import (
    UINT32_BE,
    decode_data,
    decode_string,
    decode_varint,
    encode_data,
    encode_string,
    encode_varint,
)
from .errors import InvalidFrame, ResourceExhausted

FLAG_FIN = 0x1
FLAG_ABORT = 0x2
LENGTH_PREFIX = 4
MIN_FRAME_SIZE = 256  # SPOE.txt 3.2: "must be greater than or equal to 256 bytes"


class FrameType(IntEnum):
    UNSET = 0
    HAPROXY_HELLO = 1
    HAPROXY_DISCONNECT = 2
    NOTIFY = 3
    AGENT_HELLO = 101
    AGENT_DISCONNECT = 102
    ACK = 103


class VarScope(IntEnum):
    PROCESS = 0
    SESSION = 1
    TRANSACTION = 2
    REQUEST = 3
    RESPONSE = 4


class ActionType(IntEnum):
    SET_VAR = 1
    UNSET_VAR = 2


@dataclass(frozen=True, slots=True)
class Frame:
    type: int
    flags: int
    stream_id: int
    frame_id: int
    payload: bytes

    @property
    def fin(self) -> bool:
        return bool(self.flags & FLAG_FIN)

    @property
    def abort(self) -> bool:
        return bool(self.flags & FLAG_ABORT)


@dataclass(frozen=True, slots=True)
class Message:
    """One spoe-message: its name and its args by name (SPOE args are named in practice; when two
    args share a name the last one wins)."""

    name: str
    args: dict[str, Any]


@dataclass(frozen=True, slots=True)
class SetVar:
    scope: VarScope
    name: str
    value: Any


@dataclass(frozen=True, slots=True)
class UnsetVar:
    scope: VarScope
    name: str


Action = SetVar | UnsetVar


def decode_frame(buf: bytes) -> Frame:
    """One frame, without its 4-byte length prefix."""
    if len(buf) < 7:
        raise InvalidFrame(f"frame of {len(buf)} bytes is shorter than its header")
    frame_type = buf[0]
    flags = UINT32_BE.unpack_from(buf, 1)[0]
    stream_id, pos = decode_varint(buf, 5)
    frame_id, pos = decode_varint(buf, pos)
    return Frame(frame_type, flags, stream_id, frame_id, buf[pos:])


def encode_frame(frame_type: int, flags: int, stream_id: int, frame_id: int, payload: bytes) -> bytes:
    """The whole packet, length prefix included, as one bytes object: it must go out in one write."""
    body = (
        bytes((frame_type,))
        + UINT32_BE.pack(flags)
        + encode_varint(stream_id)
        + encode_varint(frame_id)
        + payload
    )
    return UINT32_BE.pack(len(body)) + body


def decode_kv_list(buf: bytes) -> dict[str, Any]:
    items: dict[str, Any] = {}
    pos, end = 0, len(buf)
    while pos < end:
        name, pos = decode_string(buf, pos)
        items[name], pos = decode_data(buf, pos)
    return items


def encode_kv_list(items: dict[str, Any]) -> bytes:
    return b"".join(encode_string(name) + encode_data(value) for name, value in items.items())


def decode_messages(buf: bytes, max_entries: int = 1 << 62, start: int = 0) -> list[Message]:
    """The messages of a NOTIFY payload: `buf[start:]`, so a frame's payload is decoded where it lies,
    not from a copy. At most `max_entries` messages plus arguments, checked before decoding each
    message's arguments, so an oversized list costs nothing past the cap.

    HAProxy sends a spoe-message with the same arg names and types every time: the bytes from each
    name's length to its value's type byte (`\x0aarg_method\x08`) are remembered per message name
    (its shape), and a message that starts like the last one of its name is read by one
    `startswith` per arg, its values by their lengths. An arg that differs (another name, a NULL
    where a STRING was) ends the shape there; the general decoding takes the rest."""
    messages = []
    pos, end = start, len(buf)
    entries = 0
    shapes = _SHAPES
    while pos < end:
        # The name's bytes find the shape learned for it and the name's str beside it: one lookup
        # and no decoding for nearly every message (wrk's GET: 1.4k instructions a NOTIFY less than
        # decoding the name and looking its shape up by it).
        length = buf[pos]
        stop = pos + 1 + length
        raw_name = buf[pos + 1 : stop] if length < 240 and stop <= end else None
        known = shapes.get(raw_name)  # type: ignore[arg-type]
        if known is not None:
            name, shape = known
            pos = stop
        else:
            name, pos, _ = _read_name(buf, pos, end)
            shape = None
        if pos >= end:
            raise InvalidFrame(f"message {name!r} has no argument count")
        count = buf[pos]
        pos += 1
        entries += count + 1
        if entries > max_entries:
            raise ResourceExhausted(f"NOTIFY carries more than {max_entries} messages and arguments")
        args: dict[str, Any] = {}
        matched = 0
        if shape is not None and len(shape) == count:
            startswith = buf.startswith
            # Each prefix's length is kept beside it, and the args read are counted by the dict only
            # when the shape breaks: wrk's GET 131.1k -> 129.4k instructions (bench/hotpath_count.py).
            for prefix, size, arg_name, is_text in shape:
                if not startswith(prefix, pos):
                    break
                pos += size
                try:  # zero-cost until the frame ends after the type byte; a test costs 4 bytecodes
                    length = buf[pos]
                except IndexError:
                    raise InvalidFrame("truncated varint") from None
                if length < 240:  # one length byte: the value ends where the next arg starts
                    value_start = pos + 1
                    pos = value_start + length
                    if pos > end:
                        raise InvalidFrame(f"string of {length} bytes runs past the end of the frame")
                    value = buf[value_start:pos]
                    args[arg_name] = value.decode("utf-8", "surrogateescape") if is_text else value
                    continue
                length, pos = decode_varint(buf, pos)
                stop = pos + length
                if stop > end:
                    raise InvalidFrame(f"string of {length} bytes runs past the end of the frame")
                if is_text:  # see decode_string: no copy of a long value's bytes first
                    args[arg_name] = str(memoryview(buf)[pos:stop], "utf-8", "surrogateescape")
                else:
                    args[arg_name] = buf[pos:stop]
                pos = stop
            else:
                messages.append(_new_message(name, args))
                continue
            matched = len(args)  # a learned shape's arg names are distinct (see below)
        learned: list[tuple[bytes, int, str, bool]] | None = [] if matched == 0 else None
        for _ in range(count - matched):
            arg_start = pos
            arg_name, pos, looked_up = _read_name(buf, pos, end)
            if not looked_up:
                learned = None
            # Likewise a STRING or BINARY value (no flags) shorter than 240 bytes that fits: every
            # arg of the mirror message but a big header block or body.
            # Measured (bench/hotpath_count.py, callgrind): wrk's GET 167.3k -> 164.3k instructions.
            kind = buf[pos] if pos + 1 < end else 0
            if learned is not None:
                if (kind == 8 or kind == 9) and arg_name not in args:
                    prefix = buf[arg_start : pos + 1]
                    learned.append((prefix, len(prefix), arg_name, kind == 8))
                else:
                    learned = None
            if kind == 8 or kind == 9:
                length = buf[pos + 1]
                stop = pos + 2 + length
                if length < 240 and stop <= end:
                    value = buf[pos + 2 : stop]
                    args[arg_name] = value.decode("utf-8", "surrogateescape") if kind == 8 else value
                    pos = stop
                    continue
            args[arg_name], pos = decode_data(buf, pos)
        # A name of 240 bytes or more (read by decode_string) is never given a shape.
        if learned is not None and raw_name is not None and (known or len(shapes) < _SHAPES_LIMIT):
            shapes[raw_name] = (name, tuple(learned))
        messages.append(_new_message(name, args))
    return messages


# Message names and shapes by the name's bytes (see decode_messages); bounded, as a peer could send
# any names.
_SHAPES: dict[bytes, tuple[str, tuple[tuple[bytes, int, str, bool], ...]]] = {}
_SHAPES_LIMIT = 64


# Message and arg names by their bytes (see _read_name); bounded: a peer could send any names.
_ARG_NAMES: dict[bytes, str] = {}
_ARG_NAMES_LIMIT = 256


def _read_name(buf: bytes, pos: int, end: int) -> tuple[str, int, bool]:
    """A message's or an arg's name at `pos`, the position after it, and whether it was looked up.
    HAProxy sends the same few names in every NOTIFY: one shorter than 240 bytes that fits is looked
    up by its bytes, not decoded again (wrk's GET: ~800 instructions an arg); anything else goes to
    decode_string, which raises where it does not fit."""
    length = buf[pos] if pos < end else 240
    stop = pos + 1 + length
    if length < 240 and stop <= end:
        raw_name = buf[pos + 1 : stop]
        name = _ARG_NAMES.get(raw_name)
        if name is None:
            name = raw_name.decode("utf-8", "surrogateescape")
            if len(_ARG_NAMES) < _ARG_NAMES_LIMIT:
                _ARG_NAMES[raw_name] = name
        return name, stop, True
    name, stop = decode_string(buf, pos)
    return name, stop, False


def _new_message(name: str, args: dict[str, Any]) -> Message:
    """`Message(name, args)` without the frozen dataclass's `__init__`, which sets each field through
    `object.__setattr__`: ~2.6k instead of ~4.3k instructions, once per NOTIFY (callgrind)."""
    message = _new_object(Message)
    _set_message_name(message, name)
    _set_message_args(message, args)
    return message


_new_object = object.__new__
_set_message_name = Message.name.__set__  # type: ignore[attr-defined]
_set_message_args = Message.args.__set__  # type: ignore[attr-defined]


def encode_messages(messages: list[Message]) -> bytes:
    """What HAProxy sends; the agent never does, but test peers and benchmarks need it."""
    parts = []
    for message in messages:
        if len(message.args) > 255:
            raise ValueError(f"message {message.name!r} has more than 255 args")
        parts.append(encode_string(message.name) + bytes((len(message.args),)))
        parts.extend(encode_string(name) + encode_data(value) for name, value in message.args.items())
    return b"".join(parts)


def encode_actions(actions: list[Action] | tuple[Action, ...]) -> bytes:
    parts = []
    for action in actions:
        if type(action) is SetVar:
            parts.append(
                b"\x01\x03"
                + bytes((VarScope(action.scope),))
                + encode_string(action.name)
                + encode_data(action.value)
            )
        elif type(action) is UnsetVar:
            parts.append(b"\x02\x02" + bytes((VarScope(action.scope),)) + encode_string(action.name))
        else:
            raise TypeError(f"not an SPOP action: {action!r}")
    return b"".join(parts)


# Payloads of action tuples seen before, by the tuple's id (the entry keeps the tuple alive, so the
# id cannot be reused while it is here); cleared when full, so handlers that build a new tuple per
# ACK cost a lookup and nothing more.
_ENCODED_TUPLES: dict[int, tuple[tuple[Action, ...], bytes]] = {}
_ENCODED_TUPLES_LIMIT = 256


def encode_ack_actions(actions: list[Action] | tuple[Action, ...]) -> bytes:
    """`encode_actions`, done once for a tuple that a handler returns every time (a constant, such
    as one set-var that every ACK carries): ~0.1 us instead of ~2-4 us per ACK."""
    if type(actions) is not tuple:
        return encode_actions(actions)
    entry = _ENCODED_TUPLES.get(id(actions))
    if entry is not None and entry[0] is actions:
        return entry[1]
    payload = encode_actions(actions)
    if len(_ENCODED_TUPLES) >= _ENCODED_TUPLES_LIMIT:
        _ENCODED_TUPLES.clear()
    _ENCODED_TUPLES[id(actions)] = (actions, payload)
    return payload


def decode_actions(buf: bytes) -> list[Action]:
    """What HAProxy does with an ACK; used by test peers and to check our own output."""
    actions: list[Action] = []
    pos, end = 0, len(buf)
    while pos < end:
        if pos + 3 > end:
            raise InvalidFrame("truncated action")
        action_type, count, scope_byte = buf[pos], buf[pos + 1], buf[pos + 2]
        pos += 3
        try:
            scope = VarScope(scope_byte)
        except ValueError:
            raise InvalidFrame(f"unknown variable scope {scope_byte}") from None
        name, pos = decode_string(buf, pos)
        if action_type == ActionType.SET_VAR and count == 3:
            value, pos = decode_data(buf, pos)
            actions.append(SetVar(scope, name, value))
        elif action_type == ActionType.UNSET_VAR and count == 2:
            actions.append(UnsetVar(scope, name))
        else:
            raise InvalidFrame(f"unknown action {action_type} with {count} args")
    return actions

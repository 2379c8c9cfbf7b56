"""SPOP wire formats (SPOE.txt section 3) declared with `construct`: the executable specification.

It exists for two reasons. It is the oracle the tests hold the hand-written codec in `spoe.data` and
`spoe.frames` to, byte for byte and both ways; a declaration reads like the spec's grammar, so a
mistake in it is easier to see than one in a hand-unrolled decoder. And it builds and parses the cold
frames, where speed does not matter. The hot path cannot use it: construct parsed a 919-byte NOTIFY
in ~126 us, the hand-written decoder in ~4 us (bench/engine_bench.py --sans-io on its
message: 260 us against 7.8 us).

Where SPOE.txt disagrees with HAProxy's source, this follows HAProxy: in TYPED-DATA the type is the
LOW nibble and the flags the HIGH one, and INT32/INT64 travel as the varint of their 64-bit two's
complement. Varints are limited to what HAProxy can hold, 2**64 - 1 (ten bytes).

Parsing and building go through adapters, so both ends are the models of `spoe.data` and
`spoe.frames`. The public functions turn construct's errors into the codec's: `InvalidFrame` for
bytes that do not parse, `ValueError` for a value the wire cannot carry.
"""

from __future__ import annotations

from enum import IntEnum
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from construct import (
    Adapter,
    BitsInteger,
    BitStruct,
    Bytes,
    Const,
    Construct,
    ConstructError,
    Container,
    Error,
    Flag,
    FocusedSeq,
    GreedyBytes,
    GreedyRange,
    Int8ub,
    Int32ub,
    IntegerError,
    Nibble,
    Pass,
    Prefixed,
    PrefixedArray,
    SizeofError,
    Struct,
    Switch,
    Terminated,
    ValidationError,
    stream_read,
    stream_write,
    this,
)

from .data import INT64_MAX, UINT64_MAX, DataType, Int32, Int64, Uint32, Uint64
from .errors import InvalidFrame
from .frames import Action, ActionType, Frame, Message, SetVar, UnsetVar, VarScope

SizedInt = Int32 | Uint32 | Int64 | Uint64


class PeersVarint(Construct):
    """HAProxy's "peers" varint (SPOE.txt 3.1). construct has no such encoding: its VarInt is
    LEB128, which differs from the first byte on."""

    def _parse(self, stream: Any, context: Any, path: str) -> int:
        value = stream_read(stream, 1, path)[0]
        if value < 240:
            return value
        shift = 4
        for _ in range(9):  # a 64-bit value needs at most nine bytes after the first
            byte = stream_read(stream, 1, path)[0]
            value += byte << shift
            if byte < 128:
                break
            shift += 7
        else:
            raise ValidationError("varint longer than 10 bytes", path=path)
        if value > UINT64_MAX:
            raise ValidationError(f"varint exceeds 64 bits: {value}", path=path)
        return value

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> int:
        if not isinstance(obj, int) or not 0 <= obj <= UINT64_MAX:
            raise IntegerError(f"varint must be an integer in [0, 2**64 - 1], not {obj!r}", path=path)
        if obj < 240:
            data = bytes((obj,))
        else:
            rest = obj - 240  # 240 is a multiple of 16: the first byte's low nibble is unaffected
            out = bytearray((0xF0 | (rest & 0x0F),))
            rest >>= 4
            while rest >= 128:
                out.append(0x80 | (rest & 0x7F))
                rest = (rest - 128) >> 7
            out.append(rest)
            data = bytes(out)
        stream_write(stream, data, len(data), path)
        return obj

    def _sizeof(self, context: Any, path: str) -> int:
        raise SizeofError("a varint has no fixed size", path=path)


VARINT = PeersVarint()


class _Sized(Adapter):
    """INT32/UINT32/INT64/UINT64 value: a varint read back as the model that remembers its width.
    Signed types are the varint of their 64-bit two's complement, so -1 is 2**64 - 1 on the wire,
    and an INT32 whose value does not fit 32 bits is malformed."""

    def __init__(self, model: type[SizedInt]) -> None:
        super().__init__(VARINT)
        self.model = model

    def _decode(self, obj: int, context: Any, path: str) -> SizedInt:
        value = obj - 2**64 if self.model.low < 0 and obj > INT64_MAX else obj
        if not self.model.low <= value <= self.model.high:
            raise ValidationError(f"{self.model.__name__} out of range: {value}", path=path)
        return self.model(value)

    def _encode(self, obj: int, context: Any, path: str) -> int:
        return int(self.model(obj)) & UINT64_MAX


class _Text(Adapter):
    """STRING: bytes on the wire (a path may hold any byte); surrogateescape keeps them lossless."""

    def _decode(self, obj: bytes, context: Any, path: str) -> str:
        return obj.decode("utf-8", "surrogateescape")

    def _encode(self, obj: str, context: Any, path: str) -> bytes:
        return obj.encode("utf-8", "surrogateescape")


class _Address(Adapter):
    def __init__(self, size: int, model: type[IPv4Address | IPv6Address]) -> None:
        super().__init__(Bytes(size))
        self.model = model

    def _decode(self, obj: bytes, context: Any, path: str) -> IPv4Address | IPv6Address:
        return self.model(obj)

    def _encode(self, obj: IPv4Address | IPv6Address, context: Any, path: str) -> bytes:
        return self.model(obj).packed


class _Member(Adapter):
    """A byte that must be a member of an IntEnum; construct's Enum would let unknown values through."""

    def __init__(self, enum: type[IntEnum]) -> None:
        super().__init__(Int8ub)
        self.enum = enum

    def _decode(self, obj: int, context: Any, path: str) -> IntEnum:
        try:
            return self.enum(obj)
        except ValueError:
            raise ValidationError(f"unknown {self.enum.__name__} {obj}", path=path) from None

    def _encode(self, obj: int, context: Any, path: str) -> int:
        return int(self.enum(obj))


BINARY = Prefixed(VARINT, GreedyBytes)
STRING = _Text(BINARY)

TYPED_DATA_WIRE = Struct(
    # BitStruct reads the most significant bits first: the flags are the high nibble.
    "head" / BitStruct("flags" / Nibble, "type" / Nibble),
    "value"
    / Switch(
        this.head.type,
        {
            DataType.NULL: Pass,
            DataType.BOOL: Pass,  # the value is bit 0 of the flags
            DataType.INT32: _Sized(Int32),
            DataType.UINT32: _Sized(Uint32),
            DataType.INT64: _Sized(Int64),
            DataType.UINT64: _Sized(Uint64),
            DataType.IPV4: _Address(4, IPv4Address),
            DataType.IPV6: _Address(16, IPv6Address),
            DataType.STRING: STRING,
            DataType.BINARY: BINARY,
        },
        default=Error,  # 10-15 are reserved
    ),
)


class _TypedValue(Adapter):
    """TYPED-DATA <-> the Python values `spoe.data.encode_data` takes and `decode_data` returns."""

    def _decode(self, obj: Container, context: Any, path: str) -> Any:
        if obj.head.type == DataType.BOOL:
            return bool(obj.head.flags & 1)
        return obj.value

    def _encode(self, obj: Any, context: Any, path: str) -> dict[str, Any]:
        flags, value = 0, obj
        if obj is None:
            kind = DataType.NULL
        elif isinstance(obj, bool):
            kind, flags = DataType.BOOL, int(obj)
        elif isinstance(obj, SizedInt):
            kind = obj.data_type
        elif isinstance(obj, int):  # a plain int is INT64 when it fits, else UINT64
            kind = DataType.INT64 if obj <= INT64_MAX else DataType.UINT64
        elif isinstance(obj, str):
            kind = DataType.STRING
        elif isinstance(obj, bytes | bytearray | memoryview):
            kind, value = DataType.BINARY, bytes(obj)
        elif isinstance(obj, IPv4Address):
            kind = DataType.IPV4
        elif isinstance(obj, IPv6Address):
            kind = DataType.IPV6
        else:
            raise TypeError(f"cannot encode {type(obj).__name__} as SPOP typed data")
        return {"head": {"flags": flags, "type": kind}, "value": value}


TYPED_DATA = _TypedValue(TYPED_DATA_WIRE)

KV_ITEM = Struct("name" / STRING, "value" / TYPED_DATA)


class _KvDict(Adapter):
    """KV items <-> a dict. Names are unique in practice; when two collide the last one wins, as in
    the hot path."""

    def _decode(self, obj: list[Container], context: Any, path: str) -> dict[str, Any]:
        return {item.name: item.value for item in obj}

    def _encode(self, obj: dict[str, Any], context: Any, path: str) -> list[dict[str, Any]]:
        return [{"name": name, "value": value} for name, value in obj.items()]


def _to_end(item: Construct) -> Construct:
    """SPOP lists carry no count: they run to the end of the payload. GreedyRange alone would stop
    quietly at the first malformed item, so Terminated makes leftover bytes an error."""
    return FocusedSeq("items", "items" / GreedyRange(item), Terminated)


KV_LIST = _KvDict(_to_end(KV_ITEM))


class _MessageModel(Adapter):
    def _decode(self, obj: Container, context: Any, path: str) -> Message:
        return Message(obj.name, obj.args)

    def _encode(self, obj: Message, context: Any, path: str) -> dict[str, Any]:
        return {"name": obj.name, "args": obj.args}


# MESSAGE-NAME, NB-ARGS:1 byte, then NB-ARGS KV items (the args).
MESSAGE = _MessageModel(Struct("name" / STRING, "args" / _KvDict(PrefixedArray(Int8ub, KV_ITEM))))
LIST_OF_MESSAGES = _to_end(MESSAGE)

VAR_SCOPE = _Member(VarScope)
SET_VAR_ARGS = Struct(
    "nb_args" / Const(3, Int8ub), "scope" / VAR_SCOPE, "name" / STRING, "value" / TYPED_DATA
)
UNSET_VAR_ARGS = Struct("nb_args" / Const(2, Int8ub), "scope" / VAR_SCOPE, "name" / STRING)
ACTION_WIRE = Struct(
    "type" / Int8ub,
    "args"
    / Switch(
        this.type,
        {ActionType.SET_VAR: SET_VAR_ARGS, ActionType.UNSET_VAR: UNSET_VAR_ARGS},
        default=Error,
    ),
)


class _ActionModel(Adapter):
    def _decode(self, obj: Container, context: Any, path: str) -> Action:
        args = obj.args
        if obj.type == ActionType.SET_VAR:
            return SetVar(args.scope, args.name, args.value)
        return UnsetVar(args.scope, args.name)

    def _encode(self, obj: Action, context: Any, path: str) -> dict[str, Any]:
        if isinstance(obj, SetVar):
            args = {"scope": obj.scope, "name": obj.name, "value": obj.value}
            return {"type": ActionType.SET_VAR, "args": args}
        if isinstance(obj, UnsetVar):
            return {"type": ActionType.UNSET_VAR, "args": {"scope": obj.scope, "name": obj.name}}
        raise TypeError(f"not an SPOP action: {obj!r}")


LIST_OF_ACTIONS = _to_end(_ActionModel(ACTION_WIRE))

# 32 bits in network byte order, bit 0 the least significant: BitStruct reads them most significant
# first, so FIN is the last bit and ABORT the one before it.
FLAGS = BitStruct("reserved" / BitsInteger(30), "abort" / Flag, "fin" / Flag)

FRAME_WIRE = Struct(
    "type" / Int8ub,
    "flags" / FLAGS,
    "stream_id" / VARINT,
    "frame_id" / VARINT,
    "payload" / GreedyBytes,  # decoded per frame type, and only once a fragmented payload is whole
)


class _FrameModel(Adapter):
    def _decode(self, obj: Container, context: Any, path: str) -> Frame:
        flags = obj.flags.reserved << 2 | obj.flags.abort << 1 | obj.flags.fin
        return Frame(obj.type, flags, obj.stream_id, obj.frame_id, obj.payload)

    def _encode(self, obj: Frame, context: Any, path: str) -> dict[str, Any]:
        flags = {"reserved": obj.flags >> 2, "abort": bool(obj.flags & 2), "fin": bool(obj.flags & 1)}
        return {
            "type": obj.type,
            "flags": flags,
            "stream_id": obj.stream_id,
            "frame_id": obj.frame_id,
            "payload": bytes(obj.payload),
        }


FRAME = _FrameModel(FRAME_WIRE)
PACKET = Prefixed(Int32ub, FRAME)  # <FRAME-LENGTH:4 bytes> <FRAME>


def _whole(item: Construct) -> Construct:
    """One item that must fill the input: trailing bytes are an error, not silently ignored."""
    return FocusedSeq("item", "item" / item, Terminated)


_WHOLE_VARINT = _whole(VARINT)
_WHOLE_DATA = _whole(TYPED_DATA)
_WHOLE_PACKET = _whole(PACKET)


def _parse(con: Construct, data: bytes, what: str) -> Any:
    try:
        return con.parse(data)
    except ConstructError as exc:
        raise InvalidFrame(f"malformed {what}: {exc}") from exc


def _build(con: Construct, obj: Any, what: str) -> bytes:
    try:
        return con.build(obj)
    except ConstructError as exc:
        raise ValueError(f"cannot encode {what}: {exc}") from exc


def build_varint(value: int) -> bytes:
    return _build(VARINT, value, "varint")


def parse_varint(data: bytes) -> int:
    return _parse(_WHOLE_VARINT, data, "varint")


def build_data(value: Any) -> bytes:
    return _build(TYPED_DATA, value, "typed data")


def parse_data(data: bytes) -> Any:
    return _parse(_WHOLE_DATA, data, "typed data")


def build_kv_list(items: dict[str, Any]) -> bytes:
    return _build(KV_LIST, items, "KV-LIST")


def parse_kv_list(data: bytes) -> dict[str, Any]:
    return _parse(KV_LIST, data, "KV-LIST")


def build_messages(messages: list[Message]) -> bytes:
    return _build(LIST_OF_MESSAGES, messages, "LIST-OF-MESSAGES")


def parse_messages(data: bytes) -> list[Message]:
    return list(_parse(LIST_OF_MESSAGES, data, "LIST-OF-MESSAGES"))


def build_actions(actions: list[Action] | tuple[Action, ...]) -> bytes:
    return _build(LIST_OF_ACTIONS, list(actions), "LIST-OF-ACTIONS")


def parse_actions(data: bytes) -> list[Action]:
    return list(_parse(LIST_OF_ACTIONS, data, "LIST-OF-ACTIONS"))


def build_frame(frame: Frame) -> bytes:
    """The frame without its length prefix, as `spoe.frames.decode_frame` takes it."""
    return _build(FRAME, frame, "frame")


def parse_frame(data: bytes) -> Frame:
    return _parse(FRAME, data, "frame")


def build_packet(frame: Frame) -> bytes:
    """The whole packet, length prefix included, as `spoe.frames.encode_frame` returns it."""
    return _build(PACKET, frame, "frame")


def parse_packet(data: bytes) -> Frame:
    """Exactly one packet: split a stream into packets before calling this."""
    return _parse(_WHOLE_PACKET, data, "frame")

"""Varints and TYPED-DATA: the hot-path codec.

Hand-written because it runs for every NOTIFY: measured here, `construct` parsed a 919-byte NOTIFY
in ~126 us and this decoder in ~4 us (bench/engine_bench.py --sans-io on our bench message: 260 us
against 7.8 us). `spoe.spec` declares the same formats with construct; it is the
executable specification, and the property tests hold this module to it.

Decoders take `(buf, pos)` and return `(value, new_pos)`; every malformed or truncated input raises
`InvalidFrame`, never IndexError or anything else.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from .errors import InvalidFrame

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
VARINT_MAX_BYTES = 10  # 2**64 - 1 takes ten bytes; anything longer is an endless varint


class DataType(IntEnum):
    NULL = 0
    BOOL = 1
    INT32 = 2
    UINT32 = 3
    INT64 = 4
    UINT64 = 5
    IPV4 = 6
    IPV6 = 7
    STRING = 8
    BINARY = 9


class _SizedInt(int):
    """An int that remembers its SPOP width, so a value decoded as UINT32 is re-encoded as UINT32."""

    data_type: DataType
    low: int
    high: int

    def __new__(cls, value: int = 0) -> _SizedInt:
        if not cls.low <= value <= cls.high:
            raise ValueError(f"{cls.__name__} out of range: {value}")
        return super().__new__(cls, value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({int(self)})"


class Int32(_SizedInt):
    data_type, low, high = DataType.INT32, INT32_MIN, INT32_MAX


class Uint32(_SizedInt):
    data_type, low, high = DataType.UINT32, 0, UINT32_MAX


class Int64(_SizedInt):
    data_type, low, high = DataType.INT64, INT64_MIN, INT64_MAX


class Uint64(_SizedInt):
    data_type, low, high = DataType.UINT64, 0, UINT64_MAX


def encode_varint(value: int) -> bytes:
    """HAProxy's "peers" varint (src/spoe.c encode_varint), for 0 <= value < 2**64."""
    if value < 240:
        if value < 0:
            raise ValueError(f"varint must not be negative: {value}")
        return _SMALL_VARINTS[value]
    # Two and three bytes (values below 264,432: HAProxy's stream ids for a long while) in one
    # expression: the loop below costs an ACK ~1.5k instructions more (callgrind).
    if value < 2288:
        return bytes(((value & 0x0F) | 0xF0, (value - 240) >> 4))
    if value < 264432:
        rest = (value - 240) >> 4
        return bytes(((value & 0x0F) | 0xF0, (rest & 0x7F) | 0x80, (rest - 128) >> 7))
    if value > UINT64_MAX:
        raise ValueError(f"varint exceeds 64 bits: {value}")
    out = bytearray(((value & 0xFF) | 240,))
    value = (value - 240) >> 4
    while value >= 128:
        out.append((value & 0xFF) | 128)
        value = (value - 128) >> 7
    out.append(value)
    return bytes(out)


_SMALL_VARINTS = [bytes((i,)) for i in range(240)]


def decode_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """The first three bytes unrolled: HAProxy's NOTIFY stream ids are its stream counter, three
    bytes from the 2,288th stream of a process's life and four from the 264,432nd, and the loop
    cost every NOTIFY ~80 bytecodes for a three-byte id against ~50 (a sys.settrace count)."""
    try:
        value = buf[pos]
        if value < 240:
            return value, pos + 1
        byte = buf[pos + 1]
        value += byte << 4
        if byte < 128:
            return value, pos + 2
        byte = buf[pos + 2]
        value += byte << 11
        if byte < 128:
            return value, pos + 3
    except IndexError:
        raise InvalidFrame("truncated varint") from None
    pos += 3
    shift = 18
    end = pos + VARINT_MAX_BYTES - 3
    while True:
        try:
            byte = buf[pos]
        except IndexError:
            raise InvalidFrame("truncated varint") from None
        pos += 1
        value += byte << shift
        if byte < 128:
            break
        shift += 7
        if pos >= end:
            raise InvalidFrame("varint longer than 10 bytes")
    if value > UINT64_MAX:
        raise InvalidFrame("varint exceeds 64 bits")
    return value, pos


def decode_bytes(buf: bytes, pos: int) -> tuple[bytes, int]:
    """A length-prefixed byte string (STRING and BINARY data, names)."""
    try:
        length = buf[pos]
    except IndexError:
        raise InvalidFrame("truncated varint") from None
    # A one-byte length, as for nearly every name and value, skips decode_varint: measured 7.8 -> 7.1 us
    # to decode the 8 args of a 919-byte mirror NOTIFY.
    if length < 240:
        pos += 1
    else:
        length, pos = decode_varint(buf, pos)
    end = pos + length
    if end > len(buf):
        raise InvalidFrame(f"string of {length} bytes runs past the end of the frame")
    return buf[pos:end], end


def decode_string(buf: bytes, pos: int) -> tuple[str, int]:
    """Strings are bytes on the wire (paths may hold any byte); surrogateescape keeps them lossless.
    A long one is decoded straight from the frame, not from a copy of its bytes: a 10 MB header
    block costs one fresh 10 MB allocation instead of two (each is page faults the loop waits for)."""
    try:
        length = buf[pos]
    except IndexError:
        raise InvalidFrame("truncated varint") from None
    if length < 240:
        end = pos + 1 + length
        if end > len(buf):
            raise InvalidFrame(f"string of {length} bytes runs past the end of the frame")
        return buf[pos + 1 : end].decode("utf-8", "surrogateescape"), end
    length, pos = decode_varint(buf, pos)
    end = pos + length
    if end > len(buf):
        raise InvalidFrame(f"string of {length} bytes runs past the end of the frame")
    return str(memoryview(buf)[pos:end], "utf-8", "surrogateescape"), end


def encode_string(value: str) -> bytes:
    raw = value.encode("utf-8", "surrogateescape")
    return encode_varint(len(raw)) + raw


def _signed64(raw: int) -> int:
    """HAProxy writes signed integers as their 64-bit two's complement (encode_varint(uint64_t))."""
    return raw - 2**64 if raw > INT64_MAX else raw


def decode_data(buf: bytes, pos: int) -> tuple[Any, int]:
    """One TYPED-DATA item. The type is the LOW nibble, the flags the HIGH nibble (SPOE.txt says
    the opposite; HAProxy's code and the wire agree with this)."""
    try:
        head = buf[pos]
    except IndexError:
        raise InvalidFrame("truncated typed data") from None
    pos += 1
    kind = head & 0x0F
    if kind == 8:
        return decode_string(buf, pos)
    if kind == 9:
        return decode_bytes(buf, pos)
    if kind == 0:
        return None, pos
    if kind == 1:
        return bool(head & 0x10), pos
    if 2 <= kind <= 5:
        raw, pos = decode_varint(buf, pos)
        if kind == 2:
            value = _signed64(raw)
            if not INT32_MIN <= value <= INT32_MAX:
                raise InvalidFrame(f"INT32 out of range: {value}")
            return Int32(value), pos
        if kind == 3:
            if raw > UINT32_MAX:
                raise InvalidFrame(f"UINT32 out of range: {raw}")
            return Uint32(raw), pos
        if kind == 4:
            return Int64(_signed64(raw)), pos
        return Uint64(raw), pos
    if kind == 6:
        end = pos + 4
        if end > len(buf):
            raise InvalidFrame("truncated IPV4")
        return IPv4Address(buf[pos:end]), end
    if kind == 7:
        end = pos + 16
        if end > len(buf):
            raise InvalidFrame("truncated IPV6")
        return IPv6Address(buf[pos:end]), end
    raise InvalidFrame(f"unknown data type {kind}")


def _encode_sized(value: _SizedInt) -> bytes:
    return bytes((value.data_type,)) + encode_varint(int(value) & UINT64_MAX)


def _encode_int(value: int) -> bytes:
    """A plain int goes out as INT64 when it fits, else UINT64."""
    if INT64_MIN <= value <= INT64_MAX:
        return b"\x04" + encode_varint(value & UINT64_MAX)
    if value <= UINT64_MAX:
        return b"\x05" + encode_varint(value)
    raise ValueError(f"integer does not fit in 64 bits: {value}")


def _encode_str(value: str) -> bytes:
    return b"\x08" + encode_string(value)


def _encode_bytes(value: bytes | bytearray | memoryview) -> bytes:
    return b"\x09" + encode_varint(len(value)) + bytes(value)


_ENCODERS: dict[type, Any] = {
    type(None): lambda _: b"\x00",
    bool: lambda value: b"\x11" if value else b"\x01",
    int: _encode_int,
    Int32: _encode_sized,
    Uint32: _encode_sized,
    Int64: _encode_sized,
    Uint64: _encode_sized,
    str: _encode_str,
    bytes: _encode_bytes,
    bytearray: _encode_bytes,
    memoryview: _encode_bytes,
    IPv4Address: lambda value: b"\x06" + value.packed,
    IPv6Address: lambda value: b"\x07" + value.packed,
}


def encode_data(value: Any) -> bytes:
    """Python value -> TYPED-DATA: None, bool, int (INT64/UINT64), Int32/Uint32/Int64/Uint64,
    str (STRING), bytes (BINARY), IPv4Address, IPv6Address."""
    encoder = _ENCODERS.get(type(value))
    if encoder is None:
        raise TypeError(f"cannot encode {type(value).__name__} as SPOP typed data")
    return encoder(value)


UINT32_BE = struct.Struct(">I")

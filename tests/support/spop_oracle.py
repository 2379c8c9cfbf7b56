"""An SPOP decoder written for the tests from HAProxy's SPOE.txt (2.6, section 3), sharing no code
with `spoe/`: what the fake HAProxy checks in the agent's frames is decoded here, so a bug in our
codec is not cancelled out by the same bug in the decoder that checks it.

Where SPOE.txt and HAProxy disagree, HAProxy's behaviour wins, and is pinned by a real HAProxy
in tests/test_oracle.py:
  * TYPED-DATA: SPOE.txt draws <TYPE:4 bits><FLAGS:4 bits>, but HAProxy (src/spoe.c) puts the type
    in the low nibble and the flags in the high one: BOOL true is 0x11, false 0x01.
  * Signed integers travel as the 64-bit two's complement of the value (HAProxy's
    encode_varint takes a uint64_t), so INT32 -1 is a ten-byte varint.
  * KV-NAME, MESSAGE-NAME and VAR-NAME are <STRING> in SPOE.txt, written as a varint length and the
    bytes (no type byte); VAR-SCOPE is one raw byte.

Values decode to plain (type name, value) pairs; `typed` makes the pair of any Python value.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

FRAME_TYPES = {0: "UNSET", 1: "HAPROXY-HELLO", 2: "HAPROXY-DISCONNECT", 3: "NOTIFY",
               101: "AGENT-HELLO", 102: "AGENT-DISCONNECT", 103: "ACK"}  # fmt: skip
DATA_TYPES = {0: "null", 1: "bool", 2: "int32", 3: "uint32", 4: "int64", 5: "uint64", 6: "ipv4",
              7: "ipv6", 8: "string", 9: "binary"}  # fmt: skip
SCOPES = {0: "proc", 1: "sess", 2: "txn", 3: "req", 4: "res"}
SET_VAR, UNSET_VAR = 1, 2


class OracleError(AssertionError):
    """The bytes are not what SPOE.txt describes."""


@dataclass(frozen=True)
class OracleFrame:
    type: str
    fin: bool
    abort: bool
    stream_id: int
    frame_id: int
    payload: bytes


def varint(buf: bytes, pos: int) -> tuple[int, int]:
    """SPOE.txt 3.1: first byte < 240 is the value; else its low 4 bits start the value and each
    following byte adds 7 bits, the last one below 128."""
    if pos >= len(buf):
        raise OracleError("varint past the end")
    value = buf[pos]
    pos += 1
    if value < 240:
        return value, pos
    shift = 4
    while True:
        if pos >= len(buf):
            raise OracleError("truncated varint")
        byte = buf[pos]
        pos += 1
        value += byte << shift
        shift += 7
        if byte < 128:
            return value, pos


def length_prefixed(buf: bytes, pos: int) -> tuple[bytes, int]:
    size, pos = varint(buf, pos)
    if pos + size > len(buf):
        raise OracleError(f"{size} bytes announced, {len(buf) - pos} left")
    return buf[pos : pos + size], pos + size


def _signed(raw: int, bits: int) -> int:
    raw &= (1 << 64) - 1
    value = raw - (1 << 64) if raw >= 1 << 63 else raw
    if not -(1 << (bits - 1)) <= value < 1 << (bits - 1):
        raise OracleError(f"INT{bits} out of range: {value}")
    return value


def typed_data(buf: bytes, pos: int) -> tuple[tuple[str, Any], int]:
    head = buf[pos]
    pos += 1
    kind, flags = head & 0x0F, head >> 4
    name = DATA_TYPES.get(kind)
    if name is None:
        raise OracleError(f"unknown data type {kind}")
    if name == "null":
        return (name, None), pos
    if name == "bool":
        return (name, bool(flags & 1)), pos
    if name in ("int32", "uint32", "int64", "uint64"):
        raw, pos = varint(buf, pos)
        if name == "int32":
            return (name, _signed(raw, 32)), pos
        if name == "int64":
            return (name, _signed(raw, 64)), pos
        if raw >= 1 << (32 if name == "uint32" else 64):
            raise OracleError(f"{name} out of range: {raw}")
        return (name, raw), pos
    if name in ("ipv4", "ipv6"):
        size = 4 if name == "ipv4" else 16
        if pos + size > len(buf):
            raise OracleError(f"truncated {name}")
        return (name, str(ipaddress.ip_address(buf[pos : pos + size]))), pos + size
    raw, pos = length_prefixed(buf, pos)
    return (name, raw.decode() if name == "string" else raw), pos


def frames(data: bytes) -> list[OracleFrame]:
    """Every frame in `data`, which must hold whole frames only."""
    out, pos = [], 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise OracleError("truncated length prefix")
        size = int.from_bytes(data[pos : pos + 4], "big")
        body = data[pos + 4 : pos + 4 + size]
        if len(body) != size:
            raise OracleError(f"frame of {size} bytes, {len(body)} present")
        out.append(frame(body))
        pos += 4 + size
    return out


def frame(body: bytes) -> OracleFrame:
    """One frame without its length prefix: <TYPE:1> <FLAGS:4 BE> <STREAM-ID> <FRAME-ID> <PAYLOAD>."""
    if len(body) < 7:
        raise OracleError(f"frame of {len(body)} bytes is shorter than its header")
    name = FRAME_TYPES.get(body[0], f"type-{body[0]}")
    flags = int.from_bytes(body[1:5], "big")
    stream_id, pos = varint(body, 5)
    frame_id, pos = varint(body, pos)
    return OracleFrame(name, bool(flags & 1), bool(flags & 2), stream_id, frame_id, body[pos:])


def kv_list(payload: bytes) -> dict[str, tuple[str, Any]]:
    items, pos = {}, 0
    while pos < len(payload):
        name, pos = length_prefixed(payload, pos)
        items[name.decode()], pos = typed_data(payload, pos)
    return items


def actions(payload: bytes) -> list[tuple[Any, ...]]:
    """("set-var", scope, name, (type, value)) or ("unset-var", scope, name), in order."""
    out: list[tuple[Any, ...]] = []
    pos = 0
    while pos < len(payload):
        kind, nb_args = payload[pos], payload[pos + 1]
        scope = SCOPES.get(payload[pos + 2])
        if scope is None:
            raise OracleError(f"unknown variable scope {payload[pos + 2]}")
        name, pos = length_prefixed(payload, pos + 3)
        if kind == SET_VAR and nb_args == 3:
            value, pos = typed_data(payload, pos)
            out.append(("set-var", scope, name.decode(), value))
        elif kind == UNSET_VAR and nb_args == 2:
            out.append(("unset-var", scope, name.decode()))
        else:
            raise OracleError(f"action type {kind} with {nb_args} arguments")
    return out

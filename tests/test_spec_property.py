"""The hand-written codec (`spoe.data`, `spoe.frames`) agrees with the construct spec (`spoe.spec`).

Both ways, on generated models: the hot encoder's bytes are the spec's bytes, each side decodes the
other's output back to the model. And on hostile input, random bytes and valid encodings with one
byte damaged: the hot decoders either return what the spec parses or raise InvalidFrame exactly when
the spec refuses, never another exception.

Values are compared together with their types (`strict`), because Int32(1) == Uint64(1) == True in
Python and a codec that mixed them up would pass a plain `==`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from spoe import spec
from spoe.data import (
    INT32_MAX,
    INT32_MIN,
    INT64_MAX,
    INT64_MIN,
    UINT32_MAX,
    UINT64_MAX,
    Int32,
    Int64,
    Uint32,
    Uint64,
    decode_data,
    decode_varint,
    encode_data,
    encode_varint,
)
from spoe.errors import InvalidFrame
from spoe.frames import (
    Frame,
    FrameType,
    Message,
    SetVar,
    UnsetVar,
    VarScope,
    decode_actions,
    decode_frame,
    decode_kv_list,
    decode_messages,
    encode_actions,
    encode_frame,
    encode_kv_list,
    encode_messages,
)


def strict(value: Any) -> Any:
    """`value` with the type of every leaf made part of it, for comparisons that see types."""
    if isinstance(value, list):
        return [strict(item) for item in value]
    if isinstance(value, dict):
        return [(strict(key), strict(item)) for key, item in value.items()]
    if dataclasses.is_dataclass(value):
        return (type(value), [strict(getattr(value, field.name)) for field in dataclasses.fields(value)])
    return (type(value), value)


# Strings as HAProxy sends them: any text, and any bytes, which decode with surrogateescape. Arbitrary
# lone surrogates are left out: they are not what a decoder ever produces, so no round trip starts there.
strings = st.one_of(
    st.text(max_size=20), st.binary(max_size=20).map(lambda raw: raw.decode("utf-8", "surrogateescape"))
)
sized_ints = st.one_of(
    st.integers(INT32_MIN, INT32_MAX).map(Int32),
    st.integers(0, UINT32_MAX).map(Uint32),
    st.integers(INT64_MIN, INT64_MAX).map(Int64),
    st.integers(0, UINT64_MAX).map(Uint64),
)
values = st.one_of(
    st.none(),
    st.booleans(),
    sized_ints,
    strings,
    st.binary(max_size=40),
    st.ip_addresses(v=4),
    st.ip_addresses(v=6),
)
kv_lists = st.dictionaries(strings, values, max_size=10)
messages = st.lists(st.builds(Message, strings, kv_lists), max_size=5)
scopes = st.sampled_from(VarScope)
actions = st.lists(
    st.one_of(st.builds(SetVar, scopes, strings, values), st.builds(UnsetVar, scopes, strings)), max_size=8
)
payloads = st.one_of(
    st.binary(max_size=60),
    kv_lists.map(encode_kv_list),
    messages.map(encode_messages),
    actions.map(encode_actions),
)
frames = st.builds(
    Frame,
    st.one_of(st.sampled_from([int(kind) for kind in FrameType]), st.integers(0, 255)),
    st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(0, 2**32 - 1)),
    st.integers(0, UINT64_MAX),
    st.integers(0, UINT64_MAX),
    payloads,
)


def _hot_varint(buf: bytes) -> int:
    value, pos = decode_varint(buf, 0)
    if pos != len(buf):
        raise InvalidFrame("trailing bytes")
    return value


def _hot_data(buf: bytes) -> Any:
    """decode_data on a whole buffer, as `spec.parse_data` takes it."""
    value, pos = decode_data(buf, 0)
    if pos != len(buf):
        raise InvalidFrame("trailing bytes")
    return value


def _hot_frame(frame: Frame) -> bytes:
    return encode_frame(frame.type, frame.flags, frame.stream_id, frame.frame_id, frame.payload)


def _agree_both_ways(
    model: Any,
    hot_encode: Callable[[Any], bytes],
    hot_decode: Callable[[bytes], Any],
    spec_build: Callable[[Any], bytes],
    spec_parse: Callable[[bytes], Any],
) -> None:
    built = spec_build(model)
    assert hot_encode(model) == built
    assert strict(hot_decode(built)) == strict(model)
    assert strict(spec_parse(hot_encode(model))) == strict(model)


@settings(max_examples=500)
@given(st.integers(0, UINT64_MAX))
def test_varint(value: int) -> None:
    _agree_both_ways(value, encode_varint, _hot_varint, spec.build_varint, spec.parse_varint)


@settings(max_examples=500)
@given(values)
def test_typed_data(value: Any) -> None:
    _agree_both_ways(value, encode_data, _hot_data, spec.build_data, spec.parse_data)


@settings(max_examples=500)
@given(st.integers(INT64_MIN, UINT64_MAX))
def test_plain_ints_become_int64_or_uint64_alike(value: int) -> None:
    expected = Int64(value) if value <= INT64_MAX else Uint64(value)
    assert encode_data(value) == spec.build_data(value) == encode_data(expected)


@settings(max_examples=300)
@given(kv_lists)
def test_kv_list(items: dict[str, Any]) -> None:
    _agree_both_ways(items, encode_kv_list, decode_kv_list, spec.build_kv_list, spec.parse_kv_list)


@settings(max_examples=200)
@given(messages)
def test_messages(items: list[Message]) -> None:
    _agree_both_ways(items, encode_messages, decode_messages, spec.build_messages, spec.parse_messages)


@settings(max_examples=300)
@given(actions)
def test_actions(items: list[SetVar | UnsetVar]) -> None:
    _agree_both_ways(items, encode_actions, decode_actions, spec.build_actions, spec.parse_actions)


@settings(max_examples=300)
@given(frames)
def test_frames(frame: Frame) -> None:
    _agree_both_ways(
        frame, _hot_frame, lambda packet: decode_frame(packet[4:]), spec.build_packet, spec.parse_packet
    )
    assert spec.build_frame(frame) == _hot_frame(frame)[4:]


@st.composite
def damaged(draw: st.DrawFn, encoded: st.SearchStrategy[bytes]) -> bytes:
    """A valid encoding with one byte replaced, inserted or removed, or cut short: input that gets past
    the first checks, unlike uniformly random bytes."""
    data = bytearray(draw(encoded))
    where = draw(st.integers(0, len(data)))
    how = draw(st.sampled_from(["replace", "insert", "delete", "cut"]))
    if how == "insert" or (how == "replace" and where == len(data)):
        data.insert(where, draw(st.integers(0, 255)))
    elif how == "replace":
        data[where] = draw(st.integers(0, 255))
    elif how == "delete":
        del data[where : where + 1]
    else:
        del data[where:]
    return bytes(data)


_REFUSED = object()


def _outcome(decode: Callable[[bytes], Any], data: bytes) -> Any:
    """What `decode` makes of `data`: the strict value, or _REFUSED for InvalidFrame. Any other
    exception propagates and fails the test."""
    try:
        return strict(decode(data))
    except InvalidFrame:
        return _REFUSED


def _same_verdict(
    hot_decode: Callable[[bytes], Any], spec_parse: Callable[[bytes], Any], data: bytes
) -> None:
    assert _outcome(hot_decode, data) == _outcome(spec_parse, data)


def _hostile(encoded: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Noise finds the early checks, intact and damaged encodings the deep ones."""
    return st.one_of(st.binary(max_size=80), encoded, damaged(encoded))


@settings(max_examples=500)
@given(_hostile(st.integers(0, UINT64_MAX).map(encode_varint)))
def test_hostile_varint(data: bytes) -> None:
    _same_verdict(_hot_varint, spec.parse_varint, data)


def test_integer_range_checks_agree_next_to_every_limit() -> None:
    """Exhaustive rather than generated: an off-by-one range check shows only at the exact value."""
    for kind in range(2, 6):
        for limit in (0, 2**31, 2**32, 2**63, 2**64 - 2**31, UINT64_MAX):
            for raw in range(max(limit - 2, 0), min(limit + 2, UINT64_MAX) + 1):
                _same_verdict(_hot_data, spec.parse_data, bytes((kind,)) + encode_varint(raw))


@settings(max_examples=500)
@given(_hostile(values.map(encode_data)))
def test_hostile_typed_data(data: bytes) -> None:
    _same_verdict(_hot_data, spec.parse_data, data)


@settings(max_examples=300)
@given(_hostile(kv_lists.map(encode_kv_list)))
def test_hostile_kv_list(data: bytes) -> None:
    _same_verdict(decode_kv_list, spec.parse_kv_list, data)


@settings(max_examples=200)
@given(_hostile(messages.map(encode_messages)))
def test_hostile_messages(data: bytes) -> None:
    _same_verdict(decode_messages, spec.parse_messages, data)


@settings(max_examples=300)
@given(_hostile(actions.map(encode_actions)))
def test_hostile_actions(data: bytes) -> None:
    _same_verdict(decode_actions, spec.parse_actions, data)


@settings(max_examples=300)
@given(_hostile(frames.map(lambda frame: _hot_frame(frame)[4:])))
def test_hostile_frame(data: bytes) -> None:
    _same_verdict(decode_frame, spec.parse_frame, data)


# Messages of one name with the mirror message's arg names, as HAProxy sends them again and again:
# decode_messages learns the shape of the first and reads the next by it (see its docstring).
_shaped_args = st.dictionaries(
    st.sampled_from(["arg_method", "arg_path", "arg_hdrs", "arg_body", "x" * 250]),
    st.one_of(st.text(max_size=300), st.binary(max_size=300), st.none(), st.integers(0, 5)),
    max_size=5,
)


@settings(max_examples=300)
@given(_shaped_args, _hostile(_shaped_args.map(lambda args: encode_messages([Message("shaped", args)]))))
def test_hostile_messages_after_their_shape_was_learned(taught: dict[str, Any], data: bytes) -> None:
    decode_messages(encode_messages([Message("shaped", taught)]))
    _same_verdict(decode_messages, spec.parse_messages, data)

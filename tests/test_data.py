"""Unit tests of the hand-written SPOP codec (`spoe.data`, `spoe.frames`).

The byte vectors here were checked by hand against HAProxy's encoder, not against `spoe.spec`, so a
mistake shared by the codec and the spec would still be caught. Truncation is tried at every offset,
because a decoder that lets an IndexError or a struct.error escape would drop the connection without
the AGENT-DISCONNECT that HAProxy expects; `spoe.spec`'s parsers are held to the same rule.
"""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import pytest

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
    decode_string,
    decode_varint,
    encode_data,
    encode_string,
    encode_varint,
)
from spoe.errors import InvalidFrame, Status
from spoe.frames import (
    FLAG_ABORT,
    FLAG_FIN,
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

NON_UTF8 = b"caf\xe9 \xff\xfe".decode("utf-8", "surrogateescape")

TYPED_VALUES: list[Any] = [
    None,
    True,
    False,
    Int32(INT32_MIN),
    Int32(-1),
    Int32(0),
    Int32(INT32_MAX),
    Uint32(0),
    Uint32(239),
    Uint32(240),
    Uint32(UINT32_MAX),
    Int64(INT64_MIN),
    Int64(-1),
    Int64(INT64_MAX),
    Uint64(0),
    Uint64(UINT64_MAX),
    IPv4Address("0.0.0.0"),
    IPv4Address("192.0.2.1"),
    IPv4Address("255.255.255.255"),
    IPv6Address("::"),
    IPv6Address("2001:db8::1"),
    IPv6Address("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
    "",
    "GET",
    "h\xe9llo \u6f22\u5b57 \U0001f600",
    NON_UTF8,
    "a\x00b",
    "x" * 300,
    b"",
    b"\x00\xff",
    bytes(range(256)) * 10,
]


def _value_id(value: Any) -> str:
    """Printable ASCII with no backslash: mutmut runs each mutant's tests by node id in a second
    in-process pytest.main, which does not find an explicit id holding escapes."""
    return f"{type(value).__name__}-{value!a}".replace("\\", "/")[:40]


@pytest.mark.parametrize("value", TYPED_VALUES, ids=_value_id)
def test_typed_data_round_trip(value: Any) -> None:
    encoded = encode_data(value)
    decoded, pos = decode_data(encoded, 0)
    assert pos == len(encoded)
    assert type(decoded) is type(value)
    assert decoded == value


@pytest.mark.parametrize("value", TYPED_VALUES, ids=_value_id)
def test_typed_data_decodes_in_the_middle_of_a_buffer(value: Any) -> None:
    encoded = encode_data(value)
    decoded, pos = decode_data(b"junk" + encoded + b"tail", 4)
    assert (decoded, pos) == (value, 4 + len(encoded))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, b"\x00"),
        (True, b"\x11"),
        (False, b"\x01"),
        (Int32(1), b"\x02\x01"),
        (Int32(-1), b"\x02\xff\xf0\xfe\xfe\xfe\xfe\xfe\xfe\xfe\x0e"),
        (Uint32(240), b"\x03\xf0\x00"),
        (Int64(INT64_MIN), b"\x04\xf0\xf1\xfe\xfe\xfe\xfe\xfe\xfe\xfe\x06"),
        (Uint64(7), b"\x05\x07"),
        (IPv4Address("127.0.0.1"), b"\x06\x7f\x00\x00\x01"),
        (IPv6Address("::1"), b"\x07" + bytes(15) + b"\x01"),
        ("GET", b"\x08\x03GET"),
        (NON_UTF8, b"\x08\x07caf\xe9 \xff\xfe"),
        (b"\x00\x01", b"\x09\x02\x00\x01"),
    ],
    ids=_value_id,
)
def test_typed_data_known_bytes(value: Any, expected: bytes) -> None:
    assert encode_data(value) == expected


@pytest.mark.parametrize(
    ("head", "expected"), [(0x11, True), (0x01, False), (0x31, True), (0x21, False), (0xF1, True)]
)
def test_bool_is_flag_bit_0_of_the_high_nibble(head: int, expected: bool) -> None:
    assert decode_data(bytes((head,)), 0) == (expected, 1)


def test_flags_on_other_types_are_ignored() -> None:
    """HAProxy only reads the flags of a BOOL; the type is the low nibble whatever the high one holds."""
    assert decode_data(b"\xf0", 0) == (None, 1)
    assert decode_data(b"\x52\x05", 0) == (Int32(5), 2)


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (0, Int64),
        (-1, Int64),
        (INT64_MIN, Int64),
        (INT64_MAX, Int64),
        (INT64_MAX + 1, Uint64),
        (UINT64_MAX, Uint64),
    ],
)
def test_plain_int_goes_out_as_int64_or_uint64(value: int, kind: type) -> None:
    decoded, _ = decode_data(encode_data(value), 0)
    assert type(decoded) is kind
    assert decoded == value


@pytest.mark.parametrize("value", [INT64_MIN - 1, UINT64_MAX + 1])
def test_plain_int_beyond_64_bits_is_refused(value: int) -> None:
    with pytest.raises(ValueError):
        encode_data(value)


@pytest.mark.parametrize("value", [bytearray(b"ab\x00"), memoryview(b"ab\x00")])
def test_byte_buffers_go_out_as_binary(value: bytearray | memoryview) -> None:
    assert encode_data(value) == b"\x09\x03ab\x00"
    assert decode_data(encode_data(value), 0) == (b"ab\x00", 5)


@pytest.mark.parametrize("value", [1.5, [1], {"a": 1}, object()])
def test_unsupported_python_types_are_refused(value: Any) -> None:
    with pytest.raises(TypeError):
        encode_data(value)


def test_string_helpers_keep_non_utf8_bytes() -> None:
    encoded = encode_string(NON_UTF8)
    assert encoded == b"\x07caf\xe9 \xff\xfe"
    assert decode_string(encoded, 0) == (NON_UTF8, len(encoded))


@pytest.mark.parametrize(
    ("value", "length"),
    [
        (0, 1),
        (239, 1),
        (240, 2),
        (2287, 2),
        (2288, 3),
        (264431, 3),
        (264432, 4),
        (33818863, 4),
        (33818864, 5),
        (2**32 - 1, 5),
        (4328786159, 5),
        (4328786160, 6),
        (2**63 - 1, 10),
        (2**64 - 1, 10),
    ],
)
def test_varint_boundaries(value: int, length: int) -> None:
    encoded = encode_varint(value)
    assert len(encoded) == length
    assert decode_varint(encoded, 0) == (value, length)
    assert decode_varint(b"\x00" + encoded + b"\x00", 1) == (value, length + 1)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (239, b"\xef"),
        (240, b"\xf0\x00"),
        (241, b"\xf1\x00"),
        (256, b"\xf0\x01"),
        (2287, b"\xff\x7f"),
        (2288, b"\xf0\x80\x00"),
        (2**64 - 1, b"\xff\xf0\xfe\xfe\xfe\xfe\xfe\xfe\xfe\x0e"),
    ],
)
def test_varint_known_bytes(value: int, expected: bytes) -> None:
    assert encode_varint(value) == expected


@pytest.mark.parametrize("value", [-1, 2**64])
def test_varint_out_of_range_is_refused(value: int) -> None:
    with pytest.raises(ValueError):
        encode_varint(value)


@pytest.mark.parametrize(
    "encoded",
    [
        b"\xff" + b"\xff" * 9 + b"\x00",  # eleven bytes
        b"\xf0" + b"\x80" * 20,  # endless
        b"\xff\xf0\xfe\xfe\xfe\xfe\xfe\xfe\xfe\x0f",  # 2**64, in ten bytes
        b"\xff" * 9 + b"\x7f",  # ten bytes, far over 2**64 - 1
    ],
)
def test_impossible_varints_are_invalid(encoded: bytes) -> None:
    with pytest.raises(InvalidFrame):
        decode_varint(encoded, 0)
    with pytest.raises(InvalidFrame):
        spec.parse_varint(encoded)


@pytest.mark.parametrize("model", [Int32, Uint32, Int64, Uint64], ids=lambda model: model.__name__)
def test_sized_ints_refuse_values_outside_their_width(model: type[Int32 | Uint32 | Int64 | Uint64]) -> None:
    model(model.low)
    model(model.high)
    with pytest.raises(ValueError):
        model(model.low - 1)
    with pytest.raises(ValueError):
        model(model.high + 1)


def test_sized_ints_remember_their_width() -> None:
    assert repr(Uint32(5)) == "Uint32(5)"
    assert Int32(5) == 5 == Uint64(5)


@pytest.mark.parametrize(
    "encoded",
    [
        b"\x02" + encode_varint(2**31),  # INT32 max + 1
        b"\x02" + encode_varint(2**64 - 2**31 - 1),  # INT32 min - 1, in two's complement
        b"\x02" + encode_varint(2**32 - 1),  # -1 as a 32-bit pattern, not the 64-bit one HAProxy sends
        b"\x03" + encode_varint(2**32),  # UINT32 max + 1
    ],
)
def test_32_bit_values_out_of_range_are_invalid(encoded: bytes) -> None:
    with pytest.raises(InvalidFrame) as caught:
        decode_data(encoded, 0)
    assert caught.value.status == Status.INVALID_FRAME
    with pytest.raises(InvalidFrame):
        spec.parse_data(encoded)


@pytest.mark.parametrize("kind", range(10, 16))
def test_reserved_types_are_invalid(kind: int) -> None:
    with pytest.raises(InvalidFrame):
        decode_data(bytes((kind,)) + b"\x00" * 16, 0)


KV_LIST = {
    "supported-versions": "2.0",
    "max-frame-size": Uint32(16380),
    "capabilities": "pipelining,async",
    "healthcheck": False,
    "engine-id": NON_UTF8,
}
MESSAGES = [
    Message("mirror", {"method": "GET", "path": "/a?b=c", "src": IPv4Address("10.0.0.1"), "n": Int64(-5)}),
    Message("empty", {}),
    Message("binary", {"body": b"\x00" * 300, "ip6": IPv6Address("::1"), "": None}),
]
ACTIONS = [
    SetVar(VarScope.TRANSACTION, "sampled", True),
    UnsetVar(VarScope.REQUEST, "x"),
    SetVar(VarScope.PROCESS, "count", Uint64(2**40)),
    UnsetVar(VarScope.RESPONSE, NON_UTF8),
    SetVar(VarScope.SESSION, "id", "abc"),
]


def test_kv_list_round_trip() -> None:
    assert decode_kv_list(encode_kv_list(KV_LIST)) == KV_LIST
    assert decode_kv_list(b"") == {}


def test_messages_round_trip() -> None:
    assert decode_messages(encode_messages(MESSAGES)) == MESSAGES
    assert decode_messages(b"") == []


def test_message_known_bytes() -> None:
    assert encode_messages([Message("m", {"a": True})]) == b"\x01m\x01\x01a\x11"


def test_duplicate_arg_names_keep_the_last_value() -> None:
    assert decode_messages(b"\x01m\x02\x01a\x11\x01a\x01") == [Message("m", {"a": False})]


def test_actions_round_trip() -> None:
    assert decode_actions(encode_actions(ACTIONS)) == ACTIONS
    assert decode_actions(b"") == []


def test_action_known_bytes() -> None:
    assert encode_actions([SetVar(VarScope.TRANSACTION, "v", Int32(1))]) == b"\x01\x03\x02\x01v\x02\x01"
    assert encode_actions([UnsetVar(VarScope.REQUEST, "v")]) == b"\x02\x02\x03\x01v"


@pytest.mark.parametrize(
    "encoded",
    [
        b"\x01\x03\x05\x01v\x00",  # unknown scope
        b"\x01\x02\x02\x01v\x00",  # set-var with 2 args
        b"\x02\x03\x02\x01v",  # unset-var with 3 args
        b"\x03\x02\x02\x01v",  # unknown action
    ],
)
def test_malformed_actions_are_invalid(encoded: bytes) -> None:
    with pytest.raises(InvalidFrame):
        decode_actions(encoded)
    with pytest.raises(InvalidFrame):
        spec.parse_actions(encoded)


@pytest.mark.parametrize(
    ("hot", "reference", "model"),
    [
        pytest.param(encode_varint, spec.build_varint, 2**64, id="varint-2**64"),
        pytest.param(encode_varint, spec.build_varint, -1, id="varint-negative"),
        pytest.param(encode_data, spec.build_data, 2**64, id="int-2**64"),
        pytest.param(
            lambda frame: encode_frame(
                frame.type, frame.flags, frame.stream_id, frame.frame_id, frame.payload
            ),
            spec.build_packet,
            Frame(FrameType.NOTIFY, FLAG_FIN, 2**64, 0, b""),
            id="stream-id-2**64",
        ),
        pytest.param(
            encode_messages,
            spec.build_messages,
            [Message("m", {str(i): None for i in range(256)})],
            id="256-args",
        ),
    ],
)
def test_unrepresentable_models_are_refused_alike(
    hot: Callable[[Any], bytes], reference: Callable[[Any], bytes], model: Any
) -> None:
    with pytest.raises(ValueError):
        hot(model)
    with pytest.raises(ValueError):
        reference(model)


def test_not_an_action_is_refused() -> None:
    with pytest.raises(TypeError):
        encode_actions(["set-var"])  # type: ignore[list-item]


def test_frame_known_bytes() -> None:
    packet = encode_frame(FrameType.ACK, FLAG_FIN, 1, 240, b"\x02\x02\x03\x01v")
    assert packet == b"\x00\x00\x00\x0d\x67\x00\x00\x00\x01\x01\xf0\x00\x02\x02\x03\x01v"
    assert decode_frame(packet[4:]) == Frame(FrameType.ACK, FLAG_FIN, 1, 240, b"\x02\x02\x03\x01v")


@pytest.mark.parametrize(
    ("flags", "fin", "abort"),
    [(0, False, False), (FLAG_FIN, True, False), (FLAG_ABORT, False, True), (0xFFFFFFFF, True, True)],
)
def test_frame_flags(flags: int, fin: bool, abort: bool) -> None:
    frame = decode_frame(encode_frame(FrameType.NOTIFY, flags, 2**64 - 1, 0, b"")[4:])
    assert (frame.flags, frame.fin, frame.abort) == (flags, fin, abort)
    assert frame.stream_id == 2**64 - 1


def _hot_data(buf: bytes) -> Any:
    return decode_data(buf, 0)[0]


def _hot_varint(buf: bytes) -> int:
    return decode_varint(buf, 0)[0]


# Every proper prefix of one encoded value must be refused, by the hot decoder and by the spec.
TRUNCATION_CASES = [
    pytest.param(encode_data(value), _hot_data, spec.parse_data, id=f"data-{_value_id(value)}")
    for value in TYPED_VALUES
] + [
    pytest.param(encode_varint(value), _hot_varint, spec.parse_varint, id=f"varint-{value}")
    for value in (0, 240, 2288, 264432, 33818864, 2**32 - 1, 2**64 - 1)
]


@pytest.mark.parametrize(("encoded", "hot", "reference"), TRUNCATION_CASES)
def test_every_truncation_is_invalid(
    encoded: bytes, hot: Callable[[bytes], Any], reference: Callable[[bytes], Any]
) -> None:
    for end in range(len(encoded)):
        with pytest.raises(InvalidFrame):
            hot(encoded[:end])
        with pytest.raises(InvalidFrame):
            reference(encoded[:end])


@pytest.mark.parametrize(
    ("items", "shape", "encode", "hot", "reference"),
    [
        pytest.param(
            list(KV_LIST.items()),
            dict,
            lambda items: encode_kv_list(dict(items)),
            decode_kv_list,
            spec.parse_kv_list,
            id="kv-list",
        ),
        pytest.param(MESSAGES, list, encode_messages, decode_messages, spec.parse_messages, id="messages"),
        pytest.param(ACTIONS, list, encode_actions, decode_actions, spec.parse_actions, id="actions"),
    ],
)
def test_lists_cut_anywhere_but_between_items_are_invalid(
    items: list[Any],
    shape: Callable[[list[Any]], Any],
    encode: Callable[[list[Any]], bytes],
    hot: Callable[[bytes], Any],
    reference: Callable[[bytes], Any],
) -> None:
    """A list carries no count, so a cut between two items is a valid shorter list (the empty cut the
    empty list); a cut anywhere else must be refused."""
    encoded = encode(items)
    boundaries = {len(encode(items[:count])): count for count in range(len(items) + 1)}
    for end in range(len(encoded) + 1):
        if end in boundaries:
            assert hot(encoded[:end]) == shape(items[: boundaries[end]])
            assert reference(encoded[:end]) == shape(items[: boundaries[end]])
        else:
            with pytest.raises(InvalidFrame):
                hot(encoded[:end])
            with pytest.raises(InvalidFrame):
                reference(encoded[:end])


@pytest.mark.parametrize(
    "frame",
    [
        Frame(FrameType.HAPROXY_HELLO, FLAG_FIN, 0, 0, encode_kv_list(KV_LIST)),
        Frame(FrameType.NOTIFY, FLAG_FIN, 2**64 - 1, 2**32, encode_messages(MESSAGES)),
        Frame(FrameType.ACK, FLAG_FIN | FLAG_ABORT, 300, 70000, b""),
    ],
    ids=["hello", "notify", "ack"],
)
def test_frame_truncated_in_its_header_is_invalid(frame: Frame) -> None:
    packet = encode_frame(frame.type, frame.flags, frame.stream_id, frame.frame_id, frame.payload)
    body = packet[4:]
    assert decode_frame(body) == frame
    assert spec.parse_packet(packet) == frame
    header = len(body) - len(frame.payload)
    for end in range(header):
        with pytest.raises(InvalidFrame):
            decode_frame(body[:end])
        with pytest.raises(InvalidFrame):
            spec.parse_frame(body[:end])
    for end in range(len(packet)):
        with pytest.raises(InvalidFrame):
            spec.parse_packet(packet[:end])


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x01\x03", "truncated action"),
        (b"\x01\x03\x09\x01a\x08\x01x", "unknown variable scope 9"),
        (b"\x07\x03\x02\x01a", "unknown action 7 with 3 args"),
        (b"\x01\x02\x02\x01a", "unknown action 1 with 2 args"),
    ],
)
def test_bad_actions_say_what_is_wrong(payload: bytes, message: str) -> None:
    with pytest.raises(InvalidFrame) as info:
        decode_actions(payload)
    assert str(info.value) == message


def test_messages_read_by_a_learned_shape_are_what_they_say() -> None:
    """After one mirror message, the next of that name is read by its shape (decode_messages):
    other values, a long value, a NULL where a STRING was, args in another order, one arg fewer and
    a value running past the end each decode as they are, or are refused, as without the shape."""
    first = {"arg_method": "GET", "arg_path": "/", "arg_hdrs": "host: a\r\n\r\n", "arg_body": b""}
    assert decode_messages(encode_messages([Message("mirror", first)])) == [Message("mirror", first)]
    variants = [
        {**first, "arg_path": "/other?q=1", "arg_body": b"\x00\xff" * 3},
        {**first, "arg_hdrs": "x-long: " + "é" * 300 + "\r\n\r\n", "arg_body": b"b" * 5000},
        {**first, "arg_path": None},
        {**first, "arg_path": 7},
        dict(reversed(first.items())),
        {"arg_method": "GET", "arg_path": "/", "arg_hdrs": "h: 1\r\n\r\n"},
    ]
    for args in variants:
        payload = encode_messages([Message("mirror", args), Message("mirror", first)])
        assert decode_messages(payload) == [Message("mirror", args), Message("mirror", first)], args
        assert decode_messages(encode_messages([Message("mirror", first)])) == [Message("mirror", first)]
    whole = encode_messages([Message("mirror", {**first, "arg_body": b"body"})])
    for cut in range(1, len(whole)):
        with pytest.raises(InvalidFrame):
            decode_messages(whole[:-cut])


def test_a_learned_shape_never_reads_into_the_next_message() -> None:
    """A message with fewer args than the shape of its name: the next message's name, count and
    first arg (`\\x01b\\x08...`) look like the shape's next arg, and must stay a message."""
    decode_messages(encode_messages([Message("m", {"a": "1", "b": "2"})]))
    eight = {f"k{i}": "v" for i in range(8)}
    payload = encode_messages([Message("m", {"a": "1"}), Message("b", eight)])
    assert decode_messages(payload) == [Message("m", {"a": "1"}), Message("b", eight)]


def test_a_message_repeating_an_arg_name_decodes_alike_after_its_first() -> None:
    """HAProxy lets a spoe-message name an arg twice; the value decoded last is the one kept. Such a
    message is not read by a learned shape (a shape counts what it read by the args it filled in),
    so a later message of that name that differs after the repeated name still decodes whole: here
    a NULL where the shape had a STRING."""

    def message(*args: tuple[str, Any]) -> bytes:
        return (
            encode_string("dup")
            + bytes((len(args),))
            + b"".join(encode_string(name) + encode_data(value) for name, value in args)
        )

    first = message(("a", "1"), ("a", "2"), ("b", "x"))
    assert decode_messages(first) == [Message("dup", {"a": "2", "b": "x"})]
    differing = message(("a", "1"), ("a", "2"), ("b", None))
    after = encode_messages([Message("next", {"c": "3"})])
    assert decode_messages(differing + after) == [
        Message("dup", {"a": "2", "b": None}),
        Message("next", {"c": "3"}),
    ]

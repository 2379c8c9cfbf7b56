"""The sans-IO engine against a scripted HAProxy: every test asserts the exact frames the agent
answers (type, flags, ids, items), because HAProxy drops a connection over any of them."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spoe import (
    NEED_DATA,
    Closed,
    Connection,
    Hello,
    Int32,
    Int64,
    LocalProtocolError,
    Message,
    Notify,
    NotifyAborted,
    SetVar,
    State,
    Status,
    Uint32,
    Uint64,
    UnsetVar,
    VarScope,
)
from spoe.connection import ReassemblyBudget
from spoe.data import encode_string
from spoe.frames import (
    FLAG_ABORT,
    FLAG_FIN,
    FrameType,
    decode_messages,
    encode_ack_actions,
    encode_frame,
    encode_kv_list,
    encode_messages,
)
from tests.support.spop_peer import (
    HAPROXY_2X_CAPABILITIES,
    HAPROXY_3X_CAPABILITIES,
    HAPROXY_3X_MAX_PIPELINED_STREAMS,
    UNKNOWN_FRAME_TYPE,
    abort,
    ack_actions,
    disconnect_status,
    drain,
    exchange,
    haproxy_disconnect,
    haproxy_hello,
    healthcheck_hello,
    hello_2x,
    hello_3x,
    kv,
    notify,
    notify_fragments,
    parse_frames,
    raw_frame,
    unset,
)

ALL_CAPABILITIES = frozenset({"pipelining", "async", "fragmentation"})
ENGINE_ID = "3D2E1C5A-0B4F-4C8E-9A6D-7F1E2B3C4D5E"

# A message list whose encoding holds every kind of byte boundary worth cutting at: names, arg
# counts, type bytes, multi-byte varints, an IPv4 body and a non-ASCII string value.
MESSAGES = [
    Message("check-client", {"ip": IPv4Address("192.0.2.7"), "path": "/h\u00e9llo?x=1", "n": Int32(-300)}),
    Message("tls", {"on": True, "raw": b"\x00\xff", "none": None, "big": Uint64(2**40)}),
]
PAYLOAD = encode_messages(MESSAGES)


def ready_connection(hello: bytes | None = None, **options: Any) -> Connection:
    """A connection past a successful handshake, its AGENT-HELLO already drained."""
    conn = Connection(**options)
    events, frames = exchange(conn, hello or hello_2x())
    assert [type(event) for event in events] == [Hello]
    assert [frame.type for frame in frames] == [FrameType.AGENT_HELLO]
    return conn


def agent_hello_items(conn: Connection, hello: bytes) -> tuple[Hello, dict[str, Any]]:
    """Run the handshake and check the reply is exactly one well-formed AGENT-HELLO."""
    events, frames = exchange(conn, hello)
    assert len(frames) == 1
    reply = frames[0]
    assert (reply.type, reply.flags, reply.stream_id, reply.frame_id) == (
        FrameType.AGENT_HELLO,
        FLAG_FIN,
        0,
        0,
    )
    items = kv(reply)
    assert set(items) == {"version", "max-frame-size", "capabilities"}
    assert isinstance(items["max-frame-size"], Uint32), "HAProxy reads max-frame-size as a UINT32"
    assert isinstance(events[0], Hello)
    return events[0], items


def assert_closed_with(events: list[Any], frames: list[Any], status: Status) -> None:
    """The engine refused: exactly one AGENT-DISCONNECT with `status`, and a Closed of ours."""
    assert len(events) >= 1
    closed = events[-1]
    assert isinstance(closed, Closed)
    assert (closed.status, closed.by_peer) == (status, False)
    assert not any(isinstance(event, Closed) for event in events[:-1])
    assert len(frames) >= 1
    assert disconnect_status(frames[-1])[0] is status
    assert all(frame.type != FrameType.AGENT_DISCONNECT for frame in frames[:-1])


def capability_set(text: str) -> set[str]:
    assert " " not in text, f"capabilities we send should be a clean list: {text!r}"
    return {item for item in text.split(",") if item}


# HELLO ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ours", "theirs", "negotiated"),
    [(16384, 16380, 16380), (1024, 16380, 1024), (256, 16380, 256), (16384, 256, 256), (4096, 4096, 4096)],
)
def test_hello_negotiates_the_smaller_max_frame_size(ours: int, theirs: int, negotiated: int) -> None:
    conn = Connection(max_frame_size=ours)
    event, items = agent_hello_items(conn, hello_2x(max_frame_size=theirs))
    assert items["version"] == "2.0"
    assert items["max-frame-size"] == negotiated == event.max_frame_size
    assert conn.state is State.READY


@pytest.mark.parametrize(
    ("offered", "ours", "announced"),
    [
        (HAPROXY_2X_CAPABILITIES, ALL_CAPABILITIES, {"pipelining", "async", "fragmentation"}),
        (HAPROXY_3X_CAPABILITIES, ALL_CAPABILITIES, {"pipelining", "fragmentation"}),
        ("", ALL_CAPABILITIES, {"fragmentation"}),
        (HAPROXY_2X_CAPABILITIES, {"pipelining"}, {"pipelining"}),
        (" async , pipelining,fragmentation ", {"async", "pipelining"}, {"async", "pipelining"}),
        ("pipelining,,async,some-future-thing", {"pipelining", "async"}, {"pipelining", "async"}),
        (HAPROXY_2X_CAPABILITIES, set(), set()),
    ],
)
def test_hello_capabilities(offered: str, ours: set[str], announced: set[str]) -> None:
    """Pipelining and async are symmetric (both sides must have them); fragmentation concerns what
    we receive, so we announce it whenever we enable it, whatever HAProxy offers."""
    event, items = agent_hello_items(Connection(capabilities=ours), haproxy_hello(capabilities=offered))
    assert capability_set(items["capabilities"]) == announced
    assert event.capabilities == announced


@pytest.mark.parametrize("versions", ["2.0", "1.0, 2.0 ,3.1", " 2.0 ", "2.5", "3.0,2.0"])
def test_hello_accepts_any_list_naming_major_2(versions: str) -> None:
    _, items = agent_hello_items(Connection(), hello_2x(versions=versions))
    assert items["version"] == "2.0"


@pytest.mark.parametrize("versions", ["1.0", "3.1", "1.0, 3.1", "", "2.x", "20.0"])
def test_hello_without_major_2_is_refused_with_status_8(versions: str) -> None:
    conn = Connection()
    events, frames = exchange(conn, hello_2x(versions=versions))
    assert_closed_with(events, frames, Status.UNSUPPORTED_VERSION)


def test_hello_keeps_the_engine_id() -> None:
    event, _ = agent_hello_items(Connection(), hello_2x(engine_id=ENGINE_ID))
    assert event.engine_id == ENGINE_ID
    event, _ = agent_hello_items(Connection(), hello_2x(engine_id=None))
    assert event.engine_id is None
    event, _ = agent_hello_items(Connection(), hello_2x(engine_id=Uint32(7)))  # not a string: none
    assert event.engine_id is None


def test_healthcheck_is_answered_then_closed_without_disconnect() -> None:
    conn = Connection()
    events, frames = exchange(conn, healthcheck_hello())
    assert events == [
        Hello("2.0", 16380, frozenset({"fragmentation"}), None, healthcheck=True),
        Closed(Status.NORMAL, "health check answered", by_peer=False),
    ]
    assert [frame.type for frame in frames] == [FrameType.AGENT_HELLO]
    assert kv(frames[0])["max-frame-size"] == 16380
    assert conn.state is State.CLOSED


@pytest.mark.parametrize(
    ("hello", "status"),
    [
        (hello_2x(omit=["supported-versions"]), Status.NO_VERSION),
        (hello_2x(supported_versions=Uint32(2)), Status.NO_VERSION),
        (hello_2x(omit=["max-frame-size"]), Status.NO_MAX_FRAME_SIZE),
        (hello_2x(max_frame_size="16380"), Status.NO_MAX_FRAME_SIZE),
        (hello_2x(max_frame_size=True), Status.NO_MAX_FRAME_SIZE),
        (hello_2x(omit=["capabilities"]), Status.NO_CAPABILITIES),
        (hello_2x(versions="1.0"), Status.UNSUPPORTED_VERSION),
        (hello_2x(max_frame_size=255), Status.BAD_MAX_FRAME_SIZE),
        (hello_2x(max_frame_size=0), Status.BAD_MAX_FRAME_SIZE),
    ],
    ids=[
        "no-versions",
        "versions-not-a-string",
        "no-max-frame-size",
        "max-frame-size-string",
        "max-frame-size-bool",
        "no-capabilities",
        "version-1",
        "max-frame-size-255",
        "max-frame-size-0",
    ],
)
def test_bad_hello_gets_agent_disconnect(hello: bytes, status: Status) -> None:
    conn = Connection()
    events, frames = exchange(conn, hello)
    assert_closed_with(events, frames, status)
    assert len(frames) == 1, "no AGENT-HELLO before the refusal"
    assert conn.hello is None
    assert conn.state is State.CLOSED


# NOTIFY and ACK ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("stream_id", "frame_id"), [(0, 0), (1, 1), (239, 240), (2288, 2**33), (2**63, 7)])
def test_notify_is_acked_with_the_same_ids(stream_id: int, frame_id: int) -> None:
    conn = ready_connection()
    events, _ = exchange(conn, notify(stream_id, frame_id, MESSAGES))
    assert events == [Notify(stream_id, frame_id, MESSAGES)]
    assert conn.unacked == 1
    conn.send_ack(stream_id, frame_id)
    (ack,) = parse_frames(conn.data_to_send())
    assert (ack.type, ack.flags, ack.stream_id, ack.frame_id, ack.payload) == (
        FrameType.ACK,
        FLAG_FIN,
        stream_id,
        frame_id,
        b"",
    )
    assert conn.unacked == 0


def test_pipelined_notifies_are_acked_in_any_order() -> None:
    conn = ready_connection()
    ids = [(1, 1), (2, 1), (1, 2)]
    events, _ = exchange(conn, b"".join(notify(s, f, MESSAGES) for s, f in ids))
    assert [(event.stream_id, event.frame_id) for event in events] == ids
    for stream_id, frame_id in reversed(ids):
        conn.send_ack(stream_id, frame_id, [SetVar(VarScope.TRANSACTION, "order", f"{stream_id}/{frame_id}")])
    acks = parse_frames(conn.data_to_send())
    assert [(ack.stream_id, ack.frame_id) for ack in acks] == list(reversed(ids))
    assert [ack_actions(ack)[0].value for ack in acks] == ["1/2", "2/1", "1/1"]


TYPED_VALUES = [
    None,
    True,
    False,
    Int32(-(2**31)),
    Uint32(2**32 - 1),
    Int64(-(2**40)),
    Uint64(2**64 - 1),
    7,
    -7,
    IPv4Address("203.0.113.9"),
    IPv6Address("2001:db8::1"),
    "r\u00e9sum\u00e9",
    "",
    b"\x00\x01\xfe\xff",
    b"",
]


# Ids with no backslash: mutmut runs each mutant's tests by node id in a second in-process pytest.main,
# which does not find an explicit id holding escapes.
@pytest.mark.parametrize(
    "value", TYPED_VALUES, ids=[f"{type(v).__name__}:{v!a}".replace("\\", "/") for v in TYPED_VALUES]
)
def test_set_and_unset_var_round_trip_through_the_ack(value: Any) -> None:
    """Every scope, every data type: what HAProxy decodes from the ACK is what the handler asked."""
    conn = ready_connection()
    exchange(conn, notify(9, 3, MESSAGES))
    actions = [SetVar(scope, f"v_{scope.name.lower()}", value) for scope in VarScope]
    actions += [UnsetVar(scope, f"u_{scope.name.lower()}") for scope in VarScope]
    conn.send_ack(9, 3, actions)
    (ack,) = parse_frames(conn.data_to_send())
    decoded = ack_actions(ack)
    assert decoded == actions
    for sent, received in zip(actions[:5], decoded[:5], strict=True):
        expected_type = Int64 if type(sent.value) is int else type(sent.value)
        assert type(received.value) is expected_type, "the SPOP width must survive the round trip"


def test_a_handlers_tuple_of_actions_goes_in_every_ack_that_returns_it() -> None:
    """A tuple of actions (a handler's constant) is encoded once and its bytes reused by identity:
    every ACK returning it carries it, and another tuple or a list carries its own."""
    conn = ready_connection()
    constant = (SetVar(VarScope.TRANSACTION, "mirrored", 1), UnsetVar(VarScope.REQUEST, "x"))
    other = (SetVar(VarScope.SESSION, "other", "v"),)
    sent = [constant, constant, other, list(other), constant]
    for frame_id, actions in enumerate(sent, start=1):
        exchange(conn, notify(1, frame_id, MESSAGES))
        conn.send_ack(1, frame_id, actions)
        (ack,) = parse_frames(conn.data_to_send())
        assert ack_actions(ack) == list(actions)


def test_an_acks_actions_fill_the_frame_size_exactly_and_no_more() -> None:
    """An ACK's actions may take max-frame-size less 30 bytes (the frame's head at its largest);
    one byte more is refused before the NOTIFY stops being pending."""
    conn = ready_connection(hello_2x(max_frame_size=1024))
    def payload_size(size: int) -> int:
        return len(encode_ack_actions([SetVar(VarScope.TRANSACTION, "v", b"x" * size)]))
    fits = max(size for size in range(1100) if payload_size(size) + 30 <= conn.frame_limit)
    assert payload_size(fits) + 30 == conn.frame_limit
    exchange(conn, notify(1, 1, MESSAGES), notify(1, 2, MESSAGES))
    conn.send_ack(1, 1, [SetVar(VarScope.TRANSACTION, "v", b"x" * fits)])
    with pytest.raises(LocalProtocolError, match="exceeds max-frame-size"):
        conn.send_ack(1, 2, [SetVar(VarScope.TRANSACTION, "v", b"x" * (fits + 1))])
    assert conn.unacked == 1


def test_a_notify_id_sent_twice_is_pending_until_acked_twice() -> None:
    """HAProxy may reuse a stream and frame id while its first NOTIFY is pending: each needs its ACK."""
    conn = ready_connection()
    exchange(conn, notify(1, 1, MESSAGES), notify(1, 1, MESSAGES))
    assert conn.unacked == 2
    conn.send_ack(1, 1)
    assert conn.unacked == 1
    conn.send_ack(1, 1)
    assert conn.unacked == 0
    with pytest.raises(LocalProtocolError):
        conn.send_ack(1, 1)


def test_frames_past_64_kib_of_one_read_all_come_out_in_order() -> None:
    """Past 64 KiB the connection lets go of what it has taken from its input: every frame of a
    large read still comes out whole and in order, the read ending on a frame's end or inside one."""
    big = [Message("m", {"body": b"x" * 10_000})]
    data = b"".join(notify(1, frame_id, big) for frame_id in range(1, 9))
    for cuts in ([len(data)], [len(data) - 50]):
        conn = ready_connection()
        chunks = [data[: cuts[0]], data[cuts[0] :]]
        events, _ = exchange(conn, *(chunk for chunk in chunks if chunk))
        assert events == [Notify(1, frame_id, big) for frame_id in range(1, 9)]


def test_a_connection_is_built_only_with_what_spop_allows() -> None:
    """A frame size under SPOP's minimum and capabilities it does not know are programming errors,
    each named; by default a NOTIFY may carry 1024 messages plus arguments."""
    with pytest.raises(ValueError, match=r"^max_frame_size must be at least 256, got 255$"):
        Connection(max_frame_size=255)
    with pytest.raises(ValueError, match=r"^unknown capabilities: bogus, zzz$"):
        Connection(capabilities={"pipelining", "zzz", "bogus"})
    assert Connection().max_notify_entries == 1024


def test_actions_from_any_iterable_go_in_the_ack() -> None:
    """A handler may return its actions as any iterable (a generator here): each goes in the ACK."""
    conn = ready_connection()
    actions = [SetVar(VarScope.TRANSACTION, "a", 1), UnsetVar(VarScope.REQUEST, "b")]
    exchange(conn, notify(1, 1, MESSAGES))
    conn.send_ack(1, 1, (action for action in actions))
    (ack,) = parse_frames(conn.data_to_send())
    assert ack_actions(ack) == actions


def test_a_bytes_like_read_is_copied_before_the_caller_reuses_its_buffer() -> None:
    """receive_data takes any bytes-like object: a bytearray or memoryview the caller then reuses
    (a buffered protocol's read buffer) must not change what was received."""
    for wrap in (bytearray, lambda data: memoryview(bytearray(data))):
        conn = ready_connection()
        buffer = wrap(notify(1, 1, MESSAGES))
        conn.receive_data(buffer)
        buffer[:] = bytes(len(buffer))
        assert conn.next_event() == Notify(1, 1, MESSAGES)


def test_send_ack_for_a_frame_never_received_raises() -> None:
    conn = ready_connection()
    with pytest.raises(LocalProtocolError):
        conn.send_ack(1, 1)
    exchange(conn, notify(1, 1, MESSAGES))
    conn.send_ack(1, 1)
    with pytest.raises(LocalProtocolError):
        conn.send_ack(1, 1)
    assert len(parse_frames(conn.data_to_send())) == 1


def test_a_failed_send_ack_leaves_the_notify_pending() -> None:
    """An action that cannot be encoded, or an ACK too big for the frame size, is the
    application's bug: it raises, and the NOTIFY can still be acknowledged without actions
    (the adapter relies on this to answer HAProxy anyway)."""
    conn = ready_connection(hello_2x(max_frame_size=256))
    exchange(conn, notify(4, 2, MESSAGES))
    with pytest.raises(TypeError):
        conn.send_ack(4, 2, [SetVar(VarScope.TRANSACTION, "x", 1.5)])
    with pytest.raises(LocalProtocolError):
        conn.send_ack(4, 2, [SetVar(VarScope.TRANSACTION, "x", "y" * 300)])
    assert conn.unacked == 1
    assert conn.data_to_send() == b""
    conn.send_ack(4, 2)
    (ack,) = parse_frames(conn.data_to_send())
    assert (ack.type, ack.stream_id, ack.frame_id, ack.payload) == (FrameType.ACK, 4, 2, b"")


# Fragmentation (HAProxy 2.x towards an agent announcing it) --------------------------------------


@pytest.mark.parametrize("cut", range(len(PAYLOAD) + 1))
def test_fragments_split_at_every_byte_offset_are_reassembled(cut: int) -> None:
    """Cuts land inside names, varints, the IPv4 body and the UTF-8 of a string value."""
    conn = ready_connection()
    events, frames = exchange(conn, *notify_fragments(5, 8, MESSAGES, [cut]))
    assert events == [Notify(5, 8, MESSAGES)]
    assert frames == []
    conn.send_ack(5, 8)
    (ack,) = parse_frames(conn.data_to_send())
    assert (ack.type, ack.stream_id, ack.frame_id) == (FrameType.ACK, 5, 8)


def test_fragments_larger_than_the_smallest_frame_are_joined_whole() -> None:
    """Fragments of 256 bytes or more are kept as separate parts (smaller ones are merged), and
    reassembled byte for byte."""
    messages = [Message("big", {"a": "x" * 700, "b": b"y" * 700})]
    conn = ready_connection()
    events, _ = exchange(conn, *notify_fragments(5, 8, messages, [300, 700, 1100]))
    assert events == [Notify(5, 8, messages)]


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(0, len(PAYLOAD)), min_size=1, max_size=8), one_read=st.booleans())
def test_fragments_split_anywhere_are_reassembled(cuts: list[int], one_read: bool) -> None:
    conn = ready_connection()
    fragments = notify_fragments(5, 8, MESSAGES, cuts)
    events, _ = exchange(conn, b"".join(fragments)) if one_read else exchange(conn, *fragments)
    assert events == [Notify(5, 8, MESSAGES)]


def test_abort_drops_the_fragmented_notify_without_ack() -> None:
    conn = ready_connection()
    first, second, _last = notify_fragments(3, 1, MESSAGES, [10, 20])
    events, frames = exchange(conn, first, second, abort(3, 1))
    assert events == [NotifyAborted(3, 1)]
    assert frames == []
    assert conn.unacked == 0
    with pytest.raises(LocalProtocolError):
        conn.send_ack(3, 1)
    events, _ = exchange(conn, *notify_fragments(3, 2, MESSAGES, [15]))
    assert events == [Notify(3, 2, MESSAGES)], "the connection goes on after an abort"


def test_interlaced_notify_is_refused_with_status_11() -> None:
    conn = ready_connection()
    first = notify_fragments(1, 1, MESSAGES, [10])[0]
    events, frames = exchange(conn, first, notify(2, 1, MESSAGES))
    assert_closed_with(events, frames, Status.INTERLACED_FRAMES)


def test_interlaced_fragment_is_refused_with_status_11() -> None:
    conn = ready_connection()
    first = notify_fragments(1, 1, MESSAGES, [10])[0]
    events, frames = exchange(conn, first, unset(2, 1, PAYLOAD[10:], flags=FLAG_FIN))
    assert_closed_with(events, frames, Status.INTERLACED_FRAMES)


@pytest.mark.parametrize("flags", [0, FLAG_FIN, FLAG_FIN | FLAG_ABORT])
def test_fragment_of_no_open_frame_is_refused_with_status_12(flags: int) -> None:
    conn = ready_connection()
    events, frames = exchange(conn, unset(6, 6, PAYLOAD[:5], flags=flags))
    assert_closed_with(events, frames, Status.FRAME_ID_NOT_FOUND)


def test_fragment_after_the_frame_completed_is_refused_with_status_12() -> None:
    conn = ready_connection()
    events, frames = exchange(conn, *notify_fragments(6, 6, MESSAGES, [5]), unset(6, 6, flags=FLAG_FIN))
    assert isinstance(events[0], Notify)
    assert_closed_with(events[1:], frames, Status.FRAME_ID_NOT_FOUND)


def test_fragmented_notify_without_negotiated_fragmentation_is_refused_with_status_10() -> None:
    """HAProxy offering fragmentation changes nothing: it is about what *we* receive."""
    conn = ready_connection(hello_2x(offer_fragmentation=True), capabilities={"pipelining", "async"})
    assert "fragmentation" not in conn.hello.capabilities
    events, frames = exchange(conn, notify_fragments(1, 1, MESSAGES, [10])[0])
    assert_closed_with(events, frames, Status.FRAGMENTATION_NOT_SUPPORTED)


def test_a_notify_is_bounded_in_messages_plus_arguments_to_the_entry() -> None:
    """MESSAGES is 2 messages with 7 arguments: 9 entries pass (twice: the second NOTIFY takes the
    shapes the first taught the decoder), 8 are refused with status 13 and a message saying so."""
    at_bound = ready_connection(max_notify_entries=9)
    for frame_id in (1, 2):
        events, _ = exchange(at_bound, notify(1, frame_id, MESSAGES))
        assert events == [Notify(1, frame_id, MESSAGES)]
    over = ready_connection(max_notify_entries=8)
    events, frames = exchange(over, notify(1, 1, MESSAGES))
    assert_closed_with(events, frames, Status.RESOURCE_ALLOCATION)
    assert events[-1].message == "NOTIFY carries more than 8 messages and arguments"


def test_strings_and_names_that_are_not_utf8_keep_their_bytes_in_either_decoding() -> None:
    """HAProxy sends header values and names as they came: bytes that are not UTF-8 decode with
    surrogateescape (so they encode back the same) both when the decoder learns a message's shape
    and when it reads by the shape learned; short and long (over 239 bytes) strings alike."""
    long_value = "v\udce9" * 200
    messages = [Message("m", {"n\udcff": "caf\udce9", "long": long_value, "raw": b"\xff"})]
    conn = ready_connection()
    for frame_id in (1, 2):
        events, _ = exchange(conn, notify(1, frame_id, messages))
        assert events == [Notify(1, frame_id, messages)]
        conn.send_ack(1, frame_id)
        conn.data_to_send()


def test_a_message_whose_arguments_change_is_decoded_by_what_it_holds() -> None:
    """The decoder reads a message by the shape it learned from the last one of that name: one that
    matches for a while and then differs, and argument names of 240 bytes and more (a varint
    length), decode as they are."""
    long_names = {"n" * 240: "a", "m" * 300: "b"}
    sent = [
        [Message("m", {"a": "x", "b": "y"})],
        [Message("m", {"a": "x", "c": b"z"})],
        [Message("m", {"a": "x", "c": 7})],
        [Message("m", long_names)],
        [Message("m", long_names)],
    ]
    conn = ready_connection()
    for frame_id, messages in enumerate(sent, start=1):
        events, _ = exchange(conn, notify(1, frame_id, messages))
        assert events == [Notify(1, frame_id, messages)]
        conn.send_ack(1, frame_id)
        conn.data_to_send()


def test_a_list_of_actions_reused_by_a_handler_is_encoded_as_it_is_now() -> None:
    """A list may change between ACKs (only a tuple's bytes are kept): the second ACK carries the
    action added since the first."""
    conn = ready_connection()
    actions = [SetVar(VarScope.TRANSACTION, "a", 1)]
    for frame_id in (1, 2):
        exchange(conn, notify(1, frame_id, MESSAGES))
        conn.send_ack(1, frame_id, actions)
        (ack,) = parse_frames(conn.data_to_send())
        assert ack_actions(ack) == actions
        actions.append(UnsetVar(VarScope.REQUEST, "b"))


def test_a_message_carries_at_most_255_arguments() -> None:
    """The argument count is one byte: 255 arguments encode and decode back, 256 are refused."""
    most = Message("m", {f"a{n}": f"v{n}" for n in range(255)})
    assert decode_messages(encode_messages([most])) == [most]
    with pytest.raises(ValueError, match=r"^message 'm' has more than 255 args$"):
        encode_messages([Message("m", {f"a{n}": None for n in range(256)})])


def test_reassembly_is_capped_with_status_13() -> None:
    at_cap = ready_connection(max_reassembly=len(PAYLOAD))
    events, _ = exchange(at_cap, *notify_fragments(1, 1, MESSAGES, [10, 30]))
    assert events == [Notify(1, 1, MESSAGES)]

    over_cap = ready_connection(max_reassembly=len(PAYLOAD) - 1)
    events, frames = exchange(over_cap, *notify_fragments(1, 1, MESSAGES, [10, 30]))
    assert_closed_with(events, frames, Status.RESOURCE_ALLOCATION)


def test_the_reassembly_budget_is_shared_by_connections_and_given_back() -> None:
    """One budget of exactly one NOTIFY's payload for two connections: while the first holds part
    of its NOTIFY in fragments, the second's fragment that would pass the budget is refused (status
    13); completed or aborted, a fragmented NOTIFY gives its bytes back, and a NOTIFY of exactly the
    budget fits, again and again on the same connection."""
    budget = ReassemblyBudget(len(PAYLOAD))
    first = ready_connection(reassembly_budget=budget)
    second = ready_connection(reassembly_budget=budget)
    fragments = notify_fragments(1, 1, MESSAGES, [10, 30])
    events, _ = exchange(first, *fragments[:-1])
    assert (events, budget.used) == ([], 30)
    over = notify_fragments(2, 1, MESSAGES, [len(PAYLOAD) - 29])
    events, frames = exchange(second, over[0])
    assert_closed_with(events, frames, Status.RESOURCE_ALLOCATION)
    assert budget.used == 30
    events, _ = exchange(first, fragments[-1])
    assert (events, budget.used) == ([Notify(1, 1, MESSAGES)], 0)
    for frame_id in (2, 3):
        events, _ = exchange(first, *notify_fragments(1, frame_id, MESSAGES, [10]))
        assert (events, budget.used) == ([Notify(1, frame_id, MESSAGES)], 0)
    events, _ = exchange(first, notify_fragments(1, 4, MESSAGES, [10])[0], unset(1, 4, flags=FLAG_ABORT))
    assert [type(event) for event in events] == [NotifyAborted] and budget.used == 0


def test_incomplete_mark_follows_one_fragmented_notify_at_a_time() -> None:
    """The adapter cuts a peer whose frame, or fragmented NOTIFY, stays incomplete past its deadline:
    the mark holds while one NOTIFY's fragments arrive, changes for the next one, and is None once
    nothing is incomplete."""
    conn = ready_connection()
    assert conn.incomplete_mark is None
    first = notify_fragments(1, 1, MESSAGES, [10, 30])
    exchange(conn, first[0])
    mark = conn.incomplete_mark
    assert mark is not None
    exchange(conn, first[1])
    assert conn.incomplete_mark == mark
    exchange(conn, first[2])
    assert conn.incomplete_mark is None
    exchange(conn, notify_fragments(1, 2, MESSAGES, [10])[0])
    assert conn.incomplete_mark not in (None, mark)


# DISCONNECT, EOF, unknown and bad frames ---------------------------------------------------------


@pytest.mark.parametrize("message", ["normal", ""])
@pytest.mark.parametrize("handshake_done", [True, False])
def test_haproxy_disconnect_is_answered_then_closed(message: str, handshake_done: bool) -> None:
    """HAProxy 3.1+ waits for this reply before closing its side."""
    conn = ready_connection() if handshake_done else Connection()
    events, frames = exchange(conn, haproxy_disconnect(Status.NORMAL, message))
    assert events == [Closed(Status.NORMAL, message, by_peer=True)]
    assert [disconnect_status(frame) for frame in frames] == [(Status.NORMAL, "normal")]
    assert conn.state is State.CLOSED


def test_haproxy_disconnect_with_an_error_reports_its_status() -> None:
    conn = ready_connection()
    events, frames = exchange(conn, haproxy_disconnect(Status.TIMEOUT, "a timeout occurred"))
    assert events == [Closed(Status.TIMEOUT, "a timeout occurred", by_peer=True)]
    assert len(frames) == 1
    disconnect_status(frames[0])


@pytest.mark.parametrize(
    ("items", "status", "reply"),
    [
        ({"status-code": Uint32(2), "message": Uint32(7)}, Status.TIMEOUT, "timeout"),
        ({"status-code": True, "message": "odd"}, Status.UNKNOWN, "odd"),
        ({"message": "no code"}, Status.UNKNOWN, "no code"),
        ({"status-code": Uint32(13), "message": b"bin"}, Status.RESOURCE_ALLOCATION, "resource allocation"),
        ({"status-code": Uint32(0), "message": "m" * 300}, Status.NORMAL, "m" * 200),
    ],
)
def test_haproxy_disconnect_with_odd_items_is_still_answered(
    items: dict[str, Any], status: Status, reply: str
) -> None:
    """A message that is not a string is ignored (the reply names the status instead); a status that
    is not an integer is UNKNOWN, a BOOL included; the reply's message is cut at 200 characters."""
    conn = ready_connection()
    frame = encode_frame(FrameType.HAPROXY_DISCONNECT, FLAG_FIN, 0, 0, encode_kv_list(items))
    events, frames = exchange(conn, frame)
    text = items["message"] if isinstance(items["message"], str) else ""
    assert events == [Closed(status, text, by_peer=True)]
    assert [disconnect_status(f) for f in frames] == [(status, reply)]


@pytest.mark.parametrize("mid_frame", [False, True])
def test_eof_without_disconnect_is_a_normal_close_by_peer(mid_frame: bool) -> None:
    """HAProxy 3.2 closes idle and reloaded connections without a DISCONNECT (and resets them on a
    soft stop): that is not an error."""
    conn = ready_connection(hello_3x())
    if mid_frame:
        conn.receive_data(notify(1, 1, MESSAGES)[:6])
        assert drain(conn) == []
    conn.receive_data(b"")
    event = conn.next_event()
    assert isinstance(event, Closed), "the Closed event must come from the very next call"
    assert (event.status, event.by_peer) == (Status.NORMAL, True)
    assert conn.data_to_send() == b"", "no DISCONNECT towards a peer that has gone"


def test_unknown_frame_types_are_skipped() -> None:
    conn = Connection()
    events, frames = exchange(
        conn,
        raw_frame(UNKNOWN_FRAME_TYPE, b"before hello"),
        hello_2x(),
        notify(1, 1, MESSAGES),
        raw_frame(UNKNOWN_FRAME_TYPE, b"\xff" * 40, stream_id=1, frame_id=2),
        raw_frame(200),
        notify(1, 3, MESSAGES),
    )
    assert [type(event) for event in events] == [Hello, Notify, Notify]
    assert [frame.type for frame in frames] == [FrameType.AGENT_HELLO]


def notify_with_body_size(body_size: int) -> bytes:
    """A NOTIFY frame whose length prefix says exactly `body_size`."""
    for padding in range(body_size):
        frame = notify(1, 1, [Message("pad", {"p": b"\x00" * padding})])
        if len(frame) - 4 == body_size:
            return frame
    raise ValueError(f"cannot build a NOTIFY of {body_size} bytes")


def test_frame_of_exactly_max_frame_size_is_accepted() -> None:
    conn = ready_connection(hello_2x(max_frame_size=1000))
    events, _ = exchange(conn, notify_with_body_size(1000))
    assert [type(event) for event in events] == [Notify]


@pytest.mark.parametrize("handshake_done", [True, False])
def test_frame_too_big_is_refused_from_its_length_alone(handshake_done: bool) -> None:
    """Only the 4-byte length is fed: the body is never waited for (nor buffered)."""
    conn = ready_connection(hello_2x(max_frame_size=1000)) if handshake_done else Connection()
    limit = 1000 if handshake_done else 16384
    events, frames = exchange(conn, struct.pack(">I", limit + 1))
    assert_closed_with(events, frames, Status.FRAME_TOO_BIG)


def _header(frame_type: int, flags: int = FLAG_FIN) -> bytes:
    return bytes((frame_type,)) + struct.pack(">I", flags)


def _prefixed(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


_WHOLE_NOTIFY = notify(1, 1, MESSAGES)
MALFORMED = {
    "shorter-than-header": _prefixed(b"\x03\x00\x00"),
    "empty-frame": _prefixed(b""),
    "truncated-message-list": _prefixed(_WHOLE_NOTIFY[4:-3]),
    "message-without-arg-count": raw_frame(FrameType.NOTIFY, encode_string("m"), stream_id=1, frame_id=1),
    "unknown-data-type": raw_frame(
        FrameType.NOTIFY, encode_string("m") + b"\x01" + encode_string("a") + b"\x0a", stream_id=1, frame_id=1
    ),
    "string-past-the-end": raw_frame(FrameType.NOTIFY, b"\x10abc", stream_id=1, frame_id=1),
    "endless-varint-id": _prefixed(_header(FrameType.NOTIFY) + b"\xff" * 12),
    # Seven bytes, as an unfragmented NOTIFY needs, but they end with a two-byte stream id.
    "notify-without-frame-id": _prefixed(_header(FrameType.NOTIFY) + b"\xf0\x10"),
    "notify-with-frame-id-cut": _prefixed(_header(FrameType.NOTIFY) + b"\x01\xf0"),
    "truncated-disconnect": raw_frame(FrameType.HAPROXY_DISCONNECT, encode_string("status-code")),
    "ack-from-haproxy": raw_frame(FrameType.ACK, stream_id=1, frame_id=1),
    "second-hello": hello_2x(),
}


@pytest.mark.parametrize("frame", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_frames_are_refused_with_status_4(frame: bytes) -> None:
    conn = ready_connection()
    events, frames = exchange(conn, frame)
    assert_closed_with(events, frames, Status.INVALID_FRAME)


def test_notify_before_hello_is_refused_with_status_4() -> None:
    conn = Connection()
    events, frames = exchange(conn, notify(1, 1, MESSAGES))
    assert_closed_with(events, frames, Status.INVALID_FRAME)


def test_nothing_is_emitted_after_closed_and_buffers_are_released() -> None:
    conn = ready_connection()
    first = notify_fragments(1, 1, MESSAGES, [20])[0]
    events, frames = exchange(conn, first, MALFORMED["endless-varint-id"] + notify(2, 2, MESSAGES))
    assert_closed_with(events, frames, Status.INVALID_FRAME)
    conn.receive_data(notify(3, 3, MESSAGES) * 100)
    assert drain(conn) == []
    assert conn.data_to_send() == b""
    assert conn.close() is None
    # White-box: neither the unread bytes nor the held fragment outlive the connection.
    assert len(conn._in) == 0
    assert conn._fragment_parts == []


def test_close_from_our_side_queues_one_disconnect() -> None:
    conn = ready_connection()
    assert conn.close(Status.TIMEOUT, "idle timeout") == Closed(Status.TIMEOUT, "idle timeout", by_peer=False)
    (frame,) = parse_frames(conn.data_to_send())
    assert disconnect_status(frame) == (Status.TIMEOUT, "idle timeout")
    assert conn.close() is None


# Whole scripts: byte at a time, HAProxy 3.x ------------------------------------------------------

SCRIPT = [
    hello_2x(),
    notify(1, 1, MESSAGES),
    *notify_fragments(2, 1, MESSAGES, [3, 40]),
    raw_frame(UNKNOWN_FRAME_TYPE, b"skip me"),
    *notify_fragments(3, 1, MESSAGES, [17])[:1],
    abort(3, 1),
    notify(4, 1, MESSAGES),
    haproxy_disconnect(),
]


def run_script(chunks: list[bytes]) -> tuple[list[Any], bytes]:
    """Feed `chunks`, acknowledging each NOTIFY the moment it comes out of `next_event`, as an
    application would (an ACK after the DISCONNECT's Closed would be dropped)."""
    conn = Connection()
    events: list[Any] = []
    output = b""
    for chunk in chunks:
        conn.receive_data(chunk)
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
            if isinstance(event, Notify):
                conn.send_ack(
                    event.stream_id, event.frame_id, [SetVar(VarScope.REQUEST, "s", event.stream_id)]
                )
        output += conn.data_to_send()
    return events, output


def test_byte_at_a_time_gives_the_same_events_and_frames() -> None:
    whole = b"".join(SCRIPT)
    expected_events, expected_output = run_script([whole])
    assert [type(event) for event in expected_events] == [
        Hello,
        Notify,
        Notify,
        NotifyAborted,
        Notify,
        Closed,
    ]
    frames = parse_frames(expected_output)
    assert [frame.type for frame in frames] == [FrameType.AGENT_HELLO] + [FrameType.ACK] * 3 + [
        FrameType.AGENT_DISCONNECT
    ]
    assert run_script([whole[i : i + 1] for i in range(len(whole))]) == (expected_events, expected_output)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_any_chunking_gives_the_same_events_and_frames(data: st.DataObject) -> None:
    whole = b"".join(SCRIPT)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(whole)), max_size=30)))
    bounds = [0, *cuts, len(whole)]
    chunks = [whole[start:end] for start, end in pairwise(bounds) if end > start]  # b"" would be EOF
    assert run_script(chunks) == run_script([whole])


def test_haproxy_3x_twenty_pipelined_notifies_in_one_read() -> None:
    """HAProxy 3.1+: FIN on every frame, up to 20 streams in flight on one connection, and the
    connection ended by a close instead of a DISCONNECT."""
    conn = ready_connection(hello_3x())
    assert conn.hello.capabilities == {"pipelining", "fragmentation"}
    streams = range(1, HAPROXY_3X_MAX_PIPELINED_STREAMS + 1)
    events, _ = exchange(conn, b"".join(notify(stream, 1, MESSAGES) for stream in streams))
    assert events == [Notify(stream, 1, MESSAGES) for stream in streams]
    assert conn.unacked == HAPROXY_3X_MAX_PIPELINED_STREAMS
    for stream in reversed(streams):
        conn.send_ack(stream, 1, [SetVar(VarScope.TRANSACTION, "stream", Uint32(stream))])
    acks = parse_frames(conn.data_to_send())
    assert [(ack.type, ack.flags, ack.stream_id, ack.frame_id) for ack in acks] == [
        (FrameType.ACK, FLAG_FIN, stream, 1) for stream in reversed(streams)
    ]
    assert [ack_actions(ack)[0].value for ack in acks] == list(reversed(streams))
    events, frames = exchange(conn, eof=True)
    assert events == [Closed(Status.NORMAL, "peer closed the connection", by_peer=True)]
    assert frames == []


# Fuzzing after a valid HELLO ---------------------------------------------------------------------

_frame_types = st.one_of(st.sampled_from([int(t) for t in FrameType]), st.integers(0, 255))
_ids = st.one_of(st.integers(0, 3), st.integers(0, 2**64 - 1))
_payloads = st.one_of(
    st.binary(max_size=64),
    st.just(PAYLOAD),
    st.builds(lambda cut: PAYLOAD[:cut], st.integers(0, len(PAYLOAD))),
)
_frames = st.builds(
    lambda frame_type, flags, stream_id, frame_id, payload: encode_frame(
        frame_type, flags, stream_id, frame_id, payload
    ),
    _frame_types,
    st.integers(0, 3) | st.integers(0, 2**32 - 1),
    _ids,
    _ids,
    _payloads,
)
_garbage = st.binary(min_size=1, max_size=32)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pieces=st.lists(st.one_of(_frames, _frames, _frames, _garbage), max_size=12),
    chunk_size=st.integers(1, 512),
    eof=st.booleans(),
)
def test_arbitrary_bytes_after_hello_never_escape_next_event(
    pieces: list[bytes], chunk_size: int, eof: bool
) -> None:
    conn = ready_connection(hello_2x(max_frame_size=1024))
    stream = b"".join(pieces)
    events: list[Any] = []
    output = b""
    for start in range(0, len(stream), chunk_size):
        conn.receive_data(stream[start : start + chunk_size])
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
            if isinstance(event, Notify):
                conn.send_ack(event.stream_id, event.frame_id)
        output += conn.data_to_send()
    if eof:
        conn.receive_data(b"")
        events += drain(conn)
        output += conn.data_to_send()

    frames = parse_frames(output)
    closes = [event for event in events if isinstance(event, Closed)]
    assert all(isinstance(event, Notify | NotifyAborted | Closed) for event in events)
    assert len(closes) <= 1 and (not closes or events[-1] is closes[0]), "nothing after Closed"
    assert all(frame.type == FrameType.ACK for frame in frames if frame.type != FrameType.AGENT_DISCONNECT)
    disconnects = [frame for frame in frames if frame.type == FrameType.AGENT_DISCONNECT]
    if not closes:
        assert disconnects == [] and conn.state is State.READY
        return
    closed = closes[0]
    assert conn.state is State.CLOSED
    if closed.by_peer and not disconnects:
        assert eof and closed.status is Status.NORMAL, "only EOF closes without a DISCONNECT"
        return
    assert len(disconnects) == 1 and frames[-1] is disconnects[0]
    status, _ = disconnect_status(disconnects[0])
    if not closed.by_peer:
        assert status is closed.status

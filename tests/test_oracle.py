"""Independent oracles for the engine's wire format: byte vectors written by hand from HAProxy's
SPOE.txt (2.6, section 3), and the real HAProxy 2.6 reading every kind of action a real agent sends.

Nothing here is produced by spoe/'s encoders or spoe/spec.py: a bug shared by our encoder and our
decoder (or the spec module both use) cannot cancel out. The vectors follow the wire as HAProxy
writes it where SPOE.txt is loose (tests/support/spop_oracle.py lists those points), and the HAProxy
test at the end proves HAProxy reads our ACKs that way.

Varints were worked out with SPOE.txt 3.1's algorithm (HAProxy's encode_varint): 16380 -> fc f0 06,
300 -> fc 03, 4294967295 -> ff f0 fe fe 7e, and a negative signed integer is the varint of its
64-bit two's complement: -1 -> ff f0 fe fe fe fe fe fe fe 0e (the same bytes as UINT64 2**64-1).
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import httpx
import pytest

from spoe import Connection, Message, SetVar, UnsetVar, VarScope
from spoe.data import Int32, Int64, Uint32, Uint64
from spoe.events import Closed, Hello, Notify
from tests.conftest import EchoAgentFactory
from tests.support import spop_oracle
from tests.support.procs import current_haproxy, free_port, run_haproxy
from tests.support.shadow import ShadowServer
from tests.support.spop_peer import drain

ENGINE_ID = b"3D2E1C5A-0B4F-4C8E-9A6D-7F1E2B3C4D5E"

# HAPROXY-HELLO as HAProxy 2.6 sends it by default (tests/test_haproxy_engine.py pins these items).
HAPROXY_HELLO = (
    b"\x00\x00\x00\x81"  # length: 129
    b"\x01" b"\x00\x00\x00\x01" b"\x00" b"\x00"  # HAPROXY-HELLO, FIN, stream 0, frame 0
    b"\x12supported-versions" b"\x08\x03" b"2.0"  # STRING
    b"\x0emax-frame-size" b"\x03\xfc\xf0\x06"  # UINT32 16380
    b"\x0ccapabilities" b"\x08\x10" b"pipelining,async"
    b"\x09engine-id" b"\x08\x24" + ENGINE_ID
)  # fmt: skip

# The reply of an agent with max-frame-size 16384 and every capability: the smaller frame size, and
# fragmentation (which only concerns the agent) beside what both support.
AGENT_HELLO = (
    b"\x00\x00\x00\x54"  # length: 84
    b"\x65" b"\x00\x00\x00\x01" b"\x00" b"\x00"  # AGENT-HELLO, FIN, stream 0, frame 0
    b"\x07version" b"\x08\x03" b"2.0"
    b"\x0emax-frame-size" b"\x03\xfc\xf0\x06"  # UINT32 16380
    b"\x0ccapabilities" b"\x08\x1e" b"async,fragmentation,pipelining"
)  # fmt: skip

# NOTIFY on stream 300, frame 7: message "mirror" with a STRING and an IPV4 argument.
NOTIFY = (
    b"\x00\x00\x00\x29"  # length: 41
    b"\x03" b"\x00\x00\x00\x01" b"\xfc\x03" b"\x07"  # NOTIFY, FIN, stream 300, frame 7
    b"\x06mirror" b"\x02"  # message name, 2 args
    b"\x0aarg_method" b"\x08\x03" b"GET"
    b"\x03src" b"\x06\x7f\x00\x00\x01"  # IPV4 127.0.0.1
)  # fmt: skip

# Every data type and every scope, then an unset-var.
ACTIONS = [
    SetVar(VarScope.PROCESS, "p", "x"),
    SetVar(VarScope.SESSION, "b", True),
    SetVar(VarScope.TRANSACTION, "f", False),
    SetVar(VarScope.REQUEST, "i", Int32(-1)),
    SetVar(VarScope.RESPONSE, "u", Uint32(4294967295)),
    SetVar(VarScope.TRANSACTION, "l", Int64(-9007199254740993)),
    SetVar(VarScope.TRANSACTION, "q", Uint64(2**64 - 1)),
    SetVar(VarScope.TRANSACTION, "4", IPv4Address("192.0.2.1")),
    SetVar(VarScope.TRANSACTION, "6", IPv6Address("2001:db8::1")),
    SetVar(VarScope.TRANSACTION, "n", None),
    SetVar(VarScope.TRANSACTION, "y", b"\x00\xff"),
    SetVar(VarScope.TRANSACTION, "z", Int32(200)),
    UnsetVar(VarScope.TRANSACTION, "gone"),
]
ACK = (
    b"\x00\x00\x00\x95"  # length: 149
    b"\x67" b"\x00\x00\x00\x01" b"\xfc\x03" b"\x07"  # ACK, FIN, stream 300, frame 7
    # set-var (1), 3 args, scope byte, name, typed value
    b"\x01\x03\x00" b"\x01p" b"\x08\x01x"  # proc, STRING
    b"\x01\x03\x01" b"\x01b" b"\x11"  # sess, BOOL true: type 1 in the low nibble, flag 0x10
    b"\x01\x03\x02" b"\x01f" b"\x01"  # txn, BOOL false
    b"\x01\x03\x03" b"\x01i" b"\x02\xff\xf0\xfe\xfe\xfe\xfe\xfe\xfe\xfe\x0e"  # req, INT32 -1
    b"\x01\x03\x04" b"\x01u" b"\x03\xff\xf0\xfe\xfe\x7e"  # res, UINT32 4294967295
    b"\x01\x03\x02" b"\x01l" b"\x04\xff\xf0\xfe\xfe\xfe\xfe\xfe\xfe\xfd\x0e"  # INT64 -(2**53 + 1)
    b"\x01\x03\x02" b"\x01q" b"\x05\xff\xf0\xfe\xfe\xfe\xfe\xfe\xfe\xfe\x0e"  # UINT64 2**64 - 1
    b"\x01\x03\x02" b"\x014" b"\x06\xc0\x00\x02\x01"  # IPV4 192.0.2.1
    b"\x01\x03\x02" b"\x016" b"\x07\x20\x01\x0d\xb8" + bytes(11) + b"\x01"  # IPV6 2001:db8::1
    + b"\x01\x03\x02" b"\x01n" b"\x00"  # NULL
    b"\x01\x03\x02" b"\x01y" b"\x09\x02\x00\xff"  # BINARY
    b"\x01\x03\x02" b"\x01z" b"\x02\xc8"  # INT32 200: one byte
    b"\x02\x02\x02" b"\x04gone"  # unset-var (2), 2 args, txn
)  # fmt: skip

HAPROXY_DISCONNECT = (
    b"\x00\x00\x00\x25"  # length: 37
    b"\x02" b"\x00\x00\x00\x01" b"\x00" b"\x00"
    b"\x0bstatus-code" b"\x03\x00"  # UINT32 0
    b"\x07message" b"\x08\x06" b"normal"
)  # fmt: skip


@pytest.mark.parametrize("vector", [HAPROXY_HELLO, AGENT_HELLO, NOTIFY, ACK, HAPROXY_DISCONNECT])
def test_each_vector_is_one_whole_frame(vector: bytes) -> None:
    """Checks the hand arithmetic: the length prefix counts the bytes that follow."""
    assert int.from_bytes(vector[:4], "big") == len(vector) - 4
    assert len(spop_oracle.frames(vector)) == 1


def ready_connection() -> Connection:
    conn = Connection(max_frame_size=16384)
    conn.receive_data(HAPROXY_HELLO)
    [hello] = drain(conn)
    assert hello == Hello("2.0", 16380, frozenset({"pipelining", "async", "fragmentation"}),
                          ENGINE_ID.decode(), False)  # fmt: skip
    return conn


def test_agent_hello_answers_haproxys_hello_byte_for_byte() -> None:
    conn = Connection(max_frame_size=16384)
    conn.receive_data(HAPROXY_HELLO)
    drain(conn)
    assert conn.data_to_send() == AGENT_HELLO


def test_notify_decodes_and_its_ack_carries_every_action_byte_for_byte() -> None:
    conn = ready_connection()
    conn.data_to_send()
    conn.receive_data(NOTIFY)
    [notify] = drain(conn)
    assert isinstance(notify, Notify) and (notify.stream_id, notify.frame_id) == (300, 7)
    assert notify.messages == [Message("mirror", {"arg_method": "GET", "src": IPv4Address("127.0.0.1")})]
    conn.send_ack(300, 7, ACTIONS)
    assert conn.data_to_send() == ACK


def test_the_oracle_reads_the_ack_vector_as_spoe_txt_describes() -> None:
    [ack] = spop_oracle.frames(ACK)
    assert (ack.type, ack.fin, ack.abort, ack.stream_id, ack.frame_id) == ("ACK", True, False, 300, 7)
    assert spop_oracle.actions(ack.payload) == [
        ("set-var", "proc", "p", ("string", "x")),
        ("set-var", "sess", "b", ("bool", True)),
        ("set-var", "txn", "f", ("bool", False)),
        ("set-var", "req", "i", ("int32", -1)),
        ("set-var", "res", "u", ("uint32", 4294967295)),
        ("set-var", "txn", "l", ("int64", -9007199254740993)),
        ("set-var", "txn", "q", ("uint64", 2**64 - 1)),
        ("set-var", "txn", "4", ("ipv4", "192.0.2.1")),
        ("set-var", "txn", "6", ("ipv6", "2001:db8::1")),
        ("set-var", "txn", "n", ("null", None)),
        ("set-var", "txn", "y", ("binary", b"\x00\xff")),
        ("set-var", "txn", "z", ("int32", 200)),
        ("unset-var", "txn", "gone"),
    ]


def test_haproxy_disconnect_is_answered_with_agent_disconnect_status_0() -> None:
    conn = ready_connection()
    conn.data_to_send()
    conn.receive_data(HAPROXY_DISCONNECT)
    [closed] = drain(conn)
    assert isinstance(closed, Closed) and closed.by_peer
    [reply] = spop_oracle.frames(conn.data_to_send())
    assert (reply.type, reply.fin, reply.stream_id, reply.frame_id) == ("AGENT-DISCONNECT", True, 0, 0)
    items = spop_oracle.kv_list(reply.payload)
    assert set(items) == {"status-code", "message"}
    assert items["status-code"] == ("uint32", 0)
    assert items["message"][0] == "string"


# The real HAProxy 2.6 ------------------------------------------------------------------------------

SPOE_TYPES = """\
[o]
spoe-agent types
    messages types types-res
    option var-prefix o
    option set-on-error error
    timeout hello 2s
    timeout idle 10s
    timeout processing 2s
    use-backend agents
spoe-message types
    args method=method
    event on-frontend-http-request
spoe-message types-res
    args status=status
    event on-http-response
"""

# Each variable as HAProxy prints it into a response header, set only when the variable exists. The
# ACK is read twice: for the request (req variables live only there, so a rule copies one into txn)
# and for the response (res variables can only be set there). HAProxy 2.6 ignores a set-var of NULL.
VARIABLES = {
    "proc_str": "var(proc.o.proc_str)",
    "sess_true": "var(sess.o.sess_true)",
    "txn_false": "var(txn.o.txn_false)",
    "req_int32": "var(txn.copied_from_req)",
    "res_uint32": "var(res.o.res_uint32)",
    "int64": "var(txn.o.int64)",
    "uint64": "var(txn.o.uint64)",
    "ipv4": "var(txn.o.ipv4)",
    "ipv6": "var(txn.o.ipv6)",
    "null": "var(txn.o.null)",
    "binary": "var(txn.o.binary),hex",
    "string": "var(txn.o.string)",
    "gone": "var(txn.o.gone)",
    "error": "var(txn.o.error)",
}
HAPROXY_TYPES = """\
global
    tune.bufsize 16384
defaults
    mode http
    timeout connect 1s
    timeout client 10s
    timeout server 10s
frontend web
    bind 127.0.0.1:{http_port}
    filter spoe engine o config {spoe_config}
    http-request set-var(txn.copied_from_req) var(req.o.req_int32)
{response_rules}
    default_backend app
backend app
    server app 127.0.0.1:{app_port}
backend agents
    mode {agents_mode}
    timeout server 30s
    server agent 127.0.0.1:{agent_port}
"""


@pytest.mark.haproxy
def test_haproxy_reads_every_type_and_scope_the_agent_sets(
    tmp_path: Path, echo_agent: EchoAgentFactory
) -> None:
    """The echo agent's ACK of every kind of action (tests/support/echo_agent.py, every_action) as
    HAProxy reads it (2.6 and 3.2): each variable holds the value sent, in the scope sent, and an unset-var
    after a set-var leaves the variable unset. HAProxy's own rules print them, so this checks our
    encoding against HAProxy's decoder, not against ours."""
    agent_port, http_port = free_port(), free_port()
    rules = "\n".join(
        f'    http-response set-header X-{name} "%[{fetch}]" if {{ {fetch.split(",")[0]} -m found }}'
        for name, fetch in VARIABLES.items()
    )
    with ShadowServer() as app:
        config = HAPROXY_TYPES.format(
            http_port=http_port,
            agent_port=agent_port,
            app_port=app.port,
            spoe_config=tmp_path / "types.conf",
            response_rules=rules,
            agents_mode=current_haproxy().agents_mode,
        )
        with echo_agent(agent_port), run_haproxy(config, tmp_path, extra_files={"types.conf": SPOE_TYPES}):
            response = httpx.get(f"http://127.0.0.1:{http_port}/", timeout=10, trust_env=False)
    assert response.status_code == 200
    seen = {name: response.headers.get(f"x-{name}") for name in VARIABLES}
    assert seen == {
        "proc_str": "in proc",
        "sess_true": "1",
        "txn_false": "0",
        "req_int32": "-1",
        "res_uint32": "4294967295",
        "int64": "-9007199254740993",
        "uint64": str(2**63 - 1),
        "ipv4": "192.0.2.1",
        "ipv6": "2001:db8::1",
        "null": None,
        "binary": "00FF",
        "string": "caf\u00e9",
        "gone": None,
        "error": None,
    }

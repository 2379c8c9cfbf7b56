"""What HAProxy itself does on an SPOP connection, established on the real 2.6 and 3.2 and pinned
here, because the engine is built on it and tests/support/spop_peer.py plays it.

HAProxy 3.1 rewrote SPOE on a multiplexer (`mode spop`). Seen on 3.2.26, and pinned below:
* one SPOP connection carries the NOTIFYs of many streams (client requests), one after the other;
* at most 20 NOTIFYs wait for their ACK on one connection; a 21st stream opens another connection
  (2.6 has the same limit, `max-waiting-frames` 20);
* an AGENT-HELLO that arrives in pieces is accepted (3.2.26 as 2.6: no reset);
* an ACK without actions is answered at once (3.2.26 has upstream's NOOP fix, 851e52b5; 3.1.0 left
  the request waiting for `timeout processing`, which is why spoa-mirror's ACKs always carry one);
* on an AGENT-HELLO it refuses, HAProxy sends HAPROXY-DISCONNECT with the status and waits for the
  agent's AGENT-DISCONNECT (then closes): 3.2 at most the backend's `timeout connect`, then resets
  the connection; 2.6 the spoe-agent's `timeout idle`, then closes it;
* on a soft stop (SIGUSR1), 3.2 resets its SPOP connections, where 2.6 sends HAPROXY-DISCONNECT 0
  and waits for the agent's reply; the agent logs either at debug level only.

The scripted agent here is a few lines over a socket, so that a test can make it do what the engine
never does (split its HELLO, send an empty ACK, answer a version HAProxy refuses, stay silent).
"""

from __future__ import annotations

import json
import signal
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

import httpx
import pytest

from spoe import FrameType, SetVar, Uint32, VarScope
from spoe.frames import FLAG_FIN, decode_kv_list, encode_actions, encode_frame, encode_kv_list
from tests.conftest import EchoAgentFactory
from tests.support.mirror_stack import mirror_stack
from tests.support.procs import HAProxyProcess, HAProxyRelease, free_port, log_events, run_haproxy
from tests.support.spop_peer import FrameParser

pytestmark = pytest.mark.haproxy

PROCESSING_S = 1.5
CONNECT_TIMEOUT_S = 0.5
# 2.x only. Far above CONNECT_TIMEOUT_S, so that telling the two apart (3.2 lets go after the
# connect timeout, 2.6 after the idle one) leaves a slow machine ~18 times the time it needs.
IDLE_TIMEOUT_S = 10.0

SPOE_CONFIG = Template("""\
[e]
spoe-agent e
    messages check
    option var-prefix e
    option set-on-error error
    option pipelining
    timeout hello 1s
    timeout idle ${idle}ms
    timeout processing ${processing}ms
    use-backend agents

spoe-message check
    args path=path
    event on-frontend-http-request
""")

HAPROXY_CONFIG = Template("""\
global
    nbthread 1
    log stderr format raw local0 info

defaults
    mode http
    log global
    timeout connect ${connect}ms
    timeout client 10s
    timeout server 10s

frontend web
    bind 127.0.0.1:$http_port
    filter spoe engine e config $spoe_config
    http-request return status 200 content-type text/plain string ok \
hdr X-Seen "%[var(txn.e.seen)]" hdr X-Spoe-Error "%[var(txn.e.error)]"

backend agents
    mode $agents_mode
    server agent 127.0.0.1:$agent_port
""")


def haproxy_config(tmp_path: Path, release: HAProxyRelease, agent_port: int, http_port: int) -> str:
    spoe_config = tmp_path / "spoe.conf"
    spoe_config.write_text(
        SPOE_CONFIG.substitute(processing=int(PROCESSING_S * 1000), idle=int(IDLE_TIMEOUT_S * 1000))
    )
    return HAPROXY_CONFIG.substitute(
        connect=int(CONNECT_TIMEOUT_S * 1000),
        http_port=http_port,
        spoe_config=spoe_config,
        agents_mode=release.agents_mode,
        agent_port=agent_port,
    )


# -- a scripted agent -------------------------------------------------------------------------------


@dataclass
class Behaviour:
    split_hello: bool = False  # write the AGENT-HELLO in two pieces, 50 ms apart
    version: str = "2.0"  # what the AGENT-HELLO announces
    ack_actions: bool = True  # one set-var (txn.e.seen) in every ACK, or none
    answer_disconnect: bool = True


@dataclass
class Connection:
    frames: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)  # (time, type, items)
    ended: str = ""  # "eof" or "reset"
    ended_at: float = 0.0


class ScriptedAgent(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, behaviour: Behaviour) -> None:
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)
        self.behaviour = behaviour
        self.connections: list[Connection] = []
        self.lock = threading.Lock()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def frames_of(self, frame_type: str) -> list[tuple[Connection, float, dict[str, Any]]]:
        with self.lock:
            return [
                (c, t, items) for c in self.connections for t, kind, items in c.frames if kind == frame_type
            ]


class _ScriptedHandler(socketserver.BaseRequestHandler):
    server: ScriptedAgent

    def handle(self) -> None:
        behaviour, sock, parser = self.server.behaviour, self.request, FrameParser()
        sock.settimeout(10)
        conn = Connection()
        with self.server.lock:
            self.server.connections.append(conn)
        try:
            while data := sock.recv(65536):
                for frame in parser.feed(data):
                    kind = FrameType(frame.type).name
                    is_kv = frame.type in (FrameType.HAPROXY_HELLO, FrameType.HAPROXY_DISCONNECT)
                    items = decode_kv_list(frame.payload) if is_kv else {}
                    conn.frames.append((time.monotonic(), kind, items))
                    self.answer(sock, behaviour, frame.type, frame.stream_id, frame.frame_id)
            conn.ended = "eof"
        except ConnectionResetError:
            conn.ended = "reset"
        except OSError as error:  # a timeout: the test is over
            conn.ended = f"error: {error}"
        conn.ended_at = time.monotonic()

    @staticmethod
    def answer(
        sock: socket.socket, behaviour: Behaviour, frame_type: int, stream: int, frame_id: int
    ) -> None:
        if frame_type == FrameType.HAPROXY_HELLO:
            items = {
                "version": behaviour.version,
                "max-frame-size": Uint32(16380),
                "capabilities": "pipelining",
            }
            hello = encode_frame(FrameType.AGENT_HELLO, FLAG_FIN, 0, 0, encode_kv_list(items))
            if behaviour.split_hello:
                sock.sendall(hello[:6])
                time.sleep(0.05)
                sock.sendall(hello[6:])
            else:
                sock.sendall(hello)
        elif frame_type == FrameType.NOTIFY:
            actions = (
                encode_actions([SetVar(VarScope.TRANSACTION, "seen", 1)]) if behaviour.ack_actions else b""
            )
            sock.sendall(encode_frame(FrameType.ACK, FLAG_FIN, stream, frame_id, actions))
        elif frame_type == FrameType.HAPROXY_DISCONNECT and behaviour.answer_disconnect:
            payload = encode_kv_list({"status-code": Uint32(0), "message": "bye"})
            sock.sendall(encode_frame(FrameType.AGENT_DISCONNECT, FLAG_FIN, 0, 0, payload))
            with suppress(OSError):  # HAProxy may have closed it already, having read our reply
                sock.shutdown(socket.SHUT_WR)


@dataclass
class Stack:
    url: str
    agent: ScriptedAgent
    haproxy: HAProxyProcess

    def get(self, path: str) -> tuple[httpx.Response, float]:
        """One request on a connection of its own; the response and its duration."""
        started = time.monotonic()
        response = httpx.get(self.url + path, timeout=10, trust_env=False)
        return response, time.monotonic() - started


@contextmanager
def scripted_stack(tmp_path: Path, release: HAProxyRelease, behaviour: Behaviour) -> Iterator[Stack]:
    agent = ScriptedAgent(behaviour)
    thread = threading.Thread(target=agent.serve_forever, name="scripted-agent", daemon=True)
    thread.start()
    try:
        http_port = free_port()
        config = haproxy_config(tmp_path, release, agent.port, http_port)
        with run_haproxy(config, tmp_path) as haproxy:
            yield Stack(f"http://127.0.0.1:{http_port}", agent, haproxy)
    finally:
        agent.shutdown()
        agent.server_close()


def wait_until(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# -- the tests --------------------------------------------------------------------------------------


def test_a_split_agent_hello_is_accepted(tmp_path: Path, haproxy_release: HAProxyRelease) -> None:
    """Six bytes, then the rest 50 ms later: both releases wait for the whole frame. (The engine
    writes its AGENT-HELLO in one call anyway: tests/test_server.py.)"""
    with scripted_stack(tmp_path, haproxy_release, Behaviour(split_hello=True)) as stack:
        responses = [stack.get(f"/{n}")[0] for n in range(3)]
        hellos = stack.agent.frames_of("HAPROXY_HELLO")
    assert [r.headers.get("x-seen") for r in responses] == ["1"] * 3
    assert "x-spoe-error" not in responses[0].headers
    assert len(hellos) == 1, "the connection was not dropped and opened again"


def test_an_ack_without_actions_is_answered_at_once(tmp_path: Path, haproxy_release: HAProxyRelease) -> None:
    """Both releases here; HAProxy 3.1.0 is the one that waited `timeout processing` on each (see the
    module docstring): spoa-mirror never sends one."""
    with scripted_stack(tmp_path, haproxy_release, Behaviour(ack_actions=False)) as stack:
        timed = [stack.get(f"/{n}") for n in range(3)]
    for response, elapsed in timed:
        assert response.status_code == 200
        assert "x-spoe-error" not in response.headers
        assert elapsed < PROCESSING_S, f"{elapsed:.2f} s: HAProxy waited for timeout processing"


@pytest.mark.parametrize("answered", [True, False], ids=["answered", "silent"])
def test_haproxy_disconnect_waits_for_the_agents(
    tmp_path: Path, haproxy_release: HAProxyRelease, answered: bool
) -> None:
    """An AGENT-HELLO with a version HAProxy does not support: HAPROXY-DISCONNECT 8, then HAProxy
    waits for the agent's AGENT-DISCONNECT (and closes once it has it) before it lets go of the
    connection: 3.2 at most the backend's `timeout connect`, then resets it; 2.6 the spoe-agent's
    `timeout idle`, then closes it. The request goes on without the agent (SPOE error 1, timeout)."""
    behaviour = Behaviour(version="9.9", answer_disconnect=answered)
    with scripted_stack(tmp_path, haproxy_release, behaviour) as stack:
        response, _ = stack.get("/")
        wait_until(lambda: any(c.ended for c in stack.agent.connections), timeout=IDLE_TIMEOUT_S + 5)
        [(conn, sent_at, disconnect)] = stack.agent.frames_of("HAPROXY_DISCONNECT")[:1]
    assert response.headers["x-spoe-error"] == "1"
    assert disconnect == {"status-code": 8, "message": "unsupported version"}
    waited = conn.ended_at - sent_at
    if answered:  # closed at once: by HAProxy (3.2 resets) or by us first
        assert waited < CONNECT_TIMEOUT_S, f"HAProxy kept the connection {waited:.2f} s after our reply"
        assert conn.ended in ("eof", "reset"), conn.ended
    elif haproxy_release.at_least_3_1:
        assert CONNECT_TIMEOUT_S * 0.9 <= waited < IDLE_TIMEOUT_S * 0.9, waited  # timeout connect, not idle
        assert conn.ended == "reset"
    else:
        assert waited >= IDLE_TIMEOUT_S * 0.9, waited
        assert conn.ended == "eof"


def test_soft_stop_resets_on_3x_and_disconnects_on_2x(
    tmp_path: Path, haproxy_release: HAProxyRelease
) -> None:
    """SIGUSR1 (what a reload does to the old worker, and `systemctl stop` with a grace period): 3.2
    resets the idle SPOP connection at once, 2.6 sends HAPROXY-DISCONNECT 0 "normal" and waits for
    the agent's reply."""
    with scripted_stack(tmp_path, haproxy_release, Behaviour()) as stack:
        assert stack.get("/")[0].headers["x-seen"] == "1"
        stack.haproxy.popen.send_signal(signal.SIGUSR1)
        wait_until(lambda: all(c.ended for c in stack.agent.connections))
        disconnects = [items for _, _, items in stack.agent.frames_of("HAPROXY_DISCONNECT")]
        [conn] = stack.agent.connections
    if haproxy_release.at_least_3_1:
        assert (conn.ended, disconnects) == ("reset", [])
    else:
        assert (conn.ended, disconnects) == ("eof", [{"status-code": 0, "message": "normal"}])


def test_one_connection_carries_many_streams_at_most_20_at_a_time(
    tmp_path: Path, echo_agent: EchoAgentFactory, haproxy_release: HAProxyRelease
) -> None:
    """The engine's echo agent ACKs a second late. Once HAProxy has an SPOP connection, one request
    after another all go over it; 60 at once put exactly 20 in flight on it, and the others go to
    connections HAProxy opens for them (3.2 opens one per waiting stream, 2.6 spreads them)."""
    agent_port, http_port = free_port(), free_port()
    spoe_config = tmp_path / "spoe.conf"
    spoe_config.write_text(SPOE_CONFIG.substitute(processing=5000, idle=10_000))
    config = HAPROXY_CONFIG.substitute(
        connect=1000,
        http_port=http_port,
        spoe_config=spoe_config,
        agents_mode=haproxy_release.agents_mode,
        agent_port=agent_port,
    )
    with (
        echo_agent(agent_port, "--async-delay", "1", "--wire-log") as agent,
        run_haproxy(config, tmp_path),
        httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=20, trust_env=False) as client,
    ):
        for n in range(5):
            client.get(f"/one-by-one/{n}", headers={"Connection": "close"})
        sequential = in_flight_by_connection(log_events(agent.stderr_text(), "wire.frame"))
        burst_responses = send_at_once(http_port, 60)
        burst = in_flight_by_connection(log_events(agent.stderr_text(), "wire.frame"))
    assert all(b"\r\nx-seen: path\r\n" in response.lower() for response in burst_responses)
    [(first, (streams, _))] = sequential.items()
    assert streams == 5, "five requests, five streams, one connection"
    assert burst[first][1] == 20, burst
    assert max(peak for _, peak in burst.values()) == 20, burst


def send_at_once(port: int, count: int) -> list[bytes]:
    """`count` requests at once: every connection opened first, then every request written in one
    go, then every response read (whole, `Connection: close`)."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=20) for _ in range(count)]
    try:
        for n, sock in enumerate(socks):
            sock.sendall(f"GET /burst/{n} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        responses = []
        for sock in socks:
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
            responses.append(b"".join(chunks))
        return responses
    finally:
        for sock in socks:
            sock.close()


def in_flight_by_connection(frames: list[dict[str, Any]]) -> dict[int, tuple[int, int]]:
    """Per SPOP connection of the wire log: (NOTIFYs it carried, most NOTIFYs waiting at once)."""
    waiting: dict[int, int] = {}
    result: dict[int, tuple[int, int]] = {}
    for frame in frames:
        conn = frame["conn"]
        total, peak = result.get(conn, (0, 0))
        if frame["type"] == "NOTIFY":
            waiting[conn] = waiting.get(conn, 0) + 1
            result[conn] = (total + 1, max(peak, waiting[conn]))
        elif frame["type"] == "ACK":
            waiting[conn] -= 1
    return result


def test_resets_are_logged_at_debug_level_only(tmp_path: Path, haproxy_release: HAProxyRelease) -> None:
    """spoa-mirror, at its default log level (info), behind HAProxy, which ends the SPOP connection
    its own way on a soft stop (a reset on 3.2, a DISCONNECT on 2.6): a normal end, counted `normal`
    and logged at debug level only, so nothing shows at info."""
    with mirror_stack(
        tmp_path, {"a": "ok"}, lambda s: {"targets": [{"name": "a", "url": s["a"].url}]}
    ) as stack:
        response = httpx.get(stack.url + "/x", timeout=10, trust_env=False)
        assert "x-spoe-error" not in response.headers
        stack.haproxy.popen.send_signal(signal.SIGUSR1)  # soft stop
        wait_until(lambda: stack.metrics().get("spoa_mirror_spop_connections_open") == 0)
        closed = {
            key: value for key, value in stack.metrics().items() if key.startswith("spoa_mirror_spop_closed")
        }
        lines = [line for line in stack.agent.stderr_text().splitlines() if line.startswith("{")]
    assert closed == {'spoa_mirror_spop_closed_total{status="normal"}': 1.0}
    assert [event for line in lines if (event := _event(line))[1] != "debug"] == [
        ("agent.c_agent_differences", "info"),
        ("agent.started", "info"),
    ]


def _event(line: str) -> tuple[str, str]:
    record = json.loads(line)
    return record["event"], record["level"]

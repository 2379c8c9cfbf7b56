"""`spoe.Agent` over real TCP on 127.0.0.1, against the scripted HAProxy peer.

Every test runs twice, on asyncio's own loop and on uvloop (what `spoe.run` uses in production):
their transports differ in ways that have broken the adapter before. No pytest-asyncio: each test
is a coroutine run by `asyncio.Runner` under a deadline, and every wait in it is bounded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from spoe import Agent, Int32, Message, SetVar, Status, UnsetVar, VarScope
from spoe.frames import FLAG_FIN, FrameType
from tests.support.live_agent import LOOPS, AsyncTest, loop_runner, serving, wait_until
from tests.support.recording import record_writes
from tests.support.spop_peer import (
    HAPROXY_3X_MAX_PIPELINED_STREAMS,
    TcpPeer,
    ack_actions,
    disconnect_status,
    haproxy_disconnect,
    healthcheck_hello,
    hello_3x,
    kv,
    notify,
    notify_fragments,
    parse_frames,
)

TEST_DEADLINE = 20.0
MESSAGES = [Message("check", {"n": Int32(5)}), Message("other", {"path": "/x"})]


@pytest.fixture(params=LOOPS)
def run(request: pytest.FixtureRequest) -> Callable[[AsyncTest], None]:
    return loop_runner(request.param, TEST_DEADLINE)


async def ack_for(peer: TcpPeer, stream_id: int, frame_id: int, messages: list[Message]) -> list[Any]:
    """Send one NOTIFY, return the actions of its ACK after checking the ACK's header."""
    await peer.send(notify(stream_id, frame_id, messages))
    ack = await peer.recv_frame()
    assert (ack.type, ack.flags, ack.stream_id, ack.frame_id) == (
        FrameType.ACK,
        FLAG_FIN,
        stream_id,
        frame_id,
    )
    return ack_actions(ack)


# Handlers and ACKs ------------------------------------------------------------------------------


def test_handlers_by_name_then_default_fill_the_ack(run: Callable[[AsyncTest], None]) -> None:
    agent = Agent()

    @agent.handler("check")
    def check(message: Message) -> list[Any]:
        return [SetVar(VarScope.TRANSACTION, "checked", message.args["n"])]

    agent.set_default_handler(lambda message: [UnsetVar(VarScope.REQUEST, message.name)])

    async def test() -> None:
        async with serving(agent) as served:
            peer = await served.ready_peer()
            assert await ack_for(peer, 1, 1, MESSAGES) == [
                SetVar(VarScope.TRANSACTION, "checked", Int32(5)),
                UnsetVar(VarScope.REQUEST, "other"),
            ]
            agent.set_default_handler(None)
            assert await ack_for(peer, 2, 1, MESSAGES) == [SetVar(VarScope.TRANSACTION, "checked", Int32(5))]
            assert await ack_for(peer, 3, 1, [Message("unhandled", {})]) == []
            assert (agent.stats.notifies, agent.stats.acks) == (3, 3)

    run(test)


def test_async_handler_delays_its_ack_until_it_returns(run: Callable[[AsyncTest], None]) -> None:
    agent = Agent()

    @agent.handler("check")
    async def check(message: Message) -> list[Any]:
        await asyncio.sleep(0.2)
        return [SetVar(VarScope.SESSION, "late", True)]

    async def test() -> None:
        async with serving(agent) as served:
            peer = await served.ready_peer()
            started = time.monotonic()
            assert await ack_for(peer, 1, 1, MESSAGES) == [SetVar(VarScope.SESSION, "late", True)]
            assert time.monotonic() - started >= 0.19

    run(test)


def test_failing_handlers_still_get_an_ack_and_the_connection_survives(
    run: Callable[[AsyncTest], None],
) -> None:
    """Whatever the application does wrong, HAProxy gets its ACK: a missing one stalls a stream
    until HAProxy's processing timeout."""
    agent = Agent()
    agent.add_handler("sync-raises", lambda message: 1 / 0)
    agent.add_handler("bad-action", lambda message: [SetVar(VarScope.TRANSACTION, "x", 1.5)])
    agent.add_handler("good", lambda message: [SetVar(VarScope.TRANSACTION, "ok", 1)])

    @agent.handler("async-raises")
    async def async_raises(message: Message) -> None:
        raise RuntimeError("boom")

    async def test() -> None:
        async with serving(agent) as served:
            peer = await served.ready_peer()
            assert await ack_for(peer, 1, 1, [Message("sync-raises", {})]) == []
            assert await ack_for(peer, 2, 1, [Message("async-raises", {})]) == []
            assert await ack_for(peer, 3, 1, [Message("bad-action", {})]) == []
            assert await ack_for(peer, 4, 1, [Message("sync-raises", {}), Message("good", {})]) == [
                SetVar(VarScope.TRANSACTION, "ok", 1)
            ]
            assert agent.stats.handler_errors == 4
            assert agent.connections == 1

    run(test)


def test_spawned_work_does_not_delay_the_ack(run: Callable[[AsyncTest], None]) -> None:
    """The spawned work waits for an event the test sets only once it holds the ACK: an ACK that
    waited for the work would never come (the 2 s wait for it is the hang bound)."""
    agent = Agent()

    async def test() -> None:
        started = asyncio.Event()
        acked = asyncio.Event()

        async def mirror() -> None:
            started.set()
            await acked.wait()

        @agent.handler("check")
        def check(message: Message) -> None:
            agent.spawn(mirror())

        async with serving(agent) as served:
            peer = await served.ready_peer()
            assert await ack_for(peer, 1, 1, MESSAGES) == []
            acked.set()
            await asyncio.wait_for(started.wait(), 1.0)

    run(test)


# Admission and timeouts -------------------------------------------------------------------------


def test_connection_over_max_connections_gets_status_13(run: Callable[[AsyncTest], None]) -> None:
    agent = Agent(max_connections=1)

    async def test() -> None:
        async with serving(agent) as served:
            first = await served.ready_peer()
            extra = await served.connect()
            status, _ = await extra.expect_disconnect_and_close()
            assert status is Status.RESOURCE_ALLOCATION
            assert await ack_for(first, 1, 1, MESSAGES) == []
            assert agent.stats.connections_refused == 1
            assert agent.stats.closed_by_status == {}, "a refusal is not a close of a served connection"

    run(test)


def test_silent_peer_gets_hello_timeout_status_2(run: Callable[[AsyncTest], None]) -> None:
    agent = Agent(hello_timeout=0.2)

    async def test() -> None:
        async with serving(agent) as served:
            peer = await served.connect()
            started = time.monotonic()
            assert await peer.expect_disconnect_and_close() == (Status.TIMEOUT, "hello timeout")
            assert time.monotonic() - started >= 0.15  # not before the timeout; 2 s hang bound above

    run(test)


def test_idle_connection_gets_timeout_status_2_counted_from_the_last_read(
    run: Callable[[AsyncTest], None],
) -> None:
    agent = Agent(hello_timeout=5.0, idle_timeout=1.0)

    async def test() -> None:
        async with serving(agent) as served:
            peer = await served.ready_peer()
            await asyncio.sleep(0.7)
            await ack_for(peer, 1, 1, MESSAGES)
            await peer.expect_silence(0.5)  # 1.2 s after the HELLO, 0.5 s after the last read
            assert await peer.expect_disconnect_and_close() == (Status.TIMEOUT, "idle timeout")

    run(test)


def test_networks_not_allowed_are_refused(run: Callable[[AsyncTest], None]) -> None:
    refusing = Agent(allow_networks=["10.0.0.0/8"])
    admitting = Agent(allow_networks=["10.0.0.0/8", "127.0.0.0/8"])

    async def test() -> None:
        async with serving(refusing) as served:
            peer = await served.connect()
            status, message = await peer.expect_disconnect_and_close()
            assert status is not Status.NORMAL
            assert "not allowed" in message
            assert refusing.stats.connections_refused == 1
        async with serving(admitting) as served:
            await served.ready_peer()

    run(test)


def test_inflight_cap_stops_reading_until_handlers_finish(run: Callable[[AsyncTest], None]) -> None:
    agent = Agent(max_inflight=2)
    calls: list[int] = []

    async def test() -> None:
        gate = asyncio.Event()

        @agent.handler("check")
        async def check(message: Message) -> list[Any]:
            calls.append(message.args["n"])
            await gate.wait()
            return [SetVar(VarScope.TRANSACTION, "n", message.args["n"])]

        async with serving(agent) as served:
            peer = await served.ready_peer()
            await peer.send(*(notify(n, 1, [Message("check", {"n": n})]) for n in range(1, 6)))
            await peer.expect_silence(0.2)
            await peer.send(notify(6, 1, [Message("check", {"n": 6})]))
            await peer.expect_silence(0.1)
            assert calls == [1, 2]
            # White-box: the socket itself is not read, so TCP backpressure reaches HAProxy.
            (protocol,) = agent._protocols
            assert not protocol.transport.is_reading()
            gate.set()
            acks = await peer.recv_frames(6)
            assert sorted(ack.stream_id for ack in acks) == [1, 2, 3, 4, 5, 6]
            assert all(ack_actions(ack) == [SetVar(VarScope.TRANSACTION, "n", ack.stream_id)] for ack in acks)
            assert calls == [1, 2, 3, 4, 5, 6]
            assert protocol.transport.is_reading()

    run(test)


# Closing ----------------------------------------------------------------------------------------


def test_graceful_stop_disconnects_everyone_and_refuses_new_connections(
    run: Callable[[AsyncTest], None],
) -> None:
    agent = Agent()

    async def test() -> None:
        async with serving(agent) as served:
            peers = [await served.ready_peer(), await served.ready_peer(hello_3x())]
            await agent.stop(timeout=1.0)
            for peer in peers:
                assert await peer.expect_disconnect_and_close() == (Status.NORMAL, "agent stopping")
            assert agent.connections == 0
            with pytest.raises(OSError):
                await served.connect()

    run(test)


def test_haproxy_disconnect_is_answered_then_closed(run: Callable[[AsyncTest], None]) -> None:
    agent = Agent()

    async def test() -> None:
        async with serving(agent) as served:
            peer = await served.ready_peer(hello_3x())
            await peer.send(haproxy_disconnect())
            assert await peer.expect_disconnect_and_close() == (Status.NORMAL, "normal")
            await wait_until(lambda: agent.connections == 0)

    run(test)


def test_healthcheck_gets_agent_hello_then_close(run: Callable[[AsyncTest], None]) -> None:
    agent = Agent()

    async def test() -> None:
        async with serving(agent) as served:
            peer = await served.connect()
            await peer.send(healthcheck_hello())
            reply = await peer.recv_frame()
            assert reply.type == FrameType.AGENT_HELLO
            assert kv(reply)["version"] == "2.0"
            await peer.expect_closed()
            assert agent.stats.healthchecks == 1

    run(test)


def test_tcp_reset_by_peer_is_logged_as_a_normal_close(run: Callable[[AsyncTest], None]) -> None:
    """HAProxy 3.2 resets its SPOP connections on a soft stop (tests/test_haproxy_spop.py), busy or
    idle; even with a handler still running, that is routine and must not show up as an error."""
    agent = Agent()

    async def test() -> None:
        gate = asyncio.Event()

        @agent.handler("check")
        async def check(message: Message) -> None:
            await gate.wait()

        async with serving(agent) as served:
            idle = await served.ready_peer(hello_3x())
            busy = await served.ready_peer(hello_3x())
            await busy.send(notify(1, 1, MESSAGES))
            await asyncio.sleep(0.05)
            idle.reset()
            busy.reset()
            await wait_until(lambda: agent.connections == 0)
            gate.set()
            await asyncio.sleep(0.05)

    with capture_logs() as logs:
        run(test)
    assert not [entry for entry in logs if entry["log_level"] in ("warning", "error", "critical")], logs
    closes = [entry for entry in logs if entry["event"] == "spop.connection.closed"]
    assert len(closes) == 2
    assert all(entry["by_peer"] for entry in closes)
    assert agent.stats.closed_by_status == {"NORMAL": 2}


# What goes on the wire --------------------------------------------------------------------------


def test_agent_hello_arrives_in_one_write(
    run: Callable[[AsyncTest], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine writes its AGENT-HELLO in one call: HAProxy 3.2.26 and 2.6 accept one that arrives
    in pieces (tests/test_haproxy_spop.py), but a reset on a split one was reported for 3.x, and one
    write costs nothing. Counted at the transport: a frame handed over in two writes fails even when
    the kernel joins them."""
    writes: list[bytes] = []
    record_writes(monkeypatch, writes.append)
    agent = Agent()

    async def test() -> None:
        async with serving(agent) as served:
            peer = await served.connect()
            await peer.send(hello_3x())
            reply = await peer.recv_frame()
            assert reply.type == FrameType.AGENT_HELLO
            assert [[frame.type for frame in parse_frames(data)] for data in writes] == [[reply.type]]

    run(test)


def test_haproxy_2x_fragmented_notify_over_tcp(run: Callable[[AsyncTest], None]) -> None:
    agent = Agent()
    agent.add_handler("other", lambda message: [SetVar(VarScope.REQUEST, "path", message.args["path"])])

    async def test() -> None:
        async with serving(agent) as served:
            peer = await served.ready_peer()
            for fragment in notify_fragments(7, 3, MESSAGES, [4, 11, 19]):
                await peer.send(fragment)
                await asyncio.sleep(0.01)
            ack = await peer.recv_frame()
            assert (ack.type, ack.stream_id, ack.frame_id) == (FrameType.ACK, 7, 3)
            assert ack_actions(ack) == [SetVar(VarScope.REQUEST, "path", "/x")]

    run(test)


def test_haproxy_3x_pipelined_notifies_over_tcp(run: Callable[[AsyncTest], None]) -> None:
    agent = Agent()
    agent.add_handler("check", lambda message: [SetVar(VarScope.TRANSACTION, "n", message.args["n"])])

    async def test() -> None:
        async with serving(agent) as served:
            peer = await served.ready_peer(hello_3x())
            streams = range(1, HAPROXY_3X_MAX_PIPELINED_STREAMS + 1)
            await peer.send(*(notify(stream, 1, [Message("check", {"n": stream})]) for stream in streams))
            acks = await peer.recv_frames(len(streams))
            assert sorted(ack.stream_id for ack in acks) == list(streams)
            assert all(ack_actions(ack)[0].value == ack.stream_id for ack in acks)
            peer.close()
            await wait_until(lambda: agent.connections == 0)

    run(test)


def test_disconnect_frames_are_well_formed_on_refusal(run: Callable[[AsyncTest], None]) -> None:
    """The refusal path writes its AGENT-DISCONNECT without a `Connection`: check it like the rest."""
    agent = Agent(max_connections=0)

    async def test() -> None:
        async with serving(agent) as served:
            peer = await served.connect()
            frame = await peer.recv_frame()
            assert disconnect_status(frame)[0] is Status.RESOURCE_ALLOCATION

    run(test)

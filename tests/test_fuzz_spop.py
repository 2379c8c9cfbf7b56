"""Nothing a peer sends can crash, hang or bloat the SPOP engine.

Two halves. The sans-IO `Connection` is fed hundreds of thousands of generated frames (valid,
mutated, truncated, oversized, endless varints, bad typed data, fragment floods), before any HELLO
and after 2.x and 3.x ones, and after every chunk we check what an adapter relies on: `next_event`
never raises, one chunk yields a bounded number of events, the output is whole frames, an
AGENT-DISCONNECT carries a status of SPOE.txt 3.5, nothing follows Closed, and the bytes held stay
under the caps. Then `spoe.Agent` over real TCP against hostile peers: slowloris, a peer that never
reads its ACKs, a fragment flood, a thousand idle connections, one connection too many.

`bench/fuzz_atheris.py` runs the same sans-IO properties coverage-guided, for longer.
"""

from __future__ import annotations

import asyncio
import resource
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from spoe import (
    Agent,
    Message,
    SetVar,
    Status,
    VarScope,
)
from spoe.frames import (
    FLAG_FIN,
    LENGTH_PREFIX,
    FrameType,
    encode_frame,
    encode_messages,
)
from tests.support.fuzzing import COMPACTION_SLACK, FED, MESSAGES, MIN_FRAMES, fuzz_example
from tests.support.live_agent import LOOPS, AsyncTest, Served, loop_runner, serving, wait_until
from tests.support.spop_peer import (
    TcpPeer,
    hello_2x,
    notify,
    unset,
)


def test_nothing_from_the_wire_crashes_hangs_or_bloats_the_connection() -> None:
    """The hypothesis run, counted: at least MIN_FRAMES frames fed to live connections."""
    FED.update(frames=0, connections=0)
    started = time.perf_counter()
    fuzz_example()
    elapsed = time.perf_counter() - started
    frames = FED["frames"]
    print(
        f"\nfuzz: {frames} frames fed to {FED['connections']} connections in {elapsed:.1f} s "
        f"({frames / elapsed:,.0f} frames/s)"
    )
    assert frames >= MIN_FRAMES


# Hostile peers over TCP ------------------------------------------------------------------------

TCP_DEADLINE = 30.0
FLOOD_BYTES = 50 << 20
# asyncio's default high-water mark (64 KiB) plus the ACKs for one read (at most 256 KiB, and the
# ACKs below are about as big as their NOTIFYs), doubled for margin.
WRITE_BUFFER_CAP = 2 * ((64 << 10) + (256 << 10))


@pytest.fixture(params=LOOPS)
def run(request: pytest.FixtureRequest) -> Callable[[AsyncTest], None]:
    """Both loops, because their transports buffer and pause differently."""
    return loop_runner(request.param, TCP_DEADLINE)


def raise_fd_limit(needed: int) -> None:
    """A thousand connections are two thousand descriptors here (both ends live in this process)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise AssertionError(f"RLIMIT_NOFILE hard limit {hard} is below the {needed} descriptors needed")


async def peer_with_small_receive_buffer(served: Served) -> TcpPeer:
    """A peer past its HELLO whose kernel holds little of what the agent writes, so the agent's own
    buffer is what fills when the peer stops reading; closed with the test like the other peers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, served.address), 2.0)
    peer = TcpPeer(sock)
    served.peers.append(peer)
    await peer.handshake()
    return peer


@dataclass
class Flood:
    sent: int = 0
    max_write_buffer: int = 0
    max_held_input: int = 0


async def flood_until_stalled(peer: TcpPeer, agent: Agent, block: bytes, stall: float = 0.5) -> Flood:
    """Send `block` over and over, never reading, until FLOOD_BYTES went out or the socket accepted
    nothing for `stall` seconds; sample the agent's buffers after every attempt (same loop, so the
    samples are exact)."""
    (protocol,) = agent._protocols
    flood = Flood()
    view = memoryview(block)
    last_progress = time.monotonic()
    while flood.sent < FLOOD_BYTES and time.monotonic() - last_progress < stall:
        try:
            flood.sent += peer.sock.send(view[flood.sent % len(block) :])
            last_progress = time.monotonic()
        except BlockingIOError:
            await asyncio.sleep(0.005)
        if not protocol.transport.is_closing():
            flood.max_write_buffer = max(flood.max_write_buffer, protocol.transport.get_write_buffer_size())
        # White-box: the engine's input buffer, which the agent must not keep reading into.
        flood.max_held_input = max(flood.max_held_input, len(protocol.conn._in))
        await asyncio.sleep(0)
    return flood


def echo_path(message: Message) -> list[SetVar]:
    """An ACK about as big as its NOTIFY: the agent writes as much as it reads."""
    return [SetVar(VarScope.TRANSACTION, "path", message.args["path"])]


def notify_block(count: int) -> tuple[bytes, int]:
    """`count` NOTIFYs of one size (stream ids from 240 all take two bytes), joined, and that size."""
    message = [Message("m", {"path": "/" + "p" * 64})]
    frames = [notify(stream, 1, message) for stream in range(240, 240 + count)]
    assert len({len(frame) for frame in frames}) == 1
    return b"".join(frames), len(frames[0])


def test_slowloris_hello_is_cut_at_hello_timeout(run: Callable[[AsyncTest], None]) -> None:
    """A HELLO dribbled a byte every 100 ms: the hello timer runs from the connection, not from the
    last byte, so dribbling cannot stretch it."""
    agent = Agent(hello_timeout=0.5)

    async def test() -> None:
        async with serving(agent) as served:
            peer = await served.connect()
            hello = hello_2x()
            dribbled = 0

            async def dribble() -> None:
                nonlocal dribbled
                for byte in hello:
                    await peer.send(bytes((byte,)))
                    dribbled += 1
                    await asyncio.sleep(0.1)

            started = time.monotonic()
            dribbler = asyncio.get_running_loop().create_task(dribble())
            try:
                assert await peer.expect_disconnect_and_close() == (Status.TIMEOUT, "hello timeout")
            finally:
                dribbler.cancel()
            # Not before the timeout; and not stretched by the dribble, which would need len(hello)
            # bytes at 100 ms each (the 2 s wait for the DISCONNECT is the hang bound).
            assert time.monotonic() - started >= 0.45
            assert dribbled < len(hello)
            assert agent.connections == 0

    run(test)


def test_peer_stalled_mid_frame_after_hello_is_cut_at_idle_timeout(run: Callable[[AsyncTest], None]) -> None:
    agent = Agent(idle_timeout=0.5)

    async def test() -> None:
        async with serving(agent) as served:
            peer = await served.ready_peer()
            frame = notify(1, 1, MESSAGES)
            await peer.send(frame[: len(frame) // 2])
            started = time.monotonic()
            assert await peer.expect_disconnect_and_close() == (Status.TIMEOUT, "idle timeout")
            assert time.monotonic() - started >= 0.45  # not before the timeout; 2 s hang bound above

    run(test)


def test_peer_that_never_reads_its_acks_cannot_grow_the_agents_buffers(
    run: Callable[[AsyncTest], None],
) -> None:
    """Once its writes back up the agent stops reading, so TCP pushes back on the sender: the flood
    stalls far short of 50 MB, the agent's write buffer stays under the high-water mark plus one
    read's ACKs, and when the peer reads again every NOTIFY that went out is acknowledged."""
    agent = Agent()
    agent.set_default_handler(echo_path)
    block, frame_size = notify_block(1000)

    async def test() -> None:
        async with serving(agent) as served:
            peer = await peer_with_small_receive_buffer(served)
            flood = await flood_until_stalled(peer, agent, block)
            (protocol,) = agent._protocols
            print(
                f"\nflood: {flood.sent / 2**20:.1f} MiB accepted before the stall; agent write buffer at "
                f"most {flood.max_write_buffer / 1024:.0f} KiB, input buffer at most {flood.max_held_input} B"
            )
            assert flood.sent < FLOOD_BYTES, "the agent kept reading although nobody read its ACKs"
            assert not protocol.transport.is_reading()
            assert 0 < flood.max_write_buffer <= WRITE_BUFFER_CAP
            assert flood.max_held_input <= agent.max_frame_size + LENGTH_PREFIX + COMPACTION_SLACK

            # Now read: every NOTIFY sent, the one cut by the stall completed, gets its ACK.
            rest = -flood.sent % frame_size
            completing = asyncio.get_running_loop().create_task(
                peer.send(block[flood.sent % len(block) :][:rest])
            )
            expected = (flood.sent + rest) // frame_size
            acks = 0
            pending = b""
            while acks < expected:
                pending += await peer.recv_once(5.0)
                while len(pending) >= LENGTH_PREFIX:
                    end = LENGTH_PREFIX + struct.unpack_from(">I", pending)[0]
                    if len(pending) < end:
                        break
                    assert pending[LENGTH_PREFIX] == FrameType.ACK
                    acks += 1
                    pending = pending[end:]
            await completing
            assert acks == expected and pending == b""
            await wait_until(protocol.transport.is_reading)

    run(test)


def test_peer_that_never_reads_at_all_is_dropped(run: Callable[[AsyncTest], None]) -> None:
    """The idle timeout closes it, but its AGENT-DISCONNECT cannot be delivered either: the agent
    gives the close another idle_timeout, then aborts, and the connection's slot is free again."""
    agent = Agent(idle_timeout=0.5)
    agent.set_default_handler(echo_path)
    block, _ = notify_block(1000)

    async def test() -> None:
        async with serving(agent) as served:
            peer = await peer_with_small_receive_buffer(served)
            flood = await flood_until_stalled(peer, agent, block)
            assert flood.sent < FLOOD_BYTES
            await wait_until(lambda: agent.connections == 0, timeout=15.0)  # ~1 s: 2 x idle_timeout
            assert agent.stats.closed_by_status == {"TIMEOUT": 1}

    run(test)


def test_fragment_flood_is_closed_with_status_13_at_the_reassembly_cap(
    run: Callable[[AsyncTest], None],
) -> None:
    cap = 64 << 10
    agent = Agent(max_reassembly=cap)

    async def test() -> None:
        async with serving(agent) as served:
            peer = await served.ready_peer()
            piece = b"x" * 1000
            count = cap // len(piece) + 1  # the last one crosses the cap
            fragments = [encode_frame(FrameType.NOTIFY, 0, 1, 1, piece)]
            fragments += [unset(1, 1, piece)] * (count - 1)
            await peer.send(*fragments)
            status, message = await peer.expect_disconnect_and_close()
            assert status is Status.RESOURCE_ALLOCATION
            assert "reassembly cap" in message

    run(test)


def test_endless_empty_fragments_hold_nothing_and_the_notify_still_completes(
    run: Callable[[AsyncTest], None],
) -> None:
    """100,000 empty UNSET frames inside one fragmented NOTIFY add no bytes, so no byte cap stops
    them: what they must not add is one held object each."""
    agent = Agent()

    async def test() -> None:
        async with serving(agent) as served:
            peer = await served.ready_peer()
            payload = encode_messages(MESSAGES)
            (protocol,) = agent._protocols
            held_parts = 0

            async def sample() -> None:
                nonlocal held_parts
                while True:
                    # White-box: what the reassembly holds, in objects.
                    held_parts = max(held_parts, len(protocol.conn._fragment_parts))
                    await asyncio.sleep(0.001)

            sampler = asyncio.get_running_loop().create_task(sample())
            try:
                await peer.send(
                    encode_frame(FrameType.NOTIFY, 0, 7, 7, payload[:10]),
                    unset(7, 7) * 100_000,
                    unset(7, 7, payload[10:], flags=FLAG_FIN),
                )
                ack = await peer.recv_frame(timeout=10.0)
            finally:
                sampler.cancel()
            assert (ack.type, ack.stream_id, ack.frame_id) == (FrameType.ACK, 7, 7)
            assert held_parts <= 2

    run(test)


def test_a_thousand_idle_connections_do_not_delay_a_new_one(run: Callable[[AsyncTest], None]) -> None:
    """Half past their HELLO, half silent: none of them costs the loop anything while idle."""
    raise_fd_limit(2 * 1000 + 256)
    agent = Agent(max_connections=1100, hello_timeout=60.0)

    async def test() -> None:
        async with serving(agent) as served:
            idle = [await served.connect() for _ in range(1000)]
            await asyncio.gather(*(peer.handshake() for peer in idle[:500]))
            await wait_until(lambda: agent.connections == 1000)
            started = time.monotonic()
            fresh = await served.ready_peer()
            for stream in range(1, 21):
                await fresh.send(notify(stream, 1, MESSAGES))
                ack = await fresh.recv_frame(timeout=5.0)  # a hang bound; the time is printed
                assert (ack.type, ack.stream_id) == (FrameType.ACK, stream)
            elapsed = time.monotonic() - started
            print(f"\nHELLO and 20 NOTIFY->ACK beside 1000 idle connections: {elapsed * 1000:.1f} ms")
            assert agent.connections == 1001

    run(test)


def test_connection_101_is_refused_with_status_13_and_the_first_100_stay_served(
    run: Callable[[AsyncTest], None],
) -> None:
    agent = Agent(max_connections=100)

    async def test() -> None:
        async with serving(agent) as served:
            peers = [await served.connect() for _ in range(100)]
            await asyncio.gather(*(peer.handshake() for peer in peers))
            extra = await served.connect()
            status, _ = await extra.expect_disconnect_and_close()
            assert status is Status.RESOURCE_ALLOCATION

            async def served_ack(peer: TcpPeer, stream: int) -> None:
                await peer.send(notify(stream, 1, MESSAGES))
                ack = await peer.recv_frame()
                assert (ack.type, ack.stream_id) == (FrameType.ACK, stream)

            await asyncio.gather(*(served_ack(peer, n) for n, peer in enumerate(peers, 1)))
            assert agent.connections == 100
            assert agent.stats.connections_refused == 1

    run(test)

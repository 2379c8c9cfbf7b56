"""The SPOP port against peers that try to exhaust the agent (issue 10, item 6): memory parked in
partial frames and fragmented NOTIFYs, dribbling peers, idle peers holding every connection slot
while HAProxy needs one, and single messages built to hold the event loop.

Each test prints its figure. The agent is the real process (`python -m spoa_mirror`) where the
finding came through it, and a real HAProxy 2.6 where HAProxy is the one locked out.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from spoa_mirror.message import MAX_HEADERS, BadMessage, parse_binary_headers, parse_text_headers
from spoe import Agent, Message, Status
from spoe.frames import FLAG_FIN, FrameType, encode_frame, encode_messages
from tests.support.live_agent import LOOPS, AsyncTest, loop_runner, serving, wait_until
from tests.support.mirror_stack import write_haproxy_config
from tests.support.procs import ManagedProcess, free_port, log_events, run_haproxy, run_process
from tests.support.shadow import ShadowServer
from tests.support.spop_peer import FrameParser, disconnect_status, hello_2x, kv, notify, unset

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
PEERS = 30
PROBE = notify(1, 1, [Message("probe", {})])


@pytest.fixture(params=LOOPS)
def run(request: pytest.FixtureRequest) -> Callable[[AsyncTest], None]:
    return loop_runner(request.param, 30.0)


@contextmanager
def agent_process(
    tmp_path: Path, listen: dict[str, Any], **config: Any
) -> Iterator[tuple[ManagedProcess, int]]:
    """The agent on `listen` settings and one recording shadow; yields the process and SPOP port."""
    spop_port, admin_port = free_port(), free_port()
    with ShadowServer() as shadow:
        document = {
            "listen": {"port": spop_port, **listen},
            "admin": {"port": admin_port},
            "log": {"format": "json"},
            "targets": [{"name": "shadow", "url": f"http://127.0.0.1:{shadow.port}"}],
            **config,
        }
        path = tmp_path / "agent.yaml"
        path.write_text(yaml.safe_dump(document))
        argv = [sys.executable, "-m", "spoa_mirror", "--config", str(path)]
        with run_process(
            argv, ready_port=admin_port, name="spoa-mirror", log_dir=tmp_path, cwd=ROOT
        ) as agent:
            yield agent, spop_port


def memory_kb(pid: int, field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


class Peer:
    """A blocking socket speaking SPOP, for tests outside an event loop."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5.0)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.parser = FrameParser()
        self.frames: list[Any] = []

    def send(self, data: bytes) -> bool:
        """False if the agent has closed the connection meanwhile."""
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        return True

    def recv_frame(self, timeout: float = 5.0) -> Any:
        self.sock.settimeout(timeout)
        while not self.frames:
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("closed")
            self.frames += self.parser.feed(data)
        return self.frames.pop(0)

    def handshake(self, max_frame_size: int = 16380) -> dict[str, Any]:
        self.send(hello_2x(max_frame_size=max_frame_size))
        reply = self.recv_frame()
        assert reply.type == FrameType.AGENT_HELLO
        return kv(reply)

    def close(self) -> None:
        self.sock.close()


# -- memory parked in partial frames ------------------------------------------------------------


@pytest.mark.parametrize("fragmentation", [False, True], ids=["no-fragmentation", "fragmentation"])
def test_thirty_peers_parking_partial_frames_hold_bounded_memory_and_are_cut(
    tmp_path: Path, fragmentation: bool
) -> None:
    """30 peers each park as much as the agent lets them: a partial 1 MiB frame (the frame size
    the README advises for 1 MiB bodies) or, where the agent announces fragmentation, a fragmented
    NOTIFY as close to the per-connection cap (10 MiB body + 1 MiB) as it gets. On main the second
    parked 30 x 11 MiB, and both stayed until the idle timeout (60 s). Now fragments of all peers
    share the 32 MiB reassembly budget, and every parked frame is cut at frame_timeout."""
    capabilities = ["pipelining", "async"] + (["fragmentation"] if fragmentation else [])
    listen = {"max_frame_size": MiB, "capabilities": capabilities, "frame_timeout": 2}
    with agent_process(tmp_path, listen) as (agent, port):
        baseline = memory_kb(agent.pid, "VmRSS")
        peers = [Peer(port) for _ in range(PEERS)]
        try:
            for peer in peers:
                hello = peer.handshake(max_frame_size=MiB)  # HAProxy with tune.bufsize 1 MiB
                assert ("fragmentation" in hello["capabilities"]) == fragmentation
            started = time.monotonic()
            chunk = b"p" * (MiB - 64)
            for peer in peers:
                if fragmentation:
                    parts = [encode_frame(FrameType.NOTIFY, 0, 1, 1, chunk)]
                    parts += [unset(1, 1, chunk)] * 10
                    for part in parts:
                        if not peer.send(part):
                            break
                else:
                    frame = encode_frame(FrameType.NOTIFY, FLAG_FIN, 1, 1, chunk)
                    peer.send(frame[:-1])  # all but the last byte, forever
            sent = time.monotonic() - started
            time.sleep(0.3)
            peak_mb = (memory_kb(agent.pid, "VmHWM") - baseline) / 1024
            print(f"\nagent peak RSS +{peak_mb:.0f} MB over {baseline / 1024:.0f} MB", end="")
            statuses = {}
            for peer in peers:
                status, _ = disconnect_status(peer.recv_frame(timeout=10.0))
                statuses[status.name] = statuses.get(status.name, 0) + 1
            closed_after = time.monotonic() - started
        finally:
            for peer in peers:
                peer.close()
    print(
        f" with {PEERS} peers parking {'fragmented NOTIFYs' if fragmentation else 'partial 1 MiB frames'}; "
        f"sent in {sent:.1f} s, "
        f"all cut after {closed_after:.1f} s: {statuses}"
    )
    assert peak_mb < 120
    assert closed_after < sent + 2 + 3  # frame_timeout plus slack; main held them for 60 s
    assert set(statuses) <= {"TIMEOUT", "RESOURCE_ALLOCATION"}


# -- dribbling peers ---------------------------------------------------------------------------------


def test_dribbling_peer_is_cut_at_the_frame_timeout(run: Callable[[AsyncTest], None]) -> None:
    """One byte every 100 ms after HELLO: each byte is activity, so the idle timeout never fired and
    the connection (and its slot) stayed forever. The frame deadline runs from the frame's first byte."""
    agent = Agent(frame_timeout=0.5, idle_timeout=60.0)

    async def test() -> None:
        async with serving(agent) as served:
            peer = await served.ready_peer()
            frame = notify(1, 1, [Message("m", {"a": b"x" * 200})])

            async def dribble() -> None:
                for byte in frame[:-1]:
                    await peer.send(bytes((byte,)))
                    await asyncio.sleep(0.1)

            started = time.monotonic()
            dribbler = asyncio.get_running_loop().create_task(dribble())
            try:
                status, message = await peer.expect_disconnect_and_close(timeout=5.0)
            finally:
                dribbler.cancel()
            elapsed = time.monotonic() - started
            print(f"\ndribbling peer cut after {elapsed:.2f} s (frame_timeout 0.5 s): {message!r}")
            assert status is Status.TIMEOUT
            assert elapsed >= 0.45  # not before the deadline; expect_disconnect's 5 s is the hang bound
            await wait_until(lambda: agent.connections == 0)

    run(test)


def test_busy_peer_whose_reads_end_mid_frame_is_never_cut(run: Callable[[AsyncTest], None]) -> None:
    """The deadline is per frame, not per 'something incomplete': a pipelining HAProxy whose every
    segment ends inside a frame, for over three times the frame timeout, keeps its connection. Each
    frame completes one pause (10 ms) after it starts, a thirtieth of the frame timeout: only a
    stall of the whole process near the timeout could cut it."""
    agent = Agent(frame_timeout=0.3)
    count = 100

    async def test() -> None:
        async with serving(agent) as served:
            peer = await served.ready_peer()
            frames = [notify(n, 1, [Message("m", {"n": n})]) for n in range(1, count + 1)]
            stream = b"".join(frames)
            cuts = [0] + [len(stream) * k // count + 3 for k in range(1, count)] + [len(stream)]
            for start, end in itertools.pairwise(cuts):
                await peer.send(stream[start:end])
                await asyncio.sleep(0.01)
            acks = await peer.recv_frames(count, timeout=15.0)
            assert [ack.type for ack in acks] == [FrameType.ACK] * count
            assert agent.stats.closed_by_status == {}
            assert agent.connections == 1

    run(test)


# -- connection slots --------------------------------------------------------------------------------


@pytest.mark.haproxy
def test_idle_peers_holding_every_slot_do_not_lock_haproxy_out(tmp_path: Path) -> None:
    """Eight peers take every slot of `max_connections: 8` and sit idle: four never send a HELLO,
    four stop after it. A real HAProxy 2.6 started after them still gets its connections and every
    request mirrored; on main it was refused (status 13) and nothing was mirrored."""
    slots = 8
    listen = {"max_connections": slots, "hello_timeout": 60, "idle_timeout": 60}
    with ExitStack() as stack:
        shadow = stack.enter_context(ShadowServer())
        spop_port, admin_port, http_port = free_port(), free_port(), free_port()
        config = {
            "listen": {"port": spop_port, **listen},
            "admin": {"port": admin_port},
            "log": {"format": "json"},
            "targets": [{"name": "shadow", "url": f"http://127.0.0.1:{shadow.port}"}],
        }
        (tmp_path / "agent.yaml").write_text(yaml.safe_dump(config))
        argv = [sys.executable, "-m", "spoa_mirror", "--config", str(tmp_path / "agent.yaml")]
        agent = stack.enter_context(
            run_process(argv, ready_port=admin_port, name="spoa-mirror", log_dir=tmp_path, cwd=ROOT)
        )
        idle = [Peer(spop_port) for _ in range(slots)]
        stack.callback(lambda: [peer.close() for peer in idle])
        for peer in idle[slots // 2 :]:
            peer.handshake()
        time.sleep(1.2)  # idle for longer than Agent.EVICT_AFTER
        haproxy_config = write_haproxy_config(tmp_path, spop_port, http_port, processing="1s")
        stack.enter_context(run_haproxy(haproxy_config, tmp_path))
        requests = 30
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=5.0) as client:
            errors = [client.get(f"/slot/{n}").headers.get("x-spoe-error", "") for n in range(requests)]
        with suppress(AssertionError, TimeoutError):
            shadow.wait_for(requests, timeout=5.0)
        evicted = log_events(agent.stderr_text(), "spop.connection.evicted")
        metrics = httpx.get(f"http://127.0.0.1:{admin_port}/metrics").text
        evictions = next(
            float(line.split()[1])
            for line in metrics.splitlines()
            if line.startswith("spoa_mirror_spop_connections_evicted_total ")
        )
        mirrored = len(shadow.requests)
        print(
            f"\n{slots} idle peers on {slots} slots, then HAProxy 2.6: {mirrored}/{requests} requests "
            f"mirrored; SPOE errors {sorted(set(errors) - {''}) or 'none'}; {evictions:.0f} evicted"
        )
        assert mirrored == requests
        assert evicted
        assert evictions >= 1


# -- the event loop ---------------------------------------------------------------------------------


PROBE_SCRIPT = """
import os, socket, struct, sys, time
port, stop = int(sys.argv[1]), sys.argv[4]
hello, probe = bytes.fromhex(sys.argv[2]), bytes.fromhex(sys.argv[3])
sock = socket.create_connection(("127.0.0.1", port), timeout=30)
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

def frame_type():
    data = b""
    while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
        chunk = sock.recv(65536)
        if not chunk:
            sys.exit("closed")
        data += chunk
    return data[4]

sock.sendall(hello)
assert frame_type() == 101
while not os.path.exists(stop):
    started = time.monotonic()
    sock.sendall(probe)
    assert frame_type() == 103
    print(started, time.monotonic() - started, flush=True)
    time.sleep(0.002)
"""


@contextmanager
def probe_process(port: int, tmp_path: Path) -> Iterator[Callable[[], list[tuple[float, float]]]]:
    """A second SPOP connection, in its own process so that nothing in the test's process delays
    it, sending a tiny NOTIFY every 2 ms and timing each ACK: the longest wait is how long the
    agent's event loop was held. Yields a function returning (start, latency) pairs so far."""
    stop = tmp_path / "probe.stop"
    output = tmp_path / "probe.out"
    argv = [sys.executable, "-c", PROBE_SCRIPT, str(port), hello_2x().hex(), PROBE.hex(), str(stop)]
    with output.open("w") as sink:
        process = subprocess.Popen(argv, stdout=sink)

        def samples() -> list[tuple[float, float]]:
            lines = output.read_text().splitlines()
            return [(float(a), float(b)) for a, b in (line.split() for line in lines if line.count(" ") == 1)]

        try:
            yield samples
        finally:
            stop.touch()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def worst_messages() -> dict[str, bytes]:
    """NOTIFY payloads built to cost the agent as much as possible."""
    tiny_headers = "".join(f"a{n % 10}: b\r\n" for n in range(1_500_000)) + "\r\n"
    capped_headers = "".join(f"X-H-{n}: v{n}\r\n" for n in range(MAX_HEADERS)) + "\r\n"

    def mirror(headers: str) -> Message:
        args = {"arg_method": "GET", "arg_path": "/x", "arg_ver": "1.1", "arg_hdrs": headers}
        return Message("mirror", args)

    return {
        "9 MB, 1.5 M tiny headers": encode_messages([mirror(tiny_headers)]),
        "200 messages x 1024 headers": encode_messages([mirror(capped_headers)] * 200),
        "3 MB of empty messages": encode_messages([Message("m", {})] * 1_000_000),
    }


def fragmented(payload: bytes, stream_id: int, size: int = 16000) -> list[bytes]:
    pieces = [payload[n : n + size] for n in range(0, len(payload), size)]
    frames = [encode_frame(FrameType.NOTIFY, 0, stream_id, 1, pieces[0])]
    frames += [unset(stream_id, 1, piece) for piece in pieces[1:-1]]
    frames.append(unset(stream_id, 1, pieces[-1], flags=FLAG_FIN))
    return frames


def test_no_single_notify_holds_the_event_loop(tmp_path: Path) -> None:
    """The worst messages within the frame and reassembly caps, each sent in HAProxy-sized
    fragments while a probe connection times its ACKs. On main, at load average 8, these held the loop
    7.9 s, 454 ms and 7.7 s; now header lines and NOTIFY entries are capped and the mirror
    works through its intake in 2 ms slices. Only a hang bound is asserted; the figure is printed."""
    # Built before they are sent, so that building them does not count.
    attacks = [
        (name, fragmented(payload, n)) for n, (name, payload) in enumerate(worst_messages().items(), 1)
    ]
    figures = {}
    with agent_process(tmp_path, {}) as (_agent, port), probe_process(port, tmp_path) as samples:
        time.sleep(0.5)
        idle_worst = max(latency for _, latency in samples())
        for name, frames in attacks:
            peer = Peer(port)
            peer.handshake()
            started = time.monotonic()
            for frame in frames:
                if not peer.send(frame):
                    break
            with suppress(ConnectionError, OSError):
                reply = peer.recv_frame(timeout=15.0)
                if reply.type == FrameType.AGENT_DISCONNECT:
                    name += f" (closed: {disconnect_status(reply)[0].name})"
            # A stall shows once the probe NOTIFY caught in it is answered: wait for two after it.
            time.sleep(0.5)
            ended = time.monotonic()
            deadline = ended + 30.0
            while sum(start > ended for start, _ in samples()) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            figures[name] = max(latency for start, latency in samples() if start >= started - 0.1)
            peer.close()
    print(f"\nprobe ACK latency, worst while idle: {idle_worst * 1000:.1f} ms")
    for name, worst in figures.items():
        print(f"  worst while the agent takes {name}: {worst * 1000:.1f} ms")
    # A hang bound, not a latency verdict (a loaded machine moves the figure): the code before the
    # caps stalled 7.7 and 7.9 s here; the caps and the intake's slices are checked structurally
    # below (test_header_cap_counts_lines_not_bytes, test_mirror_intake_yields_the_loop_between_slices).
    assert max(figures.values()) < 3.0


# -- the caps themselves ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["v", "v" * 80], ids=["small-block", "block-over-64k"])
def test_header_cap_counts_lines_not_bytes(value: str) -> None:
    exactly = "".join(f"H{n}: {value}\r\n" for n in range(MAX_HEADERS))
    assert len(parse_text_headers(exactly + "\r\n")) == MAX_HEADERS
    assert len(parse_text_headers(exactly)) == MAX_HEADERS
    assert len(parse_text_headers(exactly + "\r\nAfter: end\r\n")) == MAX_HEADERS
    with pytest.raises(BadMessage, match="too_many_headers"):
        parse_text_headers(exactly + "One: more\r\n\r\n")
    binary = b"".join(b"\x01H\x01v" for _ in range(MAX_HEADERS))
    assert len(parse_binary_headers(binary + b"\x00\x00")) == MAX_HEADERS
    with pytest.raises(BadMessage, match="too_many_headers"):
        parse_binary_headers(binary + b"\x01H\x01v\x00\x00")


def test_notify_entries_cap_closes_with_status_13(run: Callable[[AsyncTest], None]) -> None:
    agent = Agent(max_notify_entries=64)

    async def test() -> None:
        async with serving(agent) as served:
            peer = await served.ready_peer()
            await peer.send(notify(1, 1, [Message("m", {str(n): n for n in range(63)})]))
            assert (await peer.recv_frame()).type == FrameType.ACK
            await peer.send(notify(2, 1, [Message("m", {str(n): n for n in range(63)}), Message("n", {})]))
            status, message = await peer.expect_disconnect_and_close()
            assert status is Status.RESOURCE_ALLOCATION
            assert "64 messages and arguments" in message

    run(test)


def test_reassembly_budget_is_shared_and_given_back(run: Callable[[AsyncTest], None]) -> None:
    """Two peers may each hold 600 bytes of a fragmented NOTIFY under a 1,000-byte budget only one at a
    time; the bytes come back when a NOTIFY completes, is aborted, or its connection fails."""
    agent = Agent(max_reassembly=800, reassembly_budget=1000)
    piece = b"\x00" * 300  # fragments may split anywhere; only the whole payload must decode

    async def test() -> None:
        async with serving(agent) as served:
            first, second = await served.ready_peer(), await served.ready_peer()
            await first.send(encode_frame(FrameType.NOTIFY, 0, 1, 1, piece), unset(1, 1, piece))
            await wait_until(lambda: agent.reassembly_budget.used == 600)
            await second.send(encode_frame(FrameType.NOTIFY, 0, 1, 1, piece), unset(1, 1, piece))
            status, message = await second.expect_disconnect_and_close()
            assert status is Status.RESOURCE_ALLOCATION and "reassembly budget" in message
            assert agent.reassembly_budget.used == 600
            await first.send(unset(1, 1, b"", flags=FLAG_FIN))
            await wait_until(lambda: agent.reassembly_budget.used == 0)
            third = await served.ready_peer()
            await third.send(encode_frame(FrameType.NOTIFY, 0, 1, 1, piece), unset(1, 1, piece))
            await wait_until(lambda: agent.reassembly_budget.used == 600)
            third.close()
            await wait_until(lambda: agent.reassembly_budget.used == 0)

    run(test)


def test_reassembly_cap_follows_the_largest_body_and_the_frame_size() -> None:
    from spoa_mirror.app import reassembly_cap
    from spoa_mirror.config import parse_config

    def cap(listen: dict[str, Any], *targets: dict[str, Any]) -> int:
        named = [{"name": f"t{n}", "url": f"http://127.0.0.1:{8000 + n}", **t} for n, t in enumerate(targets)]
        return reassembly_cap(parse_config({"listen": listen, "targets": named}, env={}))

    assert cap({}, {}) == 10 * MiB + MiB
    assert cap({}, {"max_body_size": "64k"}, {"max_body_size": "2MiB"}) == 2 * MiB + MiB
    assert cap({"max_frame_size": "4MiB"}, {"max_body_size": "1MiB"}) == MiB + 4 * MiB
    assert cap({}, {"mirror_body": False}) == MiB


def test_mirror_intake_yields_the_loop_between_slices() -> None:
    """Messages of 1,000 headers each take the mirror ~0.5 ms apiece: 2,000 of them queued at once
    must not be processed in one callback, or every ACK waits for all of them. Not a timing
    assertion: the ticker only has to run once before the intake is empty."""
    from spoa_mirror.config import parse_config
    from spoa_mirror.mirror import Mirror

    config = parse_config(
        {"targets": [{"name": "s", "url": "http://127.0.0.1:9", "sample_percentage": 0}]}, env={}
    )
    headers = "".join(f"X-H-{n}: v{n}\r\n" for n in range(1000)) + "\r\n"
    message = Message(
        "mirror", {"arg_method": "GET", "arg_path": "/x", "arg_ver": "1.1", "arg_hdrs": headers}
    )

    async def test() -> tuple[int, int]:
        mirror = Mirror(config, None)
        ticks_while_busy = 0

        def tick() -> None:
            nonlocal ticks_while_busy
            if mirror._intake:
                ticks_while_busy += 1
                asyncio.get_running_loop().call_soon(tick)

        for _ in range(2000):
            mirror.handle(message)
        asyncio.get_running_loop().call_soon(tick)
        while mirror._intake:
            await asyncio.sleep(0.01)
        return ticks_while_busy, mirror.target_stats["s"].received

    ticks, received = asyncio.run(test())
    print(
        f"\n2,000 messages of 1,000 headers: the loop ran {ticks} times while the mirror worked through them"
    )
    assert received == 2000
    assert ticks >= 2

"""Throughput and latency of the SPOP engine: how many NOTIFY->ACK round trips one core can serve.

End-to-end mode (the default) starts an `spoe.Agent` in a subprocess pinned to one core, with a
trivial handler that returns one set-var action, and drives it from this process, pinned to the
other core(s), with N pipelined connections that each keep a window of W NOTIFYs in flight. The
NOTIFYs look like what the mirror agent receives (method, path, version, a ~700-byte `req.hdrs_bin`
block, a small body) and are prebuilt; the client parses only ACK lengths and ids, so the agent, not
the client, is what runs out of CPU. It prints ACKs per second, ACK latency p50/p99 (send of a NOTIFY
to receipt of its ACK) and the agent's CPU time per ACK from /proc/<pid>/stat.

`--sans-io` measures the `Connection` core alone, in this process: no sockets, no event loop, no
handler; and the decode time of a 919-byte NOTIFY, hand-written codec against `spoe.spec`.

    .venv/bin/python bench/engine_bench.py [--connections 8] [--window 32] [--duration 10] [--size 1024]
    .venv/bin/python bench/engine_bench.py --sans-io [--count 100000] [--size 1024]

`--json PATH` also writes the figures there, for bench/run.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import logging
import os
import resource
import shlex
import signal
import struct
import subprocess
import sys
import time
import timeit
from ipaddress import IPv4Address
from typing import cast

import structlog

import spoe
from spoe import NEED_DATA, Connection, FrameType, Int64, Message, Notify, SetVar, Uint32, VarScope
from spoe.frames import decode_frame, decode_messages, encode_frame, encode_kv_list, encode_messages

ACK = int(FrameType.ACK)
AGENT_HELLO = int(FrameType.AGENT_HELLO)
LENGTH = struct.Struct(">I")
# Every stream id is in [2288, 264432), a 3-byte varint, and every frame id is 1 (1 byte): an ACK's
# ids are then the 4 bytes after its 9-byte header and serve as the in-flight key without decoding.
STREAM_ID_BASE = 2288
STREAM_ID_SPACE = 264432 - STREAM_ID_BASE
KEY_START, KEY_END = 9, 13
RING = 1024  # prebuilt NOTIFYs per connection, reused in turn; must exceed the window
ACTION = (VarScope.TRANSACTION, "mirrored", True)


def hello_packet() -> bytes:
    items = {
        "supported-versions": "2.0",
        "max-frame-size": Uint32(16380),
        "capabilities": "pipelining,async",
        "engine-id": "engine-bench",
    }
    return encode_frame(FrameType.HAPROXY_HELLO, 1, 0, 0, encode_kv_list(items))


def header_block() -> bytes:
    """A `req.hdrs_bin` block of a browser-ish POST: <str:name><str:value>... then two empty strings."""
    headers = [
        ("host", "shop.example.com"),
        ("user-agent", "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"),
        ("accept", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
        ("accept-language", "en-GB,en;q=0.7,fr;q=0.3"),
        ("accept-encoding", "gzip, deflate, br, zstd"),
        ("content-type", "application/json"),
        ("content-length", "96"),
        ("origin", "https://shop.example.com"),
        ("referer", "https://shop.example.com/basket?step=2&promo=WINTER24"),
        (
            "cookie",
            "session=8f14e45fceea167a5a36dedd4bea2543; _ga=GA1.2.1387718493.1700000000; "
            "basket=eyJpdGVtcyI6WzEyLDM0LDU2XX0",
        ),
        ("x-forwarded-for", "203.0.113.42, 198.51.100.7"),
        ("x-request-id", "01HZX3J6Q8W7B2C5D9E4F1G0HK"),
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ("sec-fetch-site", "same-origin"),
    ]
    block = bytearray()
    for name, value in [*headers, ("", "")]:
        for text in (name, value):
            raw = text.encode("latin-1")
            block += bytes((len(raw),)) + raw  # every item is shorter than 240: a 1-byte varint
    return bytes(block)


def notify_packet(stream_id: int, frame_id: int, size: int) -> bytes:
    """A NOTIFY of exactly `size` bytes on the wire (length prefix included), the body padded, with
    the args of the `mirror` message in haproxy/mirror.spoe.conf."""
    headers = header_block()

    def build(body_len: int) -> bytes:
        args = {
            "arg_method": "POST",
            "arg_path": "/api/v2/basket/items?currency=EUR&session=8f14e45f",
            "arg_ver": "1.1",
            "arg_hdrs": headers,
            "arg_body": b"x" * body_len,
            "body_len": Int64(body_len),
            "src": IPv4Address("203.0.113.42"),
            "unique_id": "cb0a5d2e:9f3c_0A000001:1F90_6747A1B2_0042:1C2B",
        }
        payload = encode_messages([Message("mirror", args)])
        return encode_frame(FrameType.NOTIFY, 1, stream_id, frame_id, payload)

    body_len = max(0, size - len(build(0)))
    packet = build(body_len)
    if len(packet) != size and body_len:  # the body length's varint grew by a byte
        packet = build(body_len - (len(packet) - size))
    if len(packet) != size:
        raise SystemExit(f"cannot build a NOTIFY of {size} bytes (the smallest is {len(build(0))})")
    return packet


# agent side ------------------------------------------------------------------------------------


def serve(cpu: int, profile: str | None) -> None:
    """The agent process: pinned to `cpu`, WARNING-level logs to stderr (as in production), its port
    on stdout, until SIGTERM."""
    os.sched_setaffinity(0, {cpu})
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )

    async def main() -> None:
        agent = spoe.Agent()

        def handler(message: Message) -> list[SetVar]:
            return [SetVar(*ACTION)]

        agent.set_default_handler(handler)
        (_, port), *_ = await agent.start("127.0.0.1", 0)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print(port, flush=True)
        await stop.wait()
        await agent.stop(timeout=1.0)

    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()
    spoe.run(main())
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(profile)  # type: ignore[arg-type]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat (fields 14 and 15, after the comm field)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# client side -----------------------------------------------------------------------------------


class Client(asyncio.Protocol):
    """One pipelined HAProxy-like connection: HELLO, then one new NOTIFY per ACK received."""

    def __init__(self, packets: list[tuple[bytes, bytes]], window: int, latencies: list[int]) -> None:
        self.packets = packets  # (ids as on the wire, whole NOTIFY packet)
        self.window = window
        self.latencies = latencies
        self.recording = False
        self.sending = True
        self.acks = 0
        self.error: str | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self._next = 0
        self._sent_at: dict[bytes, int] = {}
        self._buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport
        transport.write(hello_packet())

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter_ns()
        buf = self._buf
        buf += data
        sent_at, latencies, recording = self._sent_at, self.latencies, self.recording
        pos, end, acks = 0, len(buf), 0
        while end - pos >= 4:
            stop = pos + 4 + LENGTH.unpack_from(buf, pos)[0]
            if stop > end:
                break
            frame_type = buf[pos + 4]
            if frame_type == ACK:
                sent = sent_at.pop(bytes(buf[pos + KEY_START : pos + KEY_END]))
                if recording:
                    latencies.append(now - sent)
                acks += 1
            elif frame_type == AGENT_HELLO:
                self.ready.set_result(None)
                self._send(self.window)
            else:
                self._fail(f"unexpected frame type {frame_type}: {bytes(buf[pos:stop])!r}")
                return
            pos = stop
        del buf[:pos]
        self.acks += acks
        if acks and self.sending:
            self._send(acks)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.sending:
            self._fail(f"agent closed the connection ({exc})")

    def _send(self, count: int) -> None:
        packets, ring, i = self.packets, len(self.packets), self._next
        sent_at, out = self._sent_at, []
        now = time.perf_counter_ns()
        for _ in range(count):
            key, packet = packets[i]
            sent_at[key] = now
            out.append(packet)
            i = i + 1 if i + 1 < ring else 0
        self._next = i
        assert self.transport is not None
        self.transport.write(b"".join(out))

    def _fail(self, reason: str) -> None:
        self.sending = False
        self.error = reason
        if not self.ready.done():
            self.ready.set_exception(RuntimeError(reason))
        assert self.transport is not None
        self.transport.close()


async def drive(args: argparse.Namespace, port: int, pid: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    latencies: list[int] = []
    clients: list[Client] = []
    for c in range(args.connections):
        base = STREAM_ID_BASE + c * RING
        packets = []
        for i in range(RING):
            packet = notify_packet(base + i, 1, args.size)
            packets.append((packet[KEY_START:KEY_END], packet))
        client = Client(packets, args.window, latencies)
        await loop.create_connection(lambda client=client: client, "127.0.0.1", port)
        clients.append(client)
    await asyncio.gather(*(client.ready for client in clients))
    await _run_for(clients, args.warmup)

    acks0 = sum(client.acks for client in clients)
    cpu0, self0, t0 = cpu_seconds(pid), _self_cpu(), time.perf_counter()
    for client in clients:
        client.recording = True
    await _run_for(clients, args.duration, args.count and acks0 + args.count)
    t1, cpu1, self1 = time.perf_counter(), cpu_seconds(pid), _self_cpu()
    acks = sum(client.acks for client in clients) - acks0
    for client in clients:
        client.recording = client.sending = False
        assert client.transport is not None
        client.transport.close()

    latencies.sort()
    return {
        "elapsed": t1 - t0,
        "acks": acks,
        "agent_cpu": cpu1 - cpu0,
        "client_cpu": self1 - self0,
        "p50": latencies[len(latencies) // 2] / 1e6,
        "p99": latencies[int(len(latencies) * 0.99)] / 1e6,
    }


async def _run_for(clients: list[Client], seconds: float, acks: int = 0) -> None:
    """Let the clients run for `seconds` (or until they have `acks` ACKs); raise if one failed."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        await asyncio.sleep(0.01)
        for client in clients:
            if client.error:
                raise RuntimeError(client.error)
        if acks and sum(client.acks for client in clients) >= acks:
            return


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def end_to_end(args: argparse.Namespace) -> None:
    if args.window >= RING:
        raise SystemExit(f"--window must be below {RING}")
    if args.connections * RING > STREAM_ID_SPACE:
        raise SystemExit(f"--connections must be at most {STREAM_ID_SPACE // RING}")
    cpus = sorted(os.sched_getaffinity(0))
    agent_cpu, client_cpus = cpus[-1], set(cpus[:-1]) or {cpus[-1]}
    if len(cpus) < 2:
        print("warning: one CPU only, the client shares the agent's core", file=sys.stderr)
    os.sched_setaffinity(0, client_cpus)
    command = [sys.executable, os.path.abspath(__file__), "--agent-cpu", str(agent_cpu)]
    if args.profile:
        command += ["--profile", args.profile]
    agent = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert agent.stdout is not None
        port = int(agent.stdout.readline())
        result = spoe.run(drive(args, port, agent.pid))
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=10)

    rate = result["acks"] / result["elapsed"]
    loop_name = "uvloop" if _has_uvloop() else "asyncio"
    print(f"command: {shlex.join(sys.argv)}")
    print(
        f"agent: pid {agent.pid} on cpu {agent_cpu} ({loop_name}); client on cpu "
        f"{','.join(map(str, sorted(client_cpus)))}; {args.connections} connections x window "
        f"{args.window}, NOTIFY {args.size} bytes"
    )
    print(f"ACKs: {result['acks']:.0f} in {result['elapsed']:.2f} s = {rate:,.0f} ACK/s")
    print(f"ACK latency: p50 {result['p50']:.3f} ms, p99 {result['p99']:.3f} ms")
    print(
        f"agent CPU: {result['agent_cpu'] / result['acks'] * 1e6:.2f} us/ACK "
        f"({result['agent_cpu'] / result['elapsed']:.0%} of a core); "
        f"client CPU {result['client_cpu'] / result['elapsed']:.0%} of a core"
    )
    if args.json:
        _write_json(
            args.json,
            {
                "mode": "end_to_end",
                "loop": loop_name,
                "connections": args.connections,
                "window": args.window,
                "size": args.size,
                "seconds": result["elapsed"],
                "acks": result["acks"],
                "acks_per_s": rate,
                "p50_ms": result["p50"],
                "p99_ms": result["p99"],
                "agent_cpu_us_per_ack": result["agent_cpu"] / result["acks"] * 1e6,
                "agent_core_share": result["agent_cpu"] / result["elapsed"],
                "client_core_share": result["client_cpu"] / result["elapsed"],
            },
        )


def _write_json(path: str, figures: dict[str, object]) -> None:
    with open(path, "w") as f:
        json.dump({"command": shlex.join(sys.argv), **figures}, f, indent=2)
        f.write("\n")


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


# sans-IO ---------------------------------------------------------------------------------------


def sans_io(args: argparse.Namespace) -> None:
    """The Connection core alone: 64 KB reads in, NOTIFY events out, one ACK each, bytes out."""
    count = args.count or 100_000
    packets = [notify_packet(STREAM_ID_BASE + i % RING, 1, args.size) for i in range(RING)]
    stream = b"".join(packets[i % RING] for i in range(count))
    chunks = [stream[i : i + 65536] for i in range(0, len(stream), 65536)]
    # set-var: a list encoded for every ACK; constant: the mirror agent's, a tuple the engine encodes
    # once (spoa_mirror.mirror.ACK_ACCEPTED); empty: no action, which HAProxy 3.1.0 never wakes on.
    action = {"set-var": [SetVar(*ACTION)], "constant": (SetVar(*ACTION),), "empty": ()}[args.ack]

    def once() -> float:
        conn = Connection()
        conn.receive_data(hello_packet())
        conn.next_event()
        conn.data_to_send()
        acks = 0
        start = time.perf_counter()
        for chunk in chunks:
            conn.receive_data(chunk)
            while (event := conn.next_event()) is not NEED_DATA:
                assert type(event) is Notify
                conn.send_ack(event.stream_id, event.frame_id, action)
                acks += 1
            conn.data_to_send()
        elapsed = time.perf_counter() - start
        assert acks == count, acks
        return elapsed

    runs = sorted(once() for _ in range(5))
    print(f"command: {shlex.join(sys.argv)}")
    print(
        f"sans-IO: {count} NOTIFYs of {args.size} bytes in 64 KB reads, ACK actions {args.ack}: "
        f"{runs[0] / count * 1e6:.2f} us per NOTIFY->ACK (best of 5; median "
        f"{runs[2] / count * 1e6:.2f} us)"
    )

    hot_us = spec_us = None
    if not args.no_decode:
        hot_us, spec_us = _decode_timings()
    if args.json:
        _write_json(
            args.json,
            {
                "mode": "sans_io",
                "ack": args.ack,
                "count": count,
                "size": args.size,
                "us_per_ack_best": runs[0] / count * 1e6,
                "us_per_ack_median": runs[2] / count * 1e6,
                "decode_919_us": hot_us,
                "decode_919_construct_us": spec_us,
            },
        )


def _decode_timings() -> tuple[float, float | None]:
    """Decode time of a 919-byte NOTIFY, hand-written codec and (if installed) construct's."""
    frame = notify_packet(STREAM_ID_BASE, 1, 919)[4:]
    hot = decode_messages(decode_frame(frame).payload)
    hot_us = _time(lambda: decode_messages(decode_frame(frame).payload))
    print(f"decode of a 919-byte NOTIFY, hand-written: {hot_us:.2f} us")
    spec_us = None
    try:
        from spoe import spec
    except ImportError:
        pass
    else:
        assert spec.parse_messages(spec.parse_frame(frame).payload) == hot
        spec_us = _time(lambda: spec.parse_messages(spec.parse_frame(frame).payload))
        print(f"decode of a 919-byte NOTIFY, construct:    {spec_us:.2f} us ({spec_us / hot_us:.0f}x)")
    return hot_us, spec_us


def _time(fn: object) -> float:
    """Best of five timeit runs, in microseconds per call."""
    timer = timeit.Timer(fn)  # type: ignore[arg-type]
    number, _ = timer.autorange()
    return min(timer.repeat(5, number)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--connections", type=int, default=8, help="pipelined connections (default 8)")
    parser.add_argument("--window", type=int, default=32, help="NOTIFYs in flight per connection (32)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds (default 10)")
    parser.add_argument("--count", type=int, default=0, help="stop after this many ACKs instead")
    parser.add_argument("--size", type=int, default=1024, help="NOTIFY bytes on the wire (default 1024)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first (default 1)")
    parser.add_argument("--profile", metavar="FILE", help="run the agent under cProfile, stats to FILE")
    parser.add_argument("--sans-io", action="store_true", help="time the Connection core in-process")
    parser.add_argument(
        "--ack",
        choices=("set-var", "constant", "empty"),
        default="set-var",
        help="--sans-io: each ACK's actions, a set-var list (default), a constant tuple, or none",
    )
    parser.add_argument(
        "--no-decode",
        action="store_true",
        help="--sans-io: skip the decode timings (for instruction counts under valgrind --tool=callgrind)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    parser.add_argument("--agent-cpu", type=int, help=argparse.SUPPRESS)  # the agent subprocess
    args = parser.parse_args()
    if args.agent_cpu is not None:
        serve(args.agent_cpu, args.profile)
    elif args.sans_io:
        sans_io(args)
    else:
        end_to_end(args)


if __name__ == "__main__":
    main()

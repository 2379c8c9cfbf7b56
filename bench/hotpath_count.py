"""A deterministic drive of the agent's hot path, for instruction counts (callgrind) on a noisy machine.

N NOTIFY frames go, `--batch` per read, through the production wiring in this process: the SPOP
adapter (`SpopProtocol.data_received`), the sans-IO `Connection`, the mirror handler and its ACK,
then the intake (`Mirror._process_intake`: message -> request, checks, redaction with the shipped
defaults, request bytes) into a sink pool that takes each request's bytes and reports it answered.
On uvloop, as the agent runs. No sockets, no timers: the same input gives nearly the same
instruction count run after run, so a change of ~1% is visible where wall-clock figures on a shared
machine vary by 10-20%.

Per-request figures come from two runs that differ only in N (start-up cancels out):

    valgrind --tool=callgrind --callgrind-out-file=/dev/null .venv/bin/python bench/hotpath_count.py -n 2000
    valgrind --tool=callgrind --callgrind-out-file=/dev/null .venv/bin/python bench/hotpath_count.py -n 6000
    # instructions per request = (Ir of the second - Ir of the first) / 4000

`--shadow` replaces the sink by the target's own pool (HTTP/1.1, pipelined as by default) and a
shadow on loopback in this process, so the replay transport's side (its writes, the responses'
parsing, the outcomes) counts too, with the shadow's own few instructions.

`--count-instructions` does both runs and prints the figure; `--request get|browser|post` picks
wrk's bare GET, a browser's ten-header GET or a 1 KB JSON POST; `--batch 1` is a moderate fixed rate
(one NOTIFY per read, the intake run per request), larger batches are saturation. Without valgrind
it prints µs per request (noisy; for a quick look only).

Both callgrind runs get PYTHONHASHSEED 0 (`--hash-seed`): with a random seed the dicts' layout, and
so the count, changed from run to run by up to ~1.8k instructions per request at `--batch 1`; with
a fixed one the same build gives the same figure to the instruction. One seed's layout may favour a
change a little: confirm a small difference under a second seed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import structlog  # noqa: E402
import uvloop  # noqa: E402

from spoa_mirror.app import App  # noqa: E402
from spoa_mirror.config import parse_config  # noqa: E402
from spoe import FrameType, Message, Uint32  # noqa: E402
from spoe.frames import encode_frame, encode_kv_list, encode_messages  # noqa: E402
from spoe.server import SpopProtocol  # noqa: E402

BROWSER_HEADERS = (
    "host: shop.example.com\r\n"
    "user-agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
    "accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
    "accept-language: en-GB,en;q=0.7,fr;q=0.3\r\n"
    "accept-encoding: gzip, deflate, br, zstd\r\n"
    "referer: https://shop.example.com/basket?step=2&promo=WINTER24\r\n"
    "cookie: session=3f8a9c2e7b1d4f6a; theme=dark; consent=analytics:0,ads:0\r\n"
    "upgrade-insecure-requests: 1\r\n"
    "sec-fetch-dest: document\r\n"
    "x-request-id: 6f1c0e0a-1b2c-4d3e-8f90-a1b2c3d4e5f6\r\n"
    "\r\n"
)
POST_BODY = json.dumps(
    {"basket": [{"sku": f"SKU-{i:05d}", "quantity": i % 3 + 1, "note": "gift wrap"} for i in range(16)]}
).encode()[:1024]


def request_args(kind: str) -> dict[str, Any]:
    """The args of haproxy/mirror.spoe.conf's `mirror` message for one request, as HAProxy sends them."""
    if kind == "get":  # what wrk sends through HAProxy
        return {
            "arg_method": "GET",
            "arg_path": "/",
            "arg_ver": "1.1",
            "arg_hdrs": "host: 127.0.0.1:8080\r\n\r\n",
            "arg_body": b"",
        }
    if kind == "browser":
        return {
            "arg_method": "GET",
            "arg_path": "/catalogue/items?page=2&sort=price",
            "arg_ver": "1.1",
            "arg_hdrs": BROWSER_HEADERS,
            "arg_body": b"",
        }
    body = POST_BODY.ljust(1024)
    return {
        "arg_method": "POST",
        "arg_path": "/api/orders",
        "arg_ver": "1.1",
        "arg_hdrs": f"host: shop.example.com\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n",
        "arg_body": body,
    }


def notify(stream_id: int, args: dict[str, Any]) -> bytes:
    payload = encode_messages([Message("mirror", args)])
    return encode_frame(FrameType.NOTIFY, 1, stream_id, 1, payload)


def hello() -> bytes:
    items = {"supported-versions": "2.0", "max-frame-size": Uint32(16380), "capabilities": "pipelining"}
    return encode_frame(FrameType.HAPROXY_HELLO, 1, 0, 0, encode_kv_list(items))


class SinkTransport:
    """The SPOP socket: keeps the byte count of what the agent writes."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


class SinkPool:
    """A shadow that answers every request 200 at once: the pool's `submit` and nothing under it."""

    def __init__(self) -> None:
        self.bytes_held = 0
        self.requests = 0
        self.request_bytes = 0
        self._done: list[Any] = []

    def submit(self, request: bytes, done: Any, *, head: bool = False) -> None:
        self.requests += 1
        self.request_bytes += len(request)
        self._done.append(done)

    def answer(self) -> None:
        waiting, self._done = self._done, []
        for done in waiting:
            done(200, 0.0)

    async def close(self) -> None:
        self.answer()


def handshaken(app: App) -> SpopProtocol:
    """The agent's SPOP adapter on a SinkTransport, past HAPROXY-HELLO."""
    protocol = SpopProtocol(app.agent)
    protocol.connection_made(SinkTransport())  # type: ignore[arg-type]
    protocol.data_received(hello())
    return protocol


def notify_packets(batch: int, kind: str) -> list[bytes]:
    """What one read brings: `batch` NOTIFYs of the request `kind`, three-byte stream ids as HAProxy's
    after its 2,288th stream; 1,024 NOTIFYs in all, fed round and round."""
    args = request_args(kind)
    return [b"".join(notify(2288 + i + j, args) for j in range(batch)) for i in range(0, 1024, batch)]


async def drive(count: int, batch: int, kind: str, redact_defaults: bool = True) -> tuple[float, SinkPool]:
    app = new_app(redact_defaults=redact_defaults)
    sink = SinkPool()
    (target,) = app.mirror.targets
    target.pool = sink  # type: ignore[assignment]
    protocol = handshaken(app)
    packets = notify_packets(batch, kind)
    start = time.perf_counter()
    for i in range(count // batch):
        protocol.data_received(packets[i % len(packets)])
        await asyncio.sleep(0)  # the intake, scheduled by the handler
        sink.answer()
    elapsed = time.perf_counter() - start
    stats = target.stats
    assert stats.balanced() and sink.requests == count // batch * batch, (stats.outcomes, sink.requests)
    return elapsed, sink


class SignallingSinkPool(SinkPool):
    """The sink for `--socket`: answers each request from a later loop callback, as a response
    arriving would, then tells the feeder (one byte on its stdin) that the request is done."""

    def __init__(self, feeder_stdin: int, count: int, finished: asyncio.Future[None]) -> None:
        super().__init__()
        self._fd = feeder_stdin
        self._count = count
        self._finished = finished

    def submit(self, request: bytes, done: Any, *, head: bool = False) -> None:
        self.requests += 1
        self.request_bytes += len(request)
        asyncio.get_running_loop().call_soon(self._answer, done)

    def _answer(self, done: Any) -> None:
        done(200, 0.0)
        os.write(self._fd, b"!")
        if self.requests == self._count:
            self._finished.set_result(None)


async def drive_socket(count: int, kind: str, redact_defaults: bool = True) -> tuple[float, SinkPool]:
    """The agent on a real SPOP socket, fed by a separate process (not under valgrind) that sends one
    NOTIFY, waits for its ACK and for the request to reach the sink, then sends the next: the loop's
    wake-ups and system calls of a moderate fixed rate, one request at a time."""
    app = new_app(redact_defaults=redact_defaults)
    ((_, port), *_) = await app.agent.start("127.0.0.1", 0)
    feeder = subprocess.Popen(
        [sys.executable, __file__, "--feed", str(port), "-n", str(count), "--request", kind],
        stdin=subprocess.PIPE,
    )
    assert feeder.stdin is not None
    finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    sink = SignallingSinkPool(feeder.stdin.fileno(), count, finished)
    (target,) = app.mirror.targets
    target.pool = sink  # type: ignore[assignment]
    start = time.perf_counter()
    await finished
    elapsed = time.perf_counter() - start
    await app.agent.stop(1.0)
    feeder.stdin.close()
    feeder.wait(10)
    assert target.stats.balanced() and sink.requests == count, (target.stats.outcomes, sink.requests)
    return elapsed, sink


# What nginx 1.22 answers `return 200 ok;` with, for `--shadow`.
SHADOW_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sat, 05 Dec 2026 05:55:29 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"
)


class Shadow(asyncio.Protocol):
    """The `--shadow` server, in this process: one canned response per request head it reads."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(SHADOW_RESPONSE * data.count(b"\r\n\r\n"))  # type: ignore[attr-defined]


async def drive_shadow(count: int, batch: int, kind: str, redact_defaults: bool = True) -> tuple[float, Any]:
    """`drive`, with the target's own pool (HTTP/1.1, pipelined as by default) sending to a shadow on
    loopback in this process: the transport's side of a request too (its write, the response's
    parsing, the outcome), and the shadow's few instructions a request. Each batch is answered
    before the next is fed."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Shadow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    app = new_app(f"http://127.0.0.1:{port}/", redact_defaults=redact_defaults)
    (target,) = app.mirror.targets
    protocol = handshaken(app)
    packets = notify_packets(batch, kind)
    outcomes = target.stats.outcomes
    start = time.perf_counter()
    for i in range(count // batch):
        protocol.data_received(packets[i % len(packets)])
        answered = (i + 1) * batch
        while outcomes["sent_2xx"] < answered:
            await asyncio.sleep(0)
    elapsed = time.perf_counter() - start
    server.close()
    assert target.stats.balanced() and outcomes["sent_2xx"] == count // batch * batch, outcomes
    return elapsed, target.pool


def feed(port: int, count: int, kind: str) -> None:
    """The HAProxy side of `--socket`: HELLO, then one NOTIFY at a time."""

    def read_frame() -> None:
        head = sock.recv(4, socket.MSG_WAITALL)
        length = int.from_bytes(head, "big")
        assert len(sock.recv(length, socket.MSG_WAITALL)) == length

    args = request_args(kind)
    packets = [notify(2288 + i, args) for i in range(1024)]
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(hello())
        read_frame()
        for i in range(count):
            sock.sendall(packets[i % len(packets)])
            read_frame()  # the ACK
            assert os.read(0, 1) == b"!"  # the request reached the sink


def new_app(url: str = "http://127.0.0.1:9/", *, redact_defaults: bool = True) -> App:
    """Every default on (redaction, loop marker, byte budgets), unless `redact_defaults` is False:
    then `redact: {defaults: false}`, to tell what the default redaction list costs a request."""
    document: dict[str, Any] = {"targets": [{"name": "shadow", "url": url}]}
    if not redact_defaults:
        document["redact"] = {"defaults": False}
    config = parse_config(document, env={})
    app = App(config, config_path=None, overrides={})
    # Under valgrind a batch takes ~50x longer: a time slice would split it, differently each run.
    app.mirror._process_intake.__func__.__defaults__ = (60.0,)  # type: ignore[attr-defined]
    return app


def count_instructions(args: argparse.Namespace) -> None:
    """Two callgrind runs, N and 3N requests: the difference over 2N is the per-request figure."""
    counts = []
    for n in (args.count, 3 * args.count):
        cmd = [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "-n",
            str(n),
            "--batch",
            str(args.batch),
            "--request",
            args.request,
            *(["--socket"] if args.socket else []),
            *(["--shadow"] if args.shadow else []),
            *(["--no-default-redaction"] if args.no_default_redaction else []),
        ]
        env = {**os.environ, "PYTHONHASHSEED": str(args.hash_seed)}
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stderr
        counts.append(int(re.search(r"Collected : (\d+)", out)[1]))  # type: ignore[index]
    per_request = (counts[1] - counts[0]) / (2 * args.count)
    print(f"{args.request} {mode(args)}: {per_request:,.0f} instructions per request")


def mode(args: argparse.Namespace) -> str:
    if args.socket:
        return "socket"
    return f"batch {args.batch}" + (", to an in-process shadow" if args.shadow else "")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", "--count", type=int, default=2000, help="NOTIFYs (2000)")
    parser.add_argument("--batch", type=int, default=1, help="NOTIFYs per read (1)")
    parser.add_argument("--request", choices=("get", "browser", "post"), default="get")
    parser.add_argument("--count-instructions", action="store_true", help="run under callgrind twice")
    parser.add_argument("--hash-seed", type=int, default=0, help="PYTHONHASHSEED of the callgrind runs (0)")
    parser.add_argument("--socket", action="store_true", help="a real SPOP socket, one request at a time")
    parser.add_argument(
        "--shadow", action="store_true", help="the target's own pool to a shadow in this process, not a sink"
    )
    parser.add_argument(
        "--no-default-redaction",
        action="store_true",
        help="redact: {defaults: false}, to tell what the default redaction list costs",
    )
    parser.add_argument("--feed", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the feeder process
    args = parser.parse_args()
    if args.feed:
        feed(args.feed, args.count, args.request)
        return
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if args.count_instructions:
        count_instructions(args)
        return
    defaults = not args.no_default_redaction
    if args.socket:
        elapsed, sink = uvloop.run(drive_socket(args.count, args.request, defaults))
    elif args.shadow:
        elapsed, sink = uvloop.run(drive_shadow(args.count, args.batch, args.request, defaults))
    else:
        elapsed, sink = uvloop.run(drive(args.count, args.batch, args.request, defaults))
    sizes = f", {sink.request_bytes // max(1, sink.requests)} bytes each" if not args.shadow else ""
    print(f"{args.request} {mode(args)}: {elapsed / args.count * 1e6:.2f} us per request (wall){sizes}")


if __name__ == "__main__":
    main()

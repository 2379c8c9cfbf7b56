"""How much client CPU one mirrored request costs, which is what bounds the traffic one agent can mirror.

Starts a real nginx on a loopback port (serving a small static file), then drives `Pool.send` from
`--concurrency` workers until `--requests` requests are done, and prints requests per second and the
client's CPU microseconds per request (process CPU time over the run / requests; nginx is another
process and not counted). On a 2-core machine nginx and the client share the cores, so req/s is a
floor; CPU per request is the figure to compare.

    .venv/bin/python bench/transport_bench.py --requests 50000 --concurrency 32

Measured on the 2-core development machine (three runs each): ~11.5 us client CPU per request with
uvloop (~75-80k req/s), ~12-13 us with the default asyncio loop, ~14 us with uvloop when
`--build-each` adds wire.build_request for a 10-header GET. For comparison, the same load cost
~0.7 ms per request with httpx and ~75 us with aiohttp. `--json PATH` also writes the figures there.

`--protocols http1,h2c` runs the same load over each protocol in turn against the same nginx (which
then also listens for HTTP/2 with prior knowledge), so the HTTP/2 transport's CPU per request
(transport_h2.H2Pool, streams multiplexed on one connection) is compared with HTTP/1.1's in one run;
the JSON's top-level figures are the first protocol's, `by_protocol` has each.

`--pipeline-depth D --connections C` sends over HTTP/1.1 pipelining (a target's `pipeline_depth`):
the `--concurrency` requests share C connections, D at most on each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spoa_mirror.transport import Pool
from spoa_mirror.transport_h2 import H2Pool
from spoa_mirror.transport_pipeline import PipelinedPool
from spoa_mirror.wire import build_request
from spoa_mirror.wire_h2 import build_h2_request
from tests.support.shadow import NginxServer

PROTOCOLS = ("http1", "h2c")


async def drive(
    host: str,
    port: int,
    requests: int,
    concurrency: int,
    build_each: bool,
    protocol: str = "http1",
    connections: int = 0,
    pipeline_depth: int = 1,
) -> Counter[int]:
    pool: Pool | H2Pool
    connections = connections or concurrency
    if protocol == "h2c":
        pool = H2Pool(host, port, max_connections=connections, connect_timeout=2.0, timeout=5.0)
    elif pipeline_depth > 1:
        pool = PipelinedPool(
            host, port, depth=pipeline_depth, max_connections=connections, connect_timeout=2.0, timeout=5.0
        )
    else:
        pool = Pool(host, port, max_connections=connections, connect_timeout=2.0, timeout=5.0)
    headers = [
        ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36"),
        ("Accept", "text/html,application/xhtml+xml"),
        ("Accept-Language", "en-US,en;q=0.9"),
        ("Accept-Encoding", "gzip, deflate, br"),
        ("Cookie", "session=abcdef0123456789; theme=dark"),
        ("Referer", "https://www.example.com/"),
        ("X-Forwarded-For", "203.0.113.7"),
        ("X-Request-Id", "5f1c2a9e-1b2c-4d5e-8f90-123456789abc"),
        ("Cache-Control", "no-cache"),
        ("Connection", "keep-alive"),
    ]
    authority = f"{host}:{port}"

    def build() -> object:
        if protocol == "h2c":
            return build_h2_request(
                "GET", "/index.txt", headers, b"", authority, scheme="http", timeout_cap=5.0
            )
        return build_request("GET", "/index.txt", headers, b"", authority)

    prebuilt = build()
    statuses: Counter[int] = Counter()
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            raw = build() if build_each else prebuilt
            statuses[await pool.send(raw)] += 1  # type: ignore[arg-type]

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await pool.close()
    return statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop")
    parser.add_argument(
        "--build-each", action="store_true", help="also run wire.build_request for every request"
    )
    parser.add_argument(
        "--protocols",
        default="http1",
        help="comma-separated, each run in turn against the same nginx: http1, h2c (default http1)",
    )
    parser.add_argument(
        "--connections", type=int, default=0, help="connections at most (default: --concurrency)"
    )
    parser.add_argument(
        "--pipeline-depth",
        type=int,
        default=1,
        help="HTTP/1.1 requests in flight per connection (transport_pipeline.PipelinedPool above 1)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    args = parser.parse_args()
    protocols = [name.strip() for name in args.protocols.split(",") if name.strip()]
    if not protocols or any(name not in PROTOCOLS for name in protocols):
        parser.error(f"--protocols: a comma-separated list of {', '.join(PROTOCOLS)}")

    if args.loop == "uvloop":
        import uvloop

        runner = uvloop.run
    else:
        runner = asyncio.run

    by_protocol = {}
    h2c = "h2c" in protocols
    with (
        tempfile.TemporaryDirectory(prefix="transport-bench-") as directory,
        NginxServer(directory, h2c=h2c) as nginx,
    ):
        for protocol in protocols:
            port = nginx.h2c_port if protocol == "h2c" else nginx.port
            shape = (args.build_each, protocol, args.connections, args.pipeline_depth)
            runner(drive(nginx.host, port, 1000, args.concurrency, *shape))  # warm-up
            wall, cpu = time.perf_counter(), time.process_time()
            statuses = runner(drive(nginx.host, port, args.requests, args.concurrency, *shape))
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            print(f"protocol={protocol} loop={args.loop} concurrency={args.concurrency}", end=" ")
            print(f"connections={args.connections or args.concurrency} depth={args.pipeline_depth}", end=" ")
            print(f"requests={args.requests} statuses={dict(statuses)}")
            rps, cpu_us = args.requests / wall, cpu / args.requests * 1e6
            print(f"{rps:,.0f} req/s, {cpu_us:.1f} us client CPU per request")
            by_protocol[protocol] = {
                "statuses": statuses,
                "seconds": wall,
                "rps": rps,
                "client_cpu_us_per_request": cpu_us,
            }
    if args.json:
        first = by_protocol[protocols[0]]
        figures = {
            "command": shlex.join(sys.argv),
            "loop": args.loop,
            "concurrency": args.concurrency,
            "requests": args.requests,
            "build_each": args.build_each,
            "protocol": protocols[0],
            **first,
            "by_protocol": by_protocol,
        }
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()

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
from spoa_mirror.wire import build_request
from tests.support.shadow import NginxServer


async def drive(host: str, port: int, requests: int, concurrency: int, build_each: bool) -> Counter[int]:
    pool = Pool(host, port, max_connections=concurrency, connect_timeout=2.0, timeout=5.0)
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
    prebuilt = build_request("GET", "/index.txt", headers, b"", authority)
    statuses: Counter[int] = Counter()
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            raw = build_request("GET", "/index.txt", headers, b"", authority) if build_each else prebuilt
            statuses[await pool.send(raw)] += 1

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
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    args = parser.parse_args()

    if args.loop == "uvloop":
        import uvloop

        runner = uvloop.run
    else:
        runner = asyncio.run

    with tempfile.TemporaryDirectory(prefix="transport-bench-") as directory, NginxServer(directory) as nginx:
        runner(drive(nginx.host, nginx.port, 1000, args.concurrency, args.build_each))  # warm-up
        wall, cpu = time.perf_counter(), time.process_time()
        statuses = runner(drive(nginx.host, nginx.port, args.requests, args.concurrency, args.build_each))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu

    print(f"loop={args.loop} concurrency={args.concurrency} requests={args.requests}", end=" ")
    print(f"statuses={dict(statuses)}")
    print(f"{args.requests / wall:,.0f} req/s, {cpu / args.requests * 1e6:.1f} us client CPU per request")
    if args.json:
        figures = {
            "command": shlex.join(sys.argv),
            "loop": args.loop,
            "concurrency": args.concurrency,
            "requests": args.requests,
            "build_each": args.build_each,
            "statuses": statuses,
            "seconds": wall,
            "rps": args.requests / wall,
            "client_cpu_us_per_request": cpu / args.requests * 1e6,
        }
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Record and replay, measured: what capturing a request costs the agent, and how fast `spoa-mirror
replay` sends a capture next to wrk against the same nginx.

capture   A capture target (writer thread, rotation at 64 MiB, gzip) offered `--requests` 10-header
          GETs on the event loop, as the intake does after the ACK: the event loop's CPU per request
          (what competes with the ACKs) and the whole process's (the writer thread and gzip too).
replay    `spoa-mirror replay FILE --to nginx --rate 1e6` (every request due at once, so as fast
          as the transport goes, 64 connections) over a capture of `--requests` such GETs: req/s
          and the replay process's CPU per request.
wrk       wrk -t1 -c64 against the same nginx URL for as long as the replay took: req/s and wrk's CPU
          per request, the reference for a load generator on this machine.

    .venv/bin/python bench/capture_bench.py --requests 50000 --json bench/out/capture.json

nginx shares the 2 cores with the client, so req/s are floors; CPU per request is the figure to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spoa_mirror.accounting import TargetStats
from spoa_mirror.capture import gor
from spoa_mirror.config import parse_config
from spoa_mirror.mirror import MemoryBudget, loop_marker_value
from spoa_mirror.request import MirrorRequest
from tests.support.load import WRK, parse_wrk
from tests.support.shadow import NginxServer

ROOT = Path(__file__).resolve().parent.parent
HEADERS = [(f"X-Header-{i}", f"value-{i}" * 3) for i in range(9)] + [("Host", "app.example")]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# NOTIFYs a read brings at saturation, and so requests an intake batch offers.
INTAKE_BATCH = 16


async def capture(directory: str, count: int) -> dict[str, float]:
    from spoa_mirror.capture.target import CaptureTarget

    config = parse_config({"targets": [{"name": "rec", "capture": {"directory": directory}}]}, env={})
    target_config = config.targets[0]
    budget = MemoryBudget(config.memory_budget)
    stats = TargetStats()
    target = CaptureTarget(
        target_config,
        loop_header=config.loop_header,
        truncated_body=config.truncated_body,
        hmac_key=None,
        stats=stats,
        budget=budget,
        loop_value=loop_marker_value(b"k" * 32),
    )
    budget.update([target], [])
    requests = [MirrorRequest("GET", f"/api/v1/items?id={n}", "1.1", HEADERS) for n in range(count)]
    loop_cpu = time.thread_time()
    process_cpu = time.process_time()
    wall = time.perf_counter()
    pool = target.pool
    for index, request in enumerate(requests):
        if index % INTAKE_BATCH == 0:  # the intake holds the writer while it offers a batch
            pool.hold_writes()
        target.offer(request)
        if index % INTAKE_BATCH == INTAKE_BATCH - 1:
            pool.release_writes()
        if index % 256 == 255:  # the intake hands the loop back between batches
            while stats.pending > 2048:  # paced to what the writer takes: a measure, not a flood
                await asyncio.sleep(0.001)
    pool.release_writes()
    loop_cpu = time.thread_time() - loop_cpu
    while stats.pending:
        await asyncio.sleep(0.005)
    await target.drain(asyncio.get_running_loop().time() + 10)
    wall = time.perf_counter() - wall
    process_cpu = time.process_time() - process_cpu
    outcomes = {name: n for name, n in stats.outcomes.items() if n}
    print(f"capture: {count} requests in {wall:.2f} s, outcomes {outcomes}")
    loop_us, process_us = loop_cpu / count * 1e6, process_cpu / count * 1e6
    print(f"  event loop CPU {loop_us:.1f} us/request, process {process_us:.1f} us")
    return {
        "requests": count,
        "seconds": wall,
        "outcomes": outcomes,
        "loop_cpu_us_per_request": loop_cpu / count * 1e6,
        "process_cpu_us_per_request": process_cpu / count * 1e6,
    }


def write_capture(path: Path, count: int) -> None:
    head = "".join(f"{name}: {value}\r\n" for name, value in HEADERS if name != "Host")
    with path.open("wb") as file:
        for n in range(count):
            message = f"GET /index.txt?id={n} HTTP/1.1\r\nHost: app.example\r\n{head}\r\n".encode()
            file.write(gor.encode(gor.REQUEST, f"{n:024x}", 1_733_340_000_000_000_000 + n * 1000, 0, message))


def replay(path: Path, url: str) -> dict[str, float]:
    cpu = children_cpu()
    wall = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "spoa_mirror", "replay", str(path), "--to", url, "--rate", "1e6", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    wall = time.perf_counter() - wall
    cpu = children_cpu() - cpu
    if done.returncode != 0:
        raise SystemExit(f"replay failed ({done.returncode}): {done.stderr[-2000:]}")
    summary = json.loads(done.stdout)
    count = summary["responded"]
    print(
        f"replay: {count} responses ({summary['statuses']}) in {summary['elapsed']:.2f} s: "
        f"{summary['rate']:,.0f} req/s, {summary['cpu_us_per_request']:.1f} us CPU/request (the replay; "
        f"{cpu / count * 1e6:.1f} us with start-up); p99 {summary['latency']['p99'] * 1e3:.2f} ms"
    )
    return {
        "requests": count,
        "seconds": summary["elapsed"],
        "rps": summary["rate"],
        "cpu_us_per_request": summary["cpu_us_per_request"],
        "cpu_us_per_request_with_startup": cpu / count * 1e6,
        "p99_ms": summary["latency"]["p99"] * 1e3,
        "process_wall_s": wall,
    }


def wrk(url: str, seconds: float) -> dict[str, float]:
    cpu = children_cpu()
    done = subprocess.run(
        [WRK, "-t1", "-c64", f"-d{max(1, round(seconds))}s", "--latency", url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    cpu = children_cpu() - cpu
    result = parse_wrk(done.stdout)
    print(f"wrk: {result.summary()}; {cpu / result.requests * 1e6:.1f} us CPU/request")
    return {
        "requests": result.requests,
        "seconds": result.seconds,
        "rps": result.rps,
        "cpu_us_per_request": cpu / result.requests * 1e6,
        "p99_ms": result.p99_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    args = parser.parse_args()
    import uvloop

    figures: dict[str, object] = {"command": shlex.join(sys.argv)}
    with tempfile.TemporaryDirectory(prefix="capture-bench-") as directory:
        figures["capture"] = uvloop.run(capture(str(Path(directory) / "capture"), args.requests))
        path = Path(directory) / "replay.gor"
        write_capture(path, args.requests)
        with NginxServer(directory) as nginx:
            url = f"http://{nginx.host}:{nginx.port}"
            figures["replay"] = replay(path, url)
            figures["wrk"] = wrk(url + "/index.txt", figures["replay"]["seconds"])
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()

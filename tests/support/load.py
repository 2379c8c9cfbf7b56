"""Bounded HTTP load for fault tests: wrk for a fixed, short duration, and what it saw.

    with start_load(url, seconds=3) as load:
        ...break something while the load runs...
    result = load.result()
    assert result.failed == 0, result.summary()

wrk is closed-loop: each connection sends its next request as soon as the previous response is in,
so the load is as heavy as the stack allows, and a request the stack drops or stalls shows up as a
socket error (connect, read, write, timeout) or a bad status. wrk only counts statuses of 400 and
over as bad ("Non-2xx or 3xx responses"); the primaries these tests use answer 200 or nothing, so a
3xx cannot occur.

Figures from one short run on a shared machine are noisy: tests print them and assert only bounds
that catch real harm; comparing latencies is what bench/e2e_bench.py is for.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from types import TracebackType

WRK = shutil.which("wrk") or "/usr/bin/wrk"

_MS_PER_UNIT = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


@dataclass(frozen=True)
class LoadResult:
    requests: int  # completed requests (wrk does not count those still in flight at the end)
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    connect_errors: int
    read_errors: int
    write_errors: int
    timeouts: int  # requests with no response within wrk's --timeout
    bad_status: int  # responses with a status of 400 or more
    output: str  # wrk's own report, for failure messages

    @property
    def socket_errors(self) -> int:
        return self.connect_errors + self.read_errors + self.write_errors + self.timeouts

    @property
    def failed(self) -> int:
        """Primary requests that did not get a good response."""
        return self.socket_errors + self.bad_status

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        return (
            f"{self.requests:,} requests in {self.seconds:.2f} s ({self.rps:,.0f}/s), "
            f"p50 {self.p50_ms:.2f} ms, p99 {self.p99_ms:.2f} ms, max {self.max_ms:.2f} ms, "
            f"failed {self.failed} (connect {self.connect_errors}, read {self.read_errors}, "
            f"write {self.write_errors}, timeout {self.timeouts}, status>=400 {self.bad_status})"
        )


class Load:
    """One running wrk; `result()` waits for it. As a context manager it never outlives the block."""

    def __init__(self, argv: list[str], seconds: float) -> None:
        self.argv = argv
        self.seconds = seconds
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._result: LoadResult | None = None

    def result(self) -> LoadResult:
        """wrk's figures once it has run its duration; raises if it failed or overran."""
        if self._result is None:
            # wrk stops at its duration; the margin covers a loaded machine, not a hung wrk.
            output, _ = self.process.communicate(timeout=self.seconds + 15)
            if self.process.returncode != 0:
                raise RuntimeError(f"{' '.join(self.argv)} exited {self.process.returncode}:\n{output}")
            self._result = parse_wrk(output)
        return self._result

    def __enter__(self) -> Load:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def start_load(
    url: str, seconds: float = 3.0, *, connections: int = 16, threads: int = 1, timeout: float = 2.0
) -> Load:
    """Start `wrk -t<threads> -c<connections> -d<seconds>s --timeout <timeout>s --latency <url>`."""
    argv = [
        WRK,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds:g}s",
        f"--timeout={timeout:g}s",
        "--latency",
        url,
    ]
    return Load(argv, seconds)


def run_load(
    url: str, seconds: float = 3.0, *, connections: int = 16, threads: int = 1, timeout: float = 2.0
) -> LoadResult:
    """`start_load` and wait for the result."""
    with start_load(url, seconds, connections=connections, threads=threads, timeout=timeout) as load:
        return load.result()


def parse_wrk(output: str) -> LoadResult:
    """The figures of wrk's `--latency` report; raises ValueError naming what is missing."""

    def find(pattern: str) -> re.Match[str]:
        match = re.search(pattern, output, re.MULTILINE)
        if match is None:
            raise ValueError(f"no {pattern!r} in wrk's output:\n{output}")
        return match

    total = find(r"^\s*(\d+) requests in ([0-9.]+)(\w+),")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    connect, read, write, timeouts = (int(n) for n in errors.groups()) if errors else (0, 0, 0, 0)
    return LoadResult(
        requests=int(total[1]),
        seconds=_ms(total[2] + total[3]) / 1000,
        p50_ms=_ms(find(r"^\s+50%\s+(\S+)$")[1]),
        p99_ms=_ms(find(r"^\s+99%\s+(\S+)$")[1]),
        max_ms=_ms(find(r"^\s+Latency\s+\S+\s+\S+\s+(\S+)")[1]),
        connect_errors=connect,
        read_errors=read,
        write_errors=write,
        timeouts=timeouts,
        bad_status=int(bad[1]) if bad else 0,
        output=output,
    )


def _ms(value: str) -> float:
    match = re.fullmatch(r"([0-9.]+)([a-z]+)", value)
    if match is None or match[2] not in _MS_PER_UNIT:
        raise ValueError(f"not a wrk duration: {value!r}")
    return float(match[1]) * _MS_PER_UNIT[match[2]]

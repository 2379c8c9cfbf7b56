"""`spoa-mirror replay` and `capture-info` as a user runs them (the real command, a real server):
timing (`--speed 1` over a 10 s capture, `--rate 2000`), damaged input, the exit status, the
target options. Timing figures are printed; the assertions only catch a replay that ignores time."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from spoa_mirror.capture import gor
from tests.support.procs import free_port
from tests.support.shadow import ShadowServer

ROOT = Path(__file__).resolve().parents[1]
BASE = 1_733_340_000_000_000_000


def spoa_mirror(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spoa_mirror", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def write_capture(path: Path, timestamps: list[int], *, body: bytes = b"") -> None:
    records = []
    for index, timestamp in enumerate(timestamps):
        method = b"POST" if body else b"GET"
        length = b"Content-Length: %d\r\n" % len(body) if body else b""
        message = b"%s /r/%d HTTP/1.1\r\nHost: app.example\r\n%sX-N: %d\r\n\r\n%s" % (
            method,
            index,
            length,
            index,
            body,
        )
        records.append(gor.encode(gor.REQUEST, f"{index:024x}", timestamp, 0, message))
    path.write_bytes(b"".join(records))


class TimingServer:
    """Answers every bodiless request with an empty 200 and notes when each arrived: the recording
    shadow parses byte by byte, too slow to judge a replay's rate."""

    def __init__(self) -> None:
        self.arrivals: list[float] = []
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> TimingServer:
        server = self

        class Connection(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport
                self.buffer = b""

            def data_received(self, data: bytes) -> None:
                self.buffer += data
                while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
                    server.arrivals.append(time.monotonic())
                    self.buffer = self.buffer[end + 4 :]
                    self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")  # type: ignore[attr-defined]

        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            self._loop.create_server(Connection, "127.0.0.1", self.port), self._loop
        ).result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


# Loopback delivery takes well under a millisecond: this much on top only ends a hung run.
DELIVERY_HANG_S = 1.0


def assert_on_schedule(arrivals: list[float], offsets: list[float], max_lag: float) -> None:
    """Each arrival, relative to the first, is where the schedule puts it (`offsets`, seconds from the
    first request's due time), give or take the replay's own `max_lag` (how late the latest request
    left against its due time: a loaded machine makes the replay late, and it says so) and
    DELIVERY_HANG_S. Not a clock verdict: a replay that ignores timestamps, speed or rate is off by
    seconds with no lateness reported, while a slow machine only moves the figures printed."""
    assert len(arrivals) == len(offsets)
    slack = max_lag + DELIVERY_HANG_S
    for index, (arrival, offset) in enumerate(zip(arrivals, offsets, strict=True)):
        off_by = (arrival - arrivals[0]) - offset
        assert abs(off_by) <= slack, (
            f"request {index} off its schedule by {off_by:.3f} s (max_lag {max_lag:.3f})"
        )


def test_speed_1_keeps_the_original_inter_arrival_times(tmp_path: Path) -> None:
    """A 10 s capture with irregular gaps (3 to 500 ms) replayed at its own pace: each request's
    arrival, relative to the first, next to its capture time relative to the first (the errors are
    printed; the verdict is assert_on_schedule's)."""
    gaps = [3, 500, 17, 90, 5, 150, 40, 120, 8, 60] * 10
    timestamps = [BASE]
    for gap in gaps[:-1]:
        timestamps.append(timestamps[-1] + gap * 1_000_000)
    path = tmp_path / "paced.gor"
    write_capture(path, timestamps)
    with TimingServer() as server:
        result = spoa_mirror("replay", str(path), "--to", server.url, "--json", timeout=60)
        assert result.returncode == 0, result.stderr
        deadline = time.monotonic() + 5
        while len(server.arrivals) < len(timestamps) and time.monotonic() < deadline:
            time.sleep(0.01)
    arrivals = server.arrivals
    summary = json.loads(result.stdout)
    assert len(arrivals) == len(timestamps)
    drift = [
        abs((arrival - arrivals[0]) - (stamp - timestamps[0]) / 1e9) * 1000
        for arrival, stamp in zip(arrivals, timestamps, strict=True)
    ]
    intervals = [
        abs((arrivals[i] - arrivals[i - 1]) - (timestamps[i] - timestamps[i - 1]) / 1e9) * 1000
        for i in range(1, len(arrivals))
    ]
    span = (timestamps[-1] - timestamps[0]) / 1e9
    print(
        f"\n--speed 1 over {span:.1f} s, {len(arrivals)} requests: inter-arrival error "
        f"median {statistics.median(intervals):.2f} ms, "
        f"p99 {sorted(intervals)[int(0.99 * len(intervals))]:.2f} ms, "
        f"max {max(intervals):.2f} ms; drift from schedule max {max(drift):.2f} ms, "
        f"max_lag {summary['max_lag'] * 1000:.2f} ms"
    )
    assert_on_schedule(arrivals, [(stamp - timestamps[0]) / 1e9 for stamp in timestamps], summary["max_lag"])


def test_speed_4_quarters_the_span(tmp_path: Path) -> None:
    """An 8 s capture at --speed 4 takes 2 s: ignoring the speed (8 s) or inverting it (32 s) is off
    by far more than any slack."""
    path = tmp_path / "fast.gor"
    stamps = [BASE + i * 800_000_000 for i in range(11)]  # 8 s
    write_capture(path, stamps)
    with TimingServer() as server:
        result = spoa_mirror("replay", str(path), "--to", server.url, "--speed", "4", "--json")
        assert result.returncode == 0, result.stderr
        deadline = time.monotonic() + 5
        while len(server.arrivals) < len(stamps) and time.monotonic() < deadline:
            time.sleep(0.01)
        arrivals = list(server.arrivals)
    summary = json.loads(result.stdout)
    print(f"\n--speed 4: an 8 s capture replayed over {(arrivals[-1] - arrivals[0]) * 1000:.0f} ms")
    assert_on_schedule(arrivals, [(stamp - BASE) / 1e9 / 4 for stamp in stamps], summary["max_lag"])


def test_rate_500_holds_its_rate(tmp_path: Path) -> None:
    """2,000 requests captured within 2 ms, sent at 500 a second whatever their timestamps: 4 s,
    where as fast as possible takes a fraction of a second."""
    path = tmp_path / "rate.gor"
    count, rate = 2000, 500
    write_capture(path, [BASE + i * 1000 for i in range(count)])
    with TimingServer() as server:
        started = time.monotonic()
        result = spoa_mirror("replay", str(path), "--to", server.url, "--rate", str(rate), "--json")
        wall = time.monotonic() - started
        assert result.returncode == 0, result.stderr
        deadline = time.monotonic() + 5
        while len(server.arrivals) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        arrivals = list(server.arrivals)
    summary = json.loads(result.stdout)
    observed = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
    print(
        f"\n--rate {rate}: {len(arrivals)} requests, server saw {observed:,.0f}/s, "
        f"replay reported {summary['rate']:,.0f}/s, max_lag {summary['max_lag'] * 1000:.2f} ms, "
        f"p99 {summary['latency']['p99'] * 1000:.2f} ms, wall {wall:.2f} s"
    )
    assert summary["statuses"] == {"200": count}
    assert_on_schedule(arrivals, [index / rate for index in range(count)], summary["max_lag"])


def test_limit_loop_and_summary(tmp_path: Path) -> None:
    path = tmp_path / "small.gor"
    write_capture(path, [BASE + i * 1_000_000 for i in range(5)], body=b'{"a": 1}')
    with ShadowServer() as shadow:
        result = spoa_mirror(
            "replay", str(path), "--to", shadow.url, "--loop", "--limit", "12", "--speed", "5", "--json"
        )
        assert result.returncode == 0, result.stderr
        requests = shadow.wait_for(12)
    summary = json.loads(result.stdout)
    assert summary["read"] == 12 and summary["statuses"] == {"200": 12}
    assert [r.target for r in requests] == [f"/r/{i % 5}" for i in range(12)]
    assert all(r.body == b'{"a": 1}' and r.method == "POST" for r in requests)


def test_target_options_apply(tmp_path: Path) -> None:
    """--target-config takes the agent's target keys: filters, headers, path rewrite; --host original."""
    path = tmp_path / "c.gor"
    write_capture(path, [BASE + i for i in range(6)])
    options = tmp_path / "target.yaml"
    options.write_text(
        "filters: {deny: {path_prefix: [/r/1, /r/3]}}\nheaders: {X-Replay: 'yes'}\n"
        "path_rewrite: {regex: '^/r/', replacement: /v2/}\n"
    )
    with ShadowServer() as shadow:
        result = spoa_mirror(
            "replay",
            str(path),
            "--to",
            shadow.url,
            "--target-config",
            str(options),
            "--host",
            "original",
            "--rate",
            "100",
        )
        assert result.returncode == 0, result.stderr
        requests = shadow.wait_for(4)
    assert [r.target for r in requests] == ["/v2/0", "/v2/2", "/v2/4", "/v2/5"]
    assert all(r.header("X-Replay") == "yes" and r.header("Host") == "app.example" for r in requests)
    assert "not sent: filtered: 2" in result.stdout


def test_bad_option_is_one_line_and_exit_2(tmp_path: Path) -> None:
    options = tmp_path / "target.yaml"
    options.write_text("sample_percentage: 150\n")
    result = spoa_mirror("replay", "x.gor", "--to", "http://127.0.0.1:1", "--target-config", str(options))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "spoa-mirror: replay: sample_percentage: must be between 0 and 100, got 150"
    ]


def test_unreachable_target_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "c.gor"
    write_capture(path, [BASE + i for i in range(3)])
    result = spoa_mirror("replay", str(path), "--to", f"http://127.0.0.1:{free_port()}", "--json")
    assert result.returncode == 1
    summary = json.loads(result.stdout)
    assert summary["unreachable"] and summary["errors"]["error_connect"] >= 1


def test_damaged_files_are_named_and_the_rest_replayed(tmp_path: Path) -> None:
    good, cut, foreign = tmp_path / "good.gor", tmp_path / "cut.gor", tmp_path / "notes.txt"
    write_capture(good, [BASE + i for i in range(4)])
    write_capture(cut, [BASE + 10 + i for i in range(3)])
    cut.write_bytes(cut.read_bytes()[:-30])
    foreign.write_text("shopping list\n" * 10)
    with ShadowServer() as shadow:
        result = spoa_mirror("replay", str(foreign), str(cut), str(good), "--to", shadow.url, "--rate", "100")
        assert result.returncode == 0, result.stderr
        shadow.wait_for(6)
    errors = result.stderr.strip().splitlines()
    assert errors == [
        f"spoa-mirror: {foreign}: byte 0: not a GoReplay capture (no payload header, no separator)",
        f"spoa-mirror: {cut}: byte {cut.read_bytes().rindex(b'1 000')}: truncated: the last "
        f"{len(cut.read_bytes()) - cut.read_bytes().rindex(b'1 000')} bytes end without a separator",
    ], result.stderr
    assert "replayed 6 of 6 requests" in result.stdout


def test_capture_info(tmp_path: Path) -> None:
    path = tmp_path / "c.gor"
    write_capture(path, [BASE, BASE + 2_500_000_000], body=b"x" * 10)
    with path.open("ab") as file:
        file.write(gor.encode(gor.RESPONSE, f"{0:024x}", BASE + 1000, 1000, b"HTTP/1.1 200 OK\r\n\r\n"))
    result = spoa_mirror("capture-info", str(path), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["requests"] == 2 and info["responses"] == 1 and info["requests_with_response"] == 1
    assert info["span_seconds"] == pytest.approx(2.5)
    assert info["methods"] == {"POST": 2} and info["distinct_endpoints"] == 2 and info["body_bytes"] == 20
    text = spoa_mirror("capture-info", str(path)).stdout
    assert "requests: 2" in text and "time span:" in text and "1 recorded" in text


def test_progress_bar_on_a_terminal_only(tmp_path: Path) -> None:
    """On a terminal (a pty here) a rich progress bar counts sent and answered requests; piped, the
    run prints the summary alone (the other tests check stderr holds nothing but errors)."""
    path = tmp_path / "c.gor"
    write_capture(path, [BASE + i * 1_000_000 for i in range(300)])
    with TimingServer() as server:
        main, terminal = pty.openpty()
        process = subprocess.Popen(
            [sys.executable, "-m", "spoa_mirror", "replay", str(path), "--to", server.url],
            stdin=terminal, stdout=terminal, stderr=terminal, cwd=ROOT,
        )  # fmt: skip
        os.close(terminal)
        output = b""
        while chunk := _read_pty(main):
            output += chunk
        assert process.wait(30) == 0
        os.close(main)
    assert b"300 sent, 300 answered, 0 failed" in output
    assert b"replayed 300 of 300 requests" in output


def _read_pty(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO once the child closed its side
        return b""


def test_ctrl_c_stops_sending_and_still_summarises(tmp_path: Path) -> None:
    path = tmp_path / "slow.gor"
    write_capture(path, [BASE + i * 100_000_000 for i in range(100)])  # 10 s at the original pace
    with TimingServer() as server:
        process = subprocess.Popen(
            [sys.executable, "-m", "spoa_mirror", "replay", str(path), "--to", server.url, "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while len(server.arrivals) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=20)
    assert process.returncode == 130, stderr
    summary = json.loads(stdout)
    assert summary["interrupted"] and 5 <= summary["read"] < 100
    assert summary["statuses"] == {"200": summary["read"]}

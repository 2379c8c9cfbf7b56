"""Capture through the real chain (client -> HAProxy -> spoa-mirror -> files) and replay from the files
into a recording server: the replayed requests are what a live shadow received, no secret reaches a
file, files rotate, compress, stay under their cap, and a full or slow disk costs neither the ACK
nor the account (received = sum of outcomes, nothing in flight once settled).

Documented differences between a live shadow's request and its replay: `Host` (each gets its own
target's) and the loop marker `X-Spoa-Mirror` (each sender's own; a capture holds "captured")."""

from __future__ import annotations

import gzip
import json
import os
import secrets
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from spoa_mirror.capture import gor
from spoa_mirror.capture.writer import SLOW_DISK_ENV
from tests.support.load import run_load
from tests.support.mirror_stack import MirrorStack, mirror_stack
from tests.support.procs import HAProxyRelease
from tests.support.shadow import RecordedRequest, ShadowServer

pytestmark = pytest.mark.haproxy

ROOT = Path(__file__).resolve().parents[1]
SECRET = f"sekret{secrets.token_hex(8)}"
CARD = "4111" + str(int.from_bytes(os.urandom(6)) % 10**12).zfill(12)
REDACT = {
    "headers": {"Authorization": "mask", "Cookie": "remove"},
    "query": {"token": "mask"},
    "json_fields": {"user.password": "mask"},
    "form_fields": {"password": "mask"},
    "patterns": {"card": {"regex": r"\b[0-9]{16}\b", "action": "mask"}},
}
DOCUMENTED = {"host", "x-spoa-mirror"}


def capture_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.endswith((".gor", ".gor.gz")))


def raw_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def payloads(directory: Path) -> tuple[list[gor.Payload], list[gor.FormatError]]:
    errors: list[gor.FormatError] = []
    found = list(gor.merge([str(p) for p in capture_files(directory)], errors.append))
    return found, errors


def replay(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spoa_mirror", "replay", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def settled(stack: MirrorStack, target: str, timeout: float = 15.0) -> dict[str, int]:
    """Once nothing is in flight: the target's non-zero outcomes, checked to add up to received."""
    deadline = time.monotonic() + timeout
    while True:
        account = stack.account(target)
        if account.in_flight == 0 and account.received == account.settled:
            return {name: count for name, count in account.outcomes.items() if count}
        assert time.monotonic() < deadline, f"{target} never settled: {account}"
        time.sleep(0.05)


def comparable(request: RecordedRequest) -> tuple[str, str, list[tuple[str, str]], bytes]:
    headers = [(name.lower(), value) for name, value in request.headers if name.lower() not in DOCUMENTED]
    return request.method, request.target, headers, request.body


@pytest.fixture
def capture_dir(tmp_path: Path) -> Path:
    return tmp_path / "capture"


def test_round_trip_equals_a_live_shadow_and_no_secret_is_written(
    tmp_path: Path, capture_dir: Path, haproxy_release: HAProxyRelease
) -> None:
    config = lambda shadows: {  # noqa: E731
        "redact": REDACT,
        "targets": [
            {"name": "live", "url": shadows["live"].url},
            {"name": "rec", "capture": {"directory": str(capture_dir)}},
        ],
    }
    with mirror_stack(tmp_path, {"live": "ok"}, config) as stack:
        client = httpx.Client(base_url=stack.url, timeout=5)
        sent = 0
        for index in range(8):
            headers = {
                "Authorization": f"Bearer {SECRET}",
                "Cookie": f"session={SECRET}",
                "X-Seq": str(index),
            }
            client.get(f"/get/{index}?token={SECRET}&page={index}", headers=headers)
            client.post(
                f"/json/{index}",
                json={"user": {"name": "ann", "password": SECRET}, "n": index},
                headers=headers,
            )
            client.post(f"/form/{index}", data={"user": "bob", "password": SECRET}, headers=headers)
            client.put(f"/text/{index}", content=f"card {CARD} line {index}\n".encode() * 50, headers=headers)
            sent += 4
        client.close()
        live = stack.shadows["live"].wait_for(sent)
        assert settled(stack, "rec") == {"written": sent}
        assert settled(stack, "live") == {"sent_2xx": sent}

    files = capture_files(capture_dir)
    assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    everything = b"".join(raw_bytes(f) for f in files)
    assert SECRET.encode() not in everything and CARD.encode() not in everything
    assert b"X-Spoa-Mirror: captured\r\n" in everything

    with ShadowServer() as target:
        result = replay(str(capture_dir), "--to", target.url, "--speed", "20", "--json")
        assert result.returncode == 0, result.stderr
        replayed = target.wait_for(sent)
    summary = json.loads(result.stdout)
    assert summary["statuses"] == {"200": sent} and summary["errors"] == {}
    by_target = {request.target: request for request in replayed}
    assert len(by_target) == sent
    for request in live:
        assert comparable(by_target[request.target]) == comparable(request), request.target
    assert all(r.header("Host") == f"127.0.0.1:{target.port}" for r in replayed)


def test_rotation_compression_and_total_cap(
    tmp_path: Path, capture_dir: Path, haproxy_release: HAProxyRelease
) -> None:
    capture = {
        "directory": str(capture_dir),
        "max_file_size": 8192,
        "max_total_size": 24576,
        "max_file_age": 1,
    }
    config = lambda _: {"targets": [{"name": "rec", "capture": capture}]}  # noqa: E731
    with mirror_stack(tmp_path, {}, config) as stack:
        count = 600
        responses = stack.blast(
            [(f"/page/{i}?q={secrets.token_urlsafe(90)}", {"X-N": str(i)}) for i in range(count)]
        )  # incompressible, so the compressed files do reach the cap
        assert all(r.status == 200 and not r.headers.get("x-spoe-error") for r in responses)
        assert settled(stack, "rec") == {"written": count}
        removed = stack.wait_for_event("capture.file_removed", timeout=10)
        # Age: one more request, then no traffic; its file is rotated and compressed within ~2 s.
        httpx.get(stack.url + "/last")
        deadline = time.monotonic() + 10
        while (
            not any(p.name.endswith(".gor") for p in capture_files(capture_dir))
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        # Then it is compressed, and the cap enforced (one more file may go): wait for all of it,
        # and for the counter and the log to agree (each removal is counted, then logged).
        while True:
            files = capture_files(capture_dir)
            sizes = {f.name: f.stat().st_size for f in files}
            metrics = stack.metrics()
            removed = stack.agent_events("capture.file_removed")
            counted = metrics['spoa_mirror_capture_files_total{event="removed",target="rec"}']
            done = (
                all(name.endswith(".gz") for name in sizes)
                and sum(sizes.values()) <= capture["max_total_size"]
            )
            if (done and counted == len(removed)) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert metrics['spoa_mirror_capture_files_total{event="removed",target="rec"}'] == len(removed)
    assert (
        metrics['spoa_mirror_capture_files_total{event="rotated",target="rec"}']
        >= len(files) + len(removed) - 1
    )
    assert metrics['spoa_mirror_capture_bytes_total{event="removed",target="rec"}'] == sum(
        e["size"] for e in removed
    )
    print(
        f"\n{count + 1} requests -> {len(files)} files kept, {len(removed)} removed, "
        f"sizes {sorted(sizes.values())}"
    )
    assert all(name.endswith(".gor.gz") for name in sizes), sizes  # every finished file compressed
    assert sum(sizes.values()) <= capture["max_total_size"]
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    found, errors = payloads(capture_dir)
    assert errors == []
    targets = [p.message.split(b" ", 2)[1] for p in found]
    assert targets[-1] == b"/last"
    # What is left is the newest, whole and in order: the oldest files went, not random ones.
    numbers = [int(t.split(b"?")[0].rsplit(b"/", 1)[1]) for t in targets[:-1]]
    assert numbers == list(range(count - len(numbers), count))


def mounted_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], capture_output=True
    )
    return result.returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: a disk that really fills (root and mount(8) needed; CI runs as root)."""
    path = tmp_path / "small-disk"
    if not mounted_tmpfs(path, "64k"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_disk_counts_disk_full_and_keeps_files_whole(
    tmp_path: Path, small_disk: Path, haproxy_release: HAProxyRelease
) -> None:
    capture = {"directory": str(small_disk / "capture"), "compress": False, "max_file_size": "1MiB"}
    config = lambda _: {"targets": [{"name": "rec", "capture": capture}]}  # noqa: E731
    with mirror_stack(tmp_path, {}, config) as stack:
        count = 800
        responses = stack.blast([(f"/fill/{i}?pad={'y' * 100}", {"X-N": str(i)}) for i in range(count)])
        assert all(r.status == 200 for r in responses)
        outcomes = settled(stack, "rec")
        events = stack.agent_events("capture.write_failed")
    print(f"\n{count} requests into a 64 KiB tmpfs: {outcomes}")
    assert set(outcomes) == {"written", "disk_full"} and sum(outcomes.values()) == count
    assert events and events[0]["outcome"] == "disk_full"
    found, errors = payloads(small_disk / "capture")
    assert errors == []  # no half-written payload
    assert len(found) == outcomes["written"]


def test_slow_disk_does_not_hold_the_ack(
    tmp_path: Path, capture_dir: Path, haproxy_release: HAProxyRelease, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each batch written waits 300 ms (a disk stalling in the kernel): the writer falls behind, the
    target's queue overflows (queue_full) or ages out (stale), and the ACKs, which HAProxy's answers
    wait for, do not notice: the answers' p99 is printed next to a healthy disk's (same load, same
    stack). A writer on the event loop would put every answer behind the stall."""
    target = {
        "name": "rec",
        "capture": {"directory": str(capture_dir)},
        "queue_size": 2000,
        "max_queue_age": 1,
    }
    config = lambda _: {"targets": [target]}  # noqa: E731
    (tmp_path / "healthy").mkdir()
    with mirror_stack(tmp_path / "healthy", {}, config) as stack:
        healthy = run_load(stack.url + "/healthy", seconds=3, connections=16)
    monkeypatch.setenv(SLOW_DISK_ENV, "0.3")
    with mirror_stack(tmp_path, {}, config) as stack:
        load = run_load(stack.url + "/slow", seconds=3, connections=16)
        outcomes = settled(stack, "rec", timeout=20)
    print(f"\nhealthy disk: HAProxy answers (after the ACK) {healthy.summary()}")
    print(f"slow disk:    HAProxy answers (after the ACK) {load.summary()}; outcomes {outcomes}")
    assert load.failed == 0
    assert load.p99_ms < max(250, 3 * healthy.p99_ms), load.summary()  # a stalled loop: >= 300 ms
    assert outcomes.get("written", 0) > 0
    assert sum(outcomes.values()) >= load.requests
    assert set(outcomes) <= {"written", "queue_full", "stale"}

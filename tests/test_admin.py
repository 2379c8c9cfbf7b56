"""The admin listener (spoa_mirror/admin.py) in a real agent process: idle and dribbling clients cost
no thread and are cut, /metrics keeps answering beside them, bad requests get clear statuses, and
/livez fails while the SPOP event loop is blocked and recovers after.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from spoa_mirror.admin import READ_TIMEOUT
from spoa_mirror.heartbeat import STALL_LIMIT
from tests.support.procs import ManagedProcess, log_events, run_process

ROOT = Path(__file__).resolve().parent.parent
IDLE_CONNECTIONS = 200
BLOCK_SECONDS = STALL_LIMIT + 4


@dataclass
class Agent:
    process: ManagedProcess
    admin: tuple[str, int]

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(
                f"http://{self.admin[0]}:{self.admin[1]}{path}", timeout=timeout
            ) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/task"))


@contextmanager
def agent(tmp_path: Path, env: dict[str, str] | None = None) -> Iterator[Agent]:
    argv = [
        sys.executable, "-m", "tests.support.blockable_agent",
        "-u", "http://127.0.0.1:9", "-p", "0", "--log-format", "json",
        "--config", str(write_config(tmp_path)),
    ]  # fmt: skip
    with run_process(
        argv, name="spoa-mirror", log_dir=tmp_path, cwd=ROOT, env={**os.environ, **(env or {})}
    ) as process:
        deadline = time.monotonic() + 10
        while not (started := log_events(process.stderr_text(), "agent.started")):
            process.assert_running()
            assert time.monotonic() < deadline, "no agent.started"
            time.sleep(0.02)
        host, _, port = started[0]["admin"].rpartition(":")
        yield Agent(process, (host, int(port)))


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(json.dumps({"admin": {"port": 0}, "listen": {"port": 0}}))
    return path


def raw_exchange(address: tuple[str, int], request: bytes) -> bytes:
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_idle_connections_cost_no_thread_and_are_cut(tmp_path: Path) -> None:
    """The threading WSGI server this replaced: 200 idle connections gave 206 threads and connects
    waiting a second on a backlog of 5, and an idle connection was never closed."""
    with agent(tmp_path) as served, ExitStack() as stack:
        assert served.get("/metrics")[0] == 200
        threads_before = served.threads()
        idle = [
            stack.enter_context(socket.create_connection(served.admin, timeout=5))
            for _ in range(IDLE_CONNECTIONS)
        ]
        dribbling = stack.enter_context(socket.create_connection(served.admin, timeout=5))
        dribbling.sendall(b"GET /metrics HTTP/1.1\r\n")
        status, body = served.get("/metrics")
        assert status == 200 and b"spoa_mirror_spop_connections_open" in body
        threads_with_idle = served.threads()
        print(
            f"threads: {threads_before} before, {threads_with_idle} with {IDLE_CONNECTIONS} idle connections"
        )
        assert threads_with_idle == threads_before

        # Every idle connection, and the one that never finishes its head, is closed by the agent.
        deadline = time.monotonic() + READ_TIMEOUT + 10
        for sock in [*idle, dribbling]:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            assert sock.recv(1) == b"", "the agent kept an idle admin connection open"
        assert served.get("/healthz") == (200, b"ok\n")


def test_bad_requests_get_clear_statuses(tmp_path: Path) -> None:
    with agent(tmp_path) as served:
        too_large = raw_exchange(
            served.admin, b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * 10000 + b"\r\n\r\n"
        )
        assert too_large.startswith(b"HTTP/1.1 431 ")
        assert raw_exchange(served.admin, b"POST /metrics HTTP/1.1\r\nConnection: close\r\n\r\n").startswith(
            b"HTTP/1.1 405 "
        )
        assert raw_exchange(served.admin, b"nonsense\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        # Bytes that never make a request head, then the client's EOF: an answer, not a silent close.
        with socket.create_connection(served.admin, timeout=5) as sock:
            sock.sendall(b"\x00\x00\x00\x10binary")
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(100).startswith(b"HTTP/1.1 400 ")
        assert served.get("/nowhere")[0] == 404
        # Keep-alive: two requests on one connection, then the client's close.
        two = raw_exchange(
            served.admin, b"GET /livez HTTP/1.1\r\n\r\nGET /readyz HTTP/1.1\r\nConnection: close\r\n\r\n"
        )
        assert two.count(b"HTTP/1.1 200 OK") == 2 and two.endswith(b"ready\n")


def test_livez_fails_while_the_event_loop_is_blocked(tmp_path: Path) -> None:
    """SIGUSR1 blocks the agent's main thread (tests/support/blockable_agent.py) for longer than
    STALL_LIMIT: /livez and /healthz say 503 from the admin thread, the stall shows in /metrics, and
    both recover once the loop runs again. /metrics answers throughout."""
    with agent(tmp_path, {"BLOCK_SECONDS": str(BLOCK_SECONDS)}) as served:
        assert served.get("/livez") == (200, b"ok\n")
        os.kill(served.process.pid, signal.SIGUSR1)
        deadline = time.monotonic() + BLOCK_SECONDS + 5
        while served.get("/livez")[0] == 200:
            assert time.monotonic() < deadline, "/livez never failed while the loop was blocked"
            time.sleep(0.2)
        assert served.get("/livez") == (503, b"event loop stalled\n")
        assert served.get("/healthz")[0] == 503
        stalled = [
            line for line in served.get("/metrics")[1].decode().splitlines()
            if line.startswith("spoa_mirror_event_loop_stalled_seconds ")
        ]  # fmt: skip
        assert float(stalled[0].split()[1]) >= STALL_LIMIT
        while served.get("/livez")[0] != 200:
            assert time.monotonic() < deadline + 5, "/livez did not recover after the block"
            time.sleep(0.2)
        metrics = served.get("/metrics")[1].decode()
        # The block itself is one tick that woke BLOCK_SECONDS late.
        assert 'spoa_mirror_event_loop_lag_seconds_bucket{le="5.0"}' in metrics
        [over_five] = [
            float(line.split()[1]) for line in metrics.splitlines()
            if line.startswith('spoa_mirror_event_loop_lag_seconds_bucket{le="+Inf"}')
        ]  # fmt: skip
        [under_five] = [
            float(line.split()[1]) for line in metrics.splitlines()
            if line.startswith('spoa_mirror_event_loop_lag_seconds_bucket{le="5.0"}')
        ]  # fmt: skip
        assert over_five - under_five == 1


@pytest.mark.parametrize("path", ["/livez", "/healthz"])
def test_liveness_paths_answer_ok(tmp_path: Path, path: str) -> None:
    with agent(tmp_path) as served:
        assert served.get(path) == (200, b"ok\n")

"""Start-up and process hygiene: what stops the agent from starting is one line naming the setting
and exit status 2 (which the shipped systemd unit does not restart in a loop), never a traceback;
`check-config` loads certificates and CA files exactly as the agent does; no unrelated process
shares the SPOP port through SO_REUSEPORT; the `-n` supervisor restarts a crashing worker with
back-off and gives up with a clear message."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.procs import ManagedProcess, free_port, log_events, wait_for_port
from tests.support.shadow import self_signed_tls

AGENT = str(Path(sys.executable).with_name("spoa-mirror"))


def write_config(tmp_path: Path, **sections: object) -> Path:
    config = {
        "admin": {"port": free_port()},
        "log": {"format": "json"},
        "targets": [{"url": "http://127.0.0.1:9/"}],
    }
    config.update(sections)
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    return path


def run_agent(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AGENT, *argv], capture_output=True, text=True, timeout=30)


def assert_one_line(result: subprocess.CompletedProcess[str], line: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr == line + "\n"


def wait_for_events(process: ManagedProcess, event: str, count: int = 1, timeout: float = 15.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while len(found := log_events(process.stderr_text(), event)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(found)} {event} events after {timeout} s, expected {count}")
        time.sleep(0.05)
    return found


def children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_spop_port_in_use(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run_agent("--config", str(write_config(tmp_path, listen={"port": port})))
    assert_one_line(result, f"spoa-mirror: cannot start: listen.port: 127.0.0.1:{port} is already in use")


def test_admin_port_in_use(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = write_config(tmp_path, listen={"port": free_port()}, admin={"port": port})
        result = run_agent("--config", str(config))
    assert_one_line(result, f"spoa-mirror: cannot start: admin.port: 127.0.0.1:{port} is already in use")


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[str, str]:
    _context, cert = self_signed_tls(str(tmp_path))
    return cert, cert.replace("shadow-cert.pem", "shadow-key.pem")


@pytest.mark.parametrize("command", ["run", "check-config"])
def test_missing_certificate(tmp_path: Path, certificate: tuple[str, str], command: str) -> None:
    _cert, key = certificate
    missing = tmp_path / "missing.pem"
    config = write_config(
        tmp_path, listen={"port": free_port(), "tls": {"cert_file": str(missing), "key_file": key}}
    )
    result = (
        run_agent(command, str(config)) if command == "check-config" else run_agent("--config", str(config))
    )
    assert_one_line(result, f"spoa-mirror: config error: listen.tls.cert_file: file not found: {missing}")


@pytest.mark.parametrize("command", ["run", "check-config"])
def test_file_that_is_not_a_certificate(tmp_path: Path, certificate: tuple[str, str], command: str) -> None:
    _cert, key = certificate
    config = write_config(tmp_path, listen={"port": free_port(), "tls": {"cert_file": key, "key_file": key}})
    result = (
        run_agent(command, str(config)) if command == "check-config" else run_agent("--config", str(config))
    )
    assert_one_line(
        result, f"spoa-mirror: config error: listen.tls.cert_file: {key} holds no PEM certificate"
    )


@pytest.mark.parametrize("command", ["run", "check-config"])
def test_bad_ca_file(tmp_path: Path, certificate: tuple[str, str], command: str) -> None:
    cert, key = certificate
    bad_ca = tmp_path / "ca.pem"
    bad_ca.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    tls = {"cert_file": cert, "key_file": key, "ca_file": str(bad_ca)}
    config = write_config(tmp_path, listen={"port": free_port(), "tls": tls})
    result = (
        run_agent(command, str(config)) if command == "check-config" else run_agent("--config", str(config))
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(
        f"spoa-mirror: config error: listen.tls.ca_file: cannot load CA certificates from {bad_ca}: "
    )


@pytest.mark.parametrize("command", ["run", "check-config"])
def test_bad_target_ca_file(tmp_path: Path, command: str) -> None:
    bad_ca = tmp_path / "ca.pem"
    bad_ca.write_text("not a certificate\n")
    config = write_config(
        tmp_path,
        listen={"port": free_port()},
        targets=[{"url": "https://127.0.0.1:9/", "ca_file": str(bad_ca)}],
    )
    result = (
        run_agent(command, str(config)) if command == "check-config" else run_agent("--config", str(config))
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(
        f"spoa-mirror: config error: targets[0].ca_file: cannot load CA certificates from {bad_ca}: "
    )


def start_agent(tmp_path: Path, name: str, *argv: str) -> ManagedProcess:
    return ManagedProcess(name, [AGENT, *argv], tmp_path)


def test_a_second_agent_never_shares_the_port(tmp_path: Path) -> None:
    """An agent with -n 2 holds the port with SO_REUSEPORT sockets; a second, independent agent on
    the same port fails with one line and status 2, whether it wants workers (SO_REUSEPORT, which
    the kernel would allow) or not; and so does an agent started after an unrelated process that
    listens with SO_REUSEPORT."""
    port = free_port()
    first_config = write_config(tmp_path, listen={"port": port, "workers": 2})
    first = start_agent(tmp_path, "first", "--config", str(first_config))
    try:
        wait_for_events(first, "agent.started", count=2)
        second_dir = tmp_path / "second"
        second_dir.mkdir()
        for workers in ("2", "1"):
            result = run_agent("--config", str(write_config(second_dir)), "-p", str(port), "-n", workers)
            assert result.returncode == 2, result.stderr
            [line] = result.stderr.splitlines()
            assert line.startswith(
                f"spoa-mirror: cannot start: listen.port: 127.0.0.1:{port} is already in use"
            )
        first.assert_running()
        assert len(children(first.pid)) == 2
    finally:
        assert first.stop() == 0, first.stderr_tail()

    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        result = run_agent("--config", str(write_config(tmp_path)), "-p", str(port), "-n", "2")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(
        f"spoa-mirror: cannot start: listen.port: 127.0.0.1:{port} is already in use by another process"
    )
    assert result.stderr.count("\n") == 1


def test_supervisor_restarts_a_crashing_worker_then_gives_up(tmp_path: Path) -> None:
    """A worker killed is restarted after a back-off (0.5 s the first time), on the same port; killed
    again within a minute, past listen.worker_restarts (1 here), the supervisor logs
    supervisor.gave_up, stops the other worker and exits 1."""
    port = free_port()
    config = write_config(tmp_path, listen={"port": port, "workers": 2, "worker_restarts": 1})
    agent = start_agent(tmp_path, "agent", "--config", str(config))
    try:
        wait_for_events(agent, "agent.started", count=2)
        victim, survivor = children(agent.pid)
        os.kill(victim, signal.SIGKILL)
        [died] = wait_for_events(agent, "supervisor.worker_died")
        assert died["exit_status"] == -signal.SIGKILL and died["restart_in"] == 0.5
        [restarted] = wait_for_events(agent, "supervisor.worker_restarted")
        assert restarted["worker"] == died["worker"]
        wait_for_events(agent, "agent.started", count=3)
        assert sorted(children(agent.pid)) == sorted([restarted["pid"], survivor])
        wait_for_port("127.0.0.1", port)

        os.kill(restarted["pid"], signal.SIGKILL)
        status = agent.popen.wait(timeout=20)
    finally:
        agent.stop()
    text = agent.stderr_text()
    [gave_up] = log_events(text, "supervisor.gave_up")
    assert gave_up["level"] == "error" and gave_up["worker"] == died["worker"] and gave_up["crashes"] == 2
    assert "died 2 times in a row (listen.worker_restarts: 1)" in gave_up["note"]
    assert status == 1
    assert len(log_events(text, "agent.stopped")) == 1  # the survivor, stopped cleanly

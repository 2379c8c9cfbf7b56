"""The C agent's command lines work unchanged: every flag of its `--help`
(haproxytech/spoa-mirror, src/main.c `usage()`), with its meaning, units and defaults, tested by its
effect on a running agent rather than by parsing alone.

The C agent's usage text, for reference:

    spoa-mirror { -h --help }
    spoa-mirror { -V --version }
    spoa-mirror { -r --runtime=TIME } [OPTION]...
      -a --address  -B --libev-backend  -b --connection-backlog  -c --capability  -D --daemonize
      -d --debug (debug builds)  -F --pidfile  -h --help  -i --monitor-interval  -l --logfile
      -m --max-frame-size  -n --num-workers  -p --port  -r --runtime  -t --processing-delay
      -u --mirror-url  -I --mirror-interface  -P --mirror-local-port  -V --version

and its README's command line: `./src/spoa-mirror -r0 -u"http://localhost:8100/"`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from spoa_mirror.cli_args import c_time
from spoe import Message
from tests.support.procs import ManagedProcess, free_port, log_events, wait_for_port
from tests.support.shadow import ShadowServer
from tests.support.spop_peer import TcpPeer, notify

AGENT = str(Path(sys.executable).with_name("spoa-mirror"))
C_LONG_OPTIONS = (
    "--address", "--libev-backend", "--connection-backlog", "--capability", "--daemonize", "--debug",
    "--pidfile", "--help", "--monitor-interval", "--logfile", "--max-frame-size", "--num-workers",
    "--port", "--runtime", "--processing-delay", "--mirror-url", "--mirror-interface",
    "--mirror-local-port", "--version",
)  # fmt: skip
C_SHORT_OPTIONS = "aBbcDdFhilmnprtuIPV"


def mirror_args(path: str = "/c-agent") -> dict[str, object]:
    return {
        "arg_method": "GET",
        "arg_path": path,
        "arg_ver": "1.1",
        "arg_hdrs": "host: example.com\r\n\r\n",
        "arg_body": b"",
    }


async def notify_and_time_ack(port: int, host: str = "127.0.0.1") -> tuple[dict[str, object], float]:
    """Handshake, one mirror NOTIFY; the AGENT-HELLO items and the seconds until the ACK."""
    peer = await TcpPeer.connect((host, port))
    try:
        hello = await peer.handshake()
        started = time.monotonic()
        await peer.send(notify(1, 1, [Message("mirror", mirror_args())]))
        await peer.recv_frame(timeout=5.0)
        return hello, time.monotonic() - started
    finally:
        peer.close()


@contextmanager
def agent(
    tmp_path: Path, *flags: str, config: dict | None = None, port: int | None = None
) -> Iterator[ManagedProcess]:
    """The agent with C-style `flags`, on free ports (a config file sets the admin port, which the C
    agent has not), logging JSON; stopped with SIGTERM at the end."""
    config_path = tmp_path / "agent.yaml"
    config_path.write_text(
        json.dumps({"admin": {"port": free_port()}, "log": {"format": "json"}, **(config or {})})
    )
    argv = [AGENT, *flags, "--config", str(config_path)]
    process = ManagedProcess("agent", argv, tmp_path)
    try:
        if port is not None:
            wait_for_port("127.0.0.1", port, process=process.popen)
            if not any(flag.startswith(("-l", "--logfile")) for flag in flags):
                wait_for_event(process, "agent.started")
        yield process
    except BaseException as error:
        error.add_note(process.stderr_tail())
        raise
    finally:
        process.stop()


def wait_for_event(process: ManagedProcess, event: str, timeout: float = 10.0) -> list[dict]:
    """The port listens before the agent serves it (bound first, so a port in use fails early):
    tests that read the log wait for the event itself."""
    deadline = time.monotonic() + timeout
    while not (found := log_events(process.stderr_text(), event)):
        process.assert_running()
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {event} within {timeout} s")
        time.sleep(0.02)
    return found


def test_help_lists_every_c_agent_option() -> None:
    result = subprocess.run([AGENT, "-h"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for option in C_LONG_OPTIONS:
        assert option in result.stdout, option
    for letter in C_SHORT_OPTIONS:
        assert re.search(rf"-{letter}[ ,]", result.stdout), letter


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version(flag: str) -> None:
    result = subprocess.run([AGENT, flag], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert re.fullmatch(r"spoa-mirror \d+\.\d+\.\d+\S*\n", result.stdout), result.stdout


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0.0), ("5000", 5.0), ("250ms", 0.25), ("1500us", 0.0015), ("2s", 2.0), ("3m", 180.0),
     ("1h", 3600.0), ("1d", 86400.0)],
)  # fmt: skip
def test_times_are_milliseconds_unless_suffixed(text: str, seconds: float) -> None:
    assert c_time(0, 7 * 86400)(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "argv",
    [["-r", "1.5s"], ["-r", "8d"], ["-r", "-1"], ["-t", "2s"], ["-i", "500ms"], ["-c", "nope"],
     ["-B", "winsock"], ["-d", "512"], ["-P", "99999"]],
)  # fmt: skip
def test_values_the_c_agent_refuses_are_refused(argv: list[str]) -> None:
    """Out of the C agent's ranges (runtime up to 7 days, processing delay up to 1 s, monitor
    interval 1 s to 1 h) or unknown names: a usage error, status 2, before anything starts."""
    result = subprocess.run(
        [AGENT, *argv, "-u", "http://127.0.0.1:9/"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(("spoa-mirror: error:", "spoa-mirror: config error:"))
    )


def test_the_readme_command_line_runs(tmp_path: Path) -> None:
    """`./src/spoa-mirror -r0 -u"http://localhost:8100/"` as the shell passes it: -r0 (no space) is
    a runtime of 0, unlimited; the agent starts on the default port and stops cleanly on SIGTERM.
    The default SPOP port may be taken on a shared machine: the config file moves it, as the
    flags would."""
    port = free_port()
    with agent(
        tmp_path, "-r0", "-uhttp://localhost:8100/", config={"listen": {"port": port}}, port=port
    ) as process:
        started = process.stderr_text()
        assert log_events(started, "agent.started")[0]["targets"] == ["localhost:8100"]
        assert process.stop() == 0


def test_runtime_is_in_milliseconds(tmp_path: Path) -> None:
    """-r 1500 stops the agent after 1.5 s (the C agent's unit), not 1500 s."""
    port = free_port()
    with agent(tmp_path, "-r", "1500", "-p", str(port), "-u", "http://127.0.0.1:9/", port=port) as process:
        status = process.popen.wait(timeout=20)
        assert status == 0
        assert log_events(process.stderr_text(), "agent.stopped")


def test_address_port_capability_and_frame_size(tmp_path: Path) -> None:
    """-a/-p choose the listener; -c is case-insensitive and limits what AGENT-HELLO announces;
    -m sets the max-frame-size announced."""
    port = free_port("127.0.0.2")
    flags = [
        "-a",
        "127.0.0.2",
        "-p",
        str(port),
        "-c",
        "PIPELINING",
        "-m",
        "4096",
        "-u",
        "http://127.0.0.1:9/",
    ]
    with agent(tmp_path, *flags):
        wait_for_port("127.0.0.2", port)
        hello, _ = asyncio.run(notify_and_time_ack(port, "127.0.0.2"))
    assert hello["capabilities"] == "pipelining"
    assert int(hello["max-frame-size"]) <= 4096


def test_backlog_sets_the_listen_backlog(tmp_path: Path) -> None:
    """-b 7: the kernel's listen queue for the SPOP socket is 7 (ss shows it as Send-Q)."""
    port = free_port()
    with agent(tmp_path, "-b", "7", "-p", str(port), "-u", "http://127.0.0.1:9/", port=port):
        listing = subprocess.run(
            ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=10
        ).stdout
    [line] = listing.splitlines()
    assert line.split()[2] == "7", listing


def test_processing_delay_delays_the_ack(tmp_path: Path) -> None:
    """-t 400 (ms): the NOTIFY is handled and acknowledged no sooner than 0.4 s after it arrived."""
    port = free_port()
    with ShadowServer() as shadow, agent(tmp_path, "-t", "400", "-p", str(port), "-u", shadow.url, port=port):
        _, ack_after = asyncio.run(notify_and_time_ack(port))
        shadow.wait_for(1)
    assert ack_after >= 0.4


def test_monitor_interval_and_debug_level(tmp_path: Path) -> None:
    """-d 1 logs at debug level, -i 1s makes each worker log its state every second; -B is accepted
    and its being ignored logged once."""
    port = free_port()
    with agent(
        tmp_path,
        "-d",
        "1",
        "-i",
        "1s",
        "-B",
        "EPOLL",
        "-p",
        str(port),
        "-u",
        "http://127.0.0.1:9/",
        port=port,
    ) as process:
        deadline = time.monotonic() + 10
        while not log_events(process.stderr_text(), "agent.monitor") and time.monotonic() < deadline:
            time.sleep(0.1)
        text = process.stderr_text()
    [monitor, *_] = log_events(text, "agent.monitor")
    assert monitor["level"] == "debug" and monitor["connections"] == 0
    [ignored] = log_events(text, "agent.flag_ignored")
    assert ignored["flag"] == "-B" and ignored["value"] == "epoll"


def test_differences_from_the_c_agent_are_logged_when_the_flag_is_not_given(tmp_path: Path) -> None:
    port = free_port()
    with agent(tmp_path, "-p", str(port), "-u", "http://127.0.0.1:9/", port=port) as process:
        [defaults] = log_events(process.stderr_text(), "agent.c_agent_differences")
    assert set(defaults["flags"]) == {"-a", "-n", "-b", "-c", "-r"}
    assert "0.0.0.0" in defaults["flags"]["-a"]
    with agent(tmp_path, "-a", "127.0.0.1", "-n", "1", "-b", "10", "-c", "async", "-r", "0", "-p", str(port),
               "-u", "http://127.0.0.1:9/", port=port) as process:  # fmt: skip
        assert not log_events(process.stderr_text(), "agent.c_agent_differences")


def test_mirror_urls_each_get_the_request(tmp_path: Path) -> None:
    """-u mirrors to that URL (the C agent keeps the last of several; this agent mirrors to each)."""
    port = free_port()
    with (
        ShadowServer() as first,
        ShadowServer() as second,
        agent(tmp_path, "-p", str(port), "-u", first.url, "-u", second.url, port=port),
    ):
        asyncio.run(notify_and_time_ack(port))
        [one] = first.wait_for(1)
        [other] = second.wait_for(1)
    assert one.target == other.target == "/c-agent"


class PeerRecorder:
    """A minimal HTTP/1.1 shadow that records where each connection came from."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.peers: list[tuple[str, int]] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.peers.append(peer[:2])
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data and (chunk := conn.recv(4096)):
                    data += chunk
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    def wait(self, count: int) -> list[tuple[str, int]]:
        deadline = time.monotonic() + 10
        while len(self.peers) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return list(self.peers)

    def close(self) -> None:
        self.sock.close()


def test_mirror_interface_and_local_port_range(tmp_path: Path) -> None:
    """-I sets the source address of connections to the shadow, -P their source port range."""
    low = free_port()
    recorder = PeerRecorder()
    port = free_port()
    try:
        flags = [
            "-I",
            "127.0.0.3",
            "-P",
            f"{low}-{low + 2}",
            "-p",
            str(port),
            "-u",
            f"http://127.0.0.1:{recorder.port}/",
        ]
        with agent(tmp_path, *flags, port=port):
            asyncio.run(notify_and_time_ack(port))
            [(host, source_port)] = recorder.wait(1)
    finally:
        recorder.close()
    assert host == "127.0.0.3"
    assert low <= source_port <= low + 2


def test_mirror_interface_by_name(tmp_path: Path) -> None:
    """An interface name, as curl takes it: lo's address, 127.0.0.1."""
    result = subprocess.run(
        [AGENT, "check-config", "/dev/null", "-I", "lo", "-P", "40000", "-u", "http://127.0.0.1:9/"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "Connections to shadows from 127.0.0.1 (lo), ports 40000-40000" in result.stdout


@pytest.mark.parametrize("workers", ["1", "2"])
def test_daemonize_pidfile_and_logfile(tmp_path: Path, workers: str) -> None:
    """-D: the command returns 0 once the daemon listens (with -n 2, once both workers do), and the
    daemon runs on in a session of its own; -F holds the daemon's pid and is removed when it stops;
    -l a:FILE gets every log line, and appends (a second run keeps the first run's lines)."""
    port = free_port()
    pidfile, logfile = tmp_path / "agent.pid", tmp_path / "agent.log"
    config = tmp_path / "agent.yaml"
    config.write_text(json.dumps({"admin": {"port": free_port()}, "log": {"format": "json"}}))
    argv = [AGENT, "-D", "-n", workers, "-F", str(pidfile), "-l", f"a:{logfile}", "-p", str(port), "-u", "http://127.0.0.1:9/",
            "--config", str(config)]  # fmt: skip
    for run in (1, 2):
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert result.stdout == result.stderr == ""
        pid = int(pidfile.read_text())
        try:
            assert os.getsid(pid) != os.getsid(0)  # a session of its own, the command gone
            wait_for_port("127.0.0.1", port)
        finally:
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pidfile.exists()
        assert len(log_events(logfile.read_text(), "agent.started")) == run * int(workers)
        assert len(log_events(logfile.read_text(), "agent.stopped")) == run * int(workers)


def test_logfile_modes(tmp_path: Path) -> None:
    """No mode refuses an existing file (the C agent's O_EXCL); w: truncates it; the refusal is one
    line with status 2."""
    logfile = tmp_path / "agent.log"
    logfile.write_text("old line\n")
    port = free_port()
    result = subprocess.run(
        [AGENT, "-l", str(logfile), "-p", str(port), "-u", "http://127.0.0.1:9/"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"spoa-mirror: cannot start: -l/--logfile: cannot open {logfile}: File exists "
        "(give a mode: a:FILE appends, w:FILE truncates)\n"
    )
    with agent(tmp_path, "-l", f"W:{logfile}", "-p", str(port), "-u", "http://127.0.0.1:9/", port=port):
        deadline = time.monotonic() + 10
        while not log_events(logfile.read_text(), "agent.started") and time.monotonic() < deadline:
            time.sleep(0.02)
    text = logfile.read_text()
    assert "old line" not in text and log_events(text, "agent.stopped")


def test_the_readme_migration_table_lists_every_c_flag() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Migrating from the C agent", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `-")]
    flags = {re.match(r"\| `-(\w), (--[\w-]+)", row).groups() for row in rows}  # type: ignore[union-attr]
    assert {long for _short, long in flags} == set(C_LONG_OPTIONS)
    assert "".join(sorted(short for short, _long in flags)) == "".join(sorted(C_SHORT_OPTIONS))

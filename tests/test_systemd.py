"""deploy/systemd/spoa-mirror.service: systemd accepts it, its sandbox scores as hardened, and the
agent keeps the `Type=notify` contract the unit relies on.

No systemd runs as PID 1 here, so the unit is never started: `systemd-analyze verify` and
`systemd-analyze security --offline` judge the file, and the agent is run directly with what the
unit would give it that matters for the contract (NOTIFY_SOCKET, SIGHUP for ExecReload, SIGTERM to
stop) and for the one sandbox rule that could break Python (MemoryDenyWriteExecute, applied here
with the kernel's own prctl). SystemCallFilter, ProtectSystem and the rest are checked statically.
"""

from __future__ import annotations

import asyncio
import ctypes
import hmac
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from spoa_mirror.app import tick_interval
from spoa_mirror.config import HMAC_CREDENTIAL, Config
from spoa_mirror.heartbeat import TICK
from spoa_mirror.redact import HMAC_PREFIX
from spoe import Message
from tests.support.procs import free_port, log_events, wait_for_port
from tests.support.shadow import ShadowServer
from tests.support.spop_peer import TcpPeer, notify

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "systemd" / "spoa-mirror.service"
INSTALLED_AGENT = "/opt/spoa-mirror/bin/spoa-mirror"  # where the unit expects the venv
AGENT = Path(sys.executable).with_name("spoa-mirror")
SYSTEMD_ANALYZE = "systemd-analyze"
DISCONNECT_GRACE = 2.0  # App.shutdown gives HAProxy's connections this long before draining
MAX_EXPOSURE = 2.0  # systemd-analyze security's scale: 0 (locked down) to 10 (unprotected)
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1  # linux/prctl.h, Linux 6.3+


def unit_settings(text: str) -> dict[str, list[str]]:
    """ "Section.Key" -> values in order; systemd allows a key more than once (ExecReload here)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


@pytest.fixture
def local_unit(tmp_path: Path) -> Path:
    """The unit with the venv's agent in place of /opt/spoa-mirror, since verify wants the binaries
    of ExecStart and ExecReload to exist."""
    text = UNIT.read_text()
    assert INSTALLED_AGENT in text
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(INSTALLED_AGENT, str(AGENT)))
    return unit


def test_systemd_analyze_verify_accepts_the_unit(local_unit: Path) -> None:
    """Exit status 0 is not enough: unknown keys and bad values are only warnings on stderr."""
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(local_unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_sandbox_exposure_is_low(local_unit: Path) -> None:
    result = subprocess.run(
        [
            SYSTEMD_ANALYZE,
            "security",
            "--offline=yes",
            f"--threshold={int(MAX_EXPOSURE * 10)}",
            str(local_unit),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    [score] = re.findall(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    assert result.returncode == 0, f"exposure {score} > {MAX_EXPOSURE}:\n{result.stdout}"


def test_unit_settings() -> None:
    settings = unit_settings(UNIT.read_text())

    def one(key: str) -> str:
        [value] = settings[f"Service.{key}"]
        return value

    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("ExecStart") == f"{INSTALLED_AGENT} --config /etc/spoa-mirror/config.yaml"
    # The check first, so `systemctl reload` fails visibly on a bad config; then the signal.
    assert settings["Service.ExecReload"] == [
        f"{INSTALLED_AGENT} check-config /etc/spoa-mirror/config.yaml",
        "/bin/kill -HUP $MAINPID",
    ]
    assert one("Restart") == "on-failure"
    stop = re.fullmatch(r"(\d+)s", one("TimeoutStopSec"))
    assert stop and int(stop[1]) > 2 * (Config().drain_timeout + DISCONNECT_GRACE)
    hardening = {
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "SystemCallArchitectures": "native",
        "MemoryDenyWriteExecute": "yes",
        "LockPersonality": "yes",
        "RestrictRealtime": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "UMask": "0077",
    }
    assert {key: one(key) for key in hardening} == hardening
    assert settings["Service.SystemCallFilter"][0] == "@system-service"
    # A stuck event loop is restarted; the tick (1 s) leaves the watchdog ample slack.
    watchdog = re.fullmatch(r"(\d+)s", one("WatchdogSec"))
    assert watchdog and int(watchdog[1]) >= 4 * TICK
    assert re.fullmatch(r"\d+M", one("MemoryMax")) and int(one("MemoryMax")[:-1]) >= 256
    assert int(one("TasksMax")) >= 16
    assert one("LoadCredential") == f"{HMAC_CREDENTIAL}:/etc/spoa-mirror/hmac.key"
    assert "file:///usr/share/doc/spoa-mirror/README.md" in settings["Unit.Documentation"]


# --- the agent's side of Type=notify ----------------------------------------------------------------


class NotifySocket:
    """What systemd listens on for a Type=notify service: a unix datagram socket in NOTIFY_SOCKET."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(10)

    def next(self) -> dict[str, str]:
        """The next datagram as its KEY=VALUE lines; times out after 10 s."""
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines())


@contextmanager
def notify_socket() -> Iterator[NotifySocket]:
    # A short path of its own: unix socket paths are limited to 107 bytes, pytest's tmp_path is long.
    with tempfile.TemporaryDirectory(prefix="sd-") as directory:
        sock = NotifySocket(os.path.join(directory, "notify"))
        try:
            yield sock
        finally:
            sock.sock.close()


def deny_write_execute() -> None:
    """MemoryDenyWriteExecute=yes as the kernel does it (systemd 253+ uses this prctl; older ones
    build the same rule from seccomp): no mapping may be, or become, both writable and executable.
    Runs in the child between fork and exec, and holds across exec."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE) failed: this kernel predates Linux 6.3")


async def mirror_one_request(port: int, extra_headers: str = "") -> None:
    """What HAProxy would send for one request, with the message fields of haproxy/mirror.spoe.conf."""
    peer = await TcpPeer.connect(("127.0.0.1", port))
    try:
        await peer.handshake()
        args = {
            "arg_method": "POST",
            "arg_path": "/under-mdwe?q=1",
            "arg_ver": "1.1",
            "arg_hdrs": f"host: example.com\r\ncontent-type: text/plain\r\n{extra_headers}\r\n",
            "arg_body": b"body bytes",
            "body_len": 10,
        }
        await peer.send(notify(1, 1, [Message("mirror", args)]))
        await peer.recv_frame()  # the ACK
    finally:
        peer.close()


def test_agent_keeps_the_notify_contract_under_memory_deny_write_execute(tmp_path: Path) -> None:
    """READY=1 once listening; RELOADING=1 (with MONOTONIC_USEC, which systemd 253+ requires) then
    READY=1 around SIGHUP; STOPPING=1 on SIGTERM; exit status 0. In between, a real mirror: the SPOP
    listener, httptools and the connection to the shadow all run under MemoryDenyWriteExecute."""
    port = free_port()
    with ShadowServer() as shadow, notify_socket() as notifications:
        config = tmp_path / "config.yaml"
        config.write_text(
            json.dumps(
                {
                    "listen": {"port": port},
                    "admin": {"port": free_port()},
                    "log": {"format": "json"},
                    "drain_timeout": 1,
                    "targets": [{"url": shadow.url}],
                }
            )
        )
        env = {**os.environ, "NOTIFY_SOCKET": notifications.path}
        with open(tmp_path / "agent.stderr", "wb") as stderr:
            agent = subprocess.Popen(
                [str(AGENT), "--config", str(config)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                preexec_fn=deny_write_execute,
            )
        try:
            ready = notifications.next()
            wait_for_port("127.0.0.1", port, process=agent)
            asyncio.run(mirror_one_request(port))
            [mirrored] = shadow.wait_for(1)

            agent.send_signal(signal.SIGHUP)
            reloading = notifications.next()
            ready_again = notifications.next()

            agent.send_signal(signal.SIGTERM)
            stopping = notifications.next()
            status = agent.wait(timeout=15)
        except BaseException as error:
            agent.kill()
            agent.wait()
            error.add_note((tmp_path / "agent.stderr").read_text(errors="replace")[-4000:])
            raise

    assert ready["READY"] == "1" and ready["STATUS"]
    assert mirrored.method == "POST" and mirrored.target == "/under-mdwe?q=1"
    assert mirrored.body == b"body bytes"
    assert reloading["RELOADING"] == "1"
    assert int(reloading["MONOTONIC_USEC"]) > 0
    assert ready_again == {"READY": "1"}
    assert stopping == {"STOPPING": "1"}
    assert status == 0, (tmp_path / "agent.stderr").read_text()


# --- watchdog, credentials, install -----------------------------------------------------------------

WATCHDOG_SECONDS = 2.0  # WATCHDOG_USEC given to the agent: it pings every second (half, capped at TICK)
BLOCK_SECONDS = 5.0  # how long SIGUSR1 blocks an event loop (tests/support/blockable_agent.py)


# Ends a test whose pings never come (or never resume); they come every second.
PING_HANG_S = 30.0


def pings_until(notifications: NotifySocket, done: Callable[[list[float]], bool]) -> list[float]:
    """Monotonic arrival times of the WATCHDOG=1 datagrams, collected until `done(times)`, or for
    PING_HANG_S at most (the caller's assertion then fails on what came)."""
    times: list[float] = []
    deadline = time.monotonic() + PING_HANG_S
    while not done(times) and (left := deadline - time.monotonic()) > 0:
        notifications.sock.settimeout(left)
        try:
            data = notifications.sock.recv(4096).decode()
        except TimeoutError:
            break
        if "WATCHDOG=1" in data.splitlines():
            times.append(time.monotonic())
    return times


@contextmanager
def blockable_agent(
    tmp_path: Path, notifications: NotifySocket, *args: str
) -> Iterator[subprocess.Popen[bytes]]:
    """The real agent (tests/support/blockable_agent.py) under a Type=notify + WatchdogSec=2s
    environment, once it said READY=1."""
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"listen": {"port": 0}, "admin": {"enabled": False}, "drain_timeout": 1}))
    env = {
        **os.environ,
        "NOTIFY_SOCKET": notifications.path,
        "WATCHDOG_USEC": str(int(WATCHDOG_SECONDS * 1e6)),
        "BLOCK_SECONDS": str(BLOCK_SECONDS),
    }
    argv = [sys.executable, "-m", "tests.support.blockable_agent", "--config", str(config)]
    argv += ["-u", "http://127.0.0.1:9", "--log-format", "json", *args]
    with open(tmp_path / "agent.stderr", "wb") as stderr:
        agent = subprocess.Popen(
            argv, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr
        )
    try:
        while "READY" not in notifications.next():
            pass
        yield agent
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=15) == 0
    except BaseException as error:
        error.add_note((tmp_path / "agent.stderr").read_text(errors="replace")[-4000:])
        raise
    finally:
        agent.kill()
        agent.wait()


def longest_gap(times: list[float], start: float, end: float) -> float:
    points = [start, *times, end]
    return max(later - earlier for earlier, later in itertools.pairwise(points))


def resumed_after(moment: float) -> Callable[[list[float]], bool]:
    return lambda times: bool(times) and times[-1] > moment


@pytest.mark.parametrize("usec", [60_000_000, 2_000_000, 1_000_000, 300_000])
def test_the_heartbeat_ticks_at_least_twice_per_watchdog_interval(
    usec: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The period of the pings the live tests below watch, without a clock: every tick is a ping,
    so a period of half the watchdog interval or less keeps systemd satisfied."""
    monkeypatch.setenv("WATCHDOG_USEC", str(usec))
    assert 0 < tick_interval() <= min(TICK, usec / 2_000_000)


def test_watchdog_pings_come_from_the_event_loop_and_stop_when_it_blocks(tmp_path: Path) -> None:
    """WATCHDOG=1 keeps coming while the loop runs (its period is tested above, without a clock);
    none while SIGUSR1 blocks the loop's thread for BLOCK_SECONDS (systemd would kill and restart
    the agent); pings again after. Only the order is checked: pings, none across the block (a gap
    longer than the watchdog interval, which the block forces whatever the machine's speed), pings
    after it; the healthy gap is printed."""
    with notify_socket() as notifications, blockable_agent(tmp_path, notifications) as agent:
        start = time.monotonic()
        healthy = pings_until(notifications, lambda times: len(times) >= 3)
        assert len(healthy) >= 3, f"{len(healthy)} pings in {PING_HANG_S} s"
        print(f"longest gap between healthy pings: {longest_gap(healthy, start, healthy[-1]):.2f} s")
        agent.send_signal(signal.SIGUSR1)
        blocked_at = time.monotonic()
        around_block = pings_until(notifications, resumed_after(blocked_at + BLOCK_SECONDS))
        gap = longest_gap(around_block, blocked_at, time.monotonic())
        print(
            f"longest gap between WATCHDOG=1 pings: {gap:.2f} s while the loop was blocked {BLOCK_SECONDS} s"
        )
        assert gap > WATCHDOG_SECONDS
        assert around_block and around_block[-1] > blocked_at + BLOCK_SECONDS, "pings did not resume"


def children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_supervisor_pings_only_while_every_worker_loop_runs(tmp_path: Path) -> None:
    """With two workers, the supervisor (systemd's main PID) sends WATCHDOG=1 for them; blocking one
    worker's loop stops the pings."""
    with notify_socket() as notifications, blockable_agent(tmp_path, notifications, "-n", "2") as agent:
        start = time.monotonic()
        healthy = pings_until(notifications, lambda times: len(times) >= 3)
        assert len(healthy) >= 3, f"{len(healthy)} supervisor pings in {PING_HANG_S} s"
        print(
            f"longest gap between healthy supervisor pings: {longest_gap(healthy, start, healthy[-1]):.2f} s"
        )
        workers = children(agent.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGUSR1)
        blocked_at = time.monotonic()
        around_block = pings_until(notifications, resumed_after(blocked_at + BLOCK_SECONDS))
        gap = longest_gap(around_block, blocked_at, time.monotonic())
        print(f"longest gap between supervisor pings: {gap:.2f} s, one worker blocked {BLOCK_SECONDS} s")
        assert gap > WATCHDOG_SECONDS + 0.5
        assert around_block and around_block[-1] > blocked_at + BLOCK_SECONDS, "pings did not resume"


def test_hmac_key_comes_from_the_credentials_directory(tmp_path: Path) -> None:
    """What systemd does for LoadCredential=hmac.key:...: a private directory in
    $CREDENTIALS_DIRECTORY holding the file, mode 0400. The agent's hmac redaction uses that key."""
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    key = b"a credential key of 32 bytes...."
    (credentials / HMAC_CREDENTIAL).write_bytes(key + b"\n")
    (credentials / HMAC_CREDENTIAL).chmod(0o400)
    port = free_port()
    with ShadowServer() as shadow:
        config = tmp_path / "config.yaml"
        config.write_text(
            json.dumps(
                {
                    "listen": {"port": port},
                    "admin": {"enabled": False},
                    "log": {"format": "json"},
                    "redact": {"headers": {"X-Customer": "hmac"}},
                    "targets": [{"url": shadow.url}],
                }
            )
        )
        env = {**os.environ, "CREDENTIALS_DIRECTORY": str(credentials)}
        with open(tmp_path / "agent.stderr", "wb") as stderr:
            agent = subprocess.Popen(
                [str(AGENT), "--config", str(config)], env=env, stdout=stderr, stderr=stderr
            )
        try:
            wait_for_port("127.0.0.1", port, process=agent)
            asyncio.run(mirror_one_request(port, "x-customer: alice@example.com\r\n"))
            [mirrored] = shadow.wait_for(1)
        finally:
            agent.terminate()
            agent.wait(timeout=15)
    expected = HMAC_PREFIX + hmac.digest(key, b"alice@example.com", "sha256").hex()[:32]
    assert mirrored.header("x-customer") == expected
    assert not log_events((tmp_path / "agent.stderr").read_text(), "config.error")


def install(root: Path, wheelhouse: Path) -> subprocess.CompletedProcess[str]:
    """deploy/systemd/install.sh into `root`, offline from `wheelhouse`."""
    script = ROOT / "deploy" / "systemd" / "install.sh"
    return subprocess.run(
        ["bash", str(script), "--root", str(root), "--wheels", str(wheelhouse)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHON": sys.executable},
    )


def test_install_script_creates_what_the_unit_names(tmp_path: Path, wheelhouse: Path) -> None:
    """deploy/systemd/install.sh into a scratch root, offline from the session's wheels: the venv
    and console script of ExecStart, the config ExecStart names (which passes check-config), the
    key LoadCredential= reads (0600, enough bytes), the README Documentation= points at, the unit."""
    root = tmp_path / "root"
    result = install(root, wheelhouse)
    assert result.returncode == 0, result.stdout + result.stderr
    settings = unit_settings((root / "etc/systemd/system/spoa-mirror.service").read_text())
    executable, *arguments = settings["Service.ExecStart"][0].split()
    assert (root / executable.lstrip("/")).is_file()
    config = root / arguments[arguments.index("--config") + 1].lstrip("/")
    checked = subprocess.run(
        [str(root / executable.lstrip("/")), "check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stderr
    [credential] = settings["Service.LoadCredential"]
    key_file = root / credential.split(":", 1)[1].lstrip("/")
    assert key_file.stat().st_mode & 0o777 == 0o600 and len(key_file.read_bytes().strip()) >= 16
    for documentation in settings["Unit.Documentation"]:
        if documentation.startswith("file://"):
            assert (root / documentation.removeprefix("file:///")).is_file(), documentation
    # Run again: an upgrade keeps the operator's config and key.
    config.write_text(config.read_text() + "# edited\n")
    key_before = key_file.read_bytes()
    again = install(root, wheelhouse)
    assert again.returncode == 0, again.stderr
    assert config.read_text().endswith("# edited\n") and key_file.read_bytes() == key_before

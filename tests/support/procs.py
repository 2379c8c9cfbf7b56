"""Real processes for integration tests: HAProxy, nginx and agents run as subprocesses.

Every helper is a context manager that owns its process from start to exit: it waits until the
process listens before handing it over, and on the way out it stops the process (SIGTERM, then
SIGKILL) and, if the test failed inside the block, attaches the tail of the process's stderr to the
exception as a note, so pytest prints what HAProxy or the agent said next to the failure.

Readiness is "accepts a TCP connection", never a sleep: a process that dies before it listens fails
the test at once with its output instead of waiting for a timeout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
LOCALHOST = "127.0.0.1"
STDERR_TAIL = 8000  # characters of a process's stderr attached to a failure
STOP_GRACE = 5.0

_BIND = re.compile(r"^\s*bind\s+(?:ipv4@)?([0-9.]+|\*)?:(\d+)\b", re.MULTILINE)
_STATS_SOCKET = re.compile(r"^\s*stats\s+socket\s+(\S+)", re.MULTILINE)


_ports_handed_out: set[int] = set()


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port that was free a moment ago (the kernel picks it; a small race is unavoidable),
    never the same one twice in a test run, so two ports asked for in a row cannot collide."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in _ports_handed_out:
            _ports_handed_out.add(port)
            return port


def wait_for_port(
    host: str, port: int, timeout: float = 10.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Return once `host:port` accepts a connection. Raises TimeoutError after `timeout` seconds,
    or RuntimeError as soon as `process` (the one expected to listen) has exited."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with status {process.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s") from None
            time.sleep(0.02)


@dataclass(frozen=True)
class HAProxyRelease:
    """One HAProxy branch the suite runs against: `branch` "2.6" or "3.2", and the binary that is it.

    Tests that start HAProxy run once per release (tests/conftest.py parametrises every test marked
    `haproxy`, with `haproxy-<branch>` in its id); the helpers here start `current_haproxy()`."""

    branch: str
    binary: str

    @property
    def test_id(self) -> str:
        return f"haproxy-{self.branch}"

    @property
    def at_least_3_1(self) -> bool:
        """The SPOE rewrite of 3.1: `mode spop` backends, no async or fragmentation, connection
        reuse across streams, resets instead of DISCONNECT frames."""
        return tuple(int(part) for part in self.branch.split(".")) >= (3, 1)

    @property
    def agents_mode(self) -> str:
        """The `mode` of the backend an SPOE agent uses: 3.1+ has its own, 2.x knows only tcp."""
        return "spop" if self.at_least_3_1 else "tcp"

    def version(self) -> tuple[int, int, int]:
        """What the binary says it is, e.g. (2, 6, 12). Raises FileNotFoundError when it is
        missing and RuntimeError when it is another branch: either way, run scripts/setup.sh."""
        return _binary_version(self.binary)

    def check(self) -> None:
        major, minor, _ = self.version()
        if f"{major}.{minor}" != self.branch:
            raise RuntimeError(f"{self.binary} is HAProxy {major}.{minor}, not {self.branch}")


@cache
def _binary_version(binary: str) -> tuple[int, int, int]:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, check=True, timeout=30).stdout
    match = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    if match is None:
        raise RuntimeError(f"cannot read the HAProxy version from {out!r}")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


# Debian 12's own package, and Debian sid's run from the tree scripts/haproxy-sid.sh caches.
HAPROXY_2_6 = HAProxyRelease("2.6", shutil.which("haproxy") or "/usr/sbin/haproxy")
HAPROXY_3_2 = HAProxyRelease(
    "3.2", os.environ.get("SPOA_MIRROR_HAPROXY_3_2", str(ROOT / "scripts" / "haproxy-sid"))
)
HAPROXY_RELEASES = (HAPROXY_2_6, HAPROXY_3_2)

_current_haproxy = [HAPROXY_2_6]


def current_haproxy() -> HAProxyRelease:
    """The release the running test is for (2.6 outside tests parametrised over releases)."""
    return _current_haproxy[-1]


@contextmanager
def using_haproxy(release: HAProxyRelease) -> Iterator[HAProxyRelease]:
    """Within the block, every HAProxy the helpers start or check is `release`."""
    _current_haproxy.append(release)
    try:
        yield release
    finally:
        _current_haproxy.pop()


class ManagedProcess:
    """A started subprocess whose stdout and stderr go to files, so they survive the process and
    can be read while it runs."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.stdout_path = log_dir / f"{name}.stdout"
        self.stderr_path = log_dir / f"{name}.stderr"
        with open(self.stdout_path, "wb") as stdout, open(self.stderr_path, "wb") as stderr:
            # A session of its own: a Ctrl-C in the terminal reaches pytest, which then stops the
            # process in order, and any child it forks can be killed with its group.
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                env=None if env is None else dict(env),
                cwd=cwd,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def stdout_text(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def assert_running(self) -> None:
        """Raise if the process has exited (inside its `run_*` block, its stderr gets attached)."""
        if not self.running:
            raise AssertionError(f"{self.name} exited with status {self.popen.returncode}")

    def wait_ready(self, ports: Iterable[int], host: str = LOCALHOST, timeout: float = 10.0) -> None:
        """Return once every port accepts connections; raise as soon as the process exits."""
        for port in ports:
            wait_for_port(host, port, timeout, self.popen)

    def stop(self, grace: float = STOP_GRACE, sig: int = signal.SIGTERM) -> int:
        """Signal the process, wait up to `grace` seconds, then SIGKILL it and whatever is left of
        its process group (HAProxy's workers in master-worker mode). Returns the exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        return self.popen.returncode

    def stderr_tail(self) -> str:
        text = self.stderr_text() if self.stderr_path.exists() else ""
        if len(text) > STDERR_TAIL:
            text = "...\n" + text[-STDERR_TAIL:]
        return f"--- {self.name} stderr ({self.stderr_path}) ---\n{text}--- end of {self.name} stderr ---"


def log_events(stderr_text: str, event: str) -> list[dict[str, Any]]:
    """An agent's JSON log lines named `event` (other lines, e.g. tracebacks, are skipped): what
    spoa-mirror with `--log-format json` and tests/support/echo_agent.py write to stderr."""
    found = []
    for line in stderr_text.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == event:
                found.append(record)
    return found


@contextmanager
def _owned(process: ManagedProcess) -> Iterator[None]:
    """Stop the process on the way out; on a failure, attach its stderr to the exception."""
    try:
        yield
    except BaseException as error:
        process.stop()
        error.add_note(process.stderr_tail())
        raise
    finally:
        process.stop()


@contextmanager
def run_process(
    argv: Sequence[str],
    *,
    ready_port: int | None = None,
    name: str | None = None,
    log_dir: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = 10.0,
) -> Iterator[ManagedProcess]:
    """Start `argv`, wait until it listens on `ready_port` (if given), yield it, stop it at exit.

    stdout and stderr go to `<log_dir>/<name>.stdout|.stderr` (a temporary directory, removed at
    exit, when `log_dir` is None)."""
    name = name or Path(argv[0]).name
    with tempfile.TemporaryDirectory(prefix="procs-") as scratch:
        process = ManagedProcess(name, argv, Path(log_dir or scratch), env=env, cwd=cwd)
        with _owned(process):
            if ready_port is not None:
                process.wait_ready([ready_port], timeout=timeout)
            yield process


class HAProxyProcess(ManagedProcess):
    """A running HAProxy. `cli()` talks to its CLI; `reload()` needs master-worker mode."""

    def __init__(self, config_path: Path, log_dir: Path, *, master_cli_port: int | None) -> None:
        self.config_path = config_path
        self.master_cli_port = master_cli_port
        self.release = current_haproxy()
        argv = [self.release.binary, "-db", "-f", str(config_path)]
        if master_cli_port is not None:
            argv[1:1] = ["-W", "-S", f"ipv4@{LOCALHOST}:{master_cli_port}"]
        super().__init__("haproxy", argv, log_dir)

    def cli(self, command: str, timeout: float = 5.0) -> str:
        """Run one CLI command and return its output. Uses the config's first `stats socket` (a unix
        path or `ipv4@host:port`); in master-worker mode without one, the master CLI, with the
        command routed to the current worker (`@1`)."""
        match = _STATS_SOCKET.search(self.config_path.read_text())
        if match is not None:
            return _cli_exchange(match.group(1), command, timeout)
        if self.master_cli_port is not None:
            return self.master_cli(f"@1 {command}", timeout)
        raise RuntimeError("the HAProxy config has no 'stats socket' and master-worker mode is off")

    def master_cli(self, command: str, timeout: float = 5.0) -> str:
        """One master CLI command (`@1 <command>` reaches the current worker). The master keeps the
        connection open after a command, hence the `quit`."""
        if self.master_cli_port is None:
            raise RuntimeError("start HAProxy with master_worker=True to use the master CLI")
        return _cli_exchange(f"ipv4@{LOCALHOST}:{self.master_cli_port}", f"{command};quit", timeout)

    def worker_pids(self) -> list[int]:
        """The current (not old) workers, from the master CLI's `show proc`."""
        pids = []
        for line in self.master_cli("show proc").splitlines():
            if line.startswith("#") and "old workers" in line:
                break
            fields = line.split()
            if len(fields) >= 2 and fields[0].isdigit() and fields[1] == "worker":
                pids.append(int(fields[0]))
        return pids

    def reload(self, config_text: str | None = None, timeout: float = 10.0) -> None:
        """Reload with SIGUSR2 to the master (master-worker mode), optionally with a new config
        (validated first), and return once a new worker has replaced the old one."""
        if config_text is not None:
            _check_haproxy_config(config_text, self.config_path)
        before = set(self.worker_pids())
        self.popen.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.assert_running()
            try:
                current = set(self.worker_pids())
            except OSError:
                current = before  # the master is re-executing itself
            if current and not current & before:
                return
            time.sleep(0.05)
        raise TimeoutError(f"HAProxy did not reload within {timeout} s")


def _cli_exchange(address: str, command: str, timeout: float) -> str:
    if address.startswith(("ipv4@", "tcp@")):
        host, _, port = address.split("@", 1)[1].rpartition(":")
        sock = socket.create_connection((host, int(port)), timeout=timeout)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(address.removeprefix("unix@"))
    with sock:
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def _check_haproxy_config(config_text: str, config_path: Path) -> None:
    """Write the config and have HAProxy validate it; fail the test with HAProxy's own words."""
    config_path.write_text(config_text)
    check = subprocess.run(
        [current_haproxy().binary, "-c", "-f", str(config_path)], capture_output=True, text=True, timeout=30
    )
    if check.returncode != 0:
        numbered = "\n".join(f"{n:4} {line}" for n, line in enumerate(config_text.splitlines(), 1))
        pytest.fail(
            f"invalid HAProxy config {config_path}:\n{check.stdout}{check.stderr}\n{numbered}",
            pytrace=False,
        )


def bind_ports(config_text: str) -> list[int]:
    """The ports of the `bind` lines of an HAProxy config: what to wait for before it is ready."""
    return [int(port) for _, port in _BIND.findall(config_text)]


@contextmanager
def run_haproxy(
    config_text: str,
    tmp_path: Path,
    *,
    ready_ports: Iterable[int] | None = None,
    master_worker: bool = False,
    extra_files: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> Iterator[HAProxyProcess]:
    """Validate and run HAProxy in the foreground (`-db`) on `config_text`.

    `extra_files` (name -> text) are written next to the config first, e.g. the SPOE config the
    `filter spoe ... config <file>` line names. HAProxy is ready once every port of `ready_ports`
    (default: every `bind` port of the config) accepts connections. `master_worker=True` adds
    `-W -S <master CLI>` so that `reload()` and `master_cli()` work."""
    for filename, text in (extra_files or {}).items():
        (tmp_path / filename).write_text(text)
    config_path = tmp_path / "haproxy.cfg"
    _check_haproxy_config(config_text, config_path)
    master_cli_port = free_port() if master_worker else None
    process = HAProxyProcess(config_path, tmp_path, master_cli_port=master_cli_port)
    ports = list(bind_ports(config_text) if ready_ports is None else ready_ports)
    if master_cli_port is not None:
        ports.append(master_cli_port)
    with _owned(process):
        process.wait_ready(ports, timeout=timeout)
        yield process


_NGINX_CONFIG = """\
{user}worker_processes {workers};
pid {root}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    default_type application/octet-stream;
    keepalive_timeout 60s;
    keepalive_requests 100000;
    client_max_body_size 64m;
    client_body_temp_path {root}/client_body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    server {{
        listen {host}:{port};
        root {root}/html;
{extra}
    }}
}}
"""


class NginxProcess(ManagedProcess):
    def __init__(self, argv: Sequence[str], log_dir: Path, url: str) -> None:
        super().__init__("nginx", argv, log_dir)
        self.url = url


@contextmanager
def run_nginx(
    tmp_path: Path,
    port: int,
    root_files: Mapping[str, str | bytes],
    *,
    server_directives: str = "",
    workers: int = 1,
    timeout: float = 10.0,
) -> Iterator[NginxProcess]:
    """Serve `root_files` (relative path -> content) on 127.0.0.1:`port` with nginx in the
    foreground; every path nginx writes (pid, logs, temp files) is under `tmp_path/nginx`.

    `server_directives` go inside the `server` block (e.g. `location /echo { return 200 "ok"; }`)."""
    root = tmp_path / "nginx"
    for relative, content in root_files.items():
        target = root / "html" / relative.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)
    (root / "html").mkdir(parents=True, exist_ok=True)
    # As root, nginx's workers would run as nobody and could not read a 0700 pytest tmp_path.
    user = "user root root;\n" if os.geteuid() == 0 else ""
    config_path = root / "nginx.conf"
    config_path.write_text(
        _NGINX_CONFIG.format(
            user=user, workers=workers, root=root, host=LOCALHOST, port=port, extra=server_directives
        )
    )
    base = [NGINX, "-p", str(root), "-e", "stderr", "-c", str(config_path)]
    check = subprocess.run([*base, "-t"], capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        pytest.fail(f"invalid nginx config {config_path}:\n{check.stderr}", pytrace=False)
    # stop() sends SIGTERM, nginx's fast shutdown.
    process = NginxProcess([*base, "-g", "daemon off;"], root, f"http://{LOCALHOST}:{port}")
    with _owned(process):
        process.wait_ready([port], timeout=timeout)
        yield process

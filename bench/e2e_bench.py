"""End to end on loopback: what mirroring 100% of the traffic costs the primary path, and whether the
agent delivers it all, keeps the primary fast when the shadow is down or hangs, and stays small.

Four scenarios, one after the other, each bounded in time; wrk drives GETs through HAProxy (Debian's
2.6, or `--haproxy scripts/haproxy-sid` for 3.2) to an nginx primary (`return 200`):

    baseline     HAProxy -> primary, no SPOE filter
    mirror       the same with `filter spoe` (on-frontend-http-request, pipelining + async,
                 timeout processing 100ms) -> spoa-mirror (one target, 100%) -> an nginx shadow
    shadow_down  the shadow's port refuses connections
    shadow_hang  the shadow accepts connections and never reads or answers (a thread here)
    json_mirror  like mirror, primary and shadow answering a 2 KB JSON document
    json_compare the same with the shadow compared: HAProxy sends each primary response (the shipped
                 config's wait-for-body + send-spoe-group), the agent reads the shadow's and pairs
                 them; agent CPU per request next to json_mirror's is what comparing costs

and, on request (`--scenarios`):

    ack_only        wrk through the SPOE filter to the minimal agent that only ACKs (below): the
                    most HAProxy serves with SPOE on and an agent doing no work on this engine
    c_agent         the mirror scenario through the C agent (`--c-agent PATH`, haproxytech/spoa-mirror,
                    run as `PATH -r0 -a 127.0.0.1 -p PORT -u URL`) instead of this one
    fixed_baseline  hey at a constant `--rate` (32 connections), no SPOE filter
    fixed_ack       the same through the SPOE filter to a minimal agent that only ACKs
                    (tests/support/echo_agent.py on the same engine): HAProxy's own SPOE round trip
    fixed_mirror    the same to this agent mirroring every request to the shadow
    fixed_sampled_out  the same with the target's sample_percentage 0: the agent takes every copy
                    in (decodes it, runs its checks) and sends none, so its own share of the
                    primary's added latency shows apart from the copies' traffic's

`--body-size N` sends N-byte POSTs instead of GETs (wrk with a Lua script, hey with -D).

Counting is exact: the primary and the shadow are nginx instances whose access log gets one line
per request; the agent's /metrics (requests received, outcomes, in flight) are read before and after
each measured run; HAProxy counts the requests whose SPOE processing failed (timeout, error) in a
stick table, keyed by its error code. The agent's CPU is utime+stime from /proc/<pid>/stat over the
run (drain included), its memory VmRSS from /proc/<pid>/status when wrk ends.

    .venv/bin/python bench/e2e_bench.py                  # 15 s each, 60 s for the two faults
    .venv/bin/python bench/e2e_bench.py --quick          # a few seconds each, for smoke
    .venv/bin/python bench/e2e_bench.py --scenarios mirror --profile     # py-spy the agent
    .venv/bin/python bench/e2e_bench.py --haproxy scripts/haproxy-sid --json bench/out/e2e-3.2.json
    .venv/bin/python bench/e2e_bench.py --rate 5000 \
        --scenarios fixed_baseline,fixed_ack,fixed_sampled_out,fixed_mirror
    .venv/bin/python bench/e2e_bench.py --scenarios baseline,c_agent,mirror --c-agent PATH --body-size 1024
    .venv/bin/python bench/e2e_bench.py --scenarios mirror --workers 2    # the agent with -n 2
    .venv/bin/python bench/e2e_bench.py --scenarios mirror --agent-pipeline-depth 1    # no pipelining
    .venv/bin/python bench/e2e_bench.py --scenarios mirror \
        --shadow-keepalive-requests 1000    # nginx's default: Connection: close every 1000

Prints the table and writes it to bench/out/e2e.md and bench/out/e2e.json (`--json PATH`: there,
and the table beside it with the suffix .md). HAProxy, both nginx, the
agent and wrk share the machine's cores and nothing is pinned, so requests/s are for this machine;
the setup is printed with the results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
AGENT = ROOT / ".venv" / "bin" / "spoa-mirror"
PY_SPY = ROOT / ".venv" / "bin" / "py-spy"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
HEY = shutil.which("hey") or "/usr/bin/hey"
HOST = "127.0.0.1"
TARGET = "shadow"  # the agent's one target
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# The targets on the 2-core machine.
MIN_RATIO = 0.40
MIN_DELIVERED = 0.999
MAX_CPU_US = 30.0
MAX_FAULT_SLOWDOWN = 0.10
MAX_RSS_MB = 200.0

# The agent's default queue (1024) holds ~50 ms of traffic at 20k req/s: a shadow stalled longer than
# that, as an nginx starved of CPU on a busy 2-core machine is, drops requests as queue_full. 8192
# holds ~400 ms, for ~2 MB of queued GETs.
QUEUE_SIZE = 8192

# HAProxy's SPOE error codes (var txn.mirror.error with `option set-on-error`); 0x100 + status for
# an AGENT-DISCONNECT status.
SPOE_ERRORS = {1: "timeout", 2: "resource", 3: "too_big", 4: "frag_not_supported", 5: "interrupted"}
# The response of the json_* scenarios: an API answer of about 2 KB.
JSON_BODY = json.dumps(
    {"items": [{"id": n, "name": f"item-{n}", "price": n * 1.25, "tags": ["a", "b"]} for n in range(30)]},
    separators=(",", ":"),
)

HAPROXY_CFG = """\
global
{nbthread}    stats socket {stats_socket} mode 600 level admin
defaults
    mode http
    timeout connect 1s
    timeout client 10s
    timeout server 10s
frontend web
    bind {host}:{web}
{mirror}    default_backend primary
backend primary
    server primary {host}:{primary}
backend spoe-mirror
    mode {agents_mode}
    timeout connect 1s
    timeout server 30s
    server agent {host}:{spop} check
    option spop-check
backend spoe_errors
    stick-table type integer size 64 store http_req_cnt
"""

MIRROR_FRONTEND = """\
    option http-buffer-request
    filter spoe engine mirror config {workdir}/mirror.spoe.conf
    http-request track-sc0 var(txn.mirror.error) table spoe_errors if {{ var(txn.mirror.error) -m found }}
"""

SPOE_CONF = """\
[mirror]
spoe-agent mirror_agent
    messages mirror
    use-backend spoe-mirror
    option var-prefix mirror
    option set-on-error error
    timeout hello 2s
    timeout idle 30s
    timeout processing 100ms
    option async
    option pipelining
spoe-message mirror
    args arg_method=method arg_path=url arg_ver=req.ver arg_hdrs=req.hdrs arg_body=req.body
    event on-frontend-http-request
"""

# json_compare: the request carries the unique-id, and the primary's response goes back as a group,
# as in the shipped haproxy/ files.
COMPARE_FRONTEND = """\
    unique-id-format %{{+X}}o\\ %ci:%cp_%fi:%fp_%Ts_%rt:%pid
    http-response wait-for-body time 200ms if {{ var(txn.mirror.compare) -m bool }}
    http-response send-spoe-group mirror mirror-response if {{ var(txn.mirror.compare) -m bool }}
"""
SPOE_COMPARE = (
    SPOE_CONF.replace("    messages mirror\n", "    messages mirror\n    groups mirror-response\n").replace(
        "arg_body=req.body\n", "arg_body=req.body unique_id=unique-id\n"
    )
    + """\
spoe-message mirror-response
    args unique_id=unique-id status=status hdrs=res.hdrs body=res.body body_len=res.body_size
spoe-group mirror-response
    messages mirror-response
"""
)

AGENT_CFG = """\
listen: {{address: {host}, port: {spop}}}
admin: {{address: {host}, port: {admin}}}
log: {{format: json, level: info}}
targets:
  - name: {target}
    url: {url}
    concurrency: {concurrency}
    queue_size: {queue_size}
    pipeline_depth: {pipeline_depth}
    sample_percentage: {sample_percentage}
"""

NGINX_CFG = """\
{user}
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    log_format status '$status';
    access_log {dir}/access.log status buffer=64k flush=100ms;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests {keepalive_requests};
    keepalive_timeout 60s;
    server {{
        listen {host}:{port};
        location / {{ {answer} }}
    }}
}}
"""


# -- processes ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, timeout: float = 10.0) -> None:
    """Readiness is "accepts a connection"; a process that exits first fails at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with {process.returncode} before listening on {port}")
        try:
            socket.create_connection((HOST, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise SystemExit(f"{what} does not listen on {port} after {timeout}s")


def stop(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, as a service manager stops it (the agent drains for up to 5 s), then SIGKILL."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@contextlib.contextmanager
def started(
    cmd: list[str], log: Path, port: int, what: str, cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as stderr:
        process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, cwd=cwd)
    try:
        wait_for_port(port, process, what)
        yield process
    finally:
        stop(process)


class Nginx:
    """An nginx answering 200 to everything, logging one line (the status) per request."""

    def __init__(
        self, workdir: Path, name: str, json_body: str | None = None, keepalive_requests: int = 10_000_000
    ) -> None:
        self.dir = workdir / name
        self.dir.mkdir()
        self.port = free_port()
        self.log = self.dir / "access.log"
        self.log.touch()
        self._offset = 0
        self.statuses: Counter[str] = Counter()
        self.pid = 0
        user = "user root;" if os.geteuid() == 0 else ""
        (self.dir / "nginx.conf").write_text(
            NGINX_CFG.format(
                user=user,
                dir=self.dir,
                host=HOST,
                port=self.port,
                keepalive_requests=keepalive_requests,
                answer='return 200 "ok\\n";'
                if json_body is None
                else f"default_type application/json; return 200 '{json_body}';",
            )
        )

    @contextlib.contextmanager
    def running(self) -> Iterator[Nginx]:
        cmd = [NGINX, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"), "-g", "daemon off;"]
        with started(cmd, self.dir / "stderr.log", self.port, f"nginx {self.dir.name}") as process:
            self.pid = process.pid
            yield self

    def count(self) -> int:
        """Requests logged so far (the log is flushed every 100 ms)."""
        with open(self.log, "rb") as log:
            log.seek(self._offset)
            data = log.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        self.statuses.update(complete.decode().split())
        return self.statuses.total()


class BlackHole:
    """A shadow that accepts connections and never reads or answers: every request to it can only
    time out. Accepted sockets are held open until `close`."""

    def __init__(self) -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        self._listener = socket.create_server((HOST, 0), backlog=4096)
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self.held: list[socket.socket] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._accept, name="black-hole", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self._stopping = True
        self._thread.join()
        self._listener.close()
        for conn in self.held:
            conn.close()


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A port that is bound but never listens, so connecting to it is refused (RST) while we hold it."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        yield sock.getsockname()[1]


# -- measurements ----------------------------------------------------------------------------------


@dataclass
class Wrk:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    socket_errors: str
    non_2xx: int


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(value: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)([a-z]+)", value).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS_MS[unit]


def run_wrk(port: int, seconds: float, threads: int, connections: int, script: Path | None = None) -> Wrk:
    cmd = [WRK, f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency", f"http://{HOST}:{port}/"]
    if script is not None:
        cmd += ["-s", str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    try:
        total = re.search(r"(\d+) requests in ([0-9.]+)(\w+),", out)
        errors = re.search(r"Socket errors: (.*)", out)
        non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        return Wrk(
            requests=int(total[1]),  # type: ignore[index]
            seconds=_ms(total[2] + total[3]) / 1000,  # type: ignore[index]
            rps=float(re.search(r"Requests/sec:\s+([0-9.]+)", out)[1]),  # type: ignore[index]
            p50_ms=_ms(re.search(r"^\s+50%\s+(\S+)$", out, re.M)[1]),  # type: ignore[index]
            p99_ms=_ms(re.search(r"^\s+99%\s+(\S+)$", out, re.M)[1]),  # type: ignore[index]
            socket_errors=errors[1] if errors else "",
            non_2xx=int(non_2xx[1]) if non_2xx else 0,
        )
    except (TypeError, KeyError, AttributeError):
        raise SystemExit(f"cannot parse wrk's output:\n{out}") from None


def run_hey(port: int, seconds: float, rate: float, connections: int, body: Path | None = None) -> Wrk:
    """hey at a constant `rate` requests/s in all (its -q is per connection), as a `Wrk` record."""
    cmd = [HEY, "-z", f"{seconds:g}s", "-c", str(connections), "-q", f"{rate / connections:g}"]
    if body is not None:
        cmd += ["-m", "POST", "-T", "application/octet-stream", "-D", str(body)]
    out = subprocess.run([*cmd, f"http://{HOST}:{port}/"], capture_output=True, text=True, check=True).stdout
    try:
        statuses = {int(m[1]): int(m[2]) for m in re.finditer(r"\[(\d+)\]\s+(\d+) responses", out)}
        errors = re.search(r"Error distribution:\n((?:\s+\[\d+\].*\n?)+)", out)
        return Wrk(
            requests=sum(statuses.values()),
            seconds=float(re.search(r"Total:\s+([0-9.]+) secs", out)[1]),  # type: ignore[index]
            rps=float(re.search(r"Requests/sec:\s+([0-9.]+)", out)[1]),  # type: ignore[index]
            p50_ms=float(re.search(r"50%+ in ([0-9.]+) secs", out)[1]) * 1000,  # type: ignore[index]
            p99_ms=float(re.search(r"99%+ in ([0-9.]+) secs", out)[1]) * 1000,  # type: ignore[index]
            socket_errors=" ".join(errors[1].split()) if errors else "",
            non_2xx=sum(n for status, n in statuses.items() if not 200 <= status < 400),
        )
    except (TypeError, KeyError, AttributeError):
        raise SystemExit(f"cannot parse hey's output:\n{out}") from None


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and its children (nginx's worker)."""
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return cpu_seconds(pid) + sum(tree_cpu_seconds(int(child)) for child in children.read().split())


def machine_seconds() -> dict[str, float]:
    """CPU time of all cores from /proc/stat: in processes (user, nice, system), in interrupts
    (loopback TCP is mostly softirq work, often not charged to any process), and stolen by the
    hypervisor."""
    with open("/proc/stat") as stat:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (
            int(v) / CLOCK_TICKS for v in stat.readline().split()[1:9]
        )
    return {"processes": user + nice + system, "irq": irq + softirq, "steal": steal}


class CpuMeter:
    """Who used the machine's CPU during a run: each process of the stack, wrk, and everything else
    (other work on the box makes req/s meaningless, so it is reported next to them)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._started = time.monotonic()
        self._start = self._sample()
        self.seconds = 0.0  # the window, once stopped

    def _sample(self) -> dict[str, float]:
        sample = {name: tree_cpu_seconds(pid) for name, pid in self.pids.items()}
        children = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk, once waited for
        own = resource.getrusage(resource.RUSAGE_SELF)
        sample["wrk"] = children.ru_utime + children.ru_stime
        sample["bench"] = own.ru_utime + own.ru_stime
        sample.update(machine_seconds())
        return sample

    def stop(self) -> dict[str, float]:
        """CPU seconds by process of the stack, then "other" (processes not ours), "irq", "steal"."""
        end = self._sample()
        self.seconds = time.monotonic() - self._started
        used = {name: end[name] - self._start[name] for name in end}
        processes = used.pop("processes")
        ours = sum(v for k, v in used.items() if k not in ("irq", "steal"))
        used["other"] = max(0.0, processes - ours)
        return used


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB: now and at the peak."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


@dataclass
class Account:
    """The agent's view of the one target, from /metrics."""

    received: int
    in_flight: int
    outcomes: dict[str, int]
    notifies: int

    def __sub__(self, before: Account) -> Account:
        return Account(
            received=self.received - before.received,
            in_flight=self.in_flight,
            outcomes={
                k: v - before.outcomes.get(k, 0)
                for k, v in self.outcomes.items()
                if v - before.outcomes.get(k, 0)
            },
            notifies=self.notifies - before.notifies,
        )


def agent_account(admin: int) -> Account:
    with urllib.request.urlopen(f"http://{HOST}:{admin}/metrics", timeout=5) as response:
        text = response.read().decode()
    received = in_flight = notifies = 0
    outcomes: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "spoa_mirror_requests_received_total" and labels["target"] == TARGET:
                received += int(sample.value)  # summed: with -n N, one sample per worker
            elif sample.name == "spoa_mirror_requests_total" and labels["target"] == TARGET:
                outcomes[labels["outcome"]] = outcomes.get(labels["outcome"], 0) + int(sample.value)
            elif sample.name == "spoa_mirror_in_flight" and labels["target"] == TARGET:
                in_flight += int(sample.value)
            elif sample.name == "spoa_mirror_spop_frames_total" and labels["type"] == "notify":
                notifies += int(sample.value)
    return Account(received, in_flight, outcomes, notifies)


def compared_outcomes(admin: int) -> tuple[dict[str, int], int]:
    """(comparison outcomes, pending) of the one target, cumulative."""
    with urllib.request.urlopen(f"http://{HOST}:{admin}/metrics", timeout=5) as response:
        text = response.read().decode()
    outcomes: dict[str, int] = {}
    pending = 0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("target") != TARGET:
                continue
            if sample.name == "spoa_mirror_compare_comparisons_total" and sample.value:
                outcome = sample.labels["outcome"]  # summed over the endpoints
                outcomes[outcome] = outcomes.get(outcome, 0) + int(sample.value)
            elif sample.name == "spoa_mirror_compare_pending":
                pending = int(sample.value)
    return outcomes, pending


def haproxy_command(stats_socket: Path, command: str) -> str:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(stats_socket))
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def spoe_errors(stats_socket: Path) -> Counter[str]:
    """Requests whose SPOE processing failed, by HAProxy's error code (cumulative)."""
    errors: Counter[str] = Counter()
    for key, count in re.findall(
        r"key=(\d+) .*?http_req_cnt=(\d+)", haproxy_command(stats_socket, "show table spoe_errors")
    ):
        code = int(key)
        name = SPOE_ERRORS.get(code, f"agent_status_{code - 0x100}" if code >= 0x100 else f"code_{code}")
        errors[name] += int(count)
    return errors


# -- scenarios ---------------------------------------------------------------------------------------

SCENARIOS = (
    "baseline",
    "mirror",
    "shadow_down",
    "shadow_hang",
    "ack_only",
    "c_agent",
    "fixed_baseline",
    "fixed_ack",
    "fixed_mirror",
    "fixed_sampled_out",
    "json_mirror",
    "json_compare",
)
# Scenarios whose copies reach no shadow that answers (or are never sent).
NOTHING_DELIVERED = ("shadow_down", "shadow_hang", "fixed_sampled_out")
DEFAULT_SCENARIOS = ("baseline", "mirror", "shadow_down", "shadow_hang", "json_mirror", "json_compare")


@dataclass
class Result:
    scenario: str
    seconds: float
    wrk: Wrk
    primary_served: int
    primary_statuses: dict[str, int]
    mirrored: int | None = None  # requests the agent was offered for its target
    notifies: int | None = None
    shadow_received: int | None = None
    delivered: float | None = None  # shadow_received / primary_served
    outcomes: dict[str, int] = field(default_factory=dict)
    in_flight_at_end: int | None = None
    spoe_errors: dict[str, int] = field(default_factory=dict)
    agent_cpu_s: float | None = None
    agent_cpu_us_per_mirrored: float | None = None
    agent_rss_mb: float | None = None
    agent_peak_rss_mb: float | None = None
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # by process, "other": not the stack
    cpu_window_s: float = 0.0  # the run and the drain after it
    comparisons: dict[str, int] = field(default_factory=dict)  # json_compare: outcomes, warm-up included
    profile: str | None = None


def settle(counters: list[Nginx], quiet: float = 0.5, timeout: float = 15.0) -> None:
    """Until no log has grown for `quiet` seconds: the agent's queue is drained and nginx flushed."""
    last = [c.count() for c in counters]
    calm_since = time.monotonic()
    deadline = calm_since + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = [c.count() for c in counters]
        if now != last:
            last, calm_since = now, time.monotonic()
        elif time.monotonic() - calm_since >= quiet:
            return


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.primary = Nginx(workdir, "primary")
        self.shadow = Nginx(workdir, "shadow", keepalive_requests=args.shadow_keepalive_requests)
        self.json_primary = Nginx(workdir, "json-primary", JSON_BODY)
        self.json_shadow = Nginx(workdir, "json-shadow", JSON_BODY)
        self.haproxy_threads = 0
        self.body: Path | None = None  # --body-size: the POST body for hey, and wrk's Lua script
        self.script: Path | None = None
        if args.body_size:
            self.body = workdir / "body.bin"
            self.body.write_bytes(b"x" * args.body_size)
            self.script = workdir / "post.lua"
            self.script.write_text(
                f'wrk.method = "POST"\nwrk.body = string.rep("x", {args.body_size})\n'
                'wrk.headers["Content-Type"] = "application/octet-stream"\n'
            )

    def run(self, name: str, seconds: float) -> Result:
        shadow = f"http://{HOST}:{self.shadow.port}/"
        if name in ("baseline", "fixed_baseline"):
            return self._run(name, seconds, shadow_url=None)
        if name in ("mirror", "fixed_mirror", "fixed_sampled_out"):
            return self._run(name, seconds, shadow_url=shadow)
        if name == "c_agent":
            return self._run(name, seconds, shadow_url=shadow, agent_kind="c")
        if name in ("ack_only", "fixed_ack"):
            return self._run(name, seconds, shadow_url=None, agent_kind="ack")
        if name in ("json_mirror", "json_compare"):
            url = f"http://{HOST}:{self.json_shadow.port}/"
            return self._run(
                name, seconds, url, primary=self.json_primary, shadow=self.json_shadow,
                compare=name == "json_compare",
            )  # fmt: skip
        if name == "shadow_down":
            with refusing_port() as port:
                return self._run(name, seconds, shadow_url=f"http://{HOST}:{port}/")
        hole = BlackHole()
        try:
            return self._run(name, seconds, shadow_url=f"http://{HOST}:{hole.port}/")
        finally:
            hole.close()

    def load(self, port: int, seconds: float, fixed: bool) -> Wrk:
        """wrk as fast as it goes, or hey at the constant `--rate`; GETs, or POSTs of `--body-size`."""
        args = self.args
        if fixed:
            return run_hey(port, seconds, args.rate, args.connections, self.body)
        return run_wrk(port, seconds, args.threads, args.connections, self.script)

    def _agent_command(
        self, kind: str, name: str, shadow_url: str | None, ports: dict[str, int], compare: bool = False
    ) -> list[str]:
        """This agent (its config written here), the C agent, or the minimal agent that only ACKs."""
        args = self.args
        if kind == "c":
            return [args.c_agent, "-r0", "-a", HOST, "-p", str(ports["spop"]), "-u", str(shadow_url)]
        if kind == "ack":
            return [agent_python(args.agent), "-m", "tests.support.echo_agent", "--port", str(ports["spop"])]
        (self.workdir / f"agent-{name}.yaml").write_text(
            AGENT_CFG.format(
                host=HOST,
                target=TARGET,
                url=shadow_url,
                concurrency=args.agent_concurrency,
                queue_size=args.agent_queue_size,
                pipeline_depth=args.agent_pipeline_depth,
                sample_percentage=0 if name == "fixed_sampled_out" else args.agent_sample_percentage,
                **ports,
            )
            + (f"compare: {{candidates: [{TARGET}]}}\n" if compare else "")
        )
        workers = ["-n", str(args.workers)] if args.workers > 1 else []
        return [args.agent, "--config", str(self.workdir / f"agent-{name}.yaml"), *workers]

    def _run(
        self,
        name: str,
        seconds: float,
        shadow_url: str | None,
        agent_kind: str = "ours",
        primary: Nginx | None = None,
        shadow: Nginx | None = None,
        compare: bool = False,
    ) -> Result:
        args, workdir = self.args, self.workdir
        primary, shadow = primary or self.primary, shadow or self.shadow
        ports = {"web": free_port(), "spop": free_port(), "admin": free_port()}
        mirror = shadow_url is not None or agent_kind == "ack"  # the SPOE filter is on
        fixed = name.startswith("fixed_")
        # One stats socket per scenario: the previous scenario's HAProxy, still exiting, removes its
        # socket's path on the way out, which was the next one's when they shared it.
        stats_socket = workdir / f"haproxy-{name}.sock"
        (workdir / "mirror.spoe.conf").write_text(SPOE_COMPARE if compare else SPOE_CONF)
        frontend = MIRROR_FRONTEND.format(workdir=workdir) + (COMPARE_FRONTEND.format() if compare else "")
        (workdir / f"haproxy-{name}.cfg").write_text(
            HAPROXY_CFG.format(
                nbthread=f"    nbthread {args.haproxy_threads}\n" if args.haproxy_threads else "",
                workdir=workdir,
                host=HOST,
                primary=primary.port,
                mirror=frontend if mirror else "",
                agents_mode=agents_mode(args.haproxy),
                stats_socket=stats_socket,
                **ports,
            )
        )
        with contextlib.ExitStack() as stack:
            agent = None
            if mirror:
                agent_cmd = self._agent_command(agent_kind, name, shadow_url, ports, compare)
                # Before HAProxy, whose first health check would otherwise fail.
                agent = stack.enter_context(
                    started(agent_cmd, workdir / f"agent-{name}.log", ports["spop"], "agent", cwd=ROOT)
                )
            haproxy_cmd = [args.haproxy, "-db", "-f", str(workdir / f"haproxy-{name}.cfg")]
            haproxy = stack.enter_context(
                started(haproxy_cmd, workdir / f"haproxy-{name}.log", ports["web"], "haproxy")
            )
            info = re.search(r"Nbthread: (\d+)", haproxy_command(stats_socket, "show info"))
            self.haproxy_threads = int(info[1]) if info else 0

            self.load(ports["web"], args.warmup, fixed)  # SPOP connections, caches
            logs = [primary, shadow]
            settle(logs)
            primary_before, shadow_before = primary.count(), shadow.count()
            primary_statuses_before = Counter(primary.statuses)
            errors_before = spoe_errors(stats_socket)
            ours = agent is not None and agent_kind == "ours"
            account_before = agent_account(ports["admin"]) if ours else None
            pids = {"haproxy": haproxy.pid, "primary": primary.pid, "shadow": shadow.pid}
            if agent:
                pids["agent"] = agent.pid
            meter = CpuMeter(pids)

            profiler = self._profile(agent.pid, name, seconds) if agent and args.profile else None
            wrk = self.load(ports["web"], seconds, fixed)
            rss = memory_mb(agent.pid) if agent else None
            # Delivered is counted where copies go to a shadow that answers them.
            delivering = shadow_url is not None and name not in NOTHING_DELIVERED
            settle(logs if delivering else [primary])  # faults: only the primary's log flush
            if compare:  # and every comparison settled
                deadline = time.monotonic() + 15
                while compared_outcomes(ports["admin"])[1] and time.monotonic() < deadline:
                    time.sleep(0.1)
            cpu = meter.stop()
            account = agent_account(ports["admin"]) - account_before if ours and account_before else None
            comparisons = compared_outcomes(ports["admin"])[0] if compare else {}
            primary_served = primary.count() - primary_before
            shadow_received = shadow.count() - shadow_before
            errors = spoe_errors(stats_socket) - errors_before
            if profiler is not None:
                profiler.wait()

        result = Result(
            scenario=name,
            seconds=seconds,
            wrk=wrk,
            primary_served=primary_served,
            primary_statuses=dict(primary.statuses - primary_statuses_before),
            comparisons=comparisons,
            spoe_errors=dict(errors),
            cpu_seconds=cpu,
            cpu_window_s=meter.seconds,
        )
        if account is not None and rss is not None:
            agent_cpu = cpu["agent"]
            result.mirrored = account.received
            result.notifies = account.notifies
            result.outcomes = account.outcomes
            result.in_flight_at_end = account.in_flight
            result.agent_cpu_s = agent_cpu
            result.agent_cpu_us_per_mirrored = (
                agent_cpu / account.received * 1e6 if account.received else None
            )
            result.agent_rss_mb, result.agent_peak_rss_mb = rss
            if delivering:
                result.shadow_received = shadow_received
                result.delivered = shadow_received / primary_served if primary_served else None
        elif agent is not None:  # the C agent or the ACK-only one: no account, every request offered
            result.agent_cpu_s = cpu["agent"]
            result.agent_cpu_us_per_mirrored = cpu["agent"] / primary_served * 1e6 if primary_served else None
            if rss is not None:
                result.agent_rss_mb, result.agent_peak_rss_mb = rss
            if delivering:
                result.shadow_received = shadow_received
                result.delivered = shadow_received / primary_served if primary_served else None
        if profiler is not None:
            result.profile = str(OUT / f"e2e-{name}-profile.txt")
        return result

    def _profile(self, pid: int, name: str, seconds: float) -> subprocess.Popen[bytes]:
        """py-spy samples the agent without stopping it (--nonblocking); its own CPU is taken from the
        same two cores, so the figures of a profiled run are a little low."""
        OUT.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(PY_SPY),
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            "--rate",
            "250",
            "--nonblocking",
            "--format",
            "raw",
            "--output",
            str(OUT / f"e2e-{name}-profile.txt"),
        ]
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# -- report --------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: dict[str, Result]) -> list[list[str]]:
    base = results.get("baseline")
    healthy = results.get("mirror")
    rows = [
        [
            "scenario",
            "s",
            "req/s",
            "vs baseline",
            "vs mirror",
            "p50 ms",
            "p99 ms",
            "primary served",
            "agent offered",
            "shadow got",
            "delivered",
            "agent CPU us/req",
            "agent CPU %",
            "agent RSS MB",
            "other load %",
        ]
    ]
    for name, r in results.items():
        rows.append(
            [
                name,
                f"{r.seconds:g}",
                f"{r.wrk.rps:,.0f}",
                _fmt(r.wrk.rps / base.wrk.rps if base else None, ".3f"),
                _fmt(r.wrk.rps / healthy.wrk.rps if healthy and name.startswith("shadow_") else None, ".3f"),
                f"{r.wrk.p50_ms:.2f}",
                f"{r.wrk.p99_ms:.2f}",
                f"{r.primary_served:,}",
                _fmt(r.mirrored, ","),
                _fmt(r.shadow_received, ","),
                _fmt(r.delivered, ".5f"),
                _fmt(r.agent_cpu_us_per_mirrored, ".1f"),
                _fmt(r.agent_cpu_s / r.cpu_window_s * 100 if r.agent_cpu_s is not None else None, ".0f"),
                _fmt(r.agent_rss_mb, ".1f"),
                f"{r.cpu_seconds['other'] / r.cpu_window_s * 100:.0f}",
            ]
        )
    return rows


def checks(results: dict[str, Result]) -> list[tuple[str, bool | None, str]]:
    """(target, met or None when not measured, the measured value)."""
    base, mirror = results.get("baseline"), results.get("mirror")
    out: list[tuple[str, bool | None, str]] = []
    if base and mirror:
        ratio = mirror.wrk.rps / base.wrk.rps
        out.append((f"mirror/baseline >= {MIN_RATIO}", ratio >= MIN_RATIO, f"{ratio:.3f}"))
    if mirror and mirror.delivered is not None:
        out.append(
            (f"delivered >= {MIN_DELIVERED}", mirror.delivered >= MIN_DELIVERED, f"{mirror.delivered:.5f}")
        )
    if mirror and mirror.agent_cpu_us_per_mirrored is not None:
        cpu = mirror.agent_cpu_us_per_mirrored
        out.append((f"agent CPU <= {MAX_CPU_US:g} us per mirrored request", cpu <= MAX_CPU_US, f"{cpu:.1f}"))
    fixed, ack = results.get("fixed_mirror"), results.get("fixed_ack")
    if fixed and ack:
        added = fixed.wrk.p99_ms - ack.wrk.p99_ms
        out.append(
            ("fixed rate: p99 within 0.3 ms of the ACK-only agent's", added <= 0.3, f"{added:+.2f} ms")
        )
    if fixed and fixed.agent_cpu_us_per_mirrored is not None:
        cpu = fixed.agent_cpu_us_per_mirrored
        out.append(("fixed rate: agent CPU <= 30 us per mirrored request", cpu <= 30, f"{cpu:.1f}"))
    c_agent = results.get("c_agent")
    if c_agent and mirror:
        ratio = mirror.wrk.rps / c_agent.wrk.rps
        out.append(("mirror req/s >= 2x the C agent's", ratio >= 2, f"{ratio:.2f}x"))
    for name in ("shadow_down", "shadow_hang"):
        r = results.get(name)
        if r is None:
            continue
        if mirror:
            ratio = r.wrk.rps / mirror.wrk.rps
            out.append(
                (
                    f"{name}: req/s within {MAX_FAULT_SLOWDOWN:.0%} of mirror",
                    ratio >= 1 - MAX_FAULT_SLOWDOWN,
                    f"{ratio:.3f}",
                )
            )
        if r.agent_rss_mb is not None:
            out.append(
                (
                    f"{name}: agent RSS < {MAX_RSS_MB:g} MB after {r.seconds:g} s",
                    r.agent_rss_mb < MAX_RSS_MB,
                    f"{r.agent_rss_mb:.1f} MB",
                )
            )
    return out


def details(results: dict[str, Result]) -> list[str]:
    lines = []
    for name, r in results.items():
        parts = [f"wrk {r.wrk.requests:,} requests in {r.wrk.seconds:.2f}s"]
        if r.wrk.socket_errors:
            parts.append(f"socket errors: {r.wrk.socket_errors}")
        if r.wrk.non_2xx:
            parts.append(f"non-2xx: {r.wrk.non_2xx}")
        if set(r.primary_statuses) - {"200"}:
            parts.append(f"primary statuses {r.primary_statuses}")
        if r.mirrored is not None:
            parts.append(f"NOTIFYs {r.notifies:,}")
            parts.append(
                "outcomes " + (", ".join(f"{k}={v:,}" for k, v in sorted(r.outcomes.items())) or "none")
            )
            parts.append(f"in flight at the end {r.in_flight_at_end}")
            parts.append(f"agent CPU {r.agent_cpu_s:.2f}s, peak RSS {r.agent_peak_rss_mb:.1f} MB")
        if r.comparisons:
            outcomes = ", ".join(f"{k}={v:,}" for k, v in sorted(r.comparisons.items()))
            parts.append(f"comparisons, warm-up included: {outcomes}")
        if r.spoe_errors:
            parts.append(
                "HAProxy SPOE errors " + ", ".join(f"{k}={v:,}" for k, v in sorted(r.spoe_errors.items()))
            )
        elif r.mirrored is not None:
            parts.append("HAProxy SPOE errors: none")
        # Per request served, so runs compare: HAProxy's own figure shows how fast the machine was.
        served = max(r.primary_served, 1)
        parts.append(
            f"CPU us per request over {r.cpu_window_s:.1f}s: "
            + ", ".join(f"{k} {v / served * 1e6:.1f}" for k, v in r.cpu_seconds.items() if k != "bench")
        )
        if r.profile:
            parts.append(f"profile {r.profile}")
        lines.append(f"{name}: " + "; ".join(parts))
    return lines


def agent_python(agent: str) -> str:
    """The interpreter of an agent's virtualenv (the python beside its executable)."""
    python = Path(agent).parent / "python"
    return str(python) if python.exists() else sys.executable


def interpreter(python: str) -> str:
    """Which CPython runs the agent, and how it was built: the same code costs 5-15% more CPU under
    a CPython built without profile-guided optimisation (pyenv's default) than under Debian's python3
    or python:3.11-slim (docs/performance.md has the runs)."""
    probe = (
        "import platform, sys, sysconfig; "
        "print(platform.python_version(), sys.base_prefix, sysconfig.get_config_var('CONFIG_ARGS') or '')"
    )
    version, prefix, config_args = subprocess.run(
        [python, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split(" ", 2)
    if "--enable-optimizations" in config_args:
        build = "built with --enable-optimizations"
    elif prefix == "/usr":  # Debian's and the other distributions' own builds: profile-guided
        build = "the distribution's build"
    else:
        build = "built without --enable-optimizations"
    return f"CPython {version} from {prefix}, {build}"


def setup_lines(args: argparse.Namespace, bench: Bench) -> list[str]:
    cpus = os.cpu_count()
    request = f"POST / with {args.body_size:,} bytes" if args.body_size else "GET /"
    return [
        f"command: .venv/bin/python {shlex.join(['bench/e2e_bench.py', *sys.argv[1:]])}",
        f"machine: {cpus} CPUs, {platform.platform()}; nothing pinned",
        f"agent: {args.agent}, {interpreter(agent_python(args.agent))}",
        f"wrk -t{args.threads} -c{args.connections} --latency, {request}, {args.warmup:g}s warm-up each",
        f"fixed_*: hey -c {args.connections} at {args.rate:g} req/s in all, {request}",
        f"c_agent: {args.c_agent} -r0 (its defaults otherwise)" if args.c_agent else "c_agent: not run",
        f"HAProxy {_version([args.haproxy, '-v'])} nbthread {bench.haproxy_threads}; "
        f"nginx primary and shadow (1 worker each, return 200); agent: "
        + (f"-n {args.workers} worker processes" if args.workers > 1 else "1 process")
        + ", uvloop",
        "SPOE: on-frontend-http-request, pipelining + async, timeout processing 100ms; "
        "args arg_method arg_path arg_ver arg_hdrs arg_body",
        f"agent target: {args.agent_sample_percentage:g}% (fixed_sampled_out: 0%), concurrency "
        f"{args.agent_concurrency}, queue_size {args.agent_queue_size}, pipeline_depth "
        f"{args.agent_pipeline_depth}; shadow nginx keepalive_requests {args.shadow_keepalive_requests:,}",
    ]


def agents_mode(haproxy: str) -> str:
    """The agents' backend mode: `spop` from HAProxy 3.1 on (2.x knows only tcp)."""
    major, minor = (int(part) for part in _version([haproxy, "-v"]).split(".")[:2])
    return "spop" if (major, minor) >= (3, 1) else "tcp"


def _version(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    match = re.search(r"version (\S+)", out)
    return match[1] if match else "?"


def render_text(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )


def render_markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=15, help="seconds of baseline and mirror (15)")
    parser.add_argument(
        "--fault-duration", type=float, default=60, help="seconds of each fault scenario (60)"
    )
    parser.add_argument("--warmup", type=float, default=2, help="seconds of traffic before each measured run")
    parser.add_argument(
        "--quick", action="store_true", help="a short run of everything: 3 s each, 1 s warm-up"
    )
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (1)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument("--haproxy-threads", type=int, default=0, help="HAProxy nbthread (default: its own)")
    parser.add_argument(
        "--agent-concurrency", type=int, default=64, help="the target's connections (64, the agent's default)"
    )
    parser.add_argument(
        "--shadow-keepalive-requests",
        type=int,
        default=10_000_000,
        help="the shadow nginx's keepalive_requests (10,000,000; nginx's own default, 1000, closes each "
        "connection with Connection: close after that many requests)",
    )
    parser.add_argument(
        "--agent-pipeline-depth",
        type=int,
        default=8,
        help="the target's pipeline_depth (8, the agent's default; 1: no HTTP/1.1 pipelining)",
    )
    parser.add_argument(
        "--agent-sample-percentage",
        type=float,
        default=100.0,
        help="the target's sample_percentage (100; 0: the agent takes every copy in and sends none, "
        "which tells its own share of the primary's added latency from the shadow traffic's)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="the agent's worker processes (-n N, SO_REUSEPORT listeners; CPU counts every worker)",
    )
    parser.add_argument(
        "--agent-queue-size",
        type=int,
        default=QUEUE_SIZE,
        help=f"the target's queue ({QUEUE_SIZE}; the agent's default, 1024, holds ~50 ms at 20k req/s)",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(DEFAULT_SCENARIOS),
        help="comma-separated subset, in this order",
    )
    parser.add_argument("--profile", action="store_true", help="py-spy record the agent (--nonblocking)")
    parser.add_argument("--rate", type=float, default=5000, help="req/s of the fixed_* scenarios (5000)")
    parser.add_argument("--body-size", type=int, default=0, help="POST bodies of this many bytes (0: GETs)")
    parser.add_argument("--c-agent", help="the C agent's binary, for the c_agent scenario")
    parser.add_argument(
        "--agent",
        default=str(AGENT),
        help=f"this agent's executable ({AGENT.relative_to(ROOT)}); the ACK-only agent runs under the python "
        "beside it, so both measure the same interpreter (see docs/performance.md)",
    )
    parser.add_argument("--haproxy", default=HAPROXY, help=f"the HAProxy binary ({HAPROXY})")
    parser.add_argument(
        "--json", type=Path, default=OUT / "e2e.json", help="where the figures go (bench/out/e2e.json)"
    )
    return parser


def main() -> int:
    parser = build_parser()
    args = parser.parse_args()
    if args.quick:
        args.duration = args.fault_duration = 3
        args.warmup = 1
    names = args.scenarios.split(",")
    for name in names:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r}")
    if "c_agent" in names and not args.c_agent:
        parser.error("the c_agent scenario needs --c-agent PATH")
    if args.profile and not PY_SPY.exists():
        parser.error(f"--profile needs py-spy at {PY_SPY} (pip install -e '.[bench]')")

    workdir = Path(tempfile.mkdtemp(prefix="spoa-mirror-e2e-"))
    bench = Bench(args, workdir)
    results: dict[str, Result] = {}
    json_servers = (
        [bench.json_primary, bench.json_shadow] if any(n.startswith("json_") for n in names) else []
    )
    with contextlib.ExitStack() as running:
        for server in [bench.primary, bench.shadow, *json_servers]:
            running.enter_context(server.running())
        for name in names:
            seconds = args.fault_duration if name.startswith("shadow_") else args.duration
            print(f"{name}: {seconds:g}s ...", file=sys.stderr, flush=True)
            results[name] = bench.run(name, seconds)

    setup = setup_lines(args, bench)
    rows = table(results)
    verdicts = checks(results)
    verdict_lines = [f"{'met' if ok else 'MISSED'}: {what} ({value})" for what, ok, value in verdicts]
    print("\n".join(setup))
    print()
    print(render_text(rows))
    print()
    print("\n".join(details(results)))
    print()
    print("\n".join(verdict_lines))
    print(f"\nconfigs and logs: {workdir}")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    markdown = "\n".join(
        [
            "# spoa-mirror end to end",
            "",
            *[f"- {line}" for line in setup],
            "",
            render_markdown(rows),
            "",
            *[f"- {line}" for line in details(results)],
            "",
            *[f"- {line}" for line in verdict_lines],
            "",
        ]
    )
    args.json.with_suffix(".md").write_text(markdown)
    args.json.write_text(
        json.dumps(
            {
                "setup": setup,
                "results": {name: asdict(r) for name, r in results.items()},
                "targets": [{"target": what, "met": ok, "value": value} for what, ok, value in verdicts],
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

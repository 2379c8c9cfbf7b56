"""Faults under load: whatever the shadows, the agents or HAProxy go through, no primary request
fails, the agent's memory stays bounded, and every mirror request is accounted for.

Each test runs Debian's HAProxy in front of a real nginx primary, `filter spoe` to one or two
spoa-mirror agents (real subprocesses) that replay to recording shadows, and drives it with a short
wrk load (tests/support/load.py: -t1 -c16, a few seconds) while something breaks. Each asserts:

- zero failed primary requests: no socket error and no status >= 400 in wrk's count;
- the agent's peak RSS (VmHWM) under 200 MB;
- once quiet, for every target: received == sum(outcomes) and nothing in flight (/metrics);
- what the fault must produce: its outcome class, mirroring going on through the other agent, etc.

Latency is printed, not judged: the primary's p99 next to the healthy run's, with only a hang
bound asserted, HANG_P99_MS plus HAProxy's `timeout processing` where the test takes every agent
away (a request may then wait that long for its ACK, by design). One short run on a shared two-core
machine is too noisy for comparisons; those belong to bench/e2e_bench.py. `pytest -s` or `-rA`
shows the figures; they are also recorded as junit properties.

HAProxy runs what we ship where faults are handled: the agents' backend of haproxy/haproxy.cfg
(option spop-check, inter 1s fall 2 rise 2, observe layer4) and haproxy/mirror.spoe.conf as is
(timeout processing 50ms), with MIRROR_SAMPLE_PERCENT=100 so that every request is mirrored.
Targets get 16 connections and a queue of 16: a slow or hung shadow then drains within seconds
once the load stops, and the queue bound is what keeps the agent's memory flat.
"""

from __future__ import annotations

import csv
import http.client
import io
import json
import os
import re
import signal
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

import pytest

from spoa_mirror.accounting import OUTCOMES
from tests.support.load import LoadResult, run_load, start_load
from tests.support.mirror_stack import Account, parse_metrics, series
from tests.support.procs import (
    HAProxyProcess,
    HAProxyRelease,
    ManagedProcess,
    current_haproxy,
    free_port,
    log_events,
    run_haproxy,
    run_nginx,
    run_process,
)
from tests.support.shadow import ShadowServer, self_signed_tls
from tests.support.shadow_h2 import H2ShadowServer
from tests.support.shipped_configs import shipped_haproxy_config

pytestmark = pytest.mark.haproxy

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_HAPROXY = (ROOT / "haproxy" / "haproxy.cfg").read_text()
SHIPPED_SPOE = (ROOT / "haproxy" / "mirror.spoe.conf").read_text()

LOAD_SECONDS = 3.0
MAX_RSS_MB = 200.0
SAMPLE_PERIOD = 0.1  # how often the shadow's received count is read during a run
TARGET = {"concurrency": 16, "queue_size": 16}


def _shipped(pattern: str, text: str) -> str:
    match = re.search(pattern, text, re.MULTILINE)
    assert match is not None, f"the shipped HAProxy config no longer matches {pattern!r}: update this test"
    return match[1]


BUFSIZE = int(_shipped(r"^\s*tune\.bufsize (\d+)", SHIPPED_HAPROXY))
PROCESSING_MS = float(_shipped(r"^\s*timeout processing (\d+)ms", SHIPPED_SPOE))

HAPROXY_CONFIG = Template("""\
global
    tune.bufsize $bufsize
    maxconn 1000

defaults
    mode http
    timeout connect 1s
    timeout client 10s
    timeout server 10s
    timeout http-request 10s
    # On a reload the old worker closes idle client connections at once; wrk, which does not retry,
    # counts one that it was just reusing as a read error (seen on 3.2: 6 of 34,458). This makes the
    # old worker say Connection: close on its next response instead, so only the agent's part in a
    # reload can fail the primary's requests.
    option idle-close-on-response

frontend www
    bind 127.0.0.1:$http_port
    option http-buffer-request
    unique-id-format %{+X}o\\ %ci:%cp_%fi:%fp_%Ts_%rt:%pid
    http-request set-header X-Request-ID %[unique-id]
    default_backend app

backend app
    filter spoe engine mirror config $spoe_path
    server app1 127.0.0.1:$primary_port

$agents_backend""")


def agents_backend(ports: list[int]) -> str:
    """The shipped `backend mirror-agents` section of the running HAProxy's config (2.x or 3.x),
    with our agents as its servers."""
    shipped = shipped_haproxy_config().read_text()
    section = _shipped(r"^(backend mirror-agents\n(?:[ \t]+.*\n?|\n)*)", shipped)
    section, servers = re.subn(r"^\s+server agent\d+ .*\n?", "", section, flags=re.MULTILINE)
    assert servers, "the shipped mirror-agents backend has no `server agentN` line: update this test"
    lines = [f"    server agent{n} 127.0.0.1:{port}" for n, port in enumerate(ports, 1)]
    return section.rstrip("\n") + "\n" + "\n".join(lines) + "\n"


# -- the stack --------------------------------------------------------------------------------------


class Agent:
    """One spoa-mirror subprocess on fixed ports, so that it can be killed and started again where
    HAProxy expects it. `config` is the agent config without listen/admin/log, which this adds."""

    def __init__(self, name: str, tmp_path: Path, exits: ExitStack, config: dict[str, Any]) -> None:
        self.name = name
        self.tmp_path = tmp_path
        self.exits = exits
        self.spop_port = free_port()
        self.admin_port = free_port()
        self.config_path = tmp_path / f"{name}.yaml"
        self.runs = 0
        self.process: ManagedProcess
        self.write_config(config)

    def write_config(self, config: dict[str, Any]) -> None:
        base = {
            "listen": {"address": "127.0.0.1", "port": self.spop_port, "max_frame_size": BUFSIZE},
            "admin": {"address": "127.0.0.1", "port": self.admin_port},
        }
        self.config_path.write_text(json.dumps({**config, **base}))  # JSON is YAML

    def start(self) -> None:
        """Start (or start again) and return once /metrics answers. Debug logs: the SPOP
        connections' open/close lines (nothing per request)."""
        self.runs += 1
        argv = [sys.executable, "-m", "spoa_mirror", "--config", str(self.config_path)]
        argv += ["--log-format", "json", "--log-level", "debug"]
        self.process = self.exits.enter_context(
            run_process(
                argv,
                ready_port=self.admin_port,
                name=f"{self.name}-run{self.runs}",
                log_dir=self.tmp_path,
                cwd=ROOT,
            )
        )

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=5) as response:
            return parse_metrics(response.read().decode())

    def events(self, event: str) -> list[dict[str, Any]]:
        """This run's JSON log lines named `event`."""
        return log_events(self.process.stderr_text(), event)

    def peak_rss_mb(self) -> float:
        """VmHWM: the most memory the process ever had resident."""
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        raise AssertionError("no VmHWM in /proc/<pid>/status")

    def cpu_seconds(self) -> float:
        """User and system CPU time the process used so far."""
        with open(f"/proc/{self.process.pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def account(metrics: Mapping[str, float], target: str) -> Account:
    """One target's figures; outcomes that never happened left out, so they print short."""
    counts = {
        outcome: int(metrics.get(series("spoa_mirror_requests_total", outcome=outcome, target=target), 0))
        for outcome in OUTCOMES
    }
    return Account(
        received=int(metrics.get(series("spoa_mirror_requests_received_total", target=target), 0)),
        in_flight=int(metrics.get(series("spoa_mirror_in_flight", target=target), 0)),
        outcomes={outcome: count for outcome, count in counts.items() if count},
    )


@dataclass
class Stack:
    url: str
    haproxy: HAProxyProcess
    agents: list[Agent]
    shadows: dict[str, ShadowServer]


@contextmanager
def fault_stack(
    tmp_path: Path,
    primary_port: int,
    shadows: Mapping[str, ShadowServer],
    config: Callable[[Mapping[str, ShadowServer]], dict[str, Any]],
    *,
    agents: int = 1,
) -> Iterator[Stack]:
    """Start the shadows, `agents` agents on `config(shadows)`, then HAProxy (master-worker, so
    that it can be reloaded) in front of the primary. Everything stops on the way out, in reverse."""
    with ExitStack() as exits, pytest.MonkeyPatch.context() as env:
        env.setenv("MIRROR_SAMPLE_PERCENT", "100")  # read by mirror.spoe.conf, at start and reloads
        for shadow in shadows.values():
            exits.enter_context(shadow)
        started = []
        for n in range(1, agents + 1):
            agent = Agent(f"agent{n}", tmp_path, exits, config(shadows))
            agent.start()
            started.append(agent)
        http_port = free_port()
        haproxy_config = HAPROXY_CONFIG.substitute(
            bufsize=BUFSIZE,
            http_port=http_port,
            spoe_path=tmp_path / "mirror.spoe.conf",
            primary_port=primary_port,
            agents_backend=agents_backend([agent.spop_port for agent in started]),
        )
        haproxy = exits.enter_context(
            run_haproxy(
                haproxy_config, tmp_path, master_worker=True, extra_files={"mirror.spoe.conf": SHIPPED_SPOE}
            )
        )
        yield Stack(f"http://127.0.0.1:{http_port}/", haproxy, started, dict(shadows))


def target(url: str, **overrides: Any) -> dict[str, Any]:
    return {"name": "shadow", "url": url, **TARGET, **overrides}


def one_target(shadows: Mapping[str, ShadowServer]) -> dict[str, Any]:
    """The agent config of most tests: everything to the one shadow."""
    return {"targets": [target(shadows["shadow"].url)]}


# -- measuring ----------------------------------------------------------------------------------------


class ShadowSampler:
    """Reads a shadow's received count every SAMPLE_PERIOD in a thread of its own, so that what the
    test does meanwhile (a reload that takes a second) cannot stretch the gaps it measures."""

    def __init__(self, shadow: ShadowServer) -> None:
        self.shadow = shadow
        self.started = time.monotonic()
        self.samples: list[tuple[float, int]] = []  # (seconds since start, requests received so far)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shadow-sampler", daemon=True)

    def __enter__(self) -> ShadowSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((self.now(), len(self.shadow.requests)))
            self._stop.wait(SAMPLE_PERIOD)

    def now(self) -> float:
        return time.monotonic() - self.started

    def count_at(self, when: float) -> int:
        """Requests received by `when` (the last sample taken at or before it)."""
        return max((count for t, count in self.samples if t <= when), default=0)

    def longest_gap(self, start: float, end: float) -> float:
        """The longest time in [start, end] during which the shadow received nothing, to the
        sampling period."""
        last_change, previous, longest = start, self.count_at(start), 0.0
        for t, count in self.samples:
            if start < t <= end and count != previous:
                longest = max(longest, t - last_change)
                last_change, previous = t, count
        return max(longest, end - last_change)


def settle(agent: Agent, targets: list[str], timeout: float = 15.0) -> dict[str, Account]:
    """Once the load is over: wait until nothing is in flight and the figures stop moving, then
    check that every request each target received has exactly one outcome."""
    deadline = time.monotonic() + timeout
    previous: dict[str, Account] | None = None
    while True:
        metrics = agent.metrics()
        accounts = {name: account(metrics, name) for name in targets}
        if accounts == previous and all(a.in_flight == 0 for a in accounts.values()):
            break
        assert time.monotonic() < deadline, f"{agent.name} not quiet after {timeout} s: {accounts}"
        previous = accounts
        time.sleep(0.2)
    for name, a in accounts.items():
        assert a.received == a.settled, f"{name}: received {a.received} != sum of outcomes {a.outcomes}"
    return accounts


# Catches a primary stuck behind the mirror, not a slower one: the healthy p99 is a few ms.
HANG_P99_MS = 1000.0


def p99_bound(healthy: LoadResult, extra_ms: float = 0.0) -> float:
    return HANG_P99_MS + extra_ms


def check_primary(load: LoadResult, healthy: LoadResult, extra_ms: float = 0.0) -> None:
    """No failed primary request, and no primary request held anywhere near a hang."""
    assert load.failed == 0, f"primary requests failed: {load.summary()}\n{load.output}"
    bound = p99_bound(healthy, extra_ms)
    assert load.p99_ms < bound, f"primary p99 {load.p99_ms:.2f} ms over {bound:.2f} ms: {load.summary()}"


def check_rss(agent: Agent) -> float:
    rss = agent.peak_rss_mb()
    assert rss < MAX_RSS_MB, f"{agent.name} peak RSS {rss:.1f} MB"
    return rss


@pytest.fixture
def report(
    record_property: Callable[[str, object], None], request: pytest.FixtureRequest
) -> Callable[..., None]:
    """`report(load, healthy, name=value, ...)`: the figures, printed (`-s`, `-rA`) and recorded."""

    def emit(load: LoadResult, healthy: LoadResult | None, extra_ms: float = 0.0, **figures: object) -> None:
        print(f"\n[{request.node.name}] primary: {load.summary()}")
        record_property("primary_requests", load.requests)
        record_property("primary_failed", load.failed)
        record_property("primary_p99_ms", load.p99_ms)
        if healthy is not None:
            print(
                f"  p99 {load.p99_ms:.2f} ms vs healthy {healthy.p99_ms:.2f} ms "
                f"(bound {p99_bound(healthy, extra_ms):.2f} ms)"
            )
            record_property("healthy_p99_ms", healthy.p99_ms)
        for name, value in figures.items():
            print(f"  {name}: {value}")
            record_property(name, value)

    return emit


# -- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def primary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The nginx primary every test's HAProxy forwards to; its port."""
    port = free_port()
    with run_nginx(
        tmp_path_factory.mktemp("primary"), port, {}, server_directives='location / { return 200 "ok\\n"; }'
    ):
        yield port


@dataclass
class Run:
    load: LoadResult
    accounts: dict[str, Account]
    rss_mb: float
    cpu_s: float  # the agent's, over the load and the drain after it
    shadow_received: int


@pytest.fixture(scope="module")
def healthy(tmp_path_factory: pytest.TempPathFactory, primary: int, haproxy_release: HAProxyRelease) -> Run:
    """The reference run, per HAProxy release: one agent, one healthy shadow, the same load as the
    fault tests."""
    tmp_path = tmp_path_factory.mktemp("healthy")
    shadow = ShadowServer()
    with fault_stack(tmp_path, primary, {"shadow": shadow}, one_target) as stack:
        [agent] = stack.agents
        cpu = agent.cpu_seconds()
        load = run_load(stack.url, LOAD_SECONDS)
        accounts = settle(agent, ["shadow"])
        cpu = agent.cpu_seconds() - cpu
        return Run(load, accounts, agent.peak_rss_mb(), cpu, len(shadow.requests))


# -- healthy and shadow faults ------------------------------------------------------------------------


def test_healthy_run(healthy: Run, report: Callable[..., None]) -> None:
    """The reference the fault tests compare with, under the same checks: no failure, bounded
    memory, an exact account, and every request sent is one the shadow received. Healthy means no
    fault, not unlimited capacity: the recording shadow (Python, in the test process) takes about
    half of what wrk pushes through, and the rest is counted queue_full."""
    [a] = healthy.accounts.values()
    report(
        healthy.load,
        None,
        rss_mb=round(healthy.rss_mb, 1),
        agent_cpu_s=round(healthy.cpu_s, 2),
        received=a.received,
        outcomes=a.outcomes,
    )
    assert healthy.load.failed == 0, healthy.load.output
    assert healthy.rss_mb < MAX_RSS_MB
    assert a.outcomes.get("sent_2xx", 0) == healthy.shadow_received > 0
    assert set(a.outcomes) <= {"sent_2xx", "queue_full"}, a.outcomes


@dataclass(frozen=True)
class ShadowFault:
    mode: str
    expected: str  # the outcome this fault must produce
    allowed: frozenset[str]  # every outcome it may produce
    target: dict[str, Any] = field(default_factory=dict)
    delay: float = 0.5
    tls: bool = False


SHADOW_FAULTS = [
    ShadowFault("refuse", "error_connect", frozenset({"error_connect", "circuit_open", "queue_full"})),
    ShadowFault(
        "hang", "error_timeout", frozenset({"error_timeout", "circuit_open", "queue_full"}), {"timeout": 1}
    ),
    # Answers after 2 s, within a target timeout 15 times that: a loaded machine cannot turn one
    # into error_timeout.
    ShadowFault("delay", "sent_2xx", frozenset({"sent_2xx", "queue_full"}), {"timeout": 30}, delay=2.0),
    # Every shadow failure opens the circuit breaker, so circuit_open follows the first errors.
    ShadowFault("reset", "error_reset", frozenset({"error_reset", "circuit_open", "queue_full"})),
    ShadowFault("garbage", "error_protocol", frozenset({"error_protocol", "circuit_open", "queue_full"})),
    ShadowFault(
        "ok",
        "error_tls",
        frozenset({"error_tls", "circuit_open", "queue_full"}),
        {"tls_verify": True},
        tls=True,
    ),
]


@pytest.mark.parametrize(
    "fault", SHADOW_FAULTS, ids=[fault.mode if not fault.tls else "tls_invalid" for fault in SHADOW_FAULTS]
)
def test_shadow_fault(
    fault: ShadowFault, tmp_path: Path, primary: int, healthy: Run, report: Callable[..., None]
) -> None:
    """A shadow that refuses, hangs (target timeout 1 s), answers after 2 s, resets mid-response,
    answers garbage, or presents a certificate nobody signed (https, tls_verify on): the primary
    never notices, the agent stays small, and the fault shows as its own outcome class, beside
    circuit_open (the breaker trips on connect failures and timeouts) and queue_full (a shadow
    slower than the load fills the bounded queue)."""
    ssl_context = self_signed_tls(str(tmp_path))[0] if fault.tls else None
    shadow = ShadowServer(mode=fault.mode, delay=fault.delay, ssl_context=ssl_context)
    with fault_stack(
        tmp_path,
        primary,
        {"shadow": shadow},
        lambda s: {"targets": [target(s["shadow"].url, **fault.target)]},
    ) as stack:
        [agent] = stack.agents
        cpu = agent.cpu_seconds()
        load = run_load(stack.url, LOAD_SECONDS)
        [a] = settle(agent, ["shadow"]).values()
        rss = check_rss(agent)
        cpu = agent.cpu_seconds() - cpu
        metrics = agent.metrics()
    latency = {
        le: int(metrics[series("spoa_mirror_shadow_latency_seconds_bucket", le=le, target="shadow")])
        for le in ("1.0", "+Inf")
    }
    report(
        load,
        healthy.load,
        rss_mb=round(rss, 1),
        agent_cpu_s=round(cpu, 2),
        outcomes=a.outcomes,
        shadow_latency_buckets=latency,
    )
    check_primary(load, healthy.load)
    assert a.outcomes.get(fault.expected, 0) > 0, a.outcomes
    assert set(a.outcomes) <= fault.allowed, a.outcomes
    if fault.mode == "delay":  # every answer took the shadow's 2 s
        assert latency["1.0"] == 0 and latency["+Inf"] == a.outcomes["sent_2xx"], latency


H2C_FAULTS = [
    ShadowFault("ok", "sent_2xx", frozenset({"sent_2xx", "queue_full"})),
    ShadowFault(
        "hang", "error_timeout", frozenset({"error_timeout", "circuit_open", "queue_full"}), {"timeout": 1}
    ),
    ShadowFault(
        "frozen", "error_timeout", frozenset({"error_timeout", "circuit_open", "queue_full"}), {"timeout": 1}
    ),
    # Answers after 2 s, within a target timeout 15 times that: a loaded machine cannot turn one
    # into error_timeout.
    ShadowFault("delay", "sent_2xx", frozenset({"sent_2xx", "queue_full"}), {"timeout": 30}, delay=2.0),
    ShadowFault(
        "reset", "error_stream_reset", frozenset({"error_stream_reset", "circuit_open", "queue_full"})
    ),
]


@pytest.mark.parametrize("fault", H2C_FAULTS, ids=[fault.mode for fault in H2C_FAULTS])
def test_h2c_shadow_fault(
    fault: ShadowFault, tmp_path: Path, primary: int, healthy: Run, report: Callable[..., None]
) -> None:
    """The same load to an HTTP/2 shadow (`protocol: h2c`) that is healthy, hangs (streams never
    answered, PINGs still are), freezes (reads nothing more at all), answers after 2 s, or resets
    every stream: the primary never notices, memory stays bounded, the account is exact, and the
    fault shows as its outcome beside circuit_open and queue_full, as over HTTP/1.1."""
    shadow = H2ShadowServer(mode=fault.mode, delay=fault.delay)
    with fault_stack(
        tmp_path,
        primary,
        {"shadow": shadow},  # type: ignore[dict-item]
        lambda s: {"targets": [target(s["shadow"].url, protocol="h2c", **fault.target)]},
    ) as stack:
        [agent] = stack.agents
        load = run_load(stack.url, LOAD_SECONDS)
        [a] = settle(agent, ["shadow"]).values()
        rss = check_rss(agent)
    report(
        load,
        healthy.load,
        rss_mb=round(rss, 1),
        outcomes=a.outcomes,
        h2_connections=shadow.connections_accepted,
    )
    check_primary(load, healthy.load)
    assert a.outcomes.get(fault.expected, 0) > 0, a.outcomes
    assert set(a.outcomes) <= fault.allowed, a.outcomes
    if fault.mode in ("ok", "delay"):  # multiplexed: a few connections, not one per request
        assert shadow.connections_accepted <= 2, shadow.connections_accepted


# -- agent and HAProxy faults -------------------------------------------------------------------------


def test_killing_one_of_two_agents_keeps_mirroring(
    tmp_path: Path, primary: int, healthy: Run, report: Callable[..., None]
) -> None:
    """The redundancy proof. Two agents behind the shipped backend (balance first, spop-check, inter
    1s fall 2, observe layer4); the first, which takes every NOTIFY while it is up, is SIGKILLed
    under load. No primary request fails; HAProxy marks it DOWN; from then on every request is
    mirrored through the survivor, none lost: each of MARKERS requests sent after that reaches the
    shadow exactly once. Checked in that order of events, not by time: the longest stretch with no
    mirrored request after the kill is printed (a figure, bench material: HAProxy loses what was in
    flight on the dead agent's connections, then routes every NOTIFY to the survivor)."""
    shadow = ShadowServer()
    with fault_stack(tmp_path, primary, {"shadow": shadow}, one_target, agents=2) as stack:
        victim, survivor = stack.agents
        with ShadowSampler(shadow) as sampler, start_load(stack.url, 5.0) as load:
            time.sleep(1.5)
            victim_rss = check_rss(victim)
            victim_before = account(victim.metrics(), "shadow")
            survivor_before = account(survivor.metrics(), "shadow")
            victim.process.popen.kill()
            killed_at = sampler.now()
            wait_for_agent_status(stack.haproxy, "agent1", "DOWN")
            marked_down_at = sampler.now()
            result = load.result()
            ended_at = sampler.now()
        settle(survivor, ["shadow"])
        markers = [f"/after-kill/{n}" for n in range(MARKERS)]
        for path in markers:
            with urllib.request.urlopen(stack.url.rstrip("/") + path, timeout=10) as response:
                assert response.status == 200
        [a] = settle(survivor, ["shadow"]).values()
        rss = check_rss(survivor)
        mirrored = Counter(request.target for request in shadow.requests)
    gap = sampler.longest_gap(killed_at, ended_at)
    report(
        result,
        healthy.load,
        longest_mirroring_gap_ms=round(gap * 1000),
        marked_down_after_s=round(marked_down_at - killed_at, 2),
        mirrored_after_kill=sampler.count_at(ended_at) - sampler.count_at(killed_at),
        victim_before_kill=victim_before.outcomes,
        victim_rss_mb=round(victim_rss, 1),
        survivor_rss_mb=round(rss, 1),
        survivor_outcomes=a.outcomes,
    )
    check_primary(result, healthy.load)
    # balance first: the victim had all the traffic, the survivor none, until the kill.
    assert victim_before.received > 0 and survivor_before.received == 0, (victim_before, survivor_before)
    assert {path: mirrored[path] for path in markers} == dict.fromkeys(markers, 1), "lost after the kill"
    assert a.outcomes.get("sent_2xx", 0) >= MARKERS and a.received >= MARKERS, a


# Requests sent one by one once HAProxy has marked the killed agent DOWN; each must be mirrored.
MARKERS = 20
# Ends a test whose HAProxy never marks a dead agent down; inter 1s fall 2 takes ~2 s at most.
STATUS_HANG_S = 30.0


def wait_for_agent_status(haproxy: HAProxyProcess, name: str, status: str) -> None:
    """Until HAProxy's `show stat` gives the agent server `status` (a hang bound, not a verdict)."""
    deadline = time.monotonic() + STATUS_HANG_S
    while True:
        text = haproxy.cli("show stat").removeprefix("# ")
        rows = [row for row in csv.DictReader(io.StringIO(text)) if row["svname"] == name]
        assert rows, f"no server {name} in show stat:\n{text}"
        if rows[0]["status"] == status:
            return
        assert time.monotonic() < deadline, f"{name} still {rows[0]['status']} after {STATUS_HANG_S} s"
        time.sleep(0.05)


def test_single_agent_killed_then_restarted(
    tmp_path: Path, primary: int, healthy: Run, report: Callable[..., None]
) -> None:
    """The only agent SIGKILLed under load: requests go on, the ones caught waiting for an ACK
    after at most HAProxy's timeout processing (the p99 hit is printed, and bounded by that on top
    of the usual bound). Started again on the same port, the agent gets traffic back once the
    health checks see it (rise 2, inter 1s) and mirroring resumes."""
    shadow = ShadowServer()
    with fault_stack(tmp_path, primary, {"shadow": shadow}, one_target) as stack:
        [agent] = stack.agents
        with start_load(stack.url, 3.0) as load:
            time.sleep(1.0)
            agent.process.popen.kill()
            killed = load.result()
        before_restart = len(shadow.requests)
        with ShadowSampler(shadow) as sampler, start_load(stack.url, 4.0) as load:
            agent.start()
            restarted_at = sampler.now()
            restarted = load.result()
        resumed_at = next((t for t, count in sampler.samples if count > before_restart), None)
        [a] = settle(agent, ["shadow"]).values()
        rss = check_rss(agent)
    report(
        killed,
        healthy.load,
        extra_ms=PROCESSING_MS,
        after_restart=restarted.summary(),
        mirroring_resumed_after_s=None if resumed_at is None else round(resumed_at - restarted_at, 2),
        restarted_rss_mb=round(rss, 1),
        restarted_outcomes=a.outcomes,
    )
    check_primary(killed, healthy.load, extra_ms=PROCESSING_MS)
    check_primary(restarted, healthy.load, extra_ms=PROCESSING_MS)
    assert resumed_at is not None, "no mirrored request after the agent came back"
    assert a.outcomes.get("sent_2xx", 0) > 0


def test_haproxy_reload_under_load(
    tmp_path: Path, primary: int, healthy: Run, report: Callable[..., None]
) -> None:
    """A seamless HAProxy reload (master-worker, SIGUSR2) in the middle of the load: the new worker
    takes over the listeners and opens its own SPOP connections while the old one finishes; no
    request fails and the shadow keeps receiving."""
    shadow = ShadowServer()
    with fault_stack(tmp_path, primary, {"shadow": shadow}, one_target) as stack:
        [agent] = stack.agents
        with ShadowSampler(shadow) as sampler, start_load(stack.url, 4.0) as load:
            time.sleep(1.5)
            reload_started = sampler.now()
            stack.haproxy.reload()
            reloaded_at = sampler.now()
            result = load.result()
            ended_at = sampler.now()
        [a] = settle(agent, ["shadow"]).values()
        rss = check_rss(agent)
    gap = sampler.longest_gap(reload_started, ended_at)
    after_reload = sampler.count_at(ended_at) - sampler.count_at(reloaded_at)
    report(
        result,
        healthy.load,
        reload_took_s=round(reloaded_at - reload_started, 2),
        longest_mirroring_gap_ms=round(gap * 1000),
        mirrored_after_reload=after_reload,
        rss_mb=round(rss, 1),
        outcomes=a.outcomes,
    )
    check_primary(result, healthy.load)
    assert after_reload > 0, "no mirrored request after the reload"


def test_sighup_under_load_switches_targets_and_keeps_spop_connections(
    tmp_path: Path, primary: int, healthy: Run, report: Callable[..., None]
) -> None:
    """SIGHUP with a new target list in the middle of the load: the new target gets the traffic,
    the old one finishes its queue, every request of both is accounted for, no primary request
    fails, and no SPOP connection HAProxy held before the reload is closed (from the agent's
    debug log, which has a line per connection, none per request)."""
    shadows = {"a": ShadowServer(), "b": ShadowServer()}
    with fault_stack(
        tmp_path, primary, shadows, lambda s: {"targets": [target(s["a"].url, name="a")]}
    ) as stack:
        [agent] = stack.agents
        with start_load(stack.url, 4.0) as load:
            time.sleep(1.5)
            agent.write_config({"targets": [target(shadows["b"].url, name="b")]})
            agent.process.popen.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 2.0
            while not agent.events("config.reloaded"):
                assert time.monotonic() < deadline, "no config.reloaded within 2 s"
                time.sleep(0.05)
            connections = spop_connections(agent)
            result = load.result()
        # HAProxy 3.2 may purge idle SPOP connections from its pool once the load stops (seen once
        # in CI: closed by peer during the settle), its own choice. The promise is the agent's: it
        # closes none of them, ever, and HAProxy closes none while the load runs over something the
        # agent did. HAProxy 3.x purges idle connections during the load too (half of the idle ones
        # every pool-purge-delay, 5 s by default) with a reset and no DISCONNECT: 2 of 40 runs
        # failed on that, before and after the 2026-12-05 hot-path session alike. What HAProxy drops
        # over the agent's doing comes with a DISCONNECT saying why, and still fails the test.
        resets_count = not current_haproxy().at_least_3_1
        closed_by_peer_under_load = spop_closes(agent, by_peer=True, resets=resets_count) & connections
        accounts = settle(agent, ["a", "b"])
        closed = sorted((spop_closes(agent, by_peer=False) & connections) | closed_by_peer_under_load)
        rss = check_rss(agent)
        received_b = len(shadows["b"].requests)
    report(
        result,
        healthy.load,
        spop_connections_at_reload=len(connections),
        closed_since=len(closed),
        received_by_b=received_b,
        rss_mb=round(rss, 1),
        outcomes={name: a.outcomes for name, a in accounts.items()},
    )
    check_primary(result, healthy.load)
    assert connections, "HAProxy held no SPOP connection when the agent reloaded"
    assert not closed, f"SPOP connections closed after SIGHUP: {closed}"
    assert accounts["b"].outcomes.get("sent_2xx", 0) == received_b > 0


def spop_connections(agent: Agent) -> set[int]:
    """Ids of the SPOP connections that said HELLO as HAProxy's SPOE (health checks left out)."""
    return {record["conn"] for record in agent.events("spop.hello") if not record.get("healthcheck")}


def spop_closes(agent: Agent, *, by_peer: bool, resets: bool = True) -> set[int]:
    """Ids of the SPOP connections closed so far by HAProxy (`by_peer`), or by the agent: normally
    or on a protocol error, which has its own event. `resets`: count HAProxy's resets (a close
    without a DISCONNECT) too."""
    closes = {
        record["conn"]
        for record in agent.events("spop.connection.closed")
        if bool(record.get("by_peer")) is by_peer and (resets or record.get("reason") != "reset by peer")
    }
    if not by_peer:
        closes |= {record["conn"] for record in agent.events("spop.protocol_error")}
    return closes


def test_sigterm_under_load_drains_or_counts_what_was_queued(
    tmp_path: Path, primary: int, healthy: Run, report: Callable[..., None]
) -> None:
    """SIGTERM under load, with mirrors queued for a slow shadow (0.2 s) and a hung one (timeout
    30 s), drain_timeout 6 s (the slow shadow's 16 in flight and 16 queued take ~0.4 s: the drain
    has 15 times that): the agent exits 0 and logs agent.stopped; the slow shadow's queue is
    drained (every request it still had reaches the shadow), the hung one's is counted as
    `dropped`, exactly what was in flight for it. The primary never fails; once the agent is gone
    requests go on without mirroring, after at most timeout processing."""
    shadows = {"slow": ShadowServer(mode="delay", delay=0.2), "hung": ShadowServer(mode="hang")}
    with fault_stack(
        tmp_path,
        primary,
        shadows,
        lambda s: {
            "drain_timeout": 6,
            "targets": [target(s["slow"].url, name="slow"), target(s["hung"].url, name="hung", timeout=30)],
        },
    ) as stack:
        [agent] = stack.agents
        with start_load(stack.url, 4.0) as load:
            time.sleep(1.5)
            rss = check_rss(agent)
            agent.process.popen.send_signal(signal.SIGTERM)
            last = last_metrics_while_draining(agent)
            status = agent.process.popen.wait(30)
            result = load.result()
        [stopped] = agent.events("agent.stopped")
        received_slow = len(shadows["slow"].requests)
    slow, hung = account(last, "slow"), account(last, "hung")
    report(
        result,
        healthy.load,
        extra_ms=PROCESSING_MS,
        exit_status=status,
        drained=stopped["drained"],
        dropped=stopped["dropped"],
        rss_mb=round(rss, 1),
        last_scrape={"slow": slow, "hung": hung},
        received_by_slow=received_slow,
    )
    check_primary(result, healthy.load, extra_ms=PROCESSING_MS)
    assert status == 0
    for name, a in (("slow", slow), ("hung", hung)):
        assert a.received == a.settled + a.in_flight, f"{name}: {a}"
    # The hung shadow never answers: whatever it had in flight is dropped, counted as shutdown.
    assert stopped["dropped"] == hung.in_flight + hung.outcomes.get("shutdown", 0) > 0
    # The slow one answers within the drain: what it had in flight was sent and answered.
    assert stopped["drained"] >= slow.in_flight
    assert received_slow == slow.outcomes.get("sent_2xx", 0) + slow.in_flight


def last_metrics_while_draining(agent: Agent) -> dict[str, float]:
    """The agent's last /metrics after its SPOP connections closed (nothing new comes in then),
    read until the admin listener goes away with the process."""
    last = None
    while True:
        try:
            metrics = agent.metrics()
        except (OSError, http.client.HTTPException):  # refused, or cut short by the exit
            break
        if metrics["spoa_mirror_spop_connections_open"] == 0:
            last = metrics
        time.sleep(0.05)
    assert last is not None, "the agent exited before its SPOP connections were seen closed"
    return last

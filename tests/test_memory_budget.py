"""Memory bounded in bytes, through the real HAProxy 2.6, with the agent's DEFAULT settings
(queue_size 8192, memory_budget 64MiB for the agent and 32MiB per target, max_queue_age 5 s) and
bodies up to what HAProxy's buffer holds (1 MiB): the findings of the red-team pass, each one a
test that failed on the code before the budget and passes now, with its figure printed (`-s`).

- 1 MiB bodies to four shadows, two slow (answer after 4 s) and two hung: the agent's peak RSS
  stayed at 1.2 GB and climbing before (each target queued its own copy of every request); now it
  stays under 200 MB and the excess is counted as `budget_exceeded`.
- A shadow that streams header lines forever, and one that sends `100 Continue` forever: the agent
  kept every byte until the timeout (1.9 GB in 5 s with 4 requests); now each request ends as
  `error_protocol` once 64 KiB of head have arrived.
- A hung shadow's queue: requests waited minutes, then went to the recovered shadow; now they are
  dropped as `stale` after max_queue_age, and an opening breaker sheds the queue as `circuit_open`.

Every load is a fixed number of requests (hey -n), so even the unbounded agent of before could
only grow so far; the shadows (tests/support/sink_shadow.py) drop what they receive.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.mirror_stack import MirrorStack, mirror_stack
from tests.support.sink_shadow import SinkShadow

pytestmark = pytest.mark.haproxy

BUFSIZE = 1_100_000  # a 1 MiB body in HAProxy's request buffer and in one SPOE frame
BODY_SIZE = 1 << 20
MAX_RSS_MB = 200.0


def rss_mb(stack: MirrorStack) -> tuple[float, float]:
    """The agent's (VmRSS, VmHWM) in MB: now, and the most it ever had."""
    figures = {}
    with open(f"/proc/{stack.agent.pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                figures[name] = int(value.split()[0]) / 1024
    return figures["VmRSS"], figures["VmHWM"]


def post_bodies(url: str, tmp_path: Path, count: int, size: int = BODY_SIZE, concurrency: int = 16) -> str:
    """`count` POSTs of a `size`-byte body with hey; its summary. Bounded in count, not time."""
    body = tmp_path / "body.bin"
    body.write_bytes(b"m" * size)
    result = subprocess.run(
        ["hey", "-n", str(count), "-c", str(concurrency), "-m", "POST", "-D", str(body),
         "-T", "application/octet-stream", "-t", "30", url + "/upload"],
        capture_output=True, text=True, timeout=180, check=True,
    )  # fmt: skip
    assert "[200]\t" in result.stdout, result.stdout
    return result.stdout


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def targets_on(shadows: dict[str, SinkShadow]) -> dict[str, Any]:
    """An agent config with one target per shadow, default settings."""
    return {"targets": [{"name": name, "url": shadow.url} for name, shadow in shadows.items()]}


def close_all(shadows: dict[str, SinkShadow]) -> None:
    """Before the stack stops: what the agent has in flight fails at once, so its drain is quick."""
    for shadow in shadows.values():
        shadow.close()


def check_accounts(stack: MirrorStack, names: list[str]) -> dict[str, dict[str, int]]:
    """received == sum(outcomes) + in flight for every target, on one scrape; their outcomes."""
    metrics = stack.metrics()
    outcomes = {}
    for name in names:
        account = stack.account(name, metrics)
        assert account.received == account.settled + account.in_flight, f"{name}: {account}"
        outcomes[name] = {outcome: count for outcome, count in account.outcomes.items() if count}
    return outcomes


def wait_until_received(stack: MirrorStack, names: list[str], count: int) -> None:
    """The agent ACKs at once and works through its intake after: the accounts are read once every
    request has reached every target (a generous bound, for a slow shared machine)."""

    def all_received() -> bool:
        metrics = stack.metrics()
        return all(stack.account(name, metrics).received >= count for name in names)

    wait_for(all_received, 120, f"{count} requests received by {names}")


def test_large_bodies_to_slow_and_hung_shadows_stay_under_the_budget(tmp_path: Path) -> None:
    """400 POSTs of 1 MiB to four targets with default settings, two shadows answering after 4 s
    and two never: the agent's peak RSS stays under 200 MB, the agent-wide budget is never
    overrun, and what did not fit is counted as budget_exceeded."""
    shadows = {
        "slow1": SinkShadow(delay=4.0),
        "slow2": SinkShadow(delay=4.0),
        "hung1": SinkShadow(delay=None),
        "hung2": SinkShadow(delay=None),
    }
    names = list(shadows)
    with shadows["slow1"], shadows["slow2"], shadows["hung1"], shadows["hung2"], mirror_stack(
        tmp_path,
        {},
        lambda _: targets_on(shadows),
        bufsize=BUFSIZE,
    ) as stack:
        _, baseline = rss_mb(stack)
        summary = post_bodies(stack.url, tmp_path, 400)
        wait_until_received(stack, names, 400)
        rss, peak = rss_mb(stack)
        metrics = stack.metrics()
        used = metrics.get("spoa_mirror_memory_budget_used_bytes", 0)
        limit = metrics.get("spoa_mirror_memory_budget_bytes", 0)
        outcomes = check_accounts(stack, names)
        close_all(shadows)
    print(
        f"\n1 MiB bodies, 4 targets (2 slow, 2 hung), defaults: agent RSS {rss:.1f} MB, "
        f"peak {peak:.1f} MB (at start {baseline:.1f} MB); budget used {used / 2**20:.1f} of "
        f"{limit / 2**20:.0f} MiB\noutcomes: {outcomes}\n"
        + "\n".join(line for line in summary.splitlines() if "Requests/sec" in line or "Total:" in line)
    )
    assert peak < MAX_RSS_MB, f"peak RSS {peak:.1f} MB"
    assert used <= limit
    assert sum(o.get("budget_exceeded", 0) for o in outcomes.values()) > 0, outcomes


@pytest.mark.parametrize("targets", [1, 4])
def test_shipped_buffer_bodies_to_slow_shadows_stay_under_the_budget(tmp_path: Path, targets: int) -> None:
    """The shipped HAProxy buffer (tune.bufsize 32768, bodies up to 24 KiB), default settings,
    shadows that answer after 4 s: 4,000 POSTs of 24 KiB. The red-team pass measured 230 MB with one
    target and 805 MB with four; now the budget holds each target to 32 MiB and the agent to 64."""
    shadows = {f"slow{n}": SinkShadow(delay=4.0) for n in range(1, targets + 1)}
    with contextlib.ExitStack() as running:
        for shadow in shadows.values():
            running.enter_context(shadow)
        stack = running.enter_context(
            mirror_stack(
                tmp_path,
                {},
                lambda _: targets_on(shadows),
                bufsize=32768,
            )
        )
        _, baseline = rss_mb(stack)
        post_bodies(stack.url, tmp_path, 4000, size=24 * 1024)
        wait_until_received(stack, list(shadows), 4000)
        rss, peak = rss_mb(stack)
        outcomes = check_accounts(stack, list(shadows))
        close_all(shadows)
    print(
        f"\n24 KiB bodies, {targets} slow target(s), defaults: agent RSS {rss:.1f} MB, peak {peak:.1f} MB "
        f"(at start {baseline:.1f} MB)\noutcomes: {outcomes}"
    )
    assert peak < MAX_RSS_MB, f"peak RSS {peak:.1f} MB"
    assert all(o.get("budget_exceeded", 0) > 0 for o in outcomes.values()), outcomes


@pytest.mark.parametrize("misbehave", ["headers_forever", "continue_forever"])
def test_a_shadow_cannot_inflate_the_agent_before_its_final_response(tmp_path: Path, misbehave: str) -> None:
    """Four requests to a shadow that streams header lines, or 100 Continue responses, without end
    (up to 32 MiB each): each ends as error_protocol, long before the 10 s timeout, and the agent's
    memory does not move."""
    shadow = SinkShadow(misbehave=misbehave, max_bytes=32 << 20)
    with shadow, mirror_stack(
        tmp_path, {}, lambda _: {"targets": [{"name": "bad", "url": shadow.url, "timeout": 10}]}
    ) as stack:
        _, baseline = rss_mb(stack)
        before = stack.metrics()
        started = time.monotonic()
        for n in range(4):
            assert httpx.get(f"{stack.url}/r{n}").status_code == 200
        outcomes = stack.settle("bad", 4, before, timeout=20)
        took = time.monotonic() - started
        rss, peak = rss_mb(stack)
    print(
        f"\n{misbehave}: outcomes {outcomes} in {took:.2f} s; "
        f"shadow sent {shadow.bytes_sent / 2**20:.1f} MiB; "
        f"agent RSS {rss:.1f} MB, peak {peak:.1f} MB (at start {baseline:.1f} MB)"
    )
    assert outcomes == {"error_protocol": 4}
    assert peak < baseline + 20, f"peak RSS {peak:.1f} MB, {baseline:.1f} MB at start"


def test_queued_requests_go_stale_instead_of_waiting_for_a_hung_shadow(tmp_path: Path) -> None:
    """A hung shadow (timeout 30 s) with 2 connections and max_queue_age 1 s: of 20 requests, 2 are
    in flight and the 18 queued are dropped as stale about a second after they were queued,
    instead of reaching the shadow minutes later."""
    shadow = SinkShadow(delay=None)
    config = {"name": "hung", "timeout": 30, "concurrency": 2, "pipeline_depth": 1, "max_queue_age": 1}
    with shadow, mirror_stack(tmp_path, {}, lambda _: {"targets": [{**config, "url": shadow.url}]}) as stack:
        before = stack.metrics()
        started = time.monotonic()
        stack.blast([(f"/r{n}", {}) for n in range(20)], concurrency=4)

        def stale() -> int:
            return stack.outcomes("hung")["stale"] - int(
                before.get('spoa_mirror_requests_total{outcome="stale",target="hung"}', 0)
            )

        wait_for(lambda: stale() == 18, 15, "18 stale requests")
        age = time.monotonic() - started
        outcomes = check_accounts(stack, ["hung"])
        shadow.close()
    print(f"\nstale after {age:.2f} s (max_queue_age 1 s); outcomes {outcomes}; shadow got {shadow.requests}")
    assert shadow.requests == 2
    assert outcomes["hung"] == {"stale": 18}


def test_an_opening_breaker_sheds_the_queue(tmp_path: Path) -> None:
    """A hung shadow, timeout 1 s, 2 connections, a breaker that opens on the first failure: of 20
    requests, 2 time out and the 18 queued behind them are dropped as circuit_open when it opens,
    instead of each waiting its turn to time out."""
    shadow = SinkShadow(delay=None)
    config = {
        "name": "hung",
        "timeout": 1,
        "concurrency": 2,
        "pipeline_depth": 1,
        "circuit_breaker": {"failure_threshold": 1, "backoff": 60},
    }
    with shadow, mirror_stack(tmp_path, {}, lambda _: {"targets": [{**config, "url": shadow.url}]}) as stack:
        before = stack.metrics()
        stack.blast([(f"/r{n}", {}) for n in range(20)], concurrency=4)
        outcomes = stack.settle("hung", 20, before, timeout=15)
    print(f"\noutcomes {outcomes}; shadow got {shadow.requests}")
    assert outcomes == {"error_timeout": 2, "circuit_open": 18}
    assert shadow.requests == 2


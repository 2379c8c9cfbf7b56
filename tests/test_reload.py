"""SIGHUP keeps what did not change, and every reload failure is survivable; through the real HAProxy
2.6 where traffic matters (tests/support/mirror_stack.py), the agent alone where only systemd's
view does.

Findings of the red-team pass, each failing on the code before this and passing now:
- five quick SIGHUPs with an unchanged config dropped queued requests as `shutdown` and opened a new
  set of `concurrency` connections each time (384 to a shadow whose concurrency is 64);
- a SIGHUP onto a non-PEM `ca_file` raised out of the reload: no `config.reload_failed`, systemd
  left in "reloading" (no READY=1), a phantom target in /metrics;
- after SIGHUP removed a hung target and SIGTERM followed, `agent.stopped` said `dropped 0` while
  the outcomes said `shutdown: 20`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.mirror_stack import mirror_stack, parse_metrics, series
from tests.support.procs import free_port, log_events, run_process, wait_for_port
from tests.support.sink_shadow import SinkShadow

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = 4


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def hung_target(shadow: SinkShadow, **extra: Any) -> dict[str, Any]:
    """A target on a shadow that never answers: what it is sent stays in flight (timeout 30 s) and
    what waits stays queued (max_queue_age 60 s) for the whole test."""
    return {
        "name": "hung",
        "url": shadow.url,
        "timeout": 30,
        "concurrency": CONCURRENCY,
        "pipeline_depth": 1,  # one request per connection: in flight = connections the shadow sees
        "max_queue_age": 60,
        **extra,
    }


@pytest.mark.haproxy
@pytest.mark.parametrize("change", ["unchanged", "headers", "connect_timeout"])
def test_quick_sighups_keep_the_queue_and_the_connections(tmp_path: Path, change: str) -> None:
    """20 requests to a hung shadow (4 in flight, 16 queued), then five SIGHUPs in a row, each
    followed by 4 more requests. With the config unchanged the target is kept as it is; with its
    headers changed it is rebuilt and takes over the queue and the connection pool; with its
    connect_timeout changed it gets a new pool, but takes over the queue and the slots of what is
    still in flight on the old one. Every way, nothing is dropped as `shutdown`, everything sent
    after is queued behind, and the shadow never sees more than the target's concurrency in
    connections."""
    shadow = SinkShadow(delay=None)
    # drain_timeout 60: a target retired by a reload keeps its in-flight requests (and their
    # slots) for the whole test, however slow the machine.
    with shadow, mirror_stack(
        tmp_path, {}, lambda _: {"drain_timeout": 60, "targets": [hung_target(shadow)]}
    ) as stack:
        stack.blast([(f"/first{n}", {}) for n in range(20)], concurrency=4)
        wait_for(lambda: shadow.requests == CONCURRENCY, 10, "the first requests in flight")
        for reload in range(1, 6):
            changed = {
                "unchanged": {},
                "headers": {"headers": {"X-Generation": str(reload)}},
                "connect_timeout": {"connect_timeout": 1 + reload / 10},
            }[change]
            stack.reload({"drain_timeout": 60, "targets": [hung_target(shadow, **changed)]})
            stack.wait_for_event("config.reloaded", count=reload, timeout=10)
            stack.blast([(f"/after{reload}-{n}", {}) for n in range(4)], concurrency=4)
        metrics = stack.metrics()
        account = stack.account("hung", metrics)
        depth = metrics[series("spoa_mirror_queue_depth", target="hung")]
        # Read before the stack stops: draining at SIGTERM sends what is queued as slots free up.
        connections, received = shadow.connections_accepted, shadow.requests
        shadow.close()  # what is in flight fails at once, so the agent's SIGTERM drain is quick
    print(
        f"\nafter 5 SIGHUPs ({change}): shadow accepted {connections} connections, got {received}; "
        f"queue depth {depth:g}; received {account.received}, in flight {account.in_flight}"
    )
    assert account.outcomes["shutdown"] == 0
    assert account.received == 40 == account.settled + account.in_flight
    assert depth == 40 - CONCURRENCY
    assert connections <= CONCURRENCY
    assert received == CONCURRENCY


@pytest.mark.haproxy
def test_shutdown_summary_counts_a_target_retired_by_reload(tmp_path: Path) -> None:
    """20 requests to a hung target and a healthy one; SIGHUP removes the hung one (it drains in the
    background until drain_timeout) and SIGTERM follows at once: `agent.stopped` says as many
    dropped as the outcomes count `shutdown`, all 20 of the retired target's."""
    hung, healthy = SinkShadow(delay=None), SinkShadow()

    def config(with_hung: bool) -> dict[str, Any]:
        targets = [hung_target(hung)] if with_hung else []
        return {"drain_timeout": 3, "targets": [*targets, {"name": "ok", "url": healthy.url}]}

    with hung, healthy, mirror_stack(tmp_path, {}, lambda _: config(True)) as stack:
        before = stack.metrics()
        stack.blast([(f"/r{n}", {}) for n in range(20)], concurrency=4)
        stack.settle("ok", 20, before)
        stack.reload(config(False))
        stack.wait_for_event("config.reloaded", timeout=10)
        stack.agent.popen.send_signal(signal.SIGTERM)
        assert stack.agent.popen.wait(30) == 0
        [stopped] = stack.agent_events("agent.stopped")
    shutdown = sum(outcomes.get("shutdown", 0) for outcomes in stopped["outcomes"].values())
    print(f"\nagent.stopped: drained {stopped['drained']}, dropped {stopped['dropped']}")
    print(f"outcomes: {stopped['outcomes']}")
    assert stopped["outcomes"]["hung"].get("shutdown") == 20
    assert stopped["dropped"] == shutdown == 20


class NotifySocket:
    """systemd's end of NOTIFY_SOCKET: a unix datagram socket."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(10)

    def next(self) -> set[str]:
        """The states of the next datagram (READY=1, RELOADING=1, ...); times out after 10 s."""
        return set(self.sock.recv(4096).decode().splitlines())


def test_reload_onto_a_non_pem_ca_file_keeps_the_old_config_and_tells_systemd(tmp_path: Path) -> None:
    """SIGHUP onto a config whose new https target has a CA file that is not PEM: the agent logs
    config.reload_failed naming the key, systemd hears RELOADING=1 then READY=1, the new target
    never shows in /metrics, and the old target is still there. (The HMAC key file is left 0644:
    the agent starts, and says so once, as config.secret_file_readable.)"""
    bad_ca = tmp_path / "not-a-ca.pem"
    bad_ca.write_text("this is not a certificate\n")
    key = tmp_path / "hmac.key"
    key.write_text("k" * 32)
    key.chmod(0o644)
    port, admin = free_port(), free_port()
    config_path = tmp_path / "agent.yaml"
    base = {
        "listen": {"port": port},
        "admin": {"port": admin},
        "log": {"format": "json"},
        "secrets": {"hmac_key_file": str(key)},
    }

    def write(targets: list[dict[str, Any]]) -> None:
        config_path.write_text(json.dumps({**base, "targets": targets}))

    with SinkShadow() as shadow, tempfile.TemporaryDirectory(prefix="sd-") as directory:
        notifications = NotifySocket(os.path.join(directory, "notify"))
        write([{"name": "old", "url": shadow.url}])
        argv = [sys.executable, "-m", "spoa_mirror", "--config", str(config_path), "--log-format", "json"]
        env = {**os.environ, "NOTIFY_SOCKET": notifications.path}
        with run_process(argv, name="agent", log_dir=tmp_path, env=env, cwd=ROOT) as agent:
            assert "READY=1" in notifications.next()
            wait_for_port("127.0.0.1", admin, process=agent.popen)
            wait_for(lambda: log_events(agent.stderr_text(), "agent.started"), 5, "agent.started")
            [readable] = log_events(agent.stderr_text(), "config.secret_file_readable")
            write(
                [
                    {"name": "old", "url": shadow.url},
                    {"name": "phantom", "url": "https://127.0.0.1:1/", "ca_file": str(bad_ca)},
                ]
            )
            agent.popen.send_signal(signal.SIGHUP)
            reloading, ready = notifications.next(), notifications.next()
            wait_for(lambda: log_events(agent.stderr_text(), "config.reload_failed"), 5, "reload_failed")
            [failed] = log_events(agent.stderr_text(), "config.reload_failed")
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as response:
                samples = parse_metrics(response.read().decode())
            agent.assert_running()
        notifications.sock.close()
    print(f"\nreload_failed: {failed['error']}")
    assert "RELOADING=1" in reloading and "READY=1" in ready
    assert "targets[1].ca_file" in failed["error"]
    assert (readable["key"], readable["mode"]) == ("secrets.hmac_key_file", "0644")
    assert not [name for name in samples if 'target="phantom"' in name]
    assert series("spoa_mirror_requests_received_total", target="old") in samples

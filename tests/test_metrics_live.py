"""What an SRE checks first, on a live agent: /metrics passes `promtool check metrics` with no
warning, has the build, process, circuit-breaker, reload and bytes-sent families, no empty label
value, and with `-n` workers one scrape shows every worker."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from spoa_mirror import __version__
from spoe import Message
from tests.support.mirror_stack import parse_metrics, series
from tests.support.procs import ManagedProcess, free_port, log_events
from tests.support.shadow import ShadowServer
from tests.support.spop_peer import TcpPeer, notify

AGENT = str(Path(sys.executable).with_name("spoa-mirror"))
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def message(path: str) -> Message:
    return Message(
        "mirror",
        {
            "arg_method": "POST",
            "arg_path": path,
            "arg_ver": "1.1",
            "arg_hdrs": "host: example.com\r\ncontent-type: text/plain\r\n\r\n",
            "arg_body": b"twelve bytes",
        },
    )


async def mirror(port: int, *paths: str) -> None:
    """One NOTIFY per path, each acknowledged, on one SPOP connection."""
    peer = await TcpPeer.connect(("127.0.0.1", port))
    try:
        await peer.handshake()
        for stream, path in enumerate(paths, start=1):
            await peer.send(notify(stream, 1, [message(path)]))
            await peer.recv_frame()
    finally:
        peer.close()


@contextmanager
def live_agent(tmp_path: Path, config: dict, *flags: str) -> Iterator[tuple[ManagedProcess, int, int, Path]]:
    port, admin = free_port(), free_port()
    path = tmp_path / "config.yaml"
    path.write_text(
        json.dumps({"listen": {"port": port}, "admin": {"port": admin}, "log": {"format": "json"}, **config})
    )
    process = ManagedProcess("agent", [AGENT, "--config", str(path), *flags], tmp_path)
    try:
        workers = int(flags[flags.index("-n") + 1]) if "-n" in flags else 1
        wait_for(lambda: len(log_events(process.stderr_text(), "agent.started")) >= workers, process)
        wait_for(lambda: _get(admin, "/readyz") == "ready\n", process)
        yield process, port, admin, path
    except BaseException as error:
        error.add_note(process.stderr_tail())
        raise
    finally:
        process.stop()


def wait_for(condition, process: ManagedProcess, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except OSError:
            pass
        process.assert_running()
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        time.sleep(0.05)


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return response.read().decode()


def assert_promtool_clean(text: str) -> None:
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.stdout + result.stderr
    )


def assert_no_empty_label_values(text: str) -> None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert all(value != "" for value in sample.labels.values()), sample


@pytest.mark.skipif(shutil.which("promtool") is None and not Path(PROMTOOL).exists(), reason="needs promtool")
def test_metrics_of_a_live_agent(tmp_path: Path) -> None:
    with ShadowServer() as live, ShadowServer(mode="drop") as flaky:
        config = {
            "targets": [
                {"name": "live", "url": live.url},
                {
                    "name": "flaky",
                    "url": flaky.url,
                    "circuit_breaker": {"failure_threshold": 1, "backoff": 0.3},
                },
            ]
        }
        with live_agent(tmp_path, config) as (agent, port, admin, config_path):
            asyncio.run(mirror(port, "/one", "/two"))
            received = live.wait_for(2)
            wait_for(
                lambda: parse_metrics(_get(admin, "/metrics"))[_outcome("flaky", "error_reset")] >= 1, agent
            )
            opened_text = _get(admin, "/metrics")

            flaky.mode = "ok"
            time.sleep(0.4)  # past the breaker's 0.3 s window: the next request is the probe
            asyncio.run(mirror(port, "/three"))
            flaky.wait_for(1)
            wait_for(lambda: log_events(agent.stderr_text(), "circuit.closed"), agent)

            agent.popen.send_signal(signal.SIGHUP)
            wait_for(lambda: log_events(agent.stderr_text(), "config.reloaded"), agent)
            config_path.write_text("targets: [{url: 'ftp://nope'}]\n")
            agent.popen.send_signal(signal.SIGHUP)
            wait_for(lambda: log_events(agent.stderr_text(), "config.reload_failed"), agent)
            bad_ca = tmp_path / "bad-ca.pem"
            bad_ca.write_text("not a certificate\n")
            config_path.write_text(
                json.dumps({"targets": [{"url": "https://127.0.0.1:9/", "ca_file": str(bad_ca)}]})
            )
            agent.popen.send_signal(signal.SIGHUP)  # a CA file that does not load: refused like a bad key
            wait_for(lambda: len(log_events(agent.stderr_text(), "config.reload_failed")) == 2, agent)
            final_text = _get(admin, "/metrics")
            logs = agent.stderr_text()

    for text in (opened_text, final_text):
        assert_promtool_clean(text)
        assert_no_empty_label_values(text)
    opened, final = parse_metrics(opened_text), parse_metrics(final_text)

    build = [key for key in final if key.startswith("spoa_mirror_build_info{")]
    assert build == [
        series(
            "spoa_mirror_build_info",
            event_loop=_loop(build[0]),
            python=_python(build[0]),
            version=__version__,
        )
    ]
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"):
        assert final[name] > 0, name

    assert opened[series("spoa_mirror_circuit_breaker_state", state="open", target="flaky")] == 1
    assert opened[series("spoa_mirror_circuit_breaker_state", state="closed", target="flaky")] == 0
    assert opened[series("spoa_mirror_circuit_breaker_state", state="closed", target="live")] == 1
    assert final[series("spoa_mirror_circuit_breaker_state", state="closed", target="flaky")] == 1
    [opened_event] = log_events(logs, "circuit.opened")
    assert opened_event["target"] == "flaky" and opened_event["level"] == "warning"
    assert [event["target"] for event in log_events(logs, "circuit.closed")] == ["flaky"]

    # Every byte the live shadow received, counted: head and body of each request.
    assert final[series("spoa_mirror_sent_bytes_total", target="live")] == sum(
        len(r.raw) for r in received + live.requests[2:]
    )

    assert final[series("spoa_mirror_config_reloads_total", result="success")] == 1
    assert final[series("spoa_mirror_config_reloads_total", result="failure")] == 2
    assert (
        "targets[0].ca_file: cannot load CA certificates"
        in log_events(logs, "config.reload_failed")[1]["error"]
    )
    reloaded_at = final["spoa_mirror_config_last_reload_success_timestamp_seconds"]
    assert opened["spoa_mirror_config_last_reload_success_timestamp_seconds"] < reloaded_at <= time.time()


def _outcome(target: str, outcome: str) -> str:
    return series("spoa_mirror_requests_total", outcome=outcome, target=target)


def _loop(key: str) -> str:
    return key.split('event_loop="')[1].split('"')[0]


def _python(key: str) -> str:
    return key.split('python="')[1].split('"')[0]


def test_one_scrape_shows_every_worker(tmp_path: Path) -> None:
    """With -n 2 the supervisor's admin port serves both workers' metrics with a worker label (and
    its own process metrics as worker="supervisor"); what each worker mirrored adds up."""
    config = {"targets": [{"name": "shadow", "url": "SHADOW"}]}
    with ShadowServer() as shadow:
        config["targets"][0]["url"] = shadow.url
        with live_agent(tmp_path, config, "-n", "2") as (agent, port, admin, _):
            for batch in range(6):  # new connections, spread by the kernel over the two sockets
                asyncio.run(mirror(port, f"/batch-{batch}"))
            shadow.wait_for(6)
            wait_for(
                lambda: (
                    sum(
                        parse_metrics(_get(admin, "/metrics")).get(_worker_outcome(worker), 0)
                        for worker in "01"
                    )
                    == 6
                ),
                agent,
            )
            text = _get(admin, "/metrics")
    assert_promtool_clean(text)
    assert_no_empty_label_values(text)
    metrics = parse_metrics(text)
    for worker in ("0", "1", "supervisor"):
        assert metrics[series("process_open_fds", worker=worker)] > 0
        assert (
            series(
                "spoa_mirror_build_info",
                event_loop=_loop(text),
                python=_python(text),
                version=__version__,
                worker=worker,
            )
            in metrics
        )
    assert metrics[series("spoa_mirror_workers", state="running")] == 2


def _worker_outcome(worker: str) -> str:
    return series("spoa_mirror_requests_total", outcome="sent_2xx", target="shadow", worker=worker)

"""The whole chain for end-to-end tests: client -> HAProxy (`filter spoe`) -> spoa-mirror (a real
subprocess) -> recording shadow servers.

    config = lambda s: {"targets": [{"name": "a", "url": s["a"].url}]}
    with mirror_stack(tmp_path, {"a": "ok"}, config) as stack:
        before = stack.metrics()
        httpx.get(stack.url + "/x")
        assert stack.settle("a", 1, before) == {"sent_2xx": 1}
        assert stack.shadows["a"].requests[0].target == "/x"

The shadows start first, so the agent config (a dict, written as YAML) is built by a function of
them; the stack adds `listen`, `admin` and JSON logs. HAProxy answers every request itself with 200
(`http-request return`) once the SPOE event is done, so its response proves the agent ACKed, and a
response header `X-Spoe-Error` shows any SPOE error (timeout, frame too big...) for that request.
HAProxy runs one thread, so it holds one SPOP connection while traffic is sequential (a test can
count them).
Everything is stopped on the way out, the agent with SIGTERM like a service manager would.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from spoa_mirror.accounting import OUTCOMES
from tests.support.procs import (
    HAProxyProcess,
    ManagedProcess,
    current_haproxy,
    free_port,
    log_events,
    run_haproxy,
    run_process,
)
from tests.support.shadow import ShadowServer

ROOT = Path(__file__).resolve().parents[2]

# The message the mirror needs (the contract in spoa_mirror/message.py).
MIRROR_ARGS = (
    "arg_method=method arg_path=url arg_ver=req.ver arg_hdrs=req.hdrs arg_body=req.body "
    "body_len=req.body_len src=src unique_id=unique-id"
)

SPOE_CONFIG = Template("""\
[mirror]
spoe-agent mirror_agent
    messages $messages
    use-backend spoe-mirror
    option var-prefix mirror
    option set-on-error error
    timeout hello 2s
    timeout idle 30s
    timeout processing $processing
    option async
    option pipelining
$agent_options
$message_sections
""")

HAPROXY_CONFIG = Template("""\
global
    nbthread 1
    tune.bufsize $bufsize

defaults
    mode http
    timeout connect 1s
    timeout client 10s
    timeout server 10s

frontend web
    bind 127.0.0.1:$http_port
$extra_binds    option http-buffer-request
    filter spoe engine mirror config $spoe_config
$answer
backend spoe-mirror
    mode $agents_mode
    timeout connect 1s
    timeout server 30s
    server agent1 127.0.0.1:$agent_port$server_options
""")

_ANSWER = (
    "    http-request return status 200 content-type text/plain string ok "
    'hdr X-Spoe-Error "%[var(txn.mirror.error)]"\n'
)
_PRIMARY = Template("""\
    http-response set-header X-Spoe-Error "%[var(txn.mirror.error)]" if { var(txn.mirror.error) -m found }
    default_backend primary

backend primary
    server primary $primary
""")

ConfigFactory = Callable[[Mapping[str, ShadowServer]], dict[str, Any]]


@dataclass
class SpoeMessage:
    """One `spoe-message` section: its args and an optional ACL condition on its event."""

    name: str = "mirror"
    args: str = MIRROR_ARGS
    condition: str = ""

    def section(self) -> str:
        event = "on-frontend-http-request" + (f" {self.condition}" if self.condition else "")
        return f"spoe-message {self.name}\n    args {self.args}\n    event {event}\n"


@dataclass
class MirrorStack:
    url: str  # HAProxy's frontend
    admin_url: str
    haproxy: HAProxyProcess
    agent: ManagedProcess
    shadows: dict[str, ShadowServer]
    config_path: Path
    base_config: dict[str, Any]  # listen, admin and log, kept on reloads

    @property
    def http_port(self) -> int:
        return int(self.url.rpartition(":")[2])

    def blast(
        self, requests: Sequence[tuple[str, Mapping[str, str]]], concurrency: int = 20
    ) -> list[Response]:
        """GET each (path, headers) through HAProxy over `concurrency` keep-alive connections, as fast
        as the stack answers; responses in request order. A raw client: httpx manages ~350
        requests a second here, this one ~6,000, which keeps load tests short."""
        return asyncio.run(_blast(self.http_port, requests, concurrency))

    # -- metrics -----------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, keyed `name{label="value",...}` with labels sorted by name
        (plain `name` without labels), e.g. `spoa_mirror_requests_total{outcome="sent_2xx",target="a"}`."""
        return parse_metrics(self.metrics_text())

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"{self.admin_url}/metrics", timeout=5) as response:
            return response.read().decode()

    def outcomes(self, target: str, metrics: Mapping[str, float] | None = None) -> dict[str, int]:
        """Every outcome of one target, zeros included."""
        metrics = self.metrics() if metrics is None else metrics
        return {
            outcome: int(metrics.get(series("spoa_mirror_requests_total", outcome=outcome, target=target), 0))
            for outcome in OUTCOMES
        }

    def account(self, target: str, metrics: Mapping[str, float] | None = None) -> Account:
        metrics = self.metrics() if metrics is None else metrics
        return Account(
            received=int(metrics.get(series("spoa_mirror_requests_received_total", target=target), 0)),
            in_flight=int(metrics.get(series("spoa_mirror_in_flight", target=target), 0)),
            outcomes=self.outcomes(target, metrics),
        )

    def settle(
        self, target: str, count: int, since: Mapping[str, float], timeout: float = 10.0
    ) -> dict[str, int]:
        """Wait until `target` has been offered `count` requests since the `since` snapshot of
        `metrics()` and none is in flight; returns the outcomes of those requests (non-zero ones).
        Fails if more than `count` arrive (the test sent more than it thinks) or never `count`."""
        before = self.account(target, since)
        deadline = time.monotonic() + timeout
        while True:
            now = self.account(target)
            received = now.received - before.received
            assert received <= count, f"{target}: {received} requests offered, expected {count}"
            if received == count and now.in_flight == 0:
                return {
                    outcome: delta
                    for outcome, total in now.outcomes.items()
                    if (delta := total - before.outcomes[outcome])
                }
            if time.monotonic() > deadline:
                raise TimeoutError(f"{target}: {received} of {count} offered, {now.in_flight} in flight")
            time.sleep(0.02)

    # -- logs --------------------------------------------------------------------------------

    def agent_logs(self) -> str:
        return self.agent.stdout_text() + self.agent.stderr_text()

    def agent_events(self, event: str) -> list[dict[str, Any]]:
        """The agent's JSON log lines named `event`."""
        return log_events(self.agent.stderr_text(), event)

    def wait_for_event(self, event: str, count: int = 1, timeout: float = 5.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(events := self.agent_events(event)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"agent logged {len(events)} {event!r}, expected {count}")
            time.sleep(0.02)
        return events

    # -- lifecycle ---------------------------------------------------------------------------

    def reload(self, config: dict[str, Any]) -> None:
        """Write a new agent config and SIGHUP the agent; the caller waits for the log event it
        expects (`config.reloaded` or `config.reload_failed`)."""
        write_config(self.config_path, {**config, **self.base_config})
        self.agent.popen.send_signal(signal.SIGHUP)


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # names lower-cased


async def _blast(
    port: int, requests: Sequence[tuple[str, Mapping[str, str]]], concurrency: int
) -> list[Response]:
    pending = list(enumerate(requests))[::-1]
    responses: list[Response | None] = [None] * len(requests)

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while pending:
                index, (path, headers) = pending.pop()
                lines = [
                    f"GET {path} HTTP/1.1",
                    "Host: mirror.test",
                    *(f"{k}: {v}" for k, v in headers.items()),
                ]
                writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                fields = dict(line.split(": ", 1) for line in head[1:] if line)
                response = Response(int(head[0].split()[1]), {k.lower(): v for k, v in fields.items()})
                await reader.readexactly(int(response.headers.get("content-length", 0)))
                responses[index] = response
        finally:
            writer.close()

    await asyncio.wait_for(asyncio.gather(*(connection() for _ in range(concurrency))), 60)
    assert all(response is not None for response in responses)
    return responses  # type: ignore[return-value]


@dataclass
class Account:
    received: int
    in_flight: int
    outcomes: dict[str, int]

    @property
    def settled(self) -> int:
        return sum(self.outcomes.values())


def parse_metrics(text: str) -> dict[str, float]:
    """Every sample of a /metrics page, keyed by `series`."""
    return {
        series(sample.name, **sample.labels): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def series(name: str, **labels: str) -> str:
    """The `metrics()` key of one sample."""
    if not labels:
        return name
    return name + "{" + ",".join(f'{key}="{labels[key]}"' for key in sorted(labels)) + "}"


def _wait_started(agent: ManagedProcess, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        for line in agent.stderr_text().splitlines():
            if line.startswith("{") and (record := json.loads(line)).get("event") == "agent.started":
                return record
        agent.assert_running()
        if time.monotonic() > deadline:
            raise TimeoutError(f"the agent did not log agent.started within {timeout} s")
        time.sleep(0.02)


def write_config(path: Path, config: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def write_haproxy_config(
    directory: Path,
    agent_port: int,
    http_port: int,
    *,
    bufsize: int = 16384,
    processing: str = "500ms",
    agent_options: str = "",
    messages: tuple[SpoeMessage, ...] = (SpoeMessage(),),
    server_options: str = "",
    extra_binds: tuple[str, ...] = (),
    primary: str | None = None,
) -> str:
    """HAProxy's config for `filter spoe` to the agent on 127.0.0.1:`agent_port`, answering on
    127.0.0.1:`http_port`; its SPOE file is written to `directory`. `agent_options` are extra
    `spoe-agent` lines, `server_options` go on the agent's `server` line, `extra_binds` are more
    `bind` lines of the frontend (address and options, e.g. `127.0.0.1:8443 ssl crt x.pem alpn h2`).
    `primary` (a `server` line's address and options, e.g. `127.0.0.1:5000 proto h2`) makes HAProxy
    forward requests to that server instead of answering them itself."""
    spoe_config = directory / "mirror.spoe.conf"
    spoe_config.write_text(
        SPOE_CONFIG.substitute(
            messages=" ".join(message.name for message in messages),
            processing=processing,
            agent_options="\n".join(f"    {line.strip()}" for line in agent_options.splitlines()),
            message_sections="\n".join(message.section() for message in messages),
        )
    )
    return HAPROXY_CONFIG.substitute(
        agents_mode=current_haproxy().agents_mode,
        bufsize=bufsize,
        http_port=http_port,
        spoe_config=spoe_config,
        agent_port=agent_port,
        server_options=f" {server_options}" if server_options else "",
        extra_binds="".join(f"    bind {bind}\n" for bind in extra_binds),
        answer=_ANSWER if primary is None else _PRIMARY.substitute(primary=primary),
    )


@contextmanager
def mirror_stack(
    tmp_path: Path,
    shadows: Mapping[str, str],
    config: ConfigFactory,
    *,
    bufsize: int = 16384,
    max_frame_size: int | None = None,
    processing: str = "500ms",
    agent_options: str = "",
    messages: tuple[SpoeMessage, ...] = (SpoeMessage(),),
    extra_binds: tuple[str, ...] = (),
    primary: str | None = None,
) -> Iterator[MirrorStack]:
    """Start shadows (name -> ShadowServer mode), the agent on `config(shadows)`, then HAProxy.

    `max_frame_size` is the agent's `listen.max_frame_size`, by default tune.bufsize: HAProxy
    encodes the first NOTIFYs of a connection for its own frame size (bufsize - 4) before the
    agent's HELLO tells it otherwise, so a smaller agent frame fails those with SPOE error 3.
    `agent_options` are extra `spoe-agent` lines, `extra_binds` more `bind` lines of the frontend,
    `primary` a server HAProxy forwards to instead of answering (see `write_haproxy_config`)."""
    with ExitStack() as stack:
        servers = {name: stack.enter_context(ShadowServer(mode=mode)) for name, mode in shadows.items()}
        # The agent picks its own ports (0) and says which in `agent.started`: no race with another
        # process for them, and no probe connection counted in spoa_mirror_spop_connections_total.
        base = {
            "listen": {"port": 0, "max_frame_size": max_frame_size or bufsize},
            "admin": {"port": 0},
            "log": {"format": "json"},
        }
        config_path = tmp_path / "agent.yaml"
        write_config(config_path, {**config(servers), **base})
        # `python -m` from the repository root runs this checkout's agent, wherever the venv's
        # editable install (and so the `spoa-mirror` console script) happens to point.
        argv = [sys.executable, "-m", "spoa_mirror", "--config", str(config_path), "--log-format", "json"]
        agent = stack.enter_context(run_process(argv, name="spoa-mirror", log_dir=tmp_path, cwd=ROOT))
        started = _wait_started(agent)
        agent_port = int(started["listen"][0].rpartition(":")[2])
        admin_port = int(started["admin"].rpartition(":")[2])
        http_port = free_port()  # after the shadows bound theirs, so it cannot be one of them
        haproxy_config = write_haproxy_config(
            tmp_path,
            agent_port,
            http_port,
            bufsize=bufsize,
            processing=processing,
            agent_options=agent_options,
            messages=messages,
            extra_binds=extra_binds,
            primary=primary,
        )
        haproxy = stack.enter_context(run_haproxy(haproxy_config, tmp_path))
        yield MirrorStack(
            url=f"http://127.0.0.1:{http_port}",
            admin_url=f"http://127.0.0.1:{admin_port}",
            haproxy=haproxy,
            agent=agent,
            shadows=servers,
            config_path=config_path,
            base_config=base,
        )

"""The engine against the real HAProxy 2.6: HTTP request in, SPOP NOTIFY to the echo agent, ACK with
set-var actions, HAProxy answers with the variables in response headers.

HAProxy answers every request itself (`http-request return ... hdr X-Method %[var(txn.e.method)]`):
the SPOE event `on-frontend-http-request` runs before the `http-request` rules, so the variables are
set by the time `return` builds its headers, and no HTTP backend is needed. A header whose variable
is unset is left out of the response.

Facts of HAProxy 2.6.12 these tests pin (seen on the wire through the echo agent's `--wire-log`):
* its HAPROXY-HELLO offers `supported-versions` "2.0", `max-frame-size` = the spoe-agent's
  max-frame-size (default tune.bufsize - 4), `capabilities` "pipelining,async" by default (each one
  only while its option is on), never "fragmentation", and an `engine-id` (new on every reload);
* it still sends fragmented NOTIFYs (a NOTIFY without FIN, then UNSET frames) to an agent that
  announces "fragmentation", when a message does not fit in the negotiated frame size (option
  send-frag-payload is on by default);
* it encodes a NOTIFY for the frame size it last negotiated, initially its own max-frame-size: a
  message larger than the agent's frames but within HAProxy's fails with SPOP status 3 (frame too
  big, set-on-error 259) until a HELLO has told HAProxy the agent's size. Configure the spoe-agent
  `max-frame-size` to the agent's;
* to an agent that does not announce fragmentation, nothing oversized is sent, truncated or not:
  after the first HELLO, HAProxy sends HAPROXY-DISCONNECT 10 "fragmentation not supported" right
  after each HELLO and reconnects in a loop until `timeout processing` (set-on-error 1, timeout);
  with `no option send-frag-payload` such an event fails at once (set-on-error 3);
* a health check (`option spop-check`) is a HELLO with `capabilities` "", `healthcheck` true and no
  `engine-id`; the server is UP when the agent answers with AGENT-HELLO;
* with the agent down, a request waits `timeout processing` then proceeds without the variables
  (set-on-error 1); once a health check has marked the agent server DOWN, it proceeds at once
  (set-on-error 2, resource allocation);
* on a reload the old worker ends its SPOP connections with HAPROXY-DISCONNECT 0 "normal".

Every test runs on 3.2 too (tests/conftest.py), where HAProxy 3.2.26 differs, and the tests say so:
its HELLO offers "pipelining" or nothing (`option async` is ignored); it never fragments, so a
message larger than the negotiated frame fails every time (SPOE error 3, or 259 when encoded for its
own frame size), `send-frag-payload` or not, and without any HAPROXY-DISCONNECT; with the agent
server DOWN it fails at once with SPOP status 1 (257); a reload's old worker closes its SPOP
connection without a frame. Its health-check HELLO is 2.6's.
"""

from __future__ import annotations

import asyncio
import csv
import io
import random
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from string import Template

import httpx
import pytest

from tests.conftest import EchoAgentFactory
from tests.support.procs import (
    HAProxyProcess,
    HAProxyRelease,
    ManagedProcess,
    current_haproxy,
    free_port,
    log_events,
    run_haproxy,
    run_nginx,
)

pytestmark = pytest.mark.haproxy

BUFSIZE = 131072  # tune.bufsize: a 64 KB body fits in the request buffer, so req.body sees all of it
BODY_SIZES = (0, 1024, 65536)

SPOE_CONFIG = Template("""\
[e]
spoe-agent echo
    log global
    messages check
    option var-prefix e
    option set-on-error error
$agent_options
    timeout hello 2s
    timeout idle 10s
    timeout processing $processing
    use-backend spoe-agents

spoe-message check
    args method=method path=path body=req.body
    event on-frontend-http-request
""")

HAPROXY_CONFIG = Template("""\
global
    log stderr format raw local0 info
    tune.bufsize $bufsize
    stats socket ipv4@127.0.0.1:$stats_port level admin

defaults
    mode http
    log global
    option httplog
    timeout connect 1s
    timeout client 10s
    timeout server 10s

frontend web
    bind 127.0.0.1:$http_port
    option http-buffer-request
    filter spoe engine e config $spoe_config
$responder

backend spoe-agents
    mode $agents_mode
    timeout server 30s
$backend_options
    server echo 127.0.0.1:$agent_port$server_options
""")


# HAProxy answers itself; a header whose variable is unset is left out.
HAPROXY_ANSWERS = """\
    http-request return status 200 content-type text/plain string ok hdr X-Method "%[var(txn.e.method)]" \
hdr X-Path "%[var(txn.e.path)]" hdr X-Body-Len "%[var(txn.e.body_len)]" hdr X-Seen "%[var(txn.e.seen)]" \
hdr X-Spoe-Error "%[var(txn.e.error)]"
"""

# The deployment shape: the request goes on to a real server; txn variables set by the agent during
# the request are still there for the response rules.
NGINX_ANSWERS = Template("""\
    http-response set-header X-Method "%[var(txn.e.method)]"
    http-response set-header X-Path "%[var(txn.e.path)]"
    http-response set-header X-Body-Len "%[var(txn.e.body_len)]"
    http-response set-header X-Seen "%[var(txn.e.seen)]"
    http-response set-header X-Spoe-Error "%[var(txn.e.error)]" if { var(txn.e.error) -m found }
    default_backend nginx

backend nginx
    server nginx 127.0.0.1:$nginx_port
""")


@dataclass
class Stack:
    url: str
    haproxy: HAProxyProcess
    agent: ManagedProcess | None

    def agent_events(self, event: str) -> list[dict]:
        assert self.agent is not None
        return log_events(self.agent.stderr_text(), event)

    def frames(self, direction: str = "haproxy>agent", frame_type: str | None = None) -> list[dict]:
        """Frames the `--wire-log` relay saw, in order; `direction` "haproxy>agent" or "agent>haproxy"."""
        return [
            f
            for f in self.agent_events("wire.frame")
            if f["dir"] == direction and frame_type in (None, f["type"])
        ]

    def haproxy_hellos(self) -> list[dict]:
        return [f["items"] for f in self.frames() if f["type"] == "HAPROXY_HELLO"]


@contextmanager
def spoe_stack(
    tmp_path: Path,
    echo_agent: EchoAgentFactory | None,
    *,
    agent_options: str = "",
    agent_args: tuple[str, ...] = (),
    processing: str = "2s",
    backend_options: str = "",
    server_options: str = "",
    responder: str = HAPROXY_ANSWERS,
    master_worker: bool = False,
) -> Iterator[Stack]:
    """The echo agent (none if `echo_agent` is None: the agent is down) behind HAProxy; both are
    stopped at exit. The options are spliced into SPOE_CONFIG and HAPROXY_CONFIG."""
    agent_port, http_port = free_port(), free_port()
    spoe_config = tmp_path / "spoe.conf"
    spoe_config.write_text(
        SPOE_CONFIG.substitute(agent_options=_indent(agent_options), processing=processing)
    )
    haproxy_config = HAPROXY_CONFIG.substitute(
        agents_mode=current_haproxy().agents_mode,
        bufsize=BUFSIZE,
        stats_port=free_port(),
        http_port=http_port,
        spoe_config=spoe_config,
        responder=responder.rstrip("\n"),
        backend_options=_indent(backend_options),
        agent_port=agent_port,
        server_options=f" {server_options}" if server_options else "",
    )
    with ExitStack() as processes:
        agent = None if echo_agent is None else processes.enter_context(echo_agent(agent_port, *agent_args))
        haproxy = processes.enter_context(run_haproxy(haproxy_config, tmp_path, master_worker=master_worker))
        yield Stack(f"http://127.0.0.1:{http_port}", haproxy, agent)


def _indent(lines: str) -> str:
    return "\n".join(f"    {line.strip()}" for line in lines.strip().splitlines())


def http_client(stack: Stack) -> httpx.Client:
    return httpx.Client(base_url=stack.url, timeout=10, trust_env=False)


def assert_echoed(response: httpx.Response, method: str, path: str, body_len: int) -> None:
    assert response.status_code == 200
    headers = response.headers
    assert "x-spoe-error" not in headers, f"SPOE error {headers['x-spoe-error']}"
    assert headers["x-method"] == method
    assert headers["x-path"] == path
    assert headers["x-body-len"] == str(body_len)
    assert headers["x-seen"] == "body,method,path"


def exchange_all_sizes(stack: Stack) -> None:
    """A GET, then a POST of each size, on one keep-alive connection."""
    with http_client(stack) as client:
        assert_echoed(client.get("/get/me?query=1"), "GET", "/get/me", 0)
        for size in BODY_SIZES:
            response = client.post(f"/post/{size}", content=random.randbytes(size))
            assert_echoed(response, "POST", f"/post/{size}", size)


# The spoe-agent options HAProxy turns into its HELLO capabilities, and what it then offers.
PROTOCOL_MODES = {
    "pipelining+async": ("option pipelining\noption async", "pipelining,async"),
    "pipelining": ("option pipelining\nno option async", "pipelining"),
    "async": ("no option pipelining\noption async", "async"),
    "neither": ("no option pipelining\nno option async", ""),
}


@pytest.mark.parametrize("handler", ["sync", "async"])
@pytest.mark.parametrize("mode", PROTOCOL_MODES)
def test_echo_round_trip(tmp_path: Path, echo_agent: EchoAgentFactory, mode: str, handler: str) -> None:
    """Every combination of HAProxy's pipelining and async with a plain and a coroutine handler.
    The agent's frames are large enough (128 KB) that no payload is fragmented here."""
    agent_options, _ = PROTOCOL_MODES[mode]
    agent_args = ("--max-frame-size", str(BUFSIZE))
    if handler == "async":
        agent_args += ("--async-delay", "0.005")
    with spoe_stack(tmp_path, echo_agent, agent_options=agent_options, agent_args=agent_args) as stack:
        exchange_all_sizes(stack)
        assert not stack.agent_events("spop.protocol_error")


@pytest.mark.parametrize("mode", PROTOCOL_MODES)
def test_haproxy_hello_offers_options_but_never_fragmentation(
    tmp_path: Path, echo_agent: EchoAgentFactory, mode: str, haproxy_release: HAProxyRelease
) -> None:
    """What HAProxy offers decides what the engine may negotiate: pipelining and async follow the
    spoe-agent options on 2.6; 3.2 ignores `option async` (deprecated) and offers pipelining alone;
    fragmentation is never offered (the engine announces it on its own)."""
    agent_options, capabilities = PROTOCOL_MODES[mode]
    if haproxy_release.at_least_3_1:
        capabilities = "pipelining" if "pipelining" in capabilities else ""
    with spoe_stack(tmp_path, echo_agent, agent_options=agent_options, agent_args=("--wire-log",)) as stack:
        with http_client(stack) as client:
            assert_echoed(client.get("/"), "GET", "/", 0)
        hello = stack.haproxy_hellos()[0]
    assert hello["supported-versions"] == "2.0"
    assert hello["capabilities"] == capabilities
    assert hello["max-frame-size"] == BUFSIZE - 4
    assert hello["engine-id"]
    assert "healthcheck" not in hello


def test_small_frames_carry_a_large_body_in_fragments(
    tmp_path: Path, echo_agent: EchoAgentFactory, haproxy_release: HAProxyRelease
) -> None:
    """max-frame-size 512 on both sides: a 64 KB body can only reach the engine in fragments, which
    HAProxy 2.6 sends although its own HELLO does not offer fragmentation. 3.2 never fragments: a
    message that does not fit a frame fails (SPOE error 3) and nothing of it is sent."""
    agent_options = "option send-frag-payload\nmax-frame-size 512"
    agent_args = ("--max-frame-size", "512", "--wire-log")
    with spoe_stack(tmp_path, echo_agent, agent_options=agent_options, agent_args=agent_args) as stack:
        if haproxy_release.at_least_3_1:
            with http_client(stack) as client:
                assert_echoed(client.post("/small", content=bytes(10)), "POST", "/small", 10)
                for size in BODY_SIZES[1:]:
                    assert client.post(f"/post/{size}", content=bytes(size)).headers["x-spoe-error"] == "3"
            frames = stack.frames()
            assert all(f["fin"] and f["length"] <= 512 for f in frames)
            assert [f["type"] for f in frames if f["type"] in ("NOTIFY", "UNSET")] == ["NOTIFY"]
            return
        exchange_all_sizes(stack)
        frames = stack.frames()
        (hello,) = {f["items"]["capabilities"] for f in stack.frames("agent>haproxy", "AGENT_HELLO")}
    assert "fragmentation" in hello.split(",")
    assert all(f["length"] <= 512 for f in frames)
    fragments_of_64k = 65536 // 512
    assert sum(f["type"] == "UNSET" for f in frames) > fragments_of_64k
    assert any(f["type"] == "NOTIFY" and not f["fin"] for f in frames)


def test_large_first_request_fails_when_haproxy_frames_exceed_the_agents(
    tmp_path: Path, echo_agent: EchoAgentFactory, haproxy_release: HAProxyRelease
) -> None:
    """HAProxy encodes a NOTIFY before it has a connection, for the frame size it last negotiated,
    initially its own max-frame-size (tune.bufsize - 4 here). A message between the agent's
    max-frame-size and that is then refused as too big (SPOP status 3), although the agent
    announces fragmentation; once a HELLO has told HAProxy the agent's size, 2.6 fragments, while
    3.2, which never fragments, refuses every such message. So set the spoe-agent's `max-frame-size`
    to the agent's."""
    with (
        spoe_stack(tmp_path, echo_agent, agent_args=("--max-frame-size", "16384")) as stack,
        http_client(stack) as client,
    ):
        first = client.post("/big", content=bytes(65536))
        second = client.post("/big", content=bytes(65536))
    assert first.headers["x-spoe-error"] == str(256 + 3)
    if haproxy_release.at_least_3_1:
        assert second.headers["x-spoe-error"] == str(256 + 3)
    else:
        assert_echoed(second, "POST", "/big", 65536)


def test_agent_without_fragmentation_gets_no_oversized_notify(
    tmp_path: Path, echo_agent: EchoAgentFactory, haproxy_release: HAProxyRelease
) -> None:
    """An agent that does not announce fragmentation never receives a message larger than its
    frames: HAProxy neither truncates nor fragments it, and the request goes on without the
    variables. On 2.6 how it fails depends on whether HAProxy has learnt the agent's frame size yet;
    3.2 refuses it the same way every time, at once, without disconnecting."""
    agent_args = ("--capability", "pipelining", "async", "--wire-log")
    with spoe_stack(tmp_path, echo_agent, agent_args=agent_args, processing="300ms") as stack:
        with http_client(stack) as client:
            # Encoded for HAProxy's own max-frame-size, refused once the agent's HELLO says 16384.
            before_handshake = client.post("/big", content=bytes(65536))
            small = client.post("/small", content=bytes(100))
            # Now cut into 16 KB fragments, which no connection may carry: HAPROXY-DISCONNECT 10
            # after each HELLO, reconnections until `timeout processing`.
            after_handshake = client.post("/big", content=bytes(65536))
        disconnects = [f["items"] for f in stack.frames() if f["type"] == "HAPROXY_DISCONNECT"]
        notifies = [f for f in stack.frames() if f["type"] == "NOTIFY"]
    assert before_handshake.headers["x-spoe-error"] == str(256 + 3)  # SPOP status 3: frame too big
    assert_echoed(small, "POST", "/small", 100)
    assert "x-method" not in before_handshake.headers and "x-method" not in after_handshake.headers
    assert [n["fin"] for n in notifies] == [True]
    if haproxy_release.at_least_3_1:
        assert after_handshake.headers["x-spoe-error"] == str(256 + 3)
        assert not disconnects
        return
    assert after_handshake.headers["x-spoe-error"] == "1"  # timeout
    assert disconnects
    assert {d["status-code"] for d in disconnects} == {10}


def test_no_send_frag_payload_fails_oversized_event_at_once(
    tmp_path: Path, echo_agent: EchoAgentFactory, haproxy_release: HAProxyRelease
) -> None:
    """With `no option send-frag-payload` an oversized message is an error 3 (payload too big, not
    fragmented; 259, SPOP status 3, on 3.2, which ignores the option) for that request only, and
    nothing is sent for it."""
    with spoe_stack(
        tmp_path, echo_agent, agent_options="no option send-frag-payload", agent_args=("--wire-log",)
    ) as stack:
        with http_client(stack) as client:
            small = client.post("/small", content=bytes(100))  # first learns the agent's frame size
            big = client.post("/big", content=bytes(65536))
            started = time.monotonic()
            small_again = client.post("/small", content=bytes(100))
            elapsed = time.monotonic() - started
        notifies = [f for f in stack.frames() if f["type"] == "NOTIFY"]
    assert big.headers["x-spoe-error"] == (str(256 + 3) if haproxy_release.at_least_3_1 else "3")
    assert "x-body-len" not in big.headers
    assert_echoed(small, "POST", "/small", 100)
    assert_echoed(small_again, "POST", "/small", 100)
    print(f"\nthe request after the oversized one took {elapsed * 1000:.1f} ms")  # a figure only
    assert [n["fin"] for n in notifies] == [True, True]


def server_stat(haproxy: HAProxyProcess, backend: str, server: str) -> dict[str, str]:
    """The server's row of `show stat` (CSV)."""
    text = haproxy.cli("show stat").removeprefix("# ")
    for row in csv.DictReader(io.StringIO(text)):
        if row["pxname"] == backend and row["svname"] == server:
            return row
    raise AssertionError(f"no {backend}/{server} in show stat:\n{text}")


def wait_for_server_status(haproxy: HAProxyProcess, status: str, timeout: float = 5.0) -> dict[str, str]:
    """Poll the agent server's `show stat` row until it has `status`; the last row after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        row = server_stat(haproxy, "spoe-agents", "echo")
        if row["status"] == status or time.monotonic() > deadline:
            return row
        time.sleep(0.05)


def test_spop_check_marks_agent_up(tmp_path: Path, echo_agent: EchoAgentFactory) -> None:
    """`option spop-check` sends a HELLO flagged as a health check; the engine answers it like any
    HELLO and closes, which HAProxy counts as L7OK, and real traffic then flows as usual."""
    with spoe_stack(
        tmp_path,
        echo_agent,
        agent_args=("--wire-log",),
        backend_options="option spop-check",
        server_options="check inter 200ms",
    ) as stack:
        row = wait_for_server_status(stack.haproxy, "UP")
        with http_client(stack) as client:
            assert_echoed(client.get("/after-check"), "GET", "/after-check", 0)
        engine_hellos = stack.agent_events("spop.hello")
        wire_hellos = stack.haproxy_hellos()
    assert row["status"] == "UP", row
    assert row["check_status"] == "L7OK", row
    assert any(hello["healthcheck"] for hello in engine_hellos)
    check_hello = next(hello for hello in wire_hellos if hello.get("healthcheck"))
    assert check_hello["capabilities"] == ""
    assert check_hello["supported-versions"] == "2.0"
    assert "engine-id" not in check_hello


@pytest.mark.parametrize("handler", ["sync", "async"])
def test_concurrent_requests_each_get_their_own_answer(
    tmp_path: Path, echo_agent: EchoAgentFactory, handler: str, haproxy_release: HAProxyRelease
) -> None:
    """200 requests over 20 connections: HAProxy spreads their NOTIFYs over its pipelined SPOP
    connections, the 20 KB ones in fragments; with the async handler the ACKs also leave out of
    order. Every response must carry its own request's path and body length.

    HAProxy's max-frame-size is set to the agent's: left at tune.bufsize - 4, the first requests
    of each thread would be encoded for 128 KB frames before any HELLO told HAProxy the agent's
    16 KB, and fail with SPOP error 3 (frame too big). 3.2 never fragments: there the 20 KB ones
    fail with SPOE error 3 and the others must still get their own answers."""
    agent_args = ("--max-frame-size", "16384")
    if handler == "async":
        agent_args += ("--async-delay", "0.01")

    async def load(url: str) -> list[tuple[str, int, httpx.Response]]:
        limits = httpx.Limits(max_connections=20, max_keepalive_connections=20)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=20, trust_env=False) as client:
            sizes = [random.choice((0, 10, 1000, 20000)) for _ in range(200)]
            responses = await asyncio.gather(
                *(client.post(f"/load/{n}", content=bytes(size)) for n, size in enumerate(sizes))
            )
        return [(f"/load/{n}", size, r) for n, (size, r) in enumerate(zip(sizes, responses, strict=True))]

    with spoe_stack(
        tmp_path, echo_agent, agent_options="max-frame-size 16384", agent_args=agent_args
    ) as stack:
        results = asyncio.run(load(stack.url))
        assert not stack.agent_events("spop.protocol_error")
    for path, size, response in results:
        if size > 16384 and haproxy_release.at_least_3_1:
            assert response.headers["x-spoe-error"] == "3", path
        else:
            assert_echoed(response, "POST", path, size)


@pytest.mark.parametrize(
    ("health_check", "expected_error", "waits_for_timeout"),
    [(False, "1", True), (True, "2", False)],
    ids=["unchecked", "checked-down"],
)
def test_agent_down_request_proceeds_without_variables(
    tmp_path: Path,
    health_check: bool,
    expected_error: str,
    waits_for_timeout: bool,
    haproxy_release: HAProxyRelease,
) -> None:
    """HAProxy never fails a request because its agent is gone: it waits `timeout processing` (or
    not at all once a health check marked the agent DOWN) and goes on without the variables. With
    the server DOWN, 3.2 reports SPOP status 1 (I/O error, 257) where 2.6 reports 2 (no agent)."""
    if health_check and haproxy_release.at_least_3_1:
        expected_error = str(256 + 1)
    checks = {"backend_options": "option spop-check", "server_options": "check inter 100ms"}
    with spoe_stack(tmp_path, None, processing="300ms", **(checks if health_check else {})) as stack:
        if health_check:
            assert wait_for_server_status(stack.haproxy, "DOWN")["status"] == "DOWN"
        with http_client(stack) as client:
            started = time.monotonic()
            response = client.get("/no-agent")
            elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert response.headers["x-spoe-error"] == expected_error
    assert "x-method" not in response.headers
    # Error 1 is SPOE's processing timeout, 2 a failure to get an agent (no wait): the error code says
    # which happened. Only the lower bound is timing, and a slow machine can only make it longer.
    if waits_for_timeout:
        assert elapsed >= 0.3, elapsed


def test_haproxy_reload_hands_over_to_new_connections(
    tmp_path: Path, echo_agent: EchoAgentFactory, haproxy_release: HAProxyRelease
) -> None:
    """A reload (master-worker, SIGUSR2) replaces the worker: the new worker is a new engine with
    connections of its own, and requests keep getting their variables. The old 2.6 worker ends its
    SPOP connection with HAPROXY-DISCONNECT 0, which the engine answers in kind; the old 3.2 worker
    just closes it (no frame), which the engine takes as a normal end."""
    with spoe_stack(tmp_path, echo_agent, agent_args=("--wire-log",), master_worker=True) as stack:
        with http_client(stack) as client:
            assert_echoed(client.get("/before"), "GET", "/before", 0)
        stack.haproxy.reload()
        with http_client(stack) as client:
            assert_echoed(client.get("/after"), "GET", "/after", 0)
        if haproxy_release.at_least_3_1:
            [old_conn] = [hello["conn"] for hello in stack.agent_events("spop.hello")][:1]

            def old_connection_closed() -> list[dict]:
                return [c for c in stack.agent_events("spop.connection.closed") if c["conn"] == old_conn]

            wait_until(lambda: bool(old_connection_closed()))
            [closed] = old_connection_closed()
            assert (closed["by_peer"], closed["status"]) == (True, "NORMAL")
            assert not stack.frames(frame_type="HAPROXY_DISCONNECT")
            assert not stack.frames("agent>haproxy", "AGENT_DISCONNECT")
            assert len({hello["engine-id"] for hello in stack.haproxy_hellos()}) == 2
            assert not stack.agent_events("spop.protocol_error")
            return
        wait_until(lambda: bool(stack.frames("agent>haproxy", "AGENT_DISCONNECT")))
        goodbyes = [(f["conn"], f["items"]) for f in stack.frames("haproxy>agent", "HAPROXY_DISCONNECT")]
        replies = [(f["conn"], f["items"]) for f in stack.frames("agent>haproxy", "AGENT_DISCONNECT")]
        engine_ids = {hello["engine-id"] for hello in stack.haproxy_hellos()}
        assert not stack.agent_events("spop.protocol_error")
    assert [items["status-code"] for _, items in goodbyes] == [0]
    assert [(conn, items["status-code"]) for conn, items in replies] == [(goodbyes[0][0], 0)]
    assert len(engine_ids) == 2


def test_variables_reach_response_rules_after_a_real_backend(
    tmp_path: Path, echo_agent: EchoAgentFactory
) -> None:
    """The deployment shape: the request, body included, goes on to nginx after the agent saw it, and
    `http-response` rules read the agent's txn variables."""
    nginx_port = free_port()
    echo = 'location / { return 200 "nginx saw $request_method $request_uri $content_length"; }'
    with (
        run_nginx(tmp_path, nginx_port, {}, server_directives=echo),
        spoe_stack(
            tmp_path,
            echo_agent,
            agent_args=("--max-frame-size", str(BUFSIZE)),
            responder=NGINX_ANSWERS.substitute(nginx_port=nginx_port),
        ) as stack,
        http_client(stack) as client,
    ):
        response = client.post("/to/nginx?x=1", content=bytes(65536))
    assert response.text == "nginx saw POST /to/nginx?x=1 65536"
    assert_echoed(response, "POST", "/to/nginx", 65536)


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        time.sleep(0.05)

"""The shipped HAProxy configs (haproxy/): valid for HAProxy 2.6 and 3.2, the 3.x variant one
documented line away from the 2.x one, their numbers consistent with each other, equal to the
README's snippet, starting under 1024 open files, and each release's config doing what its comments
promise when run for real in front of two spoa-mirror agents (haproxy.cfg on 2.6, haproxy-3.x.cfg
on 3.2).

HAProxy 2.6 cannot parse haproxy-3.x.cfg (`mode spop` came with 3.1), so there that file is checked
with the line switched back to `mode tcp`; 3.2 checks it as shipped.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import re
import resource
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from spoa_mirror.config import ListenConfig
from tests.support.procs import (
    HAProxyProcess,
    HAProxyRelease,
    ManagedProcess,
    free_port,
    run_haproxy,
    run_process,
    wait_for_port,
)
from tests.support.shadow import RecordedRequest, ShadowServer
from tests.support.shipped_configs import (
    AGENT,
    SPOE_CONF,
    bufsize,
    directive,
    haproxy_check,
    section,
    shipped_haproxy_config,
    to_mode_tcp,
)

pytestmark = pytest.mark.haproxy

ROOT = Path(__file__).resolve().parent.parent
HAPROXY_DIR = ROOT / "haproxy"
CONFIG_2X = HAPROXY_DIR / "haproxy.cfg"
CONFIG_3X = HAPROXY_DIR / "haproxy-3.x.cfg"
MAXREWRITE = 1024  # HAProxy's default tune.maxrewrite, reserved in every buffer
HEADER_ROOM = 4096  # what a body limit must leave of a buffer for the request line and headers
# Ends a test whose HAProxy never sees an agent change state; inter 1s fall 2 rise 2 takes ~2 s.
HANG_S = 30.0
MODE_TCP, MODE_SPOP = "    mode tcp", "    mode spop"


def seconds(value: str) -> float:
    """An HAProxy time value ("500ms", "1s", "1m"; bare numbers are milliseconds)."""
    match = re.fullmatch(r"(\d+)(us|ms|s|m|h|d)?", value)
    assert match, f"not an HAProxy time: {value!r}"
    unit = {"us": 1e-6, "ms": 1e-3, None: 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]
    return int(match[1]) * unit


def body_limits(spoe_text: str) -> set[int]:
    return {int(value) for value in directive(spoe_text, r"acl body_too_big req\.body_size gt (\d+)")}


def test_2x_config_is_valid() -> None:
    """Checked in place: `default-path config` makes the relative SPOE path resolve from haproxy/,
    wherever HAProxy is started."""
    haproxy_check(CONFIG_2X, cwd=Path("/"))


def test_3x_config_differs_from_2x_only_in_the_agents_backend_mode() -> None:
    old, new = CONFIG_2X.read_text().splitlines(), CONFIG_3X.read_text().splitlines()
    changes = [line for line in difflib.unified_diff(old, new, lineterm="", n=0) if line[:1] in "+-"]
    assert changes == ["--- ", "+++ ", f"-{MODE_TCP}", f"+{MODE_SPOP}"], "\n".join(changes)
    line = old.index(MODE_TCP)
    assert [text for text in old[:line] if text.startswith("backend ")][-1] == "backend mirror-agents"


def test_3x_config_is_valid(tmp_path: Path, haproxy_release: HAProxyRelease) -> None:
    """As shipped for 3.1+; 2.6, which has no `mode spop`, checks the rest of it."""
    if haproxy_release.at_least_3_1:
        haproxy_check(CONFIG_3X, cwd=Path("/"))
        return
    (tmp_path / SPOE_CONF.name).write_text(SPOE_CONF.read_text())
    config = tmp_path / CONFIG_3X.name
    config.write_text(to_mode_tcp(CONFIG_3X.read_text()))
    haproxy_check(config)


def readme_haproxy_snippet() -> dict[str, list[str]]:
    """The README's HAProxy snippet, by the shipped file each part names (`# haproxy/<file> ...`
    lines start a part): its lines without blank ones."""
    readme = (ROOT / "README.md").read_text()
    blocks = [block for block in readme.split("```") if "\n# haproxy/haproxy.cfg" in f"\n{block}"]
    assert len(blocks) == 1, "the README has no HAProxy snippet, or several"
    parts: dict[str, list[str]] = {}
    current: list[str] = []
    for line in blocks[0].strip("\n").splitlines():
        if match := re.match(r"# haproxy/([\w.-]+)", line):
            current = parts.setdefault(match[1], [])
        elif line.strip():
            current.append(line.rstrip())
    return parts


def without_comments(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def sections(lines: list[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in lines:
        if not line[0].isspace():
            body = found.setdefault(line, [])
        else:
            body.append(line.strip())
    return found


def test_readme_haproxy_snippet_is_the_shipped_config() -> None:
    """What a user copies from the README is what the suite runs: the SPOE file whole (comments
    aside), and for haproxy.cfg, sections of the shipped file with their lines in the shipped order,
    the agents' backend whole."""
    snippet = readme_haproxy_snippet()
    assert set(snippet) == {CONFIG_2X.name, SPOE_CONF.name}
    assert snippet[SPOE_CONF.name] == without_comments(SPOE_CONF.read_text())
    shipped = sections(without_comments(CONFIG_2X.read_text()))
    for header, lines in sections(snippet[CONFIG_2X.name]).items():
        assert header in shipped, f"README: no section {header!r} in {CONFIG_2X.name}"
        in_order = [line for line in shipped[header] if line in lines]
        assert lines == in_order, f"README's {header!r} differs from {CONFIG_2X.name}'s"
    assert sections(snippet[CONFIG_2X.name])["backend mirror-agents"] == shipped["backend mirror-agents"]


def test_every_spoe_agent_with_a_dash_in_its_name_sets_its_var_prefix() -> None:
    """Both releases refuse to start with an agent name that is not a valid variable prefix and no
    `option var-prefix` (test_an_agent_name_with_a_dash_needs_var_prefix)."""
    files = [SPOE_CONF, *ROOT.glob("deploy/**/*.spoe.conf"), *ROOT.glob("deploy/**/*spoe*.conf")]
    for path in set(files):
        for agent in re.split(r"^spoe-agent ", path.read_text(), flags=re.MULTILINE)[1:]:
            name, _, body = agent.partition("\n")
            section = body.split("\nspoe-message", 1)[0]
            if not re.fullmatch(r"[A-Za-z0-9_.]+", name.strip()):
                assert directive(section, r"option var-prefix (\S+)"), f"{path}: spoe-agent {name}"


def test_an_agent_name_with_a_dash_needs_var_prefix(tmp_path: Path) -> None:
    """The shipped SPOE file with its agent renamed `mirror-agent`: refused without the var-prefix
    line, accepted with it."""
    spoe = SPOE_CONF.read_text().replace("spoe-agent mirror\n", "spoe-agent mirror-agent\n")
    config = tmp_path / CONFIG_2X.name
    config.write_text(shipped_haproxy_config().read_text())
    (tmp_path / SPOE_CONF.name).write_text(spoe)
    haproxy_check(config)
    (tmp_path / SPOE_CONF.name).write_text(spoe.replace("    option var-prefix mirror\n", ""))
    with pytest.raises(AssertionError, match="Invalid variable prefix 'mirror-agent'"):
        haproxy_check(config)


def test_shipped_config_starts_under_an_open_files_limit_of_1024(
    tmp_path: Path, haproxy_release: HAProxyRelease
) -> None:
    """The default soft limit of a shell or a service: a fixed `maxconn 20000` needs 40017 files
    and HAProxy refuses to start ("Cannot raise FD limit")."""
    config = localized(shipped_haproxy_config().read_text(), free_port(), [free_port()], free_port())
    path = tmp_path / "haproxy.cfg"
    path.write_text(config)
    (tmp_path / SPOE_CONF.name).write_text(SPOE_CONF.read_text())

    def limit_open_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    haproxy = subprocess.Popen(
        [haproxy_release.binary, "-db", "-f", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=limit_open_files,
    )
    try:
        port = int(re.search(r"bind 127\.0\.0\.1:(\d+)", config)[1])
        wait_for_port("127.0.0.1", port, timeout=10, process=haproxy)
    except RuntimeError:
        pytest.fail(f"HAProxy did not start:\n{haproxy.communicate()[0].decode()}")
    finally:
        haproxy.kill()
        haproxy.wait()


def test_body_limit_leaves_room_in_the_buffer_for_the_headers() -> None:
    """A body under the limit must fit in one buffer with its headers, or HAProxy hands the agent a
    truncated body that the limit claimed was whole."""
    [limit] = body_limits(SPOE_CONF.read_text())  # one value shared by both messages
    size = bufsize(CONFIG_2X.read_text())
    assert limit + MAXREWRITE + HEADER_ROOM <= size


def test_spoe_timeouts_are_below_the_agents_backend_timeouts() -> None:
    """SPOE.txt 3.5: hello below the backend's timeout connect, idle below its timeout server; idle
    also below the agent's own idle timeout, so HAProxy is the side that closes idle connections."""
    spoe, haproxy = SPOE_CONF.read_text(), CONFIG_2X.read_text()
    backend = haproxy[haproxy.index("backend mirror-agents") :]
    [hello] = directive(spoe, r"timeout hello (\S+)")
    [idle] = directive(spoe, r"timeout idle (\S+)")
    [processing] = directive(spoe, r"timeout processing (\S+)")
    [connect] = directive(backend, r"timeout connect (\S+)")
    [server] = directive(backend, r"timeout server (\S+)")
    assert seconds(hello) < seconds(connect)
    assert seconds(idle) < seconds(server)
    assert seconds(idle) < ListenConfig().idle_timeout
    assert seconds(processing) <= 0.1, "mirroring may cost a request at most 100 ms"


def test_both_messages_carry_the_same_fields_but_the_body() -> None:
    """`mirror` and `mirror-without-body` differ only in arg_body and in the body condition, so a
    large request reaches the agent like any other, its body_len showing it was not sent whole."""
    spoe = SPOE_CONF.read_text()
    with_body, without_body, _response = directive(spoe, r"args (.+)")
    assert with_body.split() == [*without_body.split()[:4], "arg_body=req.body", *without_body.split()[4:]]
    assert "body_len=req.body_size" in without_body.split()
    events = directive(spoe, r"event (.+)")
    assert events == [
        "on-backend-http-request if mirror_sample !body_too_big",
        "on-backend-http-request if mirror_sample body_too_big",
    ]


def test_the_response_group_follows_wait_for_body_and_shares_the_request_unique_id() -> None:
    """Compare: the primary's response goes as a group after `wait-for-body` (on the
    on-http-response event its body was empty for 2 of 3 responses), only when the agent asked for
    it, and carries the unique-id the request message carries, so the agent can pair the two."""
    spoe = SPOE_CONF.read_text()
    assert directive(spoe, r"groups (.+)") == ["mirror-response"]
    assert section(spoe, "spoe-message mirror-response") == [
        "args unique_id=unique-id status=status hdrs=res.hdrs body=res.body body_len=res.body_size"
    ]
    assert section(spoe, "spoe-group mirror-response") == ["messages mirror-response"]
    for request_message in ("spoe-message mirror", "spoe-message mirror-without-body"):
        [args] = [line for line in section(spoe, request_message) if line.startswith("args ")]
        assert "unique_id=unique-id" in args.split()
    for config in (CONFIG_2X, CONFIG_3X):
        backend = [line.strip() for line in section(config.read_text(), "backend app")]
        rules = [line for line in backend if line.startswith("http-response")]
        assert rules == [
            "http-response wait-for-body time 200ms if { var(txn.mirror.compare) -m bool }",
            "http-response send-spoe-group mirror mirror-response if { var(txn.mirror.compare) -m bool }",
        ]


# --- each release's config for real: two spoa-mirror agents, a primary and a shadow ---------------


@dataclass
class MirrorStack:
    url: str
    haproxy: HAProxyProcess
    agents: list[ManagedProcess]
    primary: ShadowServer
    shadow: ShadowServer

    def agent_status(self, name: str) -> str:
        text = self.haproxy.cli("show stat").removeprefix("# ")
        for row in csv.DictReader(io.StringIO(text)):
            if row["pxname"] == "mirror-agents" and row["svname"] == name:
                return row["status"]
        raise AssertionError(f"no mirror-agents/{name} in show stat:\n{text}")

    def log_line(self, request: str, timeout: float = 10.0) -> str:
        """HAProxy's log line for the request whose request line contains `request` (it is written
        once the stream ends, just after the client has its response)."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.haproxy.stderr_text().splitlines():
                if request in line and "mirror_err=" in line:
                    return line
            assert time.monotonic() < deadline, f"no log line for {request!r}"
            time.sleep(0.02)

    def wait_for_status(self, name: str, status: str, timeout: float) -> float:
        """Seconds until the agent server shows `status`; fails after `timeout`."""
        started = time.monotonic()
        while (current := self.agent_status(name)) != status:
            assert time.monotonic() - started < timeout, f"{name} still {current} after {timeout} s"
            time.sleep(0.02)
        return time.monotonic() - started


def localized(config: str, primary_port: int, agent_ports: list[int], http_port: int) -> str:
    """haproxy.cfg with only what cannot run in a test changed: loopback addresses, logs on stderr,
    a TCP stats socket, no daemon/chroot/user switch."""
    stats = f"stats socket ipv4@127.0.0.1:{free_port()} level admin"
    replacements = [
        (r"^    (log /dev/log|chroot|stats socket|user|group|daemon)\b.*\n", ""),
        (r"^global\n", f"global\n    log stderr format raw local0 info\n    {stats}\n"),
        (r"\bbind :80\b", f"bind 127.0.0.1:{http_port}"),
        (r"^    server app1 \S+", f"    server app1 127.0.0.1:{primary_port}"),
        (r"^    server app2 .*\n", ""),
    ]
    for n, port in enumerate(agent_ports, 1):
        replacements.append((rf"^    server agent{n} \S+", f"    server agent{n} 127.0.0.1:{port}"))
    for pattern, replacement in replacements:
        config, count = re.subn(pattern, replacement, config, flags=re.MULTILINE)
        assert count, f"haproxy.cfg no longer matches {pattern!r}: update this test"
    return config


@contextmanager
def mirror_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MirrorStack]:
    # HAProxy inherits the test's environment: mirror every request, not the default 10%.
    monkeypatch.setenv("MIRROR_SAMPLE_PERCENT", "100")
    with ExitStack() as stack:
        primary = stack.enter_context(ShadowServer())
        shadow = stack.enter_context(ShadowServer())
        agent_ports = [free_port(), free_port()]
        agents = []
        for n, port in enumerate(agent_ports, 1):
            config = tmp_path / f"agent{n}.yaml"
            config.write_text(
                json.dumps(
                    {
                        "listen": {"port": port, "max_frame_size": bufsize(CONFIG_2X.read_text())},
                        "admin": {"enabled": False},
                        "log": {"format": "json"},
                        "truncated_body": "send_marked",  # so the shadow shows what the agent got
                        "targets": [{"url": shadow.url}],
                    }
                )
            )
            argv = [str(AGENT), "--config", str(config)]
            agents.append(
                stack.enter_context(run_process(argv, ready_port=port, name=f"agent{n}", log_dir=tmp_path))
            )
        http_port = free_port()
        config = localized(shipped_haproxy_config().read_text(), primary.port, agent_ports, http_port)
        haproxy = stack.enter_context(
            run_haproxy(config, tmp_path, extra_files={SPOE_CONF.name: SPOE_CONF.read_text()})
        )
        yield MirrorStack(f"http://127.0.0.1:{http_port}", haproxy, agents, primary, shadow)


def chunks(*parts: bytes) -> Iterator[bytes]:
    """A request body httpx sends with Transfer-Encoding: chunked."""
    yield from parts


def by_path(requests: list[RecordedRequest]) -> dict[str, RecordedRequest]:
    return {request.target: request for request in requests}


def test_haproxy_cfg_mirrors_through_two_agents_and_survives_losing_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, haproxy_release: HAProxyRelease
) -> None:
    limit = max(body_limits(SPOE_CONF.read_text()))
    with (
        mirror_stack(tmp_path, monkeypatch) as stack,
        httpx.Client(base_url=stack.url, trust_env=False) as client,
    ):
        for name in ("agent1", "agent2"):
            stack.wait_for_status(name, "UP", timeout=HANG_S)
        sent = [
            client.get("/get?q=1"),
            client.post("/small", content=b"s" * limit),
            client.post("/large", content=b"L" * (limit + 1)),
            client.post("/chunked-small", content=chunks(b"c" * 1000, b"d" * 1000)),
            client.post("/chunked-large", content=chunks(*[b"x" * 10_000] * 10)),
        ]
        assert [response.status_code for response in sent] == [200] * len(sent)
        mirrored = by_path(stack.shadow.wait_for(len(sent)))
        primary = by_path(stack.primary.requests)

        # A killed agent leaves rotation within about 2 s; the other one takes every request.
        stack.agents[0].popen.kill()
        down_after = stack.wait_for_status("agent1", "DOWN", timeout=HANG_S)
        for n in range(5):
            assert client.get(f"/one-agent/{n}").status_code == 200
        stack.shadow.wait_for(len(sent) + 5)

        # With no agent at all, requests still succeed, each delayed by at most timeout processing,
        # until HAProxy gives up on the agents and the SPOE fails at once: mirror_err=2 (no agent
        # available) on 2.6; 3.2 fails at once from the first request, with 257 (SPOP status 1, I/O).
        gave_up = "mirror_err=257 " if haproxy_release.at_least_3_1 else "mirror_err=2 "
        stack.agents[1].popen.kill()
        stack.wait_for_status("agent2", "DOWN", timeout=HANG_S)
        slowest = 0.0
        for n in range(300):
            started = time.monotonic()
            assert client.get(f"/no-agent/{n}").status_code == 200
            slowest = max(slowest, time.monotonic() - started)
            if gave_up in stack.log_line(f"GET /no-agent/{n} "):
                break
            time.sleep(0.1)
        else:
            pytest.fail("HAProxy still waits for dead agents after 300 requests (30 s and more)")

    for path, request in primary.items():
        assert request.header("x-request-id"), "HAProxy sets X-Request-ID on every request"
        assert mirrored[path].header("x-request-id") == request.header("x-request-id")
    assert mirrored["/get?q=1"].method == "GET" and mirrored["/get?q=1"].body == b""
    # Bodies within the limit arrive whole, Content-Length or chunked alike.
    assert mirrored["/small"].body == primary["/small"].body
    assert mirrored["/chunked-small"].body == b"c" * 1000 + b"d" * 1000
    # Larger ones go without their body, and the agent knows they were cut (send_marked here).
    for path in ("/large", "/chunked-large"):
        assert len(primary[path].body) > limit
        assert mirrored[path].body == b""
        assert mirrored[path].header("x-mirror-truncated") == "true"
    # Figures, not verdicts (wait_for_status's HANG_S is the hang bound); only a primary request held
    # for seconds behind dead agents fails.
    print(f"\nagent1 marked down after {down_after:.2f} s; slowest request without agents {slowest:.2f} s")
    assert slowest < 5.0, f"a request waited {slowest:.2f} s for dead agents"

"""Who may talk to the agent, over what, and what it may never let out.

* Listeners: both the SPOP and the admin listener bind 127.0.0.1 unless told otherwise (the C agent
  binds 0.0.0.0), and they are separate: metrics are never served on HAProxy's port.
* Transport: SPOP over TLS with HAProxy 2.6 verifying the agent and the agent verifying HAProxy's
  client certificate; neither a plain-TCP peer nor an HAProxy without a trusted certificate is
  served.
* Peers: `listen.allow_networks` refuses HAProxy when its address is not listed, and requests are
  still served by HAProxy, unmirrored.
* Secrets: a canary in every place redaction covers, sent through the real HAProxy, appears in no
  shadow request (raw bytes), no agent log line at debug level and nothing on /metrics; the HMAC key
  from a file or the environment is used but never shown, and a key written inline in the YAML is a
  config error.

Certificates are made with the openssl command line at test time (EC P-256, valid two days).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from spoe import Status
from tests.support.canaries import leaks, luhn_card, places
from tests.support.mirror_stack import SpoeMessage, parse_metrics, series, write_haproxy_config
from tests.support.procs import ManagedProcess, free_port, run_haproxy, run_process
from tests.support.shadow import ShadowServer
from tests.support.spop_peer import disconnect_status, hello_2x, parse_frames

pytestmark = pytest.mark.haproxy

ROOT = Path(__file__).resolve().parent.parent
AGENT = [sys.executable, "-m", "spoa_mirror"]
LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp

# The message of tests/support/mirror_stack.py but for the headers, sent as req.hdrs_bin, and no
# unique-id. HAProxy answers every request itself once the SPOE event is done: a 200 proves the
# request was served whatever happened to its mirror, and X-Spoe-Error carries the SPOE error, if any.
MESSAGE = SpoeMessage(
    args="arg_method=method arg_path=url arg_ver=req.ver arg_hdrs=req.hdrs_bin arg_body=req.body "
    "body_len=req.body_len src=src"
)


# -- processes -------------------------------------------------------------------------------------


@dataclass
class Agent:
    process: ManagedProcess
    spop_port: int
    admin_port: int

    def metrics_text(self) -> str:
        response = httpx.get(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=5, trust_env=False)
        response.raise_for_status()
        return response.text

    def metric(self, name: str, **labels: str) -> float:
        """One sample of /metrics (0 when absent)."""
        return parse_metrics(self.metrics_text()).get(series(name, **labels), 0.0)

    def logs(self) -> str:
        return self.process.stdout_text() + self.process.stderr_text()


@contextmanager
def run_agent(
    tmp_path: Path, config: dict[str, Any], *, env: Mapping[str, str] | None = None
) -> Iterator[Agent]:
    """The agent on `config` plus free SPOP and admin ports (and nothing else: no addresses), with
    JSON logs at debug level, the most it ever says."""
    spop_port, admin_port = free_port(), free_port()
    config = {
        **config,
        "listen": {**config.get("listen", {}), "port": spop_port},
        "admin": {"port": admin_port},
        "log": {"format": "json", "level": "debug"},
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    with run_process(
        [*AGENT, "--config", str(path)],
        ready_port=admin_port,
        name="spoa-mirror",
        log_dir=tmp_path,
        env=env,
        cwd=ROOT,
    ) as process:
        yield Agent(process, spop_port, admin_port)


@contextmanager
def run_haproxy_for(tmp_path: Path, agent: Agent, server_options: str = "") -> Iterator[str]:
    """HAProxy mirroring to `agent` (its own directory under `tmp_path`); yields its URL."""
    directory = tmp_path / f"haproxy-{free_port()}"
    directory.mkdir()
    http_port = free_port()
    config = write_haproxy_config(
        directory, agent.spop_port, http_port, messages=(MESSAGE,), server_options=server_options
    )
    with run_haproxy(config, directory):
        yield f"http://127.0.0.1:{http_port}"


def shadow_target(shadow: ShadowServer, **keys: Any) -> dict[str, Any]:
    return {"targets": [{"name": "shadow", "url": shadow.url, **keys}]}


def get(url: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(kwargs.pop("method", "GET"), url, timeout=10, trust_env=False, **kwargs)


# -- listeners -------------------------------------------------------------------------------------


def listening_sockets(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket process `pid` listens on, IPv4 and IPv6, read from
    /proc: the socket inodes among its file descriptors, looked up in /proc/net/tcp and tcp6."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, size in (("tcp", 4), ("tcp6", 16)):
        with open(f"/proc/net/{table}") as file:
            next(file)
            for row in file:
                fields = row.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state != LISTEN or inode not in inodes:
                    continue
                address, port = local.split(":")
                # The kernel prints the address as 32-bit words in host byte order.
                packed = b"".join(
                    struct.pack("=I", int(address[i : i + 8], 16)) for i in range(0, size * 2, 8)
                )
                family = socket.AF_INET if size == 4 else socket.AF_INET6
                found.add((socket.inet_ntop(family, packed), int(port, 16)))
    return found


@pytest.fixture(scope="module")
def plain_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    """An agent whose config names ports only."""
    tmp_path = tmp_path_factory.mktemp("plain")
    with run_agent(tmp_path, {"targets": [{"url": "http://127.0.0.1:9/"}]}) as agent:
        yield agent


def test_both_listeners_default_to_loopback(plain_agent: Agent) -> None:
    """With no address configured, the agent listens on exactly two sockets, SPOP and admin, both on
    127.0.0.1: exposing the agent (or its metrics) to the network takes a line of config."""
    assert listening_sockets(plain_agent.process.pid) == {
        ("127.0.0.1", plain_agent.spop_port),
        ("127.0.0.1", plain_agent.admin_port),
    }


def test_admin_and_spop_are_separate_listeners(plain_agent: Agent) -> None:
    """/metrics and /healthz are on the admin port. The SPOP port does not speak HTTP: a GET is a
    frame too big to be one, answered with AGENT-DISCONNECT and a close. The admin port does not
    speak SPOP: a HELLO gets an HTTP error, not an AGENT-HELLO."""
    assert "spoa_mirror_spop_connections_open" in plain_agent.metrics_text()
    assert get(f"http://127.0.0.1:{plain_agent.admin_port}/healthz").text == "ok\n"

    with socket.create_connection(("127.0.0.1", plain_agent.spop_port), timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: agent\r\n\r\n")
        answer = read_until_closed(sock)
    [frame] = parse_frames(answer)
    assert disconnect_status(frame)[0] is Status.FRAME_TOO_BIG

    with socket.create_connection(("127.0.0.1", plain_agent.admin_port), timeout=5) as sock:
        sock.sendall(hello_2x())
        sock.shutdown(socket.SHUT_WR)  # the HTTP server reads a request line up to a newline or EOF
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")


def read_until_closed(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the peer sends until it closes (a reset counts as a close)."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


# -- TLS -------------------------------------------------------------------------------------------


@dataclass
class Pki:
    ca: Path
    agent_cert: Path
    agent_key: Path
    client: Path  # HAProxy's `crt`: certificate and key in one file
    rogue_ca: Path  # a CA nobody here trusts
    rogue_client: Path  # HAProxy's `crt` signed by the rogue CA


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=30)


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    ext = directory / f"{name}.ext"
    ext.write_text(
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
        "subjectKeyIdentifier=hash\n"
    )
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key, cwd=directory)
    _openssl("req", "-new", "-key", key, "-subj", f"/CN={name}", "-out", f"{name}.csr", cwd=directory)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-signkey", key, "-days", "2", "-extfile", ext, "-out", cert,
        cwd=directory,
    )  # fmt: skip
    return cert, key


def _make_leaf(directory: Path, name: str, ca: tuple[Path, Path], usage: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    ext = directory / f"{name}.ext"
    ext.write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        f"extendedKeyUsage={usage}\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "authorityKeyIdentifier=keyid\n"
    )
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key, cwd=directory)
    _openssl("req", "-new", "-key", key, "-subj", f"/CN={name}", "-out", f"{name}.csr", cwd=directory)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", ca[0], "-CAkey", ca[1], "-set_serial",
        str(secrets.randbits(64)), "-days", "2", "-extfile", ext, "-out", cert,
        cwd=directory,
    )  # fmt: skip
    return cert, key


def _bundle(cert: Path, key: Path) -> Path:
    bundle = cert.with_name(cert.stem + "-bundle.pem")
    bundle.write_text(cert.read_text() + key.read_text())
    return bundle


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = _make_ca(directory, "test-ca")
    rogue_ca = _make_ca(directory, "rogue-ca")
    agent_cert, agent_key = _make_leaf(directory, "agent", ca, "serverAuth")
    return Pki(
        ca=ca[0],
        agent_cert=agent_cert,
        agent_key=agent_key,
        client=_bundle(*_make_leaf(directory, "haproxy", ca, "clientAuth")),
        rogue_ca=rogue_ca[0],
        rogue_client=_bundle(*_make_leaf(directory, "rogue", rogue_ca, "clientAuth")),
    )


@dataclass
class TlsStack:
    agent: Agent
    shadow: ShadowServer
    pki: Pki
    tmp_path: Path


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[TlsStack]:
    """An agent serving SPOP over TLS only, requiring a client certificate signed by the test CA."""
    tmp_path = tmp_path_factory.mktemp("tls")
    tls = {"cert_file": str(pki.agent_cert), "key_file": str(pki.agent_key), "ca_file": str(pki.ca)}
    with (
        ShadowServer() as shadow,
        run_agent(tmp_path, {"listen": {"tls": tls}, **shadow_target(shadow)}) as agent,
    ):
        yield TlsStack(agent, shadow, pki, tmp_path)


def test_haproxy_with_a_trusted_client_certificate_is_mirrored_over_tls(tls_stack: TlsStack) -> None:
    """HAProxy 2.6 verifies the agent's certificate against the CA (`verify required ca-file`) and
    presents its own (`crt`): the SPOP connection is up and requests are mirrored."""
    pki = tls_stack.pki
    options = f"ssl verify required ca-file {pki.ca} crt {pki.client}"
    before = len(tls_stack.shadow.requests)
    with run_haproxy_for(tls_stack.tmp_path, tls_stack.agent, options) as url:
        for n in range(3):
            response = get(f"{url}/tls/{n}")
            assert response.status_code == 200 and "x-spoe-error" not in response.headers
        received = tls_stack.shadow.wait_for(before + 3)[before:]
    assert sorted(request.target for request in received) == ["/tls/0", "/tls/1", "/tls/2"]
    assert tls_stack.agent.metric("spoa_mirror_spop_connections_total") >= 1


@pytest.mark.parametrize(
    "options",
    [
        pytest.param("ssl verify required ca-file {pki.ca}", id="no-client-certificate"),
        pytest.param(
            "ssl verify required ca-file {pki.ca} crt {pki.rogue_client}",
            id="client-certificate-of-another-ca",
        ),
        pytest.param(
            "ssl verify required ca-file {pki.rogue_ca} crt {pki.client}", id="agent-certificate-not-trusted"
        ),
    ],
)
def test_tls_without_mutual_trust_is_never_served(tls_stack: TlsStack, options: str) -> None:
    """HAProxy without a client certificate, with one from another CA, or not trusting the agent's:
    the TLS handshake fails, no SPOP connection is ever opened, HAProxy still serves the request and
    reports the SPOE error (a timeout: it retries until `timeout processing`), nothing is mirrored.
    (The agent logs nothing and counts nothing for a failed handshake: only the absence of SPOP
    connections shows it.)"""
    agent = tls_stack.agent
    connections = agent.metric("spoa_mirror_spop_connections_total")
    before = len(tls_stack.shadow.requests)
    with run_haproxy_for(tls_stack.tmp_path, agent, options.format(pki=tls_stack.pki)) as url:
        response = get(f"{url}/untrusted")
    assert response.status_code == 200
    assert response.headers.get("x-spoe-error") == "1"
    assert agent.metric("spoa_mirror_spop_connections_total") == connections
    assert len(tls_stack.shadow.requests) == before


def test_plain_tcp_peer_gets_no_hello_from_the_tls_port(tls_stack: TlsStack) -> None:
    """A HAPROXY-HELLO in clear text is not a TLS ClientHello: the agent closes the connection after
    at most a TLS alert, never answers with an AGENT-HELLO, and counts no SPOP connection."""
    agent = tls_stack.agent
    connections = agent.metric("spoa_mirror_spop_connections_total")
    with socket.create_connection(("127.0.0.1", agent.spop_port), timeout=5) as sock:
        sock.sendall(hello_2x())
        answer = read_until_closed(sock)
    assert answer == b"" or answer[0] == 0x15, f"not a TLS alert: {answer[:64]!r}"  # 0x15: alert record
    assert agent.metric("spoa_mirror_spop_connections_total") == connections


# -- allowlist -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("networks", "mirrored"),
    [
        pytest.param(["10.0.0.0/8"], False, id="haproxy-not-listed"),
        pytest.param(["127.0.0.0/8"], True, id="listed"),
    ],
)
def test_allow_networks_decides_whether_haproxy_is_served(
    tmp_path: Path, networks: list[str], mirrored: bool
) -> None:
    """HAProxy connects from 127.0.0.1. Not in `allow_networks`: the agent refuses each connection
    with AGENT-DISCONNECT and counts it, HAProxy serves the requests with an SPOE error (a timeout:
    it reconnects, thousands of times a second, until `timeout processing`) and nothing is
    mirrored. Listed: mirrored as usual."""
    with (
        ShadowServer() as shadow,
        run_agent(tmp_path, {"listen": {"allow_networks": networks}, **shadow_target(shadow)}) as agent,
        run_haproxy_for(tmp_path, agent) as url,
    ):
        for n in range(2):
            response = get(f"{url}/allow/{n}")
            assert response.status_code == 200
            assert response.headers.get("x-spoe-error") == (None if mirrored else "1")
        if mirrored:
            assert sorted(r.target for r in shadow.wait_for(2)) == ["/allow/0", "/allow/1"]
            assert agent.metric("spoa_mirror_spop_connections_refused_total") == 0
        else:
            assert agent.metric("spoa_mirror_spop_connections_refused_total") > 0
            assert agent.metric("spoa_mirror_spop_connections_total") == 0
            assert shadow.requests == []


# -- secrets ---------------------------------------------------------------------------------------

CANARY = f"canary{secrets.token_hex(8)}"
REDACT = {
    "query": {"token": "mask"},
    "json_fields": {"user.password": "mask"},
    "form_fields": {"password": "mask"},
    "patterns": {"canary": {"regex": "canary[0-9a-f]{16}", "action": "mask"}},
}
RULES = (
    "header:authorization",
    "header:proxy-authorization",
    "header:cookie",
    "header:x-api-key",
    "query:token",
    "json:user.password",
    "form:password",
    "pattern:canary",
)


def test_canary_in_every_redactable_place_never_leaves(tmp_path: Path) -> None:
    """The canary goes in the four credential headers masked by default, a query parameter, a JSON
    field, a form field and a plain-text body (caught by the pattern), through the real HAProxy
    (headers as `req.hdrs_bin`). Each rule fires exactly once, and the canary is in no byte any
    shadow received, no agent log line at debug level, and nothing on /metrics."""
    with (
        ShadowServer() as shadow,
        run_agent(tmp_path, {"redact": REDACT, **shadow_target(shadow)}) as agent,
        run_haproxy_for(tmp_path, agent) as url,
    ):
        credentials = {
            "Authorization": f"Bearer {CANARY}",
            "Proxy-Authorization": f"Basic {CANARY}",
            "Cookie": f"session={CANARY}; theme=dark",
            "X-Api-Key": CANARY,
        }
        responses = [
            get(f"{url}/secret/query?token={CANARY}&page=2", headers=credentials),
            get(f"{url}/secret/json", method="POST", json={"user": {"name": "ann", "password": CANARY}}),
            get(
                f"{url}/secret/form",
                method="POST",
                content=f"user=bob&password={CANARY}",
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            ),
            get(
                f"{url}/secret/text",
                method="POST",
                content=f"note: {CANARY} end",
                headers={"Content-Type": "text/plain"},
            ),
        ]
        for response in responses:
            assert response.status_code == 200 and "x-spoe-error" not in response.headers
        received = {request.target.partition("?")[0]: request for request in shadow.wait_for(4)}
        metrics = agent.metrics_text()
    logs = agent.logs()  # the whole run, shutdown included

    assert redactions(metrics) == dict.fromkeys(RULES, 1.0)
    for request in received.values():
        assert CANARY.encode() not in request.raw, request.raw
    assert CANARY not in logs
    assert CANARY not in metrics
    assert "spop.hello" in logs, "the agent did not log at debug level"

    query = received["/secret/query"]
    assert query.target == "/secret/query?token=%5BREDACTED%5D&page=2"
    for name in credentials:
        assert query.header_values(name) == ["[REDACTED]"]
    assert json.loads(received["/secret/json"].body) == {"user": {"name": "ann", "password": "[REDACTED]"}}
    assert received["/secret/form"].body == b"user=bob&password=%5BREDACTED%5D"
    assert received["/secret/text"].body == b"note: [REDACTED] end"


EXAMPLE_REDACT = yaml.safe_load((ROOT / "examples" / "config.yaml").read_text())["redact"]


@pytest.mark.parametrize("redact", [None, EXAMPLE_REDACT], ids=["no redact block", "example block"])
def test_default_redaction_leaves_no_canary_anywhere(tmp_path: Path, redact: dict | None) -> None:
    """Issue 10's list, through the real HAProxy 2.6 and agent: a canary in each credential header
    and its kin, Cookie, Set-Cookie, userinfo, secret-named query, form, multipart and JSON fields in
    their case, bracket and dotted spellings, `;` queries, JSON as text/plain or untyped, duplicate
    JSON keys, truncated JSON, gzip and deflate bodies, and card numbers in path, query, headers and
    bodies (tests/support/canaries.py), with no `redact` block and with the example config's. Every
    request reaches the shadow; the canaries reach no shadow byte (decoded too), no agent log line at
    debug level and nothing on /metrics. On main 107 of the 111 places leaked with no block, 103 with
    the example block."""
    secret, card = f"Zq{secrets.token_hex(10)}", luhn_card()
    requests = places(secret, card)
    config = {**({"redact": redact} if redact else {}), **shadow_target(shadow := ShadowServer().start())}
    try:
        with run_agent(tmp_path, config) as agent, run_haproxy_for(tmp_path, agent) as url:
            port = int(url.rpartition(":")[2])
            for place in requests:
                assert send_raw(port, place.raw()).startswith(b"HTTP/1.1 200"), place.name
            received = shadow.wait_for(len(requests), timeout=20)
            metrics = agent.metrics_text()
        logs = agent.logs()
    finally:
        shadow.stop()

    leaked = {request.target: found for request in received if (found := leaks(request.raw, [secret, card]))}
    assert leaked == {}
    assert secret not in logs and card not in logs
    assert secret not in metrics and card not in metrics
    assert "spop.hello" in logs, "the agent did not log at debug level"
    outcomes = {
        sample.labels["outcome"]: sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "spoa_mirror_requests_total" and sample.value
    }
    assert outcomes == {"sent_2xx": len(requests)}


def send_raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    return response


def redactions(metrics_text: str) -> dict[str, float]:
    """Redactions counted, by rule. A request's are counted before it is queued, so by the time the
    shadow has it."""
    return {
        sample.labels["rule"]: sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == "spoa_mirror_redactions_total"
    }


HMAC_KEY = secrets.token_hex(24)


def hmac_of(value: str) -> str:
    return "hmac-sha256:" + hmac.new(HMAC_KEY.encode(), value.encode(), hashlib.sha256).hexdigest()[:32]


@pytest.mark.parametrize("source", ["file", "env"])
def test_hmac_key_is_used_but_never_shown(tmp_path: Path, source: str) -> None:
    """The key, from `hmac_key_file` or `hmac_key_env`, hashes the Authorization header (so it was
    loaded), and is in no shadow request, no debug log line, nothing on /metrics and nothing
    `spoa-mirror check-config` prints."""
    env = dict(os.environ)
    if source == "file":
        key_file = tmp_path / "hmac.key"
        key_file.write_text(HMAC_KEY + "\n")
        secrets_config = {"hmac_key_file": str(key_file)}
    else:
        env["SPOA_MIRROR_TEST_KEY"] = HMAC_KEY
        secrets_config = {"hmac_key_env": "SPOA_MIRROR_TEST_KEY"}
    config = {"secrets": secrets_config, "redact": {"headers": {"Authorization": "hmac"}}}
    with (
        ShadowServer() as shadow,
        run_agent(tmp_path, {**config, **shadow_target(shadow)}, env=env) as agent,
        run_haproxy_for(tmp_path, agent) as url,
    ):
        assert get(f"{url}/hmac", headers={"Authorization": "Bearer token-1"}).status_code == 200
        [request] = shadow.wait_for(1)
        metrics = agent.metrics_text()
    logs = agent.logs()
    check = subprocess.run(
        [*AGENT, "check-config", str(tmp_path / "agent.yaml")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=30,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr

    assert request.header("authorization") == hmac_of("Bearer token-1")
    assert_never_shown(
        HMAC_KEY, raw=request.raw, logs=logs, metrics=metrics, check_config=check.stdout + check.stderr
    )


def test_inline_hmac_key_is_a_config_error(tmp_path: Path) -> None:
    """A key written in the YAML (where configs get copied, committed and pasted into tickets) is
    refused, by check-config and by the agent, with exit code 2 and without echoing the key."""
    path = tmp_path / "agent.yaml"
    path.write_text(
        yaml.safe_dump({"secrets": {"hmac_key": HMAC_KEY}, "targets": [{"url": "http://127.0.0.1:9/"}]})
    )
    for command in (["check-config", str(path)], ["--config", str(path), "--port", str(free_port())]):
        done = subprocess.run([*AGENT, *command], capture_output=True, text=True, cwd=ROOT, timeout=30)
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        assert "config error: secrets.hmac_key" in done.stderr
        assert_never_shown(HMAC_KEY, output=done.stdout + done.stderr)


def assert_never_shown(key: str, **places: str | bytes) -> None:
    """Neither the key nor any 8 characters of it, in any of `places`."""
    pieces = {key[start : start + 8] for start in range(len(key) - 7)}
    for place, text in places.items():
        haystack = text.decode("latin-1") if isinstance(text, bytes) else text
        leaked = [piece for piece in pieces if piece in haystack]
        assert not leaked, f"the HMAC key shows in {place}: {leaked[:3]}"

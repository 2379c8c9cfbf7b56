"""Hostile values in the mirrored request, straight into the real agent.

HAProxy rejects most malformed client requests before the SPOE filter sees them, so these tests play
HAProxy themselves (tests/support/spop_peer.py): HELLO, then NOTIFYs whose `mirror` message carries
the bad method, path, headers or body, against the real `spoa-mirror` process. What the agent does
with them matters anyway: HAProxy's options (`accept-invalid-http-request`), a bug in HAProxy, or a
sample fetch nobody expected can hand it anything, and what it sends goes onto a keep-alive
connection where one split request would desynchronise every request after it.

For every case:
* the ACK comes back at once, whatever the message holds;
* the message gets exactly one account: `spoa_mirror_messages_total{result="invalid",reason}` for a
  message the agent cannot read, else one outcome of the target (`invalid` for a request that
  cannot be sent safely, `body_too_large`, `body_truncated`, `sent_2xx`);
* the shadow (`StrictShadow`, which keeps every byte it receives and reads them more strictly than
  any real server) never sees a malformed or split request: exactly the expected number of requests,
  each with a valid request line and header lines, one Host, no Transfer-Encoding, and a
  Content-Length equal to the body that follows.
"""

from __future__ import annotations

import asyncio
import re
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from spoa_mirror.mirror import ACK_ACCEPTED, ACK_REFUSED
from spoe import FrameType, Message
from spoe.data import encode_varint
from spoe.frames import encode_messages
from tests.support.procs import ManagedProcess, free_port, run_process
from tests.support.spop_peer import (
    TcpPeer,
    ack_actions,
    haproxy_disconnect,
    hello_2x,
    hello_3x,
    notify,
    notify_fragments,
)

ROOT = Path(__file__).resolve().parent.parent
SETTLE_TIMEOUT = 10.0
MAX_BODY = 64 * 1024  # the target's max_body_size
FRAGMENT = 16000  # NOTIFY payload per frame: under the 16380 bytes HAProxy 2.6 negotiates
MISSING: Any = object()  # an argument left out of the message

# -- the strict shadow -----------------------------------------------------------------------------

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# A request target may carry obs-text (bytes >= 0x80): HAProxy forwards such bytes to the primary
# when told to, and the agent replays them byte for byte. Whitespace and controls would end the
# request line early, so they may never appear.
_REQUEST_LINE = re.compile(rb"(?P<method>" + _TOKEN + rb") (?P<target>/[\x21-\x7e\x80-\xff]*|\*) HTTP/1\.1")
# RFC 9110 5.5: CR, LF and NUL in a field value are invalid and dangerous; other controls "MAY be
# retained", and HAProxy does retain them, so the agent replays them as the primary got them. A line
# starting with whitespace (obs-fold) is refused: the name must start the line.
_FIELD_LINE = re.compile(rb"(?P<name>" + _TOKEN + rb"):[ \t]*(?P<value>[^\x00\r\n]*?)[ \t]*")
_BARE_CR_OR_LF = re.compile(rb"\r(?=[^\n])|(?<!\r)\n")
_CONTENT_LENGTH = re.compile(rb"[0-9]+")


class Malformed(ValueError):
    """What the strict shadow refuses: a request no server should have to guess about."""


@dataclass
class ShadowRequest:
    raw: bytes
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def values(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


def parse_request(data: bytes | bytearray) -> tuple[ShadowRequest, int] | None:
    """The first request in `data` and the bytes it used, or None while it is incomplete."""
    end = data.find(b"\r\n\r\n")
    if _BARE_CR_OR_LF.search(data if end < 0 else data[: end + 4]):
        raise Malformed(f"bare CR or LF in the head: {bytes(data[:300])!r}")
    if end < 0:
        return None
    request_line, *field_lines = bytes(data[:end]).split(b"\r\n")
    line = _REQUEST_LINE.fullmatch(request_line)
    if line is None:
        raise Malformed(f"bad request line {request_line[:300]!r}")
    if line["target"] == b"*" and line["method"] != b"OPTIONS":
        raise Malformed(f"asterisk-form target with {line['method']!r}")
    headers = []
    for field_line in field_lines:
        field = _FIELD_LINE.fullmatch(field_line)
        if field is None:
            raise Malformed(f"bad header line {field_line[:300]!r}")
        headers.append((field["name"], field["value"]))
    names = [name.lower() for name, _ in headers]
    if names.count(b"host") != 1:
        raise Malformed(f"{names.count(b'host')} Host headers")
    if b"transfer-encoding" in names:
        raise Malformed("Transfer-Encoding in a mirrored request")
    lengths = [value for name, value in headers if name.lower() == b"content-length"]
    if len(lengths) > 1:
        raise Malformed(f"{len(lengths)} Content-Length headers: {lengths}")
    if lengths and not _CONTENT_LENGTH.fullmatch(lengths[0]):
        raise Malformed(f"Content-Length {lengths[0]!r}")
    total = end + 4 + (int(lengths[0]) if lengths else 0)
    if len(data) < total:
        return None
    request = ShadowRequest(
        raw=bytes(data[:total]),
        method=line["method"],
        target=line["target"],
        headers=headers,
        body=bytes(data[end + 4 : total]),
    )
    return request, total


class _ShadowHandler(socketserver.BaseRequestHandler):
    server: _ShadowTCPServer

    def handle(self) -> None:
        shadow = self.server.shadow
        sock: socket.socket = self.request
        sock.settimeout(30)
        buffer = bytearray()
        while True:
            try:
                chunk = sock.recv(1 << 16)
            except OSError:
                return
            if not chunk:
                if buffer:
                    shadow.refuse(f"connection closed inside a request: {bytes(buffer[:300])!r}")
                return
            buffer += chunk
            while True:
                try:
                    parsed = parse_request(buffer)
                except Malformed as error:
                    shadow.refuse(str(error))
                    sock.sendall(
                        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
                    return
                if parsed is None:
                    break
                request, used = parsed
                del buffer[:used]
                shadow.record(request)
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")


class _ShadowTCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    shadow: StrictShadow


class StrictShadow:
    """A shadow that parses the raw byte stream of every connection with `parse_request` and
    remembers every request and every refusal. Answers 200 to what it accepts, 400 and a close to
    what it refuses (so the agent would count `sent_4xx`, which no case expects)."""

    def __init__(self) -> None:
        self.requests: list[ShadowRequest] = []
        self.refusals: list[str] = []
        self._lock = threading.Lock()
        self._server = _ShadowTCPServer(("127.0.0.1", 0), _ShadowHandler)
        self._server.shadow = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="strict-shadow", daemon=True)

    def __enter__(self) -> StrictShadow:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def record(self, request: ShadowRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def refuse(self, problem: str) -> None:
        with self._lock:
            self.refusals.append(problem)

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return len(self.requests), len(self.refusals)


# -- the agent -------------------------------------------------------------------------------------


@dataclass
class Agent:
    process: ManagedProcess
    spop_port: int
    admin_port: int
    shadow: StrictShadow

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        with socket.create_connection(("127.0.0.1", self.admin_port), timeout=5) as sock:
            sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: admin\r\n\r\n")
            response = b"".join(iter(lambda: sock.recv(65536), b""))
        text = response.partition(b"\r\n\r\n")[2].decode()
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


def value(metrics: dict, name: str, **labels: str) -> int:
    return int(metrics.get((name, frozenset(labels.items())), 0))


def changes(before: dict, after: dict, name: str, *labels: str) -> dict[tuple[str, ...], int]:
    """The samples of `name` that moved between two scrapes, keyed by the values of `labels`."""

    def counts(metrics: dict) -> dict[tuple[str, ...], int]:
        return {
            tuple(dict(sample_labels)[label] for label in labels): int(count)
            for (sample_name, sample_labels), count in metrics.items()
            if sample_name == name
        }

    old = counts(before)
    return {key: count - old.get(key, 0) for key, count in counts(after).items() if count != old.get(key, 0)}


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    """One agent and one strict shadow for the module; every case leaves both idle for the next."""
    tmp_path = tmp_path_factory.mktemp("bad-requests")
    spop_port, admin_port = free_port(), free_port()
    with StrictShadow() as shadow:
        config = {
            "listen": {"port": spop_port},
            "admin": {"port": admin_port},
            "log": {"format": "json", "level": "debug"},
            "messages": ["mirror"],
            "targets": [
                {"name": "shadow", "url": f"http://127.0.0.1:{shadow.port}", "max_body_size": MAX_BODY}
            ],
        }
        config_path = tmp_path / "agent.yaml"
        config_path.write_text(yaml.safe_dump(config))
        argv = [sys.executable, "-m", "spoa_mirror", "--config", str(config_path)]
        with run_process(
            argv, ready_port=admin_port, name="spoa-mirror", log_dir=tmp_path, cwd=ROOT
        ) as process:
            yield Agent(process, spop_port, admin_port, shadow)


# -- driving it ------------------------------------------------------------------------------------


def mirror(name: str = "mirror", **args: Any) -> Message:
    """A message as HAProxy sends it for `args arg_method=method arg_path=url arg_ver=req.ver
    arg_hdrs=req.hdrs arg_body=req.body body_len=req.body_len`, with `args` replacing (or, as
    MISSING, removing) arguments."""
    base: dict[str, Any] = {
        "arg_method": "GET",
        "arg_path": "/ok",
        "arg_ver": "1.1",
        "arg_hdrs": "Host: app.test\r\nAccept: */*\r\n\r\n",
        "arg_body": b"",
        "body_len": 0,
    }
    base.update(args)
    return Message(name, {key: arg for key, arg in base.items() if arg is not MISSING})


def hdrs_bin(*pairs: tuple[bytes, bytes]) -> bytes:
    """`req.hdrs_bin`: <str:name><str:value>... then two empty strings."""
    return b"".join(
        encode_varint(len(name)) + name + encode_varint(len(field)) + field
        for name, field in (*pairs, (b"", b""))
    )


def with_body(body: bytes, *header_lines: str, method: str = "POST") -> dict[str, Any]:
    """Message args for a request with `body`, as HAProxy has it (de-chunked, `body_len` its size)."""
    block = "".join(f"{line}\r\n" for line in ("Host: app.test", *header_lines)) + "\r\n"
    return {"arg_method": method, "arg_hdrs": block, "arg_body": body, "body_len": len(body)}


async def _notify_and_ack(port: int, messages: list[Message]) -> None:
    """One SPOP connection: HELLO, the NOTIFY (fragmented when it does not fit a frame, as HAProxy 2.x
    does towards an agent announcing fragmentation), the ACK. That the ACK goes out before any replay
    work is checked structurally in test_pipeline.py; the 5 s wait here only catches a hang."""
    peer = await TcpPeer.connect(("127.0.0.1", port))
    try:
        hello = await peer.handshake(hello_2x())
        assert "fragmentation" in hello["capabilities"]
        payload = encode_messages(messages)
        if len(payload) <= FRAGMENT:
            frames = [notify(7, 1, messages)]
        else:
            frames = notify_fragments(7, 1, messages, range(FRAGMENT, len(payload), FRAGMENT))
        for frame in frames:  # frame by frame, as HAProxy writes them
            await peer.send(frame)
        ack = await peer.recv_frame(timeout=5.0)
        assert ack.type == FrameType.ACK, f"expected an ACK, got frame type {ack.type}"
        assert (ack.stream_id, ack.frame_id) == (7, 1)
        actions = ack_actions(ack)  # one per message, never none: see spoa_mirror.mirror.ACK_ACCEPTED
        assert actions and all(action in (*ACK_ACCEPTED, *ACK_REFUSED) for action in actions), actions
        await peer.send(haproxy_disconnect())
    finally:
        peer.close()


@dataclass
class Result:
    outcomes: dict[str, int]  # the target's outcomes that moved, and by how much
    invalid: dict[str, int]  # messages_total{result="invalid"} reasons that moved
    not_mirror: int
    requests: list[ShadowRequest]  # what the shadow received meanwhile


def deliver(agent: Agent, *messages: Message, offered: int) -> Result:
    """Send `messages` in one NOTIFY, check it is ACKed, wait until every message is counted,
    `offered` of them reached the target and none is in flight, and return what moved."""
    before = agent.metrics()
    seen, refused = agent.shadow.snapshot()
    asyncio.run(_notify_and_ack(agent.spop_port, list(messages)))

    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        after = agent.metrics()
        messages_moved = changes(before, after, "spoa_mirror_messages_total", "result", "reason")
        received = changes(before, after, "spoa_mirror_requests_received_total", "target").get(("shadow",), 0)
        settled = {
            key[0]: count
            for key, count in changes(before, after, "spoa_mirror_requests_total", "outcome").items()
        }
        in_flight = value(after, "spoa_mirror_in_flight", target="shadow")
        if (
            sum(messages_moved.values()) == len(messages)
            and received == sum(settled.values()) == offered
            and not in_flight
        ):
            break
        if time.monotonic() > deadline:
            pytest.fail(
                f"not settled after {SETTLE_TIMEOUT} s: messages {messages_moved}, received {received}, "
                f"outcomes {settled}, in flight {in_flight} (expected {offered} offered)\n"
                + agent.process.stderr_tail()
            )
        time.sleep(0.01)
    assert agent.shadow.snapshot()[1] == refused, f"the shadow refused: {agent.shadow.refusals[refused:]}"
    return Result(
        outcomes=settled,
        invalid={reason: count for (result, reason), count in messages_moved.items() if result == "invalid"},
        not_mirror=messages_moved.get(("not_mirror", "none"), 0),
        requests=agent.shadow.requests[seen:],
    )


def sent_one(agent: Agent, message: Message) -> ShadowRequest:
    """Deliver a message the agent must mirror; its one request, checked for what every mirrored
    request carries (the parser already checked its framing)."""
    result = deliver(agent, message, offered=1)
    assert result.outcomes == {"sent_2xx": 1}
    [request] = result.requests
    assert request.values(b"host") == [f"127.0.0.1:{agent.shadow.port}".encode()]
    [marker] = request.values(b"x-spoa-mirror")
    assert marker.startswith(b"v1-")
    head = request.raw.partition(b"\r\n\r\n")[0].lower()
    assert b"smuggled" not in head and b"evil" not in head
    return request


def content_length(request: ShadowRequest) -> int:
    [length] = request.values(b"content-length") or [b"0"]
    return int(length)


# -- messages the agent cannot read --------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        pytest.param({"arg_method": 1}, "bad_method", id="method-int"),
        pytest.param({"arg_method": True}, "bad_method", id="method-bool"),
        pytest.param({"arg_method": IPv4Address("10.0.0.1")}, "bad_method", id="method-ipv4"),
        pytest.param({"arg_method": None}, "missing_method", id="method-null"),
        pytest.param({"arg_method": MISSING}, "missing_method", id="method-missing"),
        pytest.param({"arg_path": MISSING}, "missing_path", id="path-missing"),
        pytest.param({"arg_path": 42}, "bad_path", id="path-int"),
        pytest.param({"arg_path": IPv6Address("::1")}, "bad_path", id="path-ipv6"),
        pytest.param({"arg_ver": 11}, "bad_version", id="version-int"),
        pytest.param({"arg_hdrs": 7}, "bad_headers", id="headers-int"),
        pytest.param({"arg_hdrs": False}, "bad_headers", id="headers-bool"),
        pytest.param({"arg_body": 5}, "bad_body", id="body-int"),
        pytest.param({"arg_body": IPv6Address("::1")}, "bad_body", id="body-ipv6"),
        pytest.param({"body_len": "5"}, "bad_body_len", id="body-len-string"),
        pytest.param({"body_len": True}, "bad_body_len", id="body-len-bool"),
        pytest.param({"src": 1}, "bad_src", id="src-int"),
        pytest.param({"unique_id": 9}, "bad_unique_id", id="unique-id-int"),
        pytest.param({"arg_path": "ftp://evil.test/x"}, "bad_target_scheme", id="absolute-ftp"),
        pytest.param({"arg_path": "file:///etc/passwd"}, "bad_target_scheme", id="absolute-file"),
        pytest.param({"arg_path": "gopher://evil.test:70/x"}, "bad_target_scheme", id="absolute-gopher"),
        pytest.param({"arg_path": "http://u:pw@evil.test/x"}, "bad_target_userinfo", id="absolute-userinfo"),
        pytest.param({"arg_path": "https://@evil.test/x"}, "bad_target_userinfo", id="absolute-empty-user"),
        pytest.param({"arg_path": "http:///x"}, "bad_target_authority", id="absolute-no-authority"),
        pytest.param({"arg_path": "http://evil test/x"}, "bad_target_authority", id="absolute-space-host"),
        pytest.param(
            {"arg_path": "http://evil.test\r\nX: y/x"}, "bad_target_authority", id="absolute-crlf-authority"
        ),
        pytest.param({"arg_path": "http://evil.test:8o/x"}, "bad_target_authority", id="absolute-bad-port"),
    ],
)
def test_unreadable_message_is_counted_invalid_and_acked(
    agent: Agent, args: dict[str, Any], reason: str
) -> None:
    """Wrong argument types (an INT method, an address as the path, a missing path in a message
    named as a mirror message): nothing is offered to any target, the message is counted under its
    reason, and the ACK is as prompt as for any other."""
    result = deliver(agent, mirror(**args), offered=0)
    assert result.invalid == {reason: 1}
    assert result.requests == []


def test_other_messages_are_not_mirror_requests(agent: Agent) -> None:
    """With `messages: [mirror]`, a message of another name is ACKed and counted `not_mirror`, even
    with a method and a path."""
    result = deliver(agent, mirror("check-request"), offered=0)
    assert result.not_mirror == 1 and result.invalid == {}
    assert result.requests == []


def test_an_ack_to_haproxy_3x_is_never_empty(agent: Agent) -> None:
    """HAProxy 3.1.0 never wakes the SPOE filter on an ACK without actions, so the scripted 3.x peer
    fails on one: even a message the agent refuses at once gets an ACK carrying its verdict."""

    async def exchange_3x() -> list[list[Any]]:
        peer = await TcpPeer.connect(("127.0.0.1", agent.spop_port))
        try:
            await peer.handshake(hello_3x())
            await peer.send(notify(1, 1, [mirror("check-request")]), notify(3, 1, [mirror("other")]))
            return [ack_actions(frame) for frame in await peer.recv_frames(2)]
        finally:
            peer.close()

    assert asyncio.run(exchange_3x()) == [list(ACK_REFUSED)] * 2


# -- requests that cannot be sent safely ---------------------------------------------------------

SMUGGLED = "\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: evil.test\r\n\r\n"


@pytest.mark.parametrize(
    "args",
    [
        pytest.param({"arg_method": "GE T"}, id="method-space"),
        pytest.param({"arg_method": "G\r\nET"}, id="method-crlf"),
        pytest.param({"arg_method": ""}, id="method-empty"),
        pytest.param({"arg_method": "GET\x00"}, id="method-nul"),
        pytest.param({"arg_method": "G(E)T"}, id="method-separators"),
        pytest.param({"arg_method": "G\u00c9T"}, id="method-non-ascii"),
        pytest.param({"arg_method": b"G\xffT"}, id="method-non-utf8"),
        pytest.param({"arg_method": "GET /x HTTP/1.1\r\nHost: evil.test\r\n\r\nGET"}, id="method-request"),
        pytest.param({"arg_path": "/a b"}, id="path-space"),
        pytest.param({"arg_path": "/a\tb"}, id="path-tab"),
        pytest.param({"arg_path": "/a\x01b"}, id="path-control"),
        pytest.param({"arg_path": "/a\x7f"}, id="path-del"),
        pytest.param({"arg_path": "/a\x00b"}, id="path-nul"),
        pytest.param({"arg_path": "/a\r\nHost: evil.test"}, id="path-crlf"),
        pytest.param({"arg_path": "/a\nHost: evil.test"}, id="path-lf"),
        pytest.param({"arg_path": "/a HTTP/1.1" + SMUGGLED}, id="path-smuggled-request"),
        pytest.param({"arg_path": "a/b"}, id="path-relative"),
        pytest.param({"arg_path": "http:/evil.test/x"}, id="path-absolute-form-one-slash"),
        pytest.param({"arg_path": "http://app.test/a b"}, id="path-absolute-form-space"),
        pytest.param({"arg_path": "http://app.test/a\r\nHost: evil.test"}, id="path-absolute-form-crlf"),
        pytest.param({"arg_path": ""}, id="path-empty"),
        pytest.param({"arg_path": "*"}, id="path-asterisk-with-get"),
        pytest.param({"arg_hdrs": "X-A: x\nHost: evil.test\r\n\r\n"}, id="string-headers-bare-lf"),
        pytest.param({"arg_hdrs": "X-A: x\rHost: evil.test\r\n\r\n"}, id="string-headers-bare-cr"),
        pytest.param({"arg_hdrs": "X-A: x\x00y\r\n\r\n"}, id="string-headers-nul"),
        pytest.param({"arg_hdrs": "X A: x\r\n\r\n"}, id="string-headers-name-space"),
        pytest.param({"arg_hdrs": "X-\u00c4: x\r\n\r\n"}, id="string-headers-name-non-ascii"),
        pytest.param({"arg_hdrs": hdrs_bin((b"X-A", b"x\r\nHost: evil.test"))}, id="bin-value-crlf"),
        pytest.param({"arg_hdrs": hdrs_bin((b"X-A", SMUGGLED.encode()))}, id="bin-value-smuggled-request"),
        pytest.param({"arg_hdrs": hdrs_bin((b"X-A", b"x\ny"))}, id="bin-value-lf"),
        pytest.param({"arg_hdrs": hdrs_bin((b"X-A", b"x\x00y"))}, id="bin-value-nul"),
        pytest.param({"arg_hdrs": hdrs_bin((b"X-A\r\nHost", b"evil.test"))}, id="bin-name-crlf"),
        pytest.param({"arg_hdrs": hdrs_bin((b"X A", b"x"))}, id="bin-name-space"),
        pytest.param({"arg_hdrs": hdrs_bin((b"X-A:", b"x"))}, id="bin-name-colon"),
        pytest.param({"arg_hdrs": hdrs_bin((b"", b"x"))}, id="bin-name-empty"),
        pytest.param({"arg_hdrs": hdrs_bin((b"Transfer-Encoding ", b"chunked"))}, id="bin-name-te-space"),
        pytest.param({"arg_hdrs": hdrs_bin((b"Connection", b"close\r\nX-B: y"))}, id="bin-hop-by-hop-crlf"),
        pytest.param(
            {"arg_hdrs": hdrs_bin((b"Content-Length", b"0\r\n\r\nGET /smuggled"))}, id="bin-cl-crlf"
        ),
        pytest.param({"src": "192.0.2.1\r\nX-Evil: 1"}, id="src-crlf"),
    ],
)
def test_unsafe_request_is_counted_invalid_and_never_sent(agent: Agent, args: dict[str, Any]) -> None:
    """A method that is not a token, a target that is not origin-form or holds whitespace or
    controls, a header name that is not a token, CR/LF/NUL in any header value (even of a header the
    agent drops, and in the X-Forwarded-For built from `src`): the request is offered to the target
    and counted `invalid`; not a byte of it reaches the shadow."""
    result = deliver(agent, mirror(**args), offered=1)
    assert result.outcomes == {"invalid": 1}
    assert result.requests == []


# -- requests that are sent, safely --------------------------------------------------------------


def test_non_utf8_path_is_sent_byte_for_byte(agent: Agent) -> None:
    """Paths are bytes (HAProxy with `accept-invalid-http-request` passes obs-text): a BINARY path
    and a STRING path holding invalid UTF-8 both reach the shadow as the same bytes."""
    assert sent_one(agent, mirror(arg_path=b"/caf\xe9?q=\xff\xfe")).target == b"/caf\xe9?q=\xff\xfe"
    assert sent_one(agent, mirror(arg_path="/caf\udce9")).target == b"/caf\xe9"


@pytest.mark.parametrize(
    ("path", "target"),
    [
        pytest.param("http://app.test/x?q=1", b"/x?q=1", id="http"),
        pytest.param("https://app.test:8443/a/b", b"/a/b", id="https-port"),
        pytest.param("HTTPS://APP.test", b"/", id="no-path"),
        pytest.param("http://app.test?q=1", b"/?q=1", id="query-only"),
        pytest.param("http://[2001:db8::1]:8080/v6", b"/v6", id="ipv6-literal"),
        pytest.param("https://app.test//other.test/x", b"//other.test/x", id="authority-like-path"),
    ],
)
def test_absolute_form_from_http2_clients_is_sent_in_origin_form(
    agent: Agent, path: str, target: bytes
) -> None:
    """HAProxy's `url` fetch gives the absolute form for a request that came over HTTP/2 or HTTP/3:
    http and https ones are mirrored in origin form (the shadow's Host stays the target's)."""
    assert sent_one(agent, mirror(arg_path=path)).target == target


def test_odd_but_harmless_targets_are_sent_as_given(agent: Agent) -> None:
    """Characters RFC 3986 does not allow but HAProxy forwards by default, a path that looks like an
    authority, and OPTIONS * are sent as they are: none can end the request line."""
    assert sent_one(agent, mirror(arg_path='/a"<>{}|^`\\')).target == b'/a"<>{}|^`\\'
    assert sent_one(agent, mirror(arg_path="//other.test/x")).target == b"//other.test/x"
    options = sent_one(agent, mirror(arg_method="OPTIONS", arg_path="*"))
    assert (options.method, options.target) == (b"OPTIONS", b"*")


def test_any_token_is_a_method(agent: Agent) -> None:
    for method in ("M-SEARCH", "get", "PROPFIND"):
        assert sent_one(agent, mirror(arg_method=method)).method == method.encode()


def test_the_version_argument_never_reaches_the_wire(agent: Agent) -> None:
    """The agent always speaks HTTP/1.1 to the shadow; the client's version (a string from HAProxy)
    is not copied into the request line, so a hostile one cannot split it."""
    for version in ("1.1\r\nX-Evil: 1", "2.0", "0.9", ""):
        request = sent_one(agent, mirror(arg_ver=version))
        assert request.raw.startswith(b"GET /ok HTTP/1.1\r\n")
        assert request.values(b"x-evil") == []


def test_header_block_cannot_smuggle_a_request(agent: Agent) -> None:
    """`req.hdrs` ends at its first empty line: whatever follows it (a second request) is not read,
    and lines without a colon (an obs-fold continuation, garbage) are dropped rather than forwarded."""
    request = sent_one(agent, mirror(arg_hdrs="Host: app.test\r\nX-A: x" + SMUGGLED))
    assert request.values(b"x-a") == [b"x"]
    assert b"smuggled" not in request.raw
    request = sent_one(agent, mirror(arg_hdrs="X-A: v\r\n folded on\r\nno colon here\r\nX-B: w\r\n\r\n"))
    assert [name for name, _ in request.headers] == [b"Host", b"X-A", b"X-B", b"X-Spoa-Mirror"]


def test_duplicated_host_becomes_the_target_host(agent: Agent) -> None:
    sent_one(agent, mirror(arg_hdrs="Host: a.test\r\nHost: evil.test\r\n\r\n"))


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param("X-A: caf\udce9\r\n\r\n", b"caf\xe9", id="string-invalid-utf8"),
        pytest.param("X-A: caf\u00e9\r\n\r\n", "caf\u00e9".encode(), id="string-utf8"),
        pytest.param(hdrs_bin((b"X-A", b"caf\xe9")), b"caf\xe9", id="bin-invalid-utf8"),
        pytest.param(hdrs_bin((b"X-A", "caf\u00e9".encode())), "caf\u00e9".encode(), id="bin-utf8"),
        pytest.param(hdrs_bin((b"X-A", b"a\x01b\x7fc\td")), b"a\x01b\x7fc\td", id="bin-controls"),
        pytest.param(b"X-A: caf\xe9\r\n\r\n", b"caf\xe9", id="binary-text-block"),
    ],
)
def test_header_values_are_sent_byte_for_byte(agent: Agent, headers: str | bytes, expected: bytes) -> None:
    """Header values are bytes: obs-text and UTF-8 arrive as HAProxy saw them, from `req.hdrs`
    (STRING, or BINARY when a config sends it so) and `req.hdrs_bin` alike, and so do the controls
    HAProxy forwards to the primary (anything but CR, LF and NUL)."""
    assert sent_one(agent, mirror(arg_hdrs=headers)).values(b"x-a") == [expected]


def test_one_megabyte_header_block_in_fragments(agent: Agent) -> None:
    """A 1 MB `req.hdrs` (1,000 headers), far over one frame: fragmented as HAProxy 2.x does, ACKed
    once the last fragment is in, and sent whole in one well-formed request."""
    lines = "".join(f"X-Big-{n:04}: {n:04}{'v' * 986}\r\n" for n in range(1000))
    block = "Host: app.test\r\n" + lines + "\r\n"
    assert len(block) > 1_000_000
    request = sent_one(agent, mirror(arg_hdrs=block))
    big = [(name, field) for name, field in request.headers if name.startswith(b"X-Big-")]
    assert len(big) == 1000
    assert big[-1] == (b"X-Big-0999", b"0999" + b"v" * 986)


def test_one_megabyte_header_value_in_binary_headers(agent: Agent) -> None:
    field = b"w" * 1_000_000
    request = sent_one(agent, mirror(arg_hdrs=hdrs_bin((b"Host", b"app.test"), (b"X-Huge", field))))
    assert request.values(b"x-huge") == [field]


BODY = b"hello"


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(with_body(BODY, "Content-Length: 5", "Content-Length: 5"), id="cl-duplicated"),
        pytest.param(
            with_body(BODY, "content-length: 5", "Content-Length: 05"), id="cl-duplicated-spellings"
        ),
        pytest.param(with_body(BODY, "Content-Length: 5, 5"), id="cl-list"),
        pytest.param(with_body(BODY, "Content-Length: 3"), id="cl-smaller-than-body"),
        pytest.param(with_body(BODY, "Content-Length: abc"), id="cl-not-a-number"),
        pytest.param(with_body(BODY, "Content-Length: -1"), id="cl-negative"),
        pytest.param(with_body(BODY, "Content-Length: 0x10"), id="cl-hex"),
        pytest.param(with_body(BODY, "Content-Length: \u00b2"), id="cl-superscript-digit"),
        pytest.param(with_body(BODY, "Transfer-Encoding: chunked"), id="te-chunked"),
        pytest.param(with_body(BODY, "Transfer-Encoding: gzip, chunked"), id="te-gzip-chunked"),
        pytest.param(
            with_body(BODY, "transfer-encoding: chunked", "Transfer-Encoding: identity"), id="te-duplicated"
        ),
        pytest.param(with_body(BODY, "Transfer-Encoding: chunked", "Content-Length: 3"), id="te-and-cl"),
        pytest.param(
            with_body(BODY, "Expect: 100-continue", "Connection: keep-alive, Upgrade"), id="hop-by-hop"
        ),
        pytest.param(with_body(BODY, "Content-Type: text/plain", method="GET"), id="get-with-body"),
        pytest.param({**with_body(BODY), "arg_body": "hello"}, id="body-as-string"),
        pytest.param({**with_body(BODY), "body_len": -1}, id="body-len-negative"),
    ],
)
def test_body_framing_is_always_the_agents_own(agent: Agent, args: dict[str, Any]) -> None:
    """Duplicated, listed, short or meaningless Content-Lengths and Transfer-Encoding (HAProxy hands
    over a de-chunked body) never reach the shadow: the request carries one Content-Length, the size
    of the body that follows it, and no Transfer-Encoding, whatever the client's headers said."""
    request = sent_one(agent, mirror(**args))
    assert request.body == BODY
    assert request.values(b"content-length") == [b"5"]
    assert request.values(b"expect") == request.values(b"upgrade") == request.values(b"connection") == []


def test_body_with_a_request_inside_is_framed_as_body(agent: Agent) -> None:
    """A body holding chunk framing and a whole second request is just bytes: Content-Length covers
    all of it, so the shadow reads one request."""
    body = b"5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: evil.test\r\n\r\n"
    request = sent_one(agent, mirror(**with_body(body, "Transfer-Encoding: chunked")))
    assert request.body == body
    assert content_length(request) == len(body)


def test_binary_body_is_sent_byte_for_byte(agent: Agent) -> None:
    body = bytes(range(256)) * 4
    request = sent_one(agent, mirror(**with_body(body, "Content-Type: application/octet-stream")))
    assert request.body == body


def test_body_at_the_limit_is_sent_and_one_byte_more_is_not(agent: Agent) -> None:
    """`max_body_size` is inclusive; the bodies come in fragments, as HAProxy sends large ones."""
    at_limit = b"b" * MAX_BODY
    assert sent_one(agent, mirror(**with_body(at_limit))).body == at_limit
    result = deliver(agent, mirror(**with_body(at_limit + b"b")), offered=1)
    assert result.outcomes == {"body_too_large": 1}
    assert result.requests == []


@pytest.mark.parametrize(
    "args",
    [
        pytest.param({**with_body(BODY), "body_len": 10}, id="body-len-larger"),
        pytest.param(with_body(BODY, "Content-Length: 10"), id="cl-larger"),
        pytest.param(with_body(BODY, "Content-Length: 10", "Content-Length: 5"), id="cl-conflicting"),
        pytest.param(with_body(BODY, "Content-Length: " + "9" * 5000), id="cl-5000-digits"),
    ],
)
def test_body_shorter_than_declared_is_dropped_as_truncated(agent: Agent, args: dict[str, Any]) -> None:
    """A client that declared more than HAProxy handed over: with the default `truncated_body: drop`
    the request is counted `body_truncated`, never sent with a length the body does not have."""
    result = deliver(agent, mirror(**args), offered=1)
    assert result.outcomes == {"body_truncated": 1}
    assert result.requests == []


def test_transfer_encoding_with_content_length_is_not_taken_for_truncated(agent: Agent) -> None:
    """A chunked request that also carries a Content-Length: the length means nothing (RFC 9112
    6.3) and HAProxy handed over the whole de-chunked body, so the request is sent, not dropped as
    body_truncated (it used to be, the length being larger than the body)."""
    args = with_body(BODY, "Transfer-Encoding: chunked", "Content-Length: 99999")
    request = sent_one(agent, mirror(**args))
    assert request.body == BODY
    assert content_length(request) == len(BODY)


def test_a_hostile_message_does_not_take_its_neighbours_down(agent: Agent) -> None:
    """One NOTIFY carrying an unreadable message, an unsafe request and a good one: each is
    accounted on its own and the good one is sent."""
    result = deliver(
        agent,
        mirror(arg_method=3),
        mirror(arg_path="/a\r\nHost: evil.test"),
        mirror(arg_path="/fine"),
        offered=2,
    )
    assert result.invalid == {"bad_method": 1}
    assert result.outcomes == {"invalid": 1, "sent_2xx": 1}
    assert [request.target for request in result.requests] == [b"/fine"]


def test_the_account_balances_and_the_agent_is_unharmed(agent: Agent) -> None:
    """Last in the module, after every case above: received equals the sum of the outcomes with
    nothing in flight, no handler raised, nothing crashed in the event loop, the shadow never refused
    a byte, and the agent still mirrors."""
    sent_one(agent, mirror(arg_path="/still-working"))
    metrics = agent.metrics()
    settled = sum(changes({}, metrics, "spoa_mirror_requests_total", "outcome").values())
    assert value(metrics, "spoa_mirror_requests_received_total", target="shadow") == settled
    assert value(metrics, "spoa_mirror_in_flight", target="shadow") == 0
    assert value(metrics, "spoa_mirror_handler_errors_total") == 0
    assert agent.shadow.refusals == []
    agent.process.assert_running()
    logs = agent.process.stdout_text() + agent.process.stderr_text()
    assert "Traceback" not in logs and "Exception in callback" not in logs

"""Shadow backends for tests.

`ShadowServer` is an HTTP/1.1 server on 127.0.0.1 that records every request it gets and answers in a
chosen, possibly broken, way. `NginxServer` is a real nginx serving a static file, for what a
well-behaved production server does and for benchmarks. `self_signed_tls` makes either side of a TLS
test.

It runs its own event loop in a background thread, so the same server serves sync tests and async
tests alike (an async test talks to it over the socket like any client would):

    with ShadowServer() as shadow:                      # mode "ok": 200, keep-alive
        ...send requests to shadow.port...
        [request] = shadow.wait_for(1)
        assert request.method == "GET" and request.header("host") == "..."

Modes (`ShadowServer(mode=...)`, or assign `shadow.mode` at any time; it applies to the next request):

    ok               200 with a small body, keep-alive; HEAD gets the headers only
    refuse           nothing listens: `port` is a bound but never listening port, connects are refused
    hang             reads requests, never answers
    delay            answers like "ok" after `delay` seconds
    reset            sends the head and part of the body, then a TCP RST (SO_LINGER 0)
    garbage          answers bytes that are not HTTP
    chunked          200 with a chunked body
    close_delimited  200 with neither Content-Length nor chunking, then closes (body ends at EOF)
    interim_100      100 Continue and 103 Early Hints before the response
    close_after      answers with `Connection: close`, then closes
    stale            closes without answering when a request arrives on an already used connection,
                     as a server does when it times out an idle keep-alive connection just as a
                     request is on its way; first requests on a connection are answered like "ok"
    drop             closes without answering, on every connection

`status` and `body` shape the answers (a 204 or 304 gets no body); a `responder`, given each request,
returns a `Reply` instead (status, extra headers, body, delay), for servers that answer by path.
Requests are recorded raw (the exact bytes, one message each) and parsed, with the id of the
connection they came on, so tests can prove keep-alive reuse.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Self

import httptools

MODES = frozenset(
    {
        "ok",
        "refuse",
        "hang",
        "delay",
        "reset",
        "garbage",
        "chunked",
        "close_delimited",
        "interim_100",
        "close_after",
        "stale",
        "drop",
    }
)


@dataclass(slots=True)
class RecordedRequest:
    raw: bytes
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    connection_id: int
    http_version: str = "1.1"

    def header(self, name: str) -> str | None:
        """First value of a header, case-insensitively."""
        lname = name.lower()
        return next((value for key, value in self.headers if key.lower() == lname), None)

    def header_values(self, name: str) -> list[str]:
        lname = name.lower()
        return [value for key, value in self.headers if key.lower() == lname]


@dataclass(slots=True)
class _Message:
    target: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)


class LoopThreadServer:
    """An asyncio server on an event loop of its own, in a daemon thread: `start()` returns once it
    listens on a free loopback port, `stop()` aborts its connections and closes it. The recording
    shadows (HTTP/1.1 here, HTTP/2 in shadow_h2.py) add their protocol and what they record."""

    thread_name = "loop-server"

    def __init__(self, ssl_context: ssl.SSLContext | None) -> None:
        self.ssl_context = ssl_context
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[Any] = set()
        self._listening_port = 0

    def _protocol(self) -> asyncio.Protocol:
        raise NotImplementedError

    def _prepare(self, loop: asyncio.AbstractEventLoop) -> None:
        """Before the thread starts: what the subclass sets up around the loop."""

    def start(self) -> Self:
        self._loop = asyncio.new_event_loop()
        self._prepare(self._loop)
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), name=self.thread_name, daemon=True)
        self._thread.start()
        if not started.wait(5) or self._server is None:
            raise RuntimeError(f"{self.thread_name} did not start")
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self, started: threading.Event) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            self._server = loop.run_until_complete(
                loop.create_server(self._protocol, "127.0.0.1", 0, ssl=self.ssl_context)
            )
            self._listening_port = self._server.sockets[0].getsockname()[1]
        finally:
            started.set()
        loop.run_forever()
        for connection in list(self._connections):
            connection.transport.abort()
        self._server.close()
        loop.run_until_complete(self._server.wait_closed())
        loop.run_until_complete(loop.shutdown_asyncgens())


@dataclass
class Reply:
    """What a `responder` answers: the status, extra header lines, the body, and a delay in seconds."""

    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    delay: float = 0.0


class ShadowServer(LoopThreadServer):
    """The recording shadow (see the module docstring); `start()`/`stop()` or a `with` block."""

    def __init__(
        self,
        mode: str = "ok",
        *,
        status: int = 200,
        body: bytes = b"shadow ok\n",
        delay: float = 0.5,
        ssl_context: ssl.SSLContext | None = None,
        responder: Callable[[RecordedRequest], Reply] | None = None,
    ) -> None:
        self.mode = mode
        self.responder = responder
        self.status = status
        self.body = body
        self.delay = delay
        super().__init__(ssl_context)
        self.connections_accepted = 0
        self.peak_connections = 0  # most connections open at the same time
        self.loop_errors: list[dict[str, object]] = []  # what the loop would have logged (TLS failures)
        self._requests: list[RecordedRequest] = []
        self._recorded = threading.Condition()
        self._refusing_socket: socket.socket | None = None

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown shadow mode {mode!r}; one of {sorted(MODES)}")
        self._mode = mode

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        """Where clients should connect: in mode "refuse", a port nothing listens on."""
        if self._mode == "refuse":
            assert self._refusing_socket is not None, "start() the server first"
            return self._refusing_socket.getsockname()[1]
        return self._listening_port

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot, safe to read from any thread."""
        with self._recorded:
            return list(self._requests)

    def wait_for(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Blocks until at least `count` requests were recorded; raises TimeoutError otherwise."""
        with self._recorded:
            if not self._recorded.wait_for(lambda: len(self._requests) >= count, timeout):
                raise TimeoutError(f"shadow got {len(self._requests)} requests, expected {count}")
            return list(self._requests)

    async def wait_for_async(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """`wait_for` for async tests: polls, so the test's own event loop keeps running."""
        deadline = time.monotonic() + timeout
        while True:
            with self._recorded:
                if len(self._requests) >= count:
                    return list(self._requests)
            if time.monotonic() > deadline:
                raise TimeoutError(f"shadow got {len(self.requests)} requests, expected {count}")
            await asyncio.sleep(0.005)

    def clear(self) -> None:
        with self._recorded:
            self._requests.clear()

    def close_idle_connections(self) -> None:
        """Closes (FIN) every connection with no request being answered, as a server's keep-alive
        timeout would; returns once the server has done so."""
        self._call_in_loop(self._close_idle_connections)

    # -- lifecycle -------------------------------------------------------------------------------

    thread_name = "shadow-server"

    def _protocol(self) -> asyncio.Protocol:
        return _ShadowConnection(self)

    def _prepare(self, loop: asyncio.AbstractEventLoop) -> None:
        self._refusing_socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._refusing_socket.bind((self.host, 0))  # bound, never listening: connects get RST
        loop.set_exception_handler(lambda _loop, context: self.loop_errors.append(context))

    def stop(self) -> None:
        super().stop()
        if self._refusing_socket is not None:
            self._refusing_socket.close()

    def _call_in_loop(self, function: Callable[[], None]) -> None:
        assert self._loop is not None
        done = threading.Event()

        def call() -> None:
            try:
                function()
            finally:
                done.set()

        self._loop.call_soon_threadsafe(call)
        if not done.wait(5):
            raise TimeoutError("shadow server loop did not respond")

    def _close_idle_connections(self) -> None:
        for connection in list(self._connections):
            if not connection.answering:
                connection.transport.close()

    def _record(self, request: RecordedRequest) -> None:
        with self._recorded:
            self._requests.append(request)
            self._recorded.notify_all()


class _ShadowConnection(asyncio.Protocol):
    """Feeds the parser one byte at a time: slower than handing it whole reads, but it is the only way
    to know exactly which bytes made up each request when a client sends several in one write (what
    a request-splitting bug would look like), and test traffic is small."""

    def __init__(self, server: ShadowServer) -> None:
        self.server = server
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.connection_id = 0
        self.parser = httptools.HttpRequestParser(self)
        self.raw = bytearray()
        self.message = _Message()
        self.requests_seen = 0
        self.answering = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections_accepted += 1
        self.connection_id = self.server.connections_accepted
        self.server._connections.add(self)
        self.server.peak_connections = max(self.server.peak_connections, len(self.server._connections))

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._connections.discard(self)

    def data_received(self, data: bytes) -> None:
        view = memoryview(data)
        for offset in range(len(data)):
            if self.transport.is_closing():
                return
            self.raw += view[offset : offset + 1]
            try:
                self.parser.feed_data(view[offset : offset + 1])
            except httptools.HttpParserError:
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                self.transport.close()
                return

    # -- httptools callbacks ---------------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        self.message.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.message.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self.message.body += body

    def on_message_complete(self) -> None:
        request = RecordedRequest(
            raw=bytes(self.raw),
            method=self.parser.get_method().decode("ascii"),
            target=self.message.target.decode("latin-1"),
            headers=self.message.headers,
            body=bytes(self.message.body),
            connection_id=self.connection_id,
            http_version=self.parser.get_http_version(),
        )
        keep_alive = self.parser.should_keep_alive()
        self.raw.clear()
        self.message = _Message()
        self.requests_seen += 1
        self.server._record(request)
        self._answer(request, keep_alive)

    # -- answers ---------------------------------------------------------------------------------

    def _answer(self, request: RecordedRequest, keep_alive: bool) -> None:
        mode = self.server.mode
        if mode == "hang":
            self.answering = True
            return
        if mode == "drop" or (mode == "stale" and self.requests_seen > 1):
            self.transport.close()
            return
        reply = None if self.server.responder is None else self.server.responder(request)
        delay = self.server.delay if mode == "delay" else reply.delay if reply is not None else 0.0
        if delay:
            self.answering = True
            asyncio.get_running_loop().call_later(delay, self._send_response, request, keep_alive, reply)
            return
        self._send_response(request, keep_alive, reply)

    def _send_response(self, request: RecordedRequest, keep_alive: bool, reply: Reply | None = None) -> None:
        self.answering = False
        if self.transport.is_closing():
            return
        mode = self.server.mode
        status, body = self.server.status, self.server.body
        if reply is not None:
            status, body = reply.status, reply.body
        if status in (204, 304):
            body = b""
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
        head = [f"HTTP/1.1 {status} {reason}", "Content-Type: text/plain", "Server: shadow"]
        if reply is not None:
            head = [head[0], "Server: shadow", *(f"{name}: {value}" for name, value in reply.headers)]

        if mode == "garbage":
            self.transport.write(b"this is not HTTP at all\r\n\r\n")
            return
        if mode == "interim_100":
            self.transport.write(
                b"HTTP/1.1 100 Continue\r\n\r\n"
                b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
            )
        if mode == "chunked":
            head.append("Transfer-Encoding: chunked")
            half = len(body) // 2
            chunks = [body[:half], body[half:]]
            payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks if c) + b"0\r\n\r\n"
        elif mode == "close_delimited":
            keep_alive = False
            payload = body
        else:
            if status not in (204, 304):
                head.append(f"Content-Length: {len(body)}")
            payload = body
        if mode == "close_after":
            keep_alive = False
        if not keep_alive and mode != "close_delimited":
            head.append("Connection: close")
        if request.method == "HEAD":
            payload = b""
        response = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload

        if mode == "reset":
            self.transport.write(response[: len(response) - max(1, len(payload) // 2)])
            sock = self.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()
            return
        self.transport.write(response)
        if not keep_alive:
            self.transport.close()


NGINX_BINARY = "/usr/sbin/nginx"


class NginxServer:
    """A real nginx on an ephemeral loopback port, serving `body` as /index.txt (and a 404 for anything
    else), with every path under `directory`: the reference server for the transport, as a server
    would be in production, and for benchmarks. Not a recorder: use ShadowServer for that. With
    `h2c=True` the same server also speaks HTTP/2 with prior knowledge on `h2c_port`."""

    def __init__(
        self, directory: str, *, body: bytes = b"nginx ok\n", binary: str = NGINX_BINARY, h2c: bool = False
    ) -> None:
        self.directory = directory
        self.body = body
        self.binary = binary
        self.host = "127.0.0.1"
        self.port = 0
        self.h2c = h2c
        self.h2c_port = 0
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> NginxServer:
        """Picks a free port, then starts nginx on it, retrying if someone else took it meanwhile."""
        root = os.path.join(self.directory, "www")
        os.makedirs(root, exist_ok=True)
        os.makedirs(os.path.join(self.directory, "temp"), exist_ok=True)
        with open(os.path.join(root, "index.txt"), "wb") as out:
            out.write(self.body)
        for _ in range(5):
            self.port = _free_port(self.host)
            self.h2c_port = _free_port(self.host) if self.h2c else 0
            config = os.path.join(self.directory, "nginx.conf")
            with open(config, "w") as out:
                out.write(self._config(root))
            with open(os.path.join(self.directory, "stderr.log"), "ab") as stderr:
                self._process = subprocess.Popen(
                    [self.binary, "-p", self.directory, "-c", config, "-g", "daemon off;"],
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                )
            if self._wait_listening(timeout):
                return self
            self.stop()
        raise RuntimeError(f"nginx did not start; see error.log and stderr.log in {self.directory}")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5)
            self._process = None

    def __enter__(self) -> NginxServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _wait_listening(self, timeout: float) -> bool:
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False  # exited: most likely the port was taken
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                return True
            except OSError:
                time.sleep(0.02)
        return False

    def _config(self, root: str) -> str:
        # Started as root, nginx would run its worker as "nobody", which cannot read a private temp
        # directory; running it as ourselves is what a test wants anyway.
        user = "user root;" if os.geteuid() == 0 else ""
        temp = os.path.join(self.directory, "temp")
        return f"""
            {user}
            worker_processes 1;
            pid {self.directory}/nginx.pid;
            error_log {self.directory}/error.log warn;
            events {{ worker_connections 1024; }}
            http {{
                access_log off;
                client_body_temp_path {temp}/body;
                proxy_temp_path {temp}/proxy;
                fastcgi_temp_path {temp}/fastcgi;
                uwsgi_temp_path {temp}/uwsgi;
                scgi_temp_path {temp}/scgi;
                keepalive_requests 1000000;
                keepalive_timeout 60s;
                default_type text/plain;
                server {{
                    listen {self.host}:{self.port};
                    {f"listen {self.host}:{self.h2c_port} http2;" if self.h2c else ""}
                    root {root};
                    location / {{ }}
                }}
            }}
        """


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def self_signed_tls(directory: str, common_name: str = "localhost") -> tuple[ssl.SSLContext, str]:
    """A server context with a fresh self-signed certificate for 127.0.0.1/localhost, and the path of
    that certificate, which is its own CA file. Uses the `cryptography` package if installed, else the
    openssl command line."""
    cert_path = os.path.join(directory, "shadow-cert.pem")
    key_path = os.path.join(directory, "shadow-key.pem")
    try:
        _write_self_signed_with_cryptography(cert_path, key_path, common_name)
    except ImportError:
        command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-addext"]
        command += ["subjectAltName=DNS:localhost,IP:127.0.0.1", "-subj", f"/CN={common_name}"]
        command += ["-keyout", key_path, "-out", cert_path]
        subprocess.run(command, check=True, capture_output=True, timeout=30)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return context, cert_path


def _write_self_signed_with_cryptography(cert_path: str, key_path: str, common_name: str) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    with open(key_path, "wb") as out:
        out.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    with open(cert_path, "wb") as out:
        out.write(certificate.public_bytes(serialization.Encoding.PEM))

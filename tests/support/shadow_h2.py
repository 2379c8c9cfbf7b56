"""An HTTP/2 recording shadow for tests, on the h2 library (server side), cleartext (h2c, prior
knowledge) or TLS with ALPN h2. Like ShadowServer it runs its own loop in a thread and records
every request; modes shape the answers (assign `shadow.mode` at any time):

    ok            200 with a small body (none for HEAD)
    hang          reads requests, never answers (SETTINGS, PING and WINDOW_UPDATE still answered)
    frozen        stops reading at the first request: not even a PING is answered any more
    delay         answers like "ok" after `delay` seconds
    reset         RST_STREAM (INTERNAL_ERROR) instead of an answer
    refuse        RST_STREAM REFUSED_STREAM for every `refuse_every`-th stream (each path at most once),
                  others answered
    goaway        answers `goaway_after` streams, then sends GOAWAY with the last of them as last id,
                  leaves every later stream unanswered, and closes once those before it were answered;
                  once per server: later connections are answered like "ok"
    garbage       answers bytes that are not HTTP/2 frames
    grpc          a gRPC answer: 200, content-type application/grpc, one empty message, trailers with
                  grpc-status `grpc_status`

`max_streams` is the SETTINGS_MAX_CONCURRENT_STREAMS announced; `peak_streams` the most streams
seen open at once on one connection.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from dataclasses import dataclass

from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, DataReceived, RequestReceived, StreamEnded, StreamReset
from h2.exceptions import H2Error
from h2.settings import SettingCodes

from tests.support.shadow import LoopThreadServer

MODES = frozenset({"ok", "hang", "frozen", "delay", "reset", "refuse", "goaway", "garbage", "grpc"})


@dataclass(slots=True)
class H2Request:
    headers: list[tuple[str, str]]  # pseudo-headers included, in the order received
    body: bytes
    connection_id: int
    stream_id: int

    def header(self, name: str) -> str | None:
        return next((value for key, value in self.headers if key == name), None)

    @property
    def method(self) -> str:
        return self.header(":method") or ""

    @property
    def path(self) -> str:
        return self.header(":path") or ""


class H2ShadowServer(LoopThreadServer):
    def __init__(
        self,
        mode: str = "ok",
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_streams: int = 100,
        delay: float = 0.5,
        body: bytes = b"shadow ok\n",
        goaway_after: int = 5,
        refuse_every: int = 2,
        grpc_status: int = 0,
    ) -> None:
        assert mode in MODES, mode
        self.mode = mode
        super().__init__(ssl_context)
        if ssl_context is not None:
            ssl_context.set_alpn_protocols(["h2"])
        self.max_streams = max_streams
        self.delay = delay
        self.body = body
        self.goaway_after = goaway_after
        self.refuse_every = refuse_every
        self.grpc_status = grpc_status
        self.connections_accepted = 0
        self.peak_streams = 0
        self.streams_seen = 0
        self.goaways_sent = 0
        self.refused_paths: set[str] = set()
        self._requests: list[H2Request] = []
        self._recorded = threading.Condition()

    thread_name = "h2-shadow"

    @property
    def port(self) -> int:
        return self._listening_port

    def _protocol(self) -> asyncio.Protocol:
        return _H2ServerConnection(self)

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[H2Request]:
        with self._recorded:
            return list(self._requests)

    def wait_for(self, count: int, timeout: float = 5.0) -> list[H2Request]:
        with self._recorded:
            if not self._recorded.wait_for(lambda: len(self._requests) >= count, timeout):
                raise TimeoutError(f"h2 shadow got {len(self._requests)} requests, expected {count}")
            return list(self._requests)

    async def wait_for_async(self, count: int, timeout: float = 5.0) -> list[H2Request]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"h2 shadow got {len(self.requests)} requests, expected {count}")
            await asyncio.sleep(0.005)
        return self.requests

    @property
    def open_connections(self) -> int:
        return len(self._connections)


    def _record(self, request: H2Request) -> None:
        with self._recorded:
            self._requests.append(request)
            self._recorded.notify_all()


class _H2ServerConnection(asyncio.Protocol):
    def __init__(self, server: H2ShadowServer) -> None:
        self.server = server
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.connection_id = 0
        self.headers: dict[int, list[tuple[str, str]]] = {}
        self.bodies: dict[int, bytearray] = {}
        self.answered = 0
        self.goaway_sent = False
        self.last_stream_id = 0
        self.waiting_before_goaway: set[int] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections_accepted += 1
        self.connection_id = self.server.connections_accepted
        self.server._connections.add(self)
        self.h2.local_settings.max_concurrent_streams = self.server.max_streams
        self.h2.initiate_connection()
        self.h2.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: self.server.max_streams})
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._connections.discard(self)

    def flush(self) -> None:
        if not self.transport.is_closing():
            self.transport.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except H2Error:
            self.flush()
            self.transport.close()
            return
        for event in events:
            if isinstance(event, RequestReceived):
                self.headers[event.stream_id] = list(event.headers)
                self.bodies[event.stream_id] = bytearray()
                self.server.peak_streams = max(self.server.peak_streams, len(self.headers))
            elif isinstance(event, DataReceived):
                self.bodies.setdefault(event.stream_id, bytearray()).extend(event.data)
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                self.on_request(event.stream_id)
            elif isinstance(event, StreamReset):
                self.headers.pop(event.stream_id, None)
                self.bodies.pop(event.stream_id, None)
            elif isinstance(event, ConnectionTerminated):
                self.transport.close()
        self.flush()

    def on_request(self, stream_id: int) -> None:
        server = self.server
        request = H2Request(
            self.headers.get(stream_id, []),
            bytes(self.bodies.get(stream_id, b"")),
            self.connection_id,
            stream_id,
        )
        server._record(request)
        server.streams_seen += 1
        mode = server.mode
        if mode == "hang":
            return
        if mode == "frozen":
            self.transport.pause_reading()
            return
        if mode == "garbage":
            self.transport.write(b"this is not HTTP/2 at all\r\n\r\n" * 4)
            return
        if mode == "reset":
            self.finish(stream_id)
            self.h2.reset_stream(stream_id, ErrorCodes.INTERNAL_ERROR)
            return
        first_time = request.path not in server.refused_paths
        if mode == "refuse" and first_time and server.streams_seen % server.refuse_every == 0:
            server.refused_paths.add(request.path)
            self.finish(stream_id)
            self.h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        if mode == "goaway" and (self.goaway_sent or not server.goaways_sent):
            if self.goaway_sent and stream_id > self.last_stream_id:
                return  # above the last stream id: never processed
            self.answered += 1
            if self.answered == server.goaway_after:
                # Answer this one later, after the GOAWAY, so a stream at or below last id finishes
                # on a connection that has gone away.
                self.goaway_sent = True
                self.last_stream_id = stream_id
                server.goaways_sent += 1
                self.h2.close_connection(last_stream_id=stream_id)
                # h2 refuses every frame after its own GOAWAY; a real server still serves the streams
                # at or below the last id, so this one does too.
                self.h2.state_machine.state = ConnectionState.SERVER_OPEN
                self.flush()
                asyncio.get_running_loop().call_later(0.05, self.answer_then_close, stream_id, request)
                return
        if mode == "delay":
            asyncio.get_running_loop().call_later(server.delay, self.answer_later, stream_id, request)
            return
        self.answer(stream_id, request)

    def answer_later(self, stream_id: int, request: H2Request) -> None:
        if not self.transport.is_closing():
            self.answer(stream_id, request)
            self.flush()

    def answer_then_close(self, stream_id: int, request: H2Request) -> None:
        self.answer_later(stream_id, request)
        self.transport.close()

    def finish(self, stream_id: int) -> None:
        self.headers.pop(stream_id, None)
        self.bodies.pop(stream_id, None)

    def answer(self, stream_id: int, request: H2Request) -> None:
        self.finish(stream_id)
        server = self.server
        try:
            if server.mode == "grpc":
                self.h2.send_headers(stream_id, [(":status", "200"), ("content-type", "application/grpc")])
                self.h2.send_data(stream_id, b"\x00\x00\x00\x00\x00")
                self.h2.send_headers(stream_id, [("grpc-status", str(server.grpc_status))], end_stream=True)
                return
            body = b"" if request.method == "HEAD" else server.body
            headers = [
                (":status", "200"),
                ("content-type", "text/plain"),
                ("content-length", str(len(server.body))),
            ]
            self.h2.send_headers(stream_id, headers, end_stream=not body)
            if body:
                self.h2.send_data(stream_id, body, end_stream=True)
        except H2Error:
            pass  # the client reset the stream meanwhile

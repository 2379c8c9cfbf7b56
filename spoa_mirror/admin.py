"""The admin listener: /metrics, /livez, /healthz, /readyz, and the comparison's pages when configured
(compare/publish.py: /compare, /compare.html, /verdict).

A small asyncio HTTP/1.1 server on an event loop of its own, in one daemon thread, so a slow scraper
never touches the SPOP loop and a stuck SPOP loop does not silence /livez (which reports it). It
replaces the standard library's threading WSGI server, which ran a thread per connection with no
read timeout and a listen backlog of 5: 200 idle connections made 206 threads, and connects waited
a second for the backlog. Here an idle or dribbling client costs one coroutine, is cut after
`READ_TIMEOUT`, and connections past `MAX_CONNECTIONS` are closed at once.

Loopback by default: it is an operator's port, not HAProxy's.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Mapping

from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry
from pydantic import Field

from .config_types import Address, Bool, Port, Section

BACKLOG = 1024  # the kernel caps it at net.core.somaxconn (4096 on current kernels)
READ_TIMEOUT = 5.0  # seconds for a request head to arrive, and for an idle keep-alive connection
MAX_HEAD = 8192  # bytes of request line and headers
MAX_CONNECTIONS = 512  # open admin connections; more are closed at accept
START_TIMEOUT = 10.0
_TEXT = "text/plain; charset=utf-8"
# A page served besides the built-in ones: query string -> (status line, content type, body).
Route = Callable[[str], tuple[str, str, bytes]]


class AdminServer:
    def __init__(
        self,
        registry: CollectorRegistry,
        ready: Callable[[], bool],
        alive: Callable[[], bool] = lambda: True,
        routes: Mapping[str, Route] | None = None,
    ) -> None:
        """`ready`: accepting SPOP connections (/readyz); `alive`: the SPOP loop is ticking
        (/livez and /healthz); `routes`: more pages by path."""
        self._registry = registry
        self._routes = dict(routes or {})
        self._ready = ready
        self._alive = alive
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[asyncio.Task[None]] = set()

    def start(self, sock: socket.socket) -> tuple[str, int]:
        """Serve on a listening socket bound beforehand (listeners.bind_listener), so a port in use
        is reported before anything starts."""
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="admin", daemon=True)
        self._thread.start()
        try:
            self._server = asyncio.run_coroutine_threadsafe(
                asyncio.start_server(self._serve, sock=sock, backlog=BACKLOG, limit=MAX_HEAD),
                loop,
            ).result(START_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        host, bound_port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(bound_port)

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        if loop.is_running():
            asyncio.run_coroutine_threadsafe(self._close(), loop).result(START_TIMEOUT)
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(START_TIMEOUT)
        if not loop.is_running():
            loop.close()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= MAX_CONNECTIONS:
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while await self._one_request(reader, writer):
                pass
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            self._connections.discard(task)
            writer.transport.abort()

    async def _one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; True to keep the connection for another."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        except asyncio.LimitOverrunError:
            await _respond(writer, "431 Request Header Fields Too Large", "request head too large\n")
            return False
        except asyncio.IncompleteReadError as error:
            if error.partial:  # the client finished sending something that is not an HTTP request
                await _respond(writer, "400 Bad Request", "bad request\n")
            return False
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await _respond(writer, "400 Bad Request", "bad request line\n")
            return False
        method, target, version = parts
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        if "content-length" in headers or "transfer-encoding" in headers:
            await _respond(writer, "400 Bad Request", "no request body expected\n")
            return False
        keep_alive = headers.get("connection", "").lower() != "close" and version == "HTTP/1.1"
        if method not in ("GET", "HEAD"):
            status, content_type, body = "405 Method Not Allowed", _TEXT, b"GET only\n"
        else:
            path, _, query = target.partition("?")
            route = self._routes.get(path)
            if route is not None:  # off this loop: a route may wait for the SPOP loop
                loop = asyncio.get_running_loop()
                status, content_type, body = await loop.run_in_executor(None, route, query)
            else:
                status, content_type, body = self._route(path, headers.get("accept", ""))
        await _respond(writer, status, body, content_type, keep_alive, head_only=method == "HEAD")
        return keep_alive

    def _route(self, path: str, accept: str) -> tuple[str, str, bytes]:
        if path == "/metrics":
            encoder, content_type = choose_encoder(accept)
            return "200 OK", content_type, encoder(self._registry)
        if path in ("/livez", "/healthz"):
            if self._alive():
                return "200 OK", _TEXT, b"ok\n"
            return "503 Service Unavailable", _TEXT, b"event loop stalled\n"
        if path == "/readyz":
            if self._ready():
                return "200 OK", _TEXT, b"ready\n"
            return "503 Service Unavailable", _TEXT, b"not ready\n"
        return "404 Not Found", _TEXT, b"not found\n"


async def _respond(
    writer: asyncio.StreamWriter,
    status: str,
    body: str | bytes,
    content_type: str = _TEXT,
    keep_alive: bool = False,
    head_only: bool = False,
) -> None:
    data = body.encode() if isinstance(body, str) else body
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(data)}\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    )
    writer.write(head.encode() + (b"" if head_only else data))
    await asyncio.wait_for(writer.drain(), READ_TIMEOUT)


class AdminConfig(Section):
    """Prometheus /metrics, /livez (= /healthz) and /readyz over HTTP; with workers, the supervisor
    serves them for all."""

    enabled: Bool = Field(True, description="serve /metrics, /livez (= /healthz) and /readyz over HTTP")
    address: Address = Field("127.0.0.1", description="admin listener address")
    port: Port = Field(9180, description="admin listener port")

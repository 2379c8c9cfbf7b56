"""The admin listener: /metrics, /healthz, /readyz.

Served by the standard library's WSGI server with prometheus_client's WSGI app (the same stack as
`prometheus_client.start_http_server`), in a daemon thread, so a slow scraper never touches the
SPOP event loop. Loopback by default: it is an operator's port, not HAProxy's.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import make_wsgi_app
from prometheus_client.registry import CollectorRegistry


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    """Scrapes every few seconds must not write a stderr line each."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class AdminServer:
    def __init__(self, registry: CollectorRegistry, ready: Callable[[], bool]) -> None:
        self._metrics = make_wsgi_app(registry)
        self._ready = ready
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return self._metrics(environ, start_response)
        if path == "/healthz":
            return _text(start_response, "200 OK", "ok\n")
        if path == "/readyz":
            if self._ready():
                return _text(start_response, "200 OK", "ready\n")
            return _text(start_response, "503 Service Unavailable", "not ready\n")
        return _text(start_response, "404 Not Found", "not found\n")

    def start(self, sock: socket.socket) -> tuple[str, int]:
        """Serve on a listening socket bound beforehand (listeners.bind_listener), so a port in use
        is reported before anything starts."""
        server = _ThreadingWSGIServer(sock.getsockname()[:2], _QuietHandler, bind_and_activate=False)
        server.socket.close()
        server.socket = sock
        sock.setblocking(True)
        server.server_address = sock.getsockname()
        server.server_name, server.server_port = str(server.server_address[0]), int(server.server_address[1])
        server.setup_environ()
        server.set_app(self)
        self._server = server
        self._thread = threading.Thread(target=self._server.serve_forever, name="admin", daemon=True)
        self._thread.start()
        host, bound_port = self._server.server_address[:2]
        return str(host), int(bound_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _text(start_response: Callable[..., Any], status: str, body: str) -> list[bytes]:
    data = body.encode()
    start_response(
        status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))]
    )
    return [data]

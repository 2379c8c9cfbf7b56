"""The HTTP/1.1 pool of a compared target: the shadow's whole response, not only its status.

`transport.Pool` parses responses without handing headers or body to Python (no `on_header` or
`on_body` callback: httptools looks the callbacks up once, when the parser is made, so a protocol
without them costs nothing per header or body chunk). A compared target is built with this pool
instead, chosen once when the target is built: its connections add the two callbacks, keep the body
up to `body_limit` bytes and the SHA-256 of the whole when it is longer, and the request settles
with `(Response, payload)` rather than the status code, so the target can hand the response to the
pairing table under the request it answers. Failures settle as `(exception, payload)`.
Every other target keeps `transport.Pool` and today's cost.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ..transport import Pool, _Connection, _Exchange
from .model import Response


class CapturingPool(Pool):
    def __init__(self, host: str, port: int, *, body_limit: int, **options: Any) -> None:
        super().__init__(host, port, **options)
        self.body_limit = body_limit

    def _new_connection(self) -> _Connection:
        return _CapturingConnection(self)

    def _settle(self, exchange: _Exchange, result: Any) -> None:
        if exchange.done is None:
            return
        connection = exchange.connection
        if type(result) is int and isinstance(connection, _CapturingConnection):
            result = connection.response(result, self._loop.time() - exchange.submitted)  # type: ignore[union-attr]
        super()._settle(exchange, (result, exchange.request))


class _CapturingConnection(_Connection):
    __slots__ = ("body_limit", "body_parts", "body_size", "digest", "headers")

    def __init__(self, pool: CapturingPool) -> None:
        self.body_limit = pool.body_limit
        self.headers: list[tuple[str, str]] = []
        self.body_parts: list[bytes] = []
        self.body_size = 0
        self.digest: Any = None  # hashlib.sha256 of the whole body, once it is over body_limit
        super().__init__(pool)

    def on_message_begin(self) -> None:
        # Each response, interim ones included, starts afresh: only the final one is kept.
        self.headers = []
        self.body_parts = []
        self.body_size = 0
        self.digest = None
        super().on_message_begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_body(self, body: bytes) -> None:
        kept = self.body_size
        self.body_size = kept + len(body)
        if self.digest is not None:
            self.digest.update(body)
            return
        limit = self.body_limit
        if self.body_size <= limit:
            self.body_parts.append(body)
            return
        self.digest = hashlib.sha256()
        for part in self.body_parts:
            self.digest.update(part)
        self.digest.update(body)
        self.body_parts.append(body[: limit - kept])

    def response(self, status: int, latency: float) -> Response:
        digest = None if self.digest is None else self.digest.digest()
        body = b"".join(self.body_parts)
        self.body_parts = []
        return Response(status, tuple(self.headers), body, self.body_size, digest, latency)

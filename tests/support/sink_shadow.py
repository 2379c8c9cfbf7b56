"""A shadow that keeps nothing, for memory tests: it parses each request with llhttp, counts it and
drops its bytes, so that 1 MiB bodies by the hundred cost the test process nothing (the recording
`ShadowServer` keeps every byte). It answers 200 after `delay` seconds, never (`delay=None`, a hung
shadow that still reads), or misbehaves before any final response:

    headers_forever   `HTTP/1.1 200 OK` and then header lines, without end
    continue_forever  `HTTP/1.1 100 Continue` responses, without end

Both send at most `max_bytes` per connection (so a test against an agent without caps stays
bounded) and stop when the agent closes the connection.

    with SinkShadow(delay=4.0) as shadow:
        ...point a target at shadow.url...
        shadow.requests, shadow.connections_accepted, shadow.peak_connections
"""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType

import httptools

MISBEHAVIOURS = ("headers_forever", "continue_forever")
_HEADER_BLOCK = b"".join(b"X-Filler-%05d: %s\r\n" % (n, b"f" * 100) for n in range(2048))
_CONTINUE_BLOCK = b"HTTP/1.1 100 Continue\r\n\r\n" * 8192


class SinkShadow:
    def __init__(
        self, delay: float | None = 0.0, *, misbehave: str | None = None, max_bytes: int = 32 << 20
    ) -> None:
        if misbehave is not None and misbehave not in MISBEHAVIOURS:
            raise ValueError(f"unknown misbehaviour {misbehave!r}; one of {MISBEHAVIOURS}")
        self.delay = delay
        self.misbehave = misbehave
        self.max_bytes = max_bytes
        self.requests = 0
        self.connections_accepted = 0
        self.open_connections = 0
        self.peak_connections = 0
        self.bytes_sent = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sink-shadow", daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> SinkShadow:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop
        ).result(5)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop listening and close every connection (what the agent has in flight then fails);
        a second call does nothing."""
        if not self._thread.is_alive():
            return

        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_accepted += 1
        self.open_connections += 1
        self.peak_connections = max(self.peak_connections, self.open_connections)
        complete: list[bool] = []

        class Callbacks:
            def on_message_complete(self) -> None:
                complete.append(True)

        parser = httptools.HttpRequestParser(Callbacks())
        try:
            while data := await reader.read(1 << 18):
                parser.feed_data(data)
                while complete:
                    complete.pop()
                    self.requests += 1
                    await self._answer(writer)
        except (ConnectionError, httptools.HttpParserError):
            pass
        finally:
            self.open_connections -= 1
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter) -> None:
        if self.misbehave is not None:
            block = _HEADER_BLOCK if self.misbehave == "headers_forever" else _CONTINUE_BLOCK
            if self.misbehave == "headers_forever":
                writer.write(b"HTTP/1.1 200 OK\r\n")
            sent = 0
            while sent < self.max_bytes and not writer.is_closing():
                writer.write(block)
                sent += len(block)
                self.bytes_sent += len(block)
                await writer.drain()
            await asyncio.sleep(3600)  # then silence, until the agent gives up on the connection
        if self.delay is None:
            await asyncio.sleep(3600)
        if self.delay:
            await asyncio.sleep(self.delay)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

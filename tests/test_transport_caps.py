"""The transport's caps on what a shadow sends before its final response, and its count of the
bytes it holds, against a real socket server that answers with canned bytes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from spoa_mirror.transport import (
    MAX_INTERIM_RESPONSES,
    MAX_RESPONSE_HEAD,
    Pool,
    ProtocolError,
)
from spoa_mirror.transport_pipeline import PipelinedPool

REQUEST = b"GET / HTTP/1.1\r\nHost: shadow\r\n\r\n"
FINAL = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@asynccontextmanager
async def canned_server(answer: Callable[[], list[bytes]]) -> AsyncIterator[int]:
    """Answers every request (read up to its blank line) with the parts of `answer()`, one write
    each, 50 ms apart (so that each arrives in a read of its own); its port."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                for n, part in enumerate(answer()):
                    if n:
                        await asyncio.sleep(0.05)
                    writer.write(part)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def send_once(answer: list[bytes], pipelined: bool = False) -> int:
    async with canned_server(lambda: answer) as port:
        options = {"max_connections": 1, "connect_timeout": 2, "timeout": 5}
        pool = (
            PipelinedPool("127.0.0.1", port, depth=4, **options)
            if pipelined
            else Pool("127.0.0.1", port, **options)
        )
        try:
            return await pool.send(REQUEST)
        finally:
            await pool.close()


def final_with_head_of(size: int) -> list[bytes]:
    """A final 200 response whose head is about `size` bytes, sent as its header lines, then the
    rest of the head."""
    line = b"X-Filler: " + b"f" * 90 + b"\r\n"
    return [b"HTTP/1.1 200 OK\r\n" + line * (size // len(line)), b"Content-Length: 0\r\n\r\n"]


@pytest.mark.parametrize(
    ("answer", "ok"),
    [
        ([CONTINUE * MAX_INTERIM_RESPONSES + FINAL], True),
        ([CONTINUE * (MAX_INTERIM_RESPONSES + 1) + FINAL], False),
        (final_with_head_of(MAX_RESPONSE_HEAD - 1024), True),
        (final_with_head_of(MAX_RESPONSE_HEAD + 1024), False),
    ],
    ids=["16-interim", "17-interim", "head-under-64k", "head-over-64k"],
)
@pytest.mark.parametrize("pipelined", [False, True], ids=["pool", "pipelined"])
def test_caps_before_the_final_response(answer: bytes, ok: bool, pipelined: bool) -> None:
    """At most 16 interim responses (counted even when the final response follows in the same read)
    and 64 KiB of head before the final response; one more is a protocol error. The same with
    pipelining (transport_pipeline), whose connection checks them on its own."""
    if ok:
        assert asyncio.run(send_once(answer, pipelined)) == 200
    else:
        with pytest.raises(ProtocolError):
            asyncio.run(send_once(answer, pipelined))


def test_held_bytes_count_what_is_submitted_until_it_settles() -> None:
    """`bytes_held` goes up by the request's size on submit and back to zero once it settles."""

    async def main() -> list[int]:
        seen = []
        async with canned_server(lambda: [FINAL]) as port:
            pool = Pool("127.0.0.1", port, max_connections=1, connect_timeout=2, timeout=5)
            done = asyncio.get_running_loop().create_future()
            pool.submit(REQUEST, lambda result, _: done.set_result(result))
            pool.submit(REQUEST, lambda result, _: None)  # waits for the one connection
            seen.append(pool.bytes_held)
            assert await done == 200
            await asyncio.sleep(0.1)
            seen.append(pool.bytes_held)
            await pool.close()
        return seen

    assert asyncio.run(main()) == [2 * len(REQUEST), 0]

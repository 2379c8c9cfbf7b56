"""The replay transport against real sockets: the recording shadow server in each of its modes, a TLS
shadow, and a real nginx. Keep-alive reuse is proven by counting connections on the server side."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from spoa_mirror.transport import (
    ConnectError,
    Pool,
    PoolClosed,
    ProtocolError,
    RequestTimeout,
    ResetError,
    TLSError,
    TransportError,
    authority,
    parse_target_url,
)
from spoa_mirror.wire import build_request
from tests.support.shadow import NginxServer, ShadowServer, self_signed_tls

T = TypeVar("T")

GET = build_request("GET", "/probe?x=1", [("Accept", "*/*"), ("X-Test", "transport")], b"", "shadow.test")
HEAD = build_request("HEAD", "/probe", [], b"", "shadow.test")
POST = build_request("POST", "/submit", [("Content-Type", "application/json")], b'{"a": 1}', "shadow.test")


def run(test: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(test(), 30))


def make_pool(shadow: ShadowServer, **overrides: object) -> Pool:
    options: dict[str, object] = {"max_connections": 4, "connect_timeout": 1.0, "timeout": 1.0}
    options.update(overrides)
    return Pool(shadow.host, shadow.port, **options)  # type: ignore[arg-type]


async def send_all(pool: Pool, request: bytes, count: int, **kwargs: bool) -> list[int]:
    try:
        return [await pool.send(request, **kwargs) for _ in range(count)]
    finally:
        await pool.close()


async def failure_of(pool: Pool, request: bytes = GET) -> TransportError:
    try:
        with pytest.raises(TransportError) as caught:
            await pool.send(request)
        return caught.value
    finally:
        await pool.close()


@pytest.fixture
def shadow() -> Iterator[ShadowServer]:
    with ShadowServer() as server:
        yield server


# -- well-behaved answers ------------------------------------------------------------------------


def test_status_returned_and_request_sent_byte_for_byte(shadow: ShadowServer) -> None:
    assert run(lambda: send_all(make_pool(shadow), GET, 1)) == [200]
    [request] = shadow.wait_for(1)
    assert request.raw == GET


def test_keep_alive_reuses_one_connection(shadow: ShadowServer) -> None:
    pool = make_pool(shadow)
    assert run(lambda: send_all(pool, GET, 20)) == [200] * 20
    assert shadow.connections_accepted == 1 and pool.connections_opened == 1
    assert {request.connection_id for request in shadow.wait_for(20)} == {1}


def test_request_with_body(shadow: ShadowServer) -> None:
    assert run(lambda: send_all(make_pool(shadow), POST, 2)) == [200, 200]
    requests = shadow.wait_for(2)
    assert [r.body for r in requests] == [b'{"a": 1}'] * 2 and shadow.connections_accepted == 1


@pytest.mark.parametrize("status", [201, 301, 404, 500, 503])
def test_any_final_status_is_returned(shadow: ShadowServer, status: int) -> None:
    shadow.status = status
    assert run(lambda: send_all(make_pool(shadow), GET, 2)) == [status, status]
    assert shadow.connections_accepted == 1


@pytest.mark.parametrize("status", [204, 304])
def test_bodiless_statuses_complete_and_keep_the_connection(shadow: ShadowServer, status: int) -> None:
    shadow.status = status
    assert run(lambda: send_all(make_pool(shadow), GET, 3)) == [status] * 3
    assert shadow.connections_accepted == 1


def test_head_with_content_length_does_not_wait_for_a_body(shadow: ShadowServer) -> None:
    """The shadow answers HEAD with `Content-Length: 10` and no body; then a GET on the same
    connection must still parse (the parser was not left waiting for those 10 bytes)."""

    async def exchange() -> tuple[int, int, int]:
        pool = make_pool(shadow, timeout=2.0)
        try:
            return await pool.send(HEAD, head=True), await pool.send(GET), await pool.send(HEAD, head=True)
        finally:
            await pool.close()

    assert run(exchange) == (200, 200, 200)  # a parser left waiting would time the GET out
    assert shadow.connections_accepted == 1


def test_chunked_body_completes_and_keeps_the_connection(shadow: ShadowServer) -> None:
    shadow.mode = "chunked"
    shadow.body = b"x" * 10_000
    assert run(lambda: send_all(make_pool(shadow), GET, 3)) == [200] * 3
    assert shadow.connections_accepted == 1


def test_large_body_is_read_to_the_end(shadow: ShadowServer) -> None:
    shadow.body = b"y" * 2_000_000
    assert run(lambda: send_all(make_pool(shadow, timeout=5.0), GET, 3)) == [200] * 3
    assert shadow.connections_accepted == 1


def test_close_delimited_body_completes_at_eof(shadow: ShadowServer) -> None:
    shadow.mode = "close_delimited"
    shadow.body = b"z" * 50_000
    assert run(lambda: send_all(make_pool(shadow), GET, 3)) == [200] * 3
    assert shadow.connections_accepted == 3  # the body's end is the connection's end


def test_head_on_a_close_delimited_response(shadow: ShadowServer) -> None:
    shadow.mode = "close_delimited"
    assert run(lambda: send_all(make_pool(shadow), HEAD, 2, head=True)) == [200, 200]


def test_interim_responses_are_skipped(shadow: ShadowServer) -> None:
    shadow.mode = "interim_100"
    assert run(lambda: send_all(make_pool(shadow), POST, 3)) == [200] * 3
    assert shadow.connections_accepted == 1


def test_connection_close_response_is_not_reused(shadow: ShadowServer) -> None:
    shadow.mode = "close_after"
    pool = make_pool(shadow)
    assert run(lambda: send_all(pool, GET, 3)) == [200] * 3
    assert shadow.connections_accepted == 3 and pool.connections_opened == 3
    assert len({request.connection_id for request in shadow.wait_for(3)}) == 3


def test_delayed_answer_within_the_timeout(shadow: ShadowServer) -> None:
    shadow.mode, shadow.delay = "delay", 0.2
    assert run(lambda: send_all(make_pool(shadow, timeout=2.0), GET, 2)) == [200, 200]


# -- failures, each with its reason ----------------------------------------------------------------


def test_refused_connection_is_reason_connect(shadow: ShadowServer) -> None:
    shadow.mode = "refuse"
    error = run(lambda: failure_of(make_pool(shadow)))
    assert isinstance(error, ConnectError) and error.reason == "connect"
    assert shadow.requests == []


def test_silent_server_is_reason_timeout(shadow: ShadowServer) -> None:
    shadow.mode = "hang"
    started = time.monotonic()
    error = run(lambda: failure_of(make_pool(shadow, timeout=0.3)))
    elapsed = time.monotonic() - started
    assert isinstance(error, RequestTimeout) and error.reason == "timeout"
    assert elapsed >= 0.3  # not before the timeout; a slow machine can only make it later
    shadow.wait_for(1)  # it did get the request


def test_answer_later_than_the_timeout_is_reason_timeout(shadow: ShadowServer) -> None:
    shadow.mode, shadow.delay = "delay", 1.0
    error = run(lambda: failure_of(make_pool(shadow, timeout=0.2)))
    assert error.reason == "timeout"


def test_reset_mid_response_is_reason_reset(shadow: ShadowServer) -> None:
    shadow.mode = "reset"
    shadow.body = b"r" * 1000
    error = run(lambda: failure_of(make_pool(shadow)))
    assert isinstance(error, ResetError) and error.reason == "reset"


def test_garbage_answer_is_reason_protocol(shadow: ShadowServer) -> None:
    shadow.mode = "garbage"
    error = run(lambda: failure_of(make_pool(shadow)))
    assert isinstance(error, ProtocolError) and error.reason == "protocol"


def test_close_without_answer_on_a_fresh_connection_is_reset_not_retried(shadow: ShadowServer) -> None:
    shadow.mode = "drop"
    error = run(lambda: failure_of(make_pool(shadow)))
    assert error.reason == "reset"
    time.sleep(0.1)
    assert len(shadow.requests) == 1 and shadow.connections_accepted == 1


def test_truncated_body_with_connection_close_is_reset(shadow: ShadowServer) -> None:
    """A declared length the server does not deliver before closing is a truncation, even when the
    server said it would close: only a body without a declared length ends at EOF."""

    async def exchange() -> TransportError:
        async def truncate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\ncontent-length: 100\r\n\r\nonly this")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(truncate, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            return await failure_of(Pool("127.0.0.1", port, max_connections=1, connect_timeout=1, timeout=1))

    assert run(exchange).reason == "reset"


# -- pooling ---------------------------------------------------------------------------------------


def test_stale_idle_connection_is_retried_once_on_a_fresh_one(shadow: ShadowServer) -> None:
    """The server closes a kept-alive connection as the next request arrives on it (its idle timeout
    racing our request): the request must not be lost, so it goes again on a new connection."""

    async def exchange() -> list[int]:
        pool = make_pool(shadow)
        try:
            first = await pool.send(GET)
            shadow.mode = "stale"
            return [first, await pool.send(GET)]
        finally:
            await pool.close()

    assert run(exchange) == [200, 200]
    requests = shadow.wait_for(3)
    assert [r.connection_id for r in requests] == [1, 1, 2]  # sent, lost on the stale one, resent
    assert all(r.raw == GET for r in requests)


def test_stale_retry_happens_only_once(shadow: ShadowServer) -> None:
    async def exchange() -> TransportError:
        pool = make_pool(shadow)
        await pool.send(GET)
        shadow.mode = "drop"  # the retry's fresh connection is closed unanswered too
        return await failure_of(pool)

    assert run(exchange).reason == "reset"
    time.sleep(0.1)
    assert [r.connection_id for r in shadow.requests] == [1, 1, 2]


def test_connection_closed_by_server_while_idle_is_not_used(shadow: ShadowServer) -> None:
    async def exchange() -> list[int]:
        pool = make_pool(shadow)
        try:
            first = await pool.send(GET)
            await asyncio.to_thread(shadow.close_idle_connections)
            await asyncio.sleep(0.05)  # the FIN arrives
            return [first, await pool.send(GET)]
        finally:
            await pool.close()

    assert run(exchange) == [200, 200]
    assert [r.connection_id for r in shadow.wait_for(2)] == [1, 2]


def test_idle_connections_are_closed_after_the_idle_timeout(shadow: ShadowServer) -> None:
    async def exchange() -> tuple[int, int]:
        pool = make_pool(shadow, idle_timeout=0.2)
        try:
            await pool.send(GET)
            await asyncio.sleep(0.05)
            still_open = shadow.open_connections
            await asyncio.sleep(0.4)
            await pool.send(GET)
            return still_open, pool.connections_opened
        finally:
            await pool.close()

    still_open, opened = run(exchange)
    assert still_open == 1 and opened == 2
    assert [r.connection_id for r in shadow.wait_for(2)] == [1, 2]


def test_max_connections_respected_under_concurrency(shadow: ShadowServer) -> None:
    shadow.mode, shadow.delay = "delay", 0.05

    async def exchange() -> list[int]:
        pool = make_pool(shadow, max_connections=4, timeout=5.0)
        try:
            return await asyncio.gather(*(pool.send(GET) for _ in range(40)))
        finally:
            await pool.close()

    assert run(exchange) == [200] * 40
    assert shadow.peak_connections == 4 and shadow.connections_accepted == 4


def test_cancelled_send_frees_its_slot_and_drops_its_connection(shadow: ShadowServer) -> None:
    async def exchange() -> int:
        pool = make_pool(shadow, max_connections=1)
        try:
            shadow.mode = "hang"
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await pool.send(GET)
            shadow.mode = "ok"
            return await pool.send(GET)
        finally:
            await pool.close()

    assert run(exchange) == 200
    assert [r.connection_id for r in shadow.wait_for(2)] == [1, 2]


def test_close_fails_requests_in_flight_and_refuses_new_ones(shadow: ShadowServer) -> None:
    shadow.mode = "hang"

    async def exchange() -> tuple[BaseException | int, BaseException | int]:
        pool = make_pool(shadow, timeout=5.0)
        in_flight = asyncio.ensure_future(pool.send(GET))
        await shadow.wait_for_async(1)
        await pool.close()
        after = await asyncio.gather(pool.send(GET), return_exceptions=True)
        return (await asyncio.gather(in_flight, return_exceptions=True))[0], after[0]

    in_flight, after = run(exchange)
    assert isinstance(in_flight, PoolClosed) and isinstance(after, PoolClosed)
    assert in_flight.reason == "closed"


# -- TLS -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, str]:
    return self_signed_tls(str(tmp_path_factory.mktemp("tls")))


def test_tls_verification_is_on_by_default(tls_material: tuple[ssl.SSLContext, str]) -> None:
    server_context, _ = tls_material
    with ShadowServer(ssl_context=server_context) as shadow:
        pool = make_pool(shadow, ssl_context=ssl.create_default_context())
        error = run(lambda: failure_of(pool))
    assert isinstance(error, TLSError) and error.reason == "tls"


def test_tls_with_the_ca_file(tls_material: tuple[ssl.SSLContext, str]) -> None:
    server_context, ca_file = tls_material
    with ShadowServer(ssl_context=server_context) as shadow:
        context = ssl.create_default_context(cafile=ca_file)
        assert run(lambda: send_all(make_pool(shadow, ssl_context=context), GET, 5)) == [200] * 5
        assert run(lambda: send_all(make_pool(shadow, ssl_context=context), HEAD, 2, head=True)) == [200] * 2
        pool = make_pool(shadow, ssl_context=context, server_hostname="localhost")
        assert run(lambda: send_all(pool, GET, 1)) == [200]
        assert shadow.connections_accepted == 3
        assert shadow.wait_for(8)[0].raw == GET


def test_tls_hostname_mismatch_is_reason_tls(tls_material: tuple[ssl.SSLContext, str]) -> None:
    server_context, ca_file = tls_material
    with ShadowServer(ssl_context=server_context) as shadow:
        context = ssl.create_default_context(cafile=ca_file)
        pool = make_pool(shadow, ssl_context=context, server_hostname="not-this-host.example")
        assert run(lambda: failure_of(pool)).reason == "tls"


# -- a real server ---------------------------------------------------------------------------------


def test_against_real_nginx(tmp_path: Path) -> None:
    """200 keep-alive requests over 4 connections to a production-grade server."""

    async def exchange(port: int) -> tuple[list[int], int, int, int]:
        pool = Pool("127.0.0.1", port, max_connections=4, connect_timeout=1.0, timeout=5.0)
        host = authority("http", "127.0.0.1", port)
        get = build_request("GET", "/index.txt", [("Accept", "*/*")], b"", host)
        try:
            statuses = await asyncio.gather(*(pool.send(get) for _ in range(200)))
            head = await pool.send(build_request("HEAD", "/index.txt", [], b"", host), head=True)
            missing = await pool.send(build_request("GET", "/missing", [], b"", host))
            return statuses, head, missing, pool.connections_opened
        finally:
            await pool.close()

    with NginxServer(str(tmp_path)) as nginx:
        statuses, head, missing, opened = run(lambda: exchange(nginx.port))
    assert statuses == [200] * 200
    assert (head, missing) == (200, 404)
    assert opened == 4


# -- target URLs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://shadow", ("http", "shadow", 80, "")),
        ("https://shadow", ("https", "shadow", 443, "")),
        ("http://shadow:8080/", ("http", "shadow", 8080, "")),
        ("HTTPS://Shadow.Example:8443/prefix/", ("https", "shadow.example", 8443, "/prefix")),
        ("http://10.0.0.7:81/a/b", ("http", "10.0.0.7", 81, "/a/b")),
        ("http://[::1]:8080/x", ("http", "::1", 8080, "/x")),
        ("https://[2001:db8::1]", ("https", "2001:db8::1", 443, "")),
    ],
)
def test_parse_target_url(url: str, expected: tuple[str, str, int, str]) -> None:
    assert parse_target_url(url) == expected


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("ftp://shadow", "scheme"),
        ("shadow:8080", "scheme"),
        ("http://", "no host"),
        ("http://shadow:99999", "out of range"),
        ("http://shadow:port", "invalid shadow URL"),
        ("http://user:pw@shadow", "credentials"),
        ("http://shadow/?q=1", "query"),
        ("http://shadow/#frag", "fragment"),
        ("http://[::1/", "invalid shadow URL"),
    ],
)
def test_parse_target_url_refuses(url: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        parse_target_url(url)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("http", "shadow", 80), "shadow"),
        (("https", "shadow", 443), "shadow"),
        (("http", "shadow", 443), "shadow:443"),
        (("http", "::1", 8080), "[::1]:8080"),
    ],
)
def test_authority(args: tuple[str, str, int], expected: str) -> None:
    assert authority(*args) == expected

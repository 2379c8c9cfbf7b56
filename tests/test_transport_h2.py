"""The HTTP/2 replay transport against a real HTTP/2 server (h2 library, server side) in each of its
modes, over h2c and TLS with ALPN: multiplexing, the server's stream limit, flow control, GOAWAY,
RST_STREAM, timeouts, and the HTTP/2 header rules of wire_h2."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import pytest

from spoa_mirror.transport import PoolClosed, ProtocolError, RequestTimeout, TransportError
from spoa_mirror.transport_h2 import H2Pool, StreamResetError
from spoa_mirror.wire import WireError
from spoa_mirror.wire_h2 import H2Request, build_h2_request
from tests.support.pools import held_batch
from tests.support.shadow import self_signed_tls
from tests.support.shadow_h2 import H2ShadowServer

T = TypeVar("T")


def request(method: str = "GET", path: str = "/probe?x=1", headers=(), body: bytes = b"") -> H2Request:
    return build_h2_request(
        method, path, [("Accept", "*/*"), *headers], body, "shadow.test", scheme="http", timeout_cap=5.0
    )


def run(test: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(test(), 30))


def make_pool(shadow: H2ShadowServer, **overrides: object) -> H2Pool:
    options: dict[str, object] = {"max_connections": 4, "connect_timeout": 1.0, "timeout": 1.0}
    options.update(overrides)
    return H2Pool("127.0.0.1", shadow.port, **options)  # type: ignore[arg-type]


async def gather(pool: H2Pool, requests: list[H2Request]) -> list[int | Exception]:
    """Submit every request at once (multiplexed), return the results in order."""
    try:
        return await asyncio.gather(*(pool.send(r) for r in requests), return_exceptions=True)  # type: ignore[return-value]
    finally:
        await pool.close()


@pytest.fixture
def shadow() -> Iterator[H2ShadowServer]:
    with H2ShadowServer() as server:
        yield server


# -- the header list -----------------------------------------------------------------------------


def test_header_list_follows_http2_rules() -> None:
    built = build_h2_request(
        "POST",
        "/a?b",
        [
            ("Host", "client.test"),
            ("Connection", "keep-alive, X-Hop"),
            ("Keep-Alive", "5"),
            ("Transfer-Encoding", "chunked"),
            ("Upgrade", "h2c"),
            ("TE", "trailers"),
            ("X-Hop", "1"),
            ("Content-Length", "999"),
            ("X-Trace", "t"),
            (":path", "/evil"),
        ],
        b"body",
        "shadow.test:8080",
        scheme="http",
        timeout_cap=5.0,
    )
    assert built.headers == [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"shadow.test:8080"),
        (b":path", b"/a?b"),
        (b"content-length", b"4"),
        (b"te", b"trailers"),
        (b"x-trace", b"t"),
    ]
    assert (built.body, built.grpc, built.timeout) == (b"body", False, None)


def test_values_lose_surrounding_whitespace() -> None:
    assert (b"x-a", b"1 2") in request(headers=[("X-A", " \t1 2\t ")]).headers


def test_te_other_than_trailers_is_dropped() -> None:
    assert (b"te", b"gzip") not in request(headers=[("TE", "gzip")]).headers
    assert all(name != b"te" for name, _ in request(headers=[("TE", "gzip")]).headers)


@pytest.mark.parametrize(
    ("method", "path", "headers", "reason"),
    [
        ("GE T", "/", [], "bad_method"),
        ("CONNECT", "/", [], "bad_method"),
        ("GET", "a", [], "bad_target"),
        ("GET", "/a b", [], "bad_target"),
        ("GET", "/", [("X A", "1")], "bad_header"),
        ("GET", "/", [("X-A", "1\r\nX-B: 2")], "bad_header"),
        ("GET", "/", [("X-A", "1\x00")], "bad_header"),
        ("GET", "/", [("grpc-timeout", "1 hour")], "bad_header"),
    ],
)
def test_unsafe_requests_are_refused(method: str, path: str, headers: list, reason: str) -> None:
    with pytest.raises(WireError) as caught:
        build_h2_request(method, path, headers, b"", "h", scheme="http", timeout_cap=5.0)
    assert caught.value.reason == reason


def test_grpc_is_recognised_and_its_timeout_capped() -> None:
    grpc = [("Content-Type", "application/grpc+proto"), ("grpc-timeout", "30S")]
    built = build_h2_request(
        "POST", "/pkg.Svc/Call", grpc, b"\0\0\0\0\0", "h", scheme="http", timeout_cap=2.0
    )
    assert built.grpc and built.timeout == 2.0
    assert (b"grpc-timeout", b"2000m") in built.headers
    short = build_h2_request(
        "POST", "/pkg.Svc/Call", [grpc[0], ("grpc-timeout", "100m")], b"", "h", scheme="http", timeout_cap=2.0
    )
    assert short.timeout == pytest.approx(0.1) and (b"grpc-timeout", b"100m") in short.headers


# -- well-behaved answers ------------------------------------------------------------------------


def test_requests_arrive_with_their_headers_and_body(shadow: H2ShadowServer) -> None:
    get = request(headers=[("X-Test", "h2")])
    post = request("POST", "/submit", [("Content-Type", "application/json")], b'{"a": 1}')
    assert run(lambda: gather(make_pool(shadow), [get, post])) == [200, 200]
    received = sorted(shadow.wait_for(2), key=lambda r: r.stream_id)
    assert received[0].headers == [
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "shadow.test"),
        (":path", "/probe?x=1"),
        ("accept", "*/*"),
        ("x-test", "h2"),
    ]
    assert (received[1].method, received[1].path, received[1].body) == ("POST", "/submit", b'{"a": 1}')


def test_concurrent_requests_are_multiplexed_on_one_connection(shadow: H2ShadowServer) -> None:
    """Answers delayed 0.2 s: 50 requests are open on the server at once, over one connection."""
    shadow.mode, shadow.delay = "delay", 0.2
    pool = make_pool(shadow, timeout=5.0)
    assert run(lambda: gather(pool, [request() for _ in range(50)])) == [200] * 50
    assert pool.connections_opened == 1 and shadow.connections_accepted == 1
    assert shadow.peak_streams == 50


def test_writes_held_for_a_batch_go_out_at_its_release_in_the_same_iteration(shadow: H2ShadowServer) -> None:
    """The agent's intake holds the pool's writes while it begins a batch of streams: at release
    the batch's frames go out in one write per connection, not from a callback in the next loop
    iteration."""
    batch = [request(path=path) for path in ("/a", "/b", "/c")]
    assert run(lambda: held_batch(make_pool(shadow), request(), batch)) == [200, 200, 200]
    assert sorted(r.path for r in shadow.wait_for(5)[1:4]) == ["/a", "/b", "/c"]


def test_the_servers_stream_limit_is_respected() -> None:
    """max_concurrent_streams 5 and one connection allowed: 40 requests all complete, never more than
    5 open at once on the server."""
    with H2ShadowServer(max_streams=5) as shadow:
        pool = make_pool(shadow, max_connections=1)

        async def test() -> list[int | Exception]:
            await pool.send(request())  # the server's SETTINGS arrive with the first answer
            return await gather(pool, [request() for _ in range(40)])

        assert run(test) == [200] * 40
        assert shadow.peak_streams <= 5 and shadow.connections_accepted == 1


def test_a_full_connection_opens_another() -> None:
    with H2ShadowServer(max_streams=3) as shadow:
        pool = make_pool(shadow, max_connections=4)

        async def test() -> list[int | Exception]:
            await pool.send(request())
            return await gather(pool, [request() for _ in range(12)])

        assert run(test) == [200] * 12
        assert 2 <= shadow.connections_accepted <= 4


def test_large_bodies_are_flow_controlled(shadow: H2ShadowServer) -> None:
    """Bodies larger than the initial 64 KiB stream and connection windows wait for WINDOW_UPDATE."""
    bodies = [bytes([i]) * (300_000 + i) for i in range(3)]
    requests = [request("POST", "/upload", body=body) for body in bodies]
    assert run(lambda: gather(make_pool(shadow), requests)) == [200] * 3
    assert sorted(r.body for r in shadow.wait_for(3)) == sorted(bodies)


def test_head(shadow: H2ShadowServer) -> None:
    assert run(lambda: gather(make_pool(shadow), [request("HEAD")])) == [200]


def test_tls_with_alpn_h2(tmp_path) -> None:
    server_context, ca_file = self_signed_tls(str(tmp_path))
    with H2ShadowServer(ssl_context=server_context) as shadow:
        client = ssl.create_default_context(cafile=ca_file)
        client.set_alpn_protocols(["h2"])
        pool = make_pool(shadow, ssl_context=client, server_hostname="localhost")
        assert run(lambda: gather(pool, [request(), request()])) == [200, 200]


def test_tls_without_h2_is_reason_protocol(tmp_path) -> None:
    """A TLS server that does not select h2 with ALPN (an HTTP/1.1-only server) is not spoken to."""
    from tests.support.shadow import ShadowServer

    server_context, ca_file = self_signed_tls(str(tmp_path))
    with ShadowServer(ssl_context=server_context) as http1:
        client = ssl.create_default_context(cafile=ca_file)
        client.set_alpn_protocols(["h2"])
        pool = H2Pool(
            "127.0.0.1", http1.port, ssl_context=client, server_hostname="localhost", max_connections=1,
            connect_timeout=1.0, timeout=1.0,
        )  # fmt: skip
        [failure] = run(lambda: gather(pool, [request()]))
        assert isinstance(failure, ProtocolError) and "ALPN" in str(failure)


# -- failures ------------------------------------------------------------------------------------


def test_goaway_retries_the_streams_above_the_last_id_once(shadow: H2ShadowServer) -> None:
    """GOAWAY after 5 answered streams, 20 in flight: the streams at or below its last id finish on
    the old connection, the rest are retried once on a new one; every request succeeds."""
    shadow.mode = "goaway"
    shadow.goaway_after = 5
    pool = make_pool(shadow)
    bodies = [b"body %d" % i for i in range(20)]
    results = run(
        lambda: gather(pool, [request("POST", f"/g{i}", body=body) for i, body in enumerate(bodies)])
    )
    assert results == [200] * 20
    assert pool.streams_retried > 0 and shadow.connections_accepted >= 2
    answered = {r.path: r.body for r in shadow.requests if r.connection_id > 1 or r.stream_id <= 9}
    assert answered == {f"/g{i}": body for i, body in enumerate(bodies)}  # retried with their bodies


def test_rst_stream_is_reason_stream_reset(shadow: H2ShadowServer) -> None:
    shadow.mode = "reset"
    pool = make_pool(shadow)
    results = run(lambda: gather(pool, [request(), request()]))
    assert all(isinstance(r, StreamResetError) and r.reason == "stream_reset" for r in results), results
    assert "INTERNAL_ERROR" in str(results[0])


def test_refused_streams_are_retried_once(shadow: H2ShadowServer) -> None:
    shadow.mode = "refuse"
    shadow.refuse_every = 2
    pool = make_pool(shadow)
    assert run(lambda: gather(pool, [request(path=f"/r{i}") for i in range(10)])) == [200] * 10
    assert pool.streams_retried == 5


@pytest.mark.parametrize(("mode", "connections"), [("hang", 1), ("frozen", 2)])
def test_unanswered_streams_time_out_and_only_a_dead_connection_is_dropped(
    shadow: H2ShadowServer, mode: str, connections: int
) -> None:
    """Streams never answered fail as timeouts. A server that still answers PING ("hang") keeps its
    connection for the next request; one that answers nothing at all ("frozen") loses it, and the
    next request goes on a new connection."""
    shadow.mode = mode
    pool = make_pool(shadow, timeout=0.3)

    async def test() -> tuple[list[int | Exception], int]:
        results = await asyncio.gather(*(pool.send(request()) for _ in range(3)), return_exceptions=True)
        await asyncio.sleep(0.5)  # the PING's own timeout
        shadow.mode = "ok"
        status = await pool.send(request())
        await pool.close()
        return results, status  # type: ignore[return-value]

    results, status = run(test)
    assert all(isinstance(r, RequestTimeout) for r in results), results
    assert status == 200 and shadow.connections_accepted == connections


def test_slow_stream_times_out_without_dropping_the_connection(shadow: H2ShadowServer) -> None:
    shadow.mode = "delay"
    shadow.delay = 3.0  # ten times the timeout: a stalled test process cannot see the answer first
    pool = make_pool(shadow, timeout=0.3)

    async def test() -> tuple[int | Exception, int]:
        results = await asyncio.gather(pool.send(request()), return_exceptions=True)
        shadow.mode = "ok"
        status = await pool.send(request())
        await pool.close()
        return results[0], status

    slow, status = run(test)
    assert isinstance(slow, RequestTimeout) and status == 200
    assert shadow.connections_accepted == 1


def test_garbage_is_reason_protocol(shadow: H2ShadowServer) -> None:
    shadow.mode = "garbage"
    [failure] = run(lambda: gather(make_pool(shadow), [request()]))
    assert isinstance(failure, ProtocolError), failure


def test_refused_connection_is_reason_connect() -> None:
    with H2ShadowServer() as shadow:
        port = shadow.port
    pool = H2Pool("127.0.0.1", port, max_connections=1, connect_timeout=1.0, timeout=1.0)
    [failure] = run(lambda: gather(pool, [request()]))
    assert isinstance(failure, TransportError) and failure.reason == "connect"


def test_close_fails_what_is_in_flight(shadow: H2ShadowServer) -> None:
    shadow.mode = "hang"
    pool = make_pool(shadow, timeout=5.0)

    async def test() -> list[int | Exception]:
        sends = [asyncio.ensure_future(pool.send(request())) for _ in range(3)]
        await shadow.wait_for_async(3)
        await pool.close()
        return await asyncio.gather(*sends, return_exceptions=True)

    assert all(isinstance(r, PoolClosed) for r in run(test))


def test_submit_calls_back_once_per_request_never_inline(shadow: H2ShadowServer) -> None:
    pool = make_pool(shadow)

    async def test() -> list[tuple[int | Exception, float]]:
        results: list[tuple[int | Exception, float]] = []
        for _ in range(5):
            pool.submit(request(), lambda result, elapsed: results.append((result, elapsed)))
        assert results == []
        while len(results) < 5:
            await asyncio.sleep(0.01)
        await pool.close()
        return results

    results = run(test)
    assert [r for r, _ in results] == [200] * 5 and all(e >= 0 for _, e in results)


def test_grpc_status_is_reported(shadow: H2ShadowServer) -> None:
    shadow.mode = "grpc"
    shadow.grpc_status = 14
    seen: list[int | None] = []
    pool = make_pool(shadow, on_grpc_status=seen.append)
    grpc = build_h2_request(
        "POST", "/pkg.Svc/Call", [("content-type", "application/grpc"), ("te", "trailers")],
        b"\0\0\0\0\0", "h", scheme="http", timeout_cap=5.0,
    )  # fmt: skip
    assert run(lambda: gather(pool, [grpc, grpc])) == [200, 200]
    assert seen == [14, 14]

"""HTTP/1.1 pipelining (`transport_pipeline.PipelinedPool`) against a real shadow over real sockets.

The shadow here answers pipelined requests strictly in order, as HTTP/1.1 requires, and does what
each request's path asks, so one pipeline can hold a good request, a slow one, one the shadow drops
the connection at, and so on:

    /s201     answer 201 (any status)           /slow201  answer 201 after 0.2 s
    /close201 answer 201 with Connection: close, then close
    /lie201   answer 201 with Connection: close, but keep the connection and answer what follows
    /drop     close the connection without answering      /hang  never answer
    /i201     100 Continue and 103 Early Hints, then 201
    /tenclose201  answer "HTTP/1.0 201" without keep-alive, then close
    /eofclose201  answer 201 with no length and Connection: close, the body ending at EOF
    /eof201       answer 201 with no length and no Connection header, the body ending at EOF
    HEAD      the head of a 5-byte response, no body

With `close_after` N, every connection's Nth answer ends it: with `Connection: close` (as nginx's
`keepalive_requests`) when `announce_close`, else a plain close after a keep-alive response.

It records every request it processed with its connection, every read it made, and the most
requests it held unanswered on one connection at once. A request that arrives after it announced a
close is not processed (RFC 9112 section 9.6), only counted in `unprocessed`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import httptools
import pytest

from spoa_mirror.config import ConfigError, parse_config
from spoa_mirror.protocols import build_pool
from spoa_mirror.transport_pipeline import PipelinedPool
from spoa_mirror.wire import build_request
from tests.support.live_agent import loop_runner
from tests.support.pools import held_batch
from tests.support.shadow import LoopThreadServer
from tests.test_pipeline import mirror_message, running, send_and_ack, settled

T = TypeVar("T")


def run(test: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(test(), 30))


def get(path: str) -> bytes:
    return build_request("GET", path, [("Accept", "*/*")], b"", "shadow.test")


@dataclass
class Seen:
    connection: int
    method: str
    path: str


@dataclass
class PipelineShadow(LoopThreadServer):
    requests: list[Seen] = field(default_factory=list)
    reads: list[tuple[int, bytes]] = field(default_factory=list)
    connections: int = 0
    most_unanswered: int = 0
    close_after: int = 0
    announce_close: bool = True
    unprocessed: int = 0

    def __post_init__(self) -> None:
        super().__init__(None)

    @property
    def port(self) -> int:
        return self._listening_port

    def _protocol(self) -> asyncio.Protocol:
        return _InOrderConnection(self)


class _InOrderConnection(asyncio.Protocol):
    def __init__(self, server: PipelineShadow) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.path = b""
        self.unanswered = 0
        self.answer_after = 0.0  # loop time before which no later answer may go out (keeps order)
        self.stopped = False  # dropped, hung, or closed: answer nothing more
        self.announced_close = False  # said Connection: close (or HTTP/1.0): process nothing more
        self.answers = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.server.connections += 1
        self.id = self.server.connections
        self.server._connections.add(self)
        self.out: list[bytes] = []

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._connections.discard(self)

    def data_received(self, data: bytes) -> None:
        self.server.reads.append((self.id, data))
        self.parser.feed_data(data)
        if self.out:  # what this read's requests were answered at once goes out in one write
            self.transport.write(b"".join(self.out))
            self.out.clear()

    def on_url(self, url: bytes) -> None:
        self.path += url

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        path, self.path = self.path.decode(), b""
        if self.announced_close:
            self.server.unprocessed += 1
            return
        self.server.requests.append(Seen(self.id, method, path))
        self.unanswered += 1
        self.server.most_unanswered = max(self.server.most_unanswered, self.unanswered)
        loop = asyncio.get_running_loop()
        delay = 0.2 if path.startswith("/slow") else 0.0
        at = max(self.answer_after, loop.time() + delay)
        self.answer_after = at
        if at > loop.time():
            loop.call_at(at, self._answer, method, path, False)
        else:
            self._answer(method, path, True)

    def _answer(self, method: str, path: str, batched: bool) -> None:
        if self.stopped or self.transport.is_closing():
            return
        self.unanswered -= 1
        if path == "/hang":
            self.stopped = True
            return
        if path == "/drop":
            self.stopped = True
            self._write(b"", batched)
            self.transport.close()
            return
        status = int(path.lstrip("/").lstrip("abcdefghijklmnopqrstuvwxyz") or 200)
        self.answers += 1
        last = self.answers == self.server.close_after
        version = "1.0" if path.startswith("/ten") else "1.1"
        length = "" if path.startswith(("/eof", "/teneof")) else "Content-Length: 5\r\n"
        head = f"HTTP/{version} {status} X\r\n{length}"
        announced = path.startswith(("/close", "/eofclose", "/ten")) or (last and self.server.announce_close)
        if announced or path.startswith("/lie"):
            head += "Connection: close\r\n" if version == "1.1" else ""
        interim = (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\n\r\n" if path.startswith("/i") else b""
        )
        self.announced_close = announced
        closing = self.stopped = announced or last or path.startswith("/eof")
        self._write(interim + (head + "\r\n").encode() + (b"" if method == "HEAD" else b"hello"), batched)
        if closing:
            self.transport.close()

    def _write(self, data: bytes, batched: bool) -> None:
        if batched:
            self.out.append(data)
            if self.stopped:
                self.transport.write(b"".join(self.out))
                self.out.clear()
        else:
            self.transport.write(data)


@pytest.fixture
def shadow() -> Iterator[PipelineShadow]:
    with PipelineShadow() as server:
        yield server


def make_pool(shadow: PipelineShadow, **overrides: object) -> PipelinedPool:
    options: dict[str, object] = {"depth": 8, "max_connections": 1, "connect_timeout": 1.0, "timeout": 2.0}
    options.update(overrides)
    return PipelinedPool("127.0.0.1", shadow.port, **options)  # type: ignore[arg-type]


async def outcomes(pool: PipelinedPool, requests: list[bytes], heads: tuple[int, ...] = ()) -> list[object]:
    """Submits every request in one loop iteration; each one's outcome (status or failure reason),
    after checking each was reported exactly once and the pool holds no bytes afterwards."""
    results: dict[int, list[object]] = {index: [] for index in range(len(requests))}
    finished = asyncio.Event()

    def done(index: int, result: int | Exception, _elapsed: float) -> None:
        results[index].append(result if isinstance(result, int) else getattr(result, "reason", result))
        if all(results.values()):
            finished.set()

    try:
        for index, request in enumerate(requests):
            pool.submit(request, lambda r, e, i=index: done(i, r, e), head=index in heads)
        await finished.wait()
        await asyncio.sleep(0.3)  # a second report, or a retry, would come by now
        assert pool.bytes_held == 0
    finally:
        await pool.close()
    assert all(len(reported) == 1 for reported in results.values()), results
    return [reported[0] for reported in results.values()]


# -- what pipelining is for ----------------------------------------------------------------------


def test_requests_of_one_iteration_go_in_one_write_and_responses_match_in_order(
    shadow: PipelineShadow,
) -> None:
    pool = make_pool(shadow)
    requests = [get(f"/s{status}") for status in (201, 202, 203, 206, 299)]
    assert run(lambda: outcomes(pool, requests)) == [201, 202, 203, 206, 299]
    assert pool.writes == 1
    assert shadow.connections == 1
    assert shadow.reads[0] == (1, b"".join(requests))  # the shadow got them in one read, in order
    assert [seen.path for seen in shadow.requests] == ["/s201", "/s202", "/s203", "/s206", "/s299"]


def test_writes_held_for_a_batch_go_out_at_its_release_in_the_same_iteration(shadow: PipelineShadow) -> None:
    """The agent's intake holds a pipelined pool's writes while it places a batch: at release the
    batch is written at once, in one write, not by a callback in the next loop iteration."""
    batch = [get(f"/s{status}") for status in (201, 202, 203)]
    assert run(lambda: held_batch(make_pool(shadow), get("/s200"), batch)) == [201, 202, 203]
    assert shadow.reads[-2] == (1, get("/s201") + get("/s202") + get("/s203"))


def test_depth_bounds_requests_in_flight_per_connection(shadow: PipelineShadow) -> None:
    pool = make_pool(shadow, depth=2, max_connections=2)
    requests = [get(f"/slow{210 + index}") for index in range(7)]
    assert run(lambda: outcomes(pool, requests)) == [210 + index for index in range(7)]
    assert shadow.most_unanswered == 2
    assert shadow.connections == 2


def test_bytes_bound_keeps_a_large_request_off_a_busy_connection(shadow: PipelineShadow) -> None:
    big = build_request("POST", "/s201", [], b"x" * 3000, "shadow.test")
    pool = make_pool(shadow, max_pipeline_bytes=4000)
    assert run(lambda: outcomes(pool, [big, get("/s202"), big, get("/s203")])) == [201, 202, 201, 203]
    assert pool.writes == 2  # big + GET, then (the first two answered) big + GET


def test_a_slow_response_holds_the_ones_behind_it_but_nothing_is_lost(shadow: PipelineShadow) -> None:
    pool = make_pool(shadow)
    assert run(lambda: outcomes(pool, [get("/slow201"), get("/s202"), get("/s203")])) == [201, 202, 203]


def test_head_ends_a_pipeline_and_interim_responses_are_skipped(shadow: PipelineShadow) -> None:
    pool = make_pool(shadow)
    requests = [get("/i201"), build_request("HEAD", "/s202", [], b"", "shadow.test"), get("/s203")]
    assert run(lambda: outcomes(pool, requests, heads=(1,))) == [201, 202, 203]
    assert pool.writes == 2  # nothing went behind the HEAD: the GET after it waited for its response
    assert shadow.connections == 1


# -- exact failure semantics ---------------------------------------------------------------------


def test_connection_dropped_mid_pipeline_ends_each_unanswered_request_once_without_retry(
    shadow: PipelineShadow,
) -> None:
    pool = make_pool(shadow)
    requests = [get("/s201"), get("/s202"), get("/drop"), get("/s206"), get("/s207")]
    assert run(lambda: outcomes(pool, requests)) == [201, 202, "reset", "reset", "reset"]
    assert [seen.path for seen in shadow.requests] == ["/s201", "/s202", "/drop", "/s206", "/s207"]
    assert shadow.connections == 1


def test_connection_close_ends_the_pipeline_and_later_answers_are_never_credited(
    shadow: PipelineShadow,
) -> None:
    """A shadow that breaks RFC 9112 and answers after its close response: its later answers are
    never read, the requests behind the close go again on a new connection and are credited there."""
    pool = make_pool(shadow)
    requests = [get("/s201"), get("/lie202"), get("/s203"), get("/s206")]
    assert run(lambda: outcomes(pool, requests)) == [201, 202, 203, 206]
    assert [(seen.connection, seen.path) for seen in shadow.requests] == [
        (1, "/s201"),
        (1, "/lie202"),
        (1, "/s203"),
        (1, "/s206"),
        (2, "/s203"),
        (2, "/s206"),
    ]
    assert pool.resent == 2


def test_close_after_a_response_then_a_new_connection_for_what_follows(shadow: PipelineShadow) -> None:
    async def scenario() -> list[object]:
        pool = make_pool(shadow)
        first = await outcomes_open(pool, [get("/s201"), get("/close202"), get("/s203")])
        second = await outcomes(pool, [get("/s206")])
        return [*first, *second]

    assert run(scenario) == [201, 202, 203, 206]
    assert shadow.connections == 2
    assert [(seen.connection, seen.path) for seen in shadow.requests] == [
        (1, "/s201"),
        (1, "/close202"),
        (2, "/s203"),
        (2, "/s206"),
    ]
    assert shadow.unprocessed == 1


@pytest.mark.parametrize("connections", [1, 3])
def test_a_shadow_closing_every_connection_after_n_answers_gets_every_request_once_in_order(
    connections: int,
) -> None:
    """nginx's `keepalive_requests`: the Nth response on a connection says `Connection: close` and
    the requests pipelined behind it are not processed. Each is sent again, once, in its order; the
    pool learns N and puts no more than N on a connection after that, so only the connections opened
    before it learned leave requests behind their close. Every request ends once, answered."""
    paths = [f"/s{210 + index}" for index in range(20)]  # 204 has no body whatever its length says
    with PipelineShadow(close_after=3) as shadow:
        pool = make_pool(shadow, max_connections=connections)
        assert run(lambda: outcomes(pool, [get(path) for path in paths])) == [
            210 + index for index in range(20)
        ]
    processed = [seen.path for seen in shadow.requests]
    assert sorted(processed) == sorted(paths)  # each exactly once
    if connections == 1:  # one connection at a time: the shadow sees them in the order submitted
        assert processed == paths
    assert pool.resent == shadow.unprocessed  # each request behind a close went again, once
    if connections == 1:  # depth 8, 3 answered: only the first connection left requests behind
        assert pool.resent == 5
    assert pool.requests_per_connection == 3


def test_a_request_behind_a_close_twice_is_an_error_not_a_third_send(shadow: PipelineShadow) -> None:
    """/close203 and /s206 sit behind /close202: both go again, on a new connection, where
    /close203 closes it ahead of /s206 a second time. /s206 ends as "reset", never sent a third time."""
    pool = make_pool(shadow)
    requests = [get("/s201"), get("/close202"), get("/close203"), get("/s206")]
    assert run(lambda: outcomes(pool, requests)) == [201, 202, 203, "reset"]
    assert [seen.path for seen in shadow.requests] == ["/s201", "/close202", "/close203"]
    assert shadow.unprocessed == 3 and shadow.connections == 2  # /close203, /s206; then /s206


def test_a_shadow_closing_without_saying_so_mid_pipeline_loses_the_rest_counted_never_resent() -> None:
    """The Nth response on each connection is an ordinary keep-alive one, then the shadow closes:
    nothing says the requests behind it were not processed, so each ends as "reset", sent once."""
    with PipelineShadow(close_after=2, announce_close=False) as shadow:
        pool = make_pool(shadow)
        requests = [get(f"/s{210 + index}") for index in range(5)]
        assert run(lambda: outcomes(pool, requests)) == [210, 211, "reset", "reset", "reset"]
    assert [seen.path for seen in shadow.requests] == ["/s210", "/s211", "/s212", "/s213", "/s214"]
    assert shadow.connections == 1 and pool.resent == 0


@pytest.mark.parametrize(
    ("first", "behind"),
    [
        ("/tenclose201", [202, 203]),  # HTTP/1.0 without keep-alive: one request per connection
        ("/eofclose201", [202, 203]),  # body to EOF, Connection: close
        ("/eof201", ["reset", "reset"]),  # body to EOF, nothing said: may have been processed
    ],
)
def test_what_an_end_of_connection_response_says_decides_whether_the_rest_go_again(
    shadow: PipelineShadow, first: str, behind: list[object]
) -> None:
    pool = make_pool(shadow)
    assert run(lambda: outcomes(pool, [get(first), get("/s202"), get("/s203")])) == [201, *behind]
    sent = [seen.path for seen in shadow.requests]
    assert sent.count("/s202") == (1 if behind[0] == 202 else sent.count("/s202"))
    assert pool.resent == (2 if behind[0] == 202 else 0)


async def outcomes_open(pool: PipelinedPool, requests: list[bytes]) -> list[object]:
    """`outcomes` without closing the pool."""
    close, pool.close = pool.close, _no_close  # type: ignore[method-assign]
    try:
        return await outcomes(pool, requests)
    finally:
        pool.close = close  # type: ignore[method-assign]


async def _no_close() -> None:
    return None


def test_only_a_lone_request_on_a_reused_connection_closed_unanswered_is_retried(
    shadow: PipelineShadow,
) -> None:
    """A reused connection closed before any byte of a response: with one request on it, most
    likely an idle close racing the request, tried once more on a new connection (as `Pool` does);
    with two, the shadow may have processed the first, so neither is retried."""

    async def scenario() -> list[object]:
        pool = make_pool(shadow)
        warm = await outcomes_open(pool, [get("/s201")])
        lone = await outcomes_open(pool, [get("/drop")])  # retried once, dropped again: reset
        warm += await outcomes_open(pool, [get("/s202")])
        pair = await outcomes(pool, [get("/drop"), get("/s203")])
        return [*warm, *lone, *pair]

    assert run(scenario) == [201, 202, "reset", "reset", "reset"]
    assert [seen.path for seen in shadow.requests] == ["/s201", "/drop", "/drop", "/s202", "/drop", "/s203"]


def test_timeout_mid_pipeline_ends_the_rest_as_timeouts_not_retried(shadow: PipelineShadow) -> None:
    pool = make_pool(shadow, timeout=0.3)
    requests = [get("/s201"), get("/hang"), get("/s203")]
    assert run(lambda: outcomes(pool, requests)) == [201, "timeout", "timeout"]
    assert len(shadow.requests) == 3 and shadow.connections == 1


def test_close_fails_what_is_in_flight_and_waiting_once(shadow: PipelineShadow) -> None:
    async def scenario() -> list[object]:
        pool = make_pool(shadow, depth=2)
        results: list[object] = []
        for path in ("/hang", "/s202", "/s203"):  # the third waits in the backlog
            pool.submit(get(path), lambda r, _e: results.append(getattr(r, "reason", r)))
        await shadow_sees(shadow, 2)
        await pool.close()
        await asyncio.sleep(0.2)
        assert pool.bytes_held == 0
        return results

    assert sorted(map(str, run(scenario))) == ["closed"] * 3


async def shadow_sees(shadow: PipelineShadow, count: int) -> None:
    for _ in range(200):
        if len(shadow.requests) >= count:
            return
        await asyncio.sleep(0.01)
    raise TimeoutError(f"shadow saw {len(shadow.requests)} requests")


# -- configuration ---------------------------------------------------------------------------------


def target_document(**target: object) -> dict[str, object]:
    return {"mirroring": {"targets": [{"url": "http://127.0.0.1:9", **target}]}}


def test_pipeline_depth_builds_a_pipelined_pool_by_default_for_http1_only() -> None:
    default = parse_config(target_document(), env={}).targets[0]
    off = parse_config(target_document(pipeline_depth=1), env={}).targets[0]
    h2c = parse_config(target_document(protocol="h2c"), env={}).targets[0]
    capture_document = {"mirroring": {"targets": [{"capture": {"directory": "/tmp"}}]}}
    capture = parse_config(capture_document, env={}).targets[0]
    depths = (default.pipeline_depth, off.pipeline_depth, h2c.pipeline_depth, capture.pipeline_depth)
    assert depths == (8, 1, 1, 1)
    assert type(build_pool(off, None, lambda *_: None, _NoOutgoing())).__name__ == "Pool"
    pool = build_pool(default, None, lambda *_: None, _NoOutgoing())
    assert isinstance(pool, PipelinedPool) and pool.depth == 8


class _NoOutgoing:
    source_ip = None
    ports = None


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ({"pipeline_depth": 0}, "pipeline_depth"),
        ({"pipeline_depth": 65}, "pipeline_depth"),
        ({"pipeline_depth": 2, "protocol": "h2c"}, "needs protocol http1"),
    ],
)
def test_pipeline_depth_is_checked(target: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(target_document(**target), env={})
    assert message in str(caught.value)


# -- through the agent: the account stays exact ------------------------------------------------


def _mirror_through_the_agent(
    shadow: PipelineShadow, paths: list[str], *, concurrency: int
) -> tuple[dict[str, int], int]:
    """HAProxy's copies of `paths`, in one NOTIFY, through the agent's SPOP listener to one target
    with pipeline_depth 4 on `shadow`: the target's outcomes once every request settled, and how
    many it sent again (spoa_mirror_pipeline_resent_total)."""
    target = {"name": "t", "url": f"http://127.0.0.1:{shadow.port}", "pipeline_depth": 4,
              "concurrency": concurrency}  # fmt: skip
    outcomes: dict[str, int] = {}
    resent: list[int] = []

    async def test() -> None:
        async with running({"targets": [target]}) as (app, _, peer):
            await send_and_ack(peer, 1, [mirror_message(path) for path in paths])
            outcomes.update(await settled(app.mirror.target_stats["t"], len(paths)))
            resent.append(app.mirror.target_stats["t"].resent)

    loop_runner("uvloop", 30)(test)
    return outcomes, resent[0]


def test_the_agents_account_holds_when_a_connection_drops_mid_pipeline(shadow: PipelineShadow) -> None:
    """HAProxy's copies through the agent's SPOP listener to a target with pipeline_depth 4 and one
    connection: the shadow drops the connection at the third request, so it and every request
    behind it on that connection (those the freed slots placed there before the EOF arrived too)
    end as error_reset, each once, never retried; the rest are answered. received = Σ outcomes."""
    paths = ["/s201", "/s202", "/drop", "/s206", "/s207", "/s208"]
    outcomes, _ = _mirror_through_the_agent(shadow, paths, concurrency=1)
    seen = [request.path for request in shadow.requests]
    assert len(seen) == len(set(seen))  # nothing retried
    answered = 0  # requests ahead of /drop on their connection: answered by the shadow
    for connection in {request.connection for request in shadow.requests}:
        on_it = [request.path for request in shadow.requests if request.connection == connection]
        answered += on_it.index("/drop") if "/drop" in on_it else len(on_it)
    assert answered >= 2
    assert outcomes == {"sent_2xx": answered, "error_reset": len(paths) - answered}


def test_the_agents_account_holds_when_the_shadow_closes_connections_like_nginx() -> None:
    """As nginx's `keepalive_requests`, every third answer says `Connection: close`: through the
    agent with pipeline_depth 4, every mirrored request reaches the shadow exactly once and ends
    sent_2xx; no error outcome, received = Σ outcomes."""
    paths = [f"/s{210 + index}" for index in range(24)]
    with PipelineShadow(close_after=3) as shadow:
        outcomes, resent = _mirror_through_the_agent(shadow, paths, concurrency=2)
    assert sorted(request.path for request in shadow.requests) == sorted(paths)
    assert outcomes == {"sent_2xx": len(paths)}
    # Each request a close response left unprocessed went again, and the target's count
    # (spoa_mirror_pipeline_resent_total) says how many.
    assert shadow.unprocessed > 0 and resent == shadow.unprocessed

"""The pipeline's narrow edges that mutation testing of spoa_mirror/mirror.py found unguarded: what a
reload carries over (pool, breaker, rate limiter, the slot of a request in flight, a queued HEAD),
the exact sum of the agent's memory budget with several targets, the stale sweep on a clock the test
drives, and the redaction worker process dying. Real sockets, real shadows, the production wiring;
each test builds its own agent, so each passes alone and in any order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from spoa_mirror import mirror as mirror_module
from spoa_mirror.capture import gor
from spoa_mirror.capture.replay import ReplayOptions, replay
from spoa_mirror.capture.target import payload_id
from spoa_mirror.config import parse_config
from spoa_mirror.message import to_request
from spoa_mirror.mirror import Mirror
from spoe import Message
from tests.support.live_agent import AsyncTest, loop_runner, wait_until
from tests.support.shadow import ShadowServer
from tests.support.worker_gate import wait_at_gate
from tests.test_pipeline import (
    SETTLE,
    TEST_DEADLINE,
    mirror_message,
    reload,
    request_message,
    running,
    send_and_ack,
    settled,
    target,
)

KiB = 1024


# What a reload carries over -------------------------------------------------------------------------


def test_a_reload_keeps_pool_breaker_and_limiter_whose_settings_are_equal_and_renews_changed_ones(
    run_asyncio: Callable[[AsyncTest], None],
) -> None:
    """Three changed targets, two reloads. The first changes only an added header: `pooled` keeps
    its pool (the next request goes on the same keep-alive connection, also after the old target
    drained, which must not close the pool it handed on), `broken`'s open breaker stays open
    (circuit_open, not another failed connect) and `limited`'s spent token stays spent
    (rate_limited). The second changes the timeout, the breaker and the rate: a new pool (a new
    connection), a closed breaker (the connect is tried again), a full bucket (sent)."""
    with ShadowServer() as ok, ShadowServer(mode="refuse") as refused, ShadowServer() as limited_shadow:
        pooled = target("pooled", ok, concurrency=1, timeout=30)
        broken = target("broken", refused, circuit_breaker={"failure_threshold": 1, "backoff": 600})
        limited = target("limited", limited_shadow, rate_limit={"requests_per_second": 0.001})

        def config(extra: dict[str, dict[str, Any]]) -> dict[str, Any]:
            targets = [{**spec, **extra.get(spec["name"], {})} for spec in (pooled, broken, limited)]
            return {"targets": targets, "drain_timeout": 5}

        sent = 0

        async def test() -> None:
            nonlocal sent
            async with running(config({})) as (app, _, peer):
                stats = app.mirror.target_stats
                await send_and_ack(peer, 1, [mirror_message("/1")])
                assert await settled(stats["pooled"], 1) == {"sent_2xx": 1}
                assert await settled(stats["broken"], 1) == {"error_connect": 1}
                assert await settled(stats["limited"], 1) == {"sent_2xx": 1}

                header = {"headers": {"X-Reload": "1"}}
                reload(app, config({"pooled": header, "broken": header, "limited": header}))
                await wait_until(lambda: not app.mirror.retired, SETTLE)
                await send_and_ack(peer, 2, [mirror_message("/2")])
                assert await settled(stats["pooled"], 2) == {"sent_2xx": 2}
                assert await settled(stats["broken"], 2) == {"error_connect": 1, "circuit_open": 1}
                assert await settled(stats["limited"], 2) == {"sent_2xx": 1, "rate_limited": 1}

                reload(app, config({
                    "pooled": {**header, "timeout": 20},
                    "broken": {**header, "circuit_breaker": {"failure_threshold": 2, "backoff": 600}},
                    "limited": {**header, "rate_limit": {"requests_per_second": 0.002}},
                }))  # fmt: skip
                await wait_until(lambda: not app.mirror.retired, SETTLE)
                await send_and_ack(peer, 3, [mirror_message("/3")])
                assert await settled(stats["pooled"], 3) == {"sent_2xx": 3}
                assert await settled(stats["broken"], 3) == {"error_connect": 2, "circuit_open": 1}
                assert await settled(stats["limited"], 3) == {"sent_2xx": 2, "rate_limited": 1}
                sent = stats["pooled"].bytes_sent

        run_asyncio(test)
        assert sent == sum(len(r.raw) for r in ok.requests)  # each went out on a free connection
        connections = [(r.target, r.connection_id) for r in ok.requests]
        assert connections == [("/1", 1), ("/2", 1), ("/3", 2)]
        assert [r.target for r in limited_shadow.requests] == ["/1", "/3"]


def test_the_slot_and_a_queued_head_go_to_the_successor_of_a_target_a_reload_changed(
    run_asyncio: Callable[[AsyncTest], None],
) -> None:
    """concurrency 1, a shadow answering after 1 s. A reload while one GET is in flight and
    nothing waits: the new target counts the slot, and gives it up when the old target's request
    settles (one slot taken too many would stop the target; one too few would let two requests go at
    once). A reload while a GET is in flight and a HEAD waits: the HEAD goes out when the GET settles,
    still as a HEAD (its response has a Content-Length and no body), and the connection goes on."""
    with ShadowServer(mode="delay", delay=1.0) as shadow:

        async def test() -> None:
            spec = target("a", shadow, concurrency=1, timeout=3)
            async with running({"targets": [spec], "drain_timeout": 10}) as (app, _, peer):
                stats = app.mirror.target_stats["a"]
                await send_and_ack(peer, 1, [mirror_message("/0")])
                await wait_until(lambda: len(shadow.requests) == 1, SETTLE)
                reload(app, {"targets": [{**spec, "headers": {"X-Reload": "1"}}], "drain_timeout": 10})
                [first] = app.mirror.targets
                assert first.active == 1
                assert await settled(stats, 1) == {"sent_2xx": 1}
                await wait_until(lambda: not app.mirror.retired, SETTLE)
                assert first.active == 0

                head = request_message("/2", [("Host", "h")], method="HEAD")
                await send_and_ack(peer, 2, [mirror_message("/1"), head])
                await wait_until(lambda: len(shadow.requests) == 2 and len(first.queue) == 1, SETTLE)
                reload(app, {"targets": [{**spec, "headers": {"X-Reload": "2"}}], "drain_timeout": 10})
                [second] = app.mirror.targets
                assert (second.active, len(second.queue)) == (1, 1)
                assert await settled(stats, 3) == {"sent_2xx": 3}
                await send_and_ack(peer, 3, [mirror_message("/3")])
                assert await settled(stats, 4) == {"sent_2xx": 4}
                await wait_until(lambda: not app.mirror.retired and second.active == 0, SETTLE)

        run_asyncio(test)
        assert [(r.method, r.target) for r in shadow.requests] == [
            ("GET", "/0"), ("GET", "/1"), ("HEAD", "/2"), ("GET", "/3")
        ]  # fmt: skip
        assert shadow.connections_accepted == 1


# The agent's memory budget at its exact sum ----------------------------------------------------------


async def _hung_server() -> tuple[asyncio.Server, int]:
    """Accepts and never answers, so what a target sends stays held in its pool and queue."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3600)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _post(path: str, body_size: int) -> Message:
    headers = f"content-length: {body_size}\r\n\r\n"
    args = {"arg_method": "POST", "arg_path": path, "arg_ver": "1.1", "arg_hdrs": headers,
            "arg_body": b"x" * body_size}  # fmt: skip
    return Message("mirror", args)


def test_a_target_past_its_share_may_fill_the_agents_budget_to_the_byte_and_no_further() -> None:
    """Two targets on a hung shadow: b (its own memory_budget 64 KiB, so its share is that) holds
    exactly its share; a's own memory_budget is exactly three of its requests, and the agent's is
    those three plus b's 64 KiB. a's third request takes it past its share, so the exact sum decides:
    held + b's = the agent's budget to the byte, so it fits (and a's own budget too, to the byte); a
    fourth is refused as budget_exceeded. The request sizes are what the production builder makes of
    them, measured first on an agent with room to spare."""
    body = 24 * KiB

    def config(port: int, agent_budget: int, a_budget: int) -> dict[str, Any]:
        def spec(name: str, budget: int) -> dict[str, Any]:
            only = {"allow": {"path_prefix": [f"/{name}"]}}
            return {"name": name, "url": f"http://127.0.0.1:{port}", "concurrency": 1, "timeout": 60,
                    "memory_budget": budget, "filters": only}  # fmt: skip

        return {"memory_budget": agent_budget, "targets": [spec("a", a_budget), spec("b", 64 * KiB)]}

    async def test() -> None:
        server, port = await _hung_server()
        try:
            roomy = Mirror(parse_config(config(port, 4 * 1024 * KiB, 1024 * KiB), env={}), None)
            a_probe, b_probe = roomy.targets
            a_size = len(a_probe.build(to_request(_post("/a/x", body).args)))
            b_overhead = len(b_probe.build(to_request(_post("/b/x", 0).args)))
            # b's one request is 64 KiB to the byte (the same number of Content-Length digits)
            b_body = 64 * KiB - b_overhead - (len(str(64 * KiB)) - 1)
            assert len(b_probe.build(to_request(_post("/b/x", b_body).args))) == 64 * KiB

            mirror = Mirror(parse_config(config(port, 3 * a_size + 64 * KiB, 3 * a_size), env={}), None)
            a, b = mirror.targets
            assert a.share < 3 * a_size and b.share == 64 * KiB
            mirror.handle(_post("/b/x", b_body))
            for _ in range(4):
                mirror.handle(_post("/a/x", body))
            await wait_until(lambda: not mirror._intake, SETTLE)
            assert (b.held_bytes(), a.held_bytes()) == (64 * KiB, 3 * a_size)
            assert mirror.budget.used() == mirror.budget.limit
            stats = mirror.target_stats.items()
            outcomes = {name: {k: v for k, v in s.outcomes.items() if v} for name, s in stats}
            assert outcomes == {"a": {"filtered": 1, "budget_exceeded": 1}, "b": {"filtered": 4}}
            assert (a.pending, b.pending) == (3, 1)
        finally:
            server.close()

    loop_runner("asyncio", TEST_DEADLINE)(test)


# The stale sweep on a clock the test drives -----------------------------------------------------------


class DrivenClockLoop(asyncio.SelectorEventLoop):
    """asyncio's loop with a clock the test moves forward (`advance`): the timers due by then fire at
    the next iteration, as if that much time had passed. The agent's queue stamps and stale sweeps
    read only the loop's clock, so max_queue_age can be 100 s and the test still takes milliseconds."""

    def __init__(self) -> None:
        super().__init__()
        self.skew = 0.0

    def time(self) -> float:
        return super().time() + self.skew

    def advance(self, seconds: float) -> None:
        self.skew += seconds


async def _until(condition: Callable[[], bool]) -> None:
    """wait_until on the real clock: the loop's own runs ahead whenever the test advances it."""
    deadline = time.monotonic() + SETTLE
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0)


def test_the_stale_sweep_drops_exactly_what_passed_max_queue_age_and_comes_back_for_the_next() -> None:
    """max_queue_age 100 s, one request held by a hung shadow, three queued behind it at loop times
    0, 60 and 80. At 110 only the first is stale (the other two are 50 and 30 s old), and the next
    sweep is set for the second's expiry, 160, not the third's; at 165 the second goes too, and the
    third, 85 s old, still waits, for a sweep at 180. The send and connect timeouts are longer than
    the clock ever moves, so only the sweeps see time pass."""
    age = 100.0

    async def test() -> None:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, DrivenClockLoop)
        server, port = await _hung_server()
        try:
            # One request per connection (pipeline_depth 1), so the second one queues.
            spec = {"name": "a", "url": f"http://127.0.0.1:{port}", "concurrency": 1, "pipeline_depth": 1,
                    "timeout": 10_000, "connect_timeout": 10_000, "max_queue_age": age}  # fmt: skip
            mirror = Mirror(parse_config({"targets": [spec]}, env={}), None)
            [a] = mirror.targets
            stale = mirror.target_stats["a"].outcomes
            mirror.handle(mirror_message("/held"))
            mirror.handle(mirror_message("/0"))
            await _until(lambda: len(a.queue) == 1)
            start = a.queue[0][2]
            for path, at in (("/60", 60.0), ("/80", 80.0)):
                loop.advance(start + at - loop.time())
                mirror.handle(mirror_message(path))
                await _until(lambda: not mirror._intake)
            assert [round(queued - start) for _, _, queued in a.queue] == [0, 60, 80]

            loop.advance(start + 110 - loop.time())
            await _until(lambda: stale["stale"] > 0)
            assert (stale["stale"], len(a.queue)) == (1, 2)
            assert a._stale_sweep is not None and a._stale_sweep.when() == pytest.approx(start + 160)

            loop.advance(start + 165 - loop.time())
            await _until(lambda: stale["stale"] > 1)
            assert (stale["stale"], len(a.queue)) == (2, 1)
            assert a._stale_sweep is not None and a._stale_sweep.when() == pytest.approx(start + 180)
            assert mirror.target_stats["a"].pending == 2  # the held one and /80
        finally:
            server.close()

    with asyncio.Runner(loop_factory=DrivenClockLoop) as runner:
        runner.run(test())


# The redaction worker process dying -------------------------------------------------------------------


def test_requests_after_the_redaction_worker_was_killed_are_still_redacted_and_counted(
    run_asyncio: Callable[[AsyncTest], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bodies over INLINE_BODY_LIMIT (lowered to 1 KiB here) are redacted in one worker process.
    SIGKILL it (the kernel's OOM killer would) between requests: the next ones are redacted in a new
    worker, sent and counted; nothing is lost or sent unredacted."""
    monkeypatch.setattr(mirror_module, "INLINE_BODY_LIMIT", 1024)
    big = b'{"password": "hunter2", "fill": "' + b"x" * 2048 + b'"}'
    redacted = big.replace(b'"password": "hunter2", "fill": ', b'"password":"[REDACTED]","fill":')
    json = [("Host", "e"), ("Content-Type", "application/json")]
    with ShadowServer() as shadow:

        async def test() -> None:
            async with running({"targets": [target("a", shadow, concurrency=1)]}) as (app, _, peer):
                stats = app.mirror.target_stats["a"]
                await send_and_ack(peer, 1, [request_message("/1", json, big)])
                assert await settled(stats, 1) == {"sent_2xx": 1}
                assert app.mirror.targets[0].pending == 0
                worker = mirror_module._executor
                assert worker is not None
                [pid] = list(worker._processes)
                os.kill(pid, signal.SIGKILL)
                await wait_until(lambda: worker._broken, SETTLE)
                await send_and_ack(peer, 2, [request_message(f"/{n}", json, big) for n in (2, 3)])
                assert await settled(stats, 3) == {"sent_2xx": 3}
                assert stats.redactions == {"json:default": 3}
                assert mirror_module._executor is not worker
                [a] = app.mirror.targets
                assert (a.held_bytes(), a.offloaded, a.pending) == (0, 0, 0)

        run_asyncio(test)
        assert [(r.target, r.body) for r in shadow.requests] == [(f"/{n}", redacted) for n in (1, 2, 3)]
        assert [r.header("X-Mirror-Truncated") for r in shadow.requests] == [None] * 3


def test_a_body_redacted_in_the_worker_is_held_under_the_targets_budget(
    run_asyncio: Callable[[AsyncTest], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body bound for the worker process counts against the memory budget before it goes there. A
    hung shadow and a target budget of 64 KiB: five 12 KiB bodies are redacted and held (one sent,
    four queued); the sixth and seventh would pass the budget, so each is refused as budget_exceeded
    and never reaches the worker (five redactions, not seven)."""
    monkeypatch.setattr(mirror_module, "INLINE_BODY_LIMIT", 1024)
    json = [("Host", "e"), ("Content-Type", "application/json")]
    body = b'{"password": "p", "fill": "' + b"x" * (12 * KiB) + b'"}'
    with ShadowServer(mode="hang") as shadow:

        async def test() -> None:
            spec = target("a", shadow, concurrency=1, timeout=60, memory_budget=64 * KiB)
            async with running({"targets": [spec], "drain_timeout": 0.05}) as (app, _, peer):
                stats = app.mirror.target_stats["a"]
                [a] = app.mirror.targets
                for n in range(7):  # one frame each: a frame holds 16 KiB
                    await send_and_ack(peer, n + 1, [request_message(f"/{n}", json, body)])
                await wait_until(lambda: stats.received == 7 and a.offloaded == 0, SETTLE)
                assert {k: v for k, v in stats.outcomes.items() if v} == {"budget_exceeded": 2}
                assert stats.redactions == {"json:default": 5}
                assert (stats.pending, a.pending, len(a.queue), a.offloaded_bytes) == (5, 5, 4, 0)
                assert 5 * len(body) < a.held_bytes() <= 64 * KiB

        run_asyncio(test)


def test_a_forked_child_redacts_in_a_worker_of_its_own() -> None:
    """A redaction pool inherited through fork never runs what it is given (its manager thread
    stayed in the parent), so the child of a fork starts its own worker; the parent's still works."""
    parent_pool = mirror_module._redaction_executor()
    assert parent_pool.submit(abs, -1).result(timeout=SETTLE) == 1
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only if its own pool ran the call
        ok = False
        try:
            pool = mirror_module._redaction_executor()
            ok = pool is not parent_pool and pool.submit(abs, -2).result(timeout=SETTLE) == 2
            pool.shutdown(wait=True)
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert mirror_module._redaction_executor() is parent_pool
    assert parent_pool.submit(abs, -3).result(timeout=SETTLE) == 3


# Failures and drains ---------------------------------------------------------------------------------


def test_a_failure_that_leaves_the_breaker_closed_sheds_nothing(
    run_asyncio: Callable[[AsyncTest], None],
) -> None:
    """failure_threshold 3, concurrency 1, a shadow refusing connections, three requests in one
    batch: each is tried in turn (the first two failures leave the breaker closed, so what waits
    behind them still goes), and the third failure opens it with nothing left to shed."""
    with ShadowServer(mode="refuse") as refused:

        async def test() -> None:
            breaker = {"failure_threshold": 3, "backoff": 600}
            spec = target("a", refused, concurrency=1, circuit_breaker=breaker)
            async with running({"targets": [spec]}) as (app, _, peer):
                await send_and_ack(peer, 1, [mirror_message(f"/{n}") for n in range(3)])
                assert await settled(app.mirror.target_stats["a"], 3) == {"error_connect": 3}
                assert app.mirror.targets[0].breaker.state == "open"

        run_asyncio(test)


def test_a_shutdown_while_a_retired_target_drains_ends_at_the_sooner_deadline(
    run_asyncio: Callable[[AsyncTest], None],
) -> None:
    """A reload retires target a with a request stuck at a hung shadow and 30 s to drain; SIGTERM's
    drain, with 0.05 s, brings a's deadline forward: both drains end, and the stuck request is
    counted shutdown once."""
    with ShadowServer(mode="hang") as hung, ShadowServer() as ok:

        async def test() -> None:
            config = {"targets": [target("a", hung, concurrency=1, timeout=60)], "drain_timeout": 30}
            async with running(config) as (app, _, peer):
                await send_and_ack(peer, 1, [mirror_message("/stuck")])
                await wait_until(lambda: len(hung.requests) == 1, SETTLE)
                reload(app, {"targets": [target("b", ok)], "drain_timeout": 30})
                assert [t.name for t in app.mirror.retired] == ["a"]
                assert await app.mirror.drain(0.05) == (0, 1)
                await wait_until(lambda: not app.mirror.retired, SETTLE)
                assert await settled(app.mirror.target_stats["a"], 1) == {"shutdown": 1}

        run_asyncio(test)


def test_a_body_back_from_the_worker_to_a_full_queue_is_counted_queue_full(
    run_asyncio: Callable[[AsyncTest], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """queue_size 1, concurrency 1, a hung shadow; one batch: a GET (sent), two large bodies (to the
    worker: the queue is empty then), a GET (queued: now the queue is full). The large bodies come
    back from the worker to a full queue, so each is counted queue_full and never sent."""
    monkeypatch.setattr(mirror_module, "INLINE_BODY_LIMIT", 1024)
    json = [("Host", "e"), ("Content-Type", "application/json")]
    body = b'{"fill": "' + b"x" * 2048 + b'"}'
    with ShadowServer(mode="hang") as shadow:

        async def test() -> None:
            spec = target("a", shadow, concurrency=1, timeout=60, queue_size=1)
            async with running({"targets": [spec], "drain_timeout": 0.05}) as (app, _, peer):
                stats = app.mirror.target_stats["a"]
                [a] = app.mirror.targets
                large = request_message("/large", json, body)
                await send_and_ack(peer, 1, [mirror_message("/0"), large, large, mirror_message("/2")])
                await wait_until(lambda: stats.received == 4 and a.offloaded == 0, SETTLE)
                assert {k: v for k, v in stats.outcomes.items() if v} == {"queue_full": 2}
                # Usually /2 waits in the queue; on a busy machine the intake may yield before /2 and
                # a large body come back first and take the place: the counts are the same.
                assert (stats.pending, len(a.queue)) == (2, 1)
                assert app.mirror._intake_bytes == 0  # what bounds the intake was given back

        run_asyncio(test)
        assert [r.target for r in shadow.requests] == ["/0"]


def test_a_chunked_body_is_never_taken_for_a_truncated_one() -> None:
    """With Transfer-Encoding, a Content-Length larger than the body means nothing (RFC 9112 6.3):
    HAProxy framed the body by its chunks and handed all of it over. Without it, the body was cut."""
    declared = [("Host", "h"), ("Content-Length", "100")]
    assert mirror_module.is_truncated(to_request(request_message("/", declared, b"x" * 10).args))
    chunked = [*declared, ("Transfer-Encoding", "chunked")]
    assert not mirror_module.is_truncated(to_request(request_message("/", chunked, b"x" * 10).args))


def test_in_flight_per_target_is_concurrency_times_the_default_pipeline_depth() -> None:
    """With the defaults a target holds concurrency x pipeline_depth requests in flight (2 x 8 here)
    on a shadow that never answers, and queues the rest: of 20 GETs, 16 go to its connections and 4
    wait in its queue. The memory budget and the stale sweep bound what waits; this is the bound on
    what is sent without an answer."""

    async def test() -> None:
        server, port = await _hung_server()
        try:
            spec = {"name": "a", "url": f"http://127.0.0.1:{port}", "concurrency": 2, "timeout": 60}
            mirror = Mirror(parse_config({"targets": [spec]}, env={}), None)
            [a] = mirror.targets
            for n in range(20):
                mirror.handle(mirror_message(f"/{n}"))
            await _until(lambda: mirror.target_stats["a"].received == 20 and len(a.queue) == 4)
            assert a.concurrency == 16
            assert mirror.target_stats["a"].pending == 20
        finally:
            server.close()

    asyncio.run(test())


def test_a_reload_keeps_an_unchanged_target_and_still_builds_every_target_after_it() -> None:
    """Reload with the first target unchanged (kept as the same object) and a second one changed
    and a third new: all three run after it, the kept one is the same Target, the changed one a
    successor, and a request reaches each of them."""

    async def test() -> None:
        server, port = await _hung_server()
        try:
            url = f"http://127.0.0.1:{port}"

            def targets(*specs: dict[str, Any]) -> Any:
                specs = tuple({"url": url, "timeout": 60, **spec} for spec in specs)
                return parse_config({"targets": list(specs)}, env={})

            mirror = Mirror(targets({"name": "kept"}, {"name": "changed"}), None)
            kept, changed = mirror.targets
            mirror.apply(targets({"name": "kept"}, {"name": "changed", "timeout": 30}, {"name": "new"}), None)
            assert [target.name for target in mirror.targets] == ["kept", "changed", "new"]
            assert mirror.targets[0] is kept and mirror.targets[1] is not changed
            mirror.handle(mirror_message("/after"))
            names = ("kept", "changed", "new")
            await _until(lambda: all(mirror.target_stats[name].received == 1 for name in names))
        finally:
            server.close()

    asyncio.run(test())


def test_a_loop_header_with_bytes_that_are_not_utf8_is_mirrored_and_counted() -> None:
    """HAProxy hands header blocks over as bytes, and a client's loop header may carry any byte: one
    that is not UTF-8 is not our marker, so the request is mirrored (offered to the target, which
    replaces the header's value) rather than raising in the intake and leaving it with no outcome."""

    async def test() -> None:
        server, port = await _hung_server()
        try:
            spec = {"name": "a", "url": f"http://127.0.0.1:{port}", "timeout": 60}
            mirror = Mirror(parse_config({"targets": [spec]}, env={}), None)
            hdrs = b"host: example\r\nx-spoa-mirror: v1-\xff\xfe\r\n\r\n"
            args = {"arg_method": "GET", "arg_path": "/x", "arg_ver": "1.1", "arg_hdrs": hdrs}
            mirror.handle(Message("mirror", args))
            await _until(lambda: mirror.target_stats["a"].received == 1)
            assert mirror.target_stats["a"].outcomes["loop"] == 0
        finally:
            server.close()

    asyncio.run(test())


def test_the_outgoing_source_address_reaches_every_targets_connections() -> None:
    """`outgoing.address` (the C agent's -I): the shadow sees connections from 127.0.0.2, not the
    kernel's choice of 127.0.0.1, both at start and for a target added by a reload."""
    peers: list[str] = []

    async def test() -> None:
        async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peers.append(writer.get_extra_info("peername")[0])
            await asyncio.sleep(3600)

        server = await asyncio.start_server(record, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:

            def config(*names: str) -> Any:
                targets = [{"name": name, "url": f"http://127.0.0.1:{port}", "timeout": 60} for name in names]
                return parse_config({"outgoing": {"address": "127.0.0.2"}, "targets": targets}, env={})

            mirror = Mirror(config("a"), None)
            mirror.apply(config("a", "b"), None)
            mirror.handle(mirror_message("/x"))
            await _until(lambda: len(peers) == 2)
            assert peers == ["127.0.0.2", "127.0.0.2"]
        finally:
            server.close()

    asyncio.run(test())


def test_a_drained_target_closes_its_connections() -> None:
    """At shutdown a target's drain ends with its pool closed: the shadow sees each connection end
    (EOF) even while its request is unanswered, instead of holding sockets until the process exits."""
    ended: list[bool] = []

    async def test() -> None:
        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            ended.append(await reader.read(1) == b"")

        server = await asyncio.start_server(hold, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            spec = {"name": "a", "url": f"http://127.0.0.1:{port}", "timeout": 60}
            mirror = Mirror(parse_config({"targets": [spec]}, env={}), None)
            mirror.handle(mirror_message("/x"))
            await _until(lambda: mirror.targets[0].pending == 1 and mirror.targets[0].active)
            await mirror.drain(0.1)
            await _until(lambda: ended == [True])
            assert mirror.target_stats["a"].outcomes["shutdown"] == 1
        finally:
            server.close()

    asyncio.run(test())


@pytest.mark.parametrize(
    ("args", "held"),
    [
        ({"arg_body": b"x" * 10, "arg_hdrs": "h" * 5}, 15),  # the C agent's names
        ({"body": b"x" * 10, "hdrs": b"h" * 5}, 15),  # the shipped primary-response message's
        ({"body": "x" * 7, "headers": "h" * 3}, 10),
        ({"arg_body": b"", "body": b"x" * 4, "arg_hdrs": "", "hdrs": "h" * 2}, 6),
        ({"arg_body": b"", "body": b"x" * 4, "arg_hdrs": "h" * 2}, 6),
        ({"arg_body": b"x" * 3, "arg_hdrs": "", "hdrs": "h" * 2}, 5),
        ({"arg_body": 5, "arg_hdrs": None}, 0),  # neither bytes nor text: not counted, never raising
        ({"arg_body": 5, "arg_hdrs": "h" * 2}, 2),
        ({"arg_body": b"x", "arg_hdrs": 7}, 1),
        ({}, 0),
    ],
)
def test_the_intake_counts_a_messages_body_and_headers_under_every_name(
    args: dict[str, Any], held: int
) -> None:
    """The intake's byte bound (16 MiB) charges each message its body and header block, under the C
    agent's argument names and the plain ones the primary-response message uses alike."""
    assert mirror_module._message_bytes(args) == held


def test_a_targets_base_path_is_kept_to_its_last_character() -> None:
    """The URL's path is prefixed to every mirrored path as it is written, whatever letter ends it
    (only a trailing slash goes, so `/v2X/` and `/v2X` both give `/v2X/a`)."""
    for url_path in ("/v2X", "/v2X/"):
        spec = {"name": "a", "url": f"http://127.0.0.1:9{url_path}"}
        [a] = Mirror(parse_config({"targets": [spec]}, env={}), None).targets
        assert a.build(to_request(mirror_message("/a").args)).startswith(b"GET /v2X/a HTTP/1.1\r\n")


def test_the_intake_takes_messages_up_to_its_byte_bound_exactly() -> None:
    """INTAKE_BYTES (16 MiB) is what the intake may hold: two messages filling it to the byte are
    taken in, one byte more is refused and counted queue_full on the target."""

    async def test() -> None:
        server, port = await _hung_server()
        try:
            spec = {"name": "a", "url": f"http://127.0.0.1:{port}", "timeout": 60}
            mirror = Mirror(parse_config({"targets": [spec]}, env={}), None)
            half = mirror_module.INTAKE_BYTES // 2
            headers = "host: example\r\n\r\n"
            body = b"x" * (half - len(headers))
            message = Message("mirror", {"arg_method": "POST", "arg_path": "/x", "arg_ver": "1.1",
                                         "arg_hdrs": headers, "arg_body": body})  # fmt: skip
            one_more = Message("mirror", {**message.args, "arg_body": b"x"})
            results = [mirror.handle(message), mirror.handle(message), mirror.handle(one_more)]
            assert results[0] == results[1] != results[2] == mirror_module.ACK_REFUSED
            assert mirror.target_stats["a"].outcomes["queue_full"] == 1
        finally:
            server.close()

    asyncio.run(test())


def test_a_truncated_body_redacted_in_the_worker_goes_out_marked(
    run_asyncio: Callable[[AsyncTest], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`truncated_body: send_marked`: a body HAProxy cut short (Content-Length larger than what it
    sent) and over INLINE_BODY_LIMIT (1 KiB here), so redacted in the worker process, reaches the
    shadow with X-Mirror-Truncated, as a small one redacted inline does."""
    monkeypatch.setattr(mirror_module, "INLINE_BODY_LIMIT", 1024)
    cut = b'{"password": "hunter2", "fill": "' + b"x" * 2048
    headers = [("Host", "e"), ("Content-Type", "application/json"), ("Content-Length", str(len(cut) + 100))]
    with ShadowServer() as shadow:

        async def test() -> None:
            config = {"truncated_body": "send_marked", "targets": [target("a", shadow)]}
            async with running(config) as (app, _, peer):
                stats = app.mirror.target_stats["a"]
                await send_and_ack(peer, 1, [request_message("/cut", headers, cut)])
                assert await settled(stats, 1) == {"sent_2xx": 1}

        run_asyncio(test)
        [request] = shadow.requests
        assert request.header("X-Mirror-Truncated") is not None
        assert b"hunter2" not in request.body


def test_a_head_with_a_body_redacted_in_the_worker_is_still_sent_as_a_head(
    run_asyncio: Callable[[AsyncTest], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A HEAD whose body is over INLINE_BODY_LIMIT (1 KiB here) is redacted in the worker and sent
    as a HEAD: its response has a Content-Length and no body, so the GET after it on the same
    connection is answered too (without the HEAD flag the pool would read the GET's response as the
    HEAD's body)."""
    monkeypatch.setattr(mirror_module, "INLINE_BODY_LIMIT", 1024)
    body = b"x" * 2048
    with ShadowServer() as shadow:

        async def test() -> None:
            spec = target("a", shadow, concurrency=1, timeout=5)
            async with running({"targets": [spec]}) as (app, _, peer):
                stats = app.mirror.target_stats["a"]
                head = request_message("/head", [("Host", "h"), ("Content-Length", str(len(body)))], body,
                                       method="HEAD")  # fmt: skip
                await send_and_ack(peer, 1, [head])
                assert await settled(stats, 1) == {"sent_2xx": 1}
                await send_and_ack(peer, 2, [mirror_message("/after")])
                assert await settled(stats, 2) == {"sent_2xx": 2}

        run_asyncio(test)
        assert [(r.method, r.target, r.connection_id) for r in shadow.requests] == [
            ("HEAD", "/head", 1), ("GET", "/after", 1)
        ]  # fmt: skip


# While the redaction worker holds a body ---------------------------------------------------------------


@asynccontextmanager
async def worker_held() -> AsyncIterator[ProcessPoolExecutor]:
    """The redaction worker busy with a job of the test's own (tests/support/worker_gate.py) until
    the block ends: the bodies the mirror hands the worker meanwhile wait behind it, still in the
    worker's hands (in flight, their bytes held) for as long as the block runs. Killing the worker
    inside the block fails each of them with BrokenProcessPool, as the OOM killer would."""
    entered = asyncio.Event()
    gate_open = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        entered.set()
        await gate_open.wait()
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    executor = mirror_module._redaction_executor()
    job = asyncio.wrap_future(executor.submit(wait_at_gate, server.sockets[0].getsockname()[1]))
    try:
        await asyncio.wait_for(entered.wait(), SETTLE)  # the worker is in our job now
        yield executor
    finally:
        gate_open.set()
        with contextlib.suppress(BrokenProcessPool):  # killed inside the block
            await asyncio.wait_for(job, SETTLE)
        server.close()


def _large_json(password: str) -> bytes:
    return b'{"password": "' + password.encode() + b'", "fill": "' + b"x" * 2048 + b'"}'


JSON = [("Host", "e"), ("Content-Type", "application/json")]


def test_bodies_the_worker_holds_when_it_is_killed_are_each_counted_error_internal_once(
    run_asyncio: Callable[[AsyncTest], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two bodies over INLINE_BODY_LIMIT (1 KiB here) wait in the redaction worker behind a job of
    the test's own when the worker is SIGKILLed (the kernel's OOM killer would): each is counted
    error_internal once (two in all), the dead pool is replaced, and the next large body is redacted
    by a new worker and sent."""
    monkeypatch.setattr(mirror_module, "INLINE_BODY_LIMIT", 1024)
    with ShadowServer() as shadow:

        async def test() -> None:
            async with running({"targets": [target("a", shadow, concurrency=1)]}) as (app, _, peer):
                stats = app.mirror.target_stats["a"]
                [a] = app.mirror.targets
                with capture_logs() as logs:
                    async with worker_held() as worker:
                        bodies = [request_message(f"/{n}", JSON, _large_json("hunter2")) for n in (1, 2)]
                        await send_and_ack(peer, 1, bodies)
                        await wait_until(lambda: a.offloaded == 2, SETTLE)
                        [pid] = list(worker._processes)
                        os.kill(pid, signal.SIGKILL)
                        assert await settled(stats, 2) == {"error_internal": 2}
                died = [entry["event"] for entry in logs if entry["event"].startswith("mirror.")]
                assert died == ["mirror.redaction_worker_died"]  # the second one throttled
                assert mirror_module._executor is not worker
                await send_and_ack(peer, 2, [request_message("/3", JSON, _large_json("hunter3"))])
                assert await settled(stats, 3) == {"error_internal": 2, "sent_2xx": 1}
                assert stats.redactions == {"json:default": 1}
                assert (a.held_bytes(), a.offloaded, a.pending) == (0, 0, 0)

        run_asyncio(test)
        [request] = shadow.requests
        assert request.target == "/3" and b"hunter3" not in request.body


def test_a_bug_of_ours_on_a_body_back_from_the_worker_is_counted_error_internal_once_per_body(
    run_asyncio: Callable[[AsyncTest], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two large bodies come back redacted from the worker to a builder that raises (a bug of ours,
    planted by replacing the real target's builder: the accounting is what is under test): each is
    counted error_internal once, the crash is logged, and with the builder back the next one is sent."""
    monkeypatch.setattr(mirror_module, "INLINE_BODY_LIMIT", 1024)
    with ShadowServer() as shadow:

        async def test() -> None:
            async with running({"targets": [target("a", shadow)]}) as (app, _, peer):
                stats = app.mirror.target_stats["a"]
                [a] = app.mirror.targets
                build = a.build

                def crash(*args: Any) -> bytes:
                    raise RuntimeError("a bug of ours")

                a.build = crash
                with capture_logs() as logs:
                    bodies = [request_message(f"/{n}", JSON, _large_json("hunter2")) for n in (1, 2)]
                    await send_and_ack(peer, 1, bodies)
                    assert await settled(stats, 2) == {"error_internal": 2}
                crashed = [entry for entry in logs if entry["event"].startswith("mirror.")]
                assert [(e["event"], e["error"]) for e in crashed] == [
                    ("mirror.redaction_crashed", "RuntimeError('a bug of ours')")
                ]  # fmt: skip
                a.build = build
                await send_and_ack(peer, 2, [request_message("/3", JSON, _large_json("hunter3"))])
                assert await settled(stats, 3) == {"error_internal": 2, "sent_2xx": 1}
                assert (a.held_bytes(), a.offloaded, a.pending) == (0, 0, 0)

        run_asyncio(test)
        assert [r.target for r in shadow.requests] == ["/3"]


def test_a_body_back_from_the_worker_that_cannot_be_sent_is_counted_and_logged_by_its_reason(
    run_asyncio: Callable[[AsyncTest], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two bodies over INLINE_BODY_LIMIT (1 KiB here) the worker cannot make sendable: a Brotli one,
    which redaction cannot look into (Unredactable, raised in the worker), and one with a header name
    no request may carry (WireError, raised building it after the worker redacted it). Each is
    counted by its own reason and logged with it, as the same requests are when redacted inline."""
    monkeypatch.setattr(mirror_module, "INLINE_BODY_LIMIT", 1024)
    brotli = request_message("/br", [("Host", "h"), ("Content-Encoding", "br")], b"\x1b" * 2048)
    bad_name = request_message("/bad", [("Host", "h"), ("Bad Name", "x")], b"x" * 2048)
    with ShadowServer() as shadow:

        async def test() -> None:
            async with running({"targets": [target("a", shadow)]}) as (app, _, peer):
                stats = app.mirror.target_stats["a"]
                with capture_logs() as logs:
                    await send_and_ack(peer, 1, [brotli, bad_name, mirror_message("/ok")])
                    assert await settled(stats, 3) == {"unredactable": 1, "invalid": 1, "sent_2xx": 1}
                dropped = [entry for entry in logs if entry["event"].startswith("mirror.")]
                assert sorted((e["event"], e["reason"]) for e in dropped) == [
                    ("mirror.invalid_request", "bad_header"), ("mirror.unredactable", "encoding")
                ]  # fmt: skip

        run_asyncio(test)
        assert [r.target for r in shadow.requests] == ["/ok"]


def _one_target_in_64_kib(port: int) -> Mirror:
    """The agent's memory_budget at its minimum, 64 KiB, and one target, whose share is all of it;
    one request in flight at a time, the next one queued."""
    spec = {"name": "a", "url": f"http://127.0.0.1:{port}", "concurrency": 1, "pipeline_depth": 1,
            "timeout": 60}  # fmt: skip
    return Mirror(parse_config({"memory_budget": 64 * KiB, "targets": [spec]}, env={}), None)


@asynccontextmanager
async def _one_hung_target_in_64_kib() -> AsyncIterator[tuple[Mirror, Any, Any, int]]:
    """_one_target_in_64_kib on a shadow that never answers: the mirror, its target, the target's
    stats and the shadow's port."""
    server, port = await _hung_server()
    try:
        mirror = _one_target_in_64_kib(port)
        [target] = mirror.targets
        yield mirror, target, mirror.target_stats["a"], port
    finally:
        server.close()


@pytest.mark.parametrize("over", [0, 1])
def test_a_body_in_the_worker_is_held_in_the_budget_of_what_comes_after_it_to_the_byte(
    over: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large body waits in the redaction worker (behind a job of the test's own), a hung shadow.
    Its bytes are held, by the target and in the agent's sum, while it is there. Sized to leave room
    for exactly one GET (over 0), the GET is sent and 64 KiB are held to the byte; one byte larger
    (over 1), the GET is refused as budget_exceeded."""
    monkeypatch.setattr(mirror_module, "INLINE_BODY_LIMIT", 1024)

    async def test() -> None:
        async with _one_hung_target_in_64_kib() as (mirror, a, stats, _):
            get = mirror_message("/get")
            get_size = len(a.build(to_request(get.args)))
            body = 64 * KiB - get_size + over
            async with worker_held():
                mirror.handle(_post("/large", body))
                await _until(lambda: a.offloaded == 1)
                assert (a.offloaded_bytes, a.held_bytes(), mirror.budget.used()) == (body, body, body)
                mirror.handle(get)
                await _until(lambda: stats.received == 2)
                held = body + get_size * (1 - over)
                assert (a.held_bytes(), mirror.budget.used()) == (held, held)
                assert (stats.bytes_sent, stats.outcomes["budget_exceeded"]) == ((get_size, 0), (0, 1))[over]
            await _until(lambda: a.offloaded == 0)

    loop_runner("asyncio", TEST_DEADLINE)(test)


@pytest.mark.parametrize("over", [0, 1])
def test_the_budget_check_before_the_worker_sums_queue_pool_and_worker_to_the_byte(
    over: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before a large body goes to the redaction worker, what the target holds is summed: a GET in
    flight at a hung shadow (its pool), one queued behind it, a large body already in the worker
    (behind a job of the test's own). A second large body that brings the sum to 64 KiB to the byte
    (over 0) goes to the worker too; one byte larger (over 1) it is refused as budget_exceeded before
    the worker ever sees it."""
    monkeypatch.setattr(mirror_module, "INLINE_BODY_LIMIT", 1024)

    async def test() -> None:
        async with _one_hung_target_in_64_kib() as (mirror, a, stats, _):
            sent, queued = mirror_message("/sent"), mirror_message("/queued")
            sent_size, queued_size = (len(a.build(to_request(m.args))) for m in (sent, queued))
            first = 4 * KiB
            async with worker_held():
                for message in (_post("/large/1", first), sent, queued):
                    mirror.handle(message)
                await _until(lambda: a.offloaded == 1 and len(a.queue) == 1)
                terms = (a.queued_bytes, a.pool.bytes_held, a.offloaded_bytes)
                assert terms == (queued_size, sent_size, first)
                second = 64 * KiB - sum(terms) + over
                mirror.handle(_post("/large/2", second))
                await _until(lambda: stats.received == 4)
                held = sum(terms) + second * (1 - over)
                assert (a.held_bytes(), mirror.budget.used()) == (held, held)
                assert (a.offloaded, stats.outcomes["budget_exceeded"]) == ((2, 0), (1, 1))[over]
            await _until(lambda: a.offloaded == 0)

    loop_runner("asyncio", TEST_DEADLINE)(test)


def test_a_target_replaced_while_its_stale_sweep_is_set_still_drains_and_closes_its_pool() -> None:
    """concurrency 1, a shadow that never answers: /held in flight, /queued waiting (so the target's
    stale sweep is set). A reload changing the timeout (so a new pool) hands /queued to the new
    target and cancels the old one's sweep; the old target, retired with 0.05 s to drain, counts /held
    as shutdown and closes its pool (the shadow sees that connection end), which frees the slot:
    /queued goes out on the new target's pool."""
    seen: list[str] = []
    ended: list[str] = []

    async def test() -> None:
        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            path = (await reader.readuntil(b"\r\n\r\n")).split(b" ")[1].decode()
            seen.append(path)
            if await reader.read(1) == b"":
                ended.append(path)

        server = await asyncio.start_server(hold, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:

            def config(timeout: float) -> Any:
                spec = {"name": "a", "url": f"http://127.0.0.1:{port}", "concurrency": 1, "pipeline_depth": 1,
                        "timeout": timeout}  # fmt: skip
                return parse_config({"drain_timeout": 0.05, "targets": [spec]}, env={})

            mirror = Mirror(config(60), None)
            [old] = mirror.targets
            mirror.handle(mirror_message("/held"))
            mirror.handle(mirror_message("/queued"))
            await _until(lambda: len(old.queue) == 1 and seen == ["/held"])
            assert old._stale_sweep is not None
            mirror.apply(config(30), None)
            [new] = mirror.targets
            assert new is not old and len(new.queue) == 1
            await _until(lambda: not mirror.retired and seen == ["/held", "/queued"])
            assert ended == ["/held"]
            stats = mirror.target_stats["a"]
            assert ({k: v for k, v in stats.outcomes.items() if v}, stats.pending) == ({"shutdown": 1}, 1)
        finally:
            server.close()

    loop_runner("asyncio", TEST_DEADLINE)(test)


def test_a_body_in_the_worker_at_a_reload_stays_in_the_budget_until_it_settles(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 40 KiB body waits in the redaction worker (behind a job of the test's own) when a reload
    replaces its target with one that keeps the pool (only max_queue_age changed). The body is the
    retired target's until it settles, so the new target's share leaves it out: a second 40 KiB body
    is refused as budget_exceeded and the agent never holds more than its 64 KiB. (MemoryBudget.update
    once left a retired target out whole when its pool was kept: the new share was all 64 KiB again
    and the agent held 80 KiB.)"""
    monkeypatch.setattr(mirror_module, "INLINE_BODY_LIMIT", 1024)

    async def test() -> None:
        async with _one_hung_target_in_64_kib() as (mirror, old, stats, port):
            async with worker_held():
                mirror.handle(_post("/large/1", 40 * KiB))
                await _until(lambda: old.offloaded == 1)
                spec = {"name": "a", "url": f"http://127.0.0.1:{port}", "concurrency": 1,
                        "pipeline_depth": 1, "timeout": 60, "max_queue_age": 30}  # fmt: skip
                mirror.apply(parse_config({"memory_budget": 64 * KiB, "targets": [spec]}, env={}), None)
                [new] = mirror.targets
                assert new is not old and new.pool is old.pool and mirror.budget.retired == [old]
                mirror.handle(_post("/large/2", 40 * KiB))
                await _until(lambda: stats.received == 2)
                assert stats.outcomes["budget_exceeded"] == 1, stats.outcomes
                assert 40 * KiB <= mirror.budget.used() <= 64 * KiB
            await _until(lambda: old.offloaded == 0)

    loop_runner("asyncio", TEST_DEADLINE)(test)


# Capture targets recording responses, the compare log, the loop marker, and shares at a reload ------


def test_a_capture_target_recording_responses_has_the_ack_ask_for_them_and_records_them(
    tmp_path: Path,
) -> None:
    """No compare section, a plain target on a hung shadow and a capture target with
    `capture.responses`: the ACK of a mirrored request asks HAProxy for the primary's response
    (txn.compare), and the capture target's response message (its name, not compare's) is taken
    and written after the request it answers, with the request's id."""

    async def test() -> None:
        server, port = await _hung_server()
        try:
            plain = {"name": "plain", "url": f"http://127.0.0.1:{port}", "timeout": 60}
            recorder = {"name": "rec", "capture": {"directory": str(tmp_path), "responses": True,
                                                   "response_message": "recorded-response"}}  # fmt: skip
            mirror = Mirror(parse_config({"targets": [plain, recorder]}, env={}), None)
            rec = mirror.targets[1]
            assert mirror.recorders == [rec]
            ack = mirror.handle(request_message("/orders/1", [("Host", "app")], b"", "GET", unique_id="id-1"))
            assert ack == mirror_module.ACK_ACCEPTED_COMPARE
            response = {"unique_id": "id-1", "status": 201, "hdrs": b"content-type: text/plain\r\n\r\n",
                        "body": b"made"}  # fmt: skip
            assert mirror.handle(Message("recorded-response", response)) == mirror_module.ACK_ACCEPTED
            await wait_until(lambda: rec.capture_stats.responses == {"written": 1}, SETTLE)
            await rec.drain(asyncio.get_running_loop().time() + 5)
        finally:
            server.close()

    loop_runner("asyncio", TEST_DEADLINE)(test)
    errors: list[gor.FormatError] = []
    captured = list(gor.merge(gor.capture_files([str(tmp_path)]), errors.append))
    assert errors == [] and [p.kind for p in captured] == [gor.REQUEST, gor.RESPONSE]
    assert captured[0].id == captured[1].id == payload_id("id-1")
    response = captured[1].message
    assert response.startswith(b"HTTP/1.1 201 Created\r\n") and response.endswith(b"\r\n\r\nmade")


def test_a_compare_section_is_logged_once_with_its_candidates_baseline_and_response_message(
    run_asyncio: Callable[[AsyncTest], None],
) -> None:
    """compare.enabled, one event when a compare section comes in, naming what is compared and the
    message the primary's responses arrive in (what an operator checks HAProxy's config against)."""
    targets = [{"name": name, "url": "http://127.0.0.1:9"} for name in ("new", "old")]
    compare = {"candidates": ["new"], "baseline": "old", "response_message": "primary-response",
               "table": {"max_bytes": "1MiB", "max_entries": 100}}  # fmt: skip

    async def test() -> None:
        with capture_logs() as logs:
            Mirror(parse_config({"targets": targets, "compare": compare}, env={}), None)
        enabled = [entry for entry in logs if entry["event"] == "compare.enabled"]
        assert enabled == [{"event": "compare.enabled", "log_level": "info", "candidates": ["new"],
                            "baseline": "old", "response_message": "primary-response"}]  # fmt: skip

    run_asyncio(test)


def test_the_loop_marker_under_a_given_key_is_the_same_in_every_version() -> None:
    """Replicas given the same `secrets` key recognise each other's mirrors, also in a rolling
    upgrade: the marker under a key is pinned here (HMAC-SHA-512 of "spoa-mirror loop marker", its
    first 32 hex digits), and a change to it must be a deliberate one (a new "v2-" prefix)."""
    config = parse_config({"targets": [{"name": "a", "url": "http://127.0.0.1:9"}]}, env={})
    mirror = Mirror(config, bytes(range(32)))
    assert mirror.loop_value == b"v1-d8fbd6c8b2b4c17ca13f02340eccc364"


def test_two_retired_targets_pools_each_count_against_the_share_of_their_successor() -> None:
    """Two targets on a hung shadow each hold a request in their own pool when a reload replaces
    both with a third (a new pool): the third's share is the agent's budget less both pools' bytes,
    not less one of them."""

    async def test() -> None:
        server, port = await _hung_server()
        try:

            def spec(name: str) -> dict[str, Any]:
                return {"name": name, "url": f"http://127.0.0.1:{port}", "concurrency": 1, "timeout": 60}

            config = {"memory_budget": 256 * KiB, "drain_timeout": 60}
            mirror = Mirror(parse_config({**config, "targets": [spec("a"), spec("b")]}, env={}), None)
            a, b = mirror.targets
            mirror.handle(_post("/1", 10 * KiB))
            await _until(lambda: a.pool.bytes_held > 10 * KiB and b.pool.bytes_held > 10 * KiB)
            mirror.apply(parse_config({**config, "targets": [spec("c")]}, env={}), None)
            [c] = mirror.targets
            assert mirror.retired == [a, b] and c.pool is not a.pool and c.pool is not b.pool
            assert c.share == 256 * KiB - a.pool.bytes_held - b.pool.bytes_held
        finally:
            server.close()

    loop_runner("asyncio", TEST_DEADLINE)(test)


def test_a_replay_builds_its_one_targets_budget_from_memory_budget_alone(tmp_path: Path) -> None:
    """`spoa-mirror replay` has no Mirror: it builds a MemoryBudget from memory_budget and gives its
    one target the whole of it as its share before sending what the capture holds."""
    capture = tmp_path / "requests.gor"
    message = b"GET /replayed HTTP/1.1\r\nHost: app.example\r\n\r\n"
    capture.write_bytes(gor.encode(gor.REQUEST, f"{1:024x}", 1_700_000_000_000_000_000, 0, message))
    with ShadowServer() as shadow:
        summary = asyncio.run(replay(ReplayOptions(files=[str(capture)], to=shadow.url)))
    outcomes = {name: count for name, count in summary.outcomes.items() if count}
    assert (summary.read, outcomes) == (1, {"sent_2xx": 1})
    assert [r.target for r in shadow.requests] == ["/replayed"]

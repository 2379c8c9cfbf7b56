"""The agent's structural promises, checked in-process over real sockets.

The production wiring (`App`: `spoe.Agent` + `Mirror` + its targets and pools) is served on
127.0.0.1 to the scripted HAProxy peer, and replays go to recording shadow servers. Order is
observed, not timed: the agent's SPOP writes are recorded as they are handed to the transport
(tests/support/recording.py), beside the calls into the pipeline. Every test builds its own agent,
shadows and counters, so each passes alone and in any order.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from spoa_mirror import mirror as mirror_module
from spoa_mirror.accounting import LATENCY_BUCKETS, Histogram, TargetStats
from spoa_mirror.app import App
from spoa_mirror.config import parse_config
from spoa_mirror.message import to_request
from spoe import Message
from spoe.frames import FrameType
from tests.support.live_agent import LOOPS, TEST_DEADLINE, AsyncTest, Served, loop_runner, serving, wait_until
from tests.support.recording import record_writes
from tests.support.shadow import ShadowServer, self_signed_tls
from tests.support.spop_peer import FrameParser, TcpPeer, notify

SETTLE = 5.0  # hang bound: every wait below normally ends in milliseconds


@pytest.fixture(params=LOOPS)
def run(request: pytest.FixtureRequest) -> Callable[[AsyncTest], None]:
    return loop_runner(request.param, TEST_DEADLINE)


def reload(app: App, config: dict[str, Any]) -> None:
    """What SIGHUP does after reading the file: the mirror takes the new config in place."""
    app.mirror.apply(parse_config(config, env={}), None)


def mirror_message(path: str = "/x", *, body: bytes = b"", headers: str = "host: example\r\n") -> Message:
    method = "POST" if body else "GET"
    args: dict[str, Any] = {
        "arg_method": method,
        "arg_path": path,
        "arg_ver": "1.1",
        "arg_hdrs": headers + (f"content-length: {len(body)}\r\n" if body else "") + "\r\n",
        "arg_body": body,
    }
    return Message("mirror", args)


def target(name: str, shadow: ShadowServer, **options: Any) -> dict[str, Any]:
    """With `concurrency` given, one request per connection (pipeline_depth 1, unless given too), so
    the tests' counts of requests in flight and queued are `concurrency`'s."""
    if "concurrency" in options:
        options.setdefault("pipeline_depth", 1)
    return {"name": name, "url": shadow.url, **options}


@asynccontextmanager
async def running(config: dict[str, Any]) -> AsyncIterator[tuple[App, Served, TcpPeer]]:
    """The agent as the CLI wires it, serving one handshaken HAProxy peer."""
    app = App(parse_config(config, env={}), config_path=None, overrides={})
    async with serving(app.agent) as served:
        peer = await served.ready_peer()
        try:
            yield app, served, peer
        finally:
            await app.mirror.drain(0.1)


async def settled(stats: TargetStats, received: int) -> dict[str, int]:
    """The outcomes once `received` requests reached the target and none is pending."""
    await wait_until(lambda: stats.received == received and stats.pending == 0, SETTLE)
    assert stats.balanced()
    return {outcome: count for outcome, count in stats.outcomes.items() if count}


async def send_and_ack(peer: TcpPeer, frame_id: int, messages: list[Message]) -> None:
    await peer.send(notify(1, frame_id, messages))
    ack = await peer.recv_frame()
    assert (ack.type, ack.frame_id) == (FrameType.ACK, frame_id)


# The ACK comes first -----------------------------------------------------------------------------


def test_ack_is_handed_to_the_transport_before_any_pipeline_stage_runs(
    run: Callable[[AsyncTest], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: the agent ACKs at once and replays after. Recorded in order: each write of the
    agent's SPOP side (with the frames it holds and the intake's length at that moment) and each
    call into a target. The ACK must be written while the request still waits in the intake, and
    before any target sees it; the replay then reaches the shadow."""
    events: list[tuple[str, Any]] = []
    app_box: list[App] = []

    def on_write(data: bytes) -> None:
        frames = FrameParser().feed(data)
        waiting = len(app_box[0].mirror._intake) if app_box else None  # None: still in the handshake
        events.append(("write", ([frame.type for frame in frames], waiting)))

    record_writes(monkeypatch, on_write)

    with ShadowServer() as shadow:

        async def test() -> None:
            async with running({"targets": [target("a", shadow)]}) as (app, _, peer):
                app_box.append(app)
                for each in app.mirror.targets:
                    offer = each.offer

                    def recording_offer(req: Any, offer: Callable[[Any], None] = offer) -> None:
                        events.append(("offer", req.path))
                        offer(req)

                    each.offer = recording_offer  # type: ignore[method-assign]
                await send_and_ack(peer, 1, [mirror_message("/first")])
                await wait_until(lambda: len(shadow.requests) == 1, SETTLE)

        app_box.clear()
        run(test)

    writes = [(index, what) for index, (kind, what) in enumerate(events) if kind == "write"]
    ack_writes = [index for index, (frame_types, _) in writes if FrameType.ACK in frame_types]
    offers = [index for index, (kind, _) in enumerate(events) if kind == "offer"]
    assert len(ack_writes) == 1 and len(offers) == 1, events
    assert ack_writes[0] < offers[0], events
    assert events[ack_writes[0]][1] == ([FrameType.ACK], 1), "the ACK went out after the intake ran"
    assert shadow.requests[0].target == "/first"


def test_agent_hello_and_each_ack_are_written_in_one_call(
    run: Callable[[AsyncTest], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """HAProxy 3.2+ resets a connection whose AGENT-HELLO comes in several TCP segments: each
    frame must be handed to the transport whole, in one `write`. Counted at the transport, so a
    frame split over two writes fails however the kernel happens to join the segments."""
    writes: list[bytes] = []
    record_writes(monkeypatch, writes.append)

    with ShadowServer() as shadow:

        async def test() -> None:
            async with running({"targets": [target("a", shadow)]}) as (_, _, peer):
                assert len(writes) == 1, writes  # the handshake: one write
                for frame_id in (1, 2, 3):
                    await send_and_ack(peer, frame_id, [mirror_message(f"/{frame_id}")])
                    assert len(writes) == 1 + frame_id, writes

        run(test)

    parser = FrameParser()
    frames_per_write = [[frame.type for frame in parser.feed(data)] for data in writes]
    acks = [[FrameType.ACK]] * 3
    assert frames_per_write == [[FrameType.AGENT_HELLO], *acks, [FrameType.AGENT_DISCONNECT]]  # at stop
    assert not parser.buffer, "a write ended inside a frame"


# Every request gets exactly one outcome per target ---------------------------------------------


def test_intake_overflow_counts_queue_full_on_every_target(
    run_asyncio: Callable[[AsyncTest], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond INTAKE_LIMIT waiting requests, HAProxy sends faster than the pipeline drains: the
    excess is dropped as queue_full on each target, and still ACKed. The limit (10,000) is made 2
    here; five messages in one NOTIFY all reach the handler before the intake runs."""
    monkeypatch.setattr(mirror_module, "INTAKE_LIMIT", 2)
    with ShadowServer() as a, ShadowServer() as b:

        async def test() -> None:
            config = {"targets": [target("a", a), target("b", b)]}
            async with running(config) as (app, _, peer):
                await send_and_ack(peer, 1, [mirror_message(f"/{n}") for n in range(5)])
                for name in ("a", "b"):
                    outcomes = await settled(app.mirror.target_stats[name], 5)
                    assert outcomes == {"sent_2xx": 2, "queue_full": 3}, (name, outcomes)
                assert app.mirror.messages.mirrored == 5

        run_asyncio(test)
        assert [r.target for r in a.requests] == [r.target for r in b.requests] == ["/0", "/1"]


def test_loop_marker_counts_loop_on_every_target(run_asyncio: Callable[[AsyncTest], None]) -> None:
    """A request that carries the agent's own loop header came from a mirror: never replayed,
    counted `loop` once on each target."""
    with ShadowServer() as a, ShadowServer() as b:

        async def test() -> None:
            config = {"targets": [target("a", a), target("b", b)]}
            async with running(config) as (app, _, peer):
                marker = app.mirror.loop_value.decode()
                looped = mirror_message("/looped", headers=f"host: example\r\nX-Spoa-Mirror: {marker}\r\n")
                await send_and_ack(peer, 1, [looped, mirror_message("/fresh")])
                for name in ("a", "b"):
                    outcomes = await settled(app.mirror.target_stats[name], 2)
                    assert outcomes == {"loop": 1, "sent_2xx": 1}, (name, outcomes)

        run_asyncio(test)
        assert [r.target for r in a.requests] == [r.target for r in b.requests] == ["/fresh"]


def test_drain_counts_what_is_left_as_shutdown(run_asyncio: Callable[[AsyncTest], None]) -> None:
    """SIGTERM's drain: a hung shadow holds 2 requests in flight (concurrency 2) and 3 queued, for
    each of two targets; at the deadline all are counted `shutdown`, nothing is left pending, and
    drain says so."""
    with ShadowServer(mode="hang") as shadow:

        async def test() -> None:
            config = {"targets": [target("a", shadow, concurrency=2, timeout=60),
                                  target("b", shadow, concurrency=2, timeout=60)]}  # fmt: skip
            async with running(config) as (app, _, peer):
                await send_and_ack(peer, 1, [mirror_message(f"/{n}") for n in range(5)])
                await wait_until(lambda: len(shadow.requests) == 4, SETTLE)
                stats = app.mirror.target_stats["a"]
                assert (stats.received, stats.pending) == (5, 5)
                assert await app.mirror.drain(0.05) == (0, 10)
                assert await settled(stats, 5) == {"shutdown": 5}
                assert await settled(app.mirror.target_stats["b"], 5) == {"shutdown": 5}

        run_asyncio(test)


def test_queue_size_bounds_what_waits_for_a_busy_target(run_asyncio: Callable[[AsyncTest], None]) -> None:
    """concurrency 2, queue_size 2, a hung shadow: of six requests two are in flight, two wait in
    the queue and two are queue_full at once; memory is bounded by the queue, not by the load."""
    with ShadowServer(mode="hang") as shadow:

        async def test() -> None:
            config = {"targets": [target("a", shadow, concurrency=2, queue_size=2, timeout=60)]}
            async with running(config) as (app, _, peer):
                await send_and_ack(peer, 1, [mirror_message(f"/{n}") for n in range(6)])
                stats = app.mirror.target_stats["a"]
                await wait_until(lambda: stats.received == 6 and len(shadow.requests) == 2, SETTLE)
                assert (stats.pending, stats.outcomes["queue_full"]) == (4, 2)
                assert len(app.mirror.targets[0].queue) == 2
                assert stats.balanced()

        run_asyncio(test)


def test_reload_retires_old_targets_and_counts_their_leftovers(
    run_asyncio: Callable[[AsyncTest], None],
) -> None:
    """SIGHUP replaces target a by b: a's queue drains in the background until drain_timeout,
    what it could not send is counted `shutdown` on a, and new requests go to b only."""
    with ShadowServer(mode="hang") as old, ShadowServer() as new:

        async def test() -> None:
            config = {"targets": [target("a", old, concurrency=1, timeout=60)]}
            async with running(config) as (app, _, peer):
                await send_and_ack(peer, 1, [mirror_message(f"/{n}") for n in range(3)])
                await wait_until(lambda: len(old.requests) == 1, SETTLE)
                reloaded = parse_config({"targets": [target("b", new)], "drain_timeout": 0.05}, env={})
                app.mirror.apply(reloaded, None)
                assert [t.name for t in app.mirror.targets] == ["b"]
                await wait_until(lambda: not app.mirror.retired, SETTLE)
                assert await settled(app.mirror.target_stats["a"], 3) == {"shutdown": 3}
                await send_and_ack(peer, 2, [mirror_message("/after")])
                assert await settled(app.mirror.target_stats["b"], 1) == {"sent_2xx": 1}
                assert app.mirror.target_stats["a"].received == 3

        run_asyncio(test)
        assert [r.target for r in new.requests] == ["/after"]


@pytest.mark.parametrize(
    "change", [{"headers": {"X-Env": "b"}}, {"timeout": 30}], ids=["pool kept", "new pool"]
)
def test_a_changed_target_takes_over_the_queue_and_the_slot_of_the_one_it_replaces(
    run_asyncio: Callable[[AsyncTest], None], change: dict[str, Any]
) -> None:
    """A reload that changes target a while one request is in flight (concurrency 1, a shadow that
    answers after 1 s) and two wait: the new a takes the two queued and the slot, so the shadow still
    sees one request at a time, in order, the new a's last; every request is counted once on a's one
    set of counters."""
    with ShadowServer(mode="delay", delay=1.0) as shadow:

        async def test() -> None:
            before = target("a", shadow, concurrency=1, timeout=60)
            async with running({"targets": [before], "drain_timeout": 30}) as (app, _, peer):
                await send_and_ack(peer, 1, [mirror_message(f"/old/{n}") for n in range(3)])
                old = app.mirror.targets[0]
                await wait_until(lambda: len(shadow.requests) == 1 and len(old.queue) == 2, SETTLE)
                reloaded = parse_config({"targets": [{**before, **change}], "drain_timeout": 30}, env={})
                app.mirror.apply(reloaded, None)
                [new] = app.mirror.targets
                assert new is not old and (len(new.queue), len(old.queue)) == (2, 0)
                await send_and_ack(peer, 2, [mirror_message("/new")])
                stats = app.mirror.target_stats["a"]
                assert await settled(stats, 4) == {"sent_2xx": 4}
                await wait_until(lambda: not app.mirror.retired, SETTLE)
                assert (new.held_bytes(), new.pending, stats.pending) == (0, 0, 0)
                assert stats.bytes_sent == sum(len(r.raw) for r in shadow.requests)

        run_asyncio(test)
        assert [r.target for r in shadow.requests] == ["/old/0", "/old/1", "/old/2", "/new"]
        if "headers" in change:
            assert [r.header("X-Env") for r in shadow.requests] == [None, None, None, "b"]


def test_what_a_retired_target_held_is_given_back_to_the_agents_budget(
    run_asyncio: Callable[[AsyncTest], None],
) -> None:
    """memory_budget 1 MiB: a reload retires target a while it holds a request in flight, so b's
    share of the budget is 1 MiB less what a holds; once a has drained, b's share is the whole
    budget again (its requests would otherwise be refused as budget_exceeded sooner than needed)."""
    with ShadowServer(mode="hang") as shadow:

        async def test() -> None:
            hung = target("a", shadow, concurrency=1, timeout=60)
            config = {"memory_budget": "1MiB", "targets": [hung]}
            async with running(config) as (app, _, peer):
                await send_and_ack(peer, 1, [mirror_message("/held", body=b"x" * 4096)])
                [a] = app.mirror.targets
                await wait_until(lambda: a.held_bytes() > 4096, SETTLE)
                held = a.held_bytes()
                reloaded = {"memory_budget": "1MiB", "drain_timeout": 0.05, "targets": [target("b", shadow)]}
                reload(app, reloaded)
                [b] = app.mirror.targets
                assert b.share == 1024 * 1024 - held
                await wait_until(lambda: not app.mirror.retired, SETTLE)
                assert (b.share, app.mirror.budget.used()) == (1024 * 1024, 0)

        run_asyncio(test)


def test_requests_queued_longer_than_max_queue_age_are_dropped_as_stale(
    run_asyncio: Callable[[AsyncTest], None],
) -> None:
    """A hung shadow holds the one slot; what waits behind it past max_queue_age is counted stale:
    a batch queued half an age after the first is still waiting at the first sweep, so the sweep
    comes again for it (on a stalled machine both may go at the first: the counts are the same), and
    a batch queued once the queue was empty starts the sweeps anew."""
    with ShadowServer(mode="hang") as shadow:

        async def test() -> None:
            config = {"targets": [target("a", shadow, concurrency=1, timeout=60, max_queue_age=0.2)]}
            async with running(config) as (app, _, peer):
                stats = app.mirror.target_stats["a"]
                await send_and_ack(peer, 1, [mirror_message(f"/first/{n}") for n in range(3)])
                await asyncio.sleep(0.1)
                await send_and_ack(peer, 2, [mirror_message(f"/second/{n}") for n in range(2)])
                await wait_until(lambda: stats.outcomes["stale"] == 4, SETTLE)
                await send_and_ack(peer, 3, [mirror_message(f"/third/{n}") for n in range(2)])
                await wait_until(lambda: stats.outcomes["stale"] == 6, SETTLE)
                assert (stats.received, stats.pending, len(app.mirror.targets[0].queue)) == (7, 1, 0)
                assert app.mirror.targets[0].held_bytes() == app.mirror.targets[0].pool.bytes_held
                assert await app.mirror.drain(0.05) == (0, 1)
                assert await settled(stats, 7) == {"stale": 6, "shutdown": 1}

        run_asyncio(test)
        assert [r.target for r in shadow.requests] == ["/first/0"]


def test_a_body_over_the_inline_limit_is_redacted_in_the_worker_and_sent(
    run_asyncio: Callable[[AsyncTest], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bodies over INLINE_BODY_LIMIT are redacted in the worker process, off the event loop: the
    shadow gets them redacted, counted once, the redaction too, and the bytes held for them while
    the worker had them are given back. The limit is lowered to 1 KiB here so that one unfragmented
    NOTIFY carries such a body."""
    monkeypatch.setattr(mirror_module, "INLINE_BODY_LIMIT", 1024)
    big = b'{"password": "hunter2", "fill": "' + b"x" * 2048 + b'"}'
    with ShadowServer() as shadow:

        async def test() -> None:
            async with running({"targets": [target("a", shadow, concurrency=1)]}) as (app, _, peer):
                batch = [
                    mirror_message("/big", body=big, headers="host: e\r\ncontent-type: application/json\r\n")
                ]
                await send_and_ack(peer, 1, batch)
                stats = app.mirror.target_stats["a"]
                assert await settled(stats, 1) == {"sent_2xx": 1}
                assert stats.redactions == {"json:default": 1}
                assert app.mirror.targets[0].held_bytes() == 0

        run_asyncio(test)
        [sent] = shadow.requests
        assert sent.body == big.replace(
            b'"password": "hunter2", "fill": ', b'"password":"[REDACTED]","fill":'
        )


# Limits, end to end ---------------------------------------------------------------------------


@pytest.mark.parametrize("requests_per_second", [None, 1000], ids=["bytes-only", "with-requests"])
def test_bytes_per_second_limits_body_bytes_through_the_pipeline(
    run_asyncio: Callable[[AsyncTest], None], requests_per_second: int | None
) -> None:
    """bytes_per_second 100 with a 10 s burst: 1000 body bytes may pass at once. Of four 400-byte
    POSTs in one batch two pass and two are rate_limited (the refill would take seconds); bodiless
    GETs spend nothing and always pass. The same with a requests_per_second limit that lets every
    request through: the body bytes are still charged."""
    with ShadowServer() as shadow:

        async def test() -> None:
            limit: dict[str, float] = {"bytes_per_second": 100, "burst_seconds": 10}
            if requests_per_second is not None:
                limit["requests_per_second"] = requests_per_second
            async with running({"targets": [target("a", shadow, rate_limit=limit)]}) as (app, _, peer):
                batch = [mirror_message("/get-before")]
                batch += [mirror_message(f"/post/{n}", body=b"x" * 400) for n in range(4)]
                batch.append(mirror_message("/get-after"))
                await send_and_ack(peer, 1, batch)
                outcomes = await settled(app.mirror.target_stats["a"], 6)
                assert outcomes == {"sent_2xx": 4, "rate_limited": 2}, outcomes

        run_asyncio(test)
        sent = sorted(r.target for r in shadow.requests)
        assert sent == ["/get-after", "/get-before", "/post/0", "/post/1"]


def test_requests_per_second_limits_through_the_pipeline(run_asyncio: Callable[[AsyncTest], None]) -> None:
    """requests_per_second 1 with a 5 s burst: of twelve requests in one batch exactly five pass
    (a sixth would need a second of refill); every one is accounted."""
    with ShadowServer() as shadow:

        async def test() -> None:
            limit = {"requests_per_second": 1, "burst_seconds": 5}
            async with running({"targets": [target("a", shadow, rate_limit=limit)]}) as (app, _, peer):
                await send_and_ack(peer, 1, [mirror_message(f"/{n}") for n in range(12)])
                outcomes = await settled(app.mirror.target_stats["a"], 12)
                assert outcomes == {"sent_2xx": 5, "rate_limited": 7}, outcomes

        run_asyncio(test)
        assert sorted(r.target for r in shadow.requests) == ["/0", "/1", "/2", "/3", "/4"]


BREAKER_FAULTS = {
    "refuse": ("error_connect", {}),
    "hang": ("error_timeout", {"timeout": 0.2}),
    "reset": ("error_reset", {}),
    "garbage": ("error_protocol", {}),
    "tls": ("error_tls", {}),
}


@pytest.mark.parametrize("fault", list(BREAKER_FAULTS))
def test_every_kind_of_shadow_failure_opens_the_breaker(
    fault: str, run_asyncio: Callable[[AsyncTest], None], tmp_path: Path
) -> None:
    """README: every failure of the shadow opens the circuit breaker, not only connect and timeout.
    failure_threshold 1, backoff 60 s: the first request fails with its own outcome, the next three
    are circuit_open and never reach the shadow."""
    outcome, options = BREAKER_FAULTS[fault]
    if fault == "tls":
        shadow = ShadowServer(ssl_context=self_signed_tls(str(tmp_path))[0])
    else:
        shadow = ShadowServer(mode=fault)
    with shadow:

        async def test() -> None:
            breaker = {"failure_threshold": 1, "backoff": 60}
            config = {"targets": [target("a", shadow, circuit_breaker=breaker, **options)]}
            async with running(config) as (app, _, peer):
                stats = app.mirror.target_stats["a"]
                await send_and_ack(peer, 1, [mirror_message("/first")])
                assert await settled(stats, 1) == {outcome: 1}
                await send_and_ack(peer, 2, [mirror_message(f"/later/{n}") for n in range(3)])
                assert await settled(stats, 4) == {outcome: 1, "circuit_open": 3}

        run_asyncio(test)
        assert [r.target for r in shadow.requests] == ([] if fault in ("refuse", "tls") else ["/first"])


def test_an_opening_breaker_sheds_the_queue_and_both_transitions_are_logged(
    run_asyncio: Callable[[AsyncTest], None],
) -> None:
    """concurrency 1: the first request fails, the breaker (threshold 1) opens and the three queued
    behind it are dropped as circuit_open at once instead of failing one by one; after the backoff a
    probe succeeds and the breaker closes. Opening is a warning naming the target, threshold and
    backoff; closing is info."""
    with ShadowServer(mode="garbage") as shadow:

        async def test() -> None:
            breaker = {"failure_threshold": 1, "backoff": 0.2}
            config = {"targets": [target("a", shadow, concurrency=1, circuit_breaker=breaker)]}
            with capture_logs() as logs:
                async with running(config) as (app, _, peer):
                    stats = app.mirror.target_stats["a"]
                    await send_and_ack(peer, 1, [mirror_message(f"/{n}") for n in range(4)])
                    assert await settled(stats, 4) == {"error_protocol": 1, "circuit_open": 3}
                    shadow.mode = "ok"
                    await asyncio.sleep(0.25)
                    await send_and_ack(peer, 2, [mirror_message("/probe")])
                    assert await settled(stats, 5) == {"error_protocol": 1, "circuit_open": 3, "sent_2xx": 1}
            circuit = [entry for entry in logs if entry["event"].startswith("circuit.")]
            assert circuit == [
                {
                    "event": "circuit.opened",
                    "log_level": "warning",
                    "target": "a",
                    "failures": 1,
                    "retry_in": 0.2,
                },
                {"event": "circuit.closed", "log_level": "info", "target": "a"},
            ]

        run_asyncio(test)
        assert [r.target for r in shadow.requests] == ["/0", "/probe"]


def test_a_body_that_cannot_be_checked_is_dropped_as_unredactable_and_logged_per_reason(
    run_asyncio: Callable[[AsyncTest], None],
) -> None:
    """Redaction cannot look inside a Brotli body or a broken gzip one: neither leaves, each counts
    unredactable, and each reason is logged once (a second reason is not taken for a repeat)."""
    with ShadowServer() as shadow:

        async def test() -> None:
            brotli = request_message("/br", [("Host", "h"), ("Content-Encoding", "br")], b"\x1b\x00")
            broken = request_message("/gz", [("Host", "h"), ("Content-Encoding", "gzip")], b"not gzip")
            with capture_logs() as logs:
                async with running({"targets": [target("a", shadow)]}) as (app, _, peer):
                    await send_and_ack(peer, 1, [brotli, broken, brotli, mirror_message("/ok")])
                    outcomes = await settled(app.mirror.target_stats["a"], 4)
                    assert outcomes == {"unredactable": 3, "sent_2xx": 1}
            dropped = [entry for entry in logs if entry["event"] == "mirror.unredactable"]
            assert [(e["target"], e["reason"], e["suppressed"]) for e in dropped] == [
                ("a", "encoding", 0),
                ("a", "bad_encoding", 0),
            ]

        run_asyncio(test)
        assert [r.target for r in shadow.requests] == ["/ok"]


def test_a_targets_memory_budget_refuses_what_would_pass_it(run_asyncio: Callable[[AsyncTest], None]) -> None:
    """memory_budget 64 KiB and requests of exactly 8 KiB on the wire, a hung shadow, concurrency 1:
    one in flight and seven queued hold the budget exactly; the ninth and tenth are budget_exceeded."""
    budget = 64 * 1024
    with ShadowServer(mode="hang") as shadow:
        spec = target("a", shadow, concurrency=1, timeout=60, memory_budget="64KiB")

        def wire_size(body_size: int) -> int:
            app = App(parse_config({"targets": [spec]}, env={}), config_path=None, overrides={})
            message = mirror_message("/m", body=b"x" * body_size)
            return len(app.mirror.targets[0].build(to_request(message.args)))

        body_size = 8192
        for _ in range(3):  # the Content-Length's digits move with the body's size
            body_size += 8192 - wire_size(body_size)
        assert wire_size(body_size) * 8 == budget

        async def test() -> None:
            async with running({"targets": [spec]}) as (app, _, peer):
                for n in range(10):
                    await send_and_ack(peer, n + 1, [mirror_message(f"/{n}", body=b"x" * body_size)])
                stats = app.mirror.target_stats["a"]
                await wait_until(lambda: stats.received == 10, SETTLE)
                assert (stats.pending, stats.outcomes["budget_exceeded"]) == (8, 2)
                assert app.mirror.targets[0].held_bytes() == budget

        run_asyncio(test)


# What each target sends ---------------------------------------------------------------------------


def request_message(
    path: str, headers: list[tuple[str, str]], body: bytes = b"", method: str = "POST", **extra: Any
) -> Message:
    block = "".join(f"{name}: {value}\r\n" for name, value in headers) + "\r\n"
    args = {"arg_method": method, "arg_path": path, "arg_ver": "1.1", "arg_hdrs": block, "arg_body": body}
    return Message("mirror", {**args, **extra})


def test_each_target_rewrites_the_request_as_configured(run_asyncio: Callable[[AsyncTest], None]) -> None:
    """One request, five targets: the exact request line, Host and headers each one receives."""
    shadows = {name: ShadowServer() for name in ("plain", "based", "original", "suffix", "bare")}
    headers = [("Host", "app.example:8080"), ("X-Forwarded-For", "10.0.0.1"), ("X-Drop", "secret"),
               ("Content-Length", "4"), ("X-Keep", "yes")]  # fmt: skip
    message = request_message("/api/v1/items?id=7", headers, b"data", src=IPv4Address("192.0.2.9"))
    loop_value: list[str] = []  # the agent's own loop marker value (a MAC, see test_loop_marker.py)
    try:
        for shadow in shadows.values():
            shadow.start()

        async def test() -> None:
            config = {
                "targets": [
                    target("plain", shadows["plain"]),
                    {
                        "name": "based",
                        "url": shadows["based"].url + "/base/",
                        "path_rewrite": {"regex": "^/api/v1/", "replacement": "/v2/"},
                        "headers": {"X-Env": "shadow"},
                        "remove_headers": ["X-Drop"],
                    },
                    target("original", shadows["original"], host="original"),
                    target("suffix", shadows["suffix"], host="suffix"),
                    target("bare", shadows["bare"], mirror_body=False, mirror_headers=False),
                ]
            }
            async with running(config) as (app, _, peer):
                loop_value.append(app.mirror.loop_value.decode())
                await send_and_ack(peer, 1, [message])
                for name in shadows:
                    assert await settled(app.mirror.target_stats[name], 1) == {"sent_2xx": 1}, name

        run_asyncio(test)
        seen = {name: shadow.requests[0] for name, shadow in shadows.items()}
    finally:
        for shadow in shadows.values():
            shadow.stop()

    def host(name: str) -> str:
        return f"127.0.0.1:{shadows[name].port}"

    forwarded = ("X-Forwarded-For", "10.0.0.1, 192.0.2.9")
    marker = ("X-Spoa-Mirror", loop_value[0])
    expected = {
        "plain": ("/api/v1/items?id=7", [("Host", host("plain")), forwarded, ("X-Drop", "secret"),
                                        ("X-Keep", "yes"), marker], b"data"),
        "based": ("/base/v2/items?id=7", [("Host", host("based")), forwarded, ("X-Keep", "yes"),
                                         ("X-Env", "shadow"), marker], b"data"),
        "original": ("/api/v1/items?id=7", [("Host", "app.example:8080"), forwarded, ("X-Drop", "secret"),
                                           ("X-Keep", "yes"), marker], b"data"),
        "suffix": ("/api/v1/items?id=7", [("Host", "app.example-shadow:8080"), forwarded,
                                         ("X-Drop", "secret"), ("X-Keep", "yes"), marker], b"data"),
        "bare": ("/api/v1/items?id=7", [("Host", host("bare")), ("X-Forwarded-For", "192.0.2.9"), marker],
                 b""),
    }  # fmt: skip
    for name, (path, sent_headers, body) in expected.items():
        request = seen[name]
        framing = {"content-length", "transfer-encoding", "connection"}
        got = [(key, value) for key, value in request.headers if key.lower() not in framing]
        assert (request.method, request.target, got, request.body) == ("POST", path, sent_headers, body), name


def test_uuid_template_gives_every_mirrored_request_a_fresh_id_over_haproxys(
    run_asyncio: Callable[[AsyncTest], None],
) -> None:
    """`X-Request-ID: "{{uuid}}"` (the GAL guide's tracing practice): a fresh UUID per mirrored
    request, replacing the id HAProxy's unique-id-header put on the request, so the shadow's traces
    never share an id with production's; a header without a template is sent as written."""
    shadow = ShadowServer()
    try:
        shadow.start()

        async def test() -> None:
            headers = {"X-Request-ID": "{{uuid}}", "X-Trace": "mirror-{{ uuid }}-end", "X-Env": "shadow"}
            async with running({"targets": [target("t", shadow, headers=headers)]}) as (app, _, peer):
                for frame_id in (1, 2):
                    message = request_message("/x", [("Host", "h"), ("X-Request-ID", "haproxy-id-1")])
                    await send_and_ack(peer, frame_id, [message])
                assert await settled(app.mirror.target_stats["t"], 2) == {"sent_2xx": 2}

        run_asyncio(test)
    finally:
        shadow.stop()
    ids, traces = [], []
    for request in shadow.requests:
        sent = dict(request.headers)
        assert [name for name, _ in request.headers].count("X-Request-ID") == 1
        assert sent["X-Env"] == "shadow"
        request_id = uuid.UUID(sent["X-Request-ID"])
        assert (request_id.version, request_id.variant) == (4, uuid.RFC_4122)
        assert str(request_id) == sent["X-Request-ID"]
        ids.append(sent["X-Request-ID"])
        traces.append(sent["X-Trace"])
    assert len(set(ids)) == 2 and "haproxy-id-1" not in ids
    assert all(re.fullmatch(r"mirror-[0-9a-f-]{36}-end", trace) for trace in traces)
    assert len(set(traces)) == 2


def test_each_drop_reason_is_counted_once_per_target(run_asyncio: Callable[[AsyncTest], None]) -> None:
    """filtered (methods, filters), sampled_out, body_too_large, body_truncated and invalid, each on
    the target whose rule drops it; what no rule drops is sent, and a 5xx is counted as sent_5xx."""
    with ShadowServer() as shadow, ShadowServer(status=503) as failing:

        async def test() -> None:
            config = {
                "targets": [
                    target("get_only", shadow, methods=["GET"]),
                    target("public", shadow, filters={"deny": {"path_prefix": ["/private"]}}),
                    target("none", shadow, sample_percentage=0),
                    target("small", shadow, max_body_size=3),
                    target("failing", failing),
                ]
            }
            messages = [
                request_message("/private/a", [("Host", "h")], method="GET"),
                request_message("/big", [("Host", "h"), ("Content-Length", "4")], b"data"),
                request_message("/cut", [("Host", "h"), ("Content-Length", "9")], b"ab"),
                request_message("/bad", [("Host", "h"), ("Bad Name", "x")], method="GET"),
            ]
            async with running(config) as (app, _, peer):
                await send_and_ack(peer, 1, messages)
                outcomes = {name: await settled(app.mirror.target_stats[name], 4) for name in
                            ("get_only", "public", "none", "small", "failing")}  # fmt: skip
            assert outcomes == {
                "get_only": {"sent_2xx": 1, "filtered": 2, "invalid": 1},
                "public": {"filtered": 1, "sent_2xx": 1, "body_truncated": 1, "invalid": 1},
                "none": {"sampled_out": 4},
                "small": {"sent_2xx": 1, "body_too_large": 1, "body_truncated": 1, "invalid": 1},
                "failing": {"sent_5xx": 2, "body_truncated": 1, "invalid": 1},
            }

        run_asyncio(test)


def test_truncated_bodies_are_sent_marked_when_asked(run_asyncio: Callable[[AsyncTest], None]) -> None:
    """truncated_body: send_marked: a body shorter than its Content-Length (or its body_len) goes out
    with X-Mirror-Truncated: true, and is counted; a whole body goes out unmarked."""
    with ShadowServer() as shadow:

        async def test() -> None:
            config = {"truncated_body": "send_marked", "targets": [target("a", shadow)]}
            messages = [
                request_message("/cut", [("Host", "h"), ("Content-Length", "9")], b"ab"),
                request_message("/short", [("Host", "h")], b"ab", body_len=5),
                request_message("/whole", [("Host", "h"), ("Content-Length", "2")], b"ab"),
                request_message("/exact", [("Host", "h")], b"ab", body_len=2),
                request_message("/padded", [("Host", "h"), ("Content-Length", "0" * 20 + "2")], b"ab"),
                request_message("/ten", [("Host", "h"), ("Content-Length", "10")], b"ab"),
                request_message("/zero", [("Host", "h"), ("Content-Length", "000")], method="GET"),
                request_message("/word", [("Host", "h"), ("Content-Length", "abc")], method="GET"),
            ]
            async with running(config) as (app, _, peer):
                await send_and_ack(peer, 1, messages)
                stats = app.mirror.target_stats["a"]
                assert await settled(stats, 8) == {"sent_2xx": 8}
                assert stats.truncated_sent == 3

        run_asyncio(test)
        marked = {r.target: r.header("x-mirror-truncated") for r in shadow.requests}
        assert marked == {"/cut": "true", "/short": "true", "/whole": None, "/exact": None, "/padded": None,
                          "/ten": "true", "/zero": None, "/word": None}  # fmt: skip


# The other counters ---------------------------------------------------------------------------------


def test_latency_histogram_buckets_like_prometheus() -> None:
    """An observation on a bound counts in that bucket (le), the buckets are cumulative, +Inf last."""
    histogram = Histogram((0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 5.0):
        histogram.observe(seconds)
    assert histogram.counts == [2, 1, 1]
    assert histogram.cumulative() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert (histogram.count, histogram.total) == (4, pytest.approx(5.65))
    assert Histogram().cumulative() == [(repr(bound), 0) for bound in LATENCY_BUCKETS] + [("+Inf", 0)]


def test_grpc_statuses_are_counted_by_name() -> None:
    """The HTTP/2 pool reports each gRPC reply's grpc-status (None when the trailers carry none):
    counted under the code's name, out-of-range codes as `other`."""
    stats = TargetStats()
    for code in (0, 0, 5, 16, None, 17, -1):
        stats.count_grpc_status(code)
    assert stats.grpc_status == {"OK": 2, "NOT_FOUND": 1, "UNAUTHENTICATED": 1, "missing": 1, "other": 2}


def test_messages_redactions_and_latency_are_counted(run_asyncio: Callable[[AsyncTest], None]) -> None:
    """Beside the outcomes: SPOP messages that are not mirror requests or cannot be read, each
    redaction rule applied, and one latency observation per answered replay."""
    with ShadowServer() as shadow:

        async def test() -> None:
            async with running({"targets": [target("a", shadow)]}) as (app, _, peer):
                secret = [("Host", "h"), ("Authorization", "Bearer x")]
                messages = [
                    request_message("/1", secret, method="GET"),
                    Message("other", {"ip": "10.0.0.1"}),
                    Message("other", {"ip": "10.0.0.2"}),
                    Message("mirror", {"arg_method": "GET", "arg_path": "/", "arg_hdrs": 5}),
                    request_message("/2", secret, method="GET"),
                ]
                await send_and_ack(peer, 1, messages)
                stats = app.mirror.target_stats["a"]
                assert await settled(stats, 2) == {"sent_2xx": 2}
                counted = app.mirror.messages
                assert (counted.mirrored, counted.not_mirror, counted.invalid) == (2, 2, {"bad_headers": 1})
                assert stats.redactions == {"header:authorization": 2}
                assert stats.latency.count == 2 and sum(stats.latency.counts) == 2
                assert stats.latency.cumulative()[-1] == ("+Inf", 2) and stats.latency.total > 0

        run_asyncio(test)
        assert [r.header("authorization") for r in shadow.requests] == ["[REDACTED]", "[REDACTED]"]


# Mutation-testing survivors of mirror.py, killed ------------------------------------------------------


def test_https_targets_verify_the_certificate_by_name_or_skip_it_when_told(
    run_asyncio: Callable[[AsyncTest], None], tmp_path: Path
) -> None:
    """A shadow whose certificate the agent trusts (ca_file) is verified against the target's host
    name; tls_verify false sends to a self-signed one (test_every_kind_of_shadow_failure_opens_the_
    breaker[tls] covers the failed verification)."""
    context, cert = self_signed_tls(str(tmp_path))
    with ShadowServer(ssl_context=context) as shadow:

        async def test() -> None:
            https = f"https://localhost:{shadow.port}/"
            config = {"targets": [{"name": "trusted", "url": https, "ca_file": cert},
                                  {"name": "unverified", "url": https, "tls_verify": False}]}  # fmt: skip
            async with running(config) as (app, _, peer):
                await send_and_ack(peer, 1, [mirror_message("/tls")])
                for name in ("trusted", "unverified"):
                    assert await settled(app.mirror.target_stats[name], 1) == {"sent_2xx": 1}, name

        run_asyncio(test)


def test_head_replies_carry_no_body_and_the_connection_goes_on(
    run_asyncio: Callable[[AsyncTest], None],
) -> None:
    """A HEAD's response has a Content-Length and no body: the next request on the same connection
    (concurrency 1) must still be answered."""
    with ShadowServer() as shadow:

        async def test() -> None:
            config = {"targets": [target("a", shadow, concurrency=1, timeout=2)]}
            async with running(config) as (app, _, peer):
                head = request_message("/head", [("Host", "h")], method="HEAD")
                # The first HEAD goes out at once, the rest wait in the queue (the second HEAD too).
                await send_and_ack(peer, 1, [head, mirror_message("/before"), head, mirror_message("/after")])
                assert await settled(app.mirror.target_stats["a"], 4) == {"sent_2xx": 4}

        run_asyncio(test)
        assert shadow.connections_accepted == 1


def test_suffix_host_policy_without_a_host_uses_the_target_and_rewrites_once(
    run_asyncio: Callable[[AsyncTest], None],
) -> None:
    with ShadowServer() as shadow:

        async def test() -> None:
            rewrite = {"regex": "a", "replacement": "A"}
            config = {"targets": [target("a", shadow, host="suffix", path_rewrite=rewrite)]}
            async with running(config) as (app, _, peer):
                await send_and_ack(peer, 1, [request_message("/banana", [("X-No-Host", "1")], method="GET")])
                assert await settled(app.mirror.target_stats["a"], 1) == {"sent_2xx": 1}

        run_asyncio(test)
        [request] = shadow.requests
        assert (request.target, request.header("host")) == ("/bAnana", f"127.0.0.1:{shadow.port}")


def test_keyed_sampling_and_the_body_size_limit_at_its_edge(
    run_asyncio: Callable[[AsyncTest], None],
) -> None:
    """sample_key: the same user always gets the same fate (requests without the key are sampled at
    random); a body of exactly max_body_size passes; two invalid requests count two."""
    with ShadowServer() as shadow:

        async def test() -> None:
            keyed = {"sample_percentage": 50, "sample_key": {"header": "X-User"}}
            config = {"targets": [target("half", shadow, **keyed), target("small", shadow, max_body_size=3)]}
            users = [f"user-{n}" for n in range(20)] * 2
            messages = [request_message(f"/{user}", [("Host", "h"), ("X-User", user)], method="GET")
                        for user in users]  # fmt: skip
            messages += [request_message("/three", [("Host", "h"), ("Content-Length", "3")], b"abc")]
            messages += [request_message("/bad", [("Host", "h"), ("Bad Name", "x")], method="GET")] * 2
            async with running(config) as (app, _, peer):
                await send_and_ack(peer, 1, messages)
                half = await settled(app.mirror.target_stats["half"], 43)
                small = await settled(app.mirror.target_stats["small"], 43)
            assert small == {"sent_2xx": 41, "invalid": 2}
            assert 0 < half["sampled_out"] < 43 and half["sent_2xx"] > 0  # keyless ones sample at random

        run_asyncio(test)
        sent = [r.target for r in shadow.requests]
        # Each user's two requests go to "small"; to "half" both or neither: 4 or 2 arrivals each.
        per_user = {f"/user-{n}": sent.count(f"/user-{n}") for n in range(20)}
        assert set(per_user.values()) == {2, 4}, per_user
        assert sent.count("/three") in (1, 2)


def test_a_retired_target_finishes_its_queue_before_its_drain_deadline(
    run_asyncio: Callable[[AsyncTest], None],
) -> None:
    """A reload with drain_timeout 10 s: the old target's queued requests to a slow shadow (0.2 s
    each) are still sent, not counted shutdown."""
    with ShadowServer(mode="delay", delay=0.2) as old, ShadowServer() as new:

        async def test() -> None:
            async with running({"targets": [target("a", old, concurrency=1)]}) as (app, _, peer):
                await send_and_ack(peer, 1, [mirror_message(f"/{n}") for n in range(3)])
                reloaded = parse_config({"targets": [target("b", new)], "drain_timeout": 10}, env={})
                app.mirror.apply(reloaded, None)
                await wait_until(lambda: not app.mirror.retired, SETTLE)
                assert await settled(app.mirror.target_stats["a"], 3) == {"sent_2xx": 3}

        run_asyncio(test)


def test_failures_are_logged_once_per_reason_with_the_target(
    run_asyncio: Callable[[AsyncTest], None],
) -> None:
    """Repetitive errors are rate-limited per reason: the first of each is logged, with its target."""
    with ShadowServer(mode="garbage") as shadow:

        async def test() -> None:
            config = {"targets": [target("a", shadow, circuit_breaker={"failure_threshold": 100})]}
            with capture_logs() as logs:
                async with running(config) as (app, _, peer):
                    bad = request_message("/bad", [("Host", "h"), ("Bad Name", "x")], method="GET")
                    bad_method = request_message("/m", [("Host", "h")], method="G T")
                    batch = [mirror_message("/1"), bad, mirror_message("/2"), bad, bad_method]
                    await send_and_ack(peer, 1, batch)
                    outcomes = await settled(app.mirror.target_stats["a"], 5)
                    assert outcomes == {"error_protocol": 2, "invalid": 3}
            warnings = [entry for entry in logs if entry["event"].startswith("mirror.")]
            assert [(e["event"], e["target"], e["reason"], e["suppressed"]) for e in warnings] == [
                ("mirror.invalid_request", "a", "bad_header", 0),
                ("mirror.invalid_request", "a", "bad_method", 0),
                ("mirror.send_failed", "a", "protocol", 0),
            ]
            assert warnings[2]["error"].startswith("invalid HTTP response")

        run_asyncio(test)


def test_a_status_outside_http_and_a_crash_of_ours_still_get_one_outcome(
    run_asyncio: Callable[[AsyncTest], None],
) -> None:
    """A shadow answering status 999 is a protocol error; an exception that is not a transport
    failure (a bug of ours reaching the pool's callback) is error_internal, logged, and the target
    goes on with its queue."""
    with ShadowServer(status=999) as odd, ShadowServer(mode="hang") as hung:

        async def test() -> None:
            config = {"targets": [target("odd", odd), target("hung", hung, concurrency=1, timeout=60)]}
            async with running(config) as (app, _, peer):
                await send_and_ack(peer, 1, [mirror_message("/1"), mirror_message("/2")])
                assert await settled(app.mirror.target_stats["odd"], 2) == {"error_protocol": 2}
                await wait_until(lambda: len(hung.requests) == 1, SETTLE)
                [target_hung] = [t for t in app.mirror.targets if t.name == "hung"]
                with capture_logs() as logs:
                    target_hung._sent(RuntimeError("boom"), 0.0)  # what the pool would call back
                stats = app.mirror.target_stats["hung"]
                assert (stats.outcomes["error_internal"], stats.pending) == (1, 1)
                assert not target_hung.queue  # the queued one was handed to the pool
                [crash] = [entry for entry in logs if entry["event"] == "mirror.send_crashed"]
                fields = (crash["target"], crash["error"], crash["suppressed"])
                assert fields == ("hung", "RuntimeError('boom')", 0)
                assert isinstance(crash["exc_info"], RuntimeError)

        run_asyncio(test)


def test_named_messages_hmac_key_bad_message_log_and_a_drain_that_sends(
    run_asyncio: Callable[[AsyncTest], None],
) -> None:
    """With `messages` set, only those names are mirrored and the others are counted not_mirror; the
    HMAC key reaches each target's redaction; a message that cannot be read is logged once with its
    reason; the SIGTERM drain sends what a slow shadow can take before the deadline."""
    with ShadowServer(mode="delay", delay=0.1) as shadow:

        async def test() -> None:
            hmac_target = target("a", shadow, concurrency=1, redact={"headers": {"X-Id": "hmac"}})
            config = parse_config(
                {"messages": ["mirror"], "drain_timeout": 10, "secrets": {"hmac_key_env": "KEY"},
                 "targets": [hmac_target]},
                env={"KEY": "k" * 16},
            )  # fmt: skip
            app = App(config, config_path=None, overrides={})
            async with serving(app.agent) as served:
                peer = await served.ready_peer()
                bad = Message("mirror", {"arg_method": "GET", "arg_path": "/", "arg_hdrs": 5})
                other = request_message("/other", [("Host", "h")], method="GET")
                other = Message("not-mirror", other.args)
                with capture_logs() as logs:
                    mirrored = [request_message(f"/{n}", [("Host", "h"), ("X-Id", "v")], method="GET")
                                for n in range(3)]  # fmt: skip
                    await send_and_ack(peer, 1, [other, bad, other, bad, *mirrored])
                    counted = app.mirror.messages
                    assert (counted.mirrored, counted.not_mirror) == (3, 2)
                    assert counted.invalid == {"bad_headers": 2}
                    assert await app.mirror.drain(10) == (3, 0)
                [logged] = [entry for entry in logs if entry["event"] == "mirror.bad_message"]
                assert (logged["reason"], logged["suppressed"]) == ("bad_headers", 0)
                assert logged["error"] == "bad_headers: headers must be STRING or BINARY, got Int64"
                assert await settled(app.mirror.target_stats["a"], 3) == {"sent_2xx": 3}

        run_asyncio(test)
        expected = "hmac-sha256:" + hmac.new(b"k" * 16, b"v", hashlib.sha256).hexdigest()[:32]
        assert [r.header("x-id") for r in shadow.requests] == [expected] * 3


def test_shutdown_counts_add_up_across_a_reload_of_the_same_target(
    run_asyncio: Callable[[AsyncTest], None],
) -> None:
    """A reload that leaves target a as it was keeps it, queue and all (nothing is retired): at
    SIGTERM the requests from before and after the reload are all counted shutdown on a's one set of
    counters, and drain's own count says the same."""
    with ShadowServer(mode="hang") as shadow:

        async def test() -> None:
            hung = target("a", shadow, concurrency=1, timeout=60)
            async with running({"targets": [hung], "drain_timeout": 0.05}) as (app, _, peer):
                await send_and_ack(peer, 1, [mirror_message(f"/old/{n}") for n in range(3)])
                reload(app, {"targets": [hung], "drain_timeout": 0.05})
                await wait_until(lambda: not app.mirror.retired, SETTLE)
                await send_and_ack(peer, 2, [mirror_message(f"/new/{n}") for n in range(2)])
                assert await app.mirror.drain(0.05) == (0, 5)
                assert await settled(app.mirror.target_stats["a"], 5) == {"shutdown": 5}

        run_asyncio(test)

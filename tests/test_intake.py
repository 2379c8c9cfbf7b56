"""The intake between the SPOP handler and the targets: bounded in messages and in bytes."""

from __future__ import annotations

import asyncio

import pytest

from spoa_mirror.config import parse_config
from spoa_mirror.mirror import INTAKE_BYTES, INTAKE_LIMIT, Mirror
from spoe import Message
from tests.support.shadow import ShadowServer
from tests.support.shadow_h2 import H2ShadowServer
from tests.test_pipeline import mirror_message, settled


def test_the_intake_is_bounded_in_bytes() -> None:
    """HAProxy's NOTIFYs are ACKed at once and wait in the intake for the pipeline: a burst of large
    bodies faster than the pipeline drains stops at INTAKE_BYTES (queue_full on every target, each
    request still with exactly one outcome), far below INTAKE_LIMIT messages."""
    config = parse_config({"targets": [{"name": "s", "url": "http://127.0.0.1:9", "sample_percentage": 0}]})
    body = b"b" * (1 << 20)
    message = Message(
        "mirror",
        {"arg_method": "POST", "arg_path": "/x", "arg_ver": "1.1", "arg_hdrs": "\r\n", "arg_body": body},
    )
    burst = 64

    async def test() -> tuple[int, int, dict[str, int]]:
        mirror = Mirror(config, None)
        held = 0
        for _ in range(burst):  # no await: the intake is not processed in between
            mirror.handle(message)
            held = max(held, mirror._intake_bytes)
        while mirror._intake:
            await asyncio.sleep(0.01)
        stats = mirror.target_stats["s"]
        return held, stats.received, stats.outcomes

    held, received, outcomes = asyncio.run(test())
    assert burst < INTAKE_LIMIT
    assert 0 < held <= INTAKE_BYTES
    assert outcomes["queue_full"] == burst - INTAKE_BYTES // (len(body) + len("\r\n"))
    assert received == sum(outcomes.values()) == burst


@pytest.mark.parametrize("protocol", ["http1", "h2c"])
def test_the_intake_writes_the_batch_it_placed_before_the_loop_turns(protocol: str) -> None:
    """Three copies taken in, then the intake run once: the target's pool (the shipped wiring:
    HTTP/1.1 pipelined to depth 8, or HTTP/2 with `protocol: h2c`) has written them, in one write,
    when the intake returns, not from a callback in the next loop iteration."""

    async def test(shadow: ShadowServer | H2ShadowServer) -> dict[str, int]:
        target = {"name": "t", "url": shadow.url, "protocol": protocol}
        mirror = Mirror(parse_config({"targets": [target]}, env={}), None)
        stats = mirror.target_stats["t"]
        mirror.handle(mirror_message("/a"))
        await settled(stats, 1)  # a connection, open and idle
        pool = mirror.targets[0].pool
        before = pool.writes
        for path in ("/b", "/c", "/d"):
            mirror.handle(mirror_message(path))
        mirror._process_intake()
        assert pool.writes == before + 1
        outcomes = await settled(stats, 4)
        await mirror.drain(0.1)
        return outcomes

    with ShadowServer() if protocol == "http1" else H2ShadowServer() as shadow:
        assert asyncio.run(asyncio.wait_for(test(shadow), 30)) == {"sent_2xx": 4}
        received = shadow.wait_for(4)
        if protocol == "http1":  # one connection, pipelined: in the order placed
            assert [r.target for r in received] == ["/a", "/b", "/c", "/d"]
        else:  # streams of one write: the shadow records each as it completes
            assert sorted(r.path for r in received) == ["/a", "/b", "/c", "/d"]

"""The intake between the SPOP handler and the targets: bounded in messages and in bytes."""

from __future__ import annotations

import asyncio

from spoa_mirror.config import parse_config
from spoa_mirror.mirror import INTAKE_BYTES, INTAKE_LIMIT, Mirror
from spoe import Message


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

"""The loop marker's value: a MAC only an agent holding the key can make, the same for replicas
sharing the secrets key, and different for every process without one."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from spoa_mirror.mirror import Mirror, loop_marker_value


def mirror(hmac_key: bytes | None) -> Mirror:
    config = SimpleNamespace(
        targets=[],
        loop_header="X-Spoa-Mirror",
        truncated_body="drop",
        messages=[],
        memory_budget=64 << 20,
        compare=None,
    )

    async def build() -> Mirror:
        return Mirror(config, hmac_key)

    return asyncio.run(build())


def test_replicas_with_the_same_key_recognise_each_other() -> None:
    key = b"k" * 32
    assert mirror(key).loop_value == mirror(key).loop_value == loop_marker_value(key).encode()
    assert loop_marker_value(key) != loop_marker_value(b"j" * 32)


def test_without_a_key_each_process_has_its_own_marker() -> None:
    first, second = mirror(None), mirror(None)
    assert first.loop_value != second.loop_value
    assert first.loop_value.startswith(b"v1-") and len(first.loop_value) == 35

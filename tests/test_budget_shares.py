"""The agent-wide memory budget holds however targets take turns: a target that borrowed past its
share while the others were idle must not leave them less than the shares they fill without asking."""

from __future__ import annotations

import asyncio

from spoa_mirror.config import parse_config
from spoa_mirror.mirror import Mirror
from spoe import Message

KiB = 1024
NAMES = ("a", "b", "c", "d")


async def _hung_server() -> tuple[asyncio.Server, int]:
    """Accepts and never answers, so what a target sends stays held in its pool and queue."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3600)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _message(path: str) -> Message:
    return Message(
        "mirror",
        {
            "arg_method": "POST",
            "arg_path": path,
            "arg_ver": "1.1",
            "arg_hdrs": "\r\n",
            "arg_body": b"x" * (48 * KiB),
        },
    )


def test_a_borrowing_target_leaves_the_others_their_shares() -> None:
    async def run() -> tuple[int, int, dict[str, dict[str, int]]]:
        server, port = await _hung_server()
        config = parse_config(
            {
                "memory_budget": "1MiB",
                "defaults": {"memory_budget": "1MiB", "concurrency": 1, "timeout": 60},
                "targets": [
                    {
                        "name": name,
                        "url": f"http://127.0.0.1:{port}",
                        "filters": {"allow": {"path_prefix": [f"/{name}"]}},
                    }
                    for name in NAMES
                ],
            },
            env={},
        )
        mirror = Mirror(config, None)
        for name in NAMES:  # "a" first, alone: it may borrow past its share; then each of the others
            for _ in range(40):
                mirror.handle(_message(f"/{name}/x"))
            while mirror._intake:
                await asyncio.sleep(0.01)
        used, limit = mirror.budget.used(), mirror.budget.limit
        outcomes = {
            name: {k: v for k, v in stats.outcomes.items() if v}
            for name, stats in mirror.target_stats.items()
        }
        server.close()
        return used, limit, outcomes

    used, limit, outcomes = asyncio.run(run())
    assert used <= limit, (used, limit, outcomes)
    assert all(outcomes[name].get("budget_exceeded") for name in NAMES), outcomes

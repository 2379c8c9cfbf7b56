"""What the agent's intake asks of every replay pool, checked the same way for each kind."""

from __future__ import annotations

from typing import Any

from tests.support.live_agent import wait_until


async def held_batch(pool: Any, first: Any, batch: list[Any]) -> list[object]:
    """`first` sent and answered 200 (a connection, open and idle), then `batch` submitted between
    `hold_writes` and `release_writes`, as the intake places a batch: nothing is written while held,
    and the release writes all of it in one write (the pool's `writes` count) before the loop turns;
    then a request sent outside a hold is written as before. Returns the batch's results in the order
    reported; closes the pool."""
    assert await pool.send(first) == 200
    before = pool.writes
    reported: list[object] = []
    pool.hold_writes()
    for request in batch:
        pool.submit(request, lambda result, _elapsed: reported.append(result))
    assert pool.writes == before  # held
    pool.release_writes()
    assert pool.writes == before + 1  # written now, before the loop turns
    await wait_until(lambda: len(reported) == len(batch), 5)
    assert await pool.send(first) == 200  # released for good: a request outside a hold goes out
    await pool.close()
    return reported

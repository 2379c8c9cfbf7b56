"""`spoe.Agent` served in-process over real TCP on 127.0.0.1, for the tests that drive it with
scripted peers (tests/test_server.py, tests/test_fuzz_spop.py).

No pytest-asyncio: a test is a coroutine that `loop_runner` runs with `asyncio.Runner` under a
deadline, on asyncio's own loop or on uvloop (what `spoe.run` uses in production), whose transports
buffer and pause differently. A module's `run` fixture is parametrized over LOOPS:

    @pytest.fixture(params=LOOPS)
    def run(request: pytest.FixtureRequest) -> Callable[[AsyncTest], None]:
        return loop_runner(request.param, TEST_DEADLINE)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import uvloop

from spoe import Agent
from tests.support.spop_peer import TcpPeer

AsyncTest = Callable[[], Awaitable[None]]
LOOPS = ["asyncio", "uvloop"]
TEST_DEADLINE = 30.0  # an in-process App test's hang bound (the `run_asyncio` fixture's, in conftest.py)


def loop_runner(loop: str, deadline: float) -> Callable[[AsyncTest], None]:
    """Runs a test coroutine to the end on a new `loop` ("asyncio" or "uvloop") event loop, failing
    it once `deadline` seconds have passed."""
    loop_factory = uvloop.new_event_loop if loop == "uvloop" else None

    def run_test(test: AsyncTest) -> None:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(asyncio.wait_for(test(), deadline))

    return run_test


class Served:
    """A started agent and the peers connected to it, all closed when the test ends."""

    def __init__(self, agent: Agent, address: tuple[str, int]) -> None:
        self.agent = agent
        self.address = address
        self.peers: list[TcpPeer] = []

    async def connect(self) -> TcpPeer:
        peer = await TcpPeer.connect(self.address)
        self.peers.append(peer)
        return peer

    async def ready_peer(self, hello: bytes | None = None) -> TcpPeer:
        peer = await self.connect()
        await peer.handshake(hello)
        return peer


@asynccontextmanager
async def serving(agent: Agent) -> AsyncIterator[Served]:
    (address,) = await agent.start("127.0.0.1", 0)
    served = Served(agent, address)
    try:
        yield served
    finally:
        await agent.stop(timeout=1.0)
        for peer in served.peers:
            peer.close()


async def wait_until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)

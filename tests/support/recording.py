"""Watching the agent's SPOP writes from inside the process, to test order and write counts
structurally rather than by timing.

`record_writes(monkeypatch, on_write)` makes every new `SpopProtocol` talk to a thin proxy of its
real transport that calls `on_write(data)` before passing each `write` on unchanged. The proxy
observes; the agent, its transport (asyncio's or uvloop's) and the socket stay the real ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from spoe.server import SpopProtocol


class RecordingTransport:
    """Everything is the wrapped transport's, except that each `write` is reported first."""

    def __init__(self, inner: asyncio.BaseTransport, on_write: Callable[[bytes], None]) -> None:
        self._inner = inner
        self._on_write = on_write

    def write(self, data: bytes) -> None:
        self._on_write(bytes(data))
        self._inner.write(data)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def record_writes(monkeypatch: pytest.MonkeyPatch, on_write: Callable[[bytes], None]) -> None:
    """Every SPOP connection accepted from now on reports its writes to `on_write`."""
    connection_made = SpopProtocol.connection_made

    def recording_connection_made(self: SpopProtocol, transport: asyncio.BaseTransport) -> None:
        connection_made(self, RecordingTransport(transport, on_write))  # type: ignore[arg-type]

    monkeypatch.setattr(SpopProtocol, "connection_made", recording_connection_made)

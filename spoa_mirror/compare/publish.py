"""The comparison on the admin listener: /compare (the report as JSON), /compare.html (the report as a
page), /verdict (200 when the goals are met, 503 when they are not or not yet decidable, with the
reasons as JSON; `?always_200=1` answers 200 either way, for callers such as Argo Rollouts' web
metric that treat any other status as an error rather than reading the body).

The admin listener runs on its own thread; the engine is written on the SPOP loop. Each page is
built on that loop (as metrics.OnLoop builds the Prometheus families), so it shows one moment; when
the loop does not answer within TIMEOUT the page says so (503) rather than read counters mid-update.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from collections.abc import Callable
from typing import Any, TypeVar

from .engine import CompareEngine
from .render import render_html

TIMEOUT = 2.0
_JSON = "application/json"
_TEXT = "text/plain; charset=utf-8"
_HTML = "text/html; charset=utf-8"
T = TypeVar("T")

Route = Callable[[str], tuple[str, str, bytes]]


def admin_routes(
    engine: Callable[[], CompareEngine | None], loop: asyncio.AbstractEventLoop
) -> dict[str, Route]:
    """The routes for AdminServer: `engine()` is read on `loop` at each request (a reload may replace
    it; None means no `compare:` section)."""

    def on_loop(build: Callable[[CompareEngine], T]) -> T | tuple[str, str, bytes]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                current = engine()
                future.set_result(None if current is None else build(current))
            except BaseException as error:  # handed to the admin thread
                future.set_exception(error)

        try:
            loop.call_soon_threadsafe(run)
            result = future.result(TIMEOUT)
        except (RuntimeError, concurrent.futures.TimeoutError):
            return "503 Service Unavailable", _TEXT, b"the agent's event loop did not answer; try again\n"
        if result is None:
            return "404 Not Found", _TEXT, b"comparison is not configured (no compare: section)\n"
        return result

    def report(_query: str) -> tuple[str, str, bytes]:
        built = on_loop(lambda current: current.report())
        if isinstance(built, tuple):
            return built
        return "200 OK", _JSON, json.dumps(built, indent=1).encode()

    def page(_query: str) -> tuple[str, str, bytes]:
        built = on_loop(lambda current: current.report())
        if isinstance(built, tuple):
            return built
        return "200 OK", _HTML, render_html(built).encode()

    def verdict(query: str) -> tuple[str, str, bytes]:
        built = on_loop(lambda current: current.verdict_detail())
        if isinstance(built, tuple):
            return built
        body = json.dumps(built, indent=1).encode()
        if built["ok"] or "always_200=1" in query.split("&"):
            return "200 OK", _JSON, body
        return "503 Service Unavailable", _JSON, body

    return {"/compare": report, "/compare.html": page, "/verdict": verdict}

"""The compared targets' pool (spoa_mirror/compare/capture.py) against the recording shadow in its
modes: the final response's status, headers and body, cut at body_limit with the whole body's
digest; failures settle with the request they belong to. Targets that are not compared keep the
plain pool, whose connections hand neither headers nor body to Python."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from spoa_mirror.compare.capture import CapturingPool
from spoa_mirror.compare.model import Response
from spoa_mirror.transport import RequestTimeout, _Connection
from spoa_mirror.wire import build_request
from tests.support.shadow import ShadowServer

T = TypeVar("T")
GET = build_request("GET", "/probe", [("Accept", "*/*")], b"", "shadow.test")
HEAD = build_request("HEAD", "/probe", [], b"", "shadow.test")


def run(test: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(test(), 30))


def exchange(shadow: ShadowServer, requests: list[tuple[bytes, bool]], body_limit: int = 1024) -> list[Any]:
    async def go() -> list[Any]:
        pool = CapturingPool(
            shadow.host,
            shadow.port,
            body_limit=body_limit,
            max_connections=1,
            connect_timeout=1.0,
            timeout=1.0,
        )
        try:
            return [await pool.send(request, head=head) for request, head in requests]
        finally:
            await pool.close()

    return run(go)


def header(response: Response, name: str) -> str | None:
    return next((value for key, value in response.headers if key.lower() == name), None)


@pytest.mark.parametrize("mode", ["ok", "chunked", "close_delimited", "interim_100"])
def test_the_final_response_whole(mode: str) -> None:
    body = b'{"items": [1, 2, 3]}' * 20
    with ShadowServer(mode=mode, status=201, body=body) as shadow:
        [(response, payload)] = exchange(shadow, [(GET, False)])
    assert payload == GET
    assert (response.status, response.body, response.body_length, response.body_sha256) == (
        201,
        body,
        len(body),
        None,
    )
    assert header(response, "server") == "shadow"
    assert header(response, "link") is None, "an interim 103's headers are not the final response's"
    assert response.latency > 0


def test_head_and_bodiless_statuses_have_no_body() -> None:
    with ShadowServer() as shadow:
        [(head, _)] = exchange(shadow, [(HEAD, True)])
        shadow.status = 304
        [(not_modified, _)] = exchange(shadow, [(GET, False)])
    assert (head.status, head.body, head.body_length) == (200, b"", 0)
    assert header(head, "content-length") == str(len(b"shadow ok\n"))
    assert (not_modified.status, not_modified.body) == (304, b"")


@pytest.mark.parametrize("mode", ["ok", "chunked"])
def test_a_body_over_the_limit_is_cut_with_the_digest_of_the_whole(mode: str) -> None:
    body = bytes(range(256)) * 40
    with ShadowServer(mode=mode, body=body) as shadow:
        [(response, _)] = exchange(shadow, [(GET, False)], body_limit=1000)
    assert response.body == body[:1000]
    assert response.body_length == len(body)
    assert response.body_sha256 == hashlib.sha256(body).digest()


def test_keep_alive_responses_do_not_run_into_each_other() -> None:
    with ShadowServer(body=b"first") as shadow:
        results = exchange(shadow, [(GET, False), (HEAD, True), (GET, False)])
        assert shadow.connections_accepted == 1
    assert [(r.status, r.body) for r, _ in results] == [(200, b"first"), (200, b""), (200, b"first")]


def test_a_failure_settles_with_its_request() -> None:
    async def go() -> Any:
        pool = CapturingPool(
            shadow.host, shadow.port, body_limit=10, max_connections=1, connect_timeout=1.0, timeout=0.3
        )
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        pool.submit(GET, lambda result, elapsed: done.set_result(result))
        try:
            return await done
        finally:
            await pool.close()

    with ShadowServer(mode="hang") as shadow:
        error, payload = run(go)
    assert isinstance(error, RequestTimeout) and payload == GET


def test_the_plain_pool_hands_no_header_or_body_to_python() -> None:
    """httptools calls on_header / on_body only where the protocol has them: the plain connection
    must not, or every target would pay for what only compared targets need."""
    assert not hasattr(_Connection, "on_header") and not hasattr(_Connection, "on_body")

"""What the shipped config's mirror-response message carries, on the real HAProxy (2.6 and 3.2):
`status`, `res.hdrs`, `res.body` and `res.body_size` for the responses that make comparison hard
(bodies larger than the buffer, with a Content-Length or chunked; HEAD; 204 and 304; compressed
bodies; HTTP/2 clients). The agent here is an in-process `spoe.Agent` recording every message, so
the facts are HAProxy's own; the README's "Compare" section (HAProxy part) states them.
"""

from __future__ import annotations

import asyncio
import json
import threading
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from spoe import Agent, Message, SetVar, VarScope
from tests.support.procs import HAProxyRelease, free_port, run_haproxy
from tests.support.shadow import RecordedRequest, Reply, ShadowServer
from tests.support.shipped_configs import SPOE_CONF, bufsize, shipped_haproxy_config
from tests.test_haproxy_configs import localized

pytestmark = pytest.mark.haproxy

BIG = 100_000  # over the shipped tune.bufsize (32 KiB)


class RecordingAgent:
    """A spoe.Agent on its own loop and thread: ACKs each request message asking for the response
    (txn.mirror.compare, as spoa-mirror does with a compare section) and records every message."""

    def __init__(self, max_frame_size: int) -> None:
        self.max_frame_size = max_frame_size
        self.messages: list[Message] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True, name="recording-agent")
        self._started = threading.Event()
        self._agent: Agent | None = None

    def _handle(self, message: Message) -> tuple[SetVar, ...]:
        self.messages.append(message)
        return (SetVar(VarScope.TRANSACTION, "accepted", 1), SetVar(VarScope.TRANSACTION, "compare", 1))

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._agent = Agent(max_frame_size=self.max_frame_size)
        self._agent.set_default_handler(self._handle)
        [(_, self.port)] = self._loop.run_until_complete(self._agent.start("127.0.0.1", 0))
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._agent.stop(timeout=1.0))

    def __enter__(self) -> RecordingAgent:
        self._thread.start()
        assert self._started.wait(5), "the recording agent did not start"
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def responses(self) -> dict[str, dict[str, Any]]:
        """The mirror-response messages by the path of the request with the same unique_id."""
        paths = {m.args["unique_id"]: m.args["arg_path"] for m in list(self.messages) if m.name == "mirror"}
        return {
            paths[m.args["unique_id"]]: m.args
            for m in list(self.messages)
            if m.name == "mirror-response" and m.args["unique_id"] in paths
        }


def primary_app(request: RecordedRequest) -> Reply:
    kind = request.target.split("/")[1]
    json_body = json.dumps({"id": 1, "items": list(range(20))}).encode()
    return {
        "json": Reply(200, (("Content-Type", "application/json"),), json_body),
        "big": Reply(200, (("Content-Type", "application/octet-stream"),), b"b" * BIG),
        "empty": Reply(204),
        "not-modified": Reply(304, (("ETag", '"v1"'),)),
        "deflate": Reply(200, (("Content-Encoding", "deflate"),), zlib.compress(json_body)),
    }.get(kind, Reply(200, (), b"ok"))


@dataclass
class Stack:
    url: str
    h2_url: str
    agent: RecordingAgent
    primary: ShadowServer


@contextmanager
def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    monkeypatch.setenv("MIRROR_SAMPLE_PERCENT", "100")
    with ExitStack() as exits:
        primary = exits.enter_context(ShadowServer(responder=primary_app))
        agent = exits.enter_context(RecordingAgent(bufsize(shipped_haproxy_config().read_text())))
        http_port, h2_port = free_port(), free_port()
        text = localized(
            shipped_haproxy_config().read_text(), primary.port, [agent.port, free_port()], http_port
        )
        text = text.replace("    server agent2 ", "    #server agent2 ")
        # An HTTP/2 client (h2c with prior knowledge): the same frontend, a second bind line.
        text = text.replace(
            f"bind 127.0.0.1:{http_port}",
            f"bind 127.0.0.1:{http_port}\n    bind 127.0.0.1:{h2_port} proto h2",
        )
        exits.enter_context(run_haproxy(text, tmp_path, extra_files={SPOE_CONF.name: SPOE_CONF.read_text()}))
        yield Stack(f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{h2_port}", agent, primary)


def wait_for_responses(agent: RecordingAgent, count: int) -> dict[str, dict[str, Any]]:
    for _ in range(200):
        responses = agent.responses()
        if len(responses) >= count:
            return responses
        threading.Event().wait(0.02)
    raise AssertionError(f"{len(agent.responses())} of {count} response messages arrived")


def test_what_the_response_message_carries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, haproxy_release: HAProxyRelease
) -> None:
    with stack(tmp_path, monkeypatch) as s, httpx.Client(base_url=s.url, trust_env=False) as client:
        assert client.get("/json/1").status_code == 200
        assert len(client.get("/big/1").content) == BIG
        s.primary.mode = "chunked"
        assert len(client.get("/big/chunked").content) == BIG
        assert client.get("/json/chunked").status_code == 200
        s.primary.mode = "ok"
        assert client.head("/json/head").status_code == 200
        assert client.get("/empty/1").status_code == 204
        assert client.get("/not-modified/1").status_code == 304
        assert client.get("/deflate/1").headers["content-encoding"] == "deflate"
        with httpx.Client(base_url=s.h2_url, http1=False, http2=True, trust_env=False) as h2_client:
            response = h2_client.get("/json/h2")
            assert response.http_version == "HTTP/2" and response.status_code == 200
        got = wait_for_responses(s.agent, 9)

    json_body = json.dumps({"id": 1, "items": list(range(20))}).encode()
    # Whole bodies, and status and headers, for an ordinary response, over HTTP/1.1 or HTTP/2.
    for path in ("/json/1", "/json/h2"):
        assert (got[path]["status"], got[path]["body"], got[path]["body_len"]) == (
            200,
            json_body,
            len(json_body),
        )
        assert "content-type: application/json\r\n" in got[path]["hdrs"]
    # Over the buffer with a Content-Length: cut, the declared length shows it (the agent: too_large).
    big = got["/big/1"]
    assert len(big["body"]) < BIG and big["body_len"] == BIG
    # Over the buffer and chunked: cut too, and res.body_size is no declared length: it counts what
    # HAProxy knows of, up to the end of the chunk in progress (50000 here: two chunks of 50000), so a
    # cut at a chunk boundary would not show at all (the agent then judges by the shadow's body).
    chunked = got["/big/chunked"]
    assert len(chunked["body"]) < BIG and len(chunked["body"]) <= chunked["body_len"] < BIG
    assert "transfer-encoding: chunked" in chunked["hdrs"]
    # A chunked body that fits arrives whole, de-chunked.
    assert got["/json/chunked"]["body"] == json_body
    # HEAD: the GET's headers (Content-Length included) and no body; body_len is the declared length.
    head = got["/json/head"]
    assert (
        head["status"] == 200 and not head.get("body") and f"content-length: {len(json_body)}" in head["hdrs"]
    )
    # 204 and 304: no body.
    assert got["/empty/1"]["status"] == 204 and not got["/empty/1"].get("body")
    assert got["/not-modified/1"]["status"] == 304 and not got["/not-modified/1"].get("body")
    # Compressed: the bytes the server sent, still encoded (the comparator decodes Content-Encoding).
    assert got["/deflate/1"]["body"] == zlib.compress(json_body)
    print(
        f"\nHAProxy {haproxy_release.test_id}: body cut at {len(big['body'])} (declared {BIG}); chunked "
        f"cut at {len(chunked['body'])}, body_len {chunked['body_len']}; HEAD body_len {head.get('body_len')}"
    )

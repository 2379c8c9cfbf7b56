"""The capture target in process, on a real loop and real files: outcomes for what cannot be written,
the primary's responses recorded beside their requests (and only theirs), and the account."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

from spoa_mirror.accounting import TargetStats
from spoa_mirror.capture import gor
from spoa_mirror.capture import writer as writer_module
from spoa_mirror.capture.target import CaptureTarget, payload_id, record_response
from spoa_mirror.config import parse_config
from spoa_mirror.mirror import MemoryBudget, loop_marker_value
from spoa_mirror.request import MirrorRequest
from tests.support.live_agent import wait_until

MONKEYS = "🐵🙈🙉".encode()


def build_target(capture: dict[str, Any], **keys: Any) -> CaptureTarget:
    config = parse_config({"targets": [{"name": "rec", "capture": capture, **keys}]}, env={})
    budget = MemoryBudget(config.memory_budget)
    target = CaptureTarget(
        config.targets[0],
        loop_header=config.loop_header,
        truncated_body=config.truncated_body,
        hmac_key=None,
        stats=TargetStats(),
        budget=budget,
        loop_value=loop_marker_value(os.urandom(32)),
    )
    budget.update([target], [])
    return target


async def settle(target: CaptureTarget) -> dict[str, int]:
    while target.stats.pending:
        await asyncio.sleep(0.01)
    await target.drain(asyncio.get_running_loop().time() + 5)
    assert target.stats.balanced()
    assert target.pool.bytes_held == 0  # what the memory budget reads: every payload handed back
    return {name: count for name, count in target.stats.outcomes.items() if count}


def request(path: str, body: bytes = b"", unique_id: str | None = None, **headers: str) -> MirrorRequest:
    return MirrorRequest(
        "POST" if body else "GET", path, "1.1", [("Host", "app.example"), *headers.items()], body,
        unique_id=unique_id,
    )  # fmt: skip


def read_all(directory: Path) -> list[gor.Payload]:
    errors: list[gor.FormatError] = []
    found = list(gor.merge(gor.capture_files([str(directory)]), errors.append))
    assert errors == []
    return found


def test_an_unwritable_directory_counts_write_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")

    async def main() -> dict[str, int]:
        target = build_target({"directory": str(blocker / "capture")})
        for n in range(20):
            target.offer(request(f"/x/{n}"))
        return await settle(target)

    assert asyncio.run(main()) == {"write_error": 20}


def test_a_request_holding_the_separator_is_invalid_and_the_others_written(tmp_path: Path) -> None:
    async def main() -> dict[str, int]:
        target = build_target({"directory": str(tmp_path)})
        target.offer(request("/a", b"x\n" + MONKEYS + b"\ny"))
        target.offer(request("/b", b"fine"))
        return await settle(target)

    assert asyncio.run(main()) == {"invalid": 1, "written": 1}
    [payload] = read_all(tmp_path)
    assert payload.message.startswith(b"POST /b HTTP/1.1\r\nHost: app.example\r\n")


def test_responses_are_recorded_beside_their_requests_only(tmp_path: Path) -> None:
    """A response for a captured request follows it with the request's id and the latency since it
    was captured, redacted by the target's rules; one for a request this target filtered out is not
    written (counted unmatched)."""

    async def main() -> CaptureTarget:
        target = build_target(
            {"directory": str(tmp_path), "responses": True},
            filters={"deny": {"path_prefix": ["/private"]}},
            redact={"headers": {"Set-Cookie": "remove"}, "json_fields": {"token": "mask"}},
        )
        target.offer(request("/orders/1", unique_id="req-1"))
        target.offer(request("/private/2", unique_id="req-2"))
        for unique_id in ("req-1", "req-2"):
            record_response(
                [target],
                {
                    "unique_id": unique_id,
                    "status": 201,
                    "hdrs": b"content-type: application/json\r\nset-cookie: s=secret\r\n\r\n",
                    "body": b'{"token": "tok-secret", "ok": true}',
                },
            )
        await settle(target)
        return target

    target = asyncio.run(main())
    assert target.capture_stats.responses == {"unmatched": 1, "written": 1}
    request_payload, response_payload = read_all(tmp_path)
    assert request_payload.kind == gor.REQUEST and response_payload.kind == gor.RESPONSE
    assert request_payload.id == response_payload.id == payload_id("req-1")
    assert response_payload.latency > 0
    assert response_payload.message.startswith(b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\n")
    assert b"secret" not in response_payload.message and b'"ok":true' in response_payload.message


def test_a_reload_moves_the_capture_and_keeps_the_account(tmp_path: Path) -> None:
    """SIGHUP with another directory: the old writer finishes and closes its file (compressed), the
    new one writes to the new directory; the target's counters carry on."""
    from spoa_mirror.mirror import Mirror

    def config(directory: Path) -> Any:
        return parse_config({"targets": [{"name": "rec", "capture": {"directory": str(directory)}}]}, env={})

    async def main() -> TargetStats:
        mirror = Mirror(config(tmp_path / "one"), None)
        for n in range(5):
            mirror.targets[0].offer(request(f"/one/{n}"))
        mirror.apply(config(tmp_path / "two"), None)
        for n in range(3):
            mirror.targets[0].offer(request(f"/two/{n}"))
        await mirror.drain(5)
        return mirror.target_stats["rec"]

    stats = asyncio.run(main())
    assert {name: n for name, n in stats.outcomes.items() if n} == {"written": 8} and stats.balanced()
    assert [p.message.split(b" ")[1] for p in read_all(tmp_path / "one")] == [
        f"/one/{n}".encode() for n in range(5)
    ]
    assert [p.message.split(b" ")[1] for p in read_all(tmp_path / "two")] == [
        f"/two/{n}".encode() for n in range(3)
    ]
    assert all(p.name.endswith(".gor.gz") for p in (tmp_path / "one").iterdir())
    assert stats.capture.files_rotated == 2


def test_a_held_batch_wakes_the_writer_thread_once_at_its_release(tmp_path: Path, monkeypatch) -> None:
    """The agent's intake holds the writer while it offers a batch: the writer thread is not woken
    by each payload (it would contend for the GIL with the loop still offering the rest) but once,
    at release, and then writes the whole batch. The thread's idle tick is made a minute long, so
    a release that did not wake it would leave the batch unwritten past the test's bound."""
    monkeypatch.setattr(writer_module, "_TICK", 60.0)

    async def main() -> tuple[bool, dict[str, int]]:
        target = build_target({"directory": str(tmp_path)})
        target.offer(request("/warm"))  # starts the writer thread
        while target.stats.pending:
            await asyncio.sleep(0.01)
        writer = target.pool
        writer.hold_writes()
        for path in ("/a", "/b", "/c"):
            target.offer(request(path))
        woken_while_held = writer._wake.is_set()
        writer.release_writes()
        await wait_until(lambda: not target.stats.pending, 5)
        target.offer(request("/after"))  # outside a hold: wakes the writer itself
        await wait_until(lambda: not target.stats.pending, 5)  # before the drain's close wakes it
        return woken_while_held, await settle(target)

    assert asyncio.run(asyncio.wait_for(main(), 10)) == (False, {"written": 5})
    paths = sorted(payload.message.split(b" ")[1] for payload in read_all(tmp_path))
    assert paths == [b"/a", b"/after", b"/b", b"/c", b"/warm"]


class CountingEvent(threading.Event):
    """The writer's wake-up event, counting how often it is set."""

    def __init__(self) -> None:
        super().__init__()
        self.sets = 0

    def set(self) -> None:
        self.sets += 1
        super().set()


def test_the_payloads_a_settled_batch_lets_through_wake_the_writer_once(tmp_path: Path, monkeypatch) -> None:
    """40 requests to a capture target that hands the writer 4 at a time: each written batch settles
    on the loop, and the 4 queued payloads its callbacks hand over wake the writer thread once, not
    once each (each wake cost ~6.5k instructions a request in the capture bench, callgrind): about
    one wake per batch of 4, 40 with a wake per payload."""
    monkeypatch.setattr(writer_module, "_TICK", 60.0)  # a missed wake would hang, not pass slowly

    async def main() -> tuple[int, dict[str, int]]:
        target = build_target({"directory": str(tmp_path)}, concurrency=4)
        wake = target.pool._wake = CountingEvent()
        target.pool.hold_writes()  # as the intake does
        for n in range(40):
            target.offer(request(f"/r{n}"))
        target.pool.release_writes()
        outcomes = await settle(target)
        latency = target.stats.latency
        assert latency.count == 40 and 0 <= latency.total < 40 * 5  # each write's own time
        return wake.sets, outcomes

    sets, outcomes = asyncio.run(asyncio.wait_for(main(), 10))
    assert outcomes == {"written": 40}
    assert sets <= 12  # the intake's release, nine settled batches handing over more, the close

"""How spoa_mirror/mirror.py wires what the fast tests otherwise meet only through HAProxy: the compare
section (the pairing table and engine built for it, the primary's response message paired with the
request it answers, the section coming, staying and going across reloads, its bytes taken from the
memory budget, what still waits at shutdown), a target's `grpc_methods` guard and gRPC status counter,
the resent counter of a pipelining target, and the headers a client's `Connection` header cannot name
away. The production wiring (`App`) serves a scripted HAProxy peer in-process; replays go to real
recording shadows over real sockets. Each test builds its own agent, so each passes alone and in any
order.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from structlog.testing import capture_logs

import spoa_mirror.mirror as mirror_module
from spoa_mirror.app import App
from spoa_mirror.config import parse_config
from spoa_mirror.errors import ConfigError
from spoa_mirror.mirror import Mirror
from spoe import Message, SetVar, VarScope
from tests.support.live_agent import AsyncTest, wait_until
from tests.support.mirror_stack import parse_metrics
from tests.support.shadow import RecordedRequest, Reply, ShadowServer
from tests.support.shadow_h2 import H2ShadowServer
from tests.support.spop_peer import TcpPeer, ack_actions, notify
from tests.test_pipeline import SETTLE, reload, running, settled, target
from tests.test_transport_pipelining import PipelineShadow

KiB = 1024
ACCEPTED = SetVar(VarScope.TRANSACTION, "accepted", 1)
COMPARE = SetVar(VarScope.TRANSACTION, "compare", 1)
REFUSED = SetVar(VarScope.TRANSACTION, "accepted", 0)
# One sample of the compare account's outcome family (parse_metrics orders the labels by name).
COMPARISONS = re.compile(
    r'spoa_mirror_compare_comparisons_total\{endpoint=".*",outcome="(?P<outcome>\w+)",target="(?P<target>.*)"\}'
)


def request(
    path: str,
    unique_id: str | None = None,
    *,
    method: str = "GET",
    headers: str = "host: example\r\n",
    body: bytes = b"",
    **args: Any,
) -> Message:
    """A request message as the shipped mirror.spoe.conf sends it (its unique-id among the args)."""
    length = f"content-length: {len(body)}\r\n" if body else ""
    message = {
        "arg_method": method,
        "arg_path": path,
        "arg_ver": "1.1",
        "arg_hdrs": headers + length + "\r\n",
        "arg_body": body,
        **args,
    }
    if unique_id is not None:
        message["unique_id"] = unique_id
    return Message("mirror", message)


def item(path: str, price: int = 10) -> bytes:
    return json.dumps({"item": path, "price": price}).encode()


def json_service(req: RecordedRequest) -> Reply:
    """The compared shadow: the same JSON document for the same path, price 10; /slow/ paths answer
    only after the test has ended (the shadow's stop aborts them)."""
    delay = 60.0 if req.target.startswith("/slow/") else 0.0
    return Reply(200, (("Content-Type", "application/json"),), item(req.target), delay)


def primary_response(unique_id: str, body: bytes, name: str = "mirror-response") -> Message:
    """The primary's response as the shipped config's mirror-response group sends it."""
    headers = f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    args = {"unique_id": unique_id, "status": 200, "hdrs": headers, "body": body, "body_len": len(body)}
    return Message(name, args)


async def actions_of(peer: TcpPeer, frame_id: int, messages: list[Message]) -> list[Any]:
    """The actions of the ACK the agent answers this NOTIFY with."""
    await peer.send(notify(1, frame_id, messages))
    return ack_actions(await peer.recv_frame())


def scrape(app: App) -> dict[str, float]:
    """/metrics as the admin server renders it (on the loop, as the agent's OnLoop collectors do)."""
    return parse_metrics(generate_latest(app._registry()).decode())


def comparisons(metrics: dict[str, float], target_name: str) -> dict[str, int]:
    """spoa_mirror_compare_comparisons_total of one target, summed over its endpoints, by outcome."""
    found: dict[str, int] = {}
    for key, value in metrics.items():
        if (sample := COMPARISONS.fullmatch(key)) and sample["target"] == target_name and value:
            found[sample["outcome"]] = found.get(sample["outcome"], 0) + int(value)
    return found


def account(engine: Any, target_name: str = "candidate") -> tuple[int, dict[str, int], int]:
    """(sent, outcomes, pending) of a compared target in the engine's report, checked to add up."""
    report = next(t for t in engine.report()["targets"] if t["name"] == target_name)
    outcomes = {outcome: count for outcome, count in report["outcomes"].items() if count}
    assert report["sent"] == sum(outcomes.values()) + report["pending"], report
    return report["sent"], outcomes, report["pending"]


# Compare: the primary's response message meets the request it answers ---------------------------------


def test_a_compared_request_is_paired_with_the_primarys_response_message_and_judged(
    run_asyncio: Callable[[AsyncTest], None],
) -> None:
    """With a `compare` section the ACK asks HAProxy for the primary's response (txn.compare); the
    response message, handed back through the intake, is paired by unique-id with the candidate
    shadow's answer and judged: identical for the same document, different for another status. A
    response and the next request in one NOTIFY: the request is still mirrored at once. At shutdown,
    what still waits in the pairing table ends there: a request queued behind a slow one as
    `shutdown`, the slow one as `shadow_failed` (its connection closed). The other target is
    mirrored as usual and never compared; the account is in /metrics."""
    with ShadowServer(responder=json_service) as candidate, ShadowServer() as plain:
        config = {
            "targets": [target("candidate", candidate, concurrency=1, timeout=60), target("plain", plain)],
            "compare": {"candidates": ["candidate"], "table": {"max_bytes": "1MiB", "max_entries": 1000}},
        }
        before: dict[str, float] = {}
        after: dict[str, float] = {}
        candidate_outcomes: dict[str, int] = {}

        async def test() -> None:
            async with running(config) as (app, _, peer):
                stats = app.mirror.target_stats["candidate"]
                assert await actions_of(peer, 1, [request("/items/1", "id-1")]) == [ACCEPTED, COMPARE]
                await wait_until(lambda: len(candidate.requests) == 1, SETTLE)
                both = [primary_response("id-1", item("/items/1")), request("/items/2", "id-2")]
                assert await actions_of(peer, 2, both) == [ACCEPTED, ACCEPTED, COMPARE]
                await wait_until(lambda: len(candidate.requests) == 2, SETTLE)
                gone = Message("mirror-response", {**primary_response("id-2", b"gone").args, "status": 404})
                assert await actions_of(peer, 3, [gone]) == [ACCEPTED]
                engine = app.mirror.compare_engine
                await wait_until(lambda: account(engine)[0::2] == (2, 0), SETTLE)

                waiting = [request("/slow/3", "id-3"), request("/items/4", "id-4")]
                assert await actions_of(peer, 4, waiting) == [ACCEPTED, COMPARE, ACCEPTED, COMPARE]
                await wait_until(lambda: len(candidate.requests) == 3 and stats.received == 4, SETTLE)
                assert stats.pending == 2  # one in flight, one queued behind it
                before.update(scrape(app))
                await app.mirror.drain(0.2)
                after.update(scrape(app))
                candidate_outcomes.update({k: v for k, v in stats.outcomes.items() if v})

        run_asyncio(test)
    assert comparisons(before, "candidate") == {"identical": 1, "different": 1}
    assert before['spoa_mirror_compare_pending{target="candidate"}'] == 2
    assert before['spoa_mirror_compare_primary_responses_total{result="paired"}'] == 2
    assert before["spoa_mirror_compare_table_entries"] == 2
    assert before["spoa_mirror_compare_table_max_bytes"] == 1024 * KiB
    assert before["spoa_mirror_compare_table_max_entries"] == 1000  # to alert on entries / max_entries
    expected = {"identical": 1, "different": 1, "shadow_failed": 1, "shutdown": 1}
    assert comparisons(after, "candidate") == expected
    assert after['spoa_mirror_compare_requests_sent_total{target="candidate"}'] == 4
    assert after['spoa_mirror_compare_pending{target="candidate"}'] == 0
    assert candidate_outcomes == {"sent_2xx": 2, "shutdown": 2}
    assert comparisons(after, "plain") == {}
    assert after['spoa_mirror_requests_total{outcome="sent_2xx",target="plain"}'] == 4
    assert sorted(r.target for r in plain.requests) == ["/items/1", "/items/2", "/items/4", "/slow/3"]


def test_the_primarys_response_waits_in_the_intake_within_its_bounds_and_is_refused_beyond_them(
    run_asyncio: Callable[[AsyncTest], None], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The primary's response message takes its place in the intake as a request does, under the same
    two bounds. In bytes (INTAKE_BYTES made a request's and its response's size here): the response
    that fills the intake to the byte is taken in, paired and judged, and recorded by the capture
    target; the next one, smaller than the request, is refused. In messages (INTAKE_LIMIT made 2):
    behind two requests, both responses are refused. Each refusal is counted once, in the compare
    account and in the capture target's (/metrics), and ACKed as not accepted."""
    with ShadowServer(responder=json_service) as candidate:
        recorder = {"name": "rec", "capture": {"directory": str(tmp_path), "responses": True}}
        config = {
            "targets": [target("candidate", candidate), recorder],
            "compare": {"candidates": ["candidate"]},
        }
        metrics: dict[str, float] = {}
        compared: list[dict[str, int]] = []

        def held(message: Message) -> int:
            args = message.args
            headers, body = args.get("arg_hdrs", args.get("hdrs")), args.get("arg_body", args.get("body"))
            return len(headers) + len(body)

        async def test() -> None:
            async with running(config) as (app, _, peer):
                captured = app.mirror.target_stats["rec"].capture
                post = request("/items/1", "id-1", method="POST", body=b"x" * 1000)
                answer = primary_response("id-1", item("/items/1"))
                late = primary_response("id-2", b"{}")
                assert held(late) < held(post)
                monkeypatch.setattr(mirror_module, "INTAKE_BYTES", held(post) + held(answer))
                expected = [ACCEPTED, COMPARE, ACCEPTED, REFUSED]
                assert await actions_of(peer, 1, [post, answer, late]) == expected
                engine = app.mirror.compare_engine
                await wait_until(lambda: account(engine)[0::2] == (1, 0), SETTLE)
                await wait_until(lambda: captured.responses.get("written") == 1, SETTLE)
                compared.append(account(engine)[1])

                monkeypatch.setattr(mirror_module, "INTAKE_LIMIT", 2)
                behind = [request("/items/3", "id-3"), request("/items/4", "id-4")]
                answers = [primary_response(f"id-{n}", item(f"/items/{n}")) for n in (3, 4)]
                expected = [ACCEPTED, COMPARE, ACCEPTED, COMPARE, REFUSED, REFUSED]
                assert await actions_of(peer, 2, behind + answers) == expected
                await wait_until(lambda: len(candidate.requests) == 3, SETTLE)
                metrics.update(scrape(app))

        run_asyncio(test)
    assert compared == [{"identical": 1}]
    responses = {
        result: metrics[f'spoa_mirror_compare_primary_responses_total{{result="{result}"}}']
        for result in ("paired", "unmatched", "invalid", "refused")
    }
    assert responses == {"paired": 1, "unmatched": 0, "invalid": 0, "refused": 3}
    recorded = {
        key: value for key, value in metrics.items() if key.startswith("spoa_mirror_capture_responses_total")
    }
    assert recorded == {
        'spoa_mirror_capture_responses_total{result="refused",target="rec"}': 3,
        'spoa_mirror_capture_responses_total{result="written",target="rec"}': 1,
    }


def test_a_response_message_that_cannot_be_read_is_counted_invalid_and_logged_once_per_reason(
    run_asyncio: Callable[[AsyncTest], None],
) -> None:
    """A response message without a unique-id, one with a status that is no number, and a second
    without a unique-id: each taken in, then counted invalid (/metrics); one warning per reason,
    with the reason and the error, the repeat held back by the log throttle."""
    with ShadowServer(responder=json_service) as candidate:
        config = {"targets": [target("candidate", candidate)], "compare": {"candidates": ["candidate"]}}
        no_id = Message("mirror-response", {k: v for k, v in primary_response("id-1", b"{}").args.items()
                                            if k != "unique_id"})  # fmt: skip
        text_status = Message("mirror-response", {**primary_response("id-2", b"{}").args, "status": "200"})
        metrics: dict[str, float] = {}
        warned: list[tuple[Any, ...]] = []

        async def test() -> None:
            async with running(config) as (app, _, peer):
                stats = app.mirror.pairing.stats
                with capture_logs() as logs:
                    assert await actions_of(peer, 1, [no_id, text_status, no_id]) == [ACCEPTED] * 3
                    await wait_until(lambda: stats.primary_responses["invalid"] == 3, SETTLE)
                warned.extend(
                    (e["event"], e["log_level"], e["reason"], e["error"], e["suppressed"])
                    for e in logs
                    if e["event"].startswith("compare.")
                )
                metrics.update(scrape(app))

        run_asyncio(test)
    assert warned == [
        ("compare.bad_response_message", "warning", "missing_unique_id",
         "missing_unique_id: no unique_id argument (one of arg_unique_id, unique_id, unique-id)", 0),
        ("compare.bad_response_message", "warning", "bad_status",
         "bad_status: status must be an HTTP status code, got '200'", 0),
    ]  # fmt: skip
    assert metrics['spoa_mirror_compare_primary_responses_total{result="invalid"}'] == 3
    assert metrics['spoa_mirror_compare_primary_responses_total{result="paired"}'] == 0


def test_the_primarys_latency_runs_from_the_compared_request_to_its_response_message(
    run_asyncio: Callable[[AsyncTest], None],
) -> None:
    """The primary's latency in the comparison (spoa_mirror_compare_latency_seconds, side primary) is
    the time from the compared request's registration in the pairing table (when the candidate sent
    it) to the response message's arrival: here at least the pause the test made between the two,
    and at most the time the test took from sending the request to the response's ACK."""
    with ShadowServer(responder=json_service) as candidate:
        config = {"targets": [target("candidate", candidate)], "compare": {"candidates": ["candidate"]}}
        bounds: list[float] = []
        metrics: dict[str, float] = {}

        async def test() -> None:
            async with running(config) as (app, _, peer):
                loop = asyncio.get_running_loop()
                engine = app.mirror.compare_engine
                sent = loop.time()
                assert await actions_of(peer, 1, [request("/items/1", "id-1")]) == [ACCEPTED, COMPARE]
                await wait_until(lambda: len(candidate.requests) == 1, SETTLE)  # registered before
                paused = loop.time()
                await asyncio.sleep(0.05)
                answering = loop.time()
                assert await actions_of(peer, 2, [primary_response("id-1", item("/items/1"))]) == [ACCEPTED]
                bounds.extend((answering - paused, loop.time() - sent))
                await wait_until(lambda: account(engine) == (1, {"identical": 1}, 0), SETTLE)
                metrics.update(scrape(app))

        run_asyncio(test)
    latency = {
        key.partition("{")[0]: value
        for key, value in metrics.items()
        if key.startswith("spoa_mirror_compare_latency_seconds_")
        and 'side="primary"' in key
        and not key.startswith("spoa_mirror_compare_latency_seconds_bucket")
    }
    least, most = bounds
    assert latency["spoa_mirror_compare_latency_seconds_count"] == 1
    assert least <= latency["spoa_mirror_compare_latency_seconds_sum"] <= most


# Compare across reloads: the section comes, stays, changes and goes ------------------------------------


def test_a_compare_section_comes_stays_changes_and_goes_across_reloads(
    run_asyncio: Callable[[AsyncTest], None],
) -> None:
    """Comes: the ACK asks for the primary's response and the candidate is compared. Stays (a
    reload with the same config): both targets are kept as they are, the candidate still sharing
    the table, and a request waiting in it across the reload is still paired. Changes (an ignore
    rule added): what waited in the old table ends as `shutdown` in the same account, and the new
    rule judges the next pair. Goes: what waited ends as `shutdown`, the ACK no longer asks for
    the response, and the candidate is mirrored like any target. (What waits at a change is a
    request its shadow has not answered yet: an answered one would end as primary_missing.)"""
    with ShadowServer(responder=json_service) as candidate, ShadowServer() as plain:
        candidate_spec = target("candidate", candidate, timeout=60)  # /slow/ waits on until drained
        base = {"targets": [candidate_spec, target("plain", plain)], "drain_timeout": 5}
        comparing = {**base, "compare": {"candidates": ["candidate"]}}
        ignoring_price = {
            **base,
            "compare": {"candidates": ["candidate"], "ignore": {"json_paths": ["price"]}},
        }
        accounts: list[tuple[int, dict[str, int], int]] = []

        async def test() -> None:
            async with running(base) as (app, _, peer):
                stats = app.mirror.target_stats["candidate"]
                assert await actions_of(peer, 1, [request("/items/0", "id-0")]) == [ACCEPTED]
                assert await settled(stats, 1) == {"sent_2xx": 1}

                reload(app, comparing)  # comes
                await wait_until(lambda: not app.mirror.retired, SETTLE)
                targets, engine = list(app.mirror.targets), app.mirror.compare_engine
                assert await actions_of(peer, 2, [request("/items/1", "id-1")]) == [ACCEPTED, COMPARE]
                assert await settled(stats, 2) == {"sent_2xx": 2}

                reload(app, comparing)  # stays, while id-1 waits for the primary's response
                assert all(kept is was for kept, was in zip(app.mirror.targets, targets, strict=True))
                assert app.mirror.retired == []
                assert await actions_of(peer, 3, [primary_response("id-1", item("/items/1"))]) == [ACCEPTED]
                await wait_until(lambda: account(engine)[0::2] == (1, 0), SETTLE)
                accounts.append(account(engine))

                slow = [request("/slow/2", "id-2")]
                assert await actions_of(peer, 4, slow) == [ACCEPTED, COMPARE]
                await wait_until(lambda: len(candidate.requests) == 3, SETTLE)
                reload(app, ignoring_price)  # changes, while id-2 waits for the shadow
                accounts.append(account(app.mirror.compare_engine))
                assert await actions_of(peer, 5, [request("/items/3", "id-3")]) == [ACCEPTED, COMPARE]
                await wait_until(lambda: len(candidate.requests) == 4, SETTLE)
                dearer = primary_response("id-3", item("/items/3", price=11))
                assert await actions_of(peer, 6, [dearer]) == [ACCEPTED]
                await wait_until(lambda: account(engine)[0::2] == (3, 0), SETTLE)
                accounts.append(account(engine))

                slow = [request("/slow/4", "id-4")]
                assert await actions_of(peer, 7, slow) == [ACCEPTED, COMPARE]
                await wait_until(lambda: len(candidate.requests) == 5, SETTLE)
                reload(app, base)  # goes, while id-4 waits for the shadow
                accounts.append(account(engine))
                assert app.mirror.compare_engine is None
                assert await actions_of(peer, 8, [request("/items/5", "id-5")]) == [ACCEPTED]
                await wait_until(lambda: stats.received == 6 and stats.outcomes["sent_2xx"] == 4, SETTLE)
                assert account(engine)[0] == 4  # the request after it was not sent for comparison

        run_asyncio(test)
    assert accounts == [
        (1, {"identical": 1}, 0),
        (2, {"identical": 1, "shutdown": 1}, 0),
        (3, {"identical": 2, "shutdown": 1}, 0),
        (4, {"identical": 2, "shutdown": 2}, 0),
    ]


def test_examples_of_a_compared_pair_are_taken_from_the_targets_redaction(
    run_asyncio: Callable[[AsyncTest], None],
) -> None:
    """The engine keeps examples of what differs only as the candidate target's redaction rules
    leave them: a json_fields rule masks the nickname (a name the engine's own scrubbing would
    show) on both sides; the plan, which the rules leave alone, shows."""

    def account_service(req: RecordedRequest) -> Reply:
        body = json.dumps({"nickname": "sekrit-shadow", "plan": "premium"}).encode()
        return Reply(200, (("Content-Type", "application/json"),), body)

    with ShadowServer(responder=account_service) as candidate:
        spec = target("candidate", candidate, redact={"json_fields": {"nickname": "mask"}})
        config = {"targets": [spec], "compare": {"candidates": ["candidate"]}}
        report: list[dict[str, Any]] = []

        async def test() -> None:
            async with running(config) as (app, _, peer):
                engine = app.mirror.compare_engine
                for n in range(3):
                    await actions_of(peer, 2 * n + 1, [request(f"/account/{n}", f"id-{n}")])
                    await wait_until(lambda n=n: len(candidate.requests) == n + 1, SETTLE)
                    body = json.dumps({"nickname": "sekrit-primary", "plan": "basic"}).encode()
                    await actions_of(peer, 2 * n + 2, [primary_response(f"id-{n}", body)])
                await wait_until(lambda: account(engine)[0::2] == (3, 0), SETTLE)
                report.append(engine.report())

        run_asyncio(test)
    [endpoint] = report[0]["targets"][0]["endpoints"]
    shown = {
        f["field"]: (f["examples"][0]["primary"], f["examples"][0]["candidate"]) for f in endpoint["fields"]
    }
    assert shown == {"nickname": ("<redacted>", "<redacted>"), "plan": ('"basic"', '"premium"')}
    assert "sekrit" not in json.dumps(report)


def test_an_example_shows_a_header_the_targets_rules_mask_masked_and_nothing_of_what_they_cannot_redact(
    run_asyncio: Callable[[AsyncTest], None],
) -> None:
    """The candidate's `X-Account-Name`, which its target's rules mask, shows masked in the example;
    the primary's Brotli body, which redaction cannot look into, shows nothing of itself: neither
    its Content-Encoding nor its bytes (an empty body is what the example compares)."""
    secret = b"\x1bsekrit-primary-bytes"
    shadow_body = b"candidate bytes"

    def binary_service(req: RecordedRequest) -> Reply:
        headers = (("Content-Type", "application/octet-stream"), ("X-Account-Name", "alice-shadow"))
        return Reply(200, headers, shadow_body)

    with ShadowServer(responder=binary_service) as candidate:
        spec = target("candidate", candidate, redact={"headers": {"X-Account-Name": "mask"}})
        config = {"targets": [spec], "compare": {"candidates": ["candidate"]}}
        headers = (
            f"content-type: application/octet-stream\r\ncontent-encoding: br\r\n"
            f"content-length: {len(secret)}\r\n\r\n"
        )
        args = {"unique_id": "id-1", "status": 200, "hdrs": headers, "body": secret, "body_len": len(secret)}
        report: list[dict[str, Any]] = []

        async def test() -> None:
            async with running(config) as (app, _, peer):
                engine = app.mirror.compare_engine
                await actions_of(peer, 1, [request("/files/1", "id-1")])
                await wait_until(lambda: len(candidate.requests) == 1, SETTLE)
                await actions_of(peer, 2, [Message("mirror-response", args)])
                await wait_until(lambda: account(engine)[0::2] == (1, 0), SETTLE)
                report.append(engine.report())

        run_asyncio(test)
    [endpoint] = report[0]["targets"][0]["endpoints"]
    shown = {
        f["field"]: (f["examples"][0]["primary"], f["examples"][0]["candidate"]) for f in endpoint["fields"]
    }
    empty, shadow_digest = hashlib.sha256(b"").hexdigest(), hashlib.sha256(shadow_body).hexdigest()
    assert shown == {
        "header content-encoding": ("<redacted>", "<redacted>"),
        "header x-account-name": ("(absent)", "[REDACTED]"),
        "body (bytes)": (
            f"0 bytes, sha256 {empty[:16]}",
            f"{len(shadow_body)} bytes, sha256 {shadow_digest[:16]}",
        ),
    }
    assert endpoint["outcomes"]["different"] == 1
    assert "sekrit" not in json.dumps(report) and "alice" not in json.dumps(report)


# Compare: the table's bytes are part of the agent's memory budget --------------------------------------


def test_the_pairing_table_must_fit_below_the_memory_budget(run_asyncio: Callable[[AsyncTest], None]) -> None:
    """`compare.table.max_bytes` at the agent's whole `memory_budget` leaves the targets nothing:
    refused with one line naming the key; a KiB below it is taken."""
    base = {"targets": [{"name": "candidate", "url": "http://127.0.0.1:9"}], "memory_budget": "256KiB"}

    def config(max_bytes: str) -> Any:
        compare = {"candidates": ["candidate"], "table": {"max_bytes": max_bytes}}
        return parse_config({**base, "compare": compare}, env={})

    async def test() -> None:
        with pytest.raises(ConfigError) as refused:
            Mirror(config("256KiB"), None)
        assert str(refused.value) == (
            "compare.table.max_bytes: must be below memory_budget (262144 bytes): the table is part of it"
        )
        assert refused.value.key == "compare.table.max_bytes"
        mirror = Mirror(config("255KiB"), None)
        assert mirror.pairing is not None and mirror.pairing.max_bytes == 255 * KiB
        await mirror.drain(0.1)

    run_asyncio(test)


def test_the_targets_share_the_memory_budget_less_the_pairing_table(
    run_asyncio: Callable[[AsyncTest], None],
) -> None:
    """memory_budget 192 KiB with a 128 KiB table leaves the targets 64 KiB: a candidate whose
    shadow never answers holds its in-flight and queued requests up to that, and the rest of twelve
    8 KiB POSTs is dropped as budget_exceeded (with the table's bytes left in, all twelve fit)."""
    with ShadowServer(mode="hang") as candidate:
        spec = target("candidate", candidate, concurrency=1, timeout=60, max_queue_age=60, queue_size=100)
        config = {
            "targets": [spec],
            "memory_budget": "192KiB",
            "compare": {"candidates": ["candidate"], "table": {"max_bytes": "128KiB"}},
        }
        outcomes: dict[str, int] = {}
        held: list[int] = []

        async def test() -> None:
            async with running(config) as (app, _, peer):
                stats = app.mirror.target_stats["candidate"]
                for n in range(12):
                    post = request(f"/orders/{n:02}", f"id-{n}", method="POST", body=b"x" * (8 * KiB))
                    await actions_of(peer, n + 1, [post])
                await wait_until(lambda: stats.received == 12 and len(candidate.requests) == 1, SETTLE)
                outcomes.update({k: v for k, v in stats.outcomes.items() if v})
                held.extend((stats.pending, app.mirror.budget.used(), len(candidate.requests[0].raw)))

        run_asyncio(test)
    pending, used, size = held
    assert used <= 64 * KiB
    assert outcomes == {"budget_exceeded": 12 - pending}
    assert pending == 64 * KiB // size


# gRPC: the method guard and the status counter --------------------------------------------------------

GRPC_HEADERS = "host: example\r\ncontent-type: application/grpc\r\nte: trailers\r\n"
GRPC_MESSAGE = b"\x00\x00\x00\x00\x02hi"  # one uncompressed gRPC message of two bytes


def test_grpc_methods_filters_the_methods_a_target_does_not_list(
    run_asyncio: Callable[[AsyncTest], None],
) -> None:
    """A target with `grpc_methods` mirrors the gRPC calls it lists (a method, or a whole service)
    and counts any other as filtered; a request that is not gRPC is not the guard's business."""
    with ShadowServer() as shadow:
        spec = target("grpc", shadow, grpc_methods=["/shop.Cart/Add", "/shop.Search/*"])
        calls = ["/shop.Cart/Add", "/shop.Cart/Empty", "/shop.Search/Find"]
        outcomes: dict[str, int] = {}

        async def test() -> None:
            async with running({"targets": [spec]}) as (app, _, peer):
                messages = [
                    request(path, method="POST", headers=GRPC_HEADERS, body=GRPC_MESSAGE) for path in calls
                ]
                await actions_of(peer, 1, [*messages, request("/shop.Cart/Empty")])
                outcomes.update(await settled(app.mirror.target_stats["grpc"], 4))

        run_asyncio(test)
        assert outcomes == {"sent_2xx": 3, "filtered": 1}
        assert sorted(r.target for r in shadow.requests) == [
            "/shop.Cart/Add",
            "/shop.Cart/Empty",
            "/shop.Search/Find",
        ]
        assert [r.method for r in shadow.requests if r.target == "/shop.Cart/Empty"] == ["GET"]


def test_the_grpc_status_of_each_mirrored_call_is_counted_by_name(
    run_asyncio: Callable[[AsyncTest], None],
) -> None:
    """An h2c target replaying gRPC calls to a gRPC shadow (HTTP/2, grpc-status in the trailers):
    each call's status is counted by its name (spoa_mirror_grpc_responses_total in /metrics)."""
    with H2ShadowServer(mode="grpc", grpc_status=5) as shadow:
        spec = {"name": "grpc", "url": shadow.url, "protocol": "h2c"}
        counted: dict[str, int] = {}
        outcomes: dict[str, int] = {}

        async def test() -> None:
            async with running({"targets": [spec]}) as (app, _, peer):
                calls = [
                    request(f"/shop.Cart/Get{n}", method="POST", headers=GRPC_HEADERS, body=GRPC_MESSAGE)
                    for n in range(2)
                ]
                await actions_of(peer, 1, calls)
                stats = app.mirror.target_stats["grpc"]
                outcomes.update(await settled(stats, 2))
                counted.update(stats.grpc_status)

        run_asyncio(test)
        assert len(shadow.requests) == 2
    assert outcomes == {"sent_2xx": 2}
    assert counted == {"NOT_FOUND": 2}


# Pipelining: requests a close left unanswered go again, counted ---------------------------------------


def test_requests_pipelined_behind_a_close_are_sent_again_and_counted(
    run_asyncio: Callable[[AsyncTest], None],
) -> None:
    """One connection, pipeline_depth 4: the shadow answers the first request with `Connection:
    close` and processes none of the three pipelined behind it (RFC 9112 section 9.6). Each goes
    again on a new connection, once, and spoa_mirror_pipeline_resent_total says how many."""
    paths = ["/close201", "/s202", "/s203", "/s204"]
    outcomes: dict[str, int] = {}
    metrics: dict[str, float] = {}
    with PipelineShadow() as shadow:
        spec = {"name": "t", "url": f"http://127.0.0.1:{shadow.port}", "pipeline_depth": 4, "concurrency": 1}

        async def test() -> None:
            async with running({"targets": [spec]}) as (app, _, peer):
                await actions_of(peer, 1, [request(path) for path in paths])
                outcomes.update(await settled(app.mirror.target_stats["t"], len(paths)))
                metrics.update(scrape(app))

        run_asyncio(test)
    assert sorted(seen.path for seen in shadow.requests) == paths
    assert outcomes == {"sent_2xx": len(paths)}
    assert shadow.unprocessed > 0
    assert metrics['spoa_mirror_pipeline_resent_total{target="t"}'] == shadow.unprocessed


# What the agent adds cannot be overridden or named away by the client ---------------------------------


def test_client_headers_cannot_override_or_remove_what_the_agent_adds(
    run_asyncio: Callable[[AsyncTest], None],
) -> None:
    """The operator's `X-Env: shadow` is the only X-Env the shadow sees; a client's `Connection`
    header naming the operator's header, the loop marker, the truncation marker, X-Request-ID or
    (when the agent appends the client's address to it) X-Forwarded-For removes none of them, while
    a header of the client's own named there is dropped as hop-by-hop. A client's own
    X-Mirror-Truncated is never forwarded: only the agent's, on a body HAProxy cut, reaches the
    shadow. The same with and without the client's address (`src`)."""
    named = "keep-alive, X-Env, X-Spoa-Mirror, X-Forwarded-For, X-Request-ID, X-Mirror-Truncated, X-Hop"
    client = (
        "host: example\r\nx-env: production\r\nx-request-id: req-42\r\nx-mirror-truncated: true\r\n"
        "x-forwarded-for: 10.0.0.1\r\nx-hop: hop-by-hop\r\n"
    )
    messages = [
        request("/with-src", method="POST", headers=client + f"connection: {named}\r\n", body=b"abc",
                body_len=10, src="192.0.2.7"),
        request("/without-src", headers=client + f"connection: {named}\r\n"),
        request("/claims-truncated", headers=client),
    ]  # fmt: skip
    with ShadowServer() as shadow:
        config = {
            "targets": [target("t", shadow, headers={"X-Env": "shadow"})],
            "truncated_body": "send_marked",
        }
        outcomes: dict[str, int] = {}

        async def test() -> None:
            async with running(config) as (app, _, peer):
                await actions_of(peer, 1, messages)
                outcomes.update(await settled(app.mirror.target_stats["t"], len(messages)))

        run_asyncio(test)
    assert outcomes == {"sent_2xx": 3}
    seen = {r.target: r for r in shadow.requests}
    for path, forwarded_for, truncated in (
        ("/with-src", ["10.0.0.1, 192.0.2.7"], ["true"]),
        ("/without-src", None, []),
        ("/claims-truncated", ["10.0.0.1"], []),
    ):
        req = seen[path]
        assert req.header_values("x-env") == ["shadow"], path
        assert len(req.header_values("x-spoa-mirror")) == 1, path
        assert req.header_values("x-request-id") == ["req-42"], path
        assert req.header_values("x-mirror-truncated") == truncated, path
        assert req.header_values("x-hop") == ([] if path != "/claims-truncated" else ["hop-by-hop"]), path
        if forwarded_for is not None:  # without src, the client's own X-Forwarded-For is just a header
            assert req.header_values("x-forwarded-for") == forwarded_for, path

"""The pairing table (spoa_mirror/compare/pairing.py) on a real event loop, with the real engine:
either side may come first, the baseline's response reaches the candidate's comparison, every
compared request ends with exactly one outcome (the engine's account: sent = sum(outcomes) + pending
at every step, an engine that raises included), and the bounds (entries, bytes, deadline) hold."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from spoa_mirror.accounting import PairingStats
from spoa_mirror.compare.config import parse_compare
from spoa_mirror.compare.engine import CompareEngine
from spoa_mirror.compare.model import Response
from spoa_mirror.compare.pairing import ENTRY_OVERHEAD, PairingTable
from spoa_mirror.config import parse_config
from spoa_mirror.errors import ConfigError
from spoa_mirror.mirror import Mirror
from spoa_mirror.request import MirrorRequest
from spoa_mirror.transport import RequestTimeout


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 30))


class RecordingEngine(CompareEngine):
    """The real engine, with each call it gets written down."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.calls: list[tuple[Any, ...]] = []

    def compare(self, target: str, method: str, path: str, primary: Response, candidate: Response,
                baseline: Response | None = None) -> str:  # fmt: skip
        self.calls.append((target, path, primary, candidate, baseline))
        return super().compare(target, method, path, primary, candidate, baseline)


def table(engine_class: type[CompareEngine] = RecordingEngine, **compare: Any) -> tuple[PairingTable, Any]:
    config = parse_compare({"candidates": ["candidate"], **compare}, ("candidate", "baseline"))
    assert config is not None
    engine = engine_class(config)
    pairing = PairingTable(config, engine, PairingStats(config.table.max_entries, config.table.max_bytes))
    return pairing, engine


def request(unique_id: str | None, path: str = "/items/1") -> MirrorRequest:
    return MirrorRequest("GET", path, "1.1", [], b"", None, unique_id, None)


def response(body: bytes = b'{"a": 1}', status: int = 200) -> Response:
    return Response(status, (("content-type", "application/json"),), body, len(body), None, 0.01)


def account(engine: CompareEngine, name: str = "candidate") -> tuple[dict[str, int], int]:
    """The target's outcomes (those that occurred) and pending, from the report, once its account is
    checked: sent = sum(outcomes) + pending."""
    target = next(target for target in engine.report()["targets"] if target["name"] == name)
    settled = {outcome: count for outcome, count in target["outcomes"].items() if count}
    assert target["sent"] == sum(settled.values()) + target["pending"], target
    return settled, target["pending"]


def outcomes(engine: CompareEngine, name: str = "candidate") -> dict[str, int]:
    return account(engine, name)[0]


def test_either_side_first_and_the_baseline_reaches_the_candidate() -> None:
    async def go() -> None:
        pairing, engine = table(baseline="baseline")
        first = pairing.register("candidate", request("id-1"))
        first_baseline = pairing.register("baseline", request("id-1"))
        assert first is first_baseline is not None
        pairing.primary("id-1", response())  # primary first
        assert engine.calls == [] and account(engine)[1] == 1
        pairing.shadow_done(first, "baseline", response())
        pairing.shadow_done(first, "candidate", response(b'{"a": 2}'))
        second = pairing.register("candidate", request("id-2"))
        pairing.shadow_done(second, "candidate", response())  # shadow first
        pairing.primary("id-2", response())
        assert outcomes(engine) == {"different": 1, "identical": 1}
        assert outcomes(engine, "baseline") == {"identical": 1}
        by_target = {(call[0], call[1]): call for call in engine.calls}
        candidate_call = engine.calls[[c[0] for c in engine.calls].index("candidate")]
        assert candidate_call[4] == response(), (
            "the candidate is compared with the baseline's response at hand"
        )
        assert by_target[("baseline", "/items/1")][4] is None
        assert pairing.entries == {} and pairing.bytes == 0

    run(go)


def test_failures_missing_ids_and_duplicates_each_end_once() -> None:
    async def go() -> None:
        pairing, engine = table()
        failed = pairing.register("candidate", request("f"))
        pairing.shadow_done(failed, "candidate", RequestTimeout("late"))
        pairing.primary("f", response())
        assert pairing.register("candidate", request(None)) is None
        assert pairing.register("candidate", request("d")) is not None
        assert pairing.register("candidate", request("d")) is None  # the same id again: cannot pair
        pairing.primary("nobody-waits", response())
        assert pairing.stats.primary_responses["unmatched"] == 1
        assert outcomes(engine) == {"shadow_failed": 1, "primary_missing": 2}
        assert account(engine)[1] == 1
        assert pairing.flush() == 1
        assert outcomes(engine) == {"shadow_failed": 1, "primary_missing": 2, "shutdown": 1}

    run(go)


class RaisingEngine(CompareEngine):
    """The real engine with a bug planted in judging a difference."""

    def _judge(self, *args: Any) -> str:
        raise ValueError("planted")


def test_an_engine_that_raises_still_counts_the_request() -> None:
    async def go() -> None:
        pairing, engine = table(RaisingEngine, baseline="baseline")
        entry = pairing.register("candidate", request("boom"))
        pairing.register("baseline", request("boom"))
        pairing.shadow_done(entry, "candidate", response(b'{"a": 2}'))  # differs: judging raises
        pairing.shadow_done(entry, "baseline", response())  # identical: never judged
        pairing.primary("boom", response())
        assert account(engine) == ({"different": 1}, 0)
        assert account(engine, "baseline") == ({"identical": 1}, 0), "the other target is still compared"
        assert pairing.entries == {} and pairing.bytes == 0

    run(go)


def test_a_primary_cut_by_haproxy_is_too_large() -> None:
    async def go() -> None:
        pairing, engine = table()
        entry = pairing.register("candidate", request("cut"))
        pairing.shadow_done(entry, "candidate", response(b"x" * 50_000))
        pairing.primary("cut", Response(200, (), b"x" * 30_000, 50_000, None, 0.01))  # declared 50,000
        chunked = pairing.register("candidate", request("chunked"))
        pairing.shadow_done(chunked, "candidate", response(b"y" * 50_000))
        pairing.primary(
            "chunked", Response(200, (("transfer-encoding", "chunked"),), b"y" * 30_000, 30_000, None, 0)
        )
        assert outcomes(engine) == {"too_large": 2}

    run(go)


def test_the_bounds_on_entries_and_bytes() -> None:
    async def go() -> None:
        pairing, engine = table(table={"max_entries": 3, "max_bytes": "64KiB"})
        entries = [pairing.register("candidate", request(f"id-{n}")) for n in range(5)]
        assert [entry is not None for entry in entries] == [True, True, True, False, False]
        assert outcomes(engine) == {"table_full": 2}
        pairing.shadow_done(entries[0], "candidate", response(b"z" * 70_000))  # over max_bytes alone
        pairing.primary("id-0", response())
        assert outcomes(engine) == {"table_full": 3}
        assert pairing.bytes <= 64 * 1024 and len(pairing.entries) == 2
        assert pairing.bytes == sum(entry.size for entry in pairing.entries.values())
        assert all(entry.size >= ENTRY_OVERHEAD for entry in pairing.entries.values())

    run(go)


def test_the_deadline_settles_what_is_still_waiting() -> None:
    async def go() -> None:
        pairing, engine = table(table={"deadline": 0.2})
        no_primary = pairing.register("candidate", request("a"))
        pairing.shadow_done(no_primary, "candidate", response())
        pairing.register("candidate", request("b"))
        pairing.primary("b", response())  # the shadow never answers
        await asyncio.sleep(0.4)
        assert outcomes(engine) == {"primary_missing": 1, "shadow_failed": 1}
        assert pairing.entries == {} and pairing.bytes == 0
        late = pairing.register("candidate", request("c"))  # a new entry re-arms the sweep
        assert late is not None
        await asyncio.sleep(0.4)
        assert outcomes(engine) == {"primary_missing": 2, "shadow_failed": 1}

    run(go)


def test_the_table_is_carved_out_of_the_memory_budget_and_one_process_pairs() -> None:
    async def go() -> None:
        base = {"targets": [{"name": "candidate", "url": "http://127.0.0.1:9"}], "memory_budget": "64MiB"}
        compare = {"candidates": ["candidate"], "table": {"max_bytes": "16MiB"}}
        mirror = Mirror(parse_config({**base, "compare": compare}), None)
        assert mirror.budget.limit == 48 * 2**20
        assert type(mirror.targets[0]).__name__ == "ComparingTarget"
        engine = mirror.compare_engine
        mirror.apply(parse_config({**base, "compare": {**compare, "body_limit": "1KiB"}}), None)
        assert mirror.compare_engine is engine, "a changed section keeps the engine and its statistics"
        mirror.apply(parse_config(base), None)
        assert mirror.budget.limit == 64 * 2**20 and mirror.pairing is None
        assert type(mirror.targets[0]).__name__ == "Target"
        with pytest.raises(ConfigError, match=r"^compare\.table\.max_bytes: must be below memory_budget"):
            Mirror(parse_config({**base, "compare": {**compare, "table": {"max_bytes": "64MiB"}}}), None)

    run(go)
    with pytest.raises(ConfigError, match=r"^compare: needs listen.workers: 1 \(got 2\)"):
        parse_config(
            {
                "listen": {"workers": 2},
                "targets": [{"name": "candidate", "url": "http://127.0.0.1:9"}],
                "compare": {"candidates": ["candidate"]},
            }
        )


def test_the_account_holds_across_reloads() -> None:
    """A changed section gets a new table and keeps the engine: what the old table held ends as
    shutdown in the same account. A section removed and added again starts a new engine, and a new
    account with it: sent never counts requests whose outcomes another engine holds."""

    async def go() -> None:
        base = {"targets": [{"name": "candidate", "url": "http://127.0.0.1:9"}]}
        compare = {"candidates": ["candidate"]}
        mirror = Mirror(parse_config({**base, "compare": compare}), None)
        mirror.pairing.register("candidate", request("waiting"))
        engine = mirror.compare_engine
        assert account(engine) == ({}, 1)
        mirror.apply(parse_config({**base, "compare": {**compare, "body_limit": "1KiB"}}), None)
        assert mirror.compare_engine is engine and account(engine) == ({"shutdown": 1}, 0)
        mirror.pairing.register("candidate", request("again"))
        mirror.apply(parse_config(base), None)
        assert account(engine) == ({"shutdown": 2}, 0)
        mirror.apply(parse_config({**base, "compare": compare}), None)
        assert mirror.compare_engine is not engine
        assert mirror.compare_engine.accounts() == [("candidate", 0, 0)]

    run(go)


def test_examples_go_through_the_targets_redaction_first() -> None:
    """What the report keeps of a difference is taken from the target's redaction of both
    responses: a json_fields rule masks the nickname (a name the built-in scrubbing would show);
    the other field's values show."""

    async def go() -> None:
        config = parse_config(
            {
                "targets": [
                    {
                        "name": "candidate",
                        "url": "http://127.0.0.1:9",
                        "redact": {"json_fields": {"nickname": "mask"}},
                    }
                ],
                "compare": {"candidates": ["candidate"]},
            }
        )
        mirror = Mirror(config, None)
        pairing = mirror.pairing
        headers = (("content-type", "application/json"),)
        for n in range(30):
            entry = pairing.register("candidate", request(f"id-{n}", "/account"))
            primary = b'{"nickname": "sekrit-primary-%d", "plan": "basic"}' % n
            candidate = b'{"nickname": "sekrit-candidate-%d", "plan": "premium"}' % n
            pairing.shadow_done(
                entry, "candidate", Response(200, headers, candidate, len(candidate), None, 0.01)
            )
            pairing.primary(f"id-{n}", Response(200, headers, primary, len(primary), None, 0.01))
        report = json.dumps(mirror.compare_engine.report())
        assert "premium" in report and "basic" in report
        assert "sekrit" not in report

    run(go)


def test_only_http1_targets_are_compared() -> None:
    with pytest.raises(ConfigError, match=r"^targets\[0\]\.protocol: is h2c: only http1 targets are"):
        parse_config(
            {
                "targets": [{"name": "candidate", "url": "http://127.0.0.1:9", "protocol": "h2c"}],
                "compare": {"candidates": ["candidate"]},
            }
        )

"""The comparator on realistic response pairs: planted differences found, exactly; noise recognised
with its evidence; identical servers give zero regressions; everything bounded and redacted."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import time
import tracemalloc
import zlib
from typing import Any

import pytest

from spoa_mirror.compare import CompareConfig, CompareEngine, Response
from spoa_mirror.compare.config import EndpointsConfig, IgnoreConfig
from spoa_mirror.compare.diff import Differ
from spoa_mirror.compare.endpoints import EndpointNamer
from spoa_mirror.compare.stats import LogHistogram

from .support.compare_traffic import Shop, requests


def engine(**section: Any) -> CompareEngine:
    return CompareEngine(CompareConfig.model_validate({"candidates": ["candidate"], **section}))


def run(
    compare: CompareEngine, primary: Shop, candidate: Shop, count: int, target: str = "candidate"
) -> None:
    for request in requests(count):
        compare.compare(
            target, request.method, request.path, primary.respond(request), candidate.respond(request)
        )


def endpoint(report: dict[str, Any], name: str, target: str = "candidate") -> dict[str, Any]:
    found = next(t for t in report["targets"] if t["name"] == target)
    return next(e for e in found["endpoints"] if e["endpoint"] == name)


def judged(entry: dict[str, Any], judgement: str) -> set[str]:
    return {field["field"] for field in entry["fields"] if field["judgement"] == judgement}


def response(
    body: Any = b"",
    status: int = 200,
    headers: tuple[tuple[str, str], ...] = (),
    latency: float = 0.01,
    content_type: str | None = "application/json",
) -> Response:
    data = json.dumps(body).encode() if not isinstance(body, bytes) else body
    if content_type:
        headers = (("Content-Type", content_type), *headers)
    return Response(status, headers, data, len(data), None, latency)


def test_planted_differences_are_reported_exactly_and_nothing_else() -> None:
    compare = engine()
    run(compare, Shop("primary"), Shop("candidate", plants=("status", "price", "slow")), 2100)
    report = compare.report()

    orders = endpoint(report, "GET /api/orders/{id}")
    assert judged(orders, "regression") == {"status"}
    assert judged(orders, "noise") == {"trace_id", "served_at"}
    assert 0.35 < orders["regression_rate"] < 0.65  # half the orders answer 500
    assert orders["fields"][0]["examples"][0]["primary"] == "200"
    assert orders["fields"][0]["examples"][0]["candidate"] == "500"

    items = endpoint(report, "GET /api/items/{id}")
    assert judged(items, "regression") == {"items[*].price"}
    assert items["regression_rate"] == 1.0
    price = items["fields"][0]
    assert price["kind"] == "json_value"
    assert {example["where"] for example in price["examples"]} == {"items[3].price"}

    for name in ("GET /api/users/{id}", "GET /api/search", "POST /api/search", "GET /shop/p/{id}"):
        entry = endpoint(report, name)
        assert entry["regressions"] == 0, (name, judged(entry, "regression"))
        assert entry["noise_rate"] == 1.0, name
    assert judged(endpoint(report, "GET /api/users/{id}"), "noise") == {"fetched_at"}
    assert judged(endpoint(report, "GET /shop/p/{id}"), "noise") == {"body text (volatile tokens)"}
    timestamp = next(
        f for f in endpoint(report, "GET /api/users/{id}")["fields"] if f["field"] == "fetched_at"
    )
    assert "timestamp" in timestamp["evidence"] and "100%" in timestamp["evidence"]
    assert endpoint(report, "GET /static/avatars/{id}.png")["identical"] == 300
    assert endpoint(report, "HEAD /health")["identical"] == 300

    search = endpoint(report, "GET /api/search")["latency"]
    assert search["shadow"]["p99"] > 3 * search["primary"]["p99"]

    state = compare.verdict_detail()
    assert state["state"] == "fail"
    failing = {(check["endpoint"], check["goal"]) for check in state["checks"] if not check["ok"]}
    assert failing == {
        ("all endpoints", "regression_rate"),
        ("all endpoints", "error_rate_increase"),
        ("all endpoints", "p99_ratio"),  # a seventh of the traffic 4x slower: the whole p99 too
        ("GET /api/orders/{id}", "regression_rate"),
        ("GET /api/orders/{id}", "error_rate_increase"),
        ("GET /api/items/{id}", "regression_rate"),
        ("GET /api/search", "p99_ratio"),
        ("POST /api/search", "p99_ratio"),
    }
    ok, reasons = compare.verdict()
    assert not ok and any("items[*].price" in reason for reason in reasons)
    json.dumps(report)  # the API serves it as is


def test_identical_servers_over_2000_varied_requests_give_zero_regressions() -> None:
    compare = engine()
    run(compare, Shop("primary"), Shop("candidate"), 2100)
    report = compare.report()
    candidate = report["targets"][0]
    assert candidate["compared"] == 2100
    assert candidate["regressions"] == 0
    assert all(e["regressions"] == 0 and e["outcomes"]["different"] == 0 for e in candidate["endpoints"])
    assert {f["judgement"] for e in candidate["endpoints"] for f in e["fields"]} == {"noise"}
    ok, (reason,) = compare.verdict()
    assert ok and reason.endswith("checks met over 2100 comparisons")


def test_a_baseline_tells_noise_from_regression_where_shapes_cannot() -> None:
    """A recommender's `score` varies on every call, on both versions: only the baseline knows it is
    noise. A `tax` the candidate alone changes, as rarely as 30% of the time, is a regression."""

    def body(index: int, score: int, taxed: bool) -> dict[str, Any]:
        return {"id": index, "score": score, "tax": 7 if taxed else 5}

    def feed(compare: CompareEngine) -> None:
        for index in range(400):
            primary = response(body(index, index * 7 % 13, False))
            baseline = response(body(index, index * 5 % 11, False))
            candidate = response(body(index, index * 3 % 17, index % 10 < 3))
            compare.compare("baseline", "GET", f"/r/{index}", primary, baseline)
            compare.compare("candidate", "GET", f"/r/{index}", primary, candidate)

    with_baseline = engine(baseline="baseline")
    feed(with_baseline)
    entry = endpoint(with_baseline.report(), "GET /r/{id}")
    assert judged(entry, "regression") == {"tax"}
    assert judged(entry, "noise") == {"score"}
    score = next(f for f in entry["fields"] if f["field"] == "score")
    assert "the baseline differs there in" in score["evidence"]
    assert 0.25 < entry["regression_rate"] < 0.35

    without = CompareEngine(CompareConfig.model_validate({"candidates": ["candidate", "baseline"]}))
    feed(without)
    assert judged(endpoint(without.report(), "GET /r/{id}"), "regression") == {"tax", "score"}


def test_a_baseline_response_cancels_its_fields_for_that_request() -> None:
    compare = engine(baseline="baseline")
    primary = response({"a": 1, "nonce": 11})
    outcome = compare.compare(
        "candidate",
        "GET",
        "/x",
        primary,
        response({"a": 1, "nonce": 12}),
        baseline=response({"a": 1, "nonce": 13}),
    )
    assert outcome == "noise_only"
    assert compare.compare("candidate", "GET", "/x", primary, response({"a": 2, "nonce": 11})) == "different"
    entry = endpoint(compare.report(), "GET /x")
    assert (entry["regressions"], entry["noise_only"], entry["identical"]) == (1, 1, 0)


def test_json_differences_name_their_paths_and_kinds() -> None:
    differ = Differ(IgnoreConfig(json_paths=("meta.request_id", "items[*].cached")), 1 << 20)
    primary = {
        "items": [{"price": 1, "cached": True}, {"id": 2}],
        "meta": {"request_id": "a"},
        "on": True,
        "gone": 1,
        "n": 1,
        "tags": ["a"],
        "odd key": "x",
    }
    candidate = {
        "items": [{"price": 2, "cached": False}, {"id": "2"}, {}],
        "meta": {"request_id": "b"},
        "on": 1,
        "new": None,
        "n": 1.0,
        "tags": ["a"],
        "odd key": "y",
    }
    found = {(d.kind, d.field, d.where) for d in differ.diff(response(primary), response(candidate))}
    assert found == {
        ("json_value", "items[*].price", "items[0].price"),
        ("json_type", "items[*].id", "items[1].id"),
        ("json_array_length", "items (length)", "items"),
        ("json_type", "on", "on"),
        ("json_missing", "gone", "gone"),
        ("json_extra", "new", "new"),
        ("json_value", '["odd key"]', '["odd key"]'),
    }


def test_bodies_are_compared_by_content_whatever_their_encoding() -> None:
    differ = Differ(IgnoreConfig(), 1 << 16)
    text = json.dumps({"a": list(range(200))}).encode()
    plain = response(text)
    gzipped = response(gzip.compress(text), headers=(("Content-Encoding", "gzip"),))
    deflated = response(zlib.compress(text), headers=(("Content-Encoding", "deflate"),))
    assert [d.kind for d in differ.diff(plain, gzipped)] == ["header_extra"]  # Content-Encoding itself
    assert differ.diff(gzipped, deflated) == [differ.diff(gzipped, deflated)[0]]
    assert differ.diff(gzipped, deflated)[0].field == "header content-encoding"
    # A bomb (1 GiB of zeros in 1 MiB) is not inflated past the bound: compared as bytes, at once.
    bomb = gzip.compress(b"\0" * (64 << 20))
    bombed = response(bomb, headers=(("Content-Encoding", "gzip"),), content_type="application/octet-stream")
    other = response(
        bomb + b"x", headers=(("Content-Encoding", "gzip"),), content_type="application/octet-stream"
    )
    assert [d.kind for d in differ.diff(bombed, other)] == ["body_bytes"]


def test_bodies_cut_at_the_limit_compare_by_length_and_digest() -> None:
    whole = b"x" * 1000
    digest = hashlib.sha256(whole).digest()

    def cut(body: bytes) -> Response:
        return Response(200, (), body[:100], len(body), hashlib.sha256(body).digest(), 0.01)

    differ = Differ(IgnoreConfig(), 100)
    assert differ.diff(cut(whole), Response(200, (), whole[:100], 1000, digest, 0.01)) == []
    (difference,) = differ.diff(cut(whole), cut(whole[:-1] + b"y"))
    assert difference.kind == "body_over_limit"
    assert difference.primary.startswith("1000 bytes, sha256 ")


def test_headers_naturally_varying_are_ignored_and_set_cookie_compared_by_name_only() -> None:
    differ = Differ(IgnoreConfig(headers=("x-build",)), 1 << 16)
    primary = response(
        b"",
        headers=(
            ("Date", "a"),
            ("ETag", "1"),
            ("X-B3-TraceId", "1"),
            ("X-Build", "1"),
            ("Set-Cookie", "sid=AAA; Path=/; Expires=Wed"),
            ("Vary", "Accept"),
        ),
    )
    candidate = response(
        b"",
        headers=(
            ("Date", "b"),
            ("ETag", "2"),
            ("X-B3-TraceId", "2"),
            ("X-Build", "2"),
            ("set-cookie", "sid=BBB; Path=/; Expires=Thu"),
            ("Vary", "Origin"),
        ),
    )
    assert [(d.kind, d.field) for d in differ.diff(primary, candidate)] == [("header_changed", "header vary")]
    renamed = response(b"", headers=(("Set-Cookie", "session=AAA; Path=/"),))
    (difference,) = [d for d in differ.diff(primary, renamed) if d.field == "header set-cookie"]
    assert "AAA" not in str(difference) and "BBB" not in str(difference)
    strict = Differ(IgnoreConfig(default_headers=False), 1 << 16)
    assert {d.field for d in strict.diff(primary, candidate)} >= {"header date", "header etag"}


def test_patterns_blank_matching_text_before_comparing() -> None:
    differ = Differ(IgnoreConfig(patterns=(__import__("re").compile(r"build \d+"),)), 1 << 16)
    assert differ.diff(response({"v": "build 12 ok"}), response({"v": "build 13 ok"})) == []
    assert len(differ.diff(response({"v": "build 12 ok"}), response({"v": "build 13 no"}))) == 1


def test_a_timestamp_whose_format_changes_is_a_regression_not_noise() -> None:
    compare = engine()
    for index in range(60):
        compare.compare(
            "candidate",
            "GET",
            "/t",
            response({"at": f"2024-12-04T10:00:{index:02d}Z"}),
            response({"at": f"2024-12-04 10:00:{index:02d}+00:00"}),
        )
    assert judged(endpoint(compare.report(), "GET /t"), "regression") == {"at"}


def test_unpaired_outcomes_are_counted_and_failures_count_as_errors() -> None:
    compare = engine(goals={"min_comparisons": 10, "min_endpoint_comparisons": 10})
    for _ in range(20):
        compare.compare("candidate", "GET", "/a", response({"x": 1}), response({"x": 1}))
    for _ in range(5):
        compare.count("candidate", "GET", "/a", "shadow_failed")
    compare.count("candidate", "GET", "/a", "primary_missing")
    entry = endpoint(compare.report(), "GET /a")
    assert entry["outcomes"]["shadow_failed"] == 5 and entry["outcomes"]["primary_missing"] == 1
    assert entry["error_rate"]["shadow"] == 5 / 25
    ok, reasons = compare.verdict()
    assert not ok and any("5xx-or-failed rate 20.0%" in reason for reason in reasons)
    with pytest.raises(ValueError, match="unknown comparison outcome"):
        compare.count("candidate", "GET", "/a", "lost")


def test_no_verdict_before_the_minimum_number_of_comparisons() -> None:
    compare = engine(goals={"min_comparisons": 50})
    for _ in range(49):
        compare.compare("candidate", "GET", "/a", response({"x": 1}), response({"x": 2}))
    detail = compare.verdict_detail()
    assert detail["state"] == "undecided" and not detail["ok"]
    assert detail["reasons"] == ["candidate: 49 of the 50 comparisons needed"]
    compare.compare("candidate", "GET", "/a", response({"x": 1}), response({"x": 2}))
    assert compare.verdict_detail()["state"] == "fail"


def test_endpoints_are_templated_and_capped() -> None:
    namer = EndpointNamer(EndpointsConfig(templates=("/users/{user}/files/*",)))
    assert namer.name("GET", "/users/42/files/a.txt?x=1") == "GET /users/{user}/files/*"
    assert (
        namer.name("GET", "/orders/550e8400-e29b-41d4-a716-446655440000/lines/3")
        == "GET /orders/{id}/lines/{id}"
    )
    assert namer.name("GET", "/blobs/deadbeefdeadbeefdeadbeef") == "GET /blobs/{id}"
    assert namer.name("GET", "/docs/intro") == "GET /docs/intro"
    assert namer.name("get\r\n", "/") == "OTHER /"
    compare = engine(endpoints={"max": 5})
    for index in range(1000):
        compare.compare("candidate", "GET", f"/area{index}/x", response({"x": 1}), response({"x": 1}))
        compare.count("candidate", "PUT", f"/zone{index}", "table_full")
    names = [e["endpoint"] for e in compare.report()["targets"][0]["endpoints"]]
    assert len(names) == 6 and "other" in names
    other = endpoint(compare.report(), "other")
    assert other["compared"] == 997 and other["outcomes"]["table_full"] == 998


def test_memory_stays_bounded_whatever_the_differences() -> None:
    """20,000 comparisons, each with new endpoints, new fields and long unique values: fields, examples
    and signatures stop at their bounds, and so does memory."""
    compare = engine(endpoints={"max": 20}, examples={"max_fields": 8, "budget": "16KiB", "max_chars": 64})
    tracemalloc.start()
    try:
        for index in range(20_000):
            primary = response({f"f{index % 500}": "a" * 5000, "n": index})
            candidate = response({f"f{index % 500}": "b" * 5000 + str(index), "n": -index})
            compare.compare("candidate", "GET", f"/e{index % 300}/x", primary, candidate)
            if index == 2000:
                early = tracemalloc.get_traced_memory()[0]
        grown = tracemalloc.get_traced_memory()[0] - early
    finally:
        tracemalloc.stop()
    report = compare.report()
    endpoints = report["targets"][0]["endpoints"]
    assert len(endpoints) == 21
    assert all(len(e["fields"]) <= 9 for e in endpoints)
    assert 12 * 1024 < report["bounds"]["examples_bytes"] <= 16 * 1024  # the budget filled, not passed
    assert all(len(x["primary"]) <= 64 + 20 for e in endpoints for f in e["fields"] for x in f["examples"])
    assert grown < 2 << 20, f"{grown} bytes more after 18,000 further comparisons"


def test_secrets_are_never_kept_in_examples() -> None:
    def redact_email(target: str, response: Response) -> Response:
        body = json.loads(response.body)
        body["email"] = "<masked by target>"
        return Response(response.status, response.headers, json.dumps(body).encode(), 0, None, 0.0)

    compare = CompareEngine(
        CompareConfig.model_validate({"candidates": ["candidate"]}), redact_response=redact_email
    )
    primary = response(
        {
            "email": "a@x.io",
            "access_token": "tok-primary-123",
            "note": "Bearer abcdefghijkl1",
            "jwt": "x",
            "n": 1,
        },
        headers=(("Set-Cookie", "sid=SECRETCOOKIE1; Path=/"), ("X-Api-Key", "key-one")),
    )
    candidate = response(
        {
            "email": "b@x.io",
            "access_token": "tok-cand-456",
            "note": "Bearer zyxwvutsrqpo2",
            "jwt": "y",
            "n": 2,
        },
        headers=(("Set-Cookie", "sess=SECRETCOOKIE2; Path=/"), ("X-Api-Key", "key-two")),
    )
    compare.compare("candidate", "GET", "/me?token=querysecret123", primary, candidate)
    shown = json.dumps(compare.report())
    for secret in (
        "a@x.io",
        "b@x.io",
        "tok-primary-123",
        "tok-cand-456",
        "abcdefghijkl1",
        "zyxwvutsrqpo2",
        "SECRETCOOKIE",
        "key-one",
        "key-two",
        "querysecret123",
    ):
        assert secret not in shown, secret
    fields = {f["field"] for f in endpoint(compare.report(), "GET /me")["fields"]}
    assert {"email", "access_token", "note", "header set-cookie", "header x-api-key", "n"} <= fields


def test_the_diff_log_writes_redacted_lines_at_its_rate(tmp_path: Any) -> None:
    path = tmp_path / "diffs.jsonl"
    compare = engine(diff_log={"path": str(path), "rate": 5})
    for index in range(200):
        compare.compare(
            "candidate",
            "GET",
            "/a",
            response({"x": 1, "password": "p1"}),
            response({"x": index + 2, "password": "p2"}),
        )
    compare.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert 5 <= len(lines) <= 12  # a burst of 5 comparisons x 2 differences, then the rate
    assert {line["field"] for line in lines} == {"x", "password"}
    assert all(line["primary"] == "<redacted>" for line in lines if line["field"] == "password")
    assert compare.report()["bounds"]["diff_log_suppressed"] >= 190
    assert path.stat().st_mode & 0o077 == 0


def test_latency_percentiles_are_within_four_percent() -> None:
    histogram = LogHistogram()
    for index in range(1, 10_001):
        histogram.observe(index / 10_000)  # 0.1 ms .. 1 s, uniform
    assert histogram.quantile(0.5) == pytest.approx(0.5, rel=0.04)
    assert histogram.quantile(0.99) == pytest.approx(0.99, rel=0.04)
    assert LogHistogram().quantile(0.5) is None


def test_with_a_warm_baseline_live_outcomes_agree_with_the_report() -> None:
    """What the metrics count as it happens (each comparison's outcome) is what the report says after:
    a status change the baseline never shows is a regression from its first occurrence, a score both
    versions vary is noise throughout."""
    compare = engine(baseline="baseline")
    for index in range(30):
        compare.compare("baseline", "GET", "/r", response({"score": index}), response({"score": index + 1}))
    outcomes: dict[str, int] = {}
    for index in range(100):
        status = 500 if index % 4 == 0 else 200
        outcome = compare.compare("candidate", "GET", "/r", response({"score": index}),
                                  response({"score": -index}, status=status))  # fmt: skip
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes == {"different": 25, "noise_only": 75}
    entry = endpoint(compare.report(), "GET /r")
    assert (entry["regressions"], entry["noise_only"]) == (25, 75)
    assert judged(entry, "regression") == {"status"} and judged(entry, "noise") == {"score"}


def test_tokens_in_body_lines_are_masked_in_examples() -> None:
    compare = engine()
    for index in range(3):
        page = f'<form>\n<input name="csrf" value="Tk{index}9aQzR4mB8xW2nL7pV5">\n</form>'
        other = f'<form>\n<input name="csrf" value="Zz{index}1bYcQ3nK6vT8mJ4hD0">\n</form>'
        compare.compare("candidate", "GET", "/form", response(page.encode(), content_type="text/html"),
                        response(other.encode(), content_type="text/html"))  # fmt: skip
    shown = json.dumps(compare.report())
    assert "9aQzR4mB8xW2nL7pV5" not in shown and "1bYcQ3nK6vT8mJ4hD0" not in shown
    assert '<input name=\\"csrf\\" value=\\"<token>\\">' in shown


def test_a_target_a_reload_took_out_is_shown_but_not_judged() -> None:
    compare = engine(goals={"min_comparisons": 1, "min_endpoint_comparisons": 1})
    for _ in range(5):
        compare.compare("candidate", "GET", "/a", response({"x": 1}), response({"x": 1}))
        compare.compare("old", "GET", "/a", response({"x": 1}), response({"x": 2}))
    assert compare.verdict().ok
    assert {t["name"]: t["role"] for t in compare.report()["targets"]} == {
        "candidate": "candidate",
        "old": "former",
    }


def test_check_config_describes_the_comparison(tmp_path: Any) -> None:
    from spoa_mirror.config import describe, load_config

    path = tmp_path / "config.yaml"
    path.write_text(
        "targets: [{name: v2, url: 'http://127.0.0.1:1'}, {name: v1, url: 'http://127.0.0.1:2'}]\n"
        "compare: {candidates: [v2], baseline: v1, ignore: {json_paths: [meta.id]}}\n"
    )
    text = describe(load_config(str(path), env={}))
    assert (
        "Compare: v2 against the primary (SPOE message mirror-response); noise measured against baseline v1"
        in text
    )
    assert "and meta.id" in text and "256 KiB" in text
    path.write_text("targets: [{name: v2, url: 'http://127.0.0.1:1'}]\n")
    assert "Compare: off" in describe(load_config(str(path), env={}))


def test_at_every_cap_at_once_the_engine_holds_a_few_mebibytes() -> None:
    """Default caps, three targets, every one of their 100 endpoints (and `other`) with more fields
    than tracked, random sets of them differing (so signatures overflow), long values (so the
    examples budget fills) and latencies from 10 µs to 100 s: what stays is bounded, and small."""
    rnd = random.Random(5)
    compare = CompareEngine(CompareConfig.model_validate({"candidates": ["a", "b"], "baseline": "c"}))
    primary_body = {f"field{index}": "p" for index in range(40)}
    tracemalloc.start()
    try:
        for target in ("a", "b", "c"):
            for path in range(104):
                for count in range(25):
                    candidate_body = dict(primary_body)
                    for index in rnd.sample(range(40), 6):
                        candidate_body[f"field{index}"] = "c" * 250 + str(count)
                    latency = 10 ** rnd.uniform(-5, 2)
                    pair = (
                        response(primary_body, latency=latency),
                        response(candidate_body, latency=latency * 2),
                    )
                    compare.compare(target, "GET", f"/area{path}/x", *pair)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    report = compare.report()
    size = len(json.dumps(report))
    print(f"\nengine at every cap: {held / 2**20:.1f} MiB held, report {size / 2**20:.1f} MiB")
    assert held < 16 * 2**20
    assert report["bounds"]["examples_bytes"] <= 2 * 2**20
    for target in report["targets"]:
        assert len(target["endpoints"]) == 101
        assert all(len(e["fields"]) == 33 for e in target["endpoints"])  # 32 and (other fields)
        assert all(
            e["regressions"] + e["noise_only"] + e["identical"] == e["compared"] for e in target["endpoints"]
        )


def test_other_fields_count_once_per_comparison() -> None:
    compare = engine(examples={"max_fields": 1})
    for _ in range(3):
        compare.compare(
            "candidate", "GET", "/a", response({"a": 1, "b": 1, "c": 1}), response({"a": 2, "b": 2, "c": 2})
        )
    fields = {f["field"]: (f["differs"], f["seen"]) for f in endpoint(compare.report(), "GET /a")["fields"]}
    assert fields == {"a": (3, 3), "(other fields)": (3, 3)}


def test_text_of_repeated_lines_is_diffed_quickly_and_bounded() -> None:
    """2,000 lines of a few repeated values: without difflib's autojunk this took 6 s of CPU (on the
    agent's event loop); the bound here only catches that coming back."""
    differ = Differ(IgnoreConfig(), 1 << 20)
    primary = "\n".join(f"row {index % 7}" for index in range(2000)).encode()
    candidate = "\n".join(f"row {index % 5}" for index in range(2000)).encode()
    started = time.process_time()
    found = differ.diff(
        response(primary, content_type="text/plain"), response(candidate, content_type="text/plain")
    )
    assert time.process_time() - started < 2.0
    assert 0 < len(found) <= 64 and {d.kind for d in found} == {"text_lines"}


def test_adversarial_values_cost_little() -> None:
    """Megabyte values built against the regexes (a hyphenated run with no digit, repeated keywords
    and timestamps): compared, scrubbed and kept as examples without a long stall of the loop; the
    bound only catches backtracking coming back (one of them took minutes)."""
    compare = engine()
    for text in ("ab-" * 300_000, "2024-01-01T" * 100_000, "a-" * 100_000 + "password", "token=x" * 100_000):
        started = time.process_time()
        compare.compare("candidate", "GET", "/big", response({"v": text + "1"}), response({"v": text + "2"}))
        compare.compare("candidate", "GET", "/big", response(f"{text}1".encode(), content_type="text/plain"),
                        response(f"{text}2".encode(), content_type="text/plain"))  # fmt: skip
        assert time.process_time() - started < 5.0, text[:20]
    examples = [x for f in endpoint(compare.report(), "GET /big")["fields"] for x in f["examples"]]
    assert examples and all(len(x["primary"]) < 300 for x in examples)

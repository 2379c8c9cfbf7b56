"""What a user sees of a comparison, through a real admin listener: /compare, /verdict, /metrics, the
HTML page in a real headless Chromium, and `spoa-mirror report` as a subprocess.

The engine lives on an event loop of its own thread, as on the agent's SPOP loop, and is fed there
with the shop traffic of tests/support/compare_traffic.py; the admin listener reads it across
threads exactly as in the agent (app.py wires the same routes and collector)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from spoa_mirror.admin import AdminServer
from spoa_mirror.compare import CompareConfig, CompareEngine
from spoa_mirror.compare.metrics import CompareCollector
from spoa_mirror.compare.publish import admin_routes
from spoa_mirror.compare.render import write_html
from spoa_mirror.listeners import bind_listener

from .support import compare_browser as browser
from .support.compare_traffic import Shop, requests

ROOT = Path(__file__).resolve().parent.parent


class Live:
    def __init__(self, url: str, engine: CompareEngine | None, loop: asyncio.AbstractEventLoop) -> None:
        self.url = url
        self.engine = engine
        self.loop = loop

    def get(self, path: str) -> tuple[int, str, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as answer:
                return answer.status, answer.headers["Content-Type"], answer.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers["Content-Type"], error.read()

    def on_loop(self, work: Callable[[], Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(_call(work), self.loop).result(60)


async def _call(work: Callable[[], Any]) -> Any:
    return work()


@contextmanager
def live(
    section: dict[str, Any] | None, feed: Callable[[CompareEngine], None] | None = None
) -> Iterator[Live]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="spop-loop", daemon=True)
    thread.start()
    admin = None
    try:
        holder: dict[str, Any] = {}

        async def build() -> None:  # on the loop, as App builds its collector and routes
            holder["engine"] = CompareEngine(CompareConfig.model_validate(section)) if section else None
            registry = CollectorRegistry(auto_describe=False)
            registry.register(CompareCollector(lambda: holder["engine"], loop))
            holder["registry"] = registry
            holder["routes"] = admin_routes(lambda: holder["engine"], loop)

        asyncio.run_coroutine_threadsafe(build(), loop).result(10)
        engine = holder["engine"]
        if feed is not None and engine is not None:
            asyncio.run_coroutine_threadsafe(_call(lambda: feed(engine)), loop).result(120)
        admin = AdminServer(holder["registry"], lambda: True, routes=holder["routes"])
        host, port = admin.start(bind_listener("127.0.0.1", 0, key="admin.port", backlog=64))
        yield Live(f"http://{host}:{port}", engine, loop)
    finally:
        if admin is not None:
            admin.stop()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def planted(engine: CompareEngine) -> None:
    primary, candidate = Shop("primary"), Shop("candidate", plants=("status", "price", "slow"))
    for request in requests(2100):
        engine.request_sent("candidate")
        engine.compare(
            "candidate", request.method, request.path, primary.respond(request), candidate.respond(request)
        )
    for index in range(7):
        engine.request_sent("candidate")
        engine.count("candidate", "GET", f"/api/users/{index}", "primary_missing")
    for _ in range(3):  # sent, their responses not in yet
        engine.request_sent("candidate")


def identical(engine: CompareEngine) -> None:
    primary, candidate = Shop("primary"), Shop("candidate")
    for request in requests(2100):
        engine.request_sent("candidate")
        engine.compare(
            "candidate", request.method, request.path, primary.respond(request), candidate.respond(request)
        )


SECTION = {"candidates": ["candidate"]}


@pytest.fixture(scope="module")
def planted_agent() -> Iterator[Live]:
    with live(SECTION, planted) as served:
        yield served


def test_the_api_and_the_verdict_show_the_planted_differences(planted_agent: Live) -> None:
    status, content_type, body = planted_agent.get("/compare")
    assert status == 200 and content_type == "application/json"
    report = json.loads(body)
    (candidate,) = report["targets"]
    regressions = {
        (e["endpoint"], f["field"])
        for e in candidate["endpoints"]
        for f in e["fields"]
        if f["judgement"] == "regression"
    }
    assert regressions == {("GET /api/orders/{id}", "status"), ("GET /api/items/{id}", "items[*].price")}
    assert candidate["outcomes"]["primary_missing"] == 7
    assert (candidate["sent"], sum(candidate["outcomes"].values()), candidate["pending"]) == (2110, 2107, 3)

    status, _, body = planted_agent.get("/verdict")
    verdict = json.loads(body)
    assert status == 503 and verdict["state"] == "fail" and verdict["ok"] is False
    failing = {
        (c["endpoint"], c["goal"])
        for c in verdict["checks"]
        if not c["ok"] and c["endpoint"] != "all endpoints"
    }
    assert failing == {
        ("GET /api/orders/{id}", "regression_rate"),
        ("GET /api/orders/{id}", "error_rate_increase"),
        ("GET /api/items/{id}", "regression_rate"),
        ("GET /api/search", "p99_ratio"),
        ("POST /api/search", "p99_ratio"),
    }
    assert any("items[*].price" in reason for reason in verdict["reasons"])
    always = planted_agent.get("/verdict?always_200=1")
    assert always[0] == 200 and json.loads(always[2]) == verdict


def test_metrics_count_comparisons_differences_and_latency(planted_agent: Live) -> None:
    status, _, body = planted_agent.get("/metrics")
    assert status == 200
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted({"target": "candidate", **labels}.items())))]

    items, orders = "GET /api/items/{id}", "GET /api/orders/{id}"
    assert value("spoa_mirror_compare_comparisons_total", endpoint=items, outcome="different") == 300
    assert value("spoa_mirror_compare_comparisons_total", endpoint="HEAD /health", outcome="identical") == 300
    assert (
        value("spoa_mirror_compare_comparisons_total", endpoint="GET /api/users/{id}", outcome="different")
        == 0
    )
    assert value("spoa_mirror_compare_differences_total", endpoint=orders, kind="status") > 100
    assert value("spoa_mirror_compare_errors_total", endpoint=orders, side="shadow") > 100
    assert value("spoa_mirror_compare_errors_total", endpoint=orders, side="primary") == 0
    assert (
        value("spoa_mirror_compare_latency_seconds_count", endpoint="GET /api/search", side="shadow") == 200
    )
    assert (
        value(
            "spoa_mirror_compare_comparisons_total", endpoint="GET /api/users/{id}", outcome="primary_missing"
        )
        == 7
    )
    total = sum(v for (name, labels), v in samples.items() if name == "spoa_mirror_compare_comparisons_total")
    assert total == 2100 + 7
    # The one account: sent = sum(comparisons over endpoints and outcomes) + pending.
    assert value("spoa_mirror_compare_pending") == 3
    assert value("spoa_mirror_compare_requests_sent_total") == total + 3


def test_identical_servers_pass_the_verdict() -> None:
    with live(SECTION, identical) as served:
        status, _, body = served.get("/verdict")
        assert status == 200, body
        assert json.loads(body)["state"] == "pass"


def test_no_compare_section_answers_404_and_no_metrics() -> None:
    with live(None) as served:
        for path in ("/compare", "/compare.html", "/verdict"):
            status, _, body = served.get(path)
            assert status == 404 and b"not configured" in body
        assert b"spoa_mirror_compare" not in served.get("/metrics")[2]


def test_the_verdict_is_undecided_before_enough_comparisons() -> None:
    with live({"candidates": ["candidate"], "goals": {"min_comparisons": 5000}}, identical) as served:
        status, _, body = served.get("/verdict")
        assert status == 503
        assert json.loads(body)["reasons"] == ["candidate: 2100 of the 5000 comparisons needed"]


def test_the_report_command_prints_the_tables_and_exits_by_verdict(
    planted_agent: Live, tmp_path: Path
) -> None:
    page = tmp_path / "report.html"
    done = subprocess.run(
        [sys.executable, "-m", "spoa_mirror", "report", "--admin", planted_agent.url, "--html", str(page)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 1, done.stderr
    out = done.stdout
    assert "FAIL" in out and "GET /api/items/{id}" in out and "items[*].price" in out
    assert "GET /api/orders/{id}" in out and "200" in out and "500" in out
    assert page.read_text().startswith("<!doctype html>")
    as_json = subprocess.run(
        [sys.executable, "-m", "spoa_mirror", "report", "--admin", planted_agent.url, "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert json.loads(as_json.stdout)["verdict"]["state"] == "fail"
    gone = subprocess.run(
        [sys.executable, "-m", "spoa_mirror", "report", "--admin", "http://127.0.0.1:9"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert gone.returncode == 2 and "cannot read" in gone.stderr


@pytest.mark.skipif(not browser.available(), reason="chromium is not installed")
def test_the_html_report_in_a_real_browser(planted_agent: Live, tmp_path: Path) -> None:
    """Chromium loads the page from the live admin listener: the verdict, the planted fields as
    regressions, the noise fields as noise, the slow endpoint marked; and a screenshot renders."""
    url = planted_agent.url + "/compare.html"
    page = browser.dump_dom(url, tmp_path)
    assert 'class="verdict fail"' in page
    assert "FAIL — a goal is not met" in page
    items_row = browser.endpoint_row(page, "GET /api/items/{id}")
    assert "bad" in items_row.split(">")[0] and "100.0%" in items_row
    assert "slow" in browser.endpoint_row(page, "GET /api/search").split(">")[0]
    for quiet in ("GET /api/users/{id}", "GET /shop/p/{id}", "HEAD /health"):
        assert "bad" not in browser.endpoint_row(page, quiet).split(">")[0], quiet
    assert browser.regressions(page) == {"items[*].price", "status"}
    assert '<span class="badge noise">fetched_at</span>' in page
    assert "<script" not in page and "http://" not in page.replace(planted_agent.url, "")
    shot = tmp_path / "report.png"
    browser.screenshot(url, shot, tmp_path)
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one


def test_the_report_file_is_self_contained(planted_agent: Live, tmp_path: Path) -> None:
    """What replay --compare writes: one file, no script, nothing from the network."""
    report = planted_agent.on_loop(planted_agent.engine.report)
    path = tmp_path / "report.html"
    write_html(report, path)
    text = path.read_text()
    assert "<script" not in text and "<link" not in text and "src=" not in text
    assert "items[*].price" in text and "histogram_quantile" in text


def test_names_from_traffic_are_shown_as_written_not_as_markup() -> None:
    """A JSON key or a path is the client's: `[bold]` in it is text in the terminal table, and `<b>`
    in it is text on the page."""
    import io

    from rich.console import Console

    from spoa_mirror.compare import Response
    from spoa_mirror.compare.render import render_html, render_terminal

    engine = CompareEngine(CompareConfig(candidates=("candidate",)))

    def answer(body: dict[str, int]) -> Response:
        data = json.dumps(body).encode()
        return Response(200, (("Content-Type", "application/json"),), data, len(data), None, 0.01)

    engine.compare("candidate", "GET", "/[red]x[/red]", answer({"[bold]<b>k": 1}), answer({"[bold]<b>k": 2}))
    out = io.StringIO()
    render_terminal(engine.report(), Console(file=out, width=200))
    assert '["[bold]<b>k"]' in out.getvalue() and "GET /[red]x[/red]" in out.getvalue()
    page = render_html(engine.report())
    assert "<b>k" not in page and "&lt;b&gt;k" in page


def test_the_page_marks_slow_only_what_the_verdict_judges_slow() -> None:
    """A fast endpoint 2.5x slower but within p99_slack (2 -> 5 ms) is not marked slow, as the verdict
    does not fail it; one 15x slower and 28 ms over is (the live page had marked a 5 -> 10 ms one)."""
    from spoa_mirror.compare import Response
    from spoa_mirror.compare.render import render_html

    engine = CompareEngine(CompareConfig(candidates=("candidate",)))
    for _ in range(60):
        for path, shadow_latency in (("/fast", 0.005), ("/slow", 0.030)):
            primary = Response(200, (), b"same", 4, None, 0.002)
            engine.compare("candidate", "GET", path, primary, replace(primary, latency=shadow_latency))
    report = engine.report()
    failing = {check["endpoint"] for check in engine.verdict_detail()["checks"] if not check["ok"]}
    assert failing == {"GET /slow", "all endpoints"}
    rows = {
        row.split("</td>", 1)[0].rsplit(">", 1)[1]: row.split(">", 1)[0]
        for row in render_html(report).split("<tr")[1:]
        if "<td class=mono>GET" in row
    }
    assert "slow" in rows["GET /slow"] and "slow" not in rows["GET /fast"], rows

"""deploy/prometheus/: the alerting rules pass `promtool check rules` and their unit tests
(`promtool test rules`), and a real Prometheus (Debian's, on loopback, with a storage directory of
its own) scrapes a live agent mirroring a few seconds of traffic through HAProxy: its HTTP API
returns the agent's series with the values the agent reports, and every alerting rule evaluates
against them without error.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.dashboard_plot import plot_dashboard, promql
from tests.support.mirror_stack import MirrorStack, mirror_stack
from tests.support.procs import HAProxyRelease, free_port, run_process

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERT_TESTS = PROMETHEUS_DIR / "alerts.test.yml"
SCRAPE_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "spoa-mirror.json"
DOCS_PICTURE = ROOT / "docs" / "dashboard.png"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
LOAD_ROUNDS = 5  # one burst a second, so rate() sees the counters move across scrapes
REQUESTS_PER_ROUND = 200


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=PROMETHEUS_DIR)


def alert_names() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["alert"] for group in rules["groups"] for rule in group["rules"]]


def test_promtool_accepts_the_rules() -> None:
    result = promtool("check", "rules", ALERTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in result.stdout


def test_promtool_accepts_the_scrape_config() -> None:
    result = promtool("check", "config", SCRAPE_CONFIG.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_unit_tests_pass() -> None:
    result = promtool("test", "rules", ALERT_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    """A rule with no test that expects it to fire could be silently broken."""
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert set(alert_names()) <= fired, set(alert_names()) - fired


# --- a real Prometheus scraping a live agent ---------------------------------------------------------


@dataclass
class Scraped:
    stack: MirrorStack
    api: str  # Prometheus' base URL
    load_started: float = 0.0  # wall-clock time, for range queries

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; fails the test on any error Prometheus reports."""
        url = f"{self.api}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as response:
            answer = json.load(response)
        assert answer["status"] == "success", f"{expr}: {answer}"
        return answer["data"]["result"]

    def ready(self) -> bool:
        """/-/ready: the port answers 503 until the TSDB is open."""
        try:
            with urllib.request.urlopen(f"{self.api}/-/ready", timeout=5) as response:
                return response.status == 200
        except urllib.error.HTTPError:
            return False

    def rules(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.api}/api/v1/rules", timeout=10) as response:
            answer = json.load(response)
        return [rule for group in answer["data"]["groups"] for rule in group["rules"]]


def prometheus_config(agent_admin: str) -> str:
    """prometheus.yml as shipped, scraping and evaluating every second, aimed at the test agent."""
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(ALERTS)]
    [job] = config["scrape_configs"]
    job["static_configs"] = [{"targets": [agent_admin]}]
    return yaml.safe_dump(config)


@pytest.fixture(scope="module")
def scraped(
    tmp_path_factory: pytest.TempPathFactory, haproxy_release: HAProxyRelease
) -> Iterator[Scraped]:
    """An agent mirroring to a healthy shadow ("ok"), one that refuses connections ("down", so error
    and breaker series exist) and one sampled at 50%, scraped by Prometheus while a bounded load
    (LOAD_ROUNDS x REQUESTS_PER_ROUND requests) goes through HAProxy."""
    tmp_path = tmp_path_factory.mktemp("prometheus")

    def config(shadows: Any) -> dict[str, Any]:
        return {
            "targets": [
                {"name": "ok", "url": shadows["ok"].url},
                {"name": "down", "url": shadows["down"].url, "timeout": "500ms"},
                {"name": "sampled", "url": shadows["sampled"].url, "sample_percentage": 50},
            ]
        }

    with ExitStack() as stack:
        mirror = stack.enter_context(
            mirror_stack(tmp_path, {"ok": "ok", "down": "refuse", "sampled": "ok"}, config)
        )
        port = free_port()
        config_file = tmp_path / "prometheus.yml"
        config_file.write_text(prometheus_config(mirror.admin_url.removeprefix("http://")))
        storage = tmp_path / "tsdb"
        argv = [
            PROMETHEUS,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={storage}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ]
        stack.enter_context(
            run_process(argv, ready_port=port, name="prometheus", log_dir=tmp_path, timeout=30)
        )
        scraped = Scraped(mirror, f"http://127.0.0.1:{port}")
        # The load starts after the first scrape, so rate() has a sample from before it.
        deadline = time.monotonic() + 30
        while not (scraped.ready() and scraped.query('up{job="spoa-mirror"} == 1')):
            assert time.monotonic() < deadline, "Prometheus did not scrape the agent within 30 s"
            time.sleep(0.2)
        scraped.load_started = time.time()
        for _ in range(LOAD_ROUNDS):
            mirror.blast([(f"/load/{n}", {}) for n in range(REQUESTS_PER_ROUND)], concurrency=10)
            time.sleep(1)
        # Two scrapes after the load has settled, so the last counters are in the TSDB.
        before = mirror.metrics()
        mirror.settle("ok", 0, before)
        deadline = time.monotonic() + 30
        while not scraped.query('count_over_time(up{job="spoa-mirror"}[1m]) >= 8'):
            assert time.monotonic() < deadline, "Prometheus did not scrape the agent 8 times in 30 s"
            time.sleep(0.5)
        time.sleep(2.5)
        yield scraped


@pytest.mark.haproxy
def test_prometheus_scrapes_the_agent(scraped: Scraped) -> None:
    [up] = scraped.query('up{job="spoa-mirror"}')
    assert up["value"][1] == "1"


@pytest.mark.haproxy
def test_prometheus_has_the_agents_counts(scraped: Scraped) -> None:
    """The stored counters are the agent's own: every request of the load was offered to each
    target, and the TSDB's latest value equals /metrics now (nothing moves after settle)."""
    agent = scraped.stack.metrics()
    total = LOAD_ROUNDS * REQUESTS_PER_ROUND
    for target in ("ok", "down", "sampled"):
        [received] = scraped.query(f'spoa_mirror_requests_received_total{{target="{target}"}}')
        assert int(received["value"][1]) == total
    stored = {
        (series["metric"]["target"], series["metric"]["outcome"]): int(series["value"][1])
        for series in scraped.query("spoa_mirror_requests_total > 0")
    }
    assert stored[("ok", "sent_2xx")] == total
    assert stored[("sampled", "sampled_out")] + stored[("sampled", "sent_2xx")] == total
    assert sum(count for (target, _), count in stored.items() if target == "down") == total
    for (target, outcome), count in stored.items():
        key = f'spoa_mirror_requests_total{{outcome="{outcome}",target="{target}"}}'
        assert agent[key] == count, key


@pytest.mark.haproxy
def test_prometheus_sees_latency_and_the_event_loop(scraped: Scraped) -> None:
    [p99] = scraped.query(
        "histogram_quantile(0.99, sum by (le) "
        '(rate(spoa_mirror_shadow_latency_seconds_bucket{target="ok"}[1m])))'
    )
    assert 0 < float(p99["value"][1]) < 10
    [ticks] = scraped.query("increase(spoa_mirror_event_loop_lag_seconds_count[1m])")
    assert float(ticks["value"][1]) > 0
    [capacity] = scraped.query('spoa_mirror_queue_capacity{target="ok"}')
    assert capacity["value"][1] == "8192"


@pytest.mark.haproxy
def test_every_alerting_rule_evaluates_without_error(scraped: Scraped) -> None:
    """Prometheus loaded alerts.yml and evaluated each rule on the agent's real series."""
    rules = scraped.rules()
    assert sorted(rule["name"] for rule in rules) == sorted(alert_names())
    for rule in rules:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"


@pytest.mark.haproxy
def test_no_alert_fires_on_a_healthy_target(scraped: Scraped) -> None:
    """The errors and drops alerts are per target: the refusing shadow's errors must not show up
    under the healthy target's name (a `for` keeps them pending at most, within seconds)."""
    for rule in scraped.rules():
        for alert in rule.get("alerts", []):
            assert alert["labels"].get("target") != "ok", alert


# Metrics the rules and the dashboard name that other work adds: allowed to be missing until they
# land, and only those.
PENDING_METRICS: set[str] = set()


def metric_names(text: str) -> set[str]:
    """The spoa_mirror_* families named in PromQL (histogram suffixes dropped)."""
    return {
        re.sub(r"_(bucket|count|sum)$", "", name) for name in re.findall(r"\b(spoa_mirror_[a-z_]+)", text)
    }


def exported_names(scraped: Scraped) -> set[str]:
    with urllib.request.urlopen(f"{scraped.api}/api/v1/label/__name__/values", timeout=10) as response:
        return metric_names(" ".join(json.load(response)["data"]))


@pytest.mark.haproxy
@pytest.mark.parametrize("source", [ALERTS, DASHBOARD], ids=["alerts", "dashboard"])
def test_metric_names_exist_or_are_pending(scraped: Scraped, source: Path) -> None:
    """Every metric the rules or the dashboard name is one the agent exports, but PENDING_METRICS."""
    missing = metric_names(source.read_text()) - exported_names(scraped)
    assert missing <= PENDING_METRICS, missing - PENDING_METRICS


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panel_queries() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"]) for panel in dashboard()["panels"] for target in panel["targets"]
    ]


def test_dashboard_panels_are_laid_out_and_use_the_datasource_variable() -> None:
    panels = dashboard()["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]


@pytest.mark.haproxy
@pytest.mark.parametrize(("title", "expr"), panel_queries())
def test_every_dashboard_query_evaluates_and_returns_data(scraped: Scraped, title: str, expr: str) -> None:
    """On the test Prometheus, with the variables as Grafana fills them: no error, and data, unless
    the query rests on a metric not exported yet (PENDING_METRICS)."""
    result = scraped.query(promql(expr, "1m"))
    if metric_names(expr) & (PENDING_METRICS - exported_names(scraped)):
        return
    assert result, f"{title}: {expr} returned no data"


@pytest.mark.haproxy
def test_dashboard_rendered_with_matplotlib(scraped: Scraped, tmp_path: Path) -> None:
    """Every panel's queries over the load, drawn; UPDATE_DOCS=1 writes the README's picture."""
    out = tmp_path / "dashboard.png"
    plotted = plot_dashboard(dashboard(), scraped.api, scraped.load_started - 2, time.time(), out)
    assert out.stat().st_size > 10_000
    missing = PENDING_METRICS - exported_names(scraped)
    for title, count in plotted.items():
        queries = " ".join(expr for panel_title, expr in panel_queries() if panel_title == title)
        assert count or metric_names(queries) & missing, f"{title}: nothing plotted"
    if os.environ.get("UPDATE_DOCS") == "1":
        shutil.copy(out, DOCS_PICTURE)

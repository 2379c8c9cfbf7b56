"""Record and compare offline: the shipped HAProxy config (2.6 and 3.2) in front of a primary, an agent
whose only target captures requests and the primary's responses (capture.responses, the
mirror-response group paired by unique-id); `replay --compare` then against the same service (pass,
nothing different) and against one with planted differences (exactly those reported, exit 1)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

from tests.support.mirror_stack import parse_metrics
from tests.support.procs import free_port, run_haproxy, run_process
from tests.support.shadow import RecordedRequest, Reply, ShadowServer
from tests.support.shipped_configs import AGENT, SPOE_CONF, bufsize, shipped_haproxy_config
from tests.test_haproxy_configs import localized

pytestmark = pytest.mark.haproxy

ROOT = Path(__file__).resolve().parents[1]
REQUESTS = 120
# Latency is not what this test judges (a shared machine's replay is slower than the primary was).
GOALS = {
    "goals": {"min_comparisons": 50, "min_endpoint_comparisons": 5, "max_p99_ratio": 1000, "p99_slack": "10s"}
}


def service(request: RecordedRequest) -> Reply:
    """The application: JSON items, text pages; the same answer for the same path."""
    name = request.target.rsplit("/", 1)[-1]
    if request.target.startswith("/items/"):
        body = json.dumps({"id": int(name), "price": int(name) * 3 % 97, "currency": "EUR"}).encode()
        return Reply(200, (("Content-Type", "application/json"),), body)
    return Reply(200, (("Content-Type", "text/plain"),), b"page %s\n" % name.encode())


def changed_service(request: RecordedRequest) -> Reply:
    """The candidate with planted differences: the price of every tenth item, and a 500 for page 3."""
    reply = service(request)
    name = request.target.rsplit("/", 1)[-1]
    if request.target.startswith("/items/") and int(name) % 10 == 0:
        document = json.loads(reply.body)
        document["price"] += 1
        return Reply(200, reply.headers, json.dumps(document).encode())
    if request.target == "/pages/3":
        return Reply(500, (("Content-Type", "text/plain"),), b"boom\n")
    return reply


def paths() -> list[str]:
    return [f"/items/{n}" if n % 3 else f"/pages/{n % 7}" for n in range(REQUESTS)]


@contextmanager
def recording_stack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capture: Path
) -> Iterator[tuple[str, str]]:
    monkeypatch.setenv("MIRROR_SAMPLE_PERCENT", "100")
    with ExitStack() as stack:
        primary = stack.enter_context(ShadowServer(responder=service))
        agent_port, admin_port = free_port(), free_port()
        text = shipped_haproxy_config().read_text()
        config = tmp_path / "agent.yaml"
        config.write_text(
            json.dumps(
                {
                    "listen": {"port": agent_port, "max_frame_size": bufsize(text)},
                    "admin": {"port": admin_port},
                    "log": {"format": "json"},
                    "targets": [{"name": "rec", "capture": {"directory": str(capture), "responses": True}}],
                }
            )
        )
        stack.enter_context(
            run_process(
                [str(AGENT), "--config", str(config)], ready_port=agent_port, name="agent", log_dir=tmp_path
            )
        )
        http_port = free_port()
        text = localized(text, primary.port, [agent_port, free_port()], http_port)
        text = text.replace("    server agent2 ", "    #server agent2 ")
        stack.enter_context(run_haproxy(text, tmp_path, extra_files={SPOE_CONF.name: SPOE_CONF.read_text()}))
        yield f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{admin_port}"


def spoa_mirror(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spoa_mirror", *args], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_recorded_responses_compare_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, haproxy_release: object
) -> None:
    capture = tmp_path / "capture"
    with recording_stack(tmp_path, monkeypatch, capture) as (url, admin):
        with httpx.Client(base_url=url, trust_env=False, timeout=5) as client:
            for path in paths():
                assert client.get(path).status_code == 200
        deadline = time.monotonic() + 10
        while True:
            metrics = parse_metrics(httpx.get(admin + "/metrics").text)
            written = metrics.get('spoa_mirror_requests_total{outcome="written",target="rec"}', 0)
            if written == REQUESTS or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert written == REQUESTS
        while metrics.get('spoa_mirror_capture_responses_total{result="written",target="rec"}') != REQUESTS:
            assert time.monotonic() < deadline, metrics
            time.sleep(0.1)
            metrics = parse_metrics(httpx.get(admin + "/metrics").text)
    info = json.loads(spoa_mirror("capture-info", str(capture), "--json").stdout)
    assert info["requests"] == REQUESTS and info["requests_with_response"] == REQUESTS, info

    goals = tmp_path / "compare.yaml"
    goals.write_text(json.dumps(GOALS))
    with ShadowServer(responder=service) as same:
        result = spoa_mirror(
            "replay", str(capture), "--to", same.url, "--rate", "200", "--compare",
            "--compare-config", str(goals), "--report", str(tmp_path / "same.html"), "--json",
        )  # fmt: skip
    summary = json.loads(result.stdout)
    [target] = summary["compare"]["targets"]
    outcomes = {}
    for endpoint in target["endpoints"]:
        for outcome, count in endpoint["outcomes"].items():
            outcomes[outcome] = outcomes.get(outcome, 0) + count
    print(f"\nsame service: verdict {summary['compare']['verdict']['state']}, outcomes {outcomes}")
    assert result.returncode == 0, summary["compare"]["verdict"]
    assert {k: v for k, v in outcomes.items() if v} == {"identical": REQUESTS}
    assert (target["sent"], target["pending"]) == (REQUESTS, 0), "the engine's account: sent = sum + pending"
    assert (tmp_path / "same.html").read_text().startswith("<!doctype html>")

    with ShadowServer(responder=changed_service) as changed:
        result = spoa_mirror(
            "replay", str(capture), "--to", changed.url, "--rate", "200", "--compare",
            "--compare-config", str(goals), "--report", str(tmp_path / "changed.html"),
        )  # fmt: skip
        json_result = spoa_mirror(
            "replay", str(capture), "--to", changed.url, "--rate", "200", "--compare",
            "--compare-config", str(goals), "--report", str(tmp_path / "changed2.html"), "--json",
        )  # fmt: skip
    assert result.returncode == 1, result.stdout[-3000:]
    assert "FAIL" in result.stdout and (tmp_path / "changed.html").exists()
    [target] = json.loads(json_result.stdout)["compare"]["targets"]
    different = {
        endpoint["endpoint"]: (endpoint["regressions"], sorted(f["field"] for f in endpoint["fields"]))
        for endpoint in target["endpoints"]
        if endpoint["regressions"] or endpoint["fields"]
    }
    planted_prices = sum(1 for p in paths() if p.startswith("/items/") and int(p.rsplit("/", 1)[1]) % 10 == 0)
    planted_pages = paths().count("/pages/3")
    print(f"changed service: {different}")
    assert sum(count for count, _ in different.values()) == planted_prices + planted_pages
    fields = {field for _, names in different.values() for field in names}
    assert any("price" in field for field in fields) and any("status" in field for field in fields), fields

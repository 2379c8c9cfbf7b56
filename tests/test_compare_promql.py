"""The verdict's goals in PromQL (compare/goals.py), evaluated by the real Prometheus engine
(`promtool test rules`) over two agent replicas' series, the metric names and labels being the ones
/metrics serves: each goal's query sums the replicas and yields the worst endpoint's figure."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from spoa_mirror.compare import CompareConfig
from spoa_mirror.compare.goals import promql

PROMTOOL = shutil.which("promtool")
OUTCOMES = (
    "identical",
    "different",
    "noise_only",
    "primary_missing",
    "shadow_failed",
    "too_large",
    "table_full",
    "shutdown",
)
BUCKETS = ("0.005", "0.01", "0.05", "0.1", "+Inf")


def series(replica: str, endpoint: str, per_minute: dict[str, int], shadow_errors: int,
           primary_bucket: str, shadow_bucket: str) -> list[dict[str, str]]:  # fmt: skip
    """One replica's counters for one endpoint, rising by `per_minute` each minute for 20 minutes."""
    labels = f'target="candidate",endpoint="{endpoint}",instance="{replica}"'
    out = [
        {"series": f'spoa_mirror_compare_comparisons_total{{{labels},outcome="{outcome}"}}',
         "values": f"0+{per_minute.get(outcome, 0)}x20"}
        for outcome in OUTCOMES
    ]  # fmt: skip
    compared = sum(per_minute.get(outcome, 0) for outcome in ("identical", "different", "noise_only"))
    out.append(
        {
            "series": f'spoa_mirror_compare_errors_total{{{labels},side="shadow"}}',
            "values": f"0+{shadow_errors}x20",
        }
    )
    out.append({"series": f'spoa_mirror_compare_errors_total{{{labels},side="primary"}}', "values": "0+0x20"})
    for side, bucket in (("primary", primary_bucket), ("shadow", shadow_bucket)):
        for bound in BUCKETS:
            count = compared if BUCKETS.index(bound) >= BUCKETS.index(bucket) else 0
            name = f'spoa_mirror_compare_latency_seconds_bucket{{{labels},side="{side}",le="{bound}"}}'
            out.append({"series": name, "values": f"0+{count}x20"})
    return out


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")
def test_the_goals_promql_judges_the_sum_of_the_replicas(tmp_path: Path) -> None:
    inputs = []
    # The family carries the whole account: requests that were not compared must weigh in no rate.
    uncompared = {"primary_missing": 5, "too_large": 1, "table_full": 2, "shutdown": 1}
    for replica in ("agent-a", "agent-b"):
        # GET /a: 1 in 10 comparisons regress, 1 in 10 shadow answers a 5xx, the shadow 10x slower.
        compared = {"identical": 6, "noise_only": 3, "different": 1}
        inputs += series(replica, "GET /a", {**compared, **uncompared}, 1, "0.01", "0.1")
        # GET /b: all good; GET /rare: bad, but under min_endpoint_comparisons (20) in 10 minutes
        # (its uncompared requests, over 20, do not count towards that either).
        inputs += series(replica, "GET /b", {"identical": 10, **uncompared}, 0, "0.01", "0.01")
        if replica == "agent-a":
            inputs += series(replica, "GET /rare", {"different": 1, "primary_missing": 30}, 0, "0.01", "0.01")
    goals = {g["goal"]: g for g in promql(CompareConfig(candidates=("candidate",)), "candidate")}
    expected = {"min_comparisons": 10 * (2 * 20 + 1), "regression_rate": 0.1, "error_rate_increase": 0.1}
    tests = [
        {"expr": goals[name]["query"], "eval_time": "20m", "exp_samples": [{"labels": "{}", "value": value}]}
        for name, value in expected.items()
    ]
    # histogram_quantile interpolates within the bucket: 0.05 + 0.99 * 0.05 over 0.005 + 0.99 * 0.005.
    worst_ratio = goals["p99_ratio"]["query"].removesuffix(" or vector(1)")
    tests.append(
        {"expr": f"count(({worst_ratio} > 9.99) < 10.01)", "eval_time": "20m",
         "exp_samples": [{"labels": "{}", "value": 1}]}
    )  # fmt: skip
    (tmp_path / "test.yaml").write_text(
        yaml.safe_dump(
            {"rule_files": [], "evaluation_interval": "1m",
             "tests": [{"interval": "1m", "input_series": inputs, "promql_expr_test": tests}]}
        )
    )  # fmt: skip
    command = [PROMTOOL, "test", "rules", "test.yaml"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr

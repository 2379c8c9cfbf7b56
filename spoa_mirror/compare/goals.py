"""The verdict's goals as PromQL, for a replicated deployment: each agent replica sees only its share
of the traffic, so its /verdict judges a share; Prometheus sums the comparison metrics of every
replica and judges the whole. Each query returns one number (the worst endpoint), to be held against
the goal, e.g. by an Argo Rollouts or Flagger Prometheus metric (`result[0] <= 0.01`).

These are the same goals as the engine's verdict with two simplifications, said here so nobody is
surprised: an outcome is counted as it was judged when the comparison was made (the engine's report
judges again with everything learnt since, so a field recognised as noise after its first 20
comparisons weighs a little in PromQL and not at all in /verdict), and the p99 comes from the coarse
Prometheus buckets rather than the engine's 4% ones.
"""

from __future__ import annotations

from typing import Any

from .config import CompareConfig

COMPARED = 'outcome=~"identical|different|noise_only"'


def promql(config: CompareConfig, target: str, window: str = "10m") -> list[dict[str, Any]]:
    goals = config.goals
    selector = f'target="{target}"'

    comparisons, errors_total = "spoa_mirror_compare_comparisons_total", "spoa_mirror_compare_errors_total"

    def total(outcomes: str) -> str:
        return f"sum by (endpoint) (increase({comparisons}{{{selector},{outcomes}}}[{window}]))"

    def errors(side: str) -> str:
        return f'sum by (endpoint) (increase({errors_total}{{{selector},side="{side}"}}[{window}]))'

    def p99(side: str) -> str:
        return (
            "histogram_quantile(0.99, sum by (endpoint, le) "
            f'(rate(spoa_mirror_compare_latency_seconds_bucket{{{selector},side="{side}"}}[{window}])))'
        )

    judged = f"{total(COMPARED)} >= {goals.min_endpoint_comparisons}"
    different = total('outcome="different"')
    failed = total('outcome="shadow_failed"')
    attempted = total('outcome=~"identical|different|noise_only|shadow_failed"')
    shadow_rate = f"({errors('shadow')} + {failed}) / {attempted}"
    primary_rate = f"{errors('primary')} / {total(COMPARED)}"
    return [
        {
            "goal": "min_comparisons",
            "query": f"sum(increase({comparisons}{{{selector},{COMPARED}}}[{window}]))",
            "condition": f"result[0] >= {goals.min_comparisons}",
        },
        {
            "goal": "regression_rate",
            "query": f"max(({different} / {total(COMPARED)}) and on (endpoint) ({judged})) or vector(0)",
            "condition": f"result[0] <= {goals.max_regression_rate:g}",
        },
        {
            "goal": "error_rate_increase",
            "query": f"max(({shadow_rate} - {primary_rate}) and on (endpoint) ({judged})) or vector(0)",
            "condition": f"result[0] <= {goals.max_error_rate_increase:g}",
        },
        {
            "goal": "p99_ratio",
            "query": f"max(({p99('shadow')} / {p99('primary')}) and on (endpoint) "
            f"(({p99('shadow')} - {p99('primary')}) > {goals.p99_slack:g}) and on (endpoint) ({judged})) "
            "or vector(1)",
            "condition": f"result[0] <= {goals.max_p99_ratio:g}",
        },
    ]

"""deploy/grafana/spoa-mirror.json's panels drawn with matplotlib from a real Prometheus: the same
PromQL, asked over a time range, one subplot per panel. tests/test_prometheus.py renders it from the
agent it scrapes; with UPDATE_DOCS=1 the picture replaces docs/dashboard.png (the README's)."""

from __future__ import annotations

import json
import math
import re
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after the backend is chosen

GRAFANA_VARIABLES = {"$job": "spoa-mirror", "$target": ".*"}


def promql(expr: str, rate_interval: str) -> str:
    """A panel's expression with the dashboard's variables as Grafana would fill them for the test
    Prometheus (job `spoa-mirror`, every target)."""
    expr = expr.replace("$__rate_interval", rate_interval)
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def legend(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda match: labels.get(match[1], ""), template)


def query_range(api: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    url = f"{api}/api/v1/query_range?" + urllib.parse.urlencode(
        {"query": expr, "start": start, "end": end, "step": step}
    )
    with urllib.request.urlopen(url, timeout=10) as response:
        answer = json.load(response)
    if answer["status"] != "success":
        raise AssertionError(f"{expr}: {answer}")
    return answer["data"]["result"]


def plot_dashboard(
    dashboard: dict[str, Any], api: str, start: float, end: float, out: Path
) -> dict[str, int]:
    """Draw every panel over [start, end] (series that stay at zero are left out); returns the number
    of series Prometheus returned per panel title."""
    panels = dashboard["panels"]
    columns = 2
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(16, 3.4 * rows), squeeze=False)
    plotted = {}
    for axis, panel in zip(axes.flat, panels, strict=False):
        count = drawn = 0
        for target in panel["targets"]:
            for series in query_range(api, promql(target["expr"], "4s"), start, end, 1):
                times = [float(t) - start for t, _ in series["values"]]
                values = [float(v) for _, v in series["values"]]
                count += 1
                if not any(value for value in values if not math.isnan(value)):
                    continue  # an outcome that never happened: a flat zero in every panel
                axis.plot(times, values, label=legend(target["legendFormat"], series["metric"]))
                drawn += 1
        plotted[panel["title"]] = count
        axis.set_ylim(bottom=0)
        unit = panel["fieldConfig"]["defaults"].get("unit", "")
        axis.set_title(panel["title"] + (f" ({unit})" if unit not in ("", "short") else ""), fontsize=10)
        axis.set_xlabel("seconds", fontsize=8)
        axis.tick_params(labelsize=8)
        if drawn:
            axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        else:
            axis.text(
                0.5,
                0.5,
                "all zero" if count else "no data (metric not in this build)",
                ha="center",
                va="center",
                transform=axis.transAxes,
            )
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    figure.suptitle(f"{dashboard['title']}: deploy/grafana dashboard queries, test Prometheus")
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    figure.savefig(out, dpi=80)
    plt.close(figure)
    return plotted

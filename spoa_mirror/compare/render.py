"""The report for people: a self-contained HTML page (inline CSS, no script, nothing fetched from the
network) and the same as terminal tables (rich), both from the JSON-able dict `CompareEngine.report()`
returns, so the admin page, `spoa-mirror report` and `replay --compare` show one thing.

Read top-down in a minute: the verdict and its reasons; one row per endpoint (compared, regression
rate, noise rate, 5xx, p50/p99 primary against shadow); then, per endpoint that differs, its fields
(regressions first) with the evidence and a few example pairs side by side.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

_STATE_TEXT = {
    "pass": "PASS — the candidates meet every goal",
    "fail": "FAIL — a goal is not met",
    "undecided": "UNDECIDED — not enough comparisons yet",
}

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2430;
  background:#f5f6f8}
main{max-width:1180px;margin:0 auto;padding:20px 24px 40px}
h1{font-size:20px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}h3{font-size:15px;margin:18px 0 6px}
.muted{color:#667085}.mono,code,td.v{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px}
.verdict{border-radius:8px;padding:12px 16px;margin:14px 0;color:#fff}
.verdict b{font-size:16px}.verdict ul{margin:6px 0 0 18px;padding:0}
.pass{background:#1f8a4c}.fail{background:#c0392b}.undecided{background:#6b7280}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #dde1e7;border-radius:6px}
th,td{padding:6px 9px;border-bottom:1px solid #eceff3;text-align:left;vertical-align:top}
th{background:#eef1f5;font-weight:600;font-size:12.5px}td.n{text-align:right;white-space:nowrap}
tr.bad td{background:#fdeceb}tr.slow td.lat{background:#fff4e0}
.badge{display:inline-block;border-radius:10px;padding:0 8px;font-size:12px;font-weight:600}
.badge.regression{background:#fbd5d1;color:#9b2c1f}.badge.noise{background:#e3e8ef;color:#475467}
.cards{display:flex;gap:10px;flex-wrap:wrap;margin:8px 0}
.card{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:8px 12px;min-width:120px}
.card b{display:block;font-size:18px}.card.bad b{color:#c0392b}
details{margin:8px 0}summary{cursor:pointer;font-weight:600}
td.v{white-space:pre-wrap;word-break:break-all;max-width:380px}td.v.p{background:#f3f7ff}td.v.c{background:#fff6f0}
.fields td{font-size:13px}
"""


def render_html(report: dict[str, Any]) -> str:
    verdict = report["verdict"]
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<meta name=viewport content='width=device-width,initial-scale=1'>",
        "<title>spoa-mirror compare report</title>",
        f"<style>{_CSS}</style></head><body><main>",
        "<h1>spoa-mirror — does the candidate answer like the primary?</h1>",
        f"<div class=muted>generated {_e(report['generated_at'])} · candidates: "
        f"{_e(', '.join(report['candidates']))} · baseline: {_e(report['baseline'] or 'none')}</div>",
        f"<div class='verdict {verdict['state']}' id=verdict><b>{_e(_STATE_TEXT[verdict['state']])}</b><ul>",
        *(f"<li>{_e(reason)}</li>" for reason in verdict["reasons"]),
        "</ul></div>",
    ]
    for target in report["targets"]:
        parts.append(_target_html(target, report))
    parts.append(_footer_html(report))
    parts.append("</main></body></html>")
    return "\n".join(parts)


def write_html(report: dict[str, Any], path: str | Path) -> None:
    """The report as one self-contained file (replay --compare writes it)."""
    Path(path).write_text(render_html(report), encoding="utf-8")


def _target_html(target: dict[str, Any], report: dict[str, Any]) -> str:
    role = (
        "baseline: the primary's version, how noisy the primary is with itself"
        if target["role"] == "baseline"
        else "candidate: compared with the primary"
    )
    outcomes = target["outcomes"]
    unpaired = ", ".join(f"{name.replace('_', ' ')} {count}" for name, count in outcomes.items()
                         if count and name not in ("identical", "different", "noise_only"))  # fmt: skip
    latency = target["latency"]
    cards = [
        _card("compared", f"{target['compared']:,}"),
        _card(
            "regressions",
            f"{target['regressions']:,} ({_pct(target['regression_rate'])})",
            bad=target["regressions"] > 0,
        ),
        _card("noise only", f"{target['noise_only']:,} ({_pct(target['noise_rate'])})"),
        _card("identical", f"{target['identical']:,}"),
        _card(
            "5xx or failed, primary → shadow",
            f"{_pct(target['error_rate']['primary'])} → {_pct(target['error_rate']['shadow'])}",
            bad=target["error_rate"]["shadow"] > target["error_rate"]["primary"],
        ),
        _card("p99, primary → shadow", f"{_ms(latency['primary']['p99'])} → {_ms(latency['shadow']['p99'])}"),
    ]
    out = [
        f"<h2 id='target-{_e(target['name'])}'>{_e(target['name'])} "
        f"<span class=muted>· {_e(role)}</span></h2>",
        f"<div class=cards>{''.join(cards)}</div>",
    ]
    if unpaired:
        out.append(f"<div class=muted>not compared: {_e(unpaired)}</div>")
    if not target["endpoints"]:
        out.append("<p class=muted>nothing compared yet</p>")
        return "\n".join(out)
    max_ratio, slack = report["goals"]["max_p99_ratio"], report["goals"]["p99_slack"]
    out.append(
        "<table class=endpoints><thead><tr><th>endpoint</th><th>compared</th><th>regression rate</th>"
        "<th>noise rate</th><th>5xx primary → shadow</th><th>p50 primary → shadow</th>"
        "<th>p99 primary → shadow</th><th>top differing fields</th></tr></thead><tbody>"
    )
    for endpoint in target["endpoints"]:
        ratio = _ratio(endpoint)
        classes = [
            c
            for c, on in (
                ("bad", endpoint["regressions"] > 0),
                ("slow", ratio is not None and ratio > max_ratio and _slower_than_slack(endpoint, slack)),
            )
            if on
        ]
        top = ", ".join(
            f"<span class='badge {f['judgement']}'>{_e(f['field'])}</span>" for f in endpoint["fields"][:3]
        )
        lat = endpoint["latency"]
        out.append(
            f"<tr class='{' '.join(classes)}'><td class=mono>{_e(endpoint['endpoint'])}</td>"
            f"<td class=n>{endpoint['compared']:,}</td><td class=n>{_pct(endpoint['regression_rate'])}</td>"
            f"<td class=n>{_pct(endpoint['noise_rate'])}</td>"
            f"<td class=n>{_pct(endpoint['error_rate']['primary'])} → "
            f"{_pct(endpoint['error_rate']['shadow'])}</td>"
            f"<td class='n lat'>{_ms(lat['primary']['p50'])} → {_ms(lat['shadow']['p50'])}</td>"
            f"<td class='n lat'>{_ms(lat['primary']['p99'])} → {_ms(lat['shadow']['p99'])}"
            f"{'' if ratio is None else f' ({ratio:.1f}x)'}</td><td>{top or '—'}</td></tr>"
        )
    out.append("</tbody></table>")
    for endpoint in target["endpoints"]:
        if endpoint["fields"]:
            out.append(_fields_html(endpoint))
    return "\n".join(out)


def _fields_html(endpoint: dict[str, Any]) -> str:
    open_ = " open" if endpoint["regressions"] else ""
    out = [
        f"<details{open_}><summary class=mono>{_e(endpoint['endpoint'])} — "
        f"{len(endpoint['fields'])} differing "
        f"field(s), {endpoint['regressions']:,} regressions, {endpoint['noise_only']:,} noise only</summary>",
        "<table class=fields><thead><tr><th>field</th><th>judgement</th><th>evidence</th><th>where</th>"
        "<th>primary</th><th>candidate</th></tr></thead><tbody>",
    ]
    for field in endpoint["fields"]:
        examples = field["examples"] or [{"where": "—", "primary": "", "candidate": ""}]
        span = len(examples)
        for index, example in enumerate(examples):
            head = (
                f"<td rowspan={span} class=mono>{_e(field['field'])}"
                f"<div class=muted>{_e(field['kind'])}</div></td>"
                f"<td rowspan={span}><span class='badge {field['judgement']}'>"
                f"{field['judgement']}</span></td>"
                f"<td rowspan={span}>{_e(field['evidence'])}</td>"
                if index == 0
                else ""
            )
            out.append(
                f"<tr>{head}<td class=mono title='{_e(example.get('request', ''))}'>"
                f"{_e(example['where'])}</td>"
                f"<td class='v p'>{_e(example['primary'])}</td>"
                f"<td class='v c'>{_e(example['candidate'])}</td></tr>"
            )
    out.append("</tbody></table></details>")
    return "\n".join(out)


def _footer_html(report: dict[str, Any]) -> str:
    goals, noise, bounds = report["goals"], report["noise"], report["bounds"]
    out = [
        "<h2>How this was judged</h2><ul>",
        f"<li>Goals per endpoint with at least {goals['min_endpoint_comparisons']} comparisons, and over all "
        f"endpoints, once a candidate has {goals['min_comparisons']}: regression rate ≤ "
        f"{_pct(goals['max_regression_rate'])}; 5xx-or-failed rate at most "
        f"{_pct(goals['max_error_rate_increase'])} "
        f"above the primary's; p99 ≤ {goals['max_p99_ratio']:g}x the primary's (or within "
        f"{goals['p99_slack'] * 1000:g} ms).</li>",
        "<li>Noise: "
        + (
            f"a field is a regression only where the candidate differs clearly more often than the baseline "
            f"({report['baseline']}) does (by over {_pct(noise['baseline_margin'])}, 99% intervals apart)."
            if report["baseline"]
            else f"a field that differs in at least {_pct(noise['threshold'])} of its comparisons, "
            "as timestamps, "
            f"UUIDs or random ids, is noise (judged after {noise['min_samples']} comparisons)."
        )
        + "</li>",
        f"<li>Headers never compared: <span class=mono>{_e(', '.join(report['ignored_headers']))}</span>; "
        "Set-Cookie by cookie names and attributes only.</li>",
    ]
    if report["ignored_json_paths"]:
        out.append(
            f"<li>JSON paths ignored: "
            f"<span class=mono>{_e(', '.join(report['ignored_json_paths']))}</span></li>"
        )
    out.append(
        f"<li>Bounds: examples {bounds['examples_bytes']:,} of {bounds['examples_budget']:,} bytes; at most "
        f"{bounds['endpoints_max']} endpoints per target (then <code>other</code>), {bounds['fields_max']} "
        f"fields per endpoint; diff log lines {bounds['diff_log_written']:,} written, "
        f"{bounds['diff_log_suppressed']:,} over the rate.</li></ul>"
    )
    out.append("<details><summary>The same goals in PromQL, for replicated agents</summary>")
    for candidate, queries in report["promql"].items():
        for goal in queries:
            out.append(
                f"<h3>{_e(candidate)}: {_e(goal['goal'])} "
                f"<span class=muted>({_e(goal['condition'])})</span></h3>"
                f"<pre class=mono style='white-space:pre-wrap'>{_e(goal['query'])}</pre>"
            )
    out.append("</details>")
    return "\n".join(out)


def _card(label: str, value: str, bad: bool = False) -> str:
    marked = " bad" if bad else ""
    return f"<div class='card{marked}'><span class=muted>{_e(label)}</span><b>{_e(value)}</b></div>"


def _ratio(endpoint: dict[str, Any]) -> float | None:
    primary, shadow = endpoint["latency"]["primary"]["p99"], endpoint["latency"]["shadow"]["p99"]
    return None if not primary or shadow is None else shadow / primary


def _slower_than_slack(endpoint: dict[str, Any], slack: float) -> bool:
    """The shadow's p99 exceeds the primary's by more than the goal's slack: as the verdict judges, a
    few ms of jitter on a fast endpoint (5 -> 10 ms, 2x) is not slow."""
    primary, shadow = endpoint["latency"]["primary"]["p99"], endpoint["latency"]["shadow"]["p99"]
    return shadow - primary > slack


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _pct(rate: float) -> str:
    return f"{rate:.1%}" if rate else "0%"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.0f} s"


# -- terminal ----------------------------------------------------------------------------------------


def render_terminal(report: dict[str, Any], console: Any = None) -> None:
    """The report as rich tables on `console` (a new one on stdout by default). Every name and value
    comes from traffic (paths, JSON keys, bodies): escaped, never read as rich markup."""
    from rich.console import Console
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table

    console = console or Console()
    verdict = report["verdict"]
    colour = {"pass": "green", "fail": "red", "undecided": "yellow"}[verdict["state"]]
    console.print(
        Panel(
            "\n".join(f"• {escape(reason)}" for reason in verdict["reasons"]),
            title=f"[bold {colour}]{_STATE_TEXT[verdict['state']]}",
            border_style=colour,
        )
    )
    for target in report["targets"]:
        if not target["endpoints"]:
            console.print(f"{escape(target['name'])} ({target['role']}): nothing compared yet")
            continue
        table = Table(
            title=f"{escape(target['name'])} ({target['role']}): {target['compared']:,} compared, "
            f"{target['regressions']:,} regressions, {target['noise_only']:,} noise only",
            title_justify="left",
        )
        for column, justify in (("endpoint", "left"), ("compared", "right"), ("regr.", "right"),
                                ("noise", "right"), ("5xx p→s", "right"), ("p99 p→s", "right"),
                                ("top differing fields", "left")):  # fmt: skip
            table.add_column(column, justify=justify)  # type: ignore[arg-type]
        for endpoint in target["endpoints"]:
            lat = endpoint["latency"]
            ratio = _ratio(endpoint)
            style = "red" if endpoint["regressions"] else None
            fields = ", ".join(
                f"[{'red' if f['judgement'] == 'regression' else 'dim'}]{escape(f['field'])}[/]"
                for f in endpoint["fields"][:3]
            )
            table.add_row(
                escape(endpoint["endpoint"]),
                f"{endpoint['compared']:,}",
                _pct(endpoint["regression_rate"]),
                _pct(endpoint["noise_rate"]),
                f"{_pct(endpoint['error_rate']['primary'])}→{_pct(endpoint['error_rate']['shadow'])}",
                f"{_ms(lat['primary']['p99'])}→{_ms(lat['shadow']['p99'])}"
                + ("" if ratio is None else f" {ratio:.1f}x"),
                fields or "—",
                style=style,
            )
        console.print(table)
        regressions = [
            (e["endpoint"], f)
            for e in target["endpoints"]
            for f in e["fields"]
            if f["judgement"] == "regression"
        ]
        if regressions:
            detail = Table(title="regressions, with an example", title_justify="left")
            for column in ("endpoint", "field", "evidence", "where", "primary", "candidate"):
                detail.add_column(column, overflow="fold")
            for name, field in regressions:
                example = (
                    field["examples"][0]
                    if field["examples"]
                    else {"where": "", "primary": "", "candidate": ""}
                )
                cells = (name, field["field"], field["evidence"], example["where"], example["primary"],
                         example["candidate"])  # fmt: skip
                detail.add_row(*(escape(cell) for cell in cells))
            console.print(detail)

"""The comparator: pairs of responses in; per-endpoint statistics, noise, a report and a verdict out.

Runs on the SPOP event loop (the pairing table calls `request_sent` when a compared target sends a
request, then `compare` when both sides of it are in, or `count` when one side never comes); the
engine keeps the whole account of a compared target: sent = sum(outcomes over its endpoints) +
pending, every request ending with exactly one outcome (the /metrics families and /compare's
targets show all three from one moment). The admin thread reads it through `report()` and `verdict()`
scheduled on that loop, so it sees one moment.

Regression or noise. A difference is kept per *field* (`items[*].price`, `header content-type`,
`status`) of an *endpoint* (`GET /users/{id}`) of a *target*. A field is noise when:
- a baseline target (the primary's version) is configured and has been compared at least
  `noise.min_samples` times on that endpoint: unless the candidate differs there clearly more often
  than the baseline does (by more than `baseline_margin`, 99% Wilson intervals apart; or at all, by
  more than the margin, where the baseline never differs), Diffy's way;
  a baseline response handed to `compare` for the same request also cancels, for that request, the
  fields where the baseline differs too;
- otherwise (`noise.auto`): it differs in at least `noise.threshold` of the comparisons since it was
  first seen, and nine in ten of those differences are values of one volatile shape (timestamps,
  UUIDs, random ids; shapes.py); until `min_samples` comparisons, a volatile-shaped difference is
  provisionally noise and any other a regression.
Everything else that differs is a regression. Each comparison's outcome is `identical`, `noise_only`
or `different` (a regression), judged when it is made (that is what the metrics count); the report
and the verdict judge again with everything learnt since, from the set of differing fields of each
comparison (its signature, a bit per field, up to SIGNATURES per endpoint), so a timestamp field
recognised as noise after 20 comparisons does not leave those 20 counted as regressions.

Bounded: `endpoints.max` endpoints per target (then `other`), `examples.max_fields` fields per endpoint
(then `(other fields)`), SIGNATURES signatures per endpoint, `examples.per_field` examples per field
of `examples.max_chars` characters each, all examples together within `examples.budget` bytes.
Examples are redacted before they are kept: by the target's `redact_response` hook when given, and
always by `scrub` (Set-Cookie values are never compared nor kept; tokens, passwords, JWTs and
secret-named JSON keys and headers are masked).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NamedTuple

from ..accounting import Histogram
from .config import CompareConfig
from .diff import KINDS, Differ, Difference
from .difflog import DiffLog
from .endpoints import OTHER, EndpointNamer
from .goals import promql
from .model import Response
from .scrub import scrub, sensitive_name
from .shapes import shape_of
from .stats import LogHistogram, clearly_more

COMPARED = ("identical", "different", "noise_only")
# Outcomes without a pair to compare, counted by the pairing table with count().
UNPAIRED = ("primary_missing", "shadow_failed", "too_large", "table_full", "shutdown")
OUTCOMES = COMPARED + UNPAIRED
OTHER_FIELDS = "(other fields)"
SIGNATURES = 64  # distinct sets of differing fields remembered per endpoint
VOLATILE_SHARE = 0.9  # of a field's differences that must be volatile-shaped for it to be noise
SIDES = ("primary", "shadow")
SCRUB_MARGIN = 512  # characters scrubbed past what an example shows
MIN_EXAMPLE = 64  # bytes: with less left of examples.budget, no example is even attempted

RedactResponse = Callable[[str, Response], Response]


class Verdict(NamedTuple):
    ok: bool
    reasons: tuple[str, ...]


class _Field:
    __slots__ = ("differs", "examples", "first_at", "hidden_at", "index", "kind", "name", "shape", "volatile")

    def __init__(self, name: str, kind: str, index: int, first_at: int, hidden_at: int) -> None:
        self.name = name
        self.kind = kind
        self.index = index  # its bit in the endpoint's signatures
        self.first_at = first_at  # the endpoint's comparison count when this field first differed
        self.hidden_at = hidden_at  # ... and its count of status changes (which hide every other field)
        self.differs = 0  # comparisons in which it differed
        self.volatile = 0  # ... only in volatile shapes
        self.shape = ""  # the shape of its values, for the evidence
        self.examples: list[dict[str, str]] = []


class _Endpoint:
    __slots__ = (
        "compared", "errors", "fields", "kinds", "latency", "name", "outcomes", "prom_latency",
        "signatures", "status_changes", "unsigned_regressions",
    )  # fmt: skip

    def __init__(self, name: str) -> None:
        self.name = name
        self.compared = 0
        self.status_changes = 0  # comparisons whose status differed: nothing else was compared
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.fields: dict[str, _Field] = {}
        self.kinds: dict[str, int] = {}
        self.signatures: dict[int, int] = {}  # bit i set: the endpoint's i-th field differed
        self.unsigned_regressions = 0  # comparisons past SIGNATURES judged regressions when made
        self.latency = {side: LogHistogram() for side in SIDES}
        self.prom_latency = {side: Histogram() for side in SIDES}
        self.errors = dict.fromkeys(SIDES, 0)  # 5xx answers among the compared pairs


class _Target:
    __slots__ = ("endpoints", "name", "pending", "role", "sent")

    def __init__(self, name: str, role: str) -> None:
        self.name = name
        self.role = role
        self.endpoints: dict[str, _Endpoint] = {}
        self.sent = 0  # requests the target sent, each of which ends with one outcome
        self.pending = 0  # of those, the ones whose outcome is not known yet


class CompareEngine:
    def __init__(
        self,
        config: CompareConfig,
        *,
        redact_response: RedactResponse | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`redact_response(target, response)`: the target's redaction of a response, applied before
        any example is kept or logged."""
        self._targets: dict[str, _Target] = {}
        self._redact = redact_response
        self._clock = clock
        self._example_bytes = 0
        self._diff_log: DiffLog | None = None
        self.apply(config)

    def apply(self, config: CompareConfig) -> None:
        """A new `compare:` section (SIGHUP): rules change, statistics stay."""
        self.config = config
        self._differ = Differ(config.ignore, config.body_limit)
        self._namer = EndpointNamer(config.endpoints)
        old_log, self._diff_log = self._diff_log, None
        if config.diff_log is not None:
            if old_log is not None and old_log.config == config.diff_log:
                self._diff_log = old_log
                old_log = None
            else:
                self._diff_log = DiffLog(config.diff_log)
        if old_log is not None:
            old_log.close()
        for name, target in self._targets.items():
            target.role = self._role(name)

    def close(self) -> None:
        if self._diff_log is not None:
            self._diff_log.close()

    # -- input -----------------------------------------------------------------------------------

    def request_sent(self, target: str) -> None:
        """`target` sent a request: it is pending until `compare` or `count` gives its outcome."""
        owner = self._target(target)
        owner.sent += 1
        owner.pending += 1

    def compare(
        self,
        target: str,
        method: str,
        path: str,
        primary: Response,
        candidate: Response,
        baseline: Response | None = None,
    ) -> str:
        """Compare one request's primary and `target` responses; the outcome (identical, different,
        noise_only). `baseline`: the baseline target's response to the same request, when at hand:
        fields where it differs from the primary too are noise for this request. Should comparing
        raise (a bug), the request is still counted, as different, before the error goes up."""
        owner = self._target(target)
        endpoint = self._endpoint(owner, method, path)
        outcome = "different"
        try:
            outcome = self._compare(owner, endpoint, method, path, primary, candidate, baseline)
        finally:
            endpoint.outcomes[outcome] += 1
            owner.pending -= 1
        return outcome

    def _compare(
        self,
        owner: _Target,
        endpoint: _Endpoint,
        method: str,
        path: str,
        primary: Response,
        candidate: Response,
        baseline: Response | None,
    ) -> str:
        endpoint.compared += 1
        for side, response in (("primary", primary), ("shadow", candidate)):
            endpoint.latency[side].observe(response.latency)
            endpoint.prom_latency[side].observe(response.latency)
            if response.status >= 500:
                endpoint.errors[side] += 1
        differences = self._differ.diff(primary, candidate)
        if not differences:
            return "identical"
        return self._judge(owner, endpoint, method, path, differences, primary, candidate, baseline)

    def count(self, target: str, method: str, path: str, outcome: str) -> None:
        """A request `target` sent that ended without a comparison (UNPAIRED)."""
        if outcome not in UNPAIRED:
            raise ValueError(f"unknown comparison outcome {outcome!r}; one of {', '.join(UNPAIRED)}")
        owner = self._target(target)
        self._endpoint(owner, method, path).outcomes[outcome] += 1
        owner.pending -= 1

    def _target(self, name: str) -> _Target:
        found = self._targets.get(name)
        if found is None:
            found = self._targets[name] = _Target(name, self._role(name))
        return found

    def _role(self, name: str) -> str:
        """candidate or baseline; "former" for a target a reload took out of the section: its
        statistics are still shown, never judged."""
        if name == self.config.baseline:
            return "baseline"
        return "candidate" if name in self.config.candidates else "former"

    def _endpoint(self, target: _Target, method: str, path: str) -> _Endpoint:
        name = self._namer.name(method, path)
        found = target.endpoints.get(name)
        if found is None:
            if len(target.endpoints) >= self.config.endpoints.max:
                name = OTHER
                found = target.endpoints.get(OTHER)
            if found is None:
                found = target.endpoints[name] = _Endpoint(name)
        return found

    def _judge(
        self,
        target: _Target,
        endpoint: _Endpoint,
        method: str,
        path: str,
        differences: list[Difference],
        primary: Response,
        candidate: Response,
        baseline: Response | None,
    ) -> str:
        if differences[0].kind == "status":
            endpoint.status_changes += 1
        by_field: dict[str, list[Difference]] = {}
        for difference in differences:
            by_field.setdefault(difference.field, []).append(difference)
            endpoint.kinds[difference.kind] = endpoint.kinds.get(difference.kind, 0) + 1
        cancelled = (
            {difference.field for difference in self._differ.diff(primary, baseline)} if baseline else set()
        )
        regression = False
        signature = 0
        wanting: list[tuple[_Field, list[Difference]]] = []
        room = self._example_bytes + MIN_EXAMPLE < self.config.examples.budget  # else no more are kept
        counted: set[int] = set()
        for name, group in by_field.items():
            field = self._field(endpoint, name, group[0].kind)
            volatile = all(difference.volatile for difference in group)
            if field.index not in counted:  # `(other fields)` stands for several: once per comparison
                counted.add(field.index)
                field.differs += 1
                field.volatile += volatile
            if not field.shape:
                field.shape = shape_of(group[0].candidate)
            if name not in cancelled:
                signature |= 1 << field.index
                regression = regression or not self._is_noise(target, endpoint, field, volatile)[0]
            short = len(field.examples) + sum(f is field for f, _ in wanting) < self.config.examples.per_field
            if room and short:
                wanting.append((field, group))
        if signature:
            if signature in endpoint.signatures or len(endpoint.signatures) < SIGNATURES:
                endpoint.signatures[signature] = endpoint.signatures.get(signature, 0) + 1
            elif regression:
                endpoint.unsigned_regressions += 1
        log = self._diff_log if self._diff_log is not None and self._diff_log.take() else None
        if wanting or log is not None:
            self._keep(target, endpoint, method, path, differences, wanting, primary, candidate, log)
        return "different" if regression else "noise_only"

    def _field(self, endpoint: _Endpoint, name: str, kind: str) -> _Field:
        field = endpoint.fields.get(name)
        if field is None:
            if len(endpoint.fields) >= self.config.examples.max_fields:
                name, kind = OTHER_FIELDS, "mixed"
                field = endpoint.fields.get(name)
            if field is None:
                field = endpoint.fields[name] = _Field(
                    name, kind, len(endpoint.fields), endpoint.compared, endpoint.status_changes
                )
        return field

    def _is_noise(
        self, target: _Target, endpoint: _Endpoint, field: _Field, volatile_now: bool | None
    ) -> tuple[bool, str]:
        """(noise?, the evidence). `volatile_now`: this comparison's difference was volatile-shaped
        (live judgement); None when judging from the totals (report)."""
        noise_config = self.config.noise
        seen = _seen(endpoint, field)
        rate = field.differs / seen
        said = f"differs in {rate:.0%} of {seen} comparisons"
        base = self._baseline_endpoint(target, endpoint.name)
        if base is not None and base.compared >= noise_config.min_samples:
            base_field = base.fields.get(field.name)
            base_differs = base_field.differs if base_field else 0
            base_seen = _seen(base, base_field) if base_field else base.compared
            margin = noise_config.baseline_margin
            # Where the baseline never differs, any rate over the margin is the candidate's own.
            more = clearly_more(field.differs, seen, base_differs, base_seen, margin) or (
                base_differs == 0 and rate > margin
            )
            return (
                not more,
                f"{said}; the baseline differs there in {base_differs / base_seen:.0%} of {base_seen}",
            )
        if not noise_config.auto or field.name == OTHER_FIELDS:
            return False, said
        volatile_share = field.volatile / field.differs if field.differs else 0.0
        shaped = (
            f"{said}, {volatile_share:.0%} of them in a volatile shape ({field.shape})"
            if field.volatile
            else said
        )
        if seen >= noise_config.min_samples:
            return rate >= noise_config.threshold and volatile_share >= VOLATILE_SHARE, shaped
        if volatile_now is not None:
            return volatile_now, f"{shaped} (provisional: under {noise_config.min_samples} comparisons)"
        return (
            volatile_share >= VOLATILE_SHARE,
            f"{shaped} (provisional: under {noise_config.min_samples} comparisons)",
        )

    def _baseline_endpoint(self, target: _Target, endpoint: str) -> _Endpoint | None:
        baseline = self.config.baseline
        if baseline is None or target.name == baseline or baseline not in self._targets:
            return None
        return self._targets[baseline].endpoints.get(endpoint)

    def _keep(
        self,
        target: _Target,
        endpoint: _Endpoint,
        method: str,
        path: str,
        differences: list[Difference],
        wanting: list[tuple[_Field, list[Difference]]],
        primary: Response,
        candidate: Response,
        log: DiffLog | None,
    ) -> None:
        """Examples for the fields still short of them, and the diff log's lines: from the responses
        as redacted, never from the raw ones."""
        shown = self._shown_values(target.name, primary, candidate)
        request = scrub(f"{method} {path.partition('?')[0]}", False)[: self.config.examples.max_chars]
        budget = self.config.examples.budget
        for field, group in wanting:
            first = group[0]
            primary_text, candidate_text = shown(first)
            example = {
                "where": first.where,
                "request": request,
                "primary": primary_text,
                "candidate": candidate_text,
            }
            size = sum(len(value) for value in example.values())
            if self._example_bytes + size > budget:
                break
            field.examples.append(example)
            self._example_bytes += size
        if log is not None:
            for difference in differences:
                primary_text, candidate_text = shown(difference)
                log.write(
                    {
                        "ts": datetime.fromtimestamp(self._clock(), UTC).isoformat(timespec="milliseconds"),
                        "target": target.name,
                        "endpoint": endpoint.name,
                        "request": request,
                        "kind": difference.kind,
                        "field": difference.field,
                        "where": difference.where,
                        "primary": primary_text,
                        "candidate": candidate_text,
                    }
                )

    def _shown_values(
        self, target: str, primary: Response, candidate: Response
    ) -> Callable[[Difference], tuple[str, str]]:
        """The two values of a difference as they may be shown: taken from the target's redaction of
        both responses (the same difference found again there), scrubbed, truncated."""
        redacted: dict[str, Difference] | None = None
        if self._redact is not None:
            redacted = {
                d.where: d
                for d in self._differ.diff(self._redact(target, primary), self._redact(target, candidate))
            }
        limit = self.config.examples.max_chars

        def shown(difference: Difference) -> tuple[str, str]:
            if redacted is not None:
                found = redacted.get(difference.where)
                if found is None:  # redaction made the two sides equal: nothing to show
                    return "<redacted>", "<redacted>"
                difference = found
            named = difference.kind.startswith(("json", "header"))  # a key or header names the value
            secret = named and sensitive_name(difference.field)
            loose = not difference.kind.startswith("json")  # text lines and headers: no key names
            return (
                _shown_text(_display(difference.kind, difference.primary), secret, loose, limit),
                _shown_text(_display(difference.kind, difference.candidate), secret, loose, limit),
            )

        return shown

    # -- output ----------------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """Everything a person needs to judge the candidate, JSON-able (the /compare API, the HTML
        page, `spoa-mirror report`, `replay --compare`)."""
        config = self.config
        targets = [self._target_report(target) for target in self._ordered_targets()]
        verdict = self._verdict(targets)
        return {
            "generated_at": datetime.fromtimestamp(self._clock(), UTC).isoformat(timespec="seconds"),
            "verdict": verdict,
            "goals": config.goals.model_dump(),
            "noise": config.noise.model_dump(),
            "baseline": config.baseline,
            "candidates": list(config.candidates),
            "targets": targets,
            "ignored_headers": sorted(self._differ.ignored_headers)
            + [f"{p}*" for p in self._differ.ignored_prefixes],
            "ignored_json_paths": list(config.ignore.json_paths),
            "promql": {candidate: promql(config, candidate) for candidate in config.candidates},
            "bounds": {
                "examples_bytes": self._example_bytes,
                "examples_budget": config.examples.budget,
                "endpoints_max": config.endpoints.max,
                "fields_max": config.examples.max_fields,
                "diff_log_written": self._diff_log.written if self._diff_log else 0,
                "diff_log_suppressed": self._diff_log.suppressed if self._diff_log else 0,
            },
        }

    def verdict(self) -> Verdict:
        detail = self._verdict([self._target_report(target) for target in self._ordered_targets()])
        return Verdict(detail["ok"], tuple(detail["reasons"]))

    def verdict_detail(self) -> dict[str, Any]:
        """The verdict as /verdict answers it: state pass, fail or undecided, ok, reasons, checks."""
        return self._verdict([self._target_report(target) for target in self._ordered_targets()])

    def _ordered_targets(self) -> list[_Target]:
        names = [*self.config.candidates, *([self.config.baseline] if self.config.baseline else [])]
        names += sorted(name for name in self._targets if name not in names)
        return [self._targets.get(name) or _Target(name, self._role(name)) for name in names]

    def _target_report(self, target: _Target) -> dict[str, Any]:
        endpoints = [self._endpoint_report(target, endpoint) for endpoint in target.endpoints.values()]
        endpoints.sort(key=lambda e: (-e["regressions"], -e["compared"], e["endpoint"]))
        total = _sum_endpoints(endpoints, [endpoint.pop("_latency") for endpoint in endpoints])
        account = {"sent": target.sent, "pending": target.pending}  # sent = sum(outcomes) + pending
        return {"name": target.name, "role": target.role, **account, **total, "endpoints": endpoints}

    def _endpoint_report(self, target: _Target, endpoint: _Endpoint) -> dict[str, Any]:
        judged = {
            name: self._is_noise(target, endpoint, field, None) for name, field in endpoint.fields.items()
        }
        regressions = endpoint.unsigned_regressions
        regressing = sum(1 << field.index for name, field in endpoint.fields.items() if not judged[name][0])
        for signature, count in endpoint.signatures.items():
            if signature & regressing:
                regressions += count
        # The rest differed only in noise: fields judged noise now, or cancelled by the baseline's
        # response to the same request (no signature kept for those).
        noise_only = endpoint.compared - endpoint.outcomes["identical"] - regressions
        fields = []
        for name, field in endpoint.fields.items():
            noise, evidence = judged[name]
            fields.append(
                {
                    "field": name,
                    "kind": field.kind,
                    "judgement": "noise" if noise else "regression",
                    "differs": field.differs,
                    "seen": _seen(endpoint, field),
                    "evidence": evidence,
                    "examples": list(field.examples),
                }
            )
        fields.sort(key=lambda f: (f["judgement"] != "regression", -f["differs"], f["field"]))
        failed = endpoint.outcomes["shadow_failed"]
        return {
            "endpoint": endpoint.name,
            "compared": endpoint.compared,
            "outcomes": dict(endpoint.outcomes),
            "regressions": regressions,
            "noise_only": noise_only,
            "identical": endpoint.outcomes["identical"],
            "regression_rate": _rate(regressions, endpoint.compared),
            "noise_rate": _rate(noise_only, endpoint.compared),
            "errors": {"primary": endpoint.errors["primary"], "shadow": endpoint.errors["shadow"] + failed},
            "error_rate": {
                "primary": _rate(endpoint.errors["primary"], endpoint.compared),
                "shadow": _rate(endpoint.errors["shadow"] + failed, endpoint.compared + failed),
            },
            "latency": {
                side: {
                    "count": endpoint.latency[side].count,
                    "p50": endpoint.latency[side].quantile(0.5),
                    "p99": endpoint.latency[side].quantile(0.99),
                }
                for side in SIDES
            },
            "differences_by_kind": {kind: endpoint.kinds[kind] for kind in KINDS if kind in endpoint.kinds},
            "fields": fields,
            "_latency": endpoint.latency,  # merged into the target's total, then dropped
        }

    def _verdict(self, targets: list[dict[str, Any]]) -> dict[str, Any]:
        goals = self.config.goals
        reasons: list[str] = []
        checks: list[dict[str, Any]] = []
        undecided: list[str] = []
        for target in targets:
            if target["role"] != "candidate":
                continue
            name = target["name"]
            if target["compared"] < goals.min_comparisons:
                undecided.append(
                    f"{name}: {target['compared']} of the {goals.min_comparisons} comparisons needed"
                )
                continue
            scopes = [("all endpoints", target)]
            scopes += [
                (e["endpoint"], e)
                for e in target["endpoints"]
                if e["compared"] >= goals.min_endpoint_comparisons
            ]
            for scope, stats in scopes:
                for check in _checks(goals, stats):
                    check.update(target=name, endpoint=scope)
                    checks.append(check)
                    if not check["ok"]:
                        reasons.append(f"{name} {scope}: {check['says']}")
        if reasons:
            state = "fail"
        elif undecided or not checks:
            state = "undecided"
            reasons = undecided or ["no candidate has been compared yet"]
        else:
            state = "pass"
            compared = sum(t["compared"] for t in targets if t["role"] == "candidate")
            reasons = [f"{len(checks)} checks met over {compared} comparisons"]
        return {"state": state, "ok": state == "pass", "reasons": reasons, "checks": checks}

    # -- for the Prometheus collector (metrics.py) -----------------------------------------------

    def accounts(self) -> list[tuple[str, int, int]]:
        """(target, sent, pending) of every compared target, configured or seen, zeros included."""
        return [(target.name, target.sent, target.pending) for target in self._ordered_targets()]

    def series(self) -> list[tuple[str, str, _Endpoint]]:
        return [
            (target.name, name, endpoint)
            for target in self._targets.values()
            for name, endpoint in target.endpoints.items()
        ]

    @property
    def example_bytes(self) -> int:
        return self._example_bytes

    @property
    def diff_log(self) -> DiffLog | None:
        return self._diff_log


def _seen(endpoint: _Endpoint, field: _Field) -> int:
    """Comparisons in which the field was compared, since it first differed: a status change hides
    every other field of its comparison."""
    seen = endpoint.compared - field.first_at + 1
    if field.name != "status":
        seen -= endpoint.status_changes - field.hidden_at
    return max(1, seen)


def _checks(goals: Any, stats: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    rate, compared = stats["regression_rate"], stats["compared"]
    out.append(
        {
            "goal": "regression_rate",
            "ok": rate <= goals.max_regression_rate,
            "value": rate,
            "limit": goals.max_regression_rate,
            "says": f"{rate:.1%} of {compared} comparisons regress (goal ≤ {goals.max_regression_rate:.1%})"
            + _top_regression(stats),
        }
    )
    errors = stats["error_rate"]
    shadow_errors, primary_errors = errors["shadow"], errors["primary"]
    increase = shadow_errors - primary_errors
    out.append(
        {
            "goal": "error_rate_increase",
            "ok": increase <= goals.max_error_rate_increase,
            "value": increase,
            "limit": goals.max_error_rate_increase,
            "says": f"5xx-or-failed rate {shadow_errors:.1%} against the primary's {primary_errors:.1%} "
            f"(goal: at most {goals.max_error_rate_increase:.1%} more)",
        }
    )
    primary, shadow = stats["latency"]["primary"]["p99"], stats["latency"]["shadow"]["p99"]
    if primary is not None and shadow is not None:
        ratio = shadow / primary if primary > 0 else 1.0
        ok = ratio <= goals.max_p99_ratio or shadow - primary <= goals.p99_slack
        out.append(
            {
                "goal": "p99_ratio",
                "ok": ok,
                "value": ratio,
                "limit": goals.max_p99_ratio,
                "says": f"p99 {shadow * 1000:.1f} ms, the primary's {primary * 1000:.1f} ms ({ratio:.2f}x) "
                f"(goal ≤ {goals.max_p99_ratio:g}x, or within {goals.p99_slack * 1000:g} ms)",
            }
        )
    return out


def _top_regression(stats: dict[str, Any]) -> str:
    fields = stats.get("fields") or [field for e in stats.get("endpoints", []) for field in e["fields"]]
    regressions = sorted((f for f in fields if f["judgement"] == "regression"), key=lambda f: -f["differs"])
    return f"; most often {regressions[0]['field']}" if regressions and stats["regressions"] else ""


def _sum_endpoints(
    endpoints: list[dict[str, Any]], latencies: list[dict[str, LogHistogram]]
) -> dict[str, Any]:
    compared = sum(e["compared"] for e in endpoints)
    regressions = sum(e["regressions"] for e in endpoints)
    noise_only = sum(e["noise_only"] for e in endpoints)
    outcomes = dict.fromkeys(OUTCOMES, 0)
    errors = dict.fromkeys(SIDES, 0)
    merged = {side: LogHistogram() for side in SIDES}
    for endpoint, latency in zip(endpoints, latencies, strict=True):
        for outcome, count in endpoint["outcomes"].items():
            outcomes[outcome] += count
        for side in SIDES:
            errors[side] += endpoint["errors"][side]
            histogram = latency[side]
            for index, count in histogram.buckets.items():
                merged[side].buckets[index] = merged[side].buckets.get(index, 0) + count
            merged[side].count += histogram.count
    failed = outcomes["shadow_failed"]
    return {
        "compared": compared,
        "outcomes": outcomes,
        "regressions": regressions,
        "noise_only": noise_only,
        "identical": outcomes["identical"],
        "regression_rate": _rate(regressions, compared),
        "noise_rate": _rate(noise_only, compared),
        "errors": errors,
        "error_rate": {
            "primary": _rate(errors["primary"], compared),
            "shadow": _rate(errors["shadow"], compared + failed),
        },
        "latency": {
            side: {
                "count": merged[side].count,
                "p50": merged[side].quantile(0.5),
                "p99": merged[side].quantile(0.99),
            }
            for side in SIDES
        },
    }


def _rate(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _display(kind: str, value: Any) -> str:
    if value is None and kind != "json_value" and kind != "json_type":
        return "(absent)"
    if kind.startswith("json"):
        if kind == "json_array_length":
            return f"{value} items"
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return str(value)


def _shown_text(text: str, secret: bool, loose: bool, limit: int) -> str:
    """Scrubbed and truncated; only the start is scrubbed (what is shown, and a margin for a secret
    that begins there), so a 1 MB value costs what a short one does."""
    window = scrub(text[: limit + SCRUB_MARGIN], secret, loose)
    if len(text) <= limit + SCRUB_MARGIN:
        return _truncate(window, limit)
    return f"{window[:limit]}… ({len(text) - limit} more)"


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit} more)"

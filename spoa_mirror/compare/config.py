"""The `compare:` section: which targets are compared with the primary, and how.

Absent, nothing is compared anywhere and no target's response body ever reaches Python. Validated
with pydantic into a frozen model; the first problem becomes one `ConfigError` line naming the dotted
key, `compare.goals.max_p99_ratio: must be greater than or equal to 1`, like the rest of the config.

Reference (`key` (default): meaning):

compare.response_message (mirror-response): SPOE message carrying the primary's response (unique-id,
    status, res.hdrs, res.body), paired with the request message by unique-id.
compare.candidates (required): target names whose responses are compared with the primary's.
compare.baseline (unset): a target running the primary's version; how often it differs from the
    primary says which fields are noise (a field is a regression only where a candidate differs
    clearly more often than the baseline does).
compare.body_limit (256KiB): bytes of each body kept for comparison; a longer body is compared by
    length and SHA-256 only.
compare.table.max_entries (10000), compare.table.max_bytes (16MiB), compare.table.deadline (10s):
    the pairing table holding one side until the other arrives; over either bound a new entry is
    counted table_full; an entry whose other side has not come by the deadline is counted
    primary_missing or shadow_failed.
compare.ignore.default_headers (true): skip the headers that vary by nature (Date, Age, Server, ETag,
    Set-Cookie values, request and trace ids, ...: engine.DEFAULT_IGNORED_HEADERS).
compare.ignore.headers ([]): more header names never compared (case-insensitive).
compare.ignore.json_paths ([]): JSON fields never compared: `meta.request_id`, `items[*].updated_at`,
    `*.etag` (`*` one key, `[*]` any index, `**` any depth; a leading `$.` is optional).
compare.ignore.patterns ([]): regexes; text matching one is blanked on both sides (JSON strings, header
    values, text lines) before values are compared.
compare.noise.auto (true): without a baseline, a field whose values differ in at least `threshold` of
    the comparisons where it appears, in a volatile shape (timestamps, UUIDs, random ids and tokens,
    epoch numbers), is reported as noise with that evidence, not as a regression.
compare.noise.threshold (0.8): share of comparisons a field must differ in to be noise.
compare.noise.min_samples (20): comparisons of a field before it is judged (until then a volatile-
    shaped difference counts as noise and any other as a difference).
compare.noise.baseline_margin (0.05): with a baseline, a field is a regression when the candidate's
    difference rate exceeds the baseline's by more than this and clearly (99% confidence intervals
    apart).
compare.endpoints.templates ([]): path templates such as `/users/{user}/orders/{order}`, tried first;
    otherwise numeric, UUID and long hex segments become `{id}`.
compare.endpoints.max (100): distinct endpoints (method + template) per target; later ones are counted
    under `other`, so memory and metric series stay bounded.
compare.examples.per_field (3): example pairs kept per differing field, redacted and truncated.
compare.examples.max_chars (200): characters of each example value kept.
compare.examples.max_fields (32): differing fields tracked per endpoint; more are counted as one
    `(other fields)`.
compare.examples.budget (2MiB): bytes all examples together may hold.
compare.goals.min_comparisons (100): comparisons per candidate before any verdict (until then
    /verdict answers "undecided").
compare.goals.min_endpoint_comparisons (20): an endpoint with fewer comparisons is not judged alone.
compare.goals.max_regression_rate (0.01): share of an endpoint's comparisons that may show a
    regression (a difference that is not noise).
compare.goals.max_error_rate_increase (0.01): how much the candidate's 5xx-or-failed rate may exceed
    the primary's 5xx rate, per endpoint.
compare.goals.max_p99_ratio (1.5): candidate p99 latency / primary p99, per endpoint...
compare.goals.p99_slack (5ms): ...unless the candidate's p99 is within this of the primary's.
compare.diff_log (unset): {path: FILE or "-" for stdout, rate: lines per second (10)}: one JSON line
    per difference, redacted, for log pipelines; lines over the rate are counted, not written.
"""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator

from ..config_types import (
    Bool,
    KiB,
    MiB,
    Section,
    Str,
    bounded_duration,
    bounded_size,
    config_error,
    format_size,
    int_between,
    problem,
)
from ..errors import ConfigError

Name = Annotated[Str, Field(min_length=1, max_length=128)]
Share = Annotated[float, Field(ge=0.0, le=1.0)]


class TableConfig(Section):
    max_entries: int_between(1, 10_000_000) = 10_000
    max_bytes: bounded_size(minimum=64 * KiB) = 16 * MiB
    deadline: bounded_duration(low=0.01, high=600.0) = 10.0


class IgnoreConfig(Section):
    default_headers: Bool = True
    headers: tuple[Name, ...] = ()
    json_paths: tuple[Name, ...] = ()
    patterns: tuple[re.Pattern[str], ...] = ()

    @field_validator("headers")
    @classmethod
    def _lower(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(name.lower() for name in names)

    @field_validator("patterns", mode="before")
    @classmethod
    def _compile(cls, patterns: Any) -> Any:
        if not isinstance(patterns, list | tuple):
            return patterns
        compiled = []
        for pattern in patterns:
            if isinstance(pattern, re.Pattern):
                compiled.append(pattern)
                continue
            if not isinstance(pattern, str):
                raise problem(f"each pattern must be a string (a regex), got {pattern!r}")
            try:
                compiled.append(re.compile(pattern))
            except re.error as error:
                raise problem(f"bad regex {pattern!r}: {error}") from None
        return tuple(compiled)


class NoiseConfig(Section):
    auto: Bool = True
    threshold: Annotated[float, Field(gt=0.0, le=1.0)] = 0.8
    min_samples: int_between(1, 100_000) = 20
    baseline_margin: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05


class EndpointsConfig(Section):
    templates: tuple[Name, ...] = ()
    max: int_between(1, 10_000) = 100

    @field_validator("templates")
    @classmethod
    def _absolute(cls, templates: tuple[str, ...]) -> tuple[str, ...]:
        for template in templates:
            if not template.startswith("/"):
                raise problem(f"a template is a path starting with /, got {template!r}")
        return templates


class ExamplesConfig(Section):
    per_field: int_between(0, 20) = 3
    max_chars: int_between(16, 10_000) = 200
    max_fields: int_between(1, 1_000) = 32
    budget: bounded_size(maximum=64 * MiB) = 2 * MiB


class GoalsConfig(Section):
    min_comparisons: int_between(1, 10**9) = 100
    min_endpoint_comparisons: int_between(1, 10**9) = 20
    max_regression_rate: Share = 0.01
    max_error_rate_increase: Share = 0.01
    max_p99_ratio: Annotated[float, Field(ge=1.0)] = 1.5
    p99_slack: bounded_duration(allow_zero=True, low=0.0, high=60.0) = 0.005


class DiffLogConfig(Section):
    path: Name = "-"
    rate: Annotated[float, Field(gt=0.0, le=100_000.0)] = 10.0


class CompareConfig(Section):
    response_message: Name = "mirror-response"
    candidates: tuple[Name, ...]
    baseline: Name | None = None
    body_limit: bounded_size(minimum=1, maximum=64 * MiB) = 256 * KiB
    table: TableConfig = TableConfig()
    ignore: IgnoreConfig = IgnoreConfig()
    noise: NoiseConfig = NoiseConfig()
    endpoints: EndpointsConfig = EndpointsConfig()
    examples: ExamplesConfig = ExamplesConfig()
    goals: GoalsConfig = GoalsConfig()
    diff_log: DiffLogConfig | None = None

    @field_validator("candidates")
    @classmethod
    def _some(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        if not names:
            raise problem("must name at least one target, got an empty list")
        return names

    @property
    def compared(self) -> tuple[str, ...]:
        """Every target whose responses are paired with the primary's: the candidates and the baseline."""
        return self.candidates + ((self.baseline,) if self.baseline else ())


def parse_compare(data: object, target_names: tuple[str, ...], key: str = "compare") -> CompareConfig | None:
    """The validated section, or None when it is absent (null); the first problem as one ConfigError."""
    if data is None:
        return None
    try:
        section = CompareConfig.model_validate(data)
    except ValidationError as error:
        raise config_error(error, key) from None
    for index, name in enumerate(section.candidates):
        if name not in target_names:
            raise ConfigError(f"{key}.candidates[{index}]", _unknown_target(name, target_names))
        if name in section.candidates[:index]:
            raise ConfigError(f"{key}.candidates[{index}]", f"{name!r} is listed twice")
    if section.baseline is not None:
        if section.baseline not in target_names:
            raise ConfigError(f"{key}.baseline", _unknown_target(section.baseline, target_names))
        if section.baseline in section.candidates:
            raise ConfigError(
                f"{key}.baseline", f"{section.baseline!r} is also a candidate; a target is one or the other"
            )
    return section


def _unknown_target(name: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; targets are {', '.join(known) or 'none'}"
    return f"no target is named {name!r}{hint}"


def describe_compare(section: CompareConfig | None) -> list[str]:
    """The section in plain words, for `spoa-mirror check-config`."""
    if section is None:
        return ["Compare: off (no compare section); shadow responses are counted, not compared"]
    goals, noise = section.goals, section.noise
    baseline = (
        f"noise measured against baseline {section.baseline}"
        if section.baseline
        else f"noise recognised by shape (auto: {'on' if noise.auto else 'off'})"
    )
    ignored = "the naturally varying headers" if section.ignore.default_headers else "no default headers"
    extra = [
        *section.ignore.headers,
        *section.ignore.json_paths,
        *(p.pattern for p in section.ignore.patterns),
    ]
    return [
        f"Compare: {', '.join(section.candidates)} against the primary (SPOE message "
        f"{section.response_message}); {baseline}",
        f"  bodies up to {format_size(section.body_limit)} compared by content, longer ones by length "
        "and SHA-256; "
        f"ignores {ignored}" + (f" and {', '.join(extra)}" if extra else ""),
        f"  pairing table: {section.table.max_entries} entries, {format_size(section.table.max_bytes)}, "
        f"deadline {section.table.deadline:g}s; at most {section.endpoints.max} endpoints per target",
        f"  verdict after {goals.min_comparisons} comparisons: regressions <= "
        f"{goals.max_regression_rate:.1%} per endpoint, 5xx rate <= primary's + "
        f"{goals.max_error_rate_increase:.1%}, "
        f"p99 <= {goals.max_p99_ratio:g}x the primary's (or within {goals.p99_slack * 1000:g} ms)",
    ]

"""The `compare:` section: which targets are compared with the primary, and how.

Absent, nothing is compared anywhere and no target's response body ever reaches Python. Validated
with pydantic into a frozen model; the first problem becomes one `ConfigError` line naming the dotted
key, `compare.goals.max_p99_ratio: must be greater than or equal to 1`, like the rest of the config.

Each key's meaning is its Field description: the README's configuration table and the JSON Schema
are generated from them (config_doc.py).
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
    """The pairing table holding one side of a comparison until the other arrives."""

    max_entries: int_between(1, 10_000_000) = Field(
        10_000, description="entries held at most; over it (or max_bytes) a new entry is counted table_full"
    )
    max_bytes: bounded_size(minimum=64 * KiB) = Field(
        16 * MiB, description="bytes held at most, inside the agent's memory_budget"
    )
    deadline: bounded_duration(low=0.01, high=600.0) = Field(
        10.0,
        description="an entry whose other side has not come by then is counted primary_missing or "
        "shadow_failed",
    )


class IgnoreConfig(Section):
    """What is never compared."""

    default_headers: Bool = Field(
        True,
        description="skip the headers that vary by nature (Date, Age, Server, ETag, Set-Cookie values, "
        "request and trace ids, ...: engine.DEFAULT_IGNORED_HEADERS)",
    )
    headers: tuple[Name, ...] = Field((), description="more header names never compared (case-insensitive)")
    json_paths: tuple[Name, ...] = Field(
        (),
        description="JSON fields never compared: meta.request_id, items[*].updated_at, *.etag (* one key, "
        "[*] any index, ** any depth; a leading $. is optional)",
    )
    patterns: tuple[re.Pattern[str], ...] = Field(
        (),
        description="regexes; text matching one is blanked on both sides (JSON strings, header values, "
        "text lines) before values are compared",
    )

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
    """How differences that are not regressions are recognised."""

    auto: Bool = Field(
        True,
        description="without a baseline, a field whose values differ in at least `threshold` of the "
        "comparisons where it appears, in a volatile shape (timestamps, UUIDs, random ids and tokens, "
        "epoch numbers), is reported as noise with that evidence, not as a regression",
    )
    threshold: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        0.8, description="share of comparisons a field must differ in to be noise"
    )
    min_samples: int_between(1, 100_000) = Field(
        20,
        description="comparisons of a field before it is judged (until then a volatile-shaped difference "
        "counts as noise and any other as a difference)",
    )
    baseline_margin: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        0.05,
        description="with a baseline, a field is a regression when the candidate's difference rate exceeds "
        "the baseline's by more than this and clearly (99% confidence intervals apart)",
    )


class EndpointsConfig(Section):
    """How requests are grouped into endpoints (method + path template)."""

    templates: tuple[Name, ...] = Field(
        (),
        description="path templates such as /users/{user}/orders/{order}, tried first; otherwise numeric, "
        "UUID and long hex segments become {id}",
    )
    max: int_between(1, 10_000) = Field(
        100,
        description="distinct endpoints per target; later ones are counted under `other`, so memory and "
        "metric series stay bounded",
    )

    @field_validator("templates")
    @classmethod
    def _absolute(cls, templates: tuple[str, ...]) -> tuple[str, ...]:
        for template in templates:
            if not template.startswith("/"):
                raise problem(f"a template is a path starting with /, got {template!r}")
        return templates


class ExamplesConfig(Section):
    """Example pairs the report shows, redacted and truncated."""

    per_field: int_between(0, 20) = Field(3, description="example pairs kept per differing field")
    max_chars: int_between(16, 10_000) = Field(200, description="characters of each example value kept")
    max_fields: int_between(1, 1_000) = Field(
        32, description="differing fields tracked per endpoint; more are counted as one `(other fields)`"
    )
    budget: bounded_size(maximum=64 * MiB) = Field(
        2 * MiB, description="bytes all examples together may hold"
    )


class GoalsConfig(Section):
    """The verdict's goals (GET /verdict, replay --compare's exit status)."""

    min_comparisons: int_between(1, 10**9) = Field(
        100, description='comparisons per candidate before any verdict (until then "undecided")'
    )
    min_endpoint_comparisons: int_between(1, 10**9) = Field(
        20, description="an endpoint with fewer comparisons is not judged alone"
    )
    max_regression_rate: Share = Field(
        0.01,
        description="share of an endpoint's comparisons that may show a regression (a difference that is "
        "not noise)",
    )
    max_error_rate_increase: Share = Field(
        0.01,
        description="how much the candidate's 5xx-or-failed rate may exceed the primary's 5xx rate, per "
        "endpoint",
    )
    max_p99_ratio: Annotated[float, Field(ge=1.0)] = Field(
        1.5, description="candidate p99 latency / primary p99 at most, per endpoint..."
    )
    p99_slack: bounded_duration(allow_zero=True, low=0.0, high=60.0) = Field(
        0.005, description="...unless the candidate's p99 is within this of the primary's"
    )


class DiffLogConfig(Section):
    """One JSON line per difference, redacted, for log pipelines."""

    path: Name = Field("-", description='a file, or "-" for stdout')
    rate: Annotated[float, Field(gt=0.0, le=100_000.0)] = Field(
        10.0, description="lines per second at most; lines over the rate are counted, not written"
    )


class CompareConfig(Section):
    """Compare candidate targets' responses with the primary's; absent, no response is compared and no
    shadow response body reaches Python."""

    response_message: Name = Field(
        "mirror-response",
        description="SPOE message carrying the primary's response (unique-id, status, res.hdrs, res.body), "
        "paired with the request message by unique-id",
    )
    candidates: tuple[Name, ...] = Field(
        description="target names whose responses are compared with the primary's"
    )
    baseline: Name | None = Field(
        None,
        description="a target running the primary's version; how often it differs from the primary says "
        "which fields are noise",
    )
    body_limit: bounded_size(minimum=1, maximum=64 * MiB) = Field(
        256 * KiB,
        description="bytes of each body kept for comparison; a longer body is compared by length and "
        "SHA-256 only",
    )
    table: TableConfig = Field(default_factory=TableConfig, description=TableConfig.__doc__)
    ignore: IgnoreConfig = Field(default_factory=IgnoreConfig, description=IgnoreConfig.__doc__)
    noise: NoiseConfig = Field(default_factory=NoiseConfig, description=NoiseConfig.__doc__)
    endpoints: EndpointsConfig = Field(default_factory=EndpointsConfig, description=EndpointsConfig.__doc__)
    examples: ExamplesConfig = Field(default_factory=ExamplesConfig, description=ExamplesConfig.__doc__)
    goals: GoalsConfig = Field(default_factory=GoalsConfig, description=GoalsConfig.__doc__)
    diff_log: DiffLogConfig | None = Field(None, description=DiffLogConfig.__doc__)

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
    _check_names(section, target_names, key)
    return section


def check_compared_targets(section: CompareConfig, targets: tuple[Any, ...], workers: int) -> None:
    """What the section asks of the targets it names, checked when the whole config is read: they
    exist, speak HTTP/1.1 (only that transport keeps responses), and one process pairs them."""
    _check_names(section, tuple(target.name for target in targets), "compare")
    if workers > 1:
        # HAProxy may send a request's two messages on different connections, which the kernel
        # spreads over the worker processes, each with a pairing table of its own.
        raise ConfigError("compare", f"needs listen.workers: 1 (got {workers}): one process pairs")
    for target in targets:
        if target.name in section.compared and target.protocol != "http1":
            raise ConfigError(
                f"{target.config_key}.protocol",
                f"is {target.protocol}: only http1 targets are compared (compare names {target.name!r})",
            )


def _check_names(section: CompareConfig, target_names: tuple[str, ...], key: str) -> None:
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

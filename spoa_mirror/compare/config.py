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

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from ..errors import ConfigError

KiB = 1024
MiB = 1024 * KiB


def _size(value: object) -> int:
    from ..config import parse_size  # config imports this module

    try:
        return parse_size(value, "")
    except ConfigError as error:
        raise ValueError(error.problem) from None


def _duration(value: object) -> float:
    from ..config import parse_duration

    try:
        return parse_duration(value, "")
    except ConfigError as error:
        raise ValueError(error.problem) from None


Size = Annotated[int, BeforeValidator(_size)]
Duration = Annotated[float, BeforeValidator(_duration)]
Name = Annotated[str, Field(min_length=1, max_length=128)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class TableConfig(_Section):
    max_entries: int = Field(10_000, ge=1, le=10_000_000)
    max_bytes: Size = Field(16 * MiB, ge=64 * KiB)
    deadline: Duration = Field(10.0, le=600.0)


class IgnoreConfig(_Section):
    default_headers: bool = True
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
            if not isinstance(pattern, str):
                raise ValueError(f"each pattern must be a string (a regex), got {pattern!r}")
            try:
                compiled.append(re.compile(pattern))
            except re.error as error:
                raise ValueError(f"bad regex {pattern!r}: {error}") from None
        return tuple(compiled)


class NoiseConfig(_Section):
    auto: bool = True
    threshold: float = Field(0.8, gt=0.0, le=1.0)
    min_samples: int = Field(20, ge=1, le=100_000)
    baseline_margin: float = Field(0.05, ge=0.0, lt=1.0)


class EndpointsConfig(_Section):
    templates: tuple[Name, ...] = ()
    max: int = Field(100, ge=1, le=10_000)

    @field_validator("templates")
    @classmethod
    def _absolute(cls, templates: tuple[str, ...]) -> tuple[str, ...]:
        for template in templates:
            if not template.startswith("/"):
                raise ValueError(f"a template is a path starting with /, got {template!r}")
        return templates


class ExamplesConfig(_Section):
    per_field: int = Field(3, ge=0, le=20)
    max_chars: int = Field(200, ge=16, le=10_000)
    max_fields: int = Field(32, ge=1, le=1_000)
    budget: Size = Field(2 * MiB, le=64 * MiB)


class GoalsConfig(_Section):
    min_comparisons: int = Field(100, ge=1)
    min_endpoint_comparisons: int = Field(20, ge=1)
    max_regression_rate: float = Field(0.01, ge=0.0, le=1.0)
    max_error_rate_increase: float = Field(0.01, ge=0.0, le=1.0)
    max_p99_ratio: float = Field(1.5, ge=1.0)
    p99_slack: Duration = 0.005


class DiffLogConfig(_Section):
    path: Name = "-"
    rate: float = Field(10.0, gt=0.0, le=100_000.0)


class CompareConfig(_Section):
    response_message: Name = "mirror-response"
    candidates: tuple[Name, ...] = Field(min_length=1)
    baseline: Name | None = None
    body_limit: Size = Field(256 * KiB, ge=1, le=64 * MiB)
    table: TableConfig = TableConfig()
    ignore: IgnoreConfig = IgnoreConfig()
    noise: NoiseConfig = NoiseConfig()
    endpoints: EndpointsConfig = EndpointsConfig()
    examples: ExamplesConfig = ExamplesConfig()
    goals: GoalsConfig = GoalsConfig()
    diff_log: DiffLogConfig | None = None

    @property
    def compared(self) -> tuple[str, ...]:
        """Every target whose responses are paired with the primary's: the candidates and the baseline."""
        return self.candidates + ((self.baseline,) if self.baseline else ())


def parse_compare(data: object, target_names: tuple[str, ...], key: str = "compare") -> CompareConfig | None:
    """The validated section, or None when it is absent (null); the first problem as one ConfigError."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ConfigError(key, f"must be a mapping, got {data!r}")
    try:
        section = CompareConfig.model_validate(data)
    except ValidationError as error:
        raise _one_line(error, key) from None
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


def _one_line(error: ValidationError, key: str) -> ConfigError:
    first = error.errors()[0]
    where = key
    for part in first["loc"]:
        where += f"[{part}]" if isinstance(part, int) else f".{part}"
    problem = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        model = _model_at(CompareConfig, first["loc"][:-1])
        known = tuple(model.model_fields) if model else ()
        close = difflib.get_close_matches(str(first["loc"][-1]), known, n=1)
        problem = (
            f"unknown key; did you mean {close[0]!r}?"
            if close
            else f"unknown key; expected one of {', '.join(known)}"
        )
    elif first["type"] == "missing":
        problem = "is required"
    elif first["type"] == "too_short":
        problem = f"must list at least {first['ctx']['min_length']}, got {first.get('input')!r}"
    elif first["type"] == "value_error":  # our own validators name the value already
        problem = f"{problem[:1].lower()}{problem[1:]}"
    else:
        problem = f"{problem[:1].lower()}{problem[1:]}, got {first.get('input')!r}"
    return ConfigError(where, problem)


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
            continue
        args = getattr(annotation, "__args__", ())
        nested = [arg for arg in args if isinstance(arg, type) and issubclass(arg, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model

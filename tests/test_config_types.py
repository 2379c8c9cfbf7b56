"""The config building blocks: durations and sizes parsed as the agent always has, sections that
refuse unknown keys with a suggestion, and pydantic errors turned into one `dotted.key: problem` line."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import ValidationError

from spoa_mirror.config_types import (
    Bool,
    Duration,
    DurationOrZero,
    KiB,
    Section,
    Size,
    bounded_duration,
    bounded_size,
    config_error,
    int_between,
)
from spoa_mirror.errors import ConfigError


class Inner(Section):
    timeout: Duration = 5.0
    drain: DurationOrZero = 0.0
    delay: bounded_duration(low=0, high=1) = 0.0
    body: Size = 10
    budget: bounded_size(minimum=64 * KiB) = 64 * KiB
    workers: int_between(1, 10) = 1
    enabled: Bool = True
    mode: Literal["drop", "send_marked"] = "drop"


class Outer(Section):
    items: tuple[Inner, ...] = ()
    inner: Inner = Inner()


def error_of(data: object) -> str:
    with pytest.raises(ValidationError) as caught:
        Outer.model_validate(data)
    return str(config_error(caught.value))


@pytest.mark.parametrize(
    ("value", "seconds"), [(2, 2.0), (0.5, 0.5), ("500ms", 0.5), ("2s", 2.0), ("1.5m", 90.0), ("1h", 3600.0)]
)
def test_durations(value: object, seconds: float) -> None:
    assert Outer.model_validate({"inner": {"timeout": value}}).inner.timeout == seconds


@pytest.mark.parametrize(
    ("value", "size"), [(7, 7), ("512k", 512 * KiB), ("1MiB", 1024 * KiB), ("1MB", 10**6)]
)
def test_sizes(value: object, size: int) -> None:
    assert Outer.model_validate({"inner": {"body": value}}).inner.body == size


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"items": [{}, {"timout": 1}]}, "items[1].timout: unknown key (did you mean timeout?)"),
        ({"inner": {"zzz": 1}}, "inner.zzz: unknown key (expected one of timeout, drain, delay, body,"),
        ({"inner": {"timeout": -1}}, "inner.timeout: must be a positive number of seconds, got -1"),
        ({"inner": {"timeout": 0}}, "inner.timeout: must be a positive number of seconds, got 0"),
        ({"inner": {"drain": -1}}, "inner.drain: must be a 0 or more number of seconds, got -1"),
        ({"inner": {"delay": "2s"}}, "inner.delay: must be between 0 and 1 seconds, got '2s'"),
        ({"inner": {"timeout": "soon"}}, 'inner.timeout: must be a number of seconds or a duration like'),
        ({"inner": {"body": "1 lots"}}, 'inner.body: must be a number of bytes or a size like "512k"'),
        ({"inner": {"budget": "1k"}}, "inner.budget: must be at least 64KiB, got '1k'"),
        ({"inner": {"workers": 11}}, "inner.workers: must be between 1 and 10, got 11"),
        ({"inner": {"workers": "3"}}, "inner.workers: must be an integer, got '3'"),
        ({"inner": {"enabled": "yes"}}, "inner.enabled: must be true or false, got 'yes'"),
        ({"inner": {"mode": "keep"}}, "inner.mode: must be one of drop, send_marked, got 'keep'"),
        ({"inner": 3}, "inner: must be a mapping, got 3"),
        ({"items": {"a": 1}}, "items: must be a list, got a mapping"),
    ],
)
def test_errors_are_one_line_naming_the_dotted_key(data: object, message: str) -> None:
    error = error_of(data)
    assert error.startswith(message)
    assert "\n" not in error


def test_null_takes_the_default() -> None:
    assert Outer.model_validate({"inner": {"timeout": None}}).inner.timeout == 5.0


def test_sections_are_frozen() -> None:
    with pytest.raises(ValidationError):
        Inner().timeout = 1.0  # type: ignore[misc]


def test_a_config_error_raised_by_a_validator_keeps_its_relative_key() -> None:
    from pydantic import field_validator

    class Stage(Section):
        spec: dict[str, object] = {}

        @field_validator("spec")
        @classmethod
        def _check(cls, spec: dict[str, object]) -> dict[str, object]:
            raise ConfigError("allow[0]", "bad rule")

    with pytest.raises(ValidationError) as caught:
        Stage.model_validate({"spec": {"allow": ["x"]}})
    assert str(config_error(caught.value, "targets[2]")) == "targets[2].spec.allow[0]: bad rule"

"""The building blocks every configuration section is declared with: a base model, durations and
sizes as annotated types, and the one function that turns pydantic's errors into the agent's
one-line `dotted.key: problem` messages.

A section is a `Section` subclass next to the code it configures (the filter model in filters.py,
and so on); config.py composes them into the top-level model, so adding a section is one field
there. A `Section`:

- refuses unknown keys with a suggestion (`unknown key (did you mean timeout?)`): a misspelt key
  silently taking its default is how a shadow ends up receiving 100% of traffic instead of 1%;
- treats a key set to `null` as absent, so it takes its default;
- is frozen, so a config read at load time cannot change under the request path.

Fields read by the request path are plain attributes holding parsed values (floats, ints,
frozensets, tuples): pydantic runs at load time only.

Durations are seconds, as a number or a string such as `"500ms"`, `"2s"`, `"1.5m"`, `"1h"`. Sizes
are bytes, as an integer or a string such as `"512k"`, `"1MiB"`, `"10MB"`: `k`/`KiB`, `m`/`MiB`,
`g`/`GiB` are powers of 1024 (the HAProxy and nginx convention), `kB`/`MB`/`GB` powers of 1000.

Validators report a problem with `problem("must be ...")` (or `problem(text, "sub.key")` for a key
below the value), or by raising `ConfigError(key, ...)` with a key relative to the field being
validated (how the stage builders report theirs). `Derived` fields are computed by a section's
after-validator (`self.derive(...)`), never read from the file nor shown in the schema; `spec_of`
declares a stage's sub-spec by its model while keeping the mapping as written for its builder.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    Strict,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic.json_schema import JsonSchemaValue, SkipJsonSchema
from pydantic_core import PydanticCustomError, core_schema

from .errors import ConfigError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": KiB, "ki": KiB, "kib": KiB, "kb": 1000,
    "m": MiB, "mi": MiB, "mib": MiB, "mb": 1000**2,
    "g": GiB, "gi": GiB, "gib": GiB, "gb": 1000**3,
}  # fmt: skip
# The same grammars, for the JSON Schema (case-insensitive units spelt out: JSON Schema has no flags).
_DURATION_PATTERN = r"^\s*(\d+(\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$"
_SIZE_PATTERN = r"^\s*(\d+(\.\d*)?|\.\d+)\s*([bB]|[kKmMgG]([iI][bB]?|[bB])?)?\s*$"


def problem(text: str, key: str | None = None) -> PydanticCustomError:
    """The error a validator raises: `text` becomes the problem half of the one-line message, about
    the value being validated or, with `key`, about that key below it (dotted, relative)."""
    context = {"problem": text} if key is None else {"problem": text, "key": key}
    return PydanticCustomError("config", "{problem}", context)


def show(value: object) -> str:
    """A value as the operator wrote it in YAML, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, int | float):
        return f"{value:g}" if isinstance(value, float) else str(value)
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def unknown_key(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return (
        f"unknown key (did you mean {close[0]}?)"
        if close
        else f"unknown key (expected one of {', '.join(known)})"
    )


def parse_duration(value: object, key: str, *, allow_zero: bool = False) -> float:
    """Seconds from a number or a string such as "500ms"; shared with the command-line flags."""
    return _duration_seconds(value, key, allow_zero=allow_zero, low=None, high=None)


def parse_size(value: object, key: str) -> int:
    """Bytes from an integer or a string such as "512k" or "1MiB"; shared with the command-line flags."""
    return _size_bytes(value, key, minimum=0, maximum=None)


def _duration_seconds(
    value: object, key: str, *, allow_zero: bool, low: float | None, high: float | None
) -> float:
    if isinstance(value, str) and (match := _DURATION.fullmatch(value)):
        seconds = float(match[1]) * _DURATION_UNITS[match[2]]
    elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        seconds = float(value)
    else:
        raise ConfigError(
            key, f'must be a number of seconds or a duration like "500ms" or "2s", got {show(value)}'
        )
    if low is not None or high is not None:
        low_, high_ = low or 0.0, math.inf if high is None else high
        if not low_ <= seconds <= high_:
            raise ConfigError(key, f"must be between {low_:g} and {high_:g} seconds, got {show(value)}")
    elif seconds < 0 or (seconds == 0 and not allow_zero):
        bound = "0 or more" if allow_zero else "positive"
        raise ConfigError(key, f"must be a {bound} number of seconds, got {show(value)}")
    return seconds


def _size_bytes(value: object, key: str, *, minimum: int, maximum: int | None) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (match := _SIZE.fullmatch(value)) and match[2].lower() in _SIZE_UNITS:
        size = int(float(match[1]) * _SIZE_UNITS[match[2].lower()])
    else:
        raise ConfigError(
            key, f'must be a number of bytes or a size like "512k" or "1MiB", got {show(value)}'
        )
    if maximum is not None and not minimum <= size <= maximum:
        raise ConfigError(key, f"must be between {minimum} and {maximum} bytes, got {show(value)}")
    if size < minimum:
        least = "0 or more bytes" if minimum == 0 else f"at least {format_size(minimum).replace(' ', '')}"
        raise ConfigError(key, f"must be {least}, got {show(value)}")
    return size


def format_duration(seconds: float) -> str:
    return f"{seconds * 1000:g}ms" if 0 < seconds < 1 else f"{seconds:g}s"


def format_size(size: int) -> str:
    for unit, factor in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} bytes"


@dataclass(frozen=True, slots=True)
class DurationRule:
    """Annotated marker: the field is a duration in float seconds, positive unless `allow_zero`, or
    within [low, high] when either is given."""

    allow_zero: bool = False
    low: float | None = None
    high: float | None = None

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        def validate(value: object) -> float:
            return _duration_seconds(value, "", allow_zero=self.allow_zero, low=self.low, high=self.high)

        return core_schema.no_info_plain_validator_function(validate)

    def __get_pydantic_json_schema__(self, schema: Any, handler: Any) -> JsonSchemaValue:
        number: dict[str, Any] = {"type": "number"}
        if self.low is not None or self.high is not None:
            number["minimum"] = self.low or 0
            if self.high is not None:
                number["maximum"] = self.high
        elif self.allow_zero:
            number["minimum"] = 0
        else:
            number["exclusiveMinimum"] = 0
        text = {"type": "string", "pattern": _DURATION_PATTERN}
        return {"anyOf": [number, text], "description": 'seconds, or a duration like "500ms", "2s", "1h"'}


@dataclass(frozen=True, slots=True)
class SizeRule:
    """Annotated marker: the field is a size in int bytes, at least `minimum`, at most `maximum`."""

    minimum: int = 0
    maximum: int | None = None

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        def validate(value: object) -> int:
            return _size_bytes(value, "", minimum=self.minimum, maximum=self.maximum)

        return core_schema.no_info_plain_validator_function(validate)

    def __get_pydantic_json_schema__(self, schema: Any, handler: Any) -> JsonSchemaValue:
        integer: dict[str, Any] = {"type": "integer", "minimum": self.minimum}
        if self.maximum is not None:
            integer["maximum"] = self.maximum
        text = {"type": "string", "pattern": _SIZE_PATTERN}
        return {"anyOf": [integer, text], "description": 'bytes, or a size like "512k", "1MiB", "10MB"'}


@dataclass(frozen=True, slots=True)
class Between:
    """Annotated marker for a strict integer within [low, high], with today's wording of the error."""

    low: int
    high: int

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        def check(value: int) -> int:
            if not self.low <= value <= self.high:
                raise problem(f"must be between {self.low} and {self.high}, got {value}")
            return value

        return core_schema.no_info_after_validator_function(check, handler(source))

    def __get_pydantic_json_schema__(self, schema: Any, handler: Any) -> JsonSchemaValue:
        return {**handler(schema), "minimum": self.low, "maximum": self.high}


# The types sections declare fields with. Scalars are strict: YAML's `yes` or "5" for a number is
# a mistake to report, not to guess at (and the JSON Schema says the same).
Duration = Annotated[float, DurationRule()]
DurationOrZero = Annotated[float, DurationRule(allow_zero=True)]
Size = Annotated[int, SizeRule()]
Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]


def _non_empty_string(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise problem(f"must be a non-empty string, got {show(value)}")
    return value


NonEmptyStr = Annotated[
    str, PlainValidator(_non_empty_string, json_schema_input_type=str), Field(min_length=1)
]


def bounded_duration(*, allow_zero: bool = False, low: float | None = None, high: float | None = None) -> Any:
    """A Duration with bounds: `bounded_duration(low=1, high=3600)`."""
    return Annotated[float, DurationRule(allow_zero=allow_zero, low=low, high=high)]


def bounded_size(*, minimum: int = 0, maximum: int | None = None) -> Any:
    """A Size with bounds: `bounded_size(minimum=64 * KiB)`."""
    return Annotated[int, SizeRule(minimum=minimum, maximum=maximum)]


def int_between(low: int, high: int) -> Any:
    return Annotated[int, Strict(), Between(low, high)]


# A field computed by the section from its inputs (a target's scheme, from its url): never read
# from the file, absent from the schema, set by the section's after-validator with `derive`.
Derived = SkipJsonSchema


class Section(BaseModel):
    """Base of every configuration section: frozen, unknown keys refused with a suggestion, null
    meaning "the default"."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def input_fields(cls) -> list[tuple[str, str, FieldInfo]]:
        """(key in the file, attribute name, field) of every key a config file may set, in order."""
        return [
            (field.alias or name, name, field)
            for name, field in cls.model_fields.items()
            if not any(isinstance(meta, SkipJsonSchema) for meta in field.metadata)
        ]

    @classmethod
    def input_keys(cls) -> list[str]:
        """The keys a config file may set in this section, in declaration order."""
        return [key for key, _, _ in cls.input_fields()]

    @classmethod
    def prepare(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Hook run on the raw mapping before keys are checked: a section refuses a key with a
        better message than "unknown key" (`secrets.hmac_key`), or names what is missing."""
        return data

    @model_validator(mode="wrap")
    @classmethod
    def _known_keys_only(cls, data: Any, handler: Any) -> Any:
        if isinstance(data, cls):
            return data
        if not isinstance(data, Mapping):
            raise problem(f"must be a mapping, got {show(data)}")
        for name in data:
            if not isinstance(name, str):
                raise problem(f"keys must be strings, got {show(name)}")
        data = cls.prepare(dict(data))
        known = cls.input_keys()
        for name in data:
            if name not in known:
                raise PydanticCustomError(
                    "config", "{problem}", {"problem": unknown_key(name, known), "key": name}
                )
        return handler({name: value for name, value in data.items() if value is not None})

    def derive(self, **values: Any) -> None:
        """Set Derived fields from an after-validator (the section is frozen to everyone else)."""
        for name, value in values.items():
            object.__setattr__(self, name, value)


def config_error(error: ValidationError, prefix: str = "") -> ConfigError:
    """The first of pydantic's errors as the agent's one-line `dotted.key: problem` ConfigError."""
    detail = error.errors(include_url=False)[0]
    location: list[str | int] = list(detail["loc"])
    context = detail.get("ctx") or {}
    kind = detail["type"]
    got = show(detail.get("input"))
    if kind == "config":
        text = context["problem"]
        if "key" in context:
            location.append(context["key"])
    elif kind == "value_error" and isinstance(context.get("error"), ConfigError):
        inner: ConfigError = context["error"]
        text = inner.problem
        if inner.key:
            return ConfigError(_join(_dotted(prefix, location), inner.key), text)
    elif kind == "missing":
        text = "is required"
    else:
        text = _problem_of(kind, context, got, detail["msg"])
    return ConfigError(_dotted(prefix, location) or prefix or "config", text)


_TYPE_PROBLEMS = {
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "set_type": "must be a list",
    "frozen_set_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
}


def _problem_of(kind: str, context: Mapping[str, Any], got: str, message: str) -> str:
    if kind in _TYPE_PROBLEMS:
        return f"{_TYPE_PROBLEMS[kind]}, got {got}"
    if kind == "literal_error":
        choices = str(context["expected"]).replace("'", "").replace(" or ", ", ")
        return f"must be one of {choices}, got {got}"
    if kind == "string_too_short":
        return f"must be a non-empty string, got {got}"
    if kind in ("greater_than_equal", "greater_than"):
        return f"must be at least {next(iter(context.values()))}, got {got}"
    if kind in ("less_than_equal", "less_than"):
        return f"must be at most {next(iter(context.values()))}, got {got}"
    return f"{message[:1].lower()}{message[1:]}, got {got}"


def _dotted(prefix: str, location: list[str | int]) -> str:
    key = prefix
    for part in location:
        key = f"{key}[{part}]" if isinstance(part, int) else _join(key, str(part))
    return key


def _join(key: str, name: str) -> str:
    if not key:
        return name
    return f"{key}{name}" if name.startswith("[") else f"{key}.{name}"


def _plain(check: Any, schema: dict[str, Any]) -> Any:
    """A validator with its own error messages, and the JSON Schema of what it accepts."""
    return (PlainValidator(check), WithJsonSchema(schema))


TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token: header names, methods
_TOKEN_PATTERN = r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$"
HOSTNAME = re.compile(
    r"(?=.{1,253}\.?$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?"
)


def _header_name(value: object) -> str:
    name = _non_empty_string(value)
    if not TOKEN.fullmatch(name):
        raise problem(f"must be a valid header name, got {name!r}")
    return name


def _address(value: object) -> str:
    address = _non_empty_string(value)
    try:
        ipaddress.ip_address(address)
    except ValueError:
        if not HOSTNAME.fullmatch(address):
            raise problem(f"must be an IP address or a host name, got {address!r}") from None
    return address


def _existing_file(value: object) -> str:
    path = _non_empty_string(value)
    if not os.path.isfile(path):
        raise problem(f"file not found: {path}")
    return path


def _percentage(value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise problem(f"must be a number from 0 to 100, got {show(value)}")
    if not 0 <= value <= 100:
        raise problem(f"must be between 0 and 100, got {show(value)}")
    return float(value)


def _positive_number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise problem(f"must be a positive number, got {show(value)}")
    if value <= 0:
        raise problem(f"must be positive, got {show(value)}")
    return float(value)


HeaderName = Annotated[str, *_plain(_header_name, {"type": "string", "pattern": _TOKEN_PATTERN})]
Address = Annotated[str, *_plain(_address, {"type": "string", "minLength": 1})]
ExistingFile = Annotated[str, *_plain(_existing_file, {"type": "string", "minLength": 1})]
Percentage = Annotated[float, *_plain(_percentage, {"type": "number", "minimum": 0, "maximum": 100})]
PositiveNumber = Annotated[float, *_plain(_positive_number, {"type": "number", "exclusiveMinimum": 0})]
Port = int_between(0, 65535)


@dataclass(frozen=True, slots=True)
class SpecOf:
    """Annotated marker for a stage's sub-spec (a target's filters, rate_limit, ...): checked
    against the stage's model (keys, with "did you mean", and shapes), documented by its schema,
    and kept as the mapping written, which the stage's builder compiles (its checks the model cannot
    express, a regex that does not compile, stay there)."""

    model: type[Section]

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        def keep_as_written(value: Any, validate: Any) -> Any:
            validate(value)
            return value

        return core_schema.no_info_wrap_validator_function(
            keep_as_written, handler.generate_schema(self.model)
        )


def spec_of(model: type[Section]) -> Any:
    """`filters: spec_of(FilterSpec) | None`: the mapping as written, validated by `model`."""
    return Annotated[dict[str, Any], SpecOf(model)]

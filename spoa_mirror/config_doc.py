"""The configuration reference, generated from the models: one row per key with its default and
description, rendered as the README's table and as `spoa-mirror check-config --help`. A key cannot
be added without its documentation (tests/test_config.py checks every row has a description, and
tests/test_config_schema.py that the README's table is this module's output).

    .venv/bin/python -m spoa_mirror.config_doc   # prints the README table
"""

from __future__ import annotations

import textwrap
import types
import typing
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from .config_types import DurationRule, Section, SizeRule, SpecOf, format_duration, format_size

Row = tuple[str, str, str]  # key, default, description


def reference_rows() -> list[Row]:
    from .config import Config

    return _rows(Config, "")


def _rows(model: type[Section], prefix: str) -> list[Row]:
    rows: list[Row] = []
    for key, _, info in model.input_fields():
        path = f"{prefix}{key}"
        rows.append((path, _default(info), " ".join((info.description or "").split())))
        nested, many = _nested(info.annotation, info.metadata)
        if nested is not None and path not in ("defaults", "mirroring.targets"):
            rows.extend(_rows(nested, f"{path}[]." if many else f"{path}."))
    return rows


def _nested(annotation: Any, metadata: list[Any]) -> tuple[type[Section] | None, bool]:
    """The section a field holds (or a list of), if any."""
    for meta in metadata:
        if isinstance(meta, SpecOf):
            return meta.model, False
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return annotation, False
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _nested(typing.get_args(annotation)[0], list(annotation.__metadata__))
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _nested(arg, [])
            if found[0] is not None:
                return found
    if origin in (tuple, list):
        found, _ = _nested(typing.get_args(annotation)[0], [])
        return found, found is not None
    return None, False


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
        if isinstance(value, Section) or value is None:
            return "" if value is not None else "unset"
    elif info.default is PydanticUndefined:
        return "required"
    else:
        value = info.default
    if value is None:
        return "unset"
    if any(isinstance(meta, DurationRule) for meta in info.metadata):
        return format_duration(value)
    if any(isinstance(meta, SizeRule) for meta in info.metadata) and value >= 1024:
        return format_size(value).replace(" ", "")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, frozenset | tuple | list):
        return "[" + ", ".join(sorted(str(item) for item in value)) + "]"
    if isinstance(value, dict):
        return "{}" if not value else str(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def markdown_table() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, description in reference_rows():
        shown = f"`{default}`" if default and default not in ("unset", "required") else default
        escaped = description.replace("|", "\\|")
        lines.append(f"| `{key}` | {shown} | {escaped} |")
    return "\n".join(lines) + "\n"


def help_text(width: int = 100) -> str:
    """`check-config --help`'s reference: `key (default): meaning`, wrapped."""
    out = ["configuration keys, as key (default): meaning:"]
    for key, default, description in reference_rows():
        head = f"{key} ({default})" if default else key
        out.append(
            textwrap.fill(f"{head}: {description}", width, initial_indent="  ", subsequent_indent="      ")
        )
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown_table(), end="")

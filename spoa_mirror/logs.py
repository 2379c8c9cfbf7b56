"""structlog configuration: JSON lines in production, readable console output on a terminal.

Configured once at start-up (processors as plain callables, the choice made here and not per event)."""

from __future__ import annotations

import logging
import sys
from typing import Annotated, Literal

import structlog
from pydantic import Field, WithJsonSchema, field_validator

from .config_types import Section

LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_ANY_CASE_LEVEL = "^(" + "|".join("".join(f"[{c}{c.upper()}]" for c in level) for level in LOG_LEVELS) + ")$"


class LogConfig(Section):
    """Structured logs on stderr."""

    format: Literal["auto", "json", "console"] = Field(
        "auto", description="json, console, or auto (console on a terminal, JSON otherwise)"
    )
    level: Annotated[
        Literal["debug", "info", "warning", "error", "critical"],
        # Completion offers the lower-case names; any case validates, as the agent accepts it.
        WithJsonSchema(
            {"anyOf": [{"enum": list(LOG_LEVELS)}, {"type": "string", "pattern": _ANY_CASE_LEVEL}]}
        ),
    ] = Field("info", description="debug, info, warning, error or critical (any case)")

    @field_validator("level", mode="before")
    @classmethod
    def _any_case(cls, level: object) -> object:
        return level.lower() if isinstance(level, str) else level


def configure(fmt: str = "auto", level: str = "info") -> None:
    renderer: structlog.typing.Processor
    if fmt == "console" or (fmt == "auto" and sys.stderr.isatty()):
        renderer = structlog.dev.ConsoleRenderer()
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        # One write per event, line and newline together (PrintLogger writes them apart): with -n
        # workers sharing stderr or an -l file, two events could otherwise land on one line.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )

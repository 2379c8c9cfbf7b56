"""Volatile shapes: values that differ between any two responses by nature (timestamps, UUIDs, random
ids and tokens, epoch numbers), so a field that differs in nearly every comparison *in such a shape*
is noise, not a regression.

`mask` replaces each volatile token in a string with its shape, keeping what a format change would
touch: a timestamp becomes its layout with every run of digits turned into one 0
(`2024-05-01T10:00:00.123Z` -> `0-0-0T0:0:0.0Z`), so two timestamps in the same layout mask equal
while a change from `...Z` to `...+00:00` or to epoch seconds does not: that is a real difference.
A plain number is never volatile: a price that changes in every comparison must be reported.
"""

from __future__ import annotations

import re

_MONTHS = "Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec"
_DAYS = "Mon|Tue|Wed|Thu|Fri|Sat|Sun"
_VOLATILE = re.compile(
    r"(?P<uuid>\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b)"
    r"|(?P<ts>\b\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?)"
    rf"|(?P<http_date>\b(?:{_DAYS}), \d{{2}} (?:{_MONTHS}) \d{{4}} \d{{2}}:\d{{2}}:\d{{2}} GMT)"
    r"|(?P<clock>\b\d{2}:\d{2}:\d{2}(?:[.,]\d+)?\b)"
    r"|(?P<hex>\b[0-9a-f]{16,}\b|\b[0-9A-F]{16,}\b)"
    r"|(?P<token>(?<![\w+/=.-])(?=[\w+/=.-]*\d)(?=[\w+/=.-]*[A-Za-z])[\w+/=.-]{20,}(?![\w+/=.-]))"
    r"|(?P<epoch>\b1[0-9]{9}(?:[0-9]{3})?(?:\.\d+)?\b)"
)
_DIGITS = re.compile(r"\d+")
MAX_VOLATILE = 4096  # characters: longer strings are compared, never masked
# Epoch seconds and milliseconds from 2001-09-09 to 2286: the numbers a JSON timestamp field holds.
_EPOCH_RANGES = ((1e9, 1e10), (1e12, 1e13))


def _shape(match: re.Match[str]) -> str:
    kind = match.lastgroup
    if kind in ("ts", "clock"):
        return _DIGITS.sub("0", match[0])
    return f"<{kind}>"


def mask(text: str) -> str:
    """`text` with every volatile token replaced by its shape."""
    return _VOLATILE.sub(_shape, text)


def volatile_strings(a: str, b: str) -> bool:
    """Two different strings that differ only in volatile tokens of the same shapes. A long text is
    never volatile: a timestamp or an id is short, and masking a megabyte costs the event loop."""
    if len(a) > MAX_VOLATILE or len(b) > MAX_VOLATILE:
        return False
    masked = mask(a)
    return masked != a and masked == mask(b)


def volatile_numbers(a: float, b: float) -> bool:
    """Two epoch timestamps of the same unit (seconds or milliseconds)."""
    return any(low <= a < high and low <= b < high for low, high in _EPOCH_RANGES)


def shape_of(value: object) -> str:
    """A short name of the value's volatile shape, for the evidence shown with noise."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        if 1e9 <= value < 1e10:
            return "epoch seconds"
        return "epoch milliseconds" if 1e12 <= value < 1e13 else "number"
    if isinstance(value, str):
        match = _VOLATILE.search(value)
        if match is None:
            return "text"
        names = {"ts": "timestamp", "http_date": "HTTP date", "clock": "time of day", "hex": "hex id"}
        name = names.get(match.lastgroup or "", match.lastgroup or "text")
        return name if match.span() == (0, len(value)) else f"text with a {name}"
    return type(value).__name__

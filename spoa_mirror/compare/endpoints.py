"""Endpoints: comparisons grouped by method and path template, a bounded set.

`/users/42/orders/9f1c2d3e-...` is `GET /users/{id}/orders/{id}`: numeric, UUID, hex (8 or more digits
with a digit among them) and long random-looking segments become `{id}`, a file name's stem too
(`{id}.png`). Configured templates (`/users/{user}/orders/{order}`) are tried
first, in order. Each target holds at most `max` endpoints; later ones are counted as `other`, so
memory and the metric series stay bounded whatever paths clients send.
"""

from __future__ import annotations

import re

from .config import EndpointsConfig

OTHER = "other"
MAX_SEGMENTS = 12  # deeper paths end in /…: their tail is where ids pile up
_ID_SEGMENT = re.compile(
    r"\d+"
    r"|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
    r"|[0-9a-fA-F]{16,}|(?=[0-9a-fA-F]*\d)[0-9a-fA-F]{8,}"  # shorter hex needs a digit: `deadbeef` stays
    r"|(?=[\w.~-]*\d)(?=[\w.~-]*[A-Za-z])[\w.~-]{20,}"  # a long token mixing letters and digits
    r"|.{65,}"
)
_EXTENSION = re.compile(r"(.+?)(\.[A-Za-z0-9]{1,5})")
_METHOD = re.compile(r"[A-Z]{1,16}")
_CACHE_SIZE = 4096


class EndpointNamer:
    def __init__(self, config: EndpointsConfig) -> None:
        self.templates = tuple((template, _template_regex(template)) for template in config.templates)
        self._cache: dict[str, str] = {}

    def template(self, path: str) -> str:
        """The path's template (no query); cached, the cache emptied when full."""
        path = path.partition("?")[0]
        found = self._cache.get(path)
        if found is not None:
            return found
        for template, regex in self.templates:
            if regex.fullmatch(path):
                found = template
                break
        else:
            segments = path.split("/")
            if len(segments) > MAX_SEGMENTS + 1:
                segments = [*segments[: MAX_SEGMENTS + 1], "…"]
            found = "/".join(_segment(segment) for segment in segments)
            found = found or "/"
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()
        self._cache[path] = found
        return found

    def name(self, method: str, path: str) -> str:
        method = method if _METHOD.fullmatch(method) else "OTHER"
        return f"{method} {self.template(path)}"


def _segment(segment: str) -> str:
    """`{id}` for an id-like segment; `{id}.png` for an id-like file name."""
    if _ID_SEGMENT.fullmatch(segment):
        return "{id}"
    named = _EXTENSION.fullmatch(segment)
    if named and _ID_SEGMENT.fullmatch(named[1]):
        return "{id}" + named[2]
    return segment


def _template_regex(template: str) -> re.Pattern[str]:
    """`/users/{user}/orders` -> a regex where each `{name}` is one path segment; `*` is one too."""
    parts = re.split(r"(\{[^/{}]+\}|\*)", template)
    return re.compile(
        "".join("[^/]+" if part == "*" or part.startswith("{") else re.escape(part) for part in parts) + "/?"
    )

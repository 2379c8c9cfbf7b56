"""Values of the headers a target adds, with templates: `X-Request-ID: "{{uuid}}"` sends a fresh
UUID with every mirrored request (the GAL guide's tracing practice).

A value is checked at load, where an unknown template (`{{foo}}`) is a config error naming the
header; a value without a template is sent as written and costs the request path nothing more than
it did: only the headers that carry a template are rendered per request. Which value the shadow gets
when the client's request already carries the header (X-Request-ID from HAProxy's unique-id-header):
the one configured here, as for every added header, so the shadow's logs and traces never share an
id with production's; see the README (Headers added to mirrored requests).

    .venv/bin/python -m timeit -s "from spoa_mirror.header_templates import compile_value; \
        f = compile_value('{{uuid}}')" "f()"

~2.4 us a header on the loaded 2-core development machine (Python 3.11), where str(uuid.uuid4())
took ~6.4 us (`-s "import uuid" "str(uuid.uuid4())"`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Annotated

from pydantic import PlainValidator, WithJsonSchema

from .config_types import TOKEN, problem, show

_VARIANT = "89ab" * 4  # RFC 9562 variant bits 10xx, from the random nibble


def random_uuid() -> str:
    """A version-4 UUID as text, equal in form to str(uuid.uuid4()) at ~40% of its cost: no UUID
    object. os.urandom per call, so forked workers never share a sequence."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[int(h[16], 16)]}{h[17:20]}-{h[20:]}"


TEMPLATES: dict[str, Callable[[], str]] = {"uuid": random_uuid}
_TEMPLATE = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
# Headers whose value the agent computes; configuring them would produce a broken or ambiguous request.
AGENT_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})


def has_template(value: str) -> bool:
    return _TEMPLATE.search(value) is not None


def compile_value(value: str) -> Callable[[], str]:
    """The value's renderer, called once per mirrored request; the templates were checked at load."""
    parts = _TEMPLATE.split(value)
    if len(parts) == 3 and not parts[0] and not parts[2]:
        return TEMPLATES[parts[1]]
    literals, names = parts[0::2], [TEMPLATES[name] for name in parts[1::2]]

    def render() -> str:
        out = literals[0]
        for make, literal in zip(names, literals[1:], strict=True):
            out += make() + literal
        return out

    return render


def split_added_headers(
    headers: dict[str, str],
) -> tuple[list[tuple[str, str]], tuple[tuple[str, Callable[[], str]], ...]]:
    """A target's added headers as (name, value) pairs sent as they are, and (name, renderer) pairs
    for the values with a template, rendered per request."""
    static = [(name, value) for name, value in headers.items() if not has_template(value)]
    templated = tuple((name, compile_value(value)) for name, value in headers.items() if has_template(value))
    return static, templated


def _added_headers(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        raise problem(f"must be a mapping, got {show(value)}")
    for name, header_value in value.items():
        key = str(name)
        if not isinstance(name, str) or not TOKEN.fullmatch(name):
            raise problem(f"must be a valid header name, got {show(name)}", key)
        if name.lower() in AGENT_HEADERS:
            hint = "; use the target's host key" if name.lower() == "host" else ""
            raise problem(f"is set by the agent and cannot be added{hint}", key)
        if not isinstance(header_value, str):
            raise problem(f"must be a string (quote it in YAML), got {show(header_value)}", key)
        if any(ch in header_value for ch in "\r\n\0"):
            raise problem("must not contain CR, LF or NUL", key)
        for template in _TEMPLATE.findall(header_value):
            if template not in TEMPLATES:
                known = ", ".join(f"{{{{{name}}}}}" for name in TEMPLATES)
                raise problem(f"unknown template {{{{{template}}}}} (known: {known})", key)
    return dict(value)


AddedHeaders = Annotated[
    dict[str, str],
    PlainValidator(_added_headers),
    WithJsonSchema(
        {
            "type": "object",
            "propertyNames": {"pattern": f"^{TOKEN.pattern}$"},
            "additionalProperties": {"type": "string", "pattern": r"^[^\r\n\x00]*$"},
        }
    ),
]

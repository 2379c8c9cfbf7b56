"""What may be shown of a value: secrets masked whatever the target's redaction says.

Applied to every example value and diff-log value, after the target's `redact_response` hook: a
value under a secret-looking name (a JSON key or header such as `token`, `password`, `api_key`,
`authorization`, `session`, `cookie`), and anything shaped like a JWT, a bearer token or a
`password=...` pair inside a value, is replaced with a mask; in body lines and header values, where
no key names a value, so is any long random token. Set-Cookie values never get this far:
the differ compares cookies by name and attributes only.
"""

from __future__ import annotations

import re

MASK = "<redacted>"
_SECRET_NAME = re.compile(
    r"pass(?:word|wd|phrase)?|secret|token|api[-_]?key|auth|session|cookie|csrf|xsrf|jwt|credential|"
    r"private[-_]?key|signature|otp|ssn|card[-_]?number|cvv",
    re.I,
)
_JWT = re.compile(r"\beyJ[\w-]{5,}\.[\w-]{5,}\.[\w-]*")
_TOKEN = re.compile(r"(?<![\w+/=-])(?=[\w+/=-]*\d)(?=[\w+/=-]*[A-Za-z])[\w+/=-]{20,}(?![\w+/=-])")
_BEARER = re.compile(r"\b(Bearer|Basic|Token)\s+[\w~+/.=-]{8,}", re.I)
_PAIR = re.compile(
    # The keyword first, repeats bounded: a `[\w-]*` before it backtracked over every hyphenated run
    # (minutes of CPU on 1 MB of "ab-ab-..."). A prefix (`x_token=`) is kept as is anyway.
    r"""(?P<name>(?:pass(?:word|wd)?|secret|token|api[-_]?key|session(?:id)?|auth)[\w-]{0,32})"""
    r"""(?P<sep>["']?\s{0,8}[:=]\s{0,8}["']?)(?P<value>[^\s"'&,;<>]{3,})""",
    re.I,
)


def sensitive_name(field: str) -> bool:
    """The field's last name (JSON key or header name) looks like it holds a secret."""
    last = re.split(r"[.\[\] ]", field.replace("(length)", "").strip())
    names = [part for part in last if part and part != "*"]
    return bool(names) and _SECRET_NAME.search(names[-1].strip('"')) is not None


def scrub(text: str, secret: bool, loose: bool = False) -> str:
    """`text` as it may be shown. `secret`: the value's name says it is one, so all of it goes.
    `loose`: text without key names around it (body lines, header values), where a long random token
    (20 or more letters and digits mixed, as session ids and CSRF tokens are) is masked too."""
    if secret:
        return MASK if text not in ("(absent)", "null") else text
    if len(text) < 8:
        return text
    text = _JWT.sub("<jwt>", text)
    if loose:
        text = _TOKEN.sub("<token>", text)
    text = _BEARER.sub(lambda m: f"{m[1]} {MASK}", text)
    return _PAIR.sub(lambda m: f"{m['name']}{m['sep']}{MASK}", text)

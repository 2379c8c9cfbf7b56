"""What counts as a secret when nobody configured anything: the default redaction list.

Kept apart from the machinery in redact.py so the list can be read (and reviewed) in one place. The
README's Security section states it; `keep` entries opt a name back out (see redact.py).

- Headers, compared lower-case with `_` read as `-`: every name in `DEFAULT_HEADERS` keeps its own
  metric rule (`header:x-auth-token`); any other name a secret-looking word makes a credential
  (`X-Foo-Token`, `X-Service-Secret`, `X-Auth`, `X-Forwarded-Authorization`) is masked as
  `header:default`.
- Field names (query parameters, form, multipart and JSON fields), compared lower-case with `-` read
  as `_` and split at `.`, `[` and `]` (so `access_token[]`, `user[password]` and `User.password`
  are seen as their parts): a name is secret when any part is in `SECRET_NAMES` or contains one of
  `SECRET_WORDS`.
- Card numbers: 13 to 19 digits, plain or in groups of 4 (4-6-5 for Amex) separated by one space
  or dash, starting with 2 to 6 (the card networks' ranges: Mastercard 2 and 5, Amex and Diners 3,
  Visa 4, Discover and UnionPay 6) and passing the Luhn check, anywhere in the path, query, header
  values and bodies. The first digit keeps millisecond timestamps (13 digits starting with 1 until
  2033) from being masked one time in ten.
- Userinfo: `scheme://user:password@` anywhere (a URL in a header, a query value or a body).
"""

from __future__ import annotations

import re

DEFAULT_HEADERS = (
    "Authorization", "Proxy-Authorization", "Cookie", "Set-Cookie", "X-Api-Key", "Api-Key",
    "X-Auth-Token", "X-Access-Token", "X-Refresh-Token", "X-Session-Token", "X-Amz-Security-Token",
    "Private-Token", "X-Vault-Token", "X-CSRF-Token", "X-XSRF-Token", "X-Goog-Api-Key",
    "X-Forwarded-Authorization", "X-Client-Secret",
)  # fmt: skip
# Whole `-`-separated parts of a header name that make it a credential.
SECRET_HEADER_PARTS = frozenset(
    {"auth", "authorization", "cookie", "session", "sessionid", "credential", "credentials", "apikey"}
)
# A field-name part equal to one of these is a secret...
SECRET_NAMES = frozenset(
    {
        "pwd", "pass", "pin", "otp", "cvv", "cvc", "cvv2", "ssn", "auth", "key", "sig", "sid",
        "session", "sessionid", "jsessionid", "phpsessid", "csrf", "xsrf", "cookie",
    }
)  # fmt: skip
# ...and so is one containing one of these.
SECRET_WORDS = (
    "password", "passwd", "passphrase", "secret", "token", "apikey", "api_key", "private_key",
    "privatekey", "access_key", "accesskey", "credential", "signature", "authorization",
)  # fmt: skip
_SECRET_WORD = re.compile("|".join(SECRET_WORDS))
_NAME_PARTS = re.compile(r"[.\[\]]+")

# Every name above contains one of these fragments, so text without any of them (lower-cased, after
# percent-decoding) cannot hold a secret-named field: the cheap test that keeps the common request
# off the slow path. Card digits and `://` (userinfo) are in the pre-scan too.
PRESCAN_FRAGMENTS = (
    "pass", "pwd", "secret", "token", "key", "auth", "sig", "sess", "sid", "csrf", "xsrf", "pin",
    "otp", "cvv", "cvc", "ssn", "credential", "cookie",
)  # fmt: skip
CARD_PRESCAN = r"[0-9]{4}[ -]?[0-9]{4}"
CARD = (
    r"(?<![0-9])(?:[0-9]{13,19}|[0-9]{4}([ -])[0-9]{4}\1[0-9]{4}\1[0-9]{1,7}"
    r"|[0-9]{4}[ -][0-9]{6}[ -][0-9]{4,5})(?![0-9])"
)
# scheme://userinfo@ ; in JSON text the slashes may be escaped (`http:\/\/`). The match starts at
# the `:` (a literal the regex engine finds fast), the scheme before it does not matter.
USERINFO = r"(:\\?/\\?/)([^/?#@\s\"'<>\\]{1,256})@"


def is_secret_name(name: str) -> bool:
    """A query, form, multipart or JSON field name that means a secret."""
    lowered = name.lower().replace("-", "_")
    for part in _NAME_PARTS.split(lowered):
        if part in SECRET_NAMES or (len(part) > 4 and _SECRET_WORD.search(part) is not None):
            return True
    return False


def is_secret_header(lower_name: str) -> bool:
    """A header name (lower-case, `-`-separated) that means a credential."""
    if _SECRET_WORD.search(lower_name.replace("-", "_")) is not None:
        return True
    return any(part in SECRET_HEADER_PARTS for part in lower_name.split("-"))


def is_card_number(digits: str) -> bool:
    return digits[:1] in ("2", "3", "4", "5", "6") and luhn_valid(digits)


def luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if index % 2:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0

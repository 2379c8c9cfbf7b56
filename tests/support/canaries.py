"""A canary secret in every place the default redaction list covers (issue 10, item 4), as requests
a test can send through the real HAProxy or hand to the redactor directly.

Each `Place` is one request carrying the canary (a random token, or a random Luhn-valid card
number where the place is a card) once, in one place: credential headers and their kin, Cookie and
Set-Cookie, userinfo, secret-named query parameters and form, JSON and multipart fields (with case,
bracket and dotted variants), `;`-separated queries, JSON sent as text/plain or without a
Content-Type, duplicate JSON keys, gzip and deflate bodies, card numbers in the path, query,
headers and bodies. `leaks(raw, canaries)` looks for them in what a shadow received: the raw bytes,
percent-decoded, and the body decoded when it is gzip or deflate encoded.
"""

from __future__ import annotations

import gzip
import json
import random
import secrets
import zlib
from dataclasses import dataclass, field
from urllib.parse import unquote_plus

CREDENTIAL_HEADERS = (
    "Authorization", "Proxy-Authorization", "X-Api-Key", "Api-Key", "X-Auth-Token", "X-Access-Token",
    "X-Amz-Security-Token", "Private-Token", "X-Vault-Token", "X-CSRF-Token", "X-Goog-Api-Key",
    "X-Forwarded-Authorization", "X_Auth_Token", "x-refresh-token", "X-Billing-Token",
    "X-Service-Secret", "X-Auth", "X-Session-Id",
)  # fmt: skip
SECRET_FIELDS = (
    "password", "passwd", "secret", "token", "access_token", "refresh_token", "api_key", "apikey",
    "client_secret", "private_key", "Access_Token", "PASSWORD", "access_token[]", "user[password]",
    "User.password", "new-password", "x_api_key", "id_token",
)  # fmt: skip


def luhn_card() -> str:
    """A random 16-digit number starting with 4 that passes the Luhn check."""
    digits = [4, *random.choices(range(10), k=14)]
    total = 0
    for index, digit in enumerate(reversed(digits)):
        value = digit * 2 if index % 2 == 0 else digit
        total += value - 9 if value > 9 else value
    return "".join(map(str, digits)) + str((10 - total % 10) % 10)


@dataclass
class Place:
    name: str
    method: str
    target: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def raw(self, host: str = "app") -> bytes:
        """The request as a client writes it (HTTP clients would re-encode the target)."""
        head = [f"{self.method} {self.target} HTTP/1.1", f"Host: {host}"]
        head += [f"{name}: {value}" for name, value in self.headers]
        if self.body or self.method in ("POST", "PUT"):
            head.append(f"Content-Length: {len(self.body)}")
        head.append("Connection: close")
        return ("\r\n".join(head) + "\r\n\r\n").encode() + self.body


def _multipart(fields: list[tuple[str, str, str | None]]) -> tuple[str, bytes]:
    boundary = "----canary" + secrets.token_hex(6)
    parts = []
    for name, value, content_type in fields:
        head = f'Content-Disposition: form-data; name="{name}"'
        if content_type:
            head += f"\r\nContent-Type: {content_type}"
        parts.append(f"--{boundary}\r\n{head}\r\n\r\n{value}\r\n")
    return f"multipart/form-data; boundary={boundary}", ("".join(parts) + f"--{boundary}--\r\n").encode()


def places(secret: str, card: str) -> list[Place]:
    """Every place, `secret` (URL- and JSON-safe token) or `card` in each."""
    out: list[Place] = []
    for header in CREDENTIAL_HEADERS:
        out.append(Place(f"header {header}", "GET", f"/c/h/{header}", [(header, f"Bearer {secret}")]))
    out.append(Place("cookie", "GET", "/c/cookie", [("Cookie", f"sid={secret}; theme=dark")]))
    out.append(Place("set-cookie", "GET", "/c/set-cookie", [("Set-Cookie", f"sid={secret}; Path=/")]))
    out.append(
        Place("userinfo header", "GET", "/c/ui-h", [("Referer", f"https://bob:{secret}@example.com/x")])
    )
    out.append(Place("userinfo query", "GET", f"/c/ui-q?next=https%3A%2F%2Fbob%3A{secret}%40example.com%2F"))
    out.append(
        Place(
            "userinfo body",
            "POST",
            "/c/ui-b",
            [("Content-Type", "text/plain")],
            f"see ftp://u:{secret}@h/".encode(),
        )
    )
    for index, name in enumerate(SECRET_FIELDS):
        out.append(Place(f"query {name}", "GET", f"/c/q/{index}?page=2&{name}={secret}&x=1"))
        out.append(
            Place(
                f"form {name}",
                "POST",
                f"/c/f/{index}",
                [("Content-Type", "application/x-www-form-urlencoded")],
                f"user=bob&{name}={secret}".encode(),
            )
        )
        content_type, body = _multipart([("user", "bob", None), (name, secret, None)])
        out.append(
            Place(f"multipart {name}", "POST", f"/c/m/{index}", [("Content-Type", content_type)], body)
        )
        out.append(
            Place(
                f"json {name}",
                "POST",
                f"/c/j/{index}",
                [("Content-Type", "application/json")],
                json.dumps({"user": {"name": "ann", name: secret}, "list": [{name: [secret]}]}).encode(),
            )
        )
    out.append(Place("query semicolon", "GET", f"/c/semi?a=1;token={secret};b=2"))
    out.append(Place("query encoded name", "GET", f"/c/enc?p%61ssword={secret}"))
    document = json.dumps({"login": {"password": secret}}).encode()
    out.append(Place("json text/plain", "POST", "/c/jt", [("Content-Type", "text/plain")], document))
    out.append(Place("json no type", "POST", "/c/jn", [], document))
    out.append(
        Place(
            "json escaped key",
            "POST",
            "/c/je",
            [("Content-Type", "application/json")],
            (f'{{"p\\u0061ssword": "{secret}"}}').encode(),
        )
    )
    out.append(
        Place(
            "json duplicate key",
            "POST",
            "/c/jd",
            [("Content-Type", "application/json")],
            (f'{{"user":{{"password":"{secret}"}},"user":{{"name":"ann"}}}}').encode(),
        )
    )
    out.append(
        Place(
            "json truncated",
            "POST",
            "/c/jtr",
            [("Content-Type", "application/json")],
            (f'{{"a": 1, "password": "{secret}", "b": "cut her').encode(),
        )
    )
    content_type, body = _multipart([("meta", json.dumps({"api_key": secret}), "application/json")])
    out.append(Place("multipart json part", "POST", "/c/mj", [("Content-Type", content_type)], body))
    out.append(
        Place(
            "gzip json",
            "POST",
            "/c/gz",
            [("Content-Type", "application/json"), ("Content-Encoding", "gzip")],
            gzip.compress(json.dumps({"password": secret, "pad": "x" * 200}).encode()),
        )
    )
    out.append(
        Place(
            "deflate form",
            "POST",
            "/c/df",
            [("Content-Type", "application/x-www-form-urlencoded"), ("Content-Encoding", "deflate")],
            zlib.compress(f"a=1&token={secret}".encode()),
        )
    )
    spaced = " ".join(card[i : i + 4] for i in range(0, 16, 4))
    dashed = spaced.replace(" ", "-")
    out.append(Place("card path", "GET", f"/c/card/{card}/receipt"))
    out.append(Place("card query", "GET", f"/c/cq?note=pay+{spaced.replace(' ', '+')}&n=1"))
    out.append(Place("card header", "GET", "/c/ch", [("X-Note", f"card {dashed} ok")]))
    out.append(
        Place("card text", "POST", "/c/ct", [("Content-Type", "text/plain")], f"pay {card} now".encode())
    )
    out.append(
        Place(
            "card json",
            "POST",
            "/c/cj",
            [("Content-Type", "application/json")],
            json.dumps({"n": int(card), "s": spaced, "deep": [{"x": dashed}]}).encode(),
        )
    )
    out.append(
        Place(
            "card form",
            "POST",
            "/c/cf",
            [("Content-Type", "application/x-www-form-urlencoded")],
            f"amount=5&pan={card}".encode(),
        )
    )
    return out


def decoded_views(raw: bytes) -> list[bytes]:
    """A shadow's raw request as bytes, percent-decoded, and with its body decoded when it is
    gzip or deflate encoded."""
    views = [raw, unquote_plus(raw.decode("latin-1")).encode("latin-1")]
    head, _, body = raw.partition(b"\r\n\r\n")
    lowered = head.lower()
    if body and b"content-encoding: gzip" in lowered:
        views.append(gzip.decompress(body))
    elif body and b"content-encoding: deflate" in lowered:
        views.append(zlib.decompress(body))
    return views


def leaks(raw: bytes, needles: list[str]) -> list[str]:
    """The needles (canaries, with their spaced and dashed spellings for cards) found in `raw`."""
    found = []
    for view in decoded_views(raw):
        squeezed = view.replace(b" ", b"").replace(b"-", b"").replace(b"+", b"")
        for needle in needles:
            if needle.encode() in view or needle.encode() in squeezed:
                found.append(needle)
    return found

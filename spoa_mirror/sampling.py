"""Which requests a target mirrors.

Random sampling is enough to keep a shadow's load at a fraction of production, but a shadow that
keeps per-user state (sessions, carts, rate limits) sees nonsense when it gets a random 10% of each
user's requests. Keyed sampling mirrors *all* the requests of a stable subset of users instead: the
key's value is hashed into 10,000 buckets and a target at P% takes buckets below P*100. There is no
per-target salt, on purpose: two targets at the same percentage see the same users, and a target at
10% sees a subset of the users a target at 30% sees, so shadows can be compared like for like.

The hash is BLAKE2b of the value's UTF-8 bytes, not Python's `hash()`, which is salted per process:
the cohort must survive restarts and be the same on every agent behind the same HAProxy fleet.

Configuration (errors are named `<where>.percentage` and `<where>.key...`; config.py, whose keys are
`sample_percentage` and `sample_key`, maps them onto its own):

- `percentage`: number from 0 to 100. 0 never mirrors and 100 always does (with `missing: skip`, every
  request that carries the key), neither costing a random draw or a hash.
- `key` (optional): exactly one of `header: NAME`, `cookie: NAME`, `query: NAME`, plus
  `missing: random | skip` (default `random`) for requests that do not carry a value: `random` samples
  them at the same percentage, `skip` never mirrors them. An empty value counts as missing.

Cost per call on the 2-core development machine (Python 3.11), measured with::

    .venv/bin/python -m timeit -s "from spoa_mirror.sampling import build_sampler; \
        from spoa_mirror.request import MirrorRequest; \
        r = MirrorRequest('GET', '/a?x=1&user=u-42', '1.1', \
            [('Host', 'h'), ('Accept', '*/*'), ('X-User', 'u-42'), ('Cookie', 'a=1; sid=abc')]); \
        s = build_sampler(30, None, 't')" "s(r)"

random ~0.06 us; keyed by `{'header': 'X-User'}` ~0.3 us, `{'cookie': 'sid'}` ~0.7 us,
`{'query': 'user'}` ~0.7 us (put in place of `None`). Those keyed figures are for a value seen
recently; a new one adds ~0.5 us of hashing.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from hashlib import blake2b
from typing import Literal
from urllib.parse import unquote_plus

from pydantic import Field

from spoa_mirror.config_types import NonEmptyStr, Section
from spoa_mirror.errors import ConfigError
from spoa_mirror.request import MirrorRequest

BUCKETS = 10_000

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_KEY_KINDS = ("header", "cookie", "query")
_MISSING = ("random", "skip")

Sampler = Callable[[MirrorRequest], bool]


def bucket_of(value: str) -> int:
    """The bucket (0..9999) a key value falls in; the same on every agent and after every restart.

    Values are strings decoded with surrogateescape, so encoding back that way hashes the exact bytes
    the client sent."""
    digest = blake2b(value.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def build_sampler(percentage: float, key: dict | None, where: str) -> Sampler:
    """The per-request decision for one target (True: mirror it), specialised so the hot path does
    only what this configuration needs."""
    pct = _percentage(percentage, f"{where}.percentage")
    if key is None:
        if pct <= 0:
            return _never
        if pct >= 100:
            return always_sampled
        return _random_sampler(pct / 100)

    extract, missing = _key_extractor(key, f"{where}.key")
    if pct <= 0:
        return _never
    if pct >= 100 and missing == "random":
        return always_sampled
    threshold = pct * (BUCKETS / 100)
    fallback = _never if missing == "skip" else _random_sampler(pct / 100)
    lookup = _bucket_cache()

    def keyed(req: MirrorRequest) -> bool:
        value = extract(req)
        if not value:
            return fallback(req)
        return lookup(value) < threshold

    return keyed


def _never(req: MirrorRequest) -> bool:
    return False


def always_sampled(req: MirrorRequest) -> bool:
    """100% without a key (or a key whose missing values sample randomly): the mirror skips the check."""
    return True


def _random_sampler(probability: float) -> Sampler:
    draw = random.random

    def sampled(req: MirrorRequest) -> bool:
        return draw() < probability

    return sampled


def _bucket_cache(size: int = 4096, longest: int = 256) -> Callable[[str], int]:
    """Hashing (~0.5 us) dominates the keyed path and the same users come back request after request,
    so recent values are remembered (~0.03 us a hit). The dict is emptied when full rather than evicted
    entry by entry: cheaper, and one extra hash per active user after a reset is nothing. Long values
    are not kept, so a client sending huge keys cannot make the cache big."""
    cache: dict[str, int] = {}

    def lookup(value: str) -> int:
        bucket = cache.get(value)
        if bucket is None:
            bucket = bucket_of(value)
            if len(value) <= longest:
                if len(cache) >= size:
                    cache.clear()
                cache[value] = bucket
        return bucket

    return lookup


def _percentage(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(key, f"must be a number between 0 and 100, got {value!r}")
    if not 0 <= value <= 100:
        raise ConfigError(key, f"must be between 0 and 100, got {value!r}")
    return float(value)


def _key_extractor(key: object, where: str) -> tuple[Callable[[MirrorRequest], str | None], str]:
    if not isinstance(key, dict):
        raise ConfigError(where, f"must be a mapping with one of {', '.join(_KEY_KINDS)}, got {key!r}")
    for name in key:
        if name not in (*_KEY_KINDS, "missing"):
            raise ConfigError(
                f"{where}.{name}", f"unknown key; expected one of {', '.join(_KEY_KINDS)}, missing"
            )
    kinds = [kind for kind in _KEY_KINDS if kind in key]
    if len(kinds) != 1:
        raise ConfigError(where, f"needs exactly one of {', '.join(_KEY_KINDS)}, got {len(kinds)}")
    kind = kinds[0]
    missing = key.get("missing", "random")
    if missing not in _MISSING:
        raise ConfigError(f"{where}.missing", f"must be one of {', '.join(_MISSING)}, got {missing!r}")

    name = key[kind]
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}.{kind}", f"must be a non-empty string, got {name!r}")
    if kind != "query" and _TOKEN.fullmatch(name) is None:
        raise ConfigError(f"{where}.{kind}", f"not a valid {kind} name: {name!r}")

    if kind == "header":
        return _header_value(name), missing
    if kind == "cookie":
        return _cookie_value(name), missing
    return _query_value(name), missing


def _header_value(name: str) -> Callable[[MirrorRequest], str | None]:
    lname = name.lower()

    def extract(req: MirrorRequest) -> str | None:
        for key, value in req.headers:
            if key.lower() == lname:
                return value.strip()
        return None

    return extract


def _cookie_value(name: str) -> Callable[[MirrorRequest], str | None]:
    """Every Cookie header is looked at, because HTTP/2 clients may split cookies over several."""
    prefix = name + "="

    def extract(req: MirrorRequest) -> str | None:
        for key, value in req.headers:
            if prefix in value and key.lower() == "cookie":
                for pair in value.split(";"):
                    pair = pair.strip()
                    if pair.startswith(prefix):
                        return pair[len(prefix) :]
        return None

    return extract


def _query_value(name: str) -> Callable[[MirrorRequest], str | None]:
    """Names and values are compared percent-decoded, with `+` as a space, as a web framework would
    see them; the first occurrence wins."""

    def extract(req: MirrorRequest) -> str | None:
        path = req.path
        mark = path.find("?")
        if mark < 0:
            return None
        for pair in path[mark + 1 :].split("&"):
            raw_name, _, raw_value = pair.partition("=")
            if raw_name == name or _decoded(raw_name) == name:
                return _decoded(raw_value)
        return None

    return extract


def _decoded(raw: str) -> str:
    if "%" in raw or "+" in raw:
        return unquote_plus(raw, errors="surrogateescape")
    return raw


class SampleKeySpec(Section):
    """Sample a stable subset of users instead of random requests: exactly one of header, cookie, query."""

    header: NonEmptyStr | None = Field(None, description="sample by this request header's value")
    cookie: NonEmptyStr | None = Field(None, description="sample by this cookie's value")
    query: NonEmptyStr | None = Field(None, description="sample by this query parameter's value")
    missing: Literal["random", "skip"] = Field(
        "random",
        description="requests without a value: random samples them at the same rate, skip never mirrors them",
    )

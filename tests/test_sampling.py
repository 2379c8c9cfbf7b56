"""Sampling: the rates hold, keyed cohorts are stable and shared across targets, config errors name
their key."""

from __future__ import annotations

import random

import pytest

from spoa_mirror.errors import ConfigError
from spoa_mirror.request import MirrorRequest
from spoa_mirror.sampling import bucket_of, build_sampler


def request(path: str = "/", headers: list[tuple[str, str]] | None = None) -> MirrorRequest:
    return MirrorRequest("GET", path, "1.1", headers or [])


def with_user(user: str) -> MirrorRequest:
    return request(headers=[("Host", "h"), ("X-User", user)])


USERS = [f"user-{i}" for i in range(2000)]


def cohort(percentage: float, where: str = "t") -> set[str]:
    sampler = build_sampler(percentage, {"header": "X-User"}, where)
    return {user for user in USERS if sampler(with_user(user))}


def test_zero_never_and_hundred_always() -> None:
    never = build_sampler(0, None, "t")
    always = build_sampler(100, None, "t")
    keyed_never = build_sampler(0, {"header": "X-User"}, "t")
    keyed_always = build_sampler(100, {"header": "X-User"}, "t")
    for user in USERS[:200]:
        req = with_user(user)
        assert never(req) is False and keyed_never(req) is False
        assert always(req) is True and keyed_always(req) is True
    assert always(request()) is True  # no key, missing=random at 100%


def test_random_sampling_rate() -> None:
    random.seed(20240501)
    sampler = build_sampler(30, None, "t")
    req = request()
    hits = sum(sampler(req) for _ in range(20_000))
    assert 0.28 <= hits / 20_000 <= 0.32


def test_keyed_rate_within_bounds() -> None:
    share = len(cohort(30)) / len(USERS)
    assert 0.25 <= share <= 0.35


def test_keyed_is_consistent_per_user() -> None:
    sampler = build_sampler(30, {"header": "X-User"}, "t")
    for user in USERS[:300]:
        decisions = {sampler(with_user(user)) for _ in range(5)}
        assert len(decisions) == 1


def test_two_targets_at_the_same_percentage_get_the_same_cohort() -> None:
    assert cohort(30, "targets[0]") == cohort(30, "targets[1]")


def test_lower_percentage_is_a_subset() -> None:
    ten, thirty = cohort(10), cohort(30)
    assert ten < thirty
    assert 0.07 <= len(ten) / len(USERS) <= 0.13


def test_bucket_is_stable_across_processes() -> None:
    # Pinned: if these move, every deployed cohort moves with them.
    assert bucket_of("user-1") == 3768
    assert bucket_of("alice") == 4729


def test_cookie_key_parses_every_cookie_header() -> None:
    by_cookie = build_sampler(50, {"cookie": "sid"}, "t")
    by_header = build_sampler(50, {"header": "X-User"}, "t")
    for user in USERS[:300]:
        req = request(headers=[("Cookie", "theme=dark; xsid=nope"), ("cookie", f"a=1; sid={user}; b=2")])
        assert by_cookie(req) == by_header(with_user(user))


def test_query_key_is_percent_decoded() -> None:
    by_query = build_sampler(50, {"query": "user id"}, "t")
    by_header = build_sampler(50, {"header": "X-User"}, "t")
    for i in range(300):
        value = f"a b/{i}"
        encoded = [f"/p?x=1&user+id=a+b%2F{i}", f"/p?user%20id=a%20b/{i}&user+id=other"]
        for path in encoded:
            assert by_query(request(path)) == by_header(with_user(value))


def test_missing_key_random_or_skip() -> None:
    random.seed(7)
    keyless = request("/p?x=1", [("Host", "h"), ("X-User", "")])
    randomly = build_sampler(30, {"header": "X-User"}, "t")
    skipped = build_sampler(30, {"header": "X-User", "missing": "skip"}, "t")
    hits = sum(randomly(keyless) for _ in range(10_000))
    assert 0.27 <= hits / 10_000 <= 0.33
    assert not any(skipped(keyless) for _ in range(1000))


def test_skip_at_hundred_percent_still_skips_keyless() -> None:
    sampler = build_sampler(100, {"query": "u", "missing": "skip"}, "t")
    assert sampler(request("/p?u=1")) is True
    assert sampler(request("/p?v=1")) is False
    assert sampler(request("/p")) is False


@pytest.mark.parametrize(
    ("percentage", "key", "message"),
    [
        (120, None, "t.percentage: must be between 0 and 100, got 120"),
        (-1, None, "t.percentage: must be between 0 and 100, got -1"),
        ("50", None, "t.percentage: must be a number between 0 and 100, got '50'"),
        (True, None, "t.percentage: must be a number between 0 and 100, got True"),
        (30, "X-User", "t.key: must be a mapping with one of header, cookie, query"),
        (30, {}, "t.key: needs exactly one of header, cookie, query, got 0"),
        (30, {"header": "a", "cookie": "b"}, "t.key: needs exactly one of header, cookie, query, got 2"),
        (30, {"headr": "a"}, "t.key.headr: unknown key"),
        (30, {"header": "a", "missing": "drop"}, "t.key.missing: must be one of random, skip, got 'drop'"),
        (30, {"header": ""}, "t.key.header: must be a non-empty string"),
        (30, {"header": "X User"}, "t.key.header: not a valid header name: 'X User'"),
        (30, {"cookie": "a;b"}, "t.key.cookie: not a valid cookie name"),
    ],
)
def test_config_errors_name_the_key(percentage: object, key: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_sampler(percentage, key, "t")  # type: ignore[arg-type]
    assert str(info.value).startswith(message)

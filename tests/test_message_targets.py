"""message.to_request: the request target HAProxy hands over, in origin form (`pathq`) or, for
HTTP/2 and HTTP/3 clients with `url`, in absolute form, which becomes origin form here."""

from __future__ import annotations

import pytest

from spoa_mirror.accounting import TargetStats
from spoa_mirror.config import parse_config
from spoa_mirror.message import BadMessage, to_request
from spoa_mirror.mirror import MemoryBudget, Target


def request(path: str, headers: str = "") -> object:
    return to_request({"arg_method": "GET", "arg_path": path, "arg_hdrs": headers + "\r\n"})


def test_origin_form_is_kept() -> None:
    assert request("/a?b=1", "Host: app.test\r\n").path == "/a?b=1"


def test_absolute_form_without_host_gives_its_authority_as_host() -> None:
    """No Host header (a sender other than HAProxy, which makes one from :authority): the authority
    of the absolute form stands in, so the Host policy still sees the client's host."""
    req = request("https://app.test:8443/a?b=1", "Accept: */*\r\n")
    assert req.path == "/a?b=1"
    assert req.headers == [("Accept", "*/*"), ("host", "app.test:8443")]


def test_absolute_form_with_host_keeps_the_host_header() -> None:
    req = request("http://other.test/x", "Host: app.test\r\n")
    assert (req.path, req.headers) == ("/x", [("Host", "app.test")])


@pytest.mark.parametrize(
    ("path", "origin"), [("http://app.test", "/"), ("https://app.test:8443?q=1", "/?q=1")]
)
def test_absolute_form_without_a_path_becomes_the_root(path: str, origin: str) -> None:
    assert request(path, "Host: app.test\r\n").path == origin


@pytest.mark.parametrize(
    ("path", "reason", "message"),
    [
        ("ws://app.test/x", "bad_target_scheme", "absolute-form target with scheme 'ws'"),
        ("http://u@app.test/x", "bad_target_userinfo", "absolute-form target with userinfo"),
        (
            "http://app.test:80:80/x",
            "bad_target_authority",
            "absolute-form target with authority 'app.test:80:80'",
        ),
        ("http://[::1/x", "bad_target_authority", "absolute-form target with authority '[::1'"),
        ("x" * 40 + "://h/", "bad_target_scheme", f"absolute-form target with scheme {'x' * 32!r}"),
        (
            "http://" + "a:1" * 30 + "/",
            "bad_target_authority",
            f"absolute-form target with authority {('a:1' * 30)[:64]!r}",
        ),
    ],
)
def test_refused_absolute_forms(path: str, reason: str, message: str) -> None:
    """The reason is counted; the message is what the log says, bounded for a long target."""
    with pytest.raises(BadMessage) as caught:
        request(path)
    assert (caught.value.reason, str(caught.value)) == (reason, f"{reason}: {message}")


@pytest.mark.parametrize(
    ("policy", "host"), [("original", b"app.test:8443"), ("suffix", b"app.test-shadow:8443")]
)
def test_host_policy_uses_the_authority_of_an_absolute_form(policy: str, host: bytes) -> None:
    config = parse_config({"targets": [{"name": "t", "url": "http://127.0.0.1:9", "host": policy}]})
    target = Target(
        config.targets[0],
        loop_header="X-Spoa-Mirror",
        truncated_body="drop",
        hmac_key=None,
        stats=TargetStats(),
        budget=MemoryBudget(config.memory_budget),
    )
    raw = target.build(request("https://app.test:8443/a", "Accept: */*\r\n"))
    assert raw.startswith(b"GET /a HTTP/1.1\r\nHost: " + host + b"\r\n")

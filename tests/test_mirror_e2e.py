"""spoa-mirror end to end: a real client, HAProxy 2.6 with `filter spoe`, the agent as a real
subprocess, and recording shadow servers. Every assertion is about what a shadow received (its raw
bytes where it matters), what the agent's /metrics and logs say, and what HAProxy answered.

Most tests share one stack (`stack`, per module): one shadow per target, and each target only
allows its own path prefix (`/basic/`, `/redact/`, ...), so a test's requests reach its targets and
are `filtered` everywhere else; tests compare metrics with a snapshot taken before they send
(`MirrorStack.settle`). Mirrors of consecutive requests travel on different connections to the
shadow and may arrive in any order, so tests find a shadow's requests by path. Tests that need
another agent config or that stop the agent (reload, SIGTERM, GAL, truncated_body: drop) start
their own small stack.

HAProxy facts these tests rely on (2.6.12), besides those pinned in test_haproxy_engine.py:
* `req.body_len` is the length of the body HAProxy *has* (at most its buffer), not the client's
  Content-Length: a body cut at the buffer arrives with body_len equal to its cut length.
* with `option http-buffer-request`, a body larger than the buffer is cut a little under
  tune.bufsize - tune.maxrewrite (1024), the headers and HTX blocks taking the rest (about
  1,098,700 bytes of a 1.5 MB body at tune.bufsize 1100000); the SPOE event and the response go
  on at once, HAProxy answering with `Connection: close` instead of waiting for the rest.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from spoa_mirror.sampling import bucket_of
from tests.support.mirror_stack import MirrorStack, SpoeMessage, mirror_stack, series
from tests.support.procs import HAProxyRelease
from tests.support.shadow import ShadowServer

pytestmark = pytest.mark.haproxy

BUFSIZE = 1_100_000  # room for a 1 MiB body in HAProxy's request buffer and in one SPOE frame
CANARY = f"canary{secrets.token_hex(8)}"  # a secret no shadow, log line or metric may ever show
CARD = "4" + "".join(random.choices("0123456789", k=15))  # a card number for the pattern rule

SHADOWS = {
    "basic": "ok",
    "original": "ok",
    "suffix": "ok",
    "redact": "ok",
    "hmac": "ok",
    "body": "ok",
    "sample_a": "ok",
    "sample_b": "ok",
    "sample_random": "ok",
    "filters": "ok",
    "get_only": "ok",
    "rate": "ok",
    "refused": "refuse",
    "hang": "hang",
    "reset": "reset",
    "garbage": "garbage",
    "load": "ok",
    "dead": "refuse",
}
# The second message is sent instead of `mirror` for /invalid/ paths: named as a mirror message
# (`messages:` below) but without a method, so the agent must count it invalid and still ACK.
MESSAGES = (
    SpoeMessage(condition="unless { path_beg /invalid/ }"),
    SpoeMessage(
        name="mirror_nomethod", args="arg_path=url arg_hdrs=req.hdrs", condition="if { path_beg /invalid/ }"
    ),
)


def main_config(shadows: dict[str, ShadowServer], hmac_key_file: Path) -> dict:
    def target(name: str, prefix: str, **keys: object) -> dict:
        return {
            "name": name,
            "url": shadows[name].url,
            "filters": {"allow": {"path_prefix": [prefix]}},
            **keys,
        }

    # Timeouts count as breaker failures: the fault targets keep theirs closed, so every request
    # shows how its fault is classified.
    no_breaker = {"failure_threshold": 1000}
    return {
        "messages": ["mirror", "mirror_nomethod"],
        "truncated_body": "send_marked",
        "secrets": {"hmac_key_file": str(hmac_key_file)},
        "targets": [
            target(
                "basic",
                "/basic/",
                url=shadows["basic"].url + "/base",
                headers={"X-Env": "shadow"},
                remove_headers=["X-Internal"],
            ),
            target("original", "/host/", host="original"),
            target("suffix", "/host/", host="suffix"),
            target(
                "redact",
                "/redact/",
                redact={
                    "query": {"token": "mask"},
                    "json_fields": {"user.cards.number": "mask"},
                    "form_fields": {"password": "mask"},
                    "patterns": {"card": {"regex": r"\b[0-9]{13,19}\b", "action": "mask"}},
                },
            ),
            target(
                "hmac", "/hmac/", redact={"headers": {"Authorization": "hmac"}, "query": {"token": "hmac"}}
            ),
            target("body", "/body/", max_body_size="2MiB"),
            target("sample_a", "/sample/", sample_percentage=30, sample_key={"header": "X-User"}),
            target("sample_b", "/sample/", sample_percentage=30, sample_key={"header": "X-User"}),
            target("sample_random", "/sample/", sample_percentage=50),
            {
                "name": "filters",
                "url": shadows["filters"].url,
                "filters": {
                    "allow": {"path_prefix": ["/filter/"]},
                    "deny": {"path_prefix": ["/filter/private"]},
                    "ignore_path_case": True,
                },
            },
            target("get_only", "/filter/", methods=["GET", "HEAD"]),
            target("rate", "/rate/", rate_limit={"requests_per_second": 5, "burst_seconds": 1}),
            target(
                "refused",
                "/breaker/",
                circuit_breaker={"failure_threshold": 3, "backoff": 60, "max_backoff": 60},
            ),
            target("hang", "/fault/", timeout="300ms", circuit_breaker=no_breaker),
            target("reset", "/fault/", circuit_breaker=no_breaker),
            target("garbage", "/fault/", circuit_breaker=no_breaker),
            target("load", "/load/"),
            target("dead", "/load/"),
        ],
    }


@pytest.fixture(scope="module")
def hmac_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    key = secrets.token_hex(16).encode()
    path = tmp_path_factory.mktemp("secrets") / "hmac.key"
    path.write_bytes(key + b"\n")
    return path, key


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, hmac_key: tuple[Path, bytes], haproxy_release: HAProxyRelease
) -> Iterator[MirrorStack]:
    """One HAProxy + agent + 18 shadows for the module, per HAProxy release. The agent's frames are
    as large as HAProxy's (tune.bufsize), so no message is ever fragmented here."""
    with mirror_stack(
        tmp_path_factory.mktemp("stack"),
        SHADOWS,
        lambda shadows: main_config(shadows, hmac_key[0]),
        bufsize=BUFSIZE,
        messages=MESSAGES,
    ) as running:
        yield running


@pytest.fixture
def shared(stack: MirrorStack, haproxy_release: HAProxyRelease) -> Iterator[MirrorStack]:
    """The module's stack with empty shadow recordings, and an agent still running (a test that
    killed it would otherwise make every later one fail obscurely), in front of this test's HAProxy."""
    assert stack.haproxy.release == haproxy_release, "the module's stack runs another HAProxy"
    for shadow in stack.shadows.values():
        shadow.clear()
    stack.agent.assert_running()
    yield stack


def client(stack: MirrorStack) -> httpx.Client:
    return httpx.Client(base_url=stack.url, timeout=10, trust_env=False)


def assert_served(response: httpx.Response) -> None:
    """HAProxy answered itself, after an ACK: no SPOE error (timeout, frame too big...)."""
    assert response.status_code == 200, response
    assert "x-spoe-error" not in response.headers, f"SPOE error {response.headers['x-spoe-error']}"


# -- replay ----------------------------------------------------------------------------------


def test_replay_sends_the_request_with_base_path_headers_and_body(shared: MirrorStack) -> None:
    """What the shadow gets is the client's request, rebuilt: the target URL's path before the
    client's path, the query kept byte for byte, the client's headers in order minus the removed
    ones, the configured headers and the loop marker added, X-Forwarded-For extended with HAProxy's
    `src`, the Host of the target URL (host: target), the body whole with its Content-Length."""
    before = shared.metrics()
    body = json.dumps({"item": 7, "name": "caf\u00e9"}).encode()
    with client(shared) as http:
        assert_served(
            http.post(
                "/basic/items/7?q=1&b=two%20words",
                content=body,
                headers={
                    "Content-Type": "application/json",
                    "X-Custom": "kept",
                    "X-Internal": "not for shadows",
                    "X-Forwarded-For": "10.9.8.7",
                },
            )
        )
        assert_served(http.get("/basic/search?page=3", headers={"Accept": "text/html"}))
    post, get = sorted(shared.shadows["basic"].wait_for(2), key=lambda r: r.method != "POST")
    assert shared.settle("basic", 2, before) == {"sent_2xx": 2}

    assert post.method == "POST"
    assert post.target == "/base/basic/items/7?q=1&b=two%20words"
    assert post.body == body
    assert post.header("content-length") == str(len(body))
    assert post.header("content-type") == "application/json"
    assert post.header("x-custom") == "kept"
    assert post.header("x-internal") is None
    assert post.header("x-env") == "shadow"
    assert post.header("x-forwarded-for") == "10.9.8.7, 127.0.0.1"
    assert post.header_values("x-spoa-mirror")[0].startswith("v1-")
    assert post.header_values("host") == [f"127.0.0.1:{shared.shadows['basic'].port}"]

    assert get.method == "GET"
    assert get.target == "/base/basic/search?page=3"
    assert get.body == b""
    assert get.header("accept") == "text/html"
    assert get.header("x-forwarded-for") == "127.0.0.1"


def test_host_policies_original_and_suffix(shared: MirrorStack) -> None:
    before = shared.metrics()
    with client(shared) as http:
        assert_served(http.get("/host/x", headers={"Host": "app.example.com:8443"}))
    assert shared.shadows["original"].wait_for(1)[0].header_values("host") == ["app.example.com:8443"]
    assert shared.shadows["suffix"].wait_for(1)[0].header_values("host") == ["app.example.com-shadow:8443"]
    assert shared.settle("original", 1, before) == {"sent_2xx": 1}
    assert shared.settle("suffix", 1, before) == {"sent_2xx": 1}


def test_a_request_carrying_the_loop_marker_is_not_mirrored(shared: MirrorStack) -> None:
    """A shadow that is itself behind a mirroring HAProxy sends our marker back in: mirroring it
    again would loop. Counted `loop` for every target, before any filter. The marker's value is a
    MAC of the agent's key: a client sending the header with any other value (`1`, what the marker
    used to be) is mirrored anyway, with the value replaced, so no client can opt out of mirroring."""
    before = shared.metrics()
    with client(shared) as http:
        assert_served(http.get("/basic/first"))
    assert shared.settle("basic", 1, before) == {"sent_2xx": 1}
    [first] = shared.shadows["basic"].wait_for(1)
    [marker] = first.header_values("x-spoa-mirror")
    assert marker.startswith("v1-") and len(marker) == 35
    shared.shadows["basic"].clear()

    before = shared.metrics()
    with client(shared) as http:
        assert_served(http.get("/basic/again", headers={"X-Spoa-Mirror": marker}))
    assert shared.settle("basic", 1, before) == {"loop": 1}
    assert shared.settle("load", 1, before) == {"loop": 1}
    assert shared.shadows["basic"].requests == []

    before = shared.metrics()
    with client(shared) as http:
        assert_served(http.get("/basic/opt-out", headers={"X-Spoa-Mirror": "1"}))
        forged = marker[:-1] + ("1" if marker.endswith("0") else "0")  # one character off
        assert_served(http.get("/basic/opt-out", headers={"x-spoa-mirror": forged}))
    assert shared.settle("basic", 2, before) == {"sent_2xx": 2}
    for request in shared.shadows["basic"].wait_for(2):
        assert request.header_values("x-spoa-mirror") == [marker]


def test_client_headers_cannot_override_or_remove_what_is_added(shared: MirrorStack) -> None:
    """The operator's `X-Env: shadow` is the only X-Env the shadow sees, whatever the client sent;
    a client's `Connection` header naming the operator's header, the loop marker, the truncation
    marker, X-Forwarded-For or the request id removes none of them (the red-team pass found the
    shadow received none), while a header of the client's own named there is still dropped as
    hop-by-hop."""
    before = shared.metrics()
    listed = "keep-alive, X-Env, X-Spoa-Mirror, X-Forwarded-For, X-Request-ID, X-Mirror-Truncated, X-Hop"
    with client(shared) as http:
        assert_served(
            http.get(
                "/basic/conn",
                headers={
                    "Connection": listed,
                    "X-Env": "production",
                    "X-Request-ID": "req-42",
                    "X-Mirror-Truncated": "true",
                    "X-Hop": "hop-by-hop",
                },
            )
        )
    [request] = shared.shadows["basic"].wait_for(1)
    assert shared.settle("basic", 1, before) == {"sent_2xx": 1}
    assert request.header_values("x-env") == ["shadow"]
    assert len(request.header_values("x-spoa-mirror")) == 1
    assert request.header_values("x-forwarded-for") == ["127.0.0.1"]
    assert request.header_values("x-request-id") == ["req-42"]
    assert request.header_values("x-mirror-truncated") == []  # the client's claim is not forwarded
    assert request.header_values("x-hop") == []


# -- redaction -------------------------------------------------------------------------------


def test_secrets_never_reach_shadows_logs_or_metrics(shared: MirrorStack) -> None:
    """A canary secret in every place a rule covers: the default headers (Authorization, Cookie,
    X-Api-Key), a query parameter, a JSON field nested in an array, a form field; a card number in
    a plain text body and in a query value, for the pattern. The shadow's raw bytes, the agent's
    whole output and /metrics must not contain either."""
    before = shared.metrics()
    card_json = {"user": {"name": "ann", "cards": [{"number": CANARY, "label": "main"}, {"number": CANARY}]}}
    with client(shared) as http:
        assert_served(
            http.get(
                f"/redact/q?token={CANARY}&page=2",
                headers={"Authorization": f"Bearer {CANARY}", "Cookie": f"sid={CANARY}", "X-Api-Key": CANARY},
            )
        )
        assert_served(http.post("/redact/json", json=card_json))
        assert_served(
            http.post(
                "/redact/form",
                content=f"user=bob&password={CANARY}",
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
        )
        assert_served(
            http.post("/redact/text", content=f"pay with {CARD} now", headers={"Content-Type": "text/plain"})
        )
        assert_served(http.get(f"/redact/card?note=card-{CARD}"))
    received = {urlsplit(r.target).path: r for r in shared.shadows["redact"].wait_for(5)}
    query, document, form, text, card_query = (
        received[f"/redact/{name}"] for name in ("q", "json", "form", "text", "card")
    )
    assert shared.settle("redact", 5, before) == {"sent_2xx": 5}

    for request in (query, document, form, text, card_query):
        assert CANARY.encode() not in request.raw
        assert CARD.encode() not in request.raw
    logs, metrics = shared.agent_logs(), shared.metrics_text()
    assert CANARY not in logs and CARD not in logs
    assert CANARY not in metrics and CARD not in metrics

    assert query.header("authorization") == "[REDACTED]"
    assert query.header("cookie") == "[REDACTED]"
    assert query.header("x-api-key") == "[REDACTED]"
    assert query.target == "/redact/q?token=%5BREDACTED%5D&page=2"
    assert json.loads(document.body) == {
        "user": {
            "name": "ann",
            "cards": [{"number": "[REDACTED]", "label": "main"}, {"number": "[REDACTED]"}],
        }
    }
    assert document.header("content-length") == str(len(document.body))
    assert form.body == b"user=bob&password=%5BREDACTED%5D"
    assert text.body == b"pay with [REDACTED] now"
    assert parse_qs(urlsplit(card_query.target).query) == {"note": ["card-[REDACTED]"]}

    after = shared.metrics()
    counted = {
        rule: after.get(series("spoa_mirror_redactions_total", rule=rule, target="redact"), 0)
        - before.get(series("spoa_mirror_redactions_total", rule=rule, target="redact"), 0)
        for rule in (
            "header:authorization",
            "header:cookie",
            "header:x-api-key",
            "query:token",
            "json:user.cards.number",
            "form:password",
            "pattern:card",
        )
    }
    assert counted == {
        "header:authorization": 1,
        "header:cookie": 1,
        "header:x-api-key": 1,
        "query:token": 1,
        "json:user.cards.number": 2,
        "form:password": 1,
        "pattern:card": 2,
    }


def test_hmac_redaction_gives_equal_digests_for_equal_values(
    shared: MirrorStack, hmac_key: tuple[Path, bytes]
) -> None:
    """`hmac` keeps requests correlatable without the value: the same token gives the same digest
    across requests, another token another one, and the digest is HMAC-SHA256 under the key read
    from `secrets.hmac_key_file` (trailing newline stripped), truncated to 32 hex digits."""
    _, key = hmac_key

    def digest(value: str) -> str:
        return "hmac-sha256:" + hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:32]

    other = f"other{secrets.token_hex(8)}"
    with client(shared) as http:
        for n, token in enumerate((CANARY, CANARY, other)):
            assert_served(http.get(f"/hmac/{n}?token={token}", headers={"Authorization": f"Bearer {token}"}))
    first, second, third = sorted(shared.shadows["hmac"].wait_for(3), key=lambda r: r.target)

    assert first.header("authorization") == second.header("authorization") == digest(f"Bearer {CANARY}")
    assert third.header("authorization") == digest(f"Bearer {other}")
    assert parse_qs(urlsplit(first.target).query) == {"token": [digest(CANARY)]}
    assert parse_qs(urlsplit(second.target).query) == {"token": [digest(CANARY)]}
    assert parse_qs(urlsplit(third.target).query) == {"token": [digest(other)]}
    for request in (first, second, third):
        assert CANARY.encode() not in request.raw and other.encode() not in request.raw
    assert key.decode() not in shared.agent_logs()


# -- bodies ----------------------------------------------------------------------------------


def test_one_mib_body_arrives_whole(shared: MirrorStack) -> None:
    """A 1 MiB POST reaches the shadow byte for byte. What it takes with HAProxy 2.6:
    * `tune.bufsize` 1100000, so `option http-buffer-request` holds the whole body (the usable
      room is bufsize - maxrewrite 1024 - headers) and `req.body` returns all of it;
    * the agent's `listen.max_frame_size` at least HAProxy's frame (tune.bufsize - 4 by default):
      the NOTIFY then travels as one frame of ~1 MiB. With the agent's default 16 KiB frames HAProxy
      fragments it instead (send-frag-payload is on by default and the agent announces
      fragmentation): 1,000,000 bytes still arrive whole in ~62 fragments, but 1 MiB plus the other
      arguments is over the agent's fixed 1 MiB reassembly cap, so the agent closes the SPOP
      connection (status 13), HAProxy reconnects in a loop until `timeout processing`, the client
      waits that long and the mirror is lost without appearing in requests_received;
    * the target's `max_body_size` above 1 MiB (the default 10 MiB is).
    """
    body = random.randbytes(1 << 20)
    before = shared.metrics()
    with client(shared) as http:
        assert_served(http.post("/body/big", content=body))
    [request] = shared.shadows["body"].wait_for(1)
    assert shared.settle("body", 1, before) == {"sent_2xx": 1}
    assert request.header("content-length") == str(len(body))
    assert request.header("x-mirror-truncated") is None
    assert request.body == body


def test_large_body_is_redacted_off_the_loop_and_unreadable_bodies_are_dropped(shared: MirrorStack) -> None:
    """A 300 KB JSON body (over the 64 KiB the loop redacts itself) goes to the worker process and
    arrives redacted, its redaction counted; a body in an encoding the agent cannot read (br) is not
    sent at all and counts as `unredactable`."""
    records = [{"id": i, "name": f"user-{i}", "note": "x" * 40} for i in range(4000)]
    records[1234]["password"] = CANARY
    body = json.dumps({"records": records}).encode()
    assert len(body) > 64 * 1024
    rule = series("spoa_mirror_redactions_total", rule="json:default", target="body")
    before = shared.metrics()
    with client(shared) as http:
        assert_served(http.post("/body/json", content=body, headers={"Content-Type": "application/json"}))
        assert_served(
            http.post(
                "/body/br", content=b"\x0b\x02\x80" + CANARY.encode(), headers={"Content-Encoding": "br"}
            )
        )
    [request] = shared.shadows["body"].wait_for(1)
    assert shared.settle("body", 2, before) == {"sent_2xx": 1, "unredactable": 1}
    assert request.target == "/body/json"
    assert CANARY.encode() not in request.raw
    sent = json.loads(request.body)
    assert sent["records"][1234] == {
        "id": 1234,
        "name": "user-1234",
        "note": "x" * 40,
        "password": "[REDACTED]",
    }
    assert sent["records"][:3] == records[:3]
    assert shared.metrics()[rule] - before.get(rule, 0) == 1
    # It was redacted in the worker process (a child of the agent), not on the event loop.
    assert any(b"spawn_main" in cmdline for cmdline in child_cmdlines(shared.agent.pid))


def child_cmdlines(pid: int) -> list[bytes]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += (task / "children").read_text().split()
    return [Path(f"/proc/{child}/cmdline").read_bytes() for child in children]


def test_truncated_body_is_sent_marked_with_its_real_length(shared: MirrorStack) -> None:
    """A body larger than HAProxy's buffer is cut; with `truncated_body: send_marked` the shadow
    gets the part HAProxy had, framed by a Content-Length of that part (so it never waits for
    bytes that will not come: the exchange completes, sent_2xx) and marked X-Mirror-Truncated."""
    body = random.randbytes(1_500_000)
    before = shared.metrics()
    with client(shared) as http:
        assert_served(http.post("/body/truncated", content=body))
    [request] = shared.shadows["body"].wait_for(1)
    assert shared.settle("body", 1, before) == {"sent_2xx": 1}
    assert 1_000_000 < len(request.body) < BUFSIZE
    assert request.header("content-length") == str(len(request.body))
    assert request.body == body[: len(request.body)]
    assert request.header("x-mirror-truncated") == "true"
    truncated = series("spoa_mirror_truncated_sent_total", target="body")
    assert shared.metrics()[truncated] - before[truncated] == 1


def test_truncated_body_is_dropped_by_default(tmp_path: Path, haproxy_release: HAProxyRelease) -> None:
    """`truncated_body: drop` (the default): the mirror of a cut body is counted body_truncated and
    the shadow gets nothing, while a body that fits goes through. On 2.6, small frames on both sides
    (`max-frame-size 16384`), so the 60 KB body also crosses SPOP in fragments; 3.2 cannot fragment,
    so there the frames are as large as the buffer."""
    small_frames = {"max_frame_size": 16384, "agent_options": "max-frame-size 16384"}
    with mirror_stack(
        tmp_path,
        {"a": "ok"},
        lambda s: {"targets": [{"name": "a", "url": s["a"].url}]},
        bufsize=65536,
        **({} if haproxy_release.at_least_3_1 else small_frames),  # type: ignore[arg-type]
    ) as stack:
        fits, too_big = random.randbytes(60_000), random.randbytes(200_000)
        before = stack.metrics()
        with client(stack) as http:
            assert_served(http.post("/too-big", content=too_big))
            assert_served(http.post("/fits", content=fits))
        assert stack.settle("a", 2, before) == {"body_truncated": 1, "sent_2xx": 1}
        [request] = stack.shadows["a"].requests
        assert request.target == "/fits"
        assert request.body == fits


# -- sampling, filters, limits ---------------------------------------------------------------


def test_sampling_keyed_targets_see_the_same_users(shared: MirrorStack) -> None:
    """2,000 requests from 2,000 users: the two 30% targets keyed on X-User receive exactly the same
    users, namely those whose BLAKE2b bucket is under 3,000 (so every agent in a fleet agrees), about
    30% of them; the random 50% target receives about half the requests. The bounds are over 4.5
    standard deviations wide."""
    users = [f"user-{n}-{secrets.token_hex(4)}" for n in range(2000)]
    before = shared.metrics()
    responses = shared.blast([(f"/sample/{n}", {"X-User": user}) for n, user in enumerate(users)])
    assert {response.status for response in responses} == {200}
    outcomes = {
        name: shared.settle(name, len(users), before) for name in ("sample_a", "sample_b", "sample_random")
    }

    cohort = {user for user in users if bucket_of(user) < 3000}
    seen = {
        name: {r.header("x-user") for r in shared.shadows[name].requests} for name in ("sample_a", "sample_b")
    }
    assert seen["sample_a"] == seen["sample_b"] == cohort
    assert 0.25 <= len(cohort) / len(users) <= 0.35
    assert outcomes["sample_a"] == {"sent_2xx": len(cohort), "sampled_out": len(users) - len(cohort)}
    random_sent = len(shared.shadows["sample_random"].requests)
    assert 0.45 <= random_sent / len(users) <= 0.55
    assert outcomes["sample_random"] == {"sent_2xx": random_sent, "sampled_out": len(users) - random_sent}


def test_filters_and_methods(shared: MirrorStack) -> None:
    """Path prefix allow and deny; a GET/HEAD-only target never sees a POST (counted filtered)."""
    before = shared.metrics()
    with client(shared) as http:
        for method, path in (
            ("GET", "/filter/a"),
            ("POST", "/filter/b"),
            ("HEAD", "/filter/c"),
            ("GET", "/filter/private/d"),
        ):
            assert_served(http.request(method, path))
    assert shared.settle("filters", 4, before) == {"sent_2xx": 3, "filtered": 1}
    assert shared.settle("get_only", 4, before) == {"sent_2xx": 3, "filtered": 1}
    assert sorted(r.target for r in shared.shadows["filters"].requests) == [
        "/filter/a",
        "/filter/b",
        "/filter/c",
    ]
    get_only = shared.shadows["get_only"].requests
    assert sorted((r.method, r.target) for r in get_only) == [
        ("GET", "/filter/a"),
        ("GET", "/filter/private/d"),
        ("HEAD", "/filter/c"),
    ]


BYPASS_SPELLINGS = (
    "/filter//private/d",
    "/filter/./private/d",
    "/FILTER/Private/d",
    "/filter/%70rivate/d",
    "//filter/private/d",
    "/x/../filter/private/d",
    "/filter/private/../private/d?x=1",
)


def raw_get(stack: MirrorStack, target: str, extra_headers: str = "") -> bytes:
    """One request with its target byte for byte as written (HTTP clients normalise dot segments)."""
    port = int(urlsplit(stack.url).port or 80)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            f"GET {target} HTTP/1.1\r\nHost: app\r\n{extra_headers}Connection: close\r\n\r\n".encode()
        )
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    return response


def test_filters_match_the_normalised_path_and_method_overrides(shared: MirrorStack) -> None:
    """The red-team pass found `deny: [/filter/private]` passed every spelling below, through
    HAProxy 2.6, and a GET/HEAD-only target was sent a GET carrying `X-HTTP-Method-Override:
    DELETE`. Each is now `filtered`; the target with `ignore_path_case` also stops `/FILTER/...`."""
    before = shared.metrics()
    for target in BYPASS_SPELLINGS:
        assert raw_get(shared, target).startswith(b"HTTP/1.1 200"), target
    assert shared.settle("filters", len(BYPASS_SPELLINGS), before) == {"filtered": len(BYPASS_SPELLINGS)}
    assert shared.shadows["filters"].requests == []

    shared.settle("get_only", len(BYPASS_SPELLINGS), before)  # it allows these GETs: let them land
    shared.shadows["get_only"].clear()
    before = shared.metrics()
    for override in ("X-HTTP-Method-Override: DELETE", "X-HTTP-Method: put", "X-Method-Override: POST"):
        assert raw_get(shared, "/filter/override", f"{override}\r\n").startswith(b"HTTP/1.1 200")
    assert shared.settle("get_only", 3, before) == {"filtered": 3}
    assert shared.shadows["get_only"].requests == []


def test_rate_limit_drops_the_excess_and_counts_it(shared: MirrorStack) -> None:
    """5 requests a second with a 1 s burst: of 30 requests sent at once the burst passes and the
    excess is rate_limited, each one accounted; HAProxy serves them all. How many pass depends on
    how long the 30 take (the bucket refills meanwhile): only a run slower than 5 s could let them
    all through. The exact count is checked in-process, in test_pipeline.py."""
    before = shared.metrics()
    responses = shared.blast([(f"/rate/{n}", {}) for n in range(30)], concurrency=5)
    assert {response.status for response in responses} == {200}
    outcomes = shared.settle("rate", 30, before)
    assert set(outcomes) == {"sent_2xx", "rate_limited"}
    assert outcomes["sent_2xx"] >= 5
    assert outcomes["sent_2xx"] == len(shared.shadows["rate"].requests)


def test_circuit_breaker_opens_on_a_refused_target(shared: MirrorStack) -> None:
    """failure_threshold 3: the first three connection failures are counted error_connect, then the
    breaker opens (60 s backoff) and circuit_open takes every later request without a connect. The
    three are settled before the rest are sent, so the count does not depend on how fast the agent
    learns of each failure (a loaded machine let more through while they were pending)."""
    before = shared.metrics()
    with client(shared) as http:
        for n in range(3):
            assert_served(http.get(f"/breaker/{n}"))
        first = shared.settle("refused", 3, before)
        for n in range(3, 40):
            assert_served(http.get(f"/breaker/{n}"))
    outcomes = shared.settle("refused", 40, before)
    assert first == {"error_connect": 3}
    assert outcomes == {"error_connect": 3, "circuit_open": 37}


# -- faults ----------------------------------------------------------------------------------


def test_shadow_faults_are_classified_and_never_reach_the_client(shared: MirrorStack) -> None:
    """A shadow that hangs (target timeout 300 ms), resets the connection mid-response, or answers
    bytes that are not HTTP: error_timeout, error_reset, error_protocol; meanwhile HAProxy answers
    every client request with 200 and no SPOE error. (That the ACK goes out before any replay work
    is checked structurally, by the order of writes, in test_pipeline.py.)"""
    before = shared.metrics()
    with client(shared) as http:
        for n in range(3):
            assert_served(http.get(f"/fault/{n}"))
    assert shared.settle("hang", 3, before) == {"error_timeout": 3}
    assert shared.settle("reset", 3, before) == {"error_reset": 3}
    assert shared.settle("garbage", 3, before) == {"error_protocol": 3}
    for name in ("hang", "reset", "garbage"):
        # Pipelining (pipeline_depth 8 by default): a request the agent put behind a faulty one on
        # the same connection ends with that fault's outcome without the shadow reading it. What
        # holds is that none is sent twice (a fault is never retried) and the first got there.
        targets = [request.target for request in shared.shadows[name].requests]
        assert 1 <= len(targets) == len(set(targets)) <= 3, targets
        assert "/fault/0" in targets


# -- accounting ------------------------------------------------------------------------------


def test_every_request_is_accounted_after_load(shared: MirrorStack) -> None:
    """2,000 requests over 20 keep-alive connections, mirrored to a healthy shadow and a dead one
    (and offered to every other target, which filters them). Once quiet, for every target:
    received == sum(outcomes) and in_flight == 0; the healthy shadow got exactly sent_2xx requests;
    HAProxy served every request with 200 and no SPOE error."""
    count = 2000
    before = shared.metrics()
    responses = shared.blast([(f"/load/{n}", {}) for n in range(count)])
    assert all(response.status == 200 and "x-spoe-error" not in response.headers for response in responses)

    load = shared.settle("load", count, before)
    dead = shared.settle("dead", count, before)
    for name in SHADOWS:
        shared.settle(name, count, before)  # every target has seen the whole load
    metrics = shared.metrics()
    for name in SHADOWS:
        account = shared.account(name, metrics)
        assert account.in_flight == 0, name
        assert account.received == account.settled, (name, account)

    assert len(shared.shadows["load"].requests) == load["sent_2xx"]
    assert sum(load.values()) == count
    assert set(dead) <= {"error_connect", "circuit_open"}
    assert sum(dead.values()) == count
    mirrored = series("spoa_mirror_messages_total", reason="none", result="mirrored")
    assert metrics[mirrored] - before[mirrored] == count


# -- invalid messages ------------------------------------------------------------------------


def test_invalid_message_is_counted_and_still_acked(shared: MirrorStack) -> None:
    """A message named as a mirror message but without a method: the agent counts it
    (`spoa_mirror_messages_total{result="invalid",reason="missing_method"}`), offers it to no
    target, and ACKs it: HAProxy answers 200 without an SPOE error, so within `timeout processing`."""
    invalid = series("spoa_mirror_messages_total", reason="missing_method", result="invalid")
    before = shared.metrics()
    with client(shared) as http:
        response = http.get("/invalid/no-method")
    assert_served(response)
    deadline = time.monotonic() + 5
    while (after := shared.metrics()).get(invalid, 0) == before.get(invalid, 0):
        assert time.monotonic() < deadline, "the invalid message was never counted"
        time.sleep(0.02)
    assert after[invalid] - before.get(invalid, 0) == 1
    received = series("spoa_mirror_requests_received_total", target="basic")
    assert after[received] == before[received]


# -- lifecycle -------------------------------------------------------------------------------


def test_sighup_reload_switches_targets_without_dropping_spop_connections(tmp_path: Path) -> None:
    """SIGHUP with a new target list: the next requests go to the new target and the SPOP
    connections HAProxy holds stay (no new one accepted, none closed). A bad config on the next
    SIGHUP is refused with `config.reload_failed` naming the key, and the running one stays."""
    with mirror_stack(
        tmp_path, {"a": "ok", "b": "ok"}, lambda s: {"targets": [{"name": "a", "url": s["a"].url}]}
    ) as stack:
        a, b = stack.shadows["a"], stack.shadows["b"]
        with client(stack) as http:
            for n in range(3):
                assert_served(http.get(f"/before/{n}"))
            a.wait_for(3)
            before = stack.metrics()

            stack.reload({"targets": [{"name": "b", "url": b.url}]})
            stack.wait_for_event("config.reloaded")
            for n in range(3):
                assert_served(http.get(f"/after/{n}"))
            assert sorted(r.target for r in b.wait_for(3)) == ["/after/0", "/after/1", "/after/2"]

            stack.reload({"targets": [{"name": "b", "url": b.url, "sample_percentage": 200}]})
            [failed] = stack.wait_for_event("config.reload_failed")
            assert_served(http.get("/after-bad-config"))
            assert "/after-bad-config" in {r.target for r in b.wait_for(4)}
        assert "targets[0].sample_percentage" in failed["error"]
        assert len(a.requests) == 3
        after = stack.metrics()
        for name in ("spoa_mirror_spop_connections_total", "spoa_mirror_spop_connections_open"):
            assert after[name] == before[name] == 1, name


def test_sigterm_drains_what_it_can_and_exits_zero(tmp_path: Path) -> None:
    """On SIGTERM the agent sends what is queued until drain_timeout (5 s): the mirrors to a slow
    shadow (500 ms) are drained, those to a hung one are dropped; it logs `agent.stopped` with both
    counts and exits 0. SIGTERM goes once both shadows hold all four, so the slow ones are in flight
    (answers due 0.5 s later) and the drain has ten times their delay to finish them."""
    with mirror_stack(
        tmp_path,
        {"slow": "delay", "hung": "hang"},
        lambda s: {
            "drain_timeout": 5,
            "targets": [
                {"name": "slow", "url": s["slow"].url},
                {"name": "hung", "url": s["hung"].url, "timeout": 30},
            ],
        },
    ) as stack:
        stack.shadows["slow"].delay = 0.5
        with client(stack) as http:
            for n in range(4):
                assert_served(http.get(f"/pending/{n}"))
        stack.shadows["hung"].wait_for(4)
        stack.shadows["slow"].wait_for(4)
        status = stack.agent.stop(grace=30)  # the drain takes its 5 s (the hung shadow's requests)
        [stopped] = stack.agent_events("agent.stopped")
        assert status == 0
        assert (stopped["drained"], stopped["dropped"]) == (4, 4)
        assert len(stack.shadows["slow"].requests) == 4


def test_gal_mirroring_block(tmp_path: Path) -> None:
    """The GAL form of the config (`mirroring: {enabled, targets: [{name, upstream: {host, port},
    sample_percentage, headers}]}`) mirrors like the native one."""
    with mirror_stack(
        tmp_path,
        {"gal": "ok", "off": "ok"},
        lambda s: {
            "mirroring": {
                "enabled": True,
                "targets": [
                    {
                        "name": "gal-shadow",
                        "upstream": {"host": "127.0.0.1", "port": s["gal"].port},
                        "sample_percentage": 100,
                        "headers": {"X-Env": "shadow"},
                    },
                    {
                        "name": "gal-off",
                        "upstream": {"host": "127.0.0.1", "port": s["off"].port},
                        "sample_percentage": 0,
                    },
                ],
            }
        },
    ) as stack:
        before = stack.metrics()
        with client(stack) as http:
            assert_served(http.post("/gal?x=1", content=b"payload"))
        [request] = stack.shadows["gal"].wait_for(1)
        assert stack.settle("gal-shadow", 1, before) == {"sent_2xx": 1}
        assert stack.settle("gal-off", 1, before) == {"sampled_out": 1}
        assert (request.method, request.target, request.body) == ("POST", "/gal?x=1", b"payload")
        assert request.header("x-env") == "shadow"
        assert request.header_values("host") == [f"127.0.0.1:{stack.shadows['gal'].port}"]
        assert stack.shadows["off"].requests == []

"""HTTP/2 clients through the real HAProxy are mirrored exactly as the same requests over HTTP/1.1.

HAProxy's `url` fetch gives the absolute form (`https://app.test/p?q=1`) for a request that came over
HTTP/2, and `pathq` the origin form; HAProxy turns `:authority` into a Host header. The agent must
send the HTTP/1.1 shadow the same bytes whichever way the client came in: the frontend has an
HTTP/1.1 bind, an `h2` TLS bind (ALPN h2,http/1.1, a self-signed certificate made here) and a
`proto h2` cleartext bind, and curl (`--http1.1`, `--http2`, `--http2-prior-knowledge`) and httpx
send the same requests to each; the shadow's recordings are compared byte for byte.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.support.mirror_stack import MIRROR_ARGS, MirrorStack, SpoeMessage, mirror_stack
from tests.support.procs import free_port
from tests.support.shadow import RecordedRequest, self_signed_tls

pytestmark = pytest.mark.haproxy

CURL = shutil.which("curl") or "/usr/bin/curl"
BODY = b'{"order": 42, "items": ["a", "b"]}'
# (method, path, extra headers, body): each client sends all of them, in order.
REQUESTS = [
    ("GET", "/items?id=42&x=%20y", {"Accept": "application/json", "X-Trace": "abc"}, b""),
    ("POST", "/orders", {"Content-Type": "application/json"}, BODY),
    ("DELETE", "/items/7", {}, b""),
    ("GET", "/", {"Cookie": "session=s1; theme=dark"}, b""),
]


def _pem_bundle(tmp_path: Path) -> tuple[str, str]:
    """HAProxy's `crt` wants the certificate and its key in one file; returns (bundle, CA file)."""
    _, cert_path = self_signed_tls(str(tmp_path), common_name="127.0.0.1")
    bundle = tmp_path / "haproxy-cert.pem"
    bundle.write_bytes(Path(cert_path).read_bytes() + (tmp_path / "shadow-key.pem").read_bytes())
    return str(bundle), cert_path


def _curl(url: str, version: str, method: str, headers: dict[str, str], body: bytes) -> None:
    """One request with curl; `version` is the curl flag (`--http1.1`, `--http2`...). Host is set
    explicitly so that every client names the same authority (curl sends it as :authority in h2)."""
    argv = [CURL, "-sS", "-k", version, "-o", "/dev/null", "-w", "%{http_version} %{http_code}"]
    argv += ["-X", method, "-H", "Host: app.test", "-H", "User-Agent: mirror-test"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    if body:
        argv += ["--data-binary", "@-"]
    done = subprocess.run([*argv, url], input=body, capture_output=True, timeout=20, check=True)
    want = {"--http1.1": "1.1", "--http2": "2", "--http2-prior-knowledge": "2"}[version]
    assert done.stdout.decode() == f"{want} 200", f"curl {version} {url}: {done.stdout!r} {done.stderr!r}"


def _httpx(client: httpx.Client, base: str, http_version: str) -> None:
    for method, path, headers, body in REQUESTS:
        response = client.request(
            method,
            base + path,
            headers={"Host": "app.test", "User-Agent": "mirror-test", **headers},
            content=body,
        )
        assert (response.http_version, response.status_code) == (http_version, 200)
        assert response.headers.get("x-spoe-error", "") == ""


def _take(stack: MirrorStack, count: int, since: dict[str, float]) -> list[RecordedRequest]:
    assert stack.settle("shadow", count, since) == {"sent_2xx": count}
    recorded = stack.shadows["shadow"].wait_for(count)
    stack.shadows["shadow"].clear()
    return recorded


@pytest.mark.parametrize("path_fetch", ["url", "pathq"])
def test_http2_clients_are_mirrored_like_http1(tmp_path: Path, path_fetch: str) -> None:
    """curl over HTTP/1.1, HTTP/2 with TLS+ALPN, and HTTP/2 with prior knowledge, then httpx over
    HTTP/1.1 and HTTP/2 (TLS and cleartext): every HTTP/2 request reaches the HTTP/1.1 shadow as
    exactly the bytes its HTTP/1.1 twin did, none is refused, and the Host policy `original`
    sees the client's authority."""
    bundle, ca_file = _pem_bundle(tmp_path)
    tls_port, h2c_port = free_port(), free_port()
    message = SpoeMessage(args=MIRROR_ARGS.replace("arg_path=url", f"arg_path={path_fetch}"))
    config = lambda s: {"targets": [{"name": "shadow", "url": s["shadow"].url, "host": "original"}]}  # noqa: E731
    with mirror_stack(
        tmp_path,
        {"shadow": "ok"},
        config,
        messages=(message,),
        extra_binds=(
            f"127.0.0.1:{tls_port} ssl crt {bundle} alpn h2,http/1.1",
            f"127.0.0.1:{h2c_port} proto h2",
        ),
    ) as stack:
        h1, tls, h2c = stack.url, f"https://127.0.0.1:{tls_port}", f"http://127.0.0.1:{h2c_port}"
        recorded: dict[str, list[RecordedRequest]] = {}
        for name, base, flag in (
            ("curl-h1", h1, "--http1.1"),
            ("curl-h2-tls", tls, "--http2"),
            ("curl-h2c", h2c, "--http2-prior-knowledge"),
        ):
            before = stack.metrics()
            for method, path, headers, body in REQUESTS:
                _curl(base + path, flag, method, headers, body)
            recorded[name] = _take(stack, len(REQUESTS), before)

        verify = ssl.create_default_context(cafile=ca_file)
        for name, client, base, version in (
            ("httpx-h1", httpx.Client(), h1, "HTTP/1.1"),
            ("httpx-h2-tls", httpx.Client(http2=True, verify=verify), tls, "HTTP/2"),
            ("httpx-h2c", httpx.Client(http1=False, http2=True), h2c, "HTTP/2"),
        ):
            before = stack.metrics()
            with client:
                _httpx(client, base, version)
            recorded[name] = _take(stack, len(REQUESTS), before)
        refused = stack.metrics()
        assert not any(
            key.startswith("spoa_mirror_messages_total") and 'result="invalid"' in key and value
            for key, value in refused.items()
        )

    for reference, others in (
        ("curl-h1", ("curl-h2-tls", "curl-h2c")),
        ("httpx-h1", ("httpx-h2-tls", "httpx-h2c")),
    ):
        # Sorted: the agent replays each request as its NOTIFY arrives, over several pooled
        # connections, so the shadow may see two of them in either order.
        expected = sorted(request.raw for request in recorded[reference])
        for other in others:
            assert sorted(request.raw for request in recorded[other]) == expected, other
    [first] = [
        request for request in recorded["curl-h2-tls"] if request.method == "GET" and request.target != "/"
    ]
    assert (first.method, first.target, first.header("host")) == ("GET", "/items?id=42&x=%20y", "app.test")
    [post] = [request for request in recorded["httpx-h2c"] if request.method == "POST"]
    assert (post.method, post.target, post.body) == ("POST", "/orders", BODY)
    assert all(not name.startswith(":") for request in recorded["curl-h2c"] for name, _ in request.headers)

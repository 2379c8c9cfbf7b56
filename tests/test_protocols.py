"""A target's `protocol` and `grpc_methods`: config validation, the pool and serialiser each
protocol gets (`auto` choosing by ALPN against real TLS servers), and the gRPC method guard."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from spoa_mirror.config import NO_OUTGOING, ConfigError, parse_config
from spoa_mirror.message import to_request
from spoa_mirror.protocols import AutoPool, build_grpc_guard, build_pool, build_serialiser
from spoa_mirror.tls import client_context
from spoa_mirror.transport import Pool
from spoa_mirror.transport_h2 import H2Pool
from tests.support.shadow import ShadowServer, self_signed_tls
from tests.support.shadow_h2 import H2ShadowServer


def target(**keys: object):
    return parse_config({"targets": [{"name": "t", **keys}]}).targets[0]


@pytest.mark.parametrize(
    ("keys", "key", "complaint"),
    [
        ({"url": "http://a.test", "protocol": "h2"}, "targets[0].protocol", "h2 needs an https URL"),
        ({"url": "https://a.test", "protocol": "h2c"}, "targets[0].protocol", "h2c needs an http URL"),
        ({"url": "http://a.test", "protocol": "http2"}, "targets[0].protocol", "must be one of"),
        ({"url": "http://a.test", "grpc_methods": []}, "targets[0].grpc_methods", "at least one"),
        (
            {"url": "http://a.test", "grpc_methods": ["Svc/M"]},
            "targets[0].grpc_methods[0]",
            "/package.Service",
        ),
        (
            {"url": "http://a.test", "grpc_methods": ["/a.B/*x"]},
            "targets[0].grpc_methods[0]",
            "/package.Service",
        ),
    ],
)
def test_bad_protocol_keys_are_refused(keys: dict, key: str, complaint: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"targets": [{"name": "t", **keys}]})
    assert caught.value.key == key and complaint in caught.value.problem


def test_defaults_keep_http1() -> None:
    config = target(url="https://a.test")
    assert config.protocol == "http1" and config.grpc_methods is None
    assert isinstance(build_pool(config, client_context(config), lambda _: None, NO_OUTGOING), Pool)


@pytest.mark.parametrize(
    ("url", "protocol", "pool"), [("http://a.test", "h2c", H2Pool), ("https://a.test", "h2", H2Pool)]
)
def test_h2_protocols_get_the_h2_pool(url: str, protocol: str, pool: type) -> None:
    config = target(url=url, protocol=protocol)
    context = client_context(config) if url.startswith("https") else None
    assert isinstance(build_pool(config, context, lambda _: None, NO_OUTGOING), pool)


def test_auto_on_plain_http_is_http1() -> None:
    config = target(url="http://a.test", protocol="auto")
    assert isinstance(build_pool(config, None, lambda _: None, NO_OUTGOING), Pool)
    assert isinstance(build_serialiser(config)("GET", "/", [], b"", "a.test"), bytes)


@pytest.mark.parametrize("server", ["h2", "http1"])
def test_auto_on_https_speaks_what_the_server_chose_with_alpn(tmp_path: Path, server: str) -> None:
    """`auto` against a TLS server offering only h2, then one offering only HTTP/1.1 (no ALPN): each
    gets its requests in its protocol, after one probe connection."""
    server_context, ca_file = self_signed_tls(str(tmp_path))
    shadow = (
        H2ShadowServer(ssl_context=server_context)
        if server == "h2"
        else ShadowServer(ssl_context=server_context)
    )
    with shadow:
        config = target(url=f"https://127.0.0.1:{shadow.port}", protocol="auto", ca_file=ca_file)
        pool = build_pool(config, client_context(config), lambda _: None, NO_OUTGOING)
        serialise = build_serialiser(config)
        assert isinstance(pool, AutoPool)

        async def send_three() -> list[int]:
            try:
                return list(
                    await asyncio.gather(
                        *(pool.send(serialise("GET", f"/r{i}", [], b"", "a.test")) for i in range(3))
                    )
                )
            finally:
                await pool.close()

        assert asyncio.run(asyncio.wait_for(send_three(), 20)) == [200, 200, 200]
        assert pool.protocol == server
        assert sorted(r.path if server == "h2" else r.target for r in shadow.requests) == [
            "/r0",
            "/r1",
            "/r2",
        ]


def test_auto_probe_failure_fails_what_waited_and_probes_again() -> None:
    with ShadowServer(mode="refuse") as shadow:
        config = target(url=f"https://127.0.0.1:{shadow.port}", protocol="auto", tls_verify=False)
        pool = build_pool(config, client_context(config), lambda _: None, NO_OUTGOING)
        serialise = build_serialiser(config)

        async def twice() -> list[object]:
            results = []
            for _ in range(2):
                results += await asyncio.gather(
                    pool.send(serialise("GET", "/", [], b"", "a")), return_exceptions=True
                )
            await pool.close()
            return results

        results = asyncio.run(asyncio.wait_for(twice(), 20))
        assert [getattr(r, "reason", r) for r in results] == ["connect", "connect"]
        assert pool.protocol is None


def grpc_request(path: str, content_type: str = "application/grpc") -> object:
    return to_request(
        {"arg_method": "POST", "arg_path": path, "arg_hdrs": f"content-type: {content_type}\r\n\r\n"}
    )


def test_grpc_guard_lets_listed_methods_and_services_through() -> None:
    guard = build_grpc_guard(frozenset({"/shop.Catalog/GetItem", "/shop.Search/*"}))
    assert guard(grpc_request("/shop.Catalog/GetItem")) is None
    assert guard(grpc_request("/shop.Search/Query", "application/grpc+proto")) is None
    assert guard(grpc_request("/shop.Catalog/DeleteItem")) == "filtered"
    assert guard(grpc_request("/shop.Searcher/Query")) == "filtered"
    assert guard(grpc_request("/shop.Catalog/DeleteItem", "application/json")) is None  # not gRPC

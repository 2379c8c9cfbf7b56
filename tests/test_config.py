"""Configuration loading: defaults, one-line errors naming their key, GAL compatibility, overrides,
secrets handling, and the command-line flags that feed the overrides."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import pytest

import spoa_mirror.config as config_module
from spoa_mirror.cli_args import overrides_from_args, parse_args
from spoa_mirror.config import (
    AdminConfig,
    Config,
    ListenConfig,
    LogConfig,
    SecretsConfig,
    describe,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
)
from spoa_mirror.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "config.yaml"
KEY = "k" * 32


def one_target(**target: Any) -> dict[str, Any]:
    return {"targets": [{"url": "http://shadow:8080", **target}]}


def error_of(
    data: dict[str, Any], overrides: dict[str, Any] | None = None, env: dict[str, str] | None = None
) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, overrides, env or {})
    return str(caught.value)


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# Defaults


def test_every_global_default() -> None:
    config = parse_config(one_target(), env={})
    assert config.listen == ListenConfig(
        address="127.0.0.1",
        port=12345,
        max_frame_size=16384,
        capabilities=frozenset({"pipelining", "async", "fragmentation"}),
        workers=1,
        runtime=0.0,
        max_connections=1000,
        hello_timeout=5.0,
        idle_timeout=60.0,
        max_inflight=256,
        allow_networks=(),
        tls=None,
        frame_timeout=5.0,
        reassembly_budget=32 * 1024 * 1024,
    )
    assert config.admin == AdminConfig(enabled=True, address="127.0.0.1", port=9180)
    assert config.log == LogConfig(format="auto", level="info")
    assert config.secrets == SecretsConfig(hmac_key_file=None, hmac_key_env=None)
    assert config.hmac_key is None
    assert config.messages == ()
    assert config.redact is None
    assert config.truncated_body == "drop"
    assert config.drain_timeout == 5.0
    assert config.loop_header == "X-Spoa-Mirror"
    assert config.mirroring_enabled is True
    assert config.source is None
    assert len(config.targets) == 1


def test_every_target_default() -> None:
    target = parse_config(one_target(), env={}).targets[0]
    assert target.name == "shadow:8080"
    assert target.url == "http://shadow:8080"
    assert (target.scheme, target.host, target.port, target.base_path) == ("http", "shadow", 8080, "")
    assert target.authority == "shadow:8080"
    assert target.sample_percentage == 100.0
    assert target.sample_key is None
    assert target.timeout == 5.0
    assert target.connect_timeout == 1.0
    assert target.headers == {}
    assert target.remove_headers == frozenset()
    assert target.host_policy == "target"
    assert target.path_rewrite is None
    assert target.methods is None
    assert target.max_body_size == 10 * 1024 * 1024
    assert target.tls_verify is True
    assert target.ca_file is None
    assert target.concurrency == 64
    assert target.queue_size == 8192
    assert target.rate_limit is None
    assert target.circuit_breaker is None
    assert target.filters is None
    assert target.redact is None
    assert target.mirror_body is True
    assert target.mirror_headers is True
    assert target.config_key == "targets[0]"


def test_null_takes_the_default() -> None:
    config = parse_config({"listen": {"port": None}, "log": None, **one_target(timeout=None)}, env={})
    assert config.listen.port == 12345
    assert config.targets[0].timeout == 5.0


def test_dataclass_defaults_match_parsed_defaults() -> None:
    config = parse_config(one_target(), env={})
    assert config.listen == ListenConfig()
    assert Config(targets=config.targets) == config


# Errors: one line, naming the key


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            one_target(sample_percent=10),
            "targets[0].sample_percent: unknown key (did you mean sample_percentage?)",
        ),
        ({"listne": {}, **one_target()}, "listne: unknown key (did you mean listen?)"),
        ({"listen": {"port": "12345"}, **one_target()}, "listen.port: must be an integer, got '12345'"),
        ({"listen": {"port": 70000}, **one_target()}, "listen.port: must be between 0 and 65535, got 70000"),
        ({"listen": {"workers": True}, **one_target()}, "listen.workers: must be an integer, got true"),
        ({"listen": []}, "listen: must be a mapping, got a list"),
        (
            {"listen": {"max_frame_size": 100}, **one_target()},
            "listen.max_frame_size: must be between 256 and 16777216 bytes, got 100",
        ),
        (
            {"listen": {"capabilities": ["pipelining", "turbo"]}, **one_target()},
            "listen.capabilities[1]: must be one of async, fragmentation, pipelining, got 'turbo'",
        ),
        (
            {"listen": {"allow_networks": ["10.0.0.0/33"]}, **one_target()},
            "listen.allow_networks[0]: must be an IP network such as 10.0.0.0/8, got '10.0.0.0/33'",
        ),
        (
            {"listen": {"hello_timeout": 0}, **one_target()},
            "listen.hello_timeout: must be a positive number of seconds, got 0",
        ),
        (
            {"listen": {"address": "not an address"}, **one_target()},
            "listen.address: must be an IP address or a host name, got 'not an address'",
        ),
        (
            {"log": {"format": "xml"}, **one_target()},
            "log.format: must be one of auto, json, console, got 'xml'",
        ),
        (
            {"truncated_body": "keep", **one_target()},
            "truncated_body: must be one of drop, send_marked, got 'keep'",
        ),
        (
            {"loop_header": "X Mirror", **one_target()},
            "loop_header: must be a valid header name, got 'X Mirror'",
        ),
        ({"messages": "mirror", **one_target()}, "messages: must be a list, got 'mirror'"),
        ({"messages": ["mirror", ""], **one_target()}, "messages[1]: must be a non-empty string, got ''"),
        (
            {"targets": [{"url": "http://a"}, {"url": "http://b", "timeout": -1}]},
            "targets[1].timeout: must be a positive number of seconds, got -1",
        ),
        (
            one_target(timeout="soon"),
            "targets[0].timeout: must be a number of seconds or a duration like "
            '"500ms" or "2s", got \'soon\'',
        ),
        (
            one_target(sample_percentage=120),
            "targets[0].sample_percentage: must be between 0 and 100, got 120",
        ),
        (
            one_target(sample_percentage="10%"),
            "targets[0].sample_percentage: must be a number from 0 to 100, got '10%'",
        ),
        (
            one_target(max_body_size="1 XB"),
            "targets[0].max_body_size: must be a number of bytes or a size like "
            '"512k" or "1MiB", got \'1 XB\'',
        ),
        (
            one_target(tls_verify="yes please"),
            "targets[0].tls_verify: must be true or false, got 'yes please'",
        ),
        (one_target(concurrency=0), "targets[0].concurrency: must be between 1 and 100000, got 0"),
        (one_target(host="shadow"), "targets[0].host: must be one of target, original, suffix, got 'shadow'"),
        (one_target(filters=["x"]), "targets[0].filters: must be a mapping, got a list"),
        (
            one_target(methods=[]),
            "targets[0].methods: must list at least one method (leave it out to mirror every method)",
        ),
        (
            one_target(methods=["GET", "BAD METHOD"]),
            "targets[0].methods[1]: must be an HTTP method, got 'BAD METHOD'",
        ),
        (
            one_target(headers={"Host": "x"}),
            "targets[0].headers.Host: is set by the agent and cannot be added; use the target's host key",
        ),
        (
            one_target(headers={"X-Flag": True}),
            "targets[0].headers.X-Flag: must be a string (quote it in YAML), got true",
        ),
        (
            one_target(headers={"X-A": "a\r\nX-B: b"}),
            "targets[0].headers.X-A: must not contain CR, LF or NUL",
        ),
        (
            one_target(remove_headers=["ok", "not ok"]),
            "targets[0].remove_headers[1]: must be a valid header name, got 'not ok'",
        ),
        (
            one_target(path_rewrite={"regex": "^/(a"}),
            "targets[0].path_rewrite: needs both regex and replacement",
        ),
        (
            one_target(path_rewrite={"regex": "^/(a", "replacement": "/"}),
            "targets[0].path_rewrite.regex: invalid regular expression: missing ), unterminated subpattern "
            "at position 2",
        ),
        (
            one_target(path_rewrite={"regex": "^/(a)", "replacement": r"/\2"}),
            "targets[0].path_rewrite.replacement: invalid replacement: "
            "invalid group reference 2 at position 2",
        ),
        (
            one_target(name="has space"),
            "targets[0].name: must be 1 to 128 printable characters without spaces, got 'has space'",
        ),
        (
            one_target(ca_file="/nonexistent/ca.pem"),
            "targets[0].ca_file: file not found: /nonexistent/ca.pem",
        ),
        ({"targets": "http://a"}, "targets: must be a list of targets, got 'http://a'"),
        (
            {},
            "targets: at least one target is required "
            "(or pass --mirror-url, or set mirroring.enabled: false)",
        ),
        (
            {"targets": [{"timeout": 1}]},
            "targets[0]: needs a url (or an upstream with host and port, or a capture block)",
        ),
        (
            {"targets": [{"url": "http://a", "upstream": {"host": "b", "port": 1}}]},
            "targets[0].upstream: give url or upstream, not both",
        ),
        ({"targets": [{"upstream": {"host": "b"}}]}, "targets[0].upstream: needs both host and port"),
        (
            {"targets": [{"upstream": {"host": "b", "port": 0}}]},
            "targets[0].upstream.port: must be between 1 and 65535, got 0",
        ),
        (
            {"defaults": {"url": "http://a"}, **one_target()},
            "defaults.url: cannot have a default; set it on each target",
        ),
        (
            {"admin": {"port": 12345}, **one_target()},
            "admin.port: is listen.port 12345 too; give the admin listener its own",
        ),
        (
            {"listen": {"tls": {"cert_file": "/x.pem"}}, **one_target()},
            "listen.tls: needs both cert_file and key_file",
        ),
    ],
)
def test_errors_name_their_key(data: dict[str, Any], message: str) -> None:
    assert error_of(data) == message


def test_unknown_key_without_a_close_match_lists_the_known_ones() -> None:
    message = error_of({"admin": {"zzz": 1}, **one_target()})
    assert message == "admin.zzz: unknown key (expected one of enabled, address, port)"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://shadow/", "targets[0].url: must be an http:// or https:// URL, got 'ftp://shadow/'"),
        ("shadow:8080", "targets[0].url: must be an http:// or https:// URL, got 'shadow:8080'"),
        ("http://", "targets[0].url: must be an http:// or https:// URL, got 'http://'"),
        (
            "http://shadow/?a=1",
            "targets[0].url: must not have a query string or fragment, got 'http://shadow/?a=1'",
        ),
        (
            "http://shadow/#top",
            "targets[0].url: must not have a query string or fragment, got 'http://shadow/#top'",
        ),
        (
            "http://user:pw@shadow/",
            "targets[0].url: must not contain credentials (user:password@); "
            "add a header under headers instead",
        ),
        ("http://shadow:99999/", "targets[0].url: has an invalid port, got 'http://shadow:99999/'"),
        ("http://shadow:0/", "targets[0].url: has an invalid port, got 'http://shadow:0/'"),
        ("http://[::zz]:80/", "targets[0].url: is not a valid URL, got 'http://[::zz]:80/'"),
        (
            "http://bad_host!/",
            "targets[0].url: has an invalid host name 'bad_host!' "
            "(international names go in their xn-- form)",
        ),
        (
            "http://sha dow/",
            "targets[0].url: must not contain spaces or control characters, got 'http://sha dow/'",
        ),
        (42, "targets[0].url: must be a non-empty string, got 42"),
    ],
)
def test_bad_urls(url: object, message: str) -> None:
    assert error_of({"targets": [{"url": url}]}) == message


def test_duplicate_target_names() -> None:
    explicit = {"targets": [{"name": "a", "url": "http://x"}, {"name": "a", "url": "http://y"}]}
    assert error_of(explicit) == (
        "targets[1].name: duplicate target name 'a' (also targets[0]); give each target a distinct name"
    )
    derived = {"targets": [{"url": "http://x:81/one"}, {"url": "http://x:81/two"}]}
    assert error_of(derived) == (
        "targets[1].name: duplicate target name 'x:81' (also targets[0]); give each target a distinct name"
    )


def test_inline_secret_is_refused_without_echoing_it() -> None:
    message = error_of({"secrets": {"hmac_key": "super-secret-value"}, **one_target()})
    assert message == (
        "secrets.hmac_key: secrets are never read from the config file; put the key in a file "
        "(hmac_key_file) or an environment variable (hmac_key_env)"
    )
    assert "super-secret-value" not in message


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "listen:\n  port: 1\n bad: x\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert (
        str(caught.value)
        == f"{path}:3:2: invalid YAML: expected <block end>, but found '<block mapping start>'"
    )


def test_yaml_duplicate_keys_are_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "targets:\n  - url: http://a\n    timeout: 1\n    timeout: 2\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value) == f"{path}:4:5: invalid YAML: duplicate key 'timeout' (first on line 3)"


def test_yaml_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    text = "defaults: &common {timeout: 1}\ntargets:\n  - <<: *common\n    url: http://a\n    timeout: 2\n"
    config = load_config(write(tmp_path, text), env={})
    assert config.targets[0].timeout == 2.0


def test_unreadable_and_non_mapping_files(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError) as caught:
        load_config(missing, env={})
    assert str(caught.value) == f"{missing}: cannot read the config file: No such file or directory"
    path = write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value) == f"{path}: must contain a mapping at the top level, got a list"
    empty = write(tmp_path, "# nothing yet\n", "empty.yaml")
    with pytest.raises(ConfigError, match=r"^targets: at least one target is required"):
        load_config(empty, env={})


# Parsed values


def test_url_parts() -> None:
    targets = parse_config(
        {
            "targets": [
                {"url": "http://[::1]:8080/base/"},
                {"url": "https://Shadow.Example/api"},
                {"url": "http://10.0.0.1"},
            ]
        },
        env={},
    ).targets
    ipv6, https, plain = targets
    assert (ipv6.host, ipv6.port, ipv6.base_path, ipv6.authority, ipv6.name) == (
        "::1",
        8080,
        "/base",
        "[::1]:8080",
        "[::1]:8080",
    )
    assert (https.scheme, https.host, https.port, https.base_path, https.authority) == (
        "https",
        "shadow.example",
        443,
        "/api",
        "shadow.example",
    )
    assert (plain.port, plain.authority, plain.name) == (80, "10.0.0.1", "10.0.0.1:80")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (3, 3.0),
        (0.25, 0.25),
        ("500ms", 0.5),
        ("2s", 2.0),
        ("1.5m", 90.0),
        ("1h", 3600.0),
        ("7", 7.0),
        (" 2 s ", 2.0),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text, "x") == seconds
    assert parse_config(one_target(timeout=text), env={}).targets[0].timeout == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (100, 100),
        ("100", 100),
        ("512k", 512 * 1024),
        ("512K", 512 * 1024),
        ("1MiB", 1024 * 1024),
        ("1.5k", 1536),
        ("10MB", 10_000_000),
        ("2kB", 2000),
        ("1g", 1024**3),
        (0, 0),
    ],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text, "x") == size
    assert parse_config(one_target(max_body_size=text), env={}).targets[0].max_body_size == size


@pytest.mark.parametrize("bad", [-1, True, "1XB", "k", "-5k", 1.5])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises(ConfigError):
        parse_size(bad, "x")


@pytest.mark.parametrize("bad", [True, "-1s", "2 sec", float("nan"), float("inf"), None, [1]])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ConfigError):
        parse_duration(bad, "x")


def test_runtime_and_drain_accept_zero() -> None:
    config = parse_config({"listen": {"runtime": "0s"}, "drain_timeout": 0, **one_target()}, env={})
    assert (config.listen.runtime, config.drain_timeout) == (0.0, 0.0)


def test_target_values_are_parsed_for_the_pipeline() -> None:
    target = parse_config(
        one_target(
            methods=["get", "Post"],
            remove_headers=["X-Debug", "cookie"],
            headers={"X-Env": "shadow"},
            path_rewrite={"regex": "^/api/v1/(?P<rest>.*)", "replacement": r"/v2/\g<rest>"},
            host="suffix",
            sample_percentage=12.5,
            connect_timeout="250ms",
        ),
        env={},
    ).targets[0]
    assert target.methods == frozenset({"GET", "POST"})
    assert target.remove_headers == frozenset({"x-debug", "cookie"})
    assert target.headers == {"X-Env": "shadow"}
    assert target.host_policy == "suffix"
    assert target.sample_percentage == 12.5
    assert target.connect_timeout == 0.25
    pattern, replacement = target.path_rewrite
    assert pattern.sub(replacement, "/api/v1/items/3", count=1) == "/v2/items/3"


def test_listen_section(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    key = tmp_path / "key.pem"
    cert.write_text("c")
    key.write_text("k")
    listen = parse_config(
        {
            "listen": {
                "address": "::",
                "port": 0,
                "max_frame_size": "64k",
                "capabilities": ["async"],
                "workers": 4,
                "runtime": "10m",
                "allow_networks": ["10.1.2.3/8", "::1"],
                "tls": {"cert_file": str(cert), "key_file": str(key)},
            },
            **one_target(),
        },
        env={},
    ).listen
    assert listen.address == "::"
    assert listen.max_frame_size == 65536
    assert listen.capabilities == frozenset({"async"})
    assert (listen.workers, listen.runtime) == (4, 600.0)
    assert listen.allow_networks == ("10.0.0.0/8", "::1/128")
    assert listen.tls is not None
    assert (listen.tls.cert_file, listen.tls.key_file, listen.tls.ca_file) == (str(cert), str(key), None)


def test_admin_port_must_not_be_the_spop_port() -> None:
    """With workers, the supervisor alone serves the admin port: one port, whatever their number."""
    data = {"listen": {"port": 9180, "workers": 4}, **one_target()}
    assert error_of(data) == "admin.port: is listen.port 9180 too; give the admin listener its own"
    data["listen"]["port"] = 9181
    assert parse_config(data, env={}).admin.port == 9180
    data["listen"]["port"] = 9180
    data["admin"] = {"enabled": False}
    assert parse_config(data, env={}).admin.enabled is False


def test_log_level_is_case_insensitive() -> None:
    assert parse_config(
        {"log": {"level": "DEBUG", "format": "json"}, **one_target()}, env={}
    ).log == LogConfig(format="json", level="debug")


def test_defaults_apply_under_targets_and_targets_win() -> None:
    config = parse_config(
        {
            "defaults": {"timeout": "2s", "sample_percentage": 5, "headers": {"X-Env": "shadow"}},
            "targets": [{"url": "http://a"}, {"url": "http://b", "timeout": 9, "headers": {"X-Other": "1"}}],
        },
        env={},
    )
    first, second = config.targets
    assert (first.timeout, first.sample_percentage, first.headers) == (2.0, 5.0, {"X-Env": "shadow"})
    assert (second.timeout, second.sample_percentage, second.headers) == (9.0, 5.0, {"X-Other": "1"})


def test_bad_default_is_blamed_on_defaults() -> None:
    data = {"defaults": {"timeout": -2}, **one_target()}
    assert error_of(data) == "defaults.timeout: must be a positive number of seconds, got -2"
    assert (
        error_of({"defaults": {"timout": 1}, **one_target()})
        == "defaults.timout: unknown key (did you mean timeout?)"
    )


def test_mirror_body_and_headers_flags() -> None:
    target = parse_config(one_target(mirror_body=False, mirror_headers=False), env={}).targets[0]
    assert (target.mirror_body, target.mirror_headers) == (False, False)


def test_config_pickles_for_worker_processes() -> None:
    config = parse_config(one_target(path_rewrite={"regex": "^/a", "replacement": "/b"}), env={})
    assert pickle.loads(pickle.dumps(config)) == config


# GAL compatibility


def test_gal_mirroring_block_is_mapped() -> None:
    config = parse_config(
        {
            "mirroring": {
                "enabled": True,
                "mirror_request_body": False,
                "mirror_headers": False,
                "targets": [
                    {
                        "name": "orders-shadow",
                        "upstream": {"host": "orders.internal", "port": 8080},
                        "sample_percentage": 10,
                        "timeout": "500ms",
                        "headers": {"X-Mirror": "true"},
                    },
                    {"name": "v6", "upstream": {"host": "::1", "port": 81}, "mirror_headers": True},
                ],
            }
        },
        env={},
    )
    orders, v6 = config.targets
    assert orders.name == "orders-shadow"
    assert orders.url == "http://orders.internal:8080"
    assert (orders.scheme, orders.host, orders.port, orders.base_path) == (
        "http",
        "orders.internal",
        8080,
        "",
    )
    assert orders.sample_percentage == 10.0
    assert orders.timeout == 0.5
    assert orders.headers == {"X-Mirror": "true"}
    assert (orders.mirror_body, orders.mirror_headers) == (False, False)
    assert orders.config_key == "mirroring.targets[0]"
    assert (v6.url, v6.authority, v6.mirror_body, v6.mirror_headers) == (
        "http://[::1]:81",
        "[::1]:81",
        False,
        True,
    )


def test_gal_errors_name_the_gal_keys() -> None:
    data = {"mirroring": {"targets": [{"upstream": {"host": "a", "port": "80"}}]}}
    assert error_of(data) == "mirroring.targets[0].upstream.port: must be an integer, got '80'"
    data = {"mirroring": {"mirror_request_body": "yes"}, **one_target()}
    assert error_of(data) == "mirroring.mirror_request_body: must be true or false, got 'yes'"


def test_gal_and_top_level_targets_together_are_refused() -> None:
    data = {"mirroring": {"targets": [{"url": "http://a"}]}, **one_target()}
    assert error_of(data) == "mirroring.targets: targets are also listed at the top level; keep one list"


def test_mirroring_disabled_needs_no_targets_and_mirrors_nothing() -> None:
    assert parse_config({"mirroring": {"enabled": False}}, env={}).targets == ()
    config = parse_config({"mirroring": {"enabled": False}, **one_target()}, env={})
    assert config.mirroring_enabled is False
    assert config.targets == ()
    assert "Mirroring: DISABLED" in describe(config)
    # Still validated, so turning it back on cannot surprise.
    assert error_of({"mirroring": {"enabled": False}, **one_target(timeout=-1)}).startswith(
        "targets[0].timeout"
    )


# Overrides


def test_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "listen: {address: 127.0.0.1, port: 1000, workers: 2}\nlog: {level: info}\n"
        "targets: [{url: 'http://file-target'}]\n",
    )
    overrides = {
        "address": "0.0.0.0",
        "port": 2000,
        "mirror_urls": ["http://a:1", "https://b/x"],
        "max_frame_size": 65536,
        "capabilities": ["pipelining"],
        "workers": 3,
        "runtime": "30s",
        "log_format": "json",
        "log_level": "debug",
    }
    config = load_config(path, overrides, env={})
    assert (config.listen.address, config.listen.port, config.listen.workers) == ("0.0.0.0", 2000, 3)
    assert (config.listen.max_frame_size, config.listen.capabilities) == (65536, frozenset({"pipelining"}))
    assert config.listen.runtime == 30.0
    assert config.log == LogConfig(format="json", level="debug")
    assert [target.url for target in config.targets] == ["http://a:1", "https://b/x"]
    assert [target.name for target in config.targets] == ["a:1", "b:443"]
    assert config.source == path


def test_none_overrides_are_ignored_and_data_is_not_mutated() -> None:
    data = {"listen": {"port": 1000}, **one_target()}
    config = parse_config(data, {"port": None, "address": "::1"}, env={})
    assert (config.listen.port, config.listen.address) == (1000, "::1")
    assert data == {"listen": {"port": 1000}, **one_target()}


def test_mirror_urls_replace_gal_targets_too() -> None:
    data = {"mirroring": {"mirror_headers": False, "targets": [{"url": "http://gal"}]}}
    config = parse_config(data, {"mirror_urls": ["http://cli"]}, env={})
    assert [(t.url, t.mirror_headers) for t in config.targets] == [("http://cli", False)]


def test_override_errors_say_where_the_value_came_from() -> None:
    assert error_of(one_target(), {"port": 70000}) == (
        "listen.port: must be between 0 and 65535, got 70000 (set on the command line)"
    )
    assert error_of({}, {"mirror_urls": ["ftp://x"]}) == (
        "targets[0].url: must be an http:// or https:// URL, got 'ftp://x' (set on the command line)"
    )
    assert error_of(one_target(), {"prot": 1}) == "overrides.prot: unknown key (did you mean port?)"


def test_no_file_runs_on_overrides_alone() -> None:
    config = load_config(None, {"mirror_urls": ["http://shadow"]}, env={})
    assert [target.url for target in config.targets] == ["http://shadow"]


# Secrets


def test_hmac_key_from_file(tmp_path: Path) -> None:
    key_file = tmp_path / "hmac.key"
    key_file.write_bytes(KEY.encode() + b"\n")
    config = parse_config({"secrets": {"hmac_key_file": str(key_file)}, **one_target()}, env={})
    assert config.hmac_key == KEY.encode()
    assert config.secrets.hmac_key_file == str(key_file)


def test_hmac_key_from_env() -> None:
    config = parse_config(
        {"secrets": {"hmac_key_env": "MIRROR_KEY"}, **one_target()}, env={"MIRROR_KEY": KEY}
    )
    assert config.hmac_key == KEY.encode()
    assert config.secrets.hmac_key_env == "MIRROR_KEY"


def test_hmac_key_problems(tmp_path: Path) -> None:
    assert error_of({"secrets": {"hmac_key_env": "NOPE"}, **one_target()}) == (
        "secrets.hmac_key_env: environment variable NOPE is not set"
    )
    assert error_of({"secrets": {"hmac_key_env": "SHORT"}, **one_target()}, env={"SHORT": "abc"}) == (
        "secrets.hmac_key_env: the HMAC key must be at least 16 bytes long"
    )
    missing = str(tmp_path / "none.key")
    assert error_of({"secrets": {"hmac_key_file": missing}, **one_target()}) == (
        f"secrets.hmac_key_file: cannot read {missing}: No such file or directory"
    )
    both = {"secrets": {"hmac_key_file": missing, "hmac_key_env": "X"}, **one_target()}
    assert error_of(both) == "secrets: set hmac_key_file or hmac_key_env, not both"


def test_hmac_key_never_shown() -> None:
    config = parse_config(
        {"secrets": {"hmac_key_env": "MIRROR_KEY"}, **one_target()}, env={"MIRROR_KEY": KEY}
    )
    assert KEY not in describe(config)
    assert KEY not in repr(config)
    assert KEY not in repr(config.secrets)
    assert "environment variable MIRROR_KEY" in describe(config)


# describe()


def test_describe_states_what_the_agent_does() -> None:
    config = parse_config(
        {
            "listen": {"allow_networks": ["10.0.0.0/8"], "workers": 2},
            "messages": ["mirror"],
            "truncated_body": "send_marked",
            "targets": [
                {
                    "name": "api",
                    "url": "https://api-shadow:8443/v2",
                    "sample_percentage": 12.5,
                    "headers": {"Authorization": "Bearer shadow-token-123"},
                    "tls_verify": False,
                    "methods": ["GET"],
                }
            ],
        },
        env={},
    )
    text = describe(config)
    assert "SPOP listener: 127.0.0.1:12345, 2 worker processes" in text
    assert "accepts connections from: 10.0.0.0/8" in text
    assert "Admin (metrics, health): http://127.0.0.1:9180 (the supervisor, for all 2 workers)" in text
    assert "SPOE messages mirrored: mirror" in text
    assert "marked X-Mirror-Truncated: true" in text
    assert "  api -> https://api-shadow:8443/v2" in text
    assert "mirrors 12.5% of requests; GET; bodies up to 10 MiB" in text
    assert "certificate NOT verified" in text
    assert "adds headers: Authorization" in text
    assert "shadow-token-123" not in text


# Sub-blocks validated by their builders at load time


def key_of(data: dict[str, Any], env: dict[str, str] | None = None) -> str:
    """The key an error blames: the builders own their wording, this module owns the key path."""
    with pytest.raises(ConfigError) as caught:
        parse_config(data, env=env or {})
    return caught.value.key


def test_sample_key_validated_at_load() -> None:
    pytest.importorskip("spoa_mirror.sampling")
    bad = {"header": "X-User", "missing": "sometimes"}
    assert key_of(one_target(sample_key=bad)) == "targets[0].sample_key.missing"
    assert key_of({"defaults": {"sample_key": bad}, **one_target()}) == "defaults.sample_key.missing"
    target = parse_config(one_target(sample_key={"header": "X-User"}), env={}).targets[0]
    assert target.sample_key == {"header": "X-User"}


def test_filters_validated_at_load() -> None:
    pytest.importorskip("spoa_mirror.filters")
    assert (
        key_of(one_target(filters={"allow": {"path_prefix": ["api"]}}))
        == "targets[0].filters.allow.path_prefix"
    )
    assert key_of({"defaults": {"filters": {"deny": {}}}, **one_target()}) == "defaults.filters.deny"


def test_redaction_validated_and_merged_at_load() -> None:
    pytest.importorskip("spoa_mirror.redact")
    assert key_of({"redact": {"headers": {"X-Token": "shred"}}, **one_target()}) == "redact.headers.X-Token"
    hmac_rule = {"headers": {"X-Token": "hmac"}}
    assert key_of(one_target(redact=hmac_rule)) == "targets[0].redact.headers.X-Token"
    config = parse_config(
        {"redact": {"headers": {"X-A": "mask"}}, **one_target(redact={"query": {"token": "remove"}})}, env={}
    )
    assert config.targets[0].redact == {"headers": {"X-A": "mask"}, "query": {"token": "remove"}}
    with_key = parse_config(
        {"secrets": {"hmac_key_env": "K"}, **one_target(redact=hmac_rule)}, env={"K": KEY}
    )
    assert with_key.targets[0].redact == hmac_rule


def test_limits_validated_at_load() -> None:
    pytest.importorskip("spoa_mirror.limits")
    rate = one_target(rate_limit={"requests_per_second": -1})
    assert key_of(rate) == "targets[0].rate_limit.requests_per_second"
    breaker = one_target(circuit_breaker={"failure_threshold": "x"})
    assert key_of(breaker) == "targets[0].circuit_breaker.failure_threshold"


# The example and the reference


def test_example_config_loads_and_covers_every_key() -> None:
    for module in ("sampling", "filters", "redact", "limits"):
        pytest.importorskip(f"spoa_mirror.{module}")
    config = load_config(str(EXAMPLE), env={})
    assert [target.name for target in config.targets] == ["checkout-v2", "search-shadow.internal:443"]
    assert config.listen == ListenConfig()
    text = EXAMPLE.read_text()
    for key in (*Config.input_keys(), *ListenConfig.input_keys(), *config_module.TargetConfig.input_keys()):
        assert re.search(rf"^[ #-]*{key}:", text, re.MULTILINE), key
    for key in (
        *config_module.MirroringConfig.input_keys(),
        "hmac_key_file",
        "hmac_key_env",
        "cert_file",
        "key_file",
        "ca_file",
    ):
        assert re.search(rf"^[ #-]*{key}:", text, re.MULTILINE), key


def test_every_key_is_documented() -> None:
    """The reference is generated from the models' descriptions: a key cannot be added without one."""
    from spoa_mirror.config_doc import reference_rows

    rows = reference_rows()
    assert len(rows) > 80
    for key, default, description in rows:
        assert description, f"{key} has no description"
        assert "\n" not in default, key


# Command line


def test_parse_args_c_agent_flags() -> None:
    command, ns = parse_args(
        ["-a", "0.0.0.0", "-p", "12346", "-u", "http://a", "-u", "http://b", "-m", "32k", "-c", "async",
         "-c", "pipelining", "-n", "4", "-r", "10m", "--log-format", "json", "--log-level", "debug"]
    )  # fmt: skip
    assert command == "run"
    assert ns.config is None
    assert overrides_from_args(ns) == {
        "address": "0.0.0.0",
        "port": 12346,
        "mirror_urls": ["http://a", "http://b"],
        "max_frame_size": 32768,
        "capabilities": ["async", "pipelining"],
        "workers": 4,
        "runtime": 600.0,
        "log_format": "json",
        "log_level": "debug",
    }


def test_parse_args_long_flags_and_run_subcommand() -> None:
    command, ns = parse_args(
        ["run", "--config", "/etc/m.yaml", "--mirror-url", "http://a", "--num-workers", "2"]
    )
    assert command == "run"
    assert ns.config == "/etc/m.yaml"
    assert overrides_from_args(ns) == {"mirror_urls": ["http://a"], "workers": 2}


def test_parse_args_no_flags_override_nothing() -> None:
    command, ns = parse_args([])
    assert (command, ns.config, overrides_from_args(ns)) == ("run", None, {})


def test_parse_args_check_config() -> None:
    command, ns = parse_args(["check-config", "/etc/m.yaml", "-p", "1"])
    assert (command, ns.config, overrides_from_args(ns)) == ("check-config", "/etc/m.yaml", {"port": 1})


@pytest.mark.parametrize(
    "argv",
    [
        ["--bogus"],
        ["-p", "http"],
        ["-c", "turbo"],
        ["-r", "soon"],
        ["-m", "lots"],
        ["--log-format", "xml"],
        ["check-config"],
    ],
)
def test_bad_flags_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_args(argv)
    assert caught.value.code == 2
    assert "usage: spoa-mirror" in capsys.readouterr().err


def test_flags_feed_load_config() -> None:
    _, ns = parse_args(["-u", "http://shadow:9000", "-p", "0", "-c", "async"])
    config = load_config(ns.config, overrides_from_args(ns), env={})
    assert config.listen.port == 0
    assert config.listen.capabilities == frozenset({"async"})
    assert [target.name for target in config.targets] == ["shadow:9000"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            one_target(headers={"X-Request-ID": "{{foo}}"}),
            "targets[0].headers.X-Request-ID: unknown template {{foo}} (known: {{uuid}})",
        ),
        (
            {"defaults": {"headers": {"X-Trace": "a-{{ uid }}"}}, **one_target()},
            "defaults.headers.X-Trace: unknown template {{uid}} (known: {{uuid}})",
        ),
    ],
)
def test_header_templates_are_checked_at_load(data: dict[str, Any], message: str) -> None:
    assert error_of(data) == message


def test_header_template_values_are_kept_as_written() -> None:
    headers = {"X-Request-ID": "{{uuid}}", "X-Env": "shadow {literal}"}
    assert parse_config(one_target(headers=headers), env={}).targets[0].headers == headers

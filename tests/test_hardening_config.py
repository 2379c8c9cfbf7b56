"""Config and request-building edges of the hardening round: IPv6 literals under `host: suffix`,
secret files others can read, CA files that are not PEM, memory budget bounds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spoa_mirror.config import parse_config
from spoa_mirror.errors import ConfigError
from spoa_mirror.mirror import shadow_host

TARGET = {"url": "http://127.0.0.1:8080"}


@pytest.mark.parametrize(
    ("client_host", "sent"),
    [
        ("shop.example", "shop.example-shadow"),
        ("shop.example:8443", "shop.example-shadow:8443"),
        ("[2001:db8::1]:8443", "[2001:db8::1]:8443"),
        ("[2001:db8::1]", "[2001:db8::1]"),
        ("192.0.2.1:8080", "192.0.2.1:8080"),
        ("192.0.2.1", "192.0.2.1"),
    ],
)
def test_host_suffix_leaves_ip_literals_alone(client_host: str, sent: str) -> None:
    """`-shadow` goes after the name, before the port; an IP literal has no name and is sent as it is
    (it used to become `[2001-shadow:db8::1]:8443`, which no server answers to)."""
    assert shadow_host(client_host) == sent


def key_file(tmp_path: Path, mode: int) -> Path:
    path = tmp_path / "hmac.key"
    path.write_bytes(b"k" * 32 + b"\n")
    os.chmod(path, mode)
    return path


def test_a_private_key_file_is_accepted_quietly(tmp_path: Path) -> None:
    config = parse_config({"secrets": {"hmac_key_file": str(key_file(tmp_path, 0o600))}, "targets": [TARGET]})
    assert config.hmac_key == b"k" * 32
    assert config.secrets.readable_files == ()


def test_a_world_readable_key_file_is_flagged_by_default(tmp_path: Path) -> None:
    """The default (`file_permissions: warn`) loads the key and hands the agent what to warn about
    (it logs `config.secret_file_readable` once logging is set up)."""
    path = key_file(tmp_path, 0o644)
    config = parse_config({"secrets": {"hmac_key_file": str(path)}, "targets": [TARGET]})
    assert config.secrets.readable_files == (("secrets.hmac_key_file", str(path), "0644"),)


@pytest.mark.parametrize("mode", [0o640, 0o604])
def test_a_readable_key_file_is_refused_when_asked(tmp_path: Path, mode: int) -> None:
    path = key_file(tmp_path, mode)
    with pytest.raises(ConfigError) as raised:
        parse_config(
            {"secrets": {"hmac_key_file": str(path), "file_permissions": "refuse"}, "targets": [TARGET]}
        )
    assert raised.value.key == "secrets.hmac_key_file"
    assert "chmod 600" in str(raised.value)
    assert f"mode {mode:04o}" in str(raised.value)


def test_the_listener_key_file_is_a_secret_file_too(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("c")
    key = key_file(tmp_path, 0o640)
    tls = {"cert_file": str(cert), "key_file": str(key)}
    config = parse_config({"listen": {"tls": tls}, "targets": [TARGET]})
    assert config.secrets.readable_files == (("listen.tls.key_file", str(key), "0640"),)
    refuse = {"file_permissions": "refuse"}
    with pytest.raises(ConfigError) as raised:
        parse_config({"listen": {"tls": tls}, "secrets": refuse, "targets": [TARGET]})
    assert raised.value.key == "listen.tls.key_file"


def test_a_ca_file_that_is_not_pem_is_a_config_error(tmp_path: Path) -> None:
    """Found at load (check-config, and a SIGHUP keeps the old config), not when the target is built."""
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate\n")
    with pytest.raises(ConfigError) as raised:
        parse_config({"targets": [{"url": "https://shadow.test", "ca_file": str(ca)}]})
    assert raised.value.key == "targets[0].ca_file"


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"memory_budget": "1k", "targets": [TARGET]}, "memory_budget"),
        ({"targets": [{**TARGET, "memory_budget": 100}]}, "targets[0].memory_budget"),
        ({"targets": [{**TARGET, "max_queue_age": 0}]}, "targets[0].max_queue_age"),
    ],
)
def test_budget_and_age_bounds(data: dict, key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(data)
    assert raised.value.key == key


def test_budget_defaults_fit_the_container() -> None:
    """64 MiB for the agent, 32 MiB per target, 5 s in a queue: with 1 MiB bodies to four slow or
    hung targets the agent peaked at 118 MB (tests/test_memory_budget.py), under the 256 MiB limit
    of deploy/k8s with room for HAProxy's frames in flight."""
    config = parse_config({"targets": [TARGET]})
    assert config.memory_budget == 64 << 20
    [target] = config.targets
    assert (target.memory_budget, target.max_queue_age) == (32 << 20, 5.0)

"""A target's `capture:` block: one-line errors naming the dotted key, and what the loader makes of it."""

from __future__ import annotations

import pytest

from spoa_mirror.config import describe, parse_config
from spoa_mirror.errors import ConfigError


def capture_target(**capture: object) -> dict:
    return {"targets": [{"name": "rec", "capture": {"directory": "/var/lib/x", **capture}}]}


def test_defaults_and_units() -> None:
    config = parse_config(
        capture_target(max_file_size="8MiB", max_file_age="90s", max_total_size="1GiB"), env={}
    )
    target = config.targets[0]
    assert target.capture.directory == "/var/lib/x" and target.capture.prefix == "capture"
    assert (target.capture.max_file_size, target.capture.max_file_age) == (8 * 1024 * 1024, 90.0)
    assert target.capture.compress is True and target.capture.responses is False
    assert target.host_policy == "original"  # the client's Host is recorded, not a shadow's
    assert target.scheme == "capture"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (capture_target(directory=""), "targets[0].capture.directory: must be a non-empty string, got ''"),
        (
            capture_target(max_file_siz=1),
            "targets[0].capture.max_file_siz: unknown key (did you mean max_file_size?)",
        ),
        (
            capture_target(max_file_size="1k"),
            "targets[0].capture.max_file_size: must be at least 4KiB, got '1k'",
        ),
        (
            capture_target(max_file_age="0.5s"),
            "targets[0].capture.max_file_age: must be between 1 and 604800 seconds, got '0.5s'",
        ),
        (capture_target(compress="yes"), "targets[0].capture.compress: must be true or false, got 'yes'"),
        (capture_target(prefix="a/b"), "targets[0].capture.prefix: "),
        (
            capture_target(max_file_size="64MiB", max_total_size="32MiB"),
            "targets[0].capture: max_total_size (33554432) must be at least max_file_size (67108864)",
        ),
        (
            {"targets": [{"name": "rec", "url": "http://a", "capture": {"directory": "/x"}}]},
            "targets[0].capture: a target either sends (url) or captures, not both",
        ),
        ({"targets": [{"name": "rec", "capture": "/x"}]}, "targets[0].capture: must be a mapping, got '/x'"),
        (
            {"targets": [{"name": "rec", "host": "target", "capture": {"directory": "/x"}}]},
            "targets[0].host: a capture target has no Host of its own: original or suffix",
        ),
        (
            {"defaults": {"capture": {"directory": "/x"}}, "targets": [{"url": "http://a"}]},
            "defaults.capture: cannot have a default; set it on each target",
        ),
    ],
)
def test_errors_name_their_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, env={})
    assert str(caught.value).startswith(message), str(caught.value)
    assert "\n" not in str(caught.value)


def test_check_config_describes_a_capture_target() -> None:
    text = describe(parse_config(capture_target(responses=True, max_file_age="10m"), env={}))
    assert "rec -> captured to files (GoReplay format), not sent" in text
    assert "rotated at 64 MiB or 600s; oldest removed past 1 GiB" in text
    assert "records the primary's responses too (mirror-response message)" in text

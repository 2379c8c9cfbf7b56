"""The config's JSON Schema and reference, generated from the models: shipped equal to what the
agent prints, accepted by the shipped configs, and refusing bad ones at the key the agent names."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from spoa_mirror.cli import main
from spoa_mirror.config import config_schema, load_config, parse_config
from spoa_mirror.config_doc import markdown_table
from spoa_mirror.errors import ConfigError
from tests.support.config_schema import ROOT, SCHEMA_FILE, SHIPPED_AGENT_CONFIGS, schema_error_keys, validator

README = ROOT / "README.md"
EXAMPLE = ROOT / "examples" / "config.yaml"


def test_shipped_schema_is_what_config_schema_prints(capsys: pytest.CaptureFixture[str]) -> None:
    """Regenerate with: .venv/bin/spoa-mirror config-schema > docs/config.schema.json"""
    assert main(["config-schema"]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed) == config_schema()
    assert SCHEMA_FILE.read_text() == printed


def test_schema_is_valid_draft_2020_12() -> None:
    jsonschema.Draft202012Validator.check_schema(json.loads(SCHEMA_FILE.read_text()))


def test_example_points_editors_at_the_schema() -> None:
    first = EXAMPLE.read_text().splitlines()[0]
    match = re.fullmatch(r"# yaml-language-server: \$schema=(\S+)", first)
    assert match, first
    assert (EXAMPLE.parent / match[1]).resolve() == SCHEMA_FILE


@pytest.mark.parametrize("path", SHIPPED_AGENT_CONFIGS, ids=lambda path: str(path.relative_to(ROOT)))
def test_shipped_configs_pass_the_schema_and_the_agent(path: Path) -> None:
    document = yaml.safe_load(path.read_text())
    assert list(validator().iter_errors(document)) == []
    # Some are run with -u URL for their targets.
    overrides = {} if "targets" in document else {"mirror_urls": ["http://shadow:8080"]}
    load_config(str(path), overrides, env={"SPOA_MIRROR_HMAC_KEY": "k" * 32})


def one_target(**target: Any) -> dict[str, Any]:
    return {"targets": [{"url": "http://shadow:8080", **target}]}


@pytest.mark.parametrize(
    "document",
    [
        {"listne": {}, **one_target()},
        {"listen": {"port": 70000}, **one_target()},
        {"listen": {"port": "12345"}, **one_target()},
        {"listen": {"capabilities": ["pipelining", "turbo"]}, **one_target()},
        {"listen": {"hello_timeout": 0}, **one_target()},
        {"listen": {"max_frame_size": 100}, **one_target()},
        {"listen": {"tls": {"cert_file": "/x.pem"}}, **one_target()},
        {"log": {"format": "xml"}, **one_target()},
        {"truncated_body": "keep", **one_target()},
        {"messages": ["mirror", ""], **one_target()},
        {"memory_budget": 1000, **one_target()},
        one_target(sample_percent=10),
        one_target(timeout="soon"),
        one_target(sample_percentage=120),
        one_target(max_body_size="1 XB"),
        one_target(tls_verify="yes please"),
        one_target(concurrency=0),
        one_target(host="shadow"),
        one_target(headers={"X-Flag": True}),
        one_target(filters={"alow": {"path_prefix": ["/a"]}}),
        one_target(methods=["GET", "BAD METHOD"]),
        one_target(grpc_methods=["/pkg.Svc/Get", "pkg.Svc/Put"]),
        one_target(remove_headers=["ok", "not ok"]),
        {"loop_header": "X Mirror", **one_target()},
        one_target(rate_limit={"requests_per_second": -1}),
        one_target(sample_key={"header": "X-User", "missing": "sometimes"}),
        one_target(redact={"headers": {"Authorization": "scramble"}}),
        {"defaults": {"timeout": -1}, **one_target()},
        {"mirroring": {"enabled": "no"}, **one_target()},
        {"mirroring": {"targets": [{"upstream": {"host": "b", "port": 0}}]}},
    ],
)
def test_bad_configs_fail_the_schema_at_the_key_the_agent_names(document: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(document, env={})
    assert caught.value.key in schema_error_keys(document)


def test_readme_reference_table_is_generated_from_the_models() -> None:
    """Regenerate with: .venv/bin/python -m spoa_mirror.config_doc (between the config-keys markers)."""
    match = re.search(r"<!-- config-keys -->\n(.*?)<!-- /config-keys -->", README.read_text(), re.S)
    assert match, "README.md lost its generated key table"
    assert match[1] == markdown_table()


def test_check_config_help_documents_every_key(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["check-config", "--help"])
    text = capsys.readouterr().out
    for key in ("listen.reassembly_budget (32MiB)", "targets[].headers ({})", "mirroring.enabled (true)",
                "targets[].filters.allow.path_prefix (unset)"):  # fmt: skip
        assert key in text

"""The shipped JSON Schema (docs/config.schema.json) as the tests use it: a validator, the agent's
dotted key for each schema error, and a recorder of every config document the agent accepts in a
test run, so each one can be checked against the schema (see conftest's
`accepted_configs_match_the_schema`)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jsonschema

import spoa_mirror.config as config_module

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_FILE = ROOT / "docs" / "config.schema.json"
# The agent configs the repository ships, as files.
SHIPPED_AGENT_CONFIGS = (
    ROOT / "examples" / "config.yaml",
    ROOT / "deploy" / "compose" / "spoa-mirror.yaml",
    ROOT / "deploy" / "docker" / "config.yaml",
    ROOT / "deploy" / "k8s" / "base" / "config.yaml",
    ROOT / "deploy" / "k8s" / "overlays" / "production" / "config.yaml",
    ROOT / "deploy" / "systemd" / "config.yaml",
)


def validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads(SCHEMA_FILE.read_text()))


def as_json(document: Any) -> Any:
    """The document as YAML would have given it: lists for tuples and sets, as the file would say."""
    return json.loads(json.dumps(document, default=lambda value: sorted(value)))


def schema_error_keys(document: Any) -> set[str]:
    """The agent-style dotted key (`targets[0].timeout`, `listen.zzz` for an unknown key) of every
    error the schema finds in `document`."""
    keys = set()
    for error in _leaves(validator().iter_errors(as_json(document))):
        key = ""
        for part in error.absolute_path:
            key = f"{key}[{part}]" if isinstance(part, int) else f"{key}.{part}" if key else str(part)
        if error.validator == "additionalProperties":
            known = error.schema.get("properties", {})
            for name in error.instance:
                if name not in known:
                    keys.add(f"{key}.{name}" if key else name)
        else:
            keys.add(key)
    return keys


def _leaves(errors: Iterator[jsonschema.ValidationError]) -> Iterator[jsonschema.ValidationError]:
    """The errors inside anyOf (every key also accepts null, and durations and sizes are a number or
    a string), without the branch that wanted null."""
    for error in errors:
        if error.context:
            yield from _leaves(
                sub
                for sub in error.context
                if not (sub.validator == "type" and sub.validator_value == "null")
            )
        else:
            yield error


@contextmanager
def recording_accepted_configs() -> Iterator[list[Any]]:
    """Every document `parse_config` (and so `load_config`, `App`) accepts while this is open, with
    command-line overrides written in, as the schema would see the equivalent file."""
    accepted: list[Any] = []
    validate = config_module._validate_document

    def recording(document: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        snapshot = copy.deepcopy(document)
        config = validate(document, *args, **kwargs)
        accepted.append(snapshot)
        return config

    config_module._validate_document = recording
    try:
        yield accepted
    finally:
        config_module._validate_document = validate

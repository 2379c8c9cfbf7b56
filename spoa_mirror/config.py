"""Configuration: a YAML file plus command-line overrides, validated once into frozen models.

Each section is declared once, as a model next to the code it configures (`ListenConfig` in
listeners.py, `AdminConfig` in admin.py, `LogConfig` in logs.py, `OutgoingConfig` in protocols.py,
`TargetConfig` in targets.py, the stages' sub-specs in filters.py, sampling.py, limits.py and
redact.py), with its keys, types, defaults and documentation; this module composes them into the
top-level `Config` and loads it. The JSON Schema (`spoa-mirror config-schema`, docs/config.schema.json),
the README's reference table and `check-config --help` are generated from those models.

Everything that can be wrong with a config is found at load time (by `spoa-mirror check-config` and
before a SIGHUP reload replaces anything), and reported as one `ConfigError` line naming the full key:
`targets[1].timeout: must be a positive number of seconds, got -1`. Unknown keys are errors with a
suggestion, because a misspelt key silently taking its default is how a shadow ends up receiving
100% of production traffic instead of 1%. The models then hold parsed values (ports, floats,
compiled regexes) so the request path never parses or checks configuration again.

Adding a section: declare it as a `config_types.Section` in its own module, with a
`Field(default, description=...)` per key, and add one field here to `Config`
(`compare: CompareConfig = Field(default_factory=CompareConfig, description=CompareConfig.__doc__)`),
or to `TargetConfig` for a per-target key (`defaults` then takes it too). Regenerate the shipped schema
(`spoa-mirror config-schema > docs/config.schema.json`) and the README's table (`python -m
spoa_mirror.config_doc`); tests/test_config_schema.py fails while either is stale.

Precedence, lowest first: built-in default, `defaults`, `mirroring.mirror_request_body` /
`mirroring.mirror_headers`, the target's own key; command-line overrides win over the file.
"""

from __future__ import annotations

import copy
import os
import ssl
from collections.abc import Mapping
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, ValidationInfo, create_model, model_validator

from .admin import AdminConfig
from .compare.config import CompareConfig, check_compared_targets
from .config_types import (
    Bool,
    Derived,
    DurationOrZero,
    HeaderName,
    KiB,
    MiB,
    NonEmptyStr,
    Section,
    bounded_size,
    config_error,
    parse_duration,
    parse_size,
    problem,
    show,
    spec_of,
    unknown_key,
)
from .describe import TRUNCATED_MARKER_HEADER, describe
from .errors import ConfigError
from .listeners import ListenConfig, TlsConfig
from .logs import LOG_FORMATS, LOG_LEVELS, LogConfig
from .protocols import NO_OUTGOING, OutgoingConfig
from .redact import redact_spec_model
from .targets import PathRewrite, TargetConfig

__all__ = [
    "LOG_FORMATS", "LOG_LEVELS", "NO_OUTGOING", "OVERRIDE_KEYS", "TRUNCATED_MARKER_HEADER", "AdminConfig",
    "Config", "ConfigError", "ListenConfig", "LogConfig", "OutgoingConfig", "PathRewrite", "SecretsConfig",
    "TargetConfig", "TlsConfig", "describe", "load_config", "parse_config", "parse_duration", "parse_size",
]  # fmt: skip

MIN_HMAC_KEY_BYTES = 16
HMAC_CREDENTIAL = "hmac.key"  # the credential name: LoadCredential=hmac.key:/etc/spoa-mirror/hmac.key
OVERRIDE_KEYS = (
    "address", "port", "mirror_urls", "max_frame_size", "capabilities", "workers", "runtime",
    "backlog", "processing_delay", "monitor_interval", "outgoing_address", "outgoing_ports",
    "log_format", "log_level",
)  # fmt: skip


class SecretsConfig(Section):
    """The key for `hmac` redaction, never written in the config file; the key itself is kept out of
    every repr and summary."""

    hmac_key_file: NonEmptyStr | None = Field(
        None,
        description="file holding the key for hmac redaction (trailing newline ignored, at least 16 bytes)",
    )
    hmac_key_env: NonEmptyStr | None = Field(
        None,
        description="name of an environment variable holding that key instead; with neither set, "
        "$CREDENTIALS_DIRECTORY/hmac.key is read when it exists (systemd's LoadCredential=)",
    )
    file_permissions: Literal["warn", "refuse"] = Field(
        "warn",
        description="a secret file (hmac_key_file, listen.tls.key_file) its group or others may read is "
        "logged as a warning (warn) or refused as a config error (refuse)",
    )
    hmac_key: Derived[bytes | None] = Field(None, repr=False)
    # Secret files readable by group or others, for the agent to log (it configures logging after
    # loading the config): (key, path, mode).
    readable_files: Derived[tuple[tuple[str, str, str], ...]] = ()

    @classmethod
    def prepare(cls, data: dict[str, Any]) -> dict[str, Any]:
        if "hmac_key" in data:
            raise problem(
                "secrets are never read from the config file; put the key in a file (hmac_key_file) "
                "or an environment variable (hmac_key_env)",
                "hmac_key",
            )
        return data

    @model_validator(mode="after")
    def _read_key(self, info: ValidationInfo) -> SecretsConfig:
        env: Mapping[str, str] = (info.context or {}).get("env", os.environ)
        key_file, key_env = self.hmac_key_file, self.hmac_key_env
        if key_file is not None and key_env is not None:
            raise problem("set hmac_key_file or hmac_key_env, not both")
        if key_file is None and key_env is None and env.get("CREDENTIALS_DIRECTORY"):
            credential = os.path.join(env["CREDENTIALS_DIRECTORY"], HMAC_CREDENTIAL)
            key_file = credential if os.path.exists(credential) else None
        if key_file is not None:
            try:
                with open(key_file, "rb") as file:
                    mode = os.fstat(file.fileno()).st_mode
                    key = file.read().rstrip(b"\r\n")
            except OSError as error:
                raise problem(f"cannot read {key_file}: {error.strerror or error}", "hmac_key_file") from None
            source = "hmac_key_file"
            try:
                readable = open_to_others(f"secrets.{source}", key_file, mode, self.file_permissions)
            except ConfigError as error:
                raise problem(error.problem, source) from None
            self.derive(hmac_key_file=key_file, readable_files=readable)
        elif key_env is not None:
            if key_env not in env:
                raise problem(f"environment variable {key_env} is not set", "hmac_key_env")
            key = env[key_env].encode()
            source = "hmac_key_env"
        else:
            return self
        if len(key) < MIN_HMAC_KEY_BYTES:
            raise problem(f"the HMAC key must be at least {MIN_HMAC_KEY_BYTES} bytes long", source)
        self.derive(hmac_key=key)
        return self


def open_to_others(key: str, path: str, mode: int, permissions: str) -> tuple[tuple[str, str, str], ...]:
    """A secret file its group or others may read or write: a config error with
    `secrets.file_permissions: refuse`, else the (key, path, mode) the agent warns about."""
    if not mode & 0o077:
        return ()
    shown = oct(mode & 0o777)[2:].zfill(4)
    if permissions == "refuse":
        raise ConfigError(
            key,
            f"{path} is open to its group or others (mode {shown}); chmod 600 it, "
            "or set secrets.file_permissions: warn",
        )
    return ((key, path, shown),)


_NOT_DEFAULTABLE = ("name", "url", "upstream", "capture")


def _target_defaults_model() -> type[Section]:
    """`defaults`: every target key but name, url, upstream and capture, each optional, checked as a
    target's."""
    fields: dict[str, Any] = {}
    for key, name, info in TargetConfig.input_fields():
        if key in _NOT_DEFAULTABLE:
            continue
        annotation = info.rebuild_annotation()
        fields[name] = (
            annotation,
            Field(default_factory=lambda: None, alias=info.alias, description=info.description),
        )

    class Base(Section):
        @classmethod
        def prepare(cls, data: dict[str, Any]) -> dict[str, Any]:
            for name in _NOT_DEFAULTABLE:
                if name in data:
                    raise problem("cannot have a default; set it on each target", name)
            return data

    return create_model(
        "TargetDefaults",
        __base__=Base,
        __doc__="Target keys for every target that does not set them (any but name, url, upstream); a "
        "target's value replaces the default whole (nested mappings are not merged).",
        **fields,
    )


TargetDefaults = _target_defaults_model()


class MirroringConfig(Section):
    """The GAL `mirroring` block."""

    enabled: Bool = Field(True, description="false validates everything but mirrors nothing")
    mirror_request_body: Bool | None = Field(
        None, description="GAL spelling of mirror_body, for every target"
    )
    mirror_headers: Bool | None = Field(None, description="GAL spelling of mirror_headers, for every target")
    targets: tuple[TargetConfig, ...] | None = Field(
        None, description="the GAL place for the target list (there or at the top level, not both)"
    )


class Config(Section):
    """spoa-mirror's configuration file."""

    listen: ListenConfig = Field(default_factory=ListenConfig, description=ListenConfig.__doc__)
    admin: AdminConfig = Field(default_factory=AdminConfig, description=AdminConfig.__doc__)
    log: LogConfig = Field(default_factory=LogConfig, description=LogConfig.__doc__)
    outgoing: OutgoingConfig = Field(default_factory=lambda: NO_OUTGOING, description=OutgoingConfig.__doc__)
    secrets: SecretsConfig = Field(default_factory=SecretsConfig, description=SecretsConfig.__doc__)
    messages: tuple[NonEmptyStr, ...] = Field(
        (),
        description="SPOE message names treated as mirror requests; empty accepts any message carrying "
        "a method and a path",
    )
    redact: spec_of(redact_spec_model()) | None = Field(
        None, description="redaction for every target (see redact.py); a target's redact is merged over it"
    )
    truncated_body: Literal["drop", "send_marked"] = Field(
        "drop",
        description="a body HAProxy cut short (larger than its buffer) is either dropped with its mirror "
        "(drop) or sent marked X-Mirror-Truncated: true (send_marked)",
    )
    drain_timeout: DurationOrZero = Field(
        5.0, description="on SIGTERM, how long queued mirrors may still be sent"
    )
    loop_header: HeaderName = Field(
        "X-Spoa-Mirror",
        description="header added to every mirrored request, its value a MAC only this agent (or a replica "
        "with the same secrets key) can make; a request carrying that value is never mirrored again",
    )
    memory_budget: bounded_size(minimum=64 * KiB) = Field(
        64 * MiB,
        description="bytes of mirror requests the whole agent may hold, queued or being sent, over every "
        "target; a request that would go over is dropped, counted as budget_exceeded",
    )
    defaults: TargetDefaults | None = Field(None, description=TargetDefaults.__doc__)  # type: ignore[valid-type]
    mirroring: MirroringConfig = Field(default_factory=MirroringConfig, description=MirroringConfig.__doc__)
    targets: tuple[TargetConfig, ...] = Field(
        (), description="the shadow backends, at least one unless mirroring.enabled is false"
    )
    compare: CompareConfig | None = Field(None, description=CompareConfig.__doc__)

    mirroring_enabled: Derived[bool] = True
    source: Derived[str | None] = None  # the file loaded, if any

    @property
    def hmac_key(self) -> bytes | None:
        return self.secrets.hmac_key

    @model_validator(mode="after")
    def _check_whole(self) -> Config:
        listen, admin = self.listen, self.admin
        # The admin and SPOP listeners wanting the same port: caught now rather than as an EADDRINUSE.
        wildcard = ("0.0.0.0", "::")
        same_host = listen.address == admin.address or listen.address in wildcard or admin.address in wildcard
        if admin.enabled and admin.port != 0 and same_host and admin.port == listen.port:
            raise problem(f"is listen.port {listen.port} too; give the admin listener its own", "admin.port")
        if listen.tls is not None:  # the listener's private key is a secret file too
            key_file = listen.tls.key_file
            try:
                mode = os.stat(key_file).st_mode
            except OSError as error:
                raise problem(f"cannot read {key_file}: {error.strerror}", "listen.tls.key_file") from None
            try:
                opened = open_to_others("listen.tls.key_file", key_file, mode, self.secrets.file_permissions)
            except ConfigError as error:
                raise problem(error.problem, error.key) from None
            self.secrets.derive(readable_files=self.secrets.readable_files + opened)
        enabled = self.mirroring.enabled
        self.derive(mirroring_enabled=enabled, targets=self.targets if enabled else ())
        return self


def config_schema() -> dict[str, Any]:
    """The JSON Schema of the config file, for editors (yaml-language-server) and docs/config.schema.json."""
    schema = Config.model_json_schema(by_alias=True)
    for definition in [schema, *schema.get("$defs", {}).values()]:
        definition.pop("title", None)
        for name, prop in definition.get("properties", {}).items():
            prop.pop("title", None)
            definition["properties"][name] = _nullable(prop)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def _nullable(prop: dict[str, Any]) -> dict[str, Any]:
    """A key set to null takes its default, so the schema accepts null for every key."""
    if "anyOf" in prop:
        if {"type": "null"} not in prop["anyOf"]:
            prop["anyOf"].append({"type": "null"})
        return prop
    if isinstance(prop.get("type"), str):
        prop["type"] = [prop["type"], "null"]
        if "enum" in prop:
            prop["enum"] = [*prop["enum"], None]
        return prop
    keep = {key: prop.pop(key) for key in ("description", "default") if key in prop}
    return {"anyOf": [prop, {"type": "null"}], **keep}


def load_config(
    path: str | None, overrides: Mapping[str, Any] | None = None, env: Mapping[str, str] = os.environ
) -> Config:
    """Read, validate and freeze the configuration; `path=None` runs on defaults and overrides alone,
    as the C agent does with its flags."""
    data = {} if path is None else _read_yaml(path)
    return parse_config(data, overrides, env, source=path)


def parse_config(
    data: Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] = os.environ,
    *,
    source: str | None = None,
) -> Config:
    """Validate an already-loaded YAML document; a bad value raises ConfigError naming its key."""
    if not isinstance(data, Mapping):
        raise ConfigError(source or "config", f"must be a mapping at the top level, got {show(data)}")
    data, overridden = _apply_overrides(data, overrides or {})
    try:
        config = _validate_document(data, env, source)
    except ConfigError as error:
        for key in overridden:
            if error.key == key or error.key.startswith((f"{key}.", f"{key}[")):
                raise ConfigError(error.key, f"{error.problem} (set on the command line)") from None
        raise
    return config


def _validate_document(data: dict[str, Any], env: Mapping[str, str], source: str | None) -> Config:
    """The model validation, with the composition it cannot do alone: targets listed under mirroring,
    `defaults` and the GAL switches inherited by every target (an error in an inherited value is
    blamed on the key that set it), the global redaction merged into each target's, and every stage
    built once so a bad sub-spec fails now."""
    document, targets_key, inherited_from = _compose_targets(data)
    try:
        try:
            config = Config.model_validate(document, context={"env": env})
        except ValidationError as error:
            raise config_error(error) from None
        config = _finish(config, targets_key, source)
        _validate_stages(config)
    except ConfigError as error:
        raise ConfigError(_blame(error.key, targets_key, inherited_from), error.problem) from None
    return config


def _compose_targets(data: dict[str, Any]) -> tuple[dict[str, Any], str, dict[str, str]]:
    """The document with its targets at the top level, each with what it inherits written in; the
    key the list was written under; and, per inherited key, the key that set it."""
    document = dict(data)
    mirroring = document.get("mirroring")
    from_mirroring = isinstance(mirroring, dict) and mirroring.get("targets") is not None
    if from_mirroring:
        if document.get("targets") is not None:
            raise ConfigError("mirroring.targets", "targets are also listed at the top level; keep one list")
        mirroring = dict(mirroring)
        document["targets"] = mirroring.pop("targets")
        document["mirroring"] = mirroring
    targets_key = "mirroring.targets" if from_mirroring else "targets"
    raw_targets = document.get("targets")
    if raw_targets is not None and not isinstance(raw_targets, list):
        raise ConfigError(targets_key, f"must be a list of targets, got {show(raw_targets)}")
    if document.get("secrets") is None:
        document["secrets"] = {}  # validated even when absent: the key may come from $CREDENTIALS_DIRECTORY

    inherited: dict[str, tuple[Any, str]] = {}
    defaults = document.get("defaults")
    if isinstance(defaults, dict):
        inherited.update(
            (name, (value, f"defaults.{name}")) for name, value in defaults.items() if value is not None
        )
    if isinstance(mirroring, dict):
        for gal_key, key in (("mirror_request_body", "mirror_body"), ("mirror_headers", "mirror_headers")):
            if mirroring.get(gal_key) is not None:
                inherited[key] = (mirroring[gal_key], f"mirroring.{gal_key}")
    inherited_from: dict[str, str] = {}
    if inherited and raw_targets:
        composed = []
        for index, target in enumerate(raw_targets):
            if isinstance(target, dict):
                written = {name for name, value in target.items() if value is not None}
                for name, (_, where) in inherited.items():
                    if name not in written:
                        inherited_from[f"targets[{index}].{name}"] = where
                target = {
                    **{name: value for name, (value, _) in inherited.items()},
                    **{name: value for name, value in target.items() if value is not None},
                }
            composed.append(target)
        document["targets"] = composed
    return document, targets_key, inherited_from


def _blame(key: str, targets_key: str, inherited_from: Mapping[str, str]) -> str:
    for prefix, where in inherited_from.items():
        if key == prefix or key.startswith((f"{prefix}.", f"{prefix}[")):
            return where + key[len(prefix) :]
    if targets_key != "targets" and (key == "targets" or key.startswith("targets[")):
        return targets_key + key[len("targets") :]
    return key


def _finish(config: Config, targets_key: str, source: str | None) -> Config:
    """What only a loaded file must have: at least one target unless mirroring is off (a bare
    `Config()` is the defaults), unique names; and where each target was written, the global
    redaction merged into each target's."""
    if config.mirroring_enabled and not config.targets:
        raise ConfigError(
            "targets",
            "at least one target is required (or pass --mirror-url, or set mirroring.enabled: false)",
        )
    named: dict[str, str] = {}
    for index, target in enumerate(config.targets):
        key = f"{targets_key}[{index}]"
        if target.name in named:
            raise ConfigError(
                f"targets[{index}].name",
                f"duplicate target name {target.name!r} (also {named[target.name]}); "
                "give each target a distinct name",
            )
        named[target.name] = key
        redact = config.redact
        if target.redact is not None:
            from .redact import merge_redaction

            redact = merge_redaction(config.redact, target.redact)
        target.derive(config_key=key, redact=redact)
    if config.compare is not None:
        check_compared_targets(config.compare, config.targets, config.listen.workers)
    config.derive(source=source)
    return config


def _validate_stages(config: Config) -> None:
    """Build every sampler, filter, redactor, rate limiter and circuit breaker the config asks for,
    and throw them away: their modules own the checks their models cannot express (a regex that does
    not compile, an hmac action without a key), and building them here makes a bad sub-block fail
    at load (and a bad reload keep the old config) instead of at first use."""
    from .filters import build_filter
    from .limits import build_circuit_breaker, build_rate_limiter
    from .redact import build_redactor
    from .sampling import build_sampler

    if config.redact is not None:
        build_redactor(config.redact, "redact", config.hmac_key, _ignore_redaction)
    for index, target in enumerate(config.targets):
        key = f"targets[{index}]"
        if target.sample_key is not None:
            sample_key = f"{key}.sample_key"
            try:
                build_sampler(target.sample_percentage, target.sample_key, sample_key)
            except ConfigError as error:
                # The sampler names its keys `<where>.key...`; ours is `sample_key` itself.
                prefix = f"{sample_key}.key"
                blamed = sample_key + error.key[len(prefix) :] if error.key.startswith(prefix) else error.key
                raise ConfigError(blamed, error.problem) from None
        if target.filters is not None:
            build_filter(target.filters, f"{key}.filters")
        if target.redact is not None and target.redact is not config.redact:
            build_redactor(target.redact, f"{key}.redact", config.hmac_key, _ignore_redaction)
        if target.rate_limit is not None:
            build_rate_limiter(target.rate_limit, f"{key}.rate_limit")
        if target.circuit_breaker is not None:
            build_circuit_breaker(target.circuit_breaker, f"{key}.circuit_breaker")
        if target.scheme == "https" and target.ca_file is not None:
            try:
                ssl.create_default_context(cafile=target.ca_file)
            except (ssl.SSLError, OSError, ValueError) as error:
                raise ConfigError(
                    f"{key}.ca_file", f"cannot load CA certificates from {target.ca_file}: {error}"
                ) from None


def _ignore_redaction(*_: object) -> None:
    """Redactors built only to validate never redact anything."""


def _read_yaml(path: str) -> Any:
    try:
        with open(path, "rb") as file:
            text = file.read()
    except OSError as error:
        raise ConfigError(path, f"cannot read the config file: {error.strerror or error}") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = path if mark is None else f"{path}:{mark.line + 1}:{mark.column + 1}"
        raise ConfigError(where, f"invalid YAML: {error.problem or error.context}") from None
    except yaml.YAMLError as error:
        raise ConfigError(path, f"invalid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(path, f"must contain a mapping at the top level, got {show(data)}")
    return data


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: YAML silently keeps the last one, so a second
    `sample_percentage:` further down a target would quietly win."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[str, yaml.Mark] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if key_node.value in seen:
                first = seen[key_node.value].line + 1
                problem = f"duplicate key {key_node.value!r} (first on line {first})"
                raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
            seen[key_node.value] = key_node.start_mark
        return super().construct_mapping(node, deep)


def _apply_overrides(
    data: Mapping[str, Any], overrides: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """Write the overrides into a copy of the document, so they are validated like file values;
    returns the keys they set, to say so in an error."""
    merged = copy.deepcopy(dict(data))
    overridden: list[str] = []
    for name, value in overrides.items():
        if name not in OVERRIDE_KEYS:
            raise ConfigError(f"overrides.{name}", unknown_key(name, list(OVERRIDE_KEYS)))
        if value is None:
            continue
        if name == "mirror_urls":
            merged["targets"] = [{"url": url} for url in value]
            if isinstance(merged.get("mirroring"), dict):
                merged["mirroring"].pop("targets", None)
            overridden.append("targets")
            continue
        section, key = ("listen", name)
        for prefix in ("log_", "outgoing_"):
            if name.startswith(prefix):
                section, key = prefix[:-1], name[len(prefix) :]
        if merged.get(section) is None:
            merged[section] = {}
        if isinstance(merged[section], dict):
            merged[section][key] = value
            overridden.append(f"{section}.{key}")
    return merged, overridden

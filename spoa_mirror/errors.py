"""Errors the operator sees."""

from __future__ import annotations

from collections.abc import Collection


class ConfigError(ValueError):
    """A bad configuration value: one line naming the key and the problem, e.g.
    `targets[0].sample_percentage: must be between 0 and 100, got 120`."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


def check_spec_keys(spec: object, where: str, known: Collection[str]) -> None:
    """A stage's spec (a target's rate_limit, circuit_breaker or redact) is a mapping of only the
    `known` keys; the first unknown one is named in the error."""
    if not isinstance(spec, dict):
        raise ConfigError(where, f"must be a mapping, got {spec!r}")
    for name in spec:
        if name not in known:
            raise ConfigError(f"{where}.{name}", f"unknown key; expected one of {', '.join(known)}")


class StartupError(Exception):
    """The agent cannot start as configured (a port in use, a certificate that does not load): one
    line naming the setting, e.g. `listen.port: 127.0.0.1:12345 is already in use`; exit status 2,
    which the shipped systemd unit does not restart in a loop."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem

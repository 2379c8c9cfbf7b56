"""Errors the operator sees."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration value: one line naming the key and the problem, e.g.
    `targets[0].sample_percentage: must be between 0 and 100, got 120`."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem

"""The comparator: pairs of responses in, differences, noise, per-endpoint statistics, a report and a
verdict out. (Interface first; the comparison itself follows.)"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from .config import CompareConfig
from .model import Response

COMPARED = ("identical", "different", "noise_only")
# Outcomes without a pair to compare, counted by the pairing table (count()).
UNPAIRED = ("primary_missing", "shadow_failed", "too_large", "table_full", "shutdown")
OUTCOMES = COMPARED + UNPAIRED

RedactResponse = Callable[[str, Response], Response]


class Verdict(NamedTuple):
    ok: bool
    reasons: tuple[str, ...]


class CompareEngine:
    def __init__(self, config: CompareConfig, *, redact_response: RedactResponse | None = None) -> None:
        self.config = config
        self._redact = redact_response
        self._counts: dict[tuple[str, str, str], int] = {}

    def compare(
        self,
        target: str,
        method: str,
        path: str,
        primary: Response,
        candidate: Response,
        baseline: Response | None = None,
    ) -> str:
        outcome = (
            "identical"
            if (primary.status, primary.body) == (candidate.status, candidate.body)
            else "different"
        )
        self.count(target, method, path, outcome)
        return outcome

    def count(self, target: str, method: str, path: str, outcome: str) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown comparison outcome {outcome!r}; one of {', '.join(OUTCOMES)}")
        key = (target, f"{method} {path}", outcome)
        self._counts[key] = self._counts.get(key, 0) + 1

    def report(self) -> dict[str, Any]:
        return {"targets": {}}

    def verdict(self) -> Verdict:
        return Verdict(False, ("not enough comparisons yet",))

"""Compare: does the candidate answer like the primary? (issue 13)

`model.Response` is one response; `config.CompareConfig` the `compare:` section; `engine.CompareEngine`
turns pairs of responses into differences, noise, per-endpoint statistics, a report and a verdict.
"""

from .config import CompareConfig
from .engine import CompareEngine
from .model import Response

__all__ = ["CompareConfig", "CompareEngine", "Response"]

"""The bench scripts still start: each imports what it needs and parses its flags (`--help`), so
that a renamed module or a broken option shows up in the test run rather than when someone next
benchmarks. Nothing here runs a benchmark or looks at a timing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize(
    ("script", "flags"),
    [
        ("engine_bench.py", ["--duration", "--warmup", "--sans-io", "--count", "--json"]),
        ("transport_bench.py", ["--requests", "--json"]),
        (
            "e2e_bench.py",
            [
                "--quick",
                "--fault-duration",
                "--scenarios",
                "--haproxy",
                "--json",
                "--rate",
                "--body-size",
                "--c-agent",
            ],
        ),
        ("hotpath_count.py", ["--count", "--batch", "--request", "--count-instructions"]),
        ("redaction_ack_bench.py", ["--duration", "--body-size", "--big-interval"]),
        ("capture_bench.py", ["--requests", "--json"]),
        ("compare_bench.py", ["--count", "--json"]),
        ("run", ["--quick"]),
    ],
)
def test_help(script: str, flags: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / script), "--help"],
        cwd=BENCH.parent,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    for flag in flags:  # the options bench/run drives the others with, and its own
        assert flag in done.stdout

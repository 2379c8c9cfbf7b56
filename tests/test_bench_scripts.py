"""The bench scripts still start: each imports what it needs and parses its flags (`--help`), so
that a renamed module or a broken option shows up in the test run rather than when someone next
benchmarks. Nothing here runs a benchmark or looks at a timing."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import platform
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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
                "--agent-sample-percentage",
            ],
        ),
        (
            "hotpath_count.py",
            [
                "--count",
                "--batch",
                "--request",
                "--count-instructions",
                "--hash-seed",
                "--no-default-redaction",
            ],
        ),
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


def _module(name: str, path: Path) -> object:
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    loader.exec_module(module)
    return module


def test_bench_run_asks_e2e_bench_only_for_scenarios_it_has() -> None:
    """bench/run's steps name e2e scenarios; a name e2e_bench.py does not know fails that step only
    when someone next benchmarks (a merge once left json_mirror out of e2e_bench's list)."""
    e2e = _module("e2e_bench", BENCH / "e2e_bench.py")
    run = _module("bench_run", BENCH / "run")
    asked = set(e2e.DEFAULT_SCENARIOS)  # type: ignore[attr-defined]
    for step in run.steps(True, "/usr/bin/true"):  # type: ignore[attr-defined]
        if "bench/e2e_bench.py" in step.cmd and "--scenarios" in step.cmd:
            asked.update(step.cmd[step.cmd.index("--scenarios") + 1].split(","))
    assert asked >= {"json_compare", "fixed_ack", "c_agent"}
    assert asked <= set(e2e.SCENARIOS)  # type: ignore[attr-defined]


def test_bench_run_measures_the_given_agent_in_every_e2e_step() -> None:
    """`bench/run --agent PATH` (another virtualenv, another interpreter) must reach every e2e run,
    the fixed-rate one too: one step left on .venv's agent would put two interpreters in one table."""
    run = _module("bench_run", BENCH / "run")
    steps = run.steps(False, None, "/opt/other/bin/spoa-mirror")  # type: ignore[attr-defined]
    e2e_steps = [step for step in steps if "bench/e2e_bench.py" in step.cmd]
    assert len(e2e_steps) == 5
    for step in e2e_steps:
        assert step.cmd[step.cmd.index("--agent") + 1] == "/opt/other/bin/spoa-mirror", step.name


def test_bench_run_names_the_interpreter_that_ran_the_agent() -> None:
    """bench/run's report names the interpreter of the e2e runs' agent, read from e2e_bench.py's
    setup line: with --agent it is not the python of the in-process benches, and a report that named
    only that one put Debian's figures under pyenv's name."""
    e2e = _module("e2e_bench", BENCH / "e2e_bench.py")
    run = _module("bench_run", BENCH / "run")
    agent = str(Path(sys.executable).parent / "spoa-mirror")
    args = e2e.build_parser().parse_args(["--agent", agent])  # type: ignore[attr-defined]
    setup = e2e.setup_lines(args, SimpleNamespace(haproxy_threads=2))  # type: ignore[attr-defined]
    step = next(step for step in run.steps(True, None, agent) if "bench/e2e_bench.py" in step.cmd)  # type: ignore[attr-defined]
    step.output = {"setup": setup}
    named = run.agent_interpreter([step])["agent"]  # type: ignore[attr-defined]
    assert named.startswith(f"{agent}, CPython {platform.python_version()} from ")

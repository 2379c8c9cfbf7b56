"""Shared fixtures. Integration tests drive the real HAProxy and nginx that scripts/setup.sh installs:
when one is missing those tests fail (FileNotFoundError), they are never skipped."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from tests.support.procs import HAPROXY, NGINX, ManagedProcess, run_process

ROOT = Path(__file__).resolve().parent.parent


def pytest_report_header() -> list[str]:
    """Which HAProxy and nginx the integration tests ran against, in every test report."""
    lines = []
    for name, argv in (("haproxy", [HAPROXY, "-v"]), ("nginx", [NGINX, "-v"])):
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            version = (done.stdout or done.stderr).splitlines()[0]
        except (OSError, IndexError):
            version = "NOT INSTALLED: its integration tests will fail (run scripts/setup.sh)"
        lines.append(f"{name}: {version}")
    return lines


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--reverse",
        action="store_true",
        help="run the collected tests in reverse order: a test that passes only after another fails",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--reverse"):
        items.reverse()


EchoAgentFactory = Callable[..., AbstractContextManager[ManagedProcess]]


@pytest.fixture
def echo_agent(tmp_path: Path) -> EchoAgentFactory:
    """`with echo_agent(port, "--max-frame-size", "512") as agent:` runs tests/support/echo_agent.py
    as a subprocess listening on `port`; its JSON log is `agent.stderr_text()`."""

    def start(port: int, *options: str) -> AbstractContextManager[ManagedProcess]:
        argv = [sys.executable, "-m", "tests.support.echo_agent", "--port", str(port), *options]
        return run_process(argv, ready_port=port, name="echo-agent", log_dir=tmp_path, cwd=ROOT)

    return start

"""Shared fixtures. Integration tests drive the real HAProxy and nginx that scripts/setup.sh installs:
when one is missing those tests fail (FileNotFoundError), they are never skipped.

Every test marked `haproxy` runs once per HAProxy release the project supports (2.6 and 3.2, see
tests/support/procs.py), with the release in its id (`test_x[haproxy-3.2]`); the helpers that start
or check HAProxy use that test's release. A test that asserts one release's own behaviour asks for
the `haproxy_release` fixture."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from tests.support.config_schema import as_json, recording_accepted_configs, validator
from tests.support.live_agent import TEST_DEADLINE, AsyncTest, loop_runner
from tests.support.procs import (
    HAPROXY_RELEASES,
    NGINX,
    HAProxyRelease,
    ManagedProcess,
    current_haproxy,
    run_process,
    using_haproxy,
)
from tests.support.wheels import build_wheelhouse

ROOT = Path(__file__).resolve().parent.parent


def pytest_report_header() -> list[str]:
    """Which HAProxy releases and nginx the integration tests ran against, in every test report."""
    lines = []
    programs = [(f"haproxy-{release.branch}", [release.binary, "-v"]) for release in HAPROXY_RELEASES]
    for name, argv in [*programs, ("nginx", [NGINX, "-v"])]:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            version = (done.stdout or done.stderr).splitlines()[0]
        except (OSError, IndexError):
            version = "NOT INSTALLED: its integration tests will fail (run scripts/setup.sh)"
        lines.append(f"{name}: {version}")
    return lines


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test marked `haproxy` runs against each release: `haproxy_release` is parametrised, per
    module, so pytest runs a module's tests release by release, and a module-scoped fixture that
    starts HAProxy (it must ask for `haproxy_release`) is started once per release."""
    if metafunc.definition.get_closest_marker("haproxy") is not None:
        metafunc.parametrize(
            "haproxy_release",
            HAPROXY_RELEASES,
            ids=[release.test_id for release in HAPROXY_RELEASES],
            indirect=True,
            scope="module",
        )


@pytest.fixture(scope="module", autouse=True)
def haproxy_release(request: pytest.FixtureRequest) -> Iterator[HAProxyRelease]:
    """The HAProxy release of this test (tests not marked `haproxy`: 2.6). The binary must be that
    release, or the test fails saying so: a missing 3.2 never turns into a skip or a 2.6 run.
    Module-scoped, so that module-scoped fixtures that start HAProxy can ask for it."""
    release = getattr(request, "param", None)
    if release is None:
        yield current_haproxy()
        return
    try:
        release.check()
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        pytest.fail(f"HAProxy {release.branch} is not usable ({error}): run scripts/setup.sh", pytrace=False)
    with using_haproxy(release):
        yield release


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--reverse",
        action="store_true",
        help="run the collected tests in reverse order: a test that passes only after another fails",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--reverse"):
        items.reverse()


@pytest.fixture(autouse=True)
def _cold_spop_caches() -> None:
    """Each test starts with spoe.frames' caches empty (the message shapes and argument names the
    decoder learns, the encoded action tuples), so the path that fills them is tested too, not only
    the one that reads them: mutmut runs each mutant's tests in a child forked after the whole suite
    has warmed them, and 60 mutants of that path survived (2026-12-05 run)."""
    from spoe import frames

    frames._SHAPES.clear()
    frames._ARG_NAMES.clear()
    frames._ENCODED_TUPLES.clear()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The redaction worker process (spoa_mirror/mirror.py) ends with the session, not at the
    interpreter's exit: mutmut ends each mutant's test run with os._exit, which skips exit handlers,
    and a worker left so waits on its own queue for good (19 mutants of mirror.py left 13, ~48 MB each)."""
    from spoa_mirror import mirror

    if mirror._executor is not None and mirror._executor_pid == os.getpid():
        mirror._executor.shutdown(wait=True, cancel_futures=True)
        mirror._executor = None


EchoAgentFactory = Callable[..., AbstractContextManager[ManagedProcess]]


@pytest.fixture
def echo_agent(tmp_path: Path) -> EchoAgentFactory:
    """`with echo_agent(port, "--max-frame-size", "512") as agent:` runs tests/support/echo_agent.py
    as a subprocess listening on `port`; its JSON log is `agent.stderr_text()`."""

    def start(port: int, *options: str) -> AbstractContextManager[ManagedProcess]:
        argv = [sys.executable, "-m", "tests.support.echo_agent", "--port", str(port), *options]
        return run_process(argv, ready_port=port, name="echo-agent", log_dir=tmp_path, cwd=ROOT)

    return start


@pytest.fixture
def run_asyncio() -> Callable[[AsyncTest], None]:
    """Runs a test coroutine on asyncio's own loop under TEST_DEADLINE (the in-process App tests of
    test_pipeline.py, test_mirror_edges.py and test_mirror_wiring.py)."""
    return loop_runner("asyncio", TEST_DEADLINE)


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This checkout and its dependencies as wheels (tests/support/wheels.py), built once."""
    return build_wheelhouse(tmp_path_factory.mktemp("wheels"))


@pytest.fixture(scope="session", autouse=True)
def accepted_configs_match_the_schema() -> Iterator[None]:
    """Every config a test got the agent to accept must pass the shipped JSON Schema too, or an editor
    would flag a valid file (tests/test_config_schema.py checks the other direction)."""
    with recording_accepted_configs() as accepted:
        yield
    check = validator()
    refused = [
        f"{error.json_path}: {error.message}"
        for document in accepted
        for error in check.iter_errors(as_json(document))
    ]
    assert not refused, f"configs the agent accepts but docs/config.schema.json refuses: {refused[:5]}"

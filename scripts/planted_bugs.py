"""Plant again, one at a time, the bugs the test audit of issue 17 found surviving, and check that
each now fails at least one test.

    .venv/bin/python scripts/planted_bugs.py            # every bug below (~1 min)
    .venv/bin/python scripts/planted_bugs.py NAME ...   # some of them

Each bug is a text replacement in a scratch copy of the checkout (the tracked files), so the
worktree is never touched; the tests named beside it then run in that copy and must fail. A bug
whose anchor text is no longer in the code is reported as such (exit status 2): the code moved,
and the bug must be planted anew, never silently counted as caught. Exit status 1 if any bug
survived, 3 if the tests fail with no bug planted (then a failure proves nothing).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = "tests/test_pipeline.py"


@dataclass(frozen=True)
class Bug:
    name: str
    why: str  # the promise it breaks
    path: str
    anchor: str
    replacement: str
    tests: tuple[str, ...]


BUGS = [
    Bug(
        "intake-inline-before-ack",
        "ACK before any replay work: the whole intake runs inside the handler, before the ACK",
        "spoa_mirror/mirror.py",
        "asyncio.get_running_loop().call_soon(self._process_intake)\n        return self._ack_accepted",
        "self._process_intake()\n        return self._ack_accepted",
        (f"{PIPELINE}::test_ack_is_handed_to_the_transport_before_any_pipeline_stage_runs",),
    ),
    Bug(
        "ack-waits-for-replays",
        "ACK before any replay work: the ACK waits until every replay settled",
        "spoa_mirror/mirror.py",
        "        return self._ack_accepted\n\n    def _take_primary_response(",
        "        return self._after_replays()\n\n"
        "    async def _after_replays(self) -> tuple[SetVar, ...]:\n"
        "        await asyncio.sleep(0)\n"
        "        while any(target.pending for target in self.targets):\n"
        "            await asyncio.sleep(0.001)\n"
        "        return self._ack_accepted\n\n"
        "    def _take_primary_response(",
        (f"{PIPELINE}::test_ack_is_handed_to_the_transport_before_any_pipeline_stage_runs",),
    ),
    Bug(
        "intake-overflow-uncounted",
        "exactly one outcome: a request refused at a full intake gets none",
        "spoa_mirror/mirror.py",
        'self._drop_for_every_target("queue_full")\n            return ACK_REFUSED',
        "return ACK_REFUSED",
        (f"{PIPELINE}::test_intake_overflow_counts_queue_full_on_every_target",),
    ),
    Bug(
        "no-shutdown-for-in-flight",
        "exactly one outcome: requests in flight at the drain deadline are not counted shutdown",
        "spoa_mirror/mirror.py",
        'self.stats.outcomes["shutdown"] += in_flight',
        "pass",
        (f"{PIPELINE}::test_drain_counts_what_is_left_as_shutdown",),
    ),
    Bug(
        "retired-target-not-drained",
        "exactly one outcome: a target a reload removed never counts what it had left",
        "spoa_mirror/mirror.py",
        "        self.retired.extend(targets)\n",
        "        return\n",
        (f"{PIPELINE}::test_reload_retires_old_targets_and_counts_their_leftovers",),
    ),
    Bug(
        "bytes-per-second-never-charged",
        "limits: bytes_per_second spends nothing",
        "spoa_mirror/limits.py",
        "if size <= 0 or take_bytes(size):",
        "if True:",
        (f"{PIPELINE}::test_bytes_per_second_limits_body_bytes_through_the_pipeline",),
    ),
    Bug(
        "bytes-only-never-charged",
        "limits: bytes_per_second alone spends nothing",
        "spoa_mirror/limits.py",
        "return size <= 0 or take_bytes(size)",
        "return True",
        (f"{PIPELINE}::test_bytes_per_second_limits_body_bytes_through_the_pipeline",),
    ),
    Bug(
        "breaker-connect-and-timeout-only",
        "limits: only connect and timeout failures open the breaker (README: every failure does)",
        "spoa_mirror/mirror.py",
        'if result.reason != "closed":',
        'if result.reason in ("connect", "timeout"):',
        (f"{PIPELINE}::test_every_kind_of_shadow_failure_opens_the_breaker",),
    ),
    Bug(
        "queue-size-not-enforced",
        "memory bounds: a target's queue grows past queue_size",
        "spoa_mirror/mirror.py",
        "if len(self.queue) >= self.queue_size or self.closing:",
        "if self.closing:",
        (f"{PIPELINE}::test_queue_size_bounds_what_waits_for_a_busy_target",),
    ),
    Bug(
        "frames-written-in-two-calls",
        "HAProxy 3.2 resets an AGENT-HELLO in several segments: every write split in two",
        "spoe/server.py",
        "            self.transport.write(out)",
        "            self.transport.write(out[:3])\n            self.transport.write(out[3:])",
        (f"{PIPELINE}::test_agent_hello_and_each_ack_are_written_in_one_call",),
    ),
    Bug(
        "scope-codes-swapped-in-codec-and-spec",
        "independent oracle: a wrong var scope code shared by our encoder and spoe/spec.py",
        "spoe/frames.py",
        "    SESSION = 1\n    TRANSACTION = 2",
        "    SESSION = 2\n    TRANSACTION = 1",
        ("tests/test_oracle.py",),
    ),
    Bug(
        "hello-version-shared-by-codec-and-spec",
        "independent oracle: the AGENT-HELLO's version, built with spoe/spec.py, is wrong",
        "spoe/connection.py",
        '"version": SPOP_VERSION,',
        '"version": "2.1",',
        ("tests/test_oracle.py",),
    ),
    Bug(
        "demo-checks-two-secrets",
        "the demo's 'secrets found: 0' looks for only two of the secrets it plants",
        "examples/demo.py",
        '    "session cookie": re.compile(re.escape(SESSION_COOKIE)),\n'
        '    "query token": re.compile(re.escape(QUERY_TOKEN).replace(r"\\{i\\}", r"\\d+")),\n',
        "",
        ("tests/test_demo.py::test_the_demo_check_finds_each_planted_secret",),
    ),
    Bug(
        "nested-multipart-scanned-as-text",
        "redaction: a secret-named field inside multipart/mixed inside form-data leaves unmasked",
        "spoa_mirror/redact.py",
        "            if depth >= MULTIPART_DEPTH_LIMIT:\n"
        '                raise Unredactable("multipart_too_deep")',
        "            if depth >= 1:\n                return self._text(body, events)",
        ("tests/test_redact_shapes.py::test_a_secret_named_part_inside_a_nested_multipart_is_masked",),
    ),
    Bug(
        "multipart-depth-unbounded",
        "bounded work: multipart nested past the depth limit is split anyway instead of refused",
        "spoa_mirror/redact.py",
        'raise Unredactable("multipart_too_deep")',
        "pass",
        (
            "tests/test_redact_shapes.py::test_multipart_nested_deeper_than_the_limit_is_refused_not_passed_through",
        ),
    ),
    Bug(
        "replay-ignores-speed",
        "replay --speed: the capture's own pace whatever the speed (was caught only by a timing window)",
        "spoa_mirror/capture/replay.py",
        "due = start + (payload.timestamp - first) / 1e9 / options.speed",
        "due = start + (payload.timestamp - first) / 1e9",
        ("tests/test_capture_replay.py::test_speed_4_quarters_the_span",),
    ),
    Bug(
        "watchdog-ticks-at-its-interval",
        "systemd watchdog: pings once per WatchdogSec instead of twice (was caught only by a timing gap)",
        "spoa_mirror/app.py",
        "return min(TICK, int(usec) / 2_000_000)",
        "return min(TICK, int(usec) / 1_000_000)",
        ("tests/test_systemd.py::test_the_heartbeat_ticks_at_least_twice_per_watchdog_interval",),
    ),
]


def scratch_copy(into: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout.split(
        b"\0"
    )
    for name in filter(None, files):
        source = ROOT / name.decode()
        if source.is_file():
            target = into / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def pytest(tree: Path, tests: tuple[str, ...]) -> int:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        timeout=600,
    ).returncode


def plant(bug: Bug, tree: Path) -> str:
    """'caught', 'SURVIVED' or 'ANCHOR MISSING', with the tree restored afterwards."""
    path = tree / bug.path
    original = path.read_text()
    if original.count(bug.anchor) != 1:
        return "ANCHOR MISSING"
    path.write_text(original.replace(bug.anchor, bug.replacement))
    try:
        status = pytest(tree, bug.tests)
    finally:
        path.write_text(original)
    return "caught" if status == 1 else "SURVIVED" if status == 0 else f"pytest {status}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="*", help="bugs to plant (default: all)")
    args = parser.parse_args()
    unknown = set(args.names) - {bug.name for bug in BUGS}
    if unknown:
        parser.error(f"unknown bugs: {', '.join(sorted(unknown))}")
    chosen = [bug for bug in BUGS if not args.names or bug.name in args.names]
    results = {}
    with tempfile.TemporaryDirectory(prefix="spoa-mirror-planted-") as scratch:
        tree = Path(scratch)
        scratch_copy(tree)
        baseline = tuple(dict.fromkeys(test for bug in chosen for test in bug.tests))
        if pytest(tree, baseline) != 0:
            print("the tests fail with no bug planted: fix them first", file=sys.stderr)
            return 3
        for bug in chosen:
            results[bug.name] = plant(bug, tree)
            print(f"{results[bug.name]:>14}  {bug.name}: {bug.why}", flush=True)
    if any(result == "ANCHOR MISSING" for result in results.values()):
        return 2
    return 0 if all(result == "caught" for result in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

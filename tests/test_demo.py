"""The README's first command ends in examples/demo.py: it must work on every HAProxy release the
project supports, as a user would run it (a subprocess, on loopback, about 4 s)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.procs import HAProxyRelease

pytestmark = pytest.mark.haproxy

ROOT = Path(__file__).resolve().parent.parent


def test_demo_mirrors_and_leaks_no_secret(tmp_path: Path, haproxy_release: HAProxyRelease) -> None:
    env = {**os.environ, "SPOA_MIRROR_HAPROXY": haproxy_release.binary, "TMPDIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "examples/demo.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "shadow-v2: received 300 mirrored requests" in done.stdout, done.stdout
    assert "secrets found in any shadow request: 0" in done.stdout, done.stdout

"""The project and its dependencies as wheels, built once per test session with `pip wheel`: what
deploy/systemd/install.sh --wheels and the container build install from, offline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def build_wheelhouse(directory: Path) -> Path:
    """`pip wheel` of this checkout into `directory` (pip's cache makes repeats quick)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(directory), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    assert any(directory.glob("spoa_mirror-*.whl")), f"pip wheel made no spoa_mirror wheel in {directory}"
    return directory

"""A clean checkout must not see the machine that made it: a tracked `.venv` symlink once made every
fresh clone fail at `python -m venv` while CI, on the machine the link pointed into, stayed green."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> list[str]:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    return [line for line in done.stdout.splitlines() if line]


def test_no_tracked_path_is_one_gitignore_excludes() -> None:
    assert _git("ls-files", "--cached", "--ignored", "--exclude-standard") == []


def test_no_tracked_symlink_leads_out_of_the_checkout() -> None:
    leaving = []
    for name in _git("ls-files"):
        path = ROOT / name
        if path.is_symlink():
            target = (path.parent / os.readlink(path)).resolve()
            if not target.is_relative_to(ROOT):
                leaving.append(f"{name} -> {os.readlink(path)}")
    assert leaving == []


def test_setup_replaces_a_venv_that_links_out_of_the_checkout(tmp_path: Path) -> None:
    """scripts/setup.sh's own guard, run on a copy: a `.venv` symlink is removed before `venv` runs."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    (clone / ".venv").symlink_to(tmp_path / "elsewhere")
    script = (clone / "scripts" / "setup.sh").read_text()
    guard = script[script.index("python=${PYTHON"): script.index('[ -x .venv/bin/python ] ||')]
    done = subprocess.run(["bash", "-c", guard], cwd=clone, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not (clone / ".venv").is_symlink()
    assert "link out of this checkout" in done.stderr

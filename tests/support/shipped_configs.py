"""The configuration files the repository ships (haproxy/, the Dockerfile) as the tests that check
them read them: tests/test_haproxy_configs.py, tests/test_compose.py and tests/test_k8s.py."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.support.procs import HAProxyRelease, current_haproxy

ROOT = Path(__file__).resolve().parents[2]
SPOE_CONF = ROOT / "haproxy" / "mirror.spoe.conf"
CONFIG_2X = ROOT / "haproxy" / "haproxy.cfg"
CONFIG_3X = ROOT / "haproxy" / "haproxy-3.x.cfg"
DOCKERFILE = ROOT / "Dockerfile"
AGENT = Path(sys.executable).with_name("spoa-mirror")


# --- HAProxy ----------------------------------------------------------------------------------------


def shipped_haproxy_config(release: HAProxyRelease | None = None) -> Path:
    """The shipped config for `release` (the running test's by default): haproxy-3.x.cfg for 3.1+."""
    return CONFIG_3X if (release or current_haproxy()).at_least_3_1 else CONFIG_2X


def haproxy_check(config: Path, *, cwd: Path | None = None) -> None:
    """`haproxy -c -dW` by the running test's HAProxy: the config must parse with no warning at all;
    fail with HAProxy's words."""
    check = subprocess.run(
        [current_haproxy().binary, "-c", "-dW", "-f", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
    )
    assert check.returncode == 0, f"haproxy -c {config}:\n{check.stdout}{check.stderr}"


def to_mode_tcp(text: str) -> str:
    """An HAProxy 3.1+ config as 2.6 can parse it: `mode spop` agents' backends back in `mode tcp`."""
    converted, count = re.subn(r"^(\s*)mode spop\b", r"\1mode tcp", text, flags=re.MULTILINE)
    assert count, "no `mode spop` line to switch back"
    return converted


def directive(text: str, pattern: str) -> list[str]:
    """The first capture group of `pattern` on every config line it matches (comments excluded)."""
    lines = (line.split("#", 1)[0] for line in text.splitlines())
    return [match[1] for line in lines if (match := re.match(rf"\s*{pattern}\s*$", line))]


def bufsize(text: str) -> int:
    [value] = directive(text, r"tune\.bufsize (\d+)")
    return int(value)


def section(text: str, header: str) -> list[str]:
    """The directives of one HAProxy section, comments and blank lines dropped."""
    lines = text.splitlines()
    start = lines.index(header) + 1
    body = []
    for line in lines[start:]:
        if line and not line[0].isspace() and not line.startswith("#"):
            break
        directive = line.split("#", 1)[0].strip()
        if directive:
            body.append(directive)
    return body


# --- the agent and its image ------------------------------------------------------------------------


def assert_check_config(config: Path, *flags: str) -> None:
    result = subprocess.run(
        [str(AGENT), "check-config", str(config), *flags], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        instructions.append((keyword.upper(), " ".join(arguments.split())))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions

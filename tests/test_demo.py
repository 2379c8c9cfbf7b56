"""The demo (examples/demo.py) runs in the suite: real HAProxy, the real agent, its own shadows. Its
"secrets found in any shadow request: 0" must mean every secret it plants, each of which it also
checks was really planted (seen by the primary)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.procs import HAProxyRelease

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo.py"


def load_demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("spoa_mirror_demo", DEMO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.haproxy
def test_demo_runs_and_no_planted_secret_reaches_a_shadow(
    tmp_path: Path, haproxy_release: HAProxyRelease
) -> None:
    """As a user runs it, on every HAProxy release the project supports (SPOA_MIRROR_HAPROXY picks
    the binary), in a subprocess on loopback, about 4 s."""
    env = {**os.environ, "SPOA_MIRROR_HAPROXY": haproxy_release.binary, "TMPDIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(DEMO)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "primary served 300 requests" in done.stdout, done.stdout
    assert "shadow-v2: received 300 mirrored requests" in done.stdout, done.stdout
    assert "secrets found in any shadow request: 0" in done.stdout, done.stdout
    for name in load_demo().PLANTED_SECRETS:
        line = next(line for line in done.stdout.splitlines() if line.strip().startswith(f"{name}:"))
        assert line.endswith(", 0 shadow requests") and "in 0 primary" not in line, line


# What the traffic sends, each secret in the place it travels: a shadow request carrying any of them
# must be found, or the demo's 0 would prove nothing.
CARRIERS = {
    "bearer token": {"method": "GET", "path": "/items/1",
                     "headers": {"authorization": "Bearer s3cr3t-token"}},
    "session cookie": {"method": "GET", "path": "/items/1", "headers": {"cookie": "session=abc123"}},
    "query token": {"method": "GET", "path": "/items/7?token=tok-7&page=2", "headers": {}},
    "JSON password": {"method": "POST", "path": "/orders", "headers": {}, "body": '{"password":"hunter2"}'},
    "card number": {"method": "POST", "path": "/orders", "headers": {},
                    "body": '{"card":{"number":"4111111111111111"}}'},
}  # fmt: skip


def test_the_demo_check_finds_each_planted_secret() -> None:
    demo = load_demo()
    assert set(CARRIERS) == set(demo.PLANTED_SECRETS)
    for name, request in CARRIERS.items():
        found = demo.secrets_found([request])
        assert found == {other: int(other == name) for other in demo.PLANTED_SECRETS}, (name, found)
    redacted = {"method": "GET", "path": "/items/7?token=%5BREDACTED%5D", "headers": {"cookie": "[REDACTED]"}}
    assert sum(demo.secrets_found([redacted]).values()) == 0

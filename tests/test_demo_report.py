"""The demo's closing report (examples/demo.py): it explains its own numbers, and they agree with
the agent's counters; it shows an excerpt of /metrics; it leaves no temporary directory behind."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.haproxy
@pytest.mark.skipif(
    shutil.which("haproxy") is None and not Path("/usr/sbin/haproxy").exists(), reason="needs haproxy"
)
def test_demo_explains_its_numbers_and_cleans_up(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")],
        env={**os.environ, "TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert list(tmp_path.iterdir()) == [], "the demo left its temporary directory"

    excerpt = out.split("an excerpt of the agent's /metrics:\n", 1)[1].split("\n\n", 1)[0]
    assert 'spoa_mirror_requests_received_total{target="canary"} 300.0' in excerpt
    assert "spoa_mirror_sent_bytes_total" in excerpt

    why = out.split("why these numbers:\n", 1)[1]
    filtered = re.search(r"the (\d+) POSTs .* \(agent: filtered=(\d+)\)", why)
    assert filtered and filtered[1] == filtered[2] == "100"
    sampled = re.search(
        r"received their GETs, (\d+) of the (\d+) GETs; the other users' (\d+) .*sampled_out=(\d+)\)", why
    )
    assert sampled is not None
    received, gets, others, counted = map(int, sampled.groups())
    assert gets == 200 and received + others == gets and others == counted
    assert re.search(rf"canary: received {received} mirrored requests \(agent counted {received} sent\)", out)

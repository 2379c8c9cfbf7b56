"""The README is tested: its example agent runs and speaks SPOP, its config reference is the example file."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

from spoe import Message, SetVar, VarScope
from tests.support.procs import free_port, wait_for_port
from tests.support.spop_peer import FrameParser, ack_actions, hello_2x, kv, notify

README = Path(__file__).resolve().parent.parent / "README.md"


def example_source() -> str:
    match = re.search(r"<!-- example-agent -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert match, "README.md lost its example agent block"
    return match.group(1)


def test_example_is_short() -> None:
    assert len(example_source().strip().splitlines()) <= 20


def test_example_agent_answers_notify(tmp_path: Path) -> None:
    port = free_port()
    script = tmp_path / "agent.py"
    script.write_text(example_source().replace("12345", str(port)))
    process = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE)
    try:
        wait_for_port("127.0.0.1", port, timeout=10)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            message = Message("check-request", {"method": "POST", "body": b"x" * 42})
            sock.sendall(hello_2x() + notify(1, 1, [message]))
            parser = FrameParser()
            frames = []
            while len(frames) < 2:
                data = sock.recv(65536)
                assert data, "agent closed the connection"
                frames += parser.feed(data)
        assert kv(frames[0])["version"] == "2.0"
        assert ack_actions(frames[1]) == [
            SetVar(VarScope.TRANSACTION, "method", "POST"),
            SetVar(VarScope.TRANSACTION, "body_len", 42),
        ]
    finally:
        process.kill()
        process.wait(timeout=5)


def test_readme_config_reference_is_examples_config() -> None:
    """The README's reference and the commented example file are one text, so neither drifts."""
    match = re.search(r"<!-- config-reference -->\s*```yaml\n(.*?)```", README.read_text(), re.S)
    assert match, "README.md lost its config reference block"
    example = README.parent / "examples" / "config.yaml"
    assert match.group(1) == example.read_text()

"""A gate for the redaction worker process (spoa_mirror/mirror.py's one worker): a job of the test's
own that holds the worker until the test opens the gate. The worker runs one job at a time, in order,
so what the mirror hands it meanwhile stays in the worker's hands for as long as the test needs it
there, with no race against the worker finishing it first. Its own module, so the spawned worker
imports only this to run it.
"""

from __future__ import annotations

import socket


def wait_at_gate(port: int) -> None:
    """Run in the worker: connects to the test's gate on 127.0.0.1:`port` and returns when the test
    closes that connection."""
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.recv(1)

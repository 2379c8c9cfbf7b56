"""sd_notify without libsystemd: one datagram to $NOTIFY_SOCKET per state change (READY=1,
RELOADING=1, STOPPING=1), so `Type=notify` units know when the agent really listens, and WATCHDOG=1
from the event loop's heartbeat when the unit sets `WatchdogSec=`.

`$CREDENTIALS_DIRECTORY` is where systemd puts what `LoadCredential=` names (config.py reads the
HMAC key there when the config names a credential)."""

from __future__ import annotations

import os
import socket
import time


def notify(*states: str) -> bool:
    """Send states like "READY=1"; False when not run under systemd (no NOTIFY_SOCKET)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    lines = list(states)
    if "RELOADING=1" in lines:
        # systemd >= 253 wants the monotonic time of the reload with RELOADING=1.
        lines.append(f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto("\n".join(lines).encode(), address)
        except OSError:
            return False
    return True


def watchdog_interval() -> float | None:
    """Seconds within which systemd wants WATCHDOG=1 (`WatchdogSec=`), or None: no watchdog, or one
    meant for another process (WATCHDOG_PID names the main PID; a worker is not it)."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1_000_000

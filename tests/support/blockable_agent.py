"""The real `spoa-mirror` command line, with one addition for tests: SIGUSR1 blocks the main thread
(the SPOP event loop) for $BLOCK_SECONDS, as a runaway handler or a hung synchronous call would.

Python runs signal handlers on the main thread, between bytecodes of whatever it is running, so the
sleep happens on the event loop's thread (asyncio's or uvloop's alike) while the admin listener's
thread goes on. Run as `python -m tests.support.blockable_agent ARGS...` from the repository root.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from spoa_mirror.cli import main


def block_the_loop(_signum: int, _frame: object) -> None:
    time.sleep(float(os.environ.get("BLOCK_SECONDS", "8")))


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, block_the_loop)
    sys.exit(main())

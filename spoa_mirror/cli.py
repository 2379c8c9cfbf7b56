"""`spoa-mirror`: run the agent, or `spoa-mirror check-config FILE`.

Exit codes: 0 after a clean stop, 2 for a bad config or bad flags (one line naming the key)."""

from __future__ import annotations

import os
import signal
import sys
import time

import spoe

from .app import App
from .cli_args import overrides_from_args, parse_args
from .config import Config, describe, load_config
from .errors import ConfigError
from .logs import configure


def main(argv: list[str] | None = None) -> int:
    command, options = parse_args(sys.argv[1:] if argv is None else argv)
    overrides = overrides_from_args(options)
    try:
        config = load_config(options.config, overrides)
    except ConfigError as error:
        print(f"spoa-mirror: config error: {error}", file=sys.stderr)
        return 2
    if command == "check-config":
        print(describe(config))
        return 0
    configure(options.log_format or config.log.format, options.log_level or config.log.level)
    if config.listen.workers > 1:
        return _supervise(config, options.config, overrides)
    return _serve(config, options.config, overrides, worker=0)


def _serve(config: Config, path: str | None, overrides: dict, worker: int) -> int:
    async def run() -> int:
        return await App(config, config_path=path, overrides=overrides, worker=worker).run()

    return spoe.run(run())


def _supervise(config: Config, path: str | None, overrides: dict) -> int:
    """`-n N`: N worker processes share the SPOP port with SO_REUSEPORT (the kernel spreads
    HAProxy's connections); the parent forwards SIGTERM/SIGHUP and restarts a worker that died."""
    children: dict[int, int] = {}
    stopping = False

    def spawn(worker: int) -> None:
        pid = os.fork()
        if pid == 0:
            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            os._exit(_serve(config, path, overrides, worker))
        children[pid] = worker

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in children:
            os.kill(pid, signal.SIGTERM if signum == signal.SIGINT else signum)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, forward)
    for worker in range(config.listen.workers):
        spawn(worker)
    status = 0
    while children:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            break
        worker = children.pop(pid, None)
        code = os.waitstatus_to_exitcode(wait_status)
        if code != 0:
            status = 1
        if worker is not None and not stopping and config.listen.runtime <= 0:
            time.sleep(0.5)
            spawn(worker)
    return status


if __name__ == "__main__":
    sys.exit(main())

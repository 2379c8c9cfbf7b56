"""`spoa-mirror`: run the agent, or `spoa-mirror check-config FILE`.

Exit codes: 0 after a clean stop, 2 for a bad config or bad flags (one line naming the key)."""

from __future__ import annotations

import os
import select
import signal
import struct
import sys
import time

import spoe

from . import systemd
from .app import PULSE_FORMAT, App, tick_interval
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


def _serve(
    config: Config,
    path: str | None,
    overrides: dict,
    worker: int,
    ready_fd: int | None = None,
    heartbeat_fd: int | None = None,
) -> int:
    async def run() -> int:
        app = App(
            config,
            config_path=path,
            overrides=overrides,
            worker=worker,
            ready_fd=ready_fd,
            heartbeat_fd=heartbeat_fd,
        )
        return await app.run()

    return spoe.run(run())


def _supervise(config: Config, path: str | None, overrides: dict) -> int:
    """`-n N`: N worker processes share the SPOP port with SO_REUSEPORT (the kernel spreads
    HAProxy's connections); the parent forwards SIGTERM/SIGHUP and restarts a worker that died.

    The parent is systemd's main PID, so it alone speaks sd_notify: READY=1 once every worker said
    it listens (a byte on a pipe), RELOADING=1/READY=1 around a forwarded SIGHUP, STOPPING=1, and,
    under `WatchdogSec=`, WATCHDOG=1 only while every worker's event loop pulses on the heartbeat
    pipe: one stuck worker stops the pings and systemd restarts the service."""
    children: dict[int, int] = {}
    stopping = False
    ready_read, ready_write = os.pipe()
    watchdog = systemd.watchdog_interval()
    heartbeat_read, heartbeat_write = os.pipe() if watchdog is not None else (None, None)

    def spawn(worker: int, ready_fd: int | None) -> None:
        pid = os.fork()
        if pid == 0:
            os.environ.pop("NOTIFY_SOCKET", None)
            if ready_fd is not None:  # the first spawns; a respawn finds both ends closed already
                os.close(ready_read)
            if heartbeat_read is not None:
                os.close(heartbeat_read)
            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            os._exit(_serve(config, path, overrides, worker, ready_fd, heartbeat_write))
        children[pid] = worker

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
            systemd.notify("STOPPING=1")
        else:
            systemd.notify("RELOADING=1")
        for pid in children:
            os.kill(pid, signal.SIGTERM if signum == signal.SIGINT else signum)
        if signum == signal.SIGHUP:
            systemd.notify("READY=1")

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, forward)
    for worker in range(config.listen.workers):
        spawn(worker, ready_write)
    os.close(ready_write)
    ready = 0
    while ready < config.listen.workers:
        try:
            chunk = os.read(ready_read, config.listen.workers)
        except InterruptedError:
            continue
        if not chunk:
            break  # every worker exited before it was ready; os.wait below reports how
        ready += len(chunk)
    os.close(ready_read)
    if ready == config.listen.workers:
        systemd.notify("READY=1", f"STATUS={ready} workers")
    status = 0
    pulses = dict.fromkeys(range(config.listen.workers), time.monotonic())
    tick = tick_interval()
    while children:
        readable, _, _ = select.select([heartbeat_read] if heartbeat_read is not None else [], [], [], tick)
        if readable:
            assert heartbeat_read is not None
            data = os.read(heartbeat_read, 4096)
            now = time.monotonic()
            for (worker,) in struct.iter_unpack(PULSE_FORMAT, data):
                pulses[worker] = now
        while children:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                children.clear()
                break
            if pid == 0:
                break
            worker = children.pop(pid, None)
            if os.waitstatus_to_exitcode(wait_status) != 0:
                status = 1
            if worker is not None and not stopping and config.listen.runtime <= 0:
                time.sleep(0.5)
                pulses[worker] = time.monotonic()  # a fresh worker gets a full interval to start
                spawn(worker, None)
        if watchdog is not None and not stopping:
            now = time.monotonic()
            if all(now - pulses[worker] < watchdog for worker in children.values()):
                systemd.notify("WATCHDOG=1")
    return status


if __name__ == "__main__":
    sys.exit(main())

"""`spoa-mirror`: run the agent, `spoa-mirror check-config FILE`, `spoa-mirror config-schema`,
`spoa-mirror report` (compare/cli.py), or `spoa-mirror replay` / `capture-info` (capture/cli.py).

Exit codes: 0 after a clean stop; 2 for a bad config, bad flags, or a start-up failure (a port in
use, a certificate that does not load), as one line naming the setting, which the shipped systemd
unit (RestartPreventExitStatus=2) does not restart in a loop; 1 when workers kept crashing.

Start-up order: config, TLS contexts, the listening sockets, the pidfile and the log file (all of
which can fail with a one-line error on the terminal), then -D, then the agent (one process, or the
supervisor of -n workers)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from argparse import Namespace
from collections.abc import Callable
from typing import Any

import structlog

import spoe

from .admin import BACKLOG as ADMIN_BACKLOG
from .app import App
from .cli_args import C_AGENT_DIFFERENCES, overrides_from_args, parse_args
from .compare.cli import report_main
from .config import Config, config_schema, describe, load_config
from .errors import ConfigError, StartupError
from .listeners import bind_listener
from .logs import configure
from .process import Daemon, Pidfile, open_logfile
from .supervisor import Supervisor
from .tls import check_contexts

log = structlog.get_logger("spoa_mirror")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("replay", "capture-info"):
        from .capture.cli import main as capture_main

        return capture_main(argv)
    command, options = parse_args(argv)
    if command == "config-schema":
        print(json.dumps(config_schema(), indent=2))
        return 0
    if command == "report":
        return report_main(options)
    overrides = overrides_from_args(options)
    if command == "run" and options.config:
        options.config = os.path.abspath(options.config)  # -D changes directory; SIGHUP re-reads it
    try:
        config = load_config(options.config, overrides)
        check_contexts(config)
    except (ConfigError, StartupError) as error:
        print(f"spoa-mirror: config error: {error}", file=sys.stderr)
        return 2
    if command == "check-config":
        print(describe(config))
        return 0
    return _run(config, options, overrides)


def _run(config: Config, options: Namespace, overrides: dict[str, Any]) -> int:
    listen = config.listen
    try:
        sockets = _bind_spop(config)
        admin = config.admin
        admin_sock = None
        if admin.enabled:
            admin_sock = bind_listener(admin.address, admin.port, key="admin.port", backlog=ADMIN_BACKLOG)
        pidfile = Pidfile(options.pidfile) if options.pidfile else None
        if options.logfile:
            open_logfile(options.logfile)
    except StartupError as error:
        print(f"spoa-mirror: cannot start: {error}", file=sys.stderr)
        return 2
    configure(options.log_format or config.log.format, options.log_level or config.log.level)
    signal.signal(signal.SIGTERM, _stop_before_serving)
    _log_c_agent_notes(config, options)
    daemon = Daemon(keep_output=bool(options.logfile)) if options.daemonize else None
    on_ready = None if daemon is None else daemon.ready
    status = 1
    try:
        if pidfile is not None:
            pidfile.write()
        if listen.workers > 1:
            supervisor = Supervisor(
                config, sockets, admin_sock, _worker(config, options, overrides), on_ready
            )
            status = supervisor.run()
        else:
            status = _serve(config, options, overrides, 0, sockets[0], admin_sock, on_ready)
    finally:
        if daemon is not None:
            daemon.failed(status)
        if pidfile is not None:
            pidfile.remove()
    return status


def _stop_before_serving(_signum: int, _frame: object) -> None:
    """SIGTERM before the agent installs its own handler: exit 0 through the `finally` that removes
    the pidfile, rather than die by the signal and leave it."""
    raise SystemExit(0)


def _bind_spop(config: Config) -> list[socket.socket]:
    """One listener, or one SO_REUSEPORT listener per worker, all on the port the first one got."""
    listen = config.listen
    bound: list[socket.socket] = []
    try:
        for _ in range(listen.workers):
            bound.append(
                bind_listener(
                    listen.address,
                    bound[0].getsockname()[1] if bound else listen.port,
                    key="listen.port",
                    backlog=listen.backlog,
                    reuse_port=listen.workers > 1,
                    own_inodes=[os.fstat(sock.fileno()).st_ino for sock in bound],
                )
            )
    except StartupError:
        for sock in bound:
            sock.close()
        raise
    return bound


def _worker(
    config: Config, options: Namespace, overrides: dict[str, Any]
) -> Callable[[int, socket.socket, socket.socket | None, Callable[[], None], int | None], int]:
    def serve(
        index: int,
        sock: socket.socket,
        admin_sock: socket.socket | None,
        ready: Callable[[], None],
        heartbeat_fd: int | None,
    ) -> int:
        return _serve(config, options, overrides, index, sock, admin_sock, ready, heartbeat_fd)

    return serve


def _serve(
    config: Config,
    options: Namespace,
    overrides: dict[str, Any],
    worker: int,
    sock: socket.socket,
    admin_sock: socket.socket | None,
    on_ready: Callable[[], None] | None,
    heartbeat_fd: int | None = None,
) -> int:
    async def run() -> int:
        app = App(
            config,
            config_path=options.config,
            overrides=overrides,
            worker=worker,
            sock=sock,
            admin_sock=admin_sock,
            on_ready=on_ready,
            heartbeat_fd=heartbeat_fd,
        )
        return await app.run()

    return spoe.run(run())


def _log_c_agent_notes(config: Config, options: Namespace) -> None:
    """One event for the C agent's flags this agent treats differently when they are not given (a
    migrated command line behaves differently there), and one for -B, which it ignores."""
    given = {
        "-a": options.address is not None or config.listen.address != "127.0.0.1",
        "-n": options.workers is not None or config.listen.workers != 1,
        "-b": options.backlog is not None or config.listen.backlog != 1024,
        "-c": options.capabilities is not None,
        "-r": options.runtime is not None,
    }
    differences = {
        flag: f"{ours} (C agent: {theirs})"
        for flag, (ours, theirs) in C_AGENT_DIFFERENCES.items()
        if not given[flag]
    }
    if differences:
        log.info("agent.c_agent_differences", flags=differences)
    if options.libev_backend is not None:
        log.info(
            "agent.flag_ignored",
            flag="-B",
            value=options.libev_backend,
            reason="libev backends do not apply: this agent runs on asyncio (uvloop, epoll)",
        )


if __name__ == "__main__":
    sys.exit(main())

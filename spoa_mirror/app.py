"""The agent's lifecycle: listen, serve, reload on SIGHUP, drain on SIGTERM.

SIGTERM: stop accepting, AGENT-DISCONNECT every SPOP connection (HAProxy moves to another agent),
send what is queued until the drain deadline, count the rest as `shutdown`, exit 0.
SIGHUP: load the config again and swap targets, sampling, filters, redaction and limits without
touching SPOP connections; a bad new config keeps the old one running and logs why.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import structlog

import spoe

from . import systemd
from .admin import BACKLOG as ADMIN_BACKLOG
from .admin import AdminServer
from .compare.engine import CompareEngine
from .compare.metrics import CompareCollector
from .compare.publish import admin_routes
from .config import Config, load_config
from .errors import ConfigError, StartupError
from .heartbeat import TICK, Heartbeat
from .listeners import bind_listener
from .metrics import (
    LoopCollector,
    MirrorCollector,
    OnLoop,
    QueueCapacityCollector,
    ReloadStats,
    build_registry,
)
from .mirror import Mirror
from .tls import server_context

log = structlog.get_logger("spoa_mirror")


class App:
    def __init__(
        self,
        config: Config,
        *,
        config_path: str | None,
        overrides: dict[str, Any],
        worker: int = 0,
        sock: socket.socket | None = None,
        admin_sock: socket.socket | None = None,
        on_ready: Callable[[], None] | None = None,
        heartbeat_fd: int | None = None,
    ) -> None:
        """`sock`, `admin_sock`: the listeners, bound beforehand (see listeners.py); bound here when
        not given. `on_ready` runs once the agent listens: a worker tells its supervisor (systemd's
        main PID, which alone speaks sd_notify), a daemon the process that started it.
        `heartbeat_fd`: the pipe on which a worker's event loop pulses (its number, every tick); the
        supervisor sends WATCHDOG=1 only while every worker pulses."""
        self.config = config
        self.config_path = config_path
        self.overrides = overrides
        self.worker = worker
        self.mirror = Mirror(config, config.secrets.hmac_key)
        listen = config.listen
        self.agent = spoe.Agent(
            max_frame_size=listen.max_frame_size,
            capabilities=listen.capabilities,
            max_connections=listen.max_connections,
            hello_timeout=listen.hello_timeout,
            idle_timeout=listen.idle_timeout,
            max_inflight=listen.max_inflight,
            allow_networks=listen.allow_networks,
            max_reassembly=reassembly_cap(config),
            reassembly_budget=listen.reassembly_budget,
            frame_timeout=listen.frame_timeout,
        )
        self.agent.set_default_handler(_delayed(self.mirror.handle, listen.processing_delay))
        self.sock = sock
        self.admin_sock = admin_sock
        self.on_ready = on_ready
        self.reloads = ReloadStats(last_success=time.time())
        self.heartbeat_fd = heartbeat_fd
        self.watchdog = systemd.watchdog_interval()
        self.heartbeat = Heartbeat(interval=tick_interval())
        self.admin: AdminServer | None = None
        self.listening: list[tuple[str, int]] = []
        self._stop = asyncio.Event()
        self._ready = False

    async def run(self) -> int:
        listen = self.config.listen
        if self.sock is None:
            self.sock = bind_listener(listen.address, listen.port, key="listen.port", backlog=listen.backlog)
        self.listening = await self.agent.start(
            sock=self.sock,
            backlog=listen.backlog,
            ssl=server_context(listen.tls) if listen.tls else None,
        )
        self.heartbeat.start()
        if self.watchdog is not None:
            self.heartbeat.on_tick(lambda: systemd.notify("WATCHDOG=1"))
        if self.heartbeat_fd is not None:
            os.set_blocking(self.heartbeat_fd, False)
            self.heartbeat.on_tick(self._pulse_supervisor)
        admin = self.config.admin
        if self.admin_sock is None and admin.enabled:
            self.admin_sock = bind_listener(
                admin.address, admin.port, key="admin.port", backlog=ADMIN_BACKLOG
            )
        if self.admin_sock is not None:
            self.admin = AdminServer(
                self._registry(),
                lambda: self._ready,
                self.heartbeat.alive,
                routes=admin_routes(self._compare_engine, asyncio.get_running_loop()),
            )
            admin_address = self.admin.start(self.admin_sock)
        else:
            admin_address = None
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self._ready = True
        systemd.notify("READY=1", f"STATUS=mirroring to {len(self.mirror.targets)} target(s)")
        log.info(
            "agent.started",
            listen=[f"{host}:{port}" for host, port in self.listening],
            admin=None if admin_address is None else f"{admin_address[0]}:{admin_address[1]}",
            targets=[target.name for target in self.mirror.targets],
            worker=self.worker,
        )
        if self.on_ready is not None:
            self.on_ready()
        warn_readable_secrets(self.config)
        runtime = listen.runtime
        if runtime > 0:
            loop.call_later(runtime, self._stop.set)
        monitor = loop.create_task(self._monitor(listen.monitor_interval))
        await self._stop.wait()
        monitor.cancel()
        return await self.shutdown()

    async def _monitor(self, interval: float) -> None:
        """The C agent's -i: what each worker holds, every `interval`, at debug level."""
        while True:
            await asyncio.sleep(interval)
            log.debug(
                "agent.monitor",
                worker=self.worker,
                connections=self.agent.connections,
                in_flight={name: stats.pending for name, stats in self.mirror.target_stats.items()},
                queued={target.name: len(target.queue) for target in self.mirror.targets},
                circuits={target.name: target.breaker.state for target in self.mirror.targets},
            )

    def stop(self) -> None:
        self._stop.set()

    async def shutdown(self) -> int:
        self._ready = False
        systemd.notify("STOPPING=1")
        log.info("agent.stopping", connections=self.agent.connections)
        await self.agent.stop(timeout=2.0)
        drained, dropped = await self.mirror.drain(self.config.drain_timeout)
        log.info(
            "agent.stopped",
            drained=drained,
            dropped=dropped,
            # The admin listener goes with the process: the final account is in this line.
            outcomes={
                name: {outcome: count for outcome, count in stats.outcomes.items() if count}
                for name, stats in self.mirror.target_stats.items()
            },
        )
        if self.admin is not None:
            self.admin.stop()
        self.heartbeat.stop()
        return 0

    def _pulse_supervisor(self) -> None:
        """Never blocks the loop: a supervisor that stopped reading loses pulses, not the worker."""
        assert self.heartbeat_fd is not None
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(self.heartbeat_fd, struct.pack(PULSE_FORMAT, self.worker))

    def reload(self) -> None:
        """SIGHUP. Whatever goes wrong (a bad file, TLS material that does not load, a bug of ours)
        keeps the running config, is logged as config.reload_failed, and systemd hears READY=1
        again: a unit left "reloading" would block the next `systemctl reload`."""
        systemd.notify("RELOADING=1")
        try:
            config = load_config(self.config_path, self.overrides)
            self.mirror.apply(config, config.secrets.hmac_key)
        except (ConfigError, StartupError) as error:  # StartupError: a CA file that does not load
            self.reloads.failure += 1
            log.error("config.reload_failed", error=str(error), kept="previous config")
        except Exception as error:
            self.reloads.failure += 1
            log.error("config.reload_failed", error=repr(error), kept="previous config", exc_info=error)
        else:
            self.reloads.success += 1
            self.reloads.last_success = time.time()
            warn_readable_secrets(config)
            if config.listen != self.config.listen:
                log.warning("config.listen_changed", note="listener settings apply at the next restart")
            self.config = config
            log.info("config.reloaded", targets=[target.name for target in self.mirror.targets])
        systemd.notify("READY=1")

    def _registry(self) -> Any:
        mirror = self.mirror
        registry = build_registry(
            OnLoop(
                MirrorCollector(
                    agent_stats=lambda: self.agent.stats,
                    messages=lambda: mirror.messages,
                    targets=lambda: mirror.target_stats,
                    queue_depth=lambda: {target.name: len(target.queue) for target in mirror.targets},
                    circuits=lambda: {target.name: target.breaker.state for target in mirror.targets},
                    reloads=lambda: self.reloads,
                    memory=lambda: (
                        mirror.budget.used(),
                        mirror.budget.limit,
                        {target.name: target.held_bytes() for target in mirror.targets},
                    ),
                ),
                asyncio.get_running_loop(),
            )
        )
        registry.register(CompareCollector(self._compare_engine, asyncio.get_running_loop()))
        registry.register(LoopCollector(self.heartbeat))
        registry.register(
            QueueCapacityCollector(lambda: {target.name: target.queue_size for target in mirror.targets})
        )
        return registry

    def _compare_engine(self) -> CompareEngine | None:
        """The comparator the mirror feeds (None without a `compare:` section); read at each use, as a
        reload may replace it."""
        return getattr(self.mirror, "compare_engine", None)


PULSE_FORMAT = "!H"  # a worker's number; 2-byte pipe writes are atomic, so pulses never interleave


def tick_interval() -> float:
    """The heartbeat's period: TICK, or half of systemd's watchdog interval when that is shorter
    (workers read the same WATCHDOG_USEC the supervisor was given)."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    if usec.isdigit() and int(usec) > 0:
        return min(TICK, int(usec) / 2_000_000)
    return TICK


def warn_readable_secrets(config: Config) -> None:
    """`secrets.file_permissions: warn` (the default) lets a group- or world-readable key file
    through; it is logged, once per load, with what to do."""
    for key, path, mode in config.secrets.readable_files:
        log.warning("config.secret_file_readable", key=key, path=path, mode=mode, fix=f"chmod 600 {path}")


def reassembly_cap(config: Config) -> int:
    """What one connection may hold of a fragmented NOTIFY: the largest body a target mirrors, plus
    room for the headers and other args, which HAProxy takes from one buffer (tune.bufsize, which
    `max_frame_size` should match; at least 1 MiB so a 1 MB header block passes). A lower cap would
    close the SPOP connection (status 13) on a message the config says to mirror, a higher one would
    let a peer park more than we could use. Without fragmentation announced, nothing is reassembled
    at all, whatever this says; `listen.reassembly_budget` bounds all connections together."""
    largest_body = max((t.max_body_size for t in config.targets if t.mirror_body), default=0)
    return largest_body + max(1 << 20, config.listen.max_frame_size)


def _delayed(handler: Callable[[Any], Any], delay: float) -> Callable[[Any], Any]:
    """The C agent's -t: each NOTIFY is handled, and acknowledged, `delay` seconds after it arrives
    (the agent stops reading a connection with max_inflight NOTIFYs waiting)."""
    if delay <= 0:
        return handler

    async def handle_later(message: Any) -> Any:
        await asyncio.sleep(delay)
        return handler(message)

    return handle_later

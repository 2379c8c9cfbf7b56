"""The agent's lifecycle: listen, serve, reload on SIGHUP, drain on SIGTERM.

SIGTERM: stop accepting, AGENT-DISCONNECT every SPOP connection (HAProxy moves to another agent),
send what is queued until the drain deadline, count the rest as `shutdown`, exit 0.
SIGHUP: load the config again and swap targets, sampling, filters, redaction and limits without
touching SPOP connections; a bad new config keeps the old one running and logs why.
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
from typing import Any

import structlog

import spoe

from . import systemd
from .admin import AdminServer
from .config import Config, load_config
from .errors import ConfigError
from .metrics import MirrorCollector, build_registry
from .mirror import Mirror

log = structlog.get_logger("spoa_mirror")


class App:
    def __init__(
        self,
        config: Config,
        *,
        config_path: str | None,
        overrides: dict[str, Any],
        worker: int = 0,
        ready_fd: int | None = None,
    ) -> None:
        """`ready_fd`: in a worker process, the pipe on which to tell the supervisor it listens (the
        supervisor, systemd's main PID, sends READY=1 once every worker has)."""
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
        )
        self.agent.set_default_handler(self.mirror.handle)
        self.ready_fd = ready_fd
        self.admin: AdminServer | None = None
        self.listening: list[tuple[str, int]] = []
        self._stop = asyncio.Event()
        self._ready = False

    async def run(self) -> int:
        listen = self.config.listen
        self.listening = await self.agent.start(
            listen.address,
            listen.port,
            reuse_port=listen.workers > 1,
            ssl=_server_tls(listen.tls) if listen.tls else None,
        )
        if self.config.admin.enabled:
            self.admin = AdminServer(self._registry(), lambda: self._ready)
            admin_address = self.admin.start(self.config.admin.address, self.config.admin.port + self.worker)
        else:
            admin_address = None
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self._ready = True
        systemd.notify("READY=1", f"STATUS=mirroring to {len(self.mirror.targets)} target(s)")
        if self.ready_fd is not None:
            os.write(self.ready_fd, b"1")
            os.close(self.ready_fd)
            self.ready_fd = None
        log.info(
            "agent.started",
            listen=[f"{host}:{port}" for host, port in self.listening],
            admin=None if admin_address is None else f"{admin_address[0]}:{admin_address[1]}",
            targets=[target.name for target in self.mirror.targets],
            worker=self.worker,
        )
        warn_readable_secrets(self.config)
        runtime = listen.runtime
        if runtime > 0:
            loop.call_later(runtime, self._stop.set)
        await self._stop.wait()
        return await self.shutdown()

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
        return 0

    def reload(self) -> None:
        """SIGHUP. Whatever goes wrong (a bad file, TLS material that does not load, a bug of ours)
        keeps the running config, is logged as config.reload_failed, and systemd hears READY=1
        again: a unit left "reloading" would block the next `systemctl reload`."""
        systemd.notify("RELOADING=1")
        try:
            config = load_config(self.config_path, self.overrides)
            self.mirror.apply(config, config.secrets.hmac_key)
        except ConfigError as error:
            log.error("config.reload_failed", error=str(error), kept="previous config")
        except Exception as error:
            log.error("config.reload_failed", error=repr(error), kept="previous config", exc_info=error)
        else:
            warn_readable_secrets(config)
            if config.listen != self.config.listen:
                log.warning("config.listen_changed", note="listener settings apply at the next restart")
            self.config = config
            log.info("config.reloaded", targets=[target.name for target in self.mirror.targets])
        systemd.notify("READY=1")

    def _registry(self) -> Any:
        mirror = self.mirror
        return build_registry(
            MirrorCollector(
                agent_stats=lambda: self.agent.stats,
                messages=lambda: mirror.messages,
                targets=lambda: mirror.target_stats,
                queue_depth=lambda: {target.name: len(target.queue) for target in mirror.targets},
                memory=lambda: (
                    mirror.budget.used(),
                    mirror.budget.limit,
                    {target.name: target.queued_bytes + target.pool.bytes_held for target in mirror.targets},
                ),
            )
        )


def warn_readable_secrets(config: Config) -> None:
    """`secrets.file_permissions: warn` (the default) lets a group- or world-readable key file
    through; it is logged, once per load, with what to do."""
    for key, path, mode in config.secrets.readable_files:
        log.warning("config.secret_file_readable", key=key, path=path, mode=mode, fix=f"chmod 600 {path}")


def reassembly_cap(config: Config) -> int:
    """A fragmented NOTIFY must fit the largest body a target accepts, plus headers and the other
    args (1 MiB of room): a lower cap would close the SPOP connection (status 13) on a body the
    config says to mirror, a higher one would let a peer make us hold more than we could use."""
    largest_body = max((target.max_body_size for target in config.targets), default=0)
    return largest_body + (1 << 20)


def _server_tls(tls: Any) -> ssl.SSLContext:
    """SPOP over TLS (HAProxy's `server ... ssl verify required ca-file ...`); with a CA file the
    agent also requires HAProxy's client certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.ca_file:
        context.load_verify_locations(tls.ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context

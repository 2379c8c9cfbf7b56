"""`-n N`: N worker processes, each serving the SPOP port from its own SO_REUSEPORT socket (the
kernel spreads HAProxy's connections over them), under a supervisor that is systemd's main PID.

The supervisor binds every socket (listeners.py: no other process may share the port), forks the
workers, forwards SIGTERM/SIGHUP, and restarts a worker that dies, after a back-off (0.5 s, doubling
to 30 s) that resets once a worker has run for a minute. A worker that dies `listen.worker_restarts`
times in a row is not restarted again: the supervisor logs `supervisor.gave_up`, stops the other
workers and exits 1, so systemd (Restart=on-failure) or an orchestrator sees the failure instead of a
port that silently serves fewer workers.

It alone speaks sd_notify: READY=1 once every worker said it listens (a byte on a pipe),
RELOADING=1/READY=1 around a forwarded SIGHUP, STOPPING=1, and, under `WatchdogSec=`, WATCHDOG=1
only while every worker's event loop pulses on the heartbeat pipe: one stuck worker stops the pings
and systemd restarts the service. It serves the admin port for all
workers: /metrics is every worker's page with a `worker` label, scraped from each worker's private
loopback admin socket at scrape time, plus the supervisor's own process metrics (worker="supervisor")
and its worker gauges.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog
from prometheus_client import PROCESS_COLLECTOR
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from . import systemd
from .admin import BACKLOG as ADMIN_BACKLOG
from .admin import AdminServer
from .app import PULSE_FORMAT, tick_interval
from .config import Config
from .errors import StartupError
from .listeners import bind_listener, inode
from .metrics import build_info

log = structlog.get_logger("spoa_mirror")

FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
STABLE_AFTER = 60.0  # a worker that ran this long before dying starts its back-off afresh
SCRAPE_TIMEOUT = 2.0


@dataclass
class Worker:
    index: int
    sock: socket.socket | None = None  # the supervisor's copy, closed once the worker has it
    inode: int = 0
    admin_port: int = 0
    pid: int = 0
    pidfd: int = -1
    started: float = 0.0
    crashes: int = 0  # in a row, each within STABLE_AFTER of its start
    restarts: int = 0
    restart_at: float | None = None
    last_status: int | None = None
    held: list[socket.socket] = field(default_factory=list)


ServeWorker = Callable[[int, socket.socket, socket.socket | None, Callable[[], None], int | None], int]


class Supervisor:
    def __init__(
        self,
        config: Config,
        sockets: list[socket.socket],
        admin_sock: socket.socket | None,
        serve: ServeWorker,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        """`sockets`: one bound SO_REUSEPORT listener per worker; `serve(index, sock, admin_sock,
        on_ready, heartbeat_fd)` runs a worker's agent in the forked child and returns its exit
        status."""
        self.config = config
        self.workers = [Worker(index, sock, inode(sock)) for index, sock in enumerate(sockets)]
        self.host, self.port = sockets[0].getsockname()[:2]
        self.admin_sock = admin_sock
        self.serve = serve
        self.on_ready = on_ready
        self.stopping = False
        self.gave_up = False
        self.watchdog = systemd.watchdog_interval()
        self.heartbeat_read, self.heartbeat_write = os.pipe() if self.watchdog is not None else (None, None)
        self.pulses = dict.fromkeys(range(len(self.workers)), time.monotonic())

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, self._forward)
        ready_read, ready_write = os.pipe()
        for worker in self.workers:
            self._spawn(worker, ready_write, ready_read)
        os.close(ready_write)
        self._wait_ready(ready_read)
        admin = None
        if self.admin_sock is not None:
            admin = AdminServer(self._registry(), self._all_running)
            admin.start(self.admin_sock)
        status = self._watch()
        if admin is not None:
            admin.stop()
        return status

    # -- workers ---------------------------------------------------------------------------------

    def _spawn(self, worker: Worker, ready_fd: int | None = None, close_fd: int | None = None) -> None:
        listen = self.config.listen
        if worker.sock is None:  # a restart: a fresh socket, checked like the first
            others = {w.inode for w in self.workers if w is not worker and w.pid}
            worker.sock = bind_listener(
                self.host,
                self.port,
                key="listen.port",
                backlog=listen.backlog,
                reuse_port=True,
                own_inodes=others,
            )
            worker.inode = inode(worker.sock)
        admin_sock = None
        if self.config.admin.enabled:
            admin_sock = bind_listener("127.0.0.1", 0, key="admin (worker)", backlog=ADMIN_BACKLOG)
            worker.admin_port = admin_sock.getsockname()[1]
        sock = worker.sock
        pid = os.fork()
        if pid == 0:
            self._become_worker(worker, sock, admin_sock, ready_fd, close_fd)
        worker.pid = pid
        worker.pidfd = os.pidfd_open(pid)
        worker.started = time.monotonic()
        self.pulses[worker.index] = worker.started  # a fresh worker gets a full interval to start
        worker.restart_at = None
        sock.close()
        worker.sock = None
        if admin_sock is not None:
            admin_sock.close()

    def _become_worker(
        self,
        worker: Worker,
        sock: socket.socket,
        admin_sock: socket.socket | None,
        ready_fd: int | None,
        close_fd: int | None,
    ) -> None:
        status = 1
        try:
            os.environ.pop("NOTIFY_SOCKET", None)
            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            # Another worker's socket held here would stay in the SO_REUSEPORT group after that
            # worker died, and be handed connections nobody accepts.
            for other in self.workers:
                if other.sock is not None and other.sock is not sock:
                    other.sock.close()
                if other.pidfd >= 0:
                    os.close(other.pidfd)
            if self.admin_sock is not None:
                self.admin_sock.close()
            if close_fd is not None:
                os.close(close_fd)
            if self.heartbeat_read is not None:
                os.close(self.heartbeat_read)

            def ready() -> None:
                if ready_fd is not None:
                    os.write(ready_fd, b"1")
                    os.close(ready_fd)

            status = self.serve(worker.index, sock, admin_sock, ready, self.heartbeat_write)
        finally:
            os._exit(status)

    def _wait_ready(self, ready_read: int) -> None:
        count = len(self.workers)
        ready = 0
        while ready < count:
            try:
                chunk = os.read(ready_read, count)
            except InterruptedError:
                continue
            if not chunk:
                break  # every worker exited before it was ready; _watch reports how
            ready += len(chunk)
        os.close(ready_read)
        if ready == count:
            systemd.notify("READY=1", f"STATUS={ready} workers")
            if self.on_ready is not None:
                self.on_ready()

    def _watch(self) -> int:
        """Reap workers and restart them on schedule, until all are gone; feed systemd's watchdog
        while every worker pulses."""
        status = 0
        tick = tick_interval() if self.watchdog is not None else None
        while any(worker.pid for worker in self.workers):
            now = time.monotonic()
            due = [w.restart_at - now for w in self.workers if w.restart_at is not None]
            if tick is not None:
                due.append(tick)
            timeout = None if not due else max(0.0, min(due))
            fds = [w.pidfd for w in self.workers if w.pid]
            if self.heartbeat_read is not None:
                fds.append(self.heartbeat_read)
            readable, _, _ = select.select(fds, [], [], timeout)
            if self.heartbeat_read is not None and self.heartbeat_read in readable:
                self._read_pulses()
            for worker in self.workers:
                if worker.pid and worker.pidfd in readable:
                    code = self._reap(worker)
                    if code != 0:
                        status = 1
            for worker in self.workers:
                if worker.restart_at is not None and self.stopping:
                    worker.restart_at = None
                elif worker.restart_at is not None and time.monotonic() >= worker.restart_at:
                    worker.restarts += 1
                    try:
                        self._spawn(worker)
                    except StartupError as error:
                        self.gave_up = True
                        log.error("supervisor.gave_up", worker=worker.index, error=str(error))
                        self._stop_all()
                        continue
                    log.info("supervisor.worker_restarted", worker=worker.index, pid=worker.pid)
            self._feed_watchdog()
        return 1 if self.gave_up else status

    def _read_pulses(self) -> None:
        assert self.heartbeat_read is not None
        data = os.read(self.heartbeat_read, 4096)
        now = time.monotonic()
        for (index,) in struct.iter_unpack(PULSE_FORMAT, data[: len(data) // 2 * 2]):
            self.pulses[index] = now

    def _feed_watchdog(self) -> None:
        if self.watchdog is None or self.stopping:
            return
        now = time.monotonic()
        if all(now - self.pulses[w.index] < self.watchdog for w in self.workers if w.pid):
            systemd.notify("WATCHDOG=1")

    def _reap(self, worker: Worker) -> int:
        _pid, wait_status = os.waitpid(worker.pid, 0)
        os.close(worker.pidfd)
        code = os.waitstatus_to_exitcode(wait_status)
        lived = time.monotonic() - worker.started
        worker.pid, worker.pidfd, worker.last_status = 0, -1, code
        if self.stopping or self.config.listen.runtime > 0:
            return code
        worker.crashes = worker.crashes + 1 if lived < STABLE_AFTER else 1
        limit = self.config.listen.worker_restarts
        if worker.crashes > limit:
            self.gave_up = True
            log.error(
                "supervisor.gave_up",
                worker=worker.index,
                exit_status=code,
                crashes=worker.crashes,
                note=f"worker {worker.index} died {worker.crashes} times in a row "
                f"(listen.worker_restarts: {limit}); stopping every worker",
            )
            self._stop_all()
            return code
        delay = min(FIRST_BACKOFF * 2 ** (worker.crashes - 1), MAX_BACKOFF)
        worker.restart_at = time.monotonic() + delay
        log.warning(
            "supervisor.worker_died",
            worker=worker.index,
            exit_status=code,
            ran=round(lived, 3),
            restart_in=delay,
        )
        return code

    def _stop_all(self) -> None:
        self.stopping = True
        systemd.notify("STOPPING=1")
        for worker in self.workers:
            worker.restart_at = None
            if worker.pid:
                os.kill(worker.pid, signal.SIGTERM)

    def _forward(self, signum: int, _frame: object) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self._stop_all()
            return
        systemd.notify("RELOADING=1")
        for worker in self.workers:
            if worker.pid:
                os.kill(worker.pid, signum)
        systemd.notify("READY=1")

    def _all_running(self) -> bool:
        return not self.stopping and all(worker.pid for worker in self.workers)

    # -- metrics ---------------------------------------------------------------------------------

    def _registry(self) -> CollectorRegistry:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(WorkersCollector(self))
        return registry


class WorkersCollector(Collector):
    """Every running worker's /metrics with a `worker` label, and the supervisor's own."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        failed = 0
        for worker in self.supervisor.workers:
            if not worker.pid or not worker.admin_port:
                continue
            url = f"http://127.0.0.1:{worker.admin_port}/metrics"
            try:
                with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT) as response:
                    text = response.read().decode()
            except OSError:
                failed += 1
                continue
            _merge(merged, text_string_to_metric_families(text), str(worker.index))
        _merge(merged, PROCESS_COLLECTOR.collect(), "supervisor")
        _merge(merged, [build_info()], "supervisor")
        yield from merged.values()
        yield from self._supervisor_families(failed)

    def _supervisor_families(self, failed: int) -> Iterator[Metric]:
        workers = self.supervisor.workers
        running = GaugeMetricFamily("spoa_mirror_workers", "Worker processes, by state", labels=["state"])
        running.add_metric(["configured"], len(workers))
        running.add_metric(["running"], sum(1 for worker in workers if worker.pid))
        yield running
        restarts = CounterMetricFamily(
            "spoa_mirror_worker_restarts", "Workers restarted after dying", labels=["worker"]
        )
        for worker in workers:
            restarts.add_metric([str(worker.index)], worker.restarts)
        yield restarts
        errors = GaugeMetricFamily(
            "spoa_mirror_worker_scrape_failures", "Running workers whose /metrics this scrape could not read"
        )
        errors.add_metric([], failed)
        yield errors


def _merge(merged: dict[str, Metric], families: Any, worker: str) -> None:
    for family in families:
        target = merged.get(family.name)
        if target is None:
            target = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
        for sample in family.samples:
            target.samples.append(sample._replace(labels={**sample.labels, "worker": worker}))

"""The capture writer: GoReplay payloads appended to rotating files by a thread of their own, so a
slow or full disk never holds the event loop (and with it every ACK).

It stands where a shadow target's connection pool stands (`submit(payload, done)`, `bytes_held`,
`close()`): the target's checks, sampling, redaction, rate limit, queue and memory budget work as
for a shadow, and what the writer holds (handed over, not yet written) counts in `bytes_held`, so
in the agent's MemoryBudget. The loop appends to a deque and sets an event; the thread takes
everything waiting, writes it with one `write` per batch, and hands the outcomes back in one
`call_soon_threadsafe` per batch: `written`, `disk_full` (ENOSPC, EDQUOT, or EFBIG from a file
size limit) or `write_error` (anything else: the directory gone, EIO). A batch that hits a full
disk is cut back to its last whole payload and retried one payload at a time, so a file never
holds half a payload and every payload that fitted is counted as written.

Files: `<prefix>-<UTC creation time>-<pid>.gor`, created 0600 (requests carry what clients sent),
rotated past `max_file_size` or `max_file_age`, then gzipped to `.gor.gz` by a second thread, so
compressing 64 MiB (about a second) does not stop the writing. Past `max_total_size` the oldest
finished files of this prefix are removed, counted in `files_removed` and `bytes_removed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gzip
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog

from spoe.log import LogThrottle

from .settings import CaptureSettings

log = structlog.get_logger("spoa_mirror")

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_COMPRESS_CHUNK = 1024 * 1024
# Fault injection for the tests' slow disk: seconds the writer thread stalls before each batch, as a
# write blocked in the kernel would (tests/test_capture_e2e.py). Unset in production.
SLOW_DISK_ENV = "SPOA_MIRROR_TEST_SLOW_DISK"
# How long closing waits for the last writes and the last file's compression.
CLOSE_TIMEOUT = 30.0
# How often the thread wakes with nothing to write: the granularity of age-based rotation.
_TICK = 1.0

Done = Callable[[Any, float], None]


class CaptureStats:
    """What the writer did beyond per-request outcomes (those are in the target's TargetStats)."""

    __slots__ = (
        "bytes_removed", "bytes_written", "compress_errors", "files_removed", "files_rotated", "responses",
    )  # fmt: skip

    def __init__(self) -> None:
        # The primary's responses, when recorded: written, disk_full, write_error, or not recorded:
        # unmatched (its request was not captured here), invalid, refused (intake full), dropped
        # (over the memory budget, or unredactable).
        self.responses: dict[str, int] = {}
        self.bytes_written = 0
        self.files_rotated = 0
        self.files_removed = 0
        self.bytes_removed = 0
        self.compress_errors = 0


class CaptureWriter:
    def __init__(self, name: str, settings: CaptureSettings, stats: CaptureStats | None = None) -> None:
        self.name = name
        self.settings = settings
        self.stats = stats or CaptureStats()
        self.bytes_held = 0
        self._waiting: deque[tuple[bytes, Done, float]] = deque()
        self._wake = threading.Event()
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._file: int | None = None
        self._path = ""
        self._size = 0
        self._opened = 0.0
        self._errors = LogThrottle()
        self._housekeeping: deque[str] = deque()
        self._housekeeping_wake = threading.Event()
        self._ignore_file_size_signal()
        self._thread = threading.Thread(target=self._run, name=f"capture-{name}", daemon=True)
        self._housekeeper = threading.Thread(target=self._keep_house, name=f"capture-gc-{name}", daemon=True)
        self._started = False
        self._stall = float(os.environ.get(SLOW_DISK_ENV) or 0)
        self._holding = False  # between hold_writes and release_writes
        self._wake_at_release = False

    @staticmethod
    def _ignore_file_size_signal() -> None:
        """Past a file size limit (RLIMIT_FSIZE) write() raises SIGXFSZ, whose default action kills
        the process; ignored, the write fails with EFBIG instead, counted as disk_full."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def submit(self, payload: bytes, done: Done, *, head: bool = False) -> None:
        if not self._started:
            self._loop = asyncio.get_running_loop()
            self._started = True
            self._thread.start()
            self._housekeeper.start()
        self.bytes_held += len(payload)
        self._waiting.append((payload, done, time.monotonic()))
        if self._holding:
            self._wake_at_release = True
        else:
            self._wake.set()

    def hold_writes(self) -> None:
        """Payloads submitted from now until `release_writes` wake the writer thread once, at release:
        the agent's intake, and `_settle` handing over what a written batch let through, submit
        several, and a wake per payload (the Event's notify, and a thread that contends for the GIL
        while the loop submits the rest) cost bench/capture_bench.py's capture step 6.5k
        instructions a request, 4.5% (callgrind)."""
        self._holding = True

    def release_writes(self) -> None:
        self._holding = False
        if self._wake_at_release:
            self._wake_at_release = False
            self._wake.set()

    async def close(self) -> None:
        """Write what was handed over, close and compress the last file (for at most
        CLOSE_TIMEOUT); what the target still queues was counted by its drain."""
        if not self._started:
            return
        self._closing = True
        self._wake.set()
        joined = asyncio.get_running_loop().run_in_executor(None, self._join)
        try:
            await asyncio.wait_for(joined, CLOSE_TIMEOUT)
        except TimeoutError:  # a hung disk must not hang the shutdown: the threads are daemons
            log.warning(
                "capture.close_timeout", target=self.name, seconds=CLOSE_TIMEOUT, path=self._path or None
            )

    def _join(self) -> None:
        self._thread.join()
        self._housekeeping_wake.set()
        self._housekeeper.join()

    # The writer thread.

    def _run(self) -> None:
        waiting = self._waiting
        while True:
            self._wake.wait(_TICK)
            self._wake.clear()
            batch = []
            while waiting:
                batch.append(waiting.popleft())
            if batch:
                outcomes = self._write_batch([payload for payload, _, _ in batch])
                assert self._loop is not None
                try:
                    self._loop.call_soon_threadsafe(self._settle, batch, outcomes)
                except RuntimeError:  # the loop is closed: nobody is waiting for these any more
                    return
            if self._file is not None and (
                self._size >= self.settings.max_file_size
                or time.monotonic() - self._opened >= self.settings.max_file_age
            ):
                self._rotate()
            if self._closing and not waiting:
                if self._file is not None:
                    self._rotate()
                return

    def _settle(self, batch: list[tuple[bytes, Done, float]], outcomes: list[str]) -> None:
        """On the loop: every payload of a batch to its target's callback."""
        now = time.monotonic()
        released = 0
        self.hold_writes()  # the callbacks submit the next payloads: one wake for all of them
        try:
            for (payload, done, submitted), outcome in zip(batch, outcomes, strict=True):
                released += len(payload)
                done(outcome, now - submitted)
        finally:
            self.release_writes()
        self.bytes_held -= released

    def _write_batch(self, payloads: list[bytes]) -> list[str]:
        if self._stall:
            time.sleep(self._stall)
        try:
            fd = self._current_file()
        except OSError as error:
            return [self._failure(error, "open")] * len(payloads)
        data = b"".join(payloads)
        before = self._size
        try:
            self._write_all(fd, data)
        except OSError as error:
            if error.errno not in DISK_FULL_ERRNOS:
                self._cut_back(fd, before)
                return [self._failure(error, "write")] * len(payloads)
            self._cut_back(fd, before)
            return [self._write_one(fd, payload) for payload in payloads]
        self._size += len(data)
        self.stats.bytes_written += len(data)
        return ["written"] * len(payloads)

    def _write_one(self, fd: int, payload: bytes) -> str:
        before = self._size
        try:
            self._write_all(fd, payload)
        except OSError as error:
            self._cut_back(fd, before)
            return self._failure(error, "write")
        self._size += len(payload)
        self.stats.bytes_written += len(payload)
        return "written"

    @staticmethod
    def _write_all(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def _cut_back(self, fd: int, size: int) -> None:
        """A failed write may have left part of a payload: the file ends at its last whole one."""
        try:
            os.ftruncate(fd, size)
            os.lseek(fd, size, os.SEEK_SET)
        except OSError as error:
            self._log("capture.truncate_failed", "truncate", path=self._path, error=str(error))

    def _failure(self, error: OSError, action: str) -> str:
        outcome = "disk_full" if error.errno in DISK_FULL_ERRNOS else "write_error"
        self._log(
            "capture.write_failed", outcome, outcome=outcome, action=action, path=self._path or None,
            error=error.strerror or str(error),
        )  # fmt: skip
        return outcome

    def _log(self, event: str, key: str, **fields: Any) -> None:
        suppressed = self._errors.allow(key)
        if suppressed is not None:
            log.warning(event, target=self.name, suppressed=suppressed, **fields)

    def _current_file(self) -> int:
        if self._file is None:
            directory = self.settings.directory
            os.makedirs(directory, mode=0o700, exist_ok=True)
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            base = f"{self.settings.prefix}-{stamp}.{time.time_ns() % 1_000_000_000:09d}Z-{os.getpid()}"
            path = os.path.join(directory, base + ".gor")
            self._file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            self._path, self._size, self._opened = path, 0, time.monotonic()
        return self._file

    def _rotate(self) -> None:
        fd, path = self._file, self._path
        self._file, self._path = None, ""
        assert fd is not None
        try:
            os.close(fd)
        except OSError as error:
            self._log("capture.close_failed", "close", path=path, error=str(error))
        self.stats.files_rotated += 1
        self._housekeeping.append(path)
        self._housekeeping_wake.set()

    # The housekeeping thread: compression and the total cap, off the writer's path.

    def _keep_house(self) -> None:
        while True:
            self._housekeeping_wake.wait(_TICK)
            self._housekeeping_wake.clear()
            while self._housekeeping:
                path = self._housekeeping.popleft()
                if self.settings.compress:
                    self._compress(path)
                self._enforce_total_size()
            if not self._thread.is_alive() and not self._housekeeping:
                return

    def _compress(self, path: str) -> None:
        target = path + ".gz"
        partial = target + ".part"
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with (
                open(path, "rb") as source,
                open(fd, "wb") as raw,
                gzip.GzipFile(
                    filename=os.path.basename(path), fileobj=raw, mode="wb", compresslevel=6
                ) as compressed,
            ):
                while chunk := source.read(_COMPRESS_CHUNK):
                    compressed.write(chunk)
            os.rename(partial, target)
            os.unlink(path)
        except OSError as error:
            # Left as it was: the uncompressed file is a complete capture still.
            self.stats.compress_errors += 1
            self._log("capture.compress_failed", "compress", path=path, error=error.strerror or str(error))
            with contextlib.suppress(OSError):
                os.unlink(partial)

    def _enforce_total_size(self) -> None:
        """Oldest finished files of this prefix go until the directory's capture holds at most
        max_total_size (the file being written counts, and is never removed)."""
        directory, prefix = self.settings.directory, self.settings.prefix + "-"
        try:
            names = sorted(
                name for name in os.listdir(directory)
                if name.startswith(prefix) and name.endswith((".gor", ".gor.gz"))
            )  # fmt: skip
        except OSError:
            return
        sizes = []
        for name in names:
            try:
                sizes.append((name, os.stat(os.path.join(directory, name)).st_size))
            except OSError:
                continue
        total = sum(size for _, size in sizes)
        current = os.path.basename(self._path)
        for name, size in sizes:
            if total <= self.settings.max_total_size:
                break
            if name == current:
                continue
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:
                continue
            total -= size
            self.stats.files_removed += 1
            self.stats.bytes_removed += size
            log.info(
                "capture.file_removed", target=self.name, file=name, size=size,
                files_removed=self.stats.files_removed, reason="max_total_size",
            )  # fmt: skip

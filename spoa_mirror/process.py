"""The C agent's process flags: -F pidfile, -l [MODE:]FILE log file, -D daemonize.

They behave as the C agent's do (src/util.c there), with two differences a service manager notices:
the daemonizing parent exits only once the daemon listens (0) or has failed (its exit status), so
`spoa-mirror -D ... && next-step` never runs next-step against an agent that is not there; and a
pidfile left by a process that no longer runs is replaced instead of refused.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys

from .errors import StartupError

LOG_MODES = {"a": os.O_APPEND, "w": os.O_TRUNC}  # a capital letter asks for line buffering too


def open_logfile(spec: str) -> None:
    """`-l [MODE:]FILE`: stdout and stderr go to FILE from now on. Mode a appends, w truncates; no
    mode creates the file and refuses one that exists (the C agent's O_EXCL). Every log event is
    one line written and flushed at once, so the capital (line-buffered) modes mean the same."""
    flags = os.O_WRONLY | os.O_CREAT
    path = spec
    if len(spec) > 2 and spec[1] == ":":
        mode = spec[0].lower()
        if mode not in LOG_MODES:
            raise StartupError("-l/--logfile", f"unknown mode {spec[0]!r} in {spec!r}: use a, A, w or W")
        flags |= LOG_MODES[mode]
        path = spec[2:]
    else:
        flags |= os.O_EXCL
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as error:
        hint = " (give a mode: a:FILE appends, w:FILE truncates)" if error.errno == errno.EEXIST else ""
        raise StartupError("-l/--logfile", f"cannot open {path}: {error.strerror}{hint}") from None
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


class Pidfile:
    """`-F FILE`: created before the agent starts (so a path that cannot be written is an error
    before anything listens), the PID written once it is known (after -D), removed at exit."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            self._fd = self._take_over_stale()
        except OSError as error:
            raise StartupError("-F/--pidfile", f"cannot create {self.path}: {error.strerror}") from None

    def _take_over_stale(self) -> int:
        try:
            with open(self.path) as existing:
                pid = int(existing.read().strip() or 0)
        except (OSError, ValueError):
            pid = 0
        if pid > 0 and _alive(pid):
            raise StartupError("-F/--pidfile", f"{self.path} names process {pid}, which is running")
        try:
            return os.open(self.path, os.O_WRONLY | os.O_TRUNC)
        except OSError as error:
            raise StartupError("-F/--pidfile", f"cannot write {self.path}: {error.strerror}") from None

    def write(self) -> None:
        os.write(self._fd, f"{os.getpid()}\n".encode())
        os.close(self._fd)
        self._fd = -1
        self._owner = os.getpid()

    def remove(self) -> None:
        """Only by the process that wrote it (not by a forked worker)."""
        if getattr(self, "_owner", None) == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Daemon:
    """`-D`: fork, new session, fork again, chdir /, stdin from /dev/null and, unless -l sent them
    to a file, stdout and stderr too (the C agent's daemonize). Everything that can go wrong with
    the command line, the config, the ports or the files has been reported before this point.

    The original process waits on a pipe: `ready()` in the daemon makes it exit 0, `failed(status)`
    (or the daemon dying first) makes it exit with that status. One line on the pipe, so the
    workers of a -n daemon, which inherit it, cannot keep it waiting."""

    def __init__(self, keep_output: bool) -> None:
        read_end, self._write_end = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() > 0:
            os.close(self._write_end)
            answer = b""
            while b"\n" not in answer and (chunk := os.read(read_end, 16)):
                answer += chunk
            line = answer.split(b"\n", 1)[0]
            os._exit(0 if line == b"ready" else int(line or b"1"))
        os.close(read_end)
        os.setsid()
        if os.fork() > 0:
            os._exit(0)
        os.chdir("/")
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        if not keep_output:
            os.dup2(null, 1)
            os.dup2(null, 2)
        os.close(null)

    def ready(self) -> None:
        self._answer(b"ready")

    def failed(self, status: int) -> None:
        self._answer(str(status or 1).encode())

    def _answer(self, line: bytes) -> None:
        if self._write_end >= 0:
            os.write(self._write_end, line + b"\n")
            os.close(self._write_end)
            self._write_end = -1

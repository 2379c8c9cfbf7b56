"""Command-line arguments: every flag of the C agent's `--help`, with its meaning, units and
defaults, so an existing `spoa-mirror -r0 -u URL ...` command line (systemd unit, container
entrypoint) keeps working; plus a config file and `check-config`.

    spoa-mirror [run] [--config FILE] [C agent flags]...
    spoa-mirror check-config FILE [the flags that change the configuration]
    spoa-mirror config-schema   (the config file's JSON Schema, for editors)

Times are the C agent's: milliseconds unless suffixed with us, ms, s, m, h or d (`-r 5000` is five
seconds). Capability and libev backend names are case-insensitive, as there. Flags override the file
(see `config.load_config`); `check-config` takes them too, so it checks exactly what `run` with the
same flags would load. Values are checked here with the config's own parsers, so a bad one exits with
argparse's usage error (status 2) before anything starts. Where this agent differs on purpose, the
difference is in C_AGENT_DIFFERENCES, logged at start when the flag was not given.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import Any

from spoe.connection import CAPABILITIES

from . import __version__
from .compare.cli import report_parser
from .config import LOG_FORMATS, LOG_LEVELS, OVERRIDE_KEYS, parse_size
from .config_doc import help_text
from .errors import ConfigError

PROG = "spoa-mirror"
LIBEV_BACKENDS = ("select", "poll", "epoll", "linuxaio", "kqueue", "devpoll", "port", "iouring")
_C_TIME = re.compile(r"(\d+)(us|ms|s|m|h|d)?")
_C_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, None: 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
DEBUG_LEVEL_RANGE = (-1, 511)  # the C agent's debug builds: a bit mask, -1 for all

# flag -> (what this agent does when it is not given, what the C agent does), for the start-up log.
C_AGENT_DIFFERENCES = {
    "-a": ("listens on 127.0.0.1", "0.0.0.0"),
    "-n": ("1 worker process (-n N forks N processes)", "10 worker threads"),
    "-b": ("backlog 1024", "10"),
    "-c": ("announces fragmentation, pipelining and async", "announces none"),
    "-r": ("runs until stopped", "refuses to start without -r"),
}


def parse_args(argv: list[str]) -> tuple[str, argparse.Namespace]:
    """(command, options): "run" unless argv starts with "check-config", "config-schema" or "report";
    a leading "run" is optional because the C agent has no subcommands."""
    if argv and argv[0] == "check-config":
        return "check-config", _check_config_parser().parse_args(argv[1:])
    if argv and argv[0] == "config-schema":
        return "config-schema", _config_schema_parser().parse_args(argv[1:])
    if argv and argv[0] == "report":
        return "report", report_parser(PROG).parse_args(argv[1:])
    if argv and argv[0] == "run":
        argv = argv[1:]
    return "run", _run_parser().parse_args(argv)


def overrides_from_args(ns: argparse.Namespace) -> dict[str, Any]:
    """The flags given, as `load_config` overrides (flags left out do not override the file)."""
    overrides = {key: value for key in OVERRIDE_KEYS if (value := getattr(ns, key, None)) is not None}
    if getattr(ns, "debug", None) is not None and "log_level" not in overrides:
        overrides["log_level"] = "debug"
    return overrides


def c_time(low: float, high: float) -> Callable[[str], float]:
    """An argparse `type` for the C agent's TIME: an integer in milliseconds, or with a unit; the
    result in seconds, within [low, high] seconds as there."""

    def convert(text: str) -> float:
        match = _C_TIME.fullmatch(text.strip())
        if match is None:
            raise argparse.ArgumentTypeError(
                f"invalid time {text!r}: milliseconds, or a number with us, ms, s, m, h or d"
            )
        seconds = int(match[1]) * _C_TIME_UNITS[match[2]]
        if not low <= seconds <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is outside the allowed {low:g} s to {high:g} s")
        return seconds

    return convert


def _run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        parents=[_override_flags()],
        description="HAProxy SPOE agent that mirrors requests to shadow HTTP backends.",
        epilog=(
            f"Check a config without running: {PROG} check-config FILE. "
            "TIME is in milliseconds unless suffixed with us, ms, s, m, h or d (as the C agent). "
            "Log file modes: a appends, w truncates; no mode creates a new file (capital A and W: "
            "the same, every line is flushed anyway)."
        ),
    )
    parser.add_argument("--config", metavar="FILE", help="YAML configuration file (flags override it)")
    parser.add_argument("-V", "--version", action="version", version=f"{PROG} {__version__}")
    process = parser.add_argument_group("process (the C agent's)")
    process.add_argument("-D", "--daemonize", action="store_true", help="run in the background")
    process.add_argument("-F", "--pidfile", metavar="FILE", help="write the process id to FILE")
    process.add_argument(
        "-l", "--logfile", metavar="[MODE:]FILE", help="log to FILE (default: stderr); MODE a or w"
    )
    process.add_argument(
        "-B",
        "--libev-backend",
        type=str.lower,
        choices=LIBEV_BACKENDS,
        metavar="TYPE",
        help="accepted and ignored: this agent runs on asyncio (uvloop, epoll)",
    )
    return parser


def _check_config_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} check-config",
        parents=[_override_flags()],
        description="Validate a configuration and describe what the agent would do with it.",
        epilog=help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", metavar="FILE", help="YAML configuration file")
    return parser


def _config_schema_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=f"{PROG} config-schema",
        description="Print the config file's JSON Schema (also shipped as docs/config.schema.json), for "
        "editors: yaml-language-server (VS Code's YAML extension and others) completes and checks a "
        "file that starts with `# yaml-language-server: $schema=URL-or-path`.",
    )


def _override_flags() -> argparse.ArgumentParser:
    """The flags both commands share; `dest` names are the `load_config` override keys."""
    flags = argparse.ArgumentParser(add_help=False)
    group = flags.add_argument_group("overrides (win over the config file)")
    group.add_argument("-a", "--address", metavar="NAME", help="address to listen on (default 127.0.0.1)")
    group.add_argument("-p", "--port", type=int, metavar="VALUE", help="SPOP port (default 12345)")
    group.add_argument(
        "-u",
        "--mirror-url",
        dest="mirror_urls",
        action="append",
        metavar="URL",
        help="mirror to this URL; repeat for several; replaces the config file's targets",
    )
    group.add_argument(
        "-m",
        "--max-frame-size",
        type=_flag_value(parse_size),
        metavar="VALUE",
        help="largest SPOP frame, in bytes (default 16384)",
    )
    group.add_argument(
        "-c",
        "--capability",
        dest="capabilities",
        action="append",
        type=str.lower,
        choices=sorted(CAPABILITIES),
        metavar="NAME",
        help="announce only the capabilities named (fragmentation, pipelining, async); repeat for several",
    )
    group.add_argument(
        "-n", "--num-workers", dest="workers", type=int, metavar="VALUE", help="worker processes (default 1)"
    )
    group.add_argument(
        "-r",
        "--runtime",
        type=c_time(0, 7 * 86400),
        metavar="TIME",
        help="stop after TIME (default 0: run until stopped)",
    )
    group.add_argument(
        "-b", "--connection-backlog", dest="backlog", type=int, metavar="VALUE", help="listen backlog (1024)"
    )
    group.add_argument(
        "-t",
        "--processing-delay",
        dest="processing_delay",
        type=c_time(0, 1),
        metavar="TIME",
        help="wait TIME before handling each message (default 0)",
    )
    group.add_argument(
        "-i",
        "--monitor-interval",
        dest="monitor_interval",
        type=c_time(1, 3600),
        metavar="TIME",
        help="log each worker's state (debug level) every TIME (default 5s)",
    )
    group.add_argument(
        "-I",
        "--mirror-interface",
        dest="outgoing_address",
        metavar="NAME",
        help="source interface or address of connections to the shadows",
    )
    group.add_argument(
        "-P",
        "--mirror-local-port",
        dest="outgoing_ports",
        metavar="VALUE",
        help="source port or range LOW-HIGH of connections to the shadows",
    )
    group.add_argument(
        "-d",
        "--debug",
        type=_debug_level,
        metavar="LEVEL",
        help="log at debug level (the C agent's debug mask, -1 to 511, is accepted)",
    )
    group.add_argument("--log-format", choices=LOG_FORMATS, help="log format (default auto)")
    group.add_argument("--log-level", choices=LOG_LEVELS, help="log level (default info)")
    return flags


def _debug_level(text: str) -> int:
    low, high = DEBUG_LEVEL_RANGE
    try:
        level = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid debug level {text!r}") from None
    if not low <= level <= high:
        raise argparse.ArgumentTypeError(f"debug level {level} is outside {low} to {high}")
    return level


def _flag_value(parse: Callable[[str, str], Any]) -> Callable[[str], Any]:
    """An argparse `type` from a config parser, so flags and the file accept the same spellings."""

    def convert(text: str) -> Any:
        try:
            return parse(text, "flag")
        except ConfigError as error:
            raise argparse.ArgumentTypeError(error.problem) from None

    return convert

"""Command-line arguments: the C agent's flags, so an existing `spoa-mirror -u URL ...` command line
(systemd unit, container entrypoint) keeps working, plus a config file and `check-config`.

    spoa-mirror [run] [--config FILE] [-a ADDR] [-p PORT] [-u URL]... [-m SIZE] [-c CAP]... [-n N] [-r TIME]
    spoa-mirror check-config FILE [same flags]

Flags override the file (see `config.load_config`); `check-config` takes them too, so it checks
exactly what `run` with the same flags would load. Values are checked here with the config's own
parsers, so a bad one exits with argparse's usage error (status 2) before anything starts.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from spoe.connection import CAPABILITIES

from .config import LOG_FORMATS, LOG_LEVELS, OVERRIDE_KEYS, parse_duration, parse_size
from .errors import ConfigError

PROG = "spoa-mirror"


def parse_args(argv: list[str]) -> tuple[str, argparse.Namespace]:
    """(command, options): "run" unless argv starts with "check-config"; a leading "run" is optional
    because the C agent has no subcommands."""
    if argv and argv[0] == "check-config":
        return "check-config", _check_config_parser().parse_args(argv[1:])
    if argv and argv[0] == "run":
        argv = argv[1:]
    return "run", _run_parser().parse_args(argv)


def overrides_from_args(ns: argparse.Namespace) -> dict[str, Any]:
    """The flags given, as `load_config` overrides (flags left out do not override the file)."""
    return {key: value for key in OVERRIDE_KEYS if (value := getattr(ns, key, None)) is not None}


def _run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        parents=[_override_flags()],
        description="HAProxy SPOE agent that mirrors requests to shadow HTTP backends.",
        epilog=f"Check a config without running: {PROG} check-config FILE",
    )
    parser.add_argument("--config", metavar="FILE", help="YAML configuration file (flags override it)")
    return parser


def _check_config_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} check-config",
        parents=[_override_flags()],
        description="Validate a configuration and describe what the agent would do with it.",
    )
    parser.add_argument("config", metavar="FILE", help="YAML configuration file")
    return parser


def _override_flags() -> argparse.ArgumentParser:
    """The flags both commands share; `dest` names are the `load_config` override keys."""
    flags = argparse.ArgumentParser(add_help=False)
    group = flags.add_argument_group("overrides (win over the config file)")
    group.add_argument("-a", "--address", metavar="ADDR", help="address to listen on (default 127.0.0.1)")
    group.add_argument("-p", "--port", type=int, metavar="PORT", help="SPOP port (default 12345)")
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
        metavar="SIZE",
        help="largest SPOP frame, in bytes (default 16384)",
    )
    group.add_argument(
        "-c",
        "--capability",
        dest="capabilities",
        action="append",
        choices=sorted(CAPABILITIES),
        help="announce only the capabilities named; repeat for several (default all)",
    )
    group.add_argument(
        "-n", "--num-workers", dest="workers", type=int, metavar="N", help="worker processes (default 1)"
    )
    group.add_argument(
        "-r",
        "--runtime",
        type=_flag_value(lambda value, key: parse_duration(value, key, allow_zero=True)),
        metavar="TIME",
        help='stop after this long, in seconds or like "10m" (default 0: run until stopped)',
    )
    group.add_argument("--log-format", choices=LOG_FORMATS, help="log format (default auto)")
    group.add_argument("--log-level", choices=LOG_LEVELS, help="log level (default info)")
    return flags


def _flag_value(parse: Callable[[str, str], Any]) -> Callable[[str], Any]:
    """An argparse `type` from a config parser, so flags and the file accept the same spellings."""

    def convert(text: str) -> Any:
        try:
            return parse(text, "flag")
        except ConfigError as error:
            raise argparse.ArgumentTypeError(error.problem) from None

    return convert

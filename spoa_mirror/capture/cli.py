"""The `replay` and `capture-info` subcommands.

Exit status of `replay`: 0 when the replay ran and the target answered (with `--compare`, and the
verdict passed); 1 when it could not be reached (requests went out, none got a response) or the
verdict failed; 3 when the verdict is undecided (fewer comparisons than its goals ask for); 2 for
bad flags or options, or no input at all; 130 when stopped by Ctrl-C (after the summary of what was
sent). Damaged input is reported (file and byte offset) and
skipped; it does not by itself fail the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import yaml

from ..errors import ConfigError
from ..logs import configure
from .info import capture_info, format_info
from .replay import ReplayOptions, ReplaySummary, format_summary, replay

FILES_HELP = "capture files (.gor, .gor.gz) or directories"


def main(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    if command == "capture-info":
        return _capture_info(rest)
    return _replay(rest)


def _capture_info(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="spoa-mirror capture-info", description=__doc__)
    parser.add_argument("files", nargs="+", metavar="FILE", help=FILES_HELP)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    options = parser.parse_args(argv)
    info = capture_info(options.files, on_error=lambda text: print(f"spoa-mirror: {text}", file=sys.stderr))
    print(json.dumps(info.as_dict(), indent=2) if options.json else format_info(info))
    return 0 if info.requests or info.responses else 2


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {text}")
    return value


def _replay_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spoa-mirror replay",
        description="Send the requests of capture files to a server again, in timestamp order.",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help=FILES_HELP)
    parser.add_argument("--to", required=True, metavar="URL", help="where to send them (http or https URL)")
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--speed", type=_positive, default=1.0, help="time factor: 2 replays twice as fast")
    pace.add_argument("--rate", type=_positive, help="fixed requests per second, timestamps ignored")
    parser.add_argument("--loop", action="store_true", help="start over at the end (bound it with --limit)")
    parser.add_argument("--limit", type=_count, help="stop after this many requests")
    parser.add_argument("--duration", type=_positive, help="stop after this many seconds")
    parser.add_argument("--protocol", choices=("http1", "h2", "h2c", "auto"), help="as a target's protocol")
    parser.add_argument("--concurrency", type=_count, help="connections at most (default 64)")
    parser.add_argument("--timeout", type=_positive, help="seconds per request (default 5)")
    parser.add_argument(
        "--host",
        choices=("target", "original", "suffix"),
        help="Host sent: the URL's (default), the recorded one",
    )
    parser.add_argument(
        "--target-config",
        metavar="YAML",
        help="a file with one target's keys (filters, methods, sample_percentage, headers, remove_headers, "
        "path_rewrite, redact, rate_limit, tls_verify, ...), as in the agent's config, without url",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="compare each response with the primary's recorded beside its request (capture.responses)",
    )
    parser.add_argument(
        "--compare-config",
        metavar="YAML",
        help="compare keys: ignore, noise, goals, body_limit",
    )
    parser.add_argument(
        "--report",
        metavar="HTML",
        default="replay-report.html",
        help="the HTML report file",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _target_keys(options: argparse.Namespace) -> dict[str, Any]:
    keys: dict[str, Any] = {}
    if options.target_config:
        loaded = _yaml_mapping(options.target_config, "--target-config")
        for forbidden in ("url", "upstream", "capture", "name"):
            if forbidden in loaded:
                raise ConfigError(f"--target-config.{forbidden}", "is set by replay (--to)")
        keys.update(loaded)
    for flag in ("protocol", "concurrency", "timeout", "host"):
        if (value := getattr(options, flag)) is not None:
            keys[flag] = value
    return keys


def _compare_keys(options: argparse.Namespace) -> dict[str, Any] | None:
    if not options.compare:
        if options.compare_config:
            raise ConfigError("--compare-config", "needs --compare")
        return None
    if not options.compare_config:
        return {}
    loaded = _yaml_mapping(options.compare_config, "--compare-config")
    if "candidates" in loaded or "baseline" in loaded:
        raise ConfigError("--compare-config", "candidates and baseline are set by replay (the --to server)")
    return loaded


def _yaml_mapping(path: str, flag: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as file:
            loaded = yaml.safe_load(file)
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(flag, f"cannot read {path}: {error}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(flag, f"{path} must hold a mapping")
    return loaded


def _replay(argv: list[str]) -> int:
    options = _replay_parser().parse_args(argv)
    # The target's per-request warnings (send failed, circuit opened) are what the summary counts;
    # logged too, they would bury it. stdout stays the summary's alone (--json).
    configure("console", "error")
    try:
        replay_options = ReplayOptions(
            files=options.files,
            to=options.to,
            speed=options.speed,
            rate=options.rate,
            loop=options.loop,
            limit=options.limit,
            duration=options.duration,
            target=_target_keys(options),
            compare=_compare_keys(options),
        )
        from .replay import compare_config, target_config

        target_config(replay_options)  # a bad option fails here, before any file is read
        if replay_options.compare is not None:
            compare_config(replay_options)
    except ConfigError as error:
        key = error.key.replace("targets[0].", "").replace("targets[0]", "--to")
        print(f"spoa-mirror: replay: {key}: {error.problem}", file=sys.stderr)
        return 2

    def input_error(text: str) -> None:
        print(f"spoa-mirror: {text}", file=sys.stderr)

    show_progress = not options.quiet and not options.json and sys.stderr.isatty()
    summary = _run(replay_options, input_error, show_progress)
    report = summary.compare_report
    if report is not None:
        from ..compare.render import render_terminal, write_html

        write_html(report, options.report)
        if not options.json:
            render_terminal(report)
            print(f"report: {options.report}")
    if options.json:
        print(json.dumps(summary.as_dict(), indent=2))
    else:
        print(format_summary(summary, options.to))
    if summary.read == 0 and not summary.input_errors:
        return 2
    if summary.unreachable():
        return 1
    if summary.interrupted:
        return 130
    if report is not None:
        return {"pass": 0, "fail": 1}.get(report["verdict"]["state"], 3)
    return 0


def _run(options: ReplayOptions, input_error: Any, show_progress: bool) -> ReplaySummary:
    if not show_progress:
        return _run_loop(replay(options, on_input_error=input_error))
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("replay"),
        BarColumn(),
        TextColumn("{task.completed} sent, {task.fields[responded]} answered, {task.fields[failed]} failed"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task("replay", total=options.limit, responded=0, failed=0)

        def update(summary: ReplaySummary) -> None:
            progress.update(
                task,
                completed=summary.offered,
                responded=summary.responded,
                failed=sum(summary.errors.values()),
            )

        def error(text: str) -> None:
            progress.console.print(f"spoa-mirror: {text}", markup=False, highlight=False)

        return _run_loop(replay(options, on_progress=update, on_input_error=error))


def _run_loop(coroutine: Any) -> ReplaySummary:
    """On asyncio's own loop, not uvloop: libuv's clock and timers have a resolution of 1 ms, which
    made every latency on loopback 0 or 1 ms and held `--speed 1` to the millisecond."""
    return asyncio.run(coroutine)

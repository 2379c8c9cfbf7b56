"""`spoa-mirror report`: the comparison report of a running agent, as terminal tables.

    spoa-mirror report [--admin URL] [--json] [--html FILE]

Reads `/compare` from the agent's admin listener (default http://127.0.0.1:9180, the admin default;
`--admin` for another, e.g. a port-forwarded pod) and prints the verdict, one row per endpoint and the
regressions with an example each. Exit status: 0 pass, 1 fail, 3 undecided (not enough comparisons
yet), 2 when the report cannot be had (agent unreachable, no `compare:` section), so a script can
gate on it as on /verdict.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request

from .render import render_terminal, write_html

DEFAULT_ADMIN = "http://127.0.0.1:9180"
EXIT = {"pass": 0, "fail": 1, "undecided": 3}
TIMEOUT = 10.0


def report_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{prog} report",
        description="Show a running agent's comparison report (the compare: section) as tables.",
        epilog="Exit status: 0 pass, 1 fail, 3 undecided, 2 no report.",
    )
    parser.add_argument(
        "--admin", default=DEFAULT_ADMIN, metavar="URL", help=f"admin listener (default {DEFAULT_ADMIN})"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead")
    parser.add_argument("--html", metavar="FILE", help="also write the report as a self-contained HTML file")
    return parser


def report_main(options: argparse.Namespace) -> int:
    url = options.admin.rstrip("/") + "/compare"
    if "://" not in url:
        url = "http://" + url
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as answer:
            report = json.load(answer)
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace").strip()
        print(f"spoa-mirror: {url}: {error.code} {detail}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as error:
        print(f"spoa-mirror: cannot read {url}: {error}", file=sys.stderr)
        return 2
    if options.html:
        write_html(report, options.html)
    if options.json:
        print(json.dumps(report, indent=1))
    else:
        render_terminal(report)
    return EXIT[report["verdict"]["state"]]

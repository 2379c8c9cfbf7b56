"""The compare report page in a real headless Chromium (Debian's `chromium`): the DOM it renders and a
screenshot, for tests that load the page from a live admin listener (tests/test_compare_report.py,
and the end-to-end test through HAProxy)."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TIMEOUT = 90


def available() -> bool:
    return Path(CHROMIUM).exists()


def _browser(profile: Path) -> list[str]:
    return [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}"]


def dump_dom(url: str, scratch: Path) -> str:
    """The page's DOM after Chromium loaded and rendered it."""
    done = subprocess.run(
        [*_browser(scratch / "chromium-profile"), "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def screenshot(url: str, path: Path, scratch: Path, size: str = "1280,1500") -> None:
    done = subprocess.run(
        [*_browser(scratch / "chromium-profile"), "--hide-scrollbars", f"--window-size={size}",
         f"--screenshot={path}", url],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert done.returncode == 0 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", done.stderr[-2000:]


def endpoint_row(page: str, endpoint: str) -> str:
    """The endpoints table's row of `endpoint` (its opening tag first, so `'bad' in row.split('>')[0]`
    tells whether it is marked)."""
    rows = page.split("<tr")
    return next(row for row in rows if f">{endpoint}<" in row and "<td" in row and "rowspan" not in row)


def regressions(page: str) -> set[str]:
    """The fields the page marks as regressions (badges in the endpoints table and field tables)."""
    marker = '<span class="badge regression">'
    return {part.split("<", 1)[0] for part in page.split(marker)[1:] if not part.startswith("regression<")}


def judged_fields(page: str) -> set[tuple[str, str]]:
    """(field, judgement) of each row of the field tables, where the page shows a field's judgement
    beside its evidence and examples (`regressions` reads the endpoints table's top-field badges)."""
    pattern = (
        r'class="mono">([^<]*)<div class="muted">[^<]*</div></td><td rowspan="\d+"><span class="badge (\w+)">'
    )
    return {(html.unescape(field), judgement) for field, judgement in re.findall(pattern, page)}


def example_pairs(page: str, where: str) -> list[tuple[str, str]]:
    """(primary, candidate) of the example rows at `where` (e.g. "status", "items[3].price")."""
    pattern = (
        re.escape(html.escape(where, quote=False))
        + r'</td><td class="v p">([^<]*)</td><td class="v c">([^<]*)</td>'
    )
    return re.findall(pattern, page)

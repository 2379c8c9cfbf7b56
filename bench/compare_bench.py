"""CPU of the comparator per compared request, with ~2 KB JSON responses (issue 13).

In process, no sockets: `CompareEngine.compare` on prebuilt pairs of responses, the way the pairing
table calls it on the agent's loop once both sides of a request are in. Scenarios:

    identical   the same bytes on both sides (the fast path: headers, then bytes, equal)
    noise       a timestamp and a trace id differ in every response (both JSON documents parsed and
                walked; the fields recognised as noise)
    regression  a price differs too (plus an example kept while the field has fewer than 3)
    gzip        the noise scenario with both bodies gzip-encoded (decoded first)

Each runs N comparisons spread over 50 endpoints (best of 3, process CPU time), then the report over
the state they left is built once and timed.

    .venv/bin/python bench/compare_bench.py [--count 20000] [--json PATH]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spoa_mirror.compare import CompareConfig, CompareEngine, Response

SCENARIOS = ("identical", "noise", "regression", "gzip")
VARIANTS = 64  # distinct pairs per scenario, cycled


def document(index: int, stamp: str, trace: str, price: float) -> bytes:
    """A ~2 KB JSON order: nested objects, a list of 8 line items, a timestamp and a trace id."""
    customer = {
        "id": 5000 + index % 97,
        "name": f"Customer {index % 97}",
        "tier": "gold",
        "address": {"street": f"{index} Main Street", "city": "Lyon", "zip": "69002", "country": "FR"},
    }
    lines = [
        {
            "sku": f"SKU-{index % 13}-{line}",
            "title": f"Product number {line} with a longer title, in blue",
            "quantity": line % 3 + 1,
            "price": price if line == 3 else 9.5 + line,
            "tax_rate": 0.2,
            "tags": ["catalogue", "summer", f"batch-{line}", "free-delivery"],
        }
        for line in range(8)
    ]
    totals = {"net": 123.45, "tax": 24.69, "gross": 148.14, "discounts": [{"code": "WELCOME", "amount": 5}]}
    return json.dumps(
        {
            "order": {"id": 100000 + index, "status": "confirmed", "currency": "EUR", "customer": customer},
            "lines": lines,
            "totals": totals,
            "served_at": stamp,
            "trace_id": trace,
        }
    ).encode()


def pairs(scenario: str) -> list[tuple[str, Response, Response]]:
    out = []
    for index in range(VARIANTS):
        primary_body = document(index, f"2024-12-04T10:00:{index % 60:02d}.123Z", str(uuid.uuid4()), 19.99)
        if scenario == "identical":
            candidate_body = primary_body
        else:
            price = 21.99 if scenario == "regression" else 19.99
            candidate_body = document(
                index, f"2024-12-04T10:00:{index % 60:02d}.456Z", str(uuid.uuid4()), price
            )
        headers = [("Content-Type", "application/json"), ("Date", "Wed, 04 Dec 2024 10:00:00 GMT"),
                   ("Cache-Control", "no-store"), ("X-Request-Id", str(uuid.uuid4()))]  # fmt: skip
        if scenario == "gzip":
            headers.append(("Content-Encoding", "gzip"))
            primary_body, candidate_body = gzip.compress(primary_body), gzip.compress(candidate_body)
        primary = Response(200, tuple(headers), primary_body, len(primary_body), None, 0.004)
        candidate_headers = tuple(header for header in headers if header[0] != "X-Request-Id")
        candidate = Response(200, candidate_headers, candidate_body, len(candidate_body), None, 0.005)
        out.append((f"/api/orders/{index % 50}", primary, candidate))
    return out


def measure(scenario: str, count: int) -> dict[str, float]:
    prepared = pairs(scenario)
    best = float("inf")
    engine = None
    for _ in range(3):
        engine = CompareEngine(CompareConfig(candidates=("candidate",)))
        started = time.process_time()
        for index in range(count):
            path, primary, candidate = prepared[index % VARIANTS]
            engine.request_sent("candidate")
            engine.compare("candidate", "GET", path, primary, candidate)
        best = min(best, time.process_time() - started)
    assert engine is not None
    started = time.process_time()
    report = engine.report()
    report_ms = (time.process_time() - started) * 1000
    outcomes = report["targets"][0]["outcomes"]
    return {
        "cpu_us_per_compare": best / count * 1e6,
        "report_ms": report_ms,
        "body_bytes": len(prepared[0][1].body),
        "identical": outcomes["identical"],
        "different": outcomes["different"],
        "noise_only": outcomes["noise_only"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--count", type=int, default=20000, help="comparisons per scenario (default 20000)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures there (for bench/run)")
    args = parser.parse_args()
    results = {scenario: measure(scenario, args.count) for scenario in SCENARIOS}
    for scenario, figures in results.items():
        print(
            f"{scenario:10s} {figures['cpu_us_per_compare']:7.1f} µs CPU per comparison "
            f"({figures['body_bytes']} B bodies; identical {figures['identical']}, noise only "
            f"{figures['noise_only']}, different {figures['different']}); "
            f"report {figures['report_ms']:.1f} ms"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"count": args.count, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

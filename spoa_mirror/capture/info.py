"""`spoa-mirror capture-info`: what capture files hold, without sending anything: payload counts,
time span, methods, endpoints, sizes, whether the primary's responses are there to compare with."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from . import gor
from .http1 import BadMessage, parse_request

TOP_ENDPOINTS = 10


@dataclass
class CaptureInfo:
    files: list[str] = field(default_factory=list)
    requests: int = 0
    responses: int = 0
    replayed_responses: int = 0
    paired: int = 0  # requests with a recorded response
    first: int | None = None
    last: int | None = None
    methods: Counter[str] = field(default_factory=Counter)
    endpoints: Counter[str] = field(default_factory=Counter)
    bad_requests: int = 0
    request_bytes: int = 0
    largest_request: int = 0
    body_bytes: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def span(self) -> float:
        return 0.0 if self.first is None or self.last is None else (self.last - self.first) / 1e9

    def as_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "requests": self.requests,
            "responses": self.responses,
            "replayed_responses": self.replayed_responses,
            "requests_with_response": self.paired,
            "first_ns": self.first,
            "last_ns": self.last,
            "span_seconds": self.span,
            "methods": dict(self.methods.most_common()),
            "endpoints": dict(self.endpoints.most_common(TOP_ENDPOINTS)),
            "distinct_endpoints": len(self.endpoints),
            "bad_requests": self.bad_requests,
            "request_bytes": self.request_bytes,
            "largest_request": self.largest_request,
            "body_bytes": self.body_bytes,
            "errors": self.errors,
        }


def capture_info(paths: list[str], on_error: Callable[[str], None] = lambda _: None) -> CaptureInfo:
    info = CaptureInfo(files=gor.capture_files(paths))
    request_ids: set[str] = set()
    response_ids: set[str] = set()

    def error(problem: gor.FormatError) -> None:
        info.errors.append(str(problem))
        on_error(str(problem))

    for payload in gor.merge(info.files, error):
        if payload.kind == gor.RESPONSE:
            info.responses += 1
            response_ids.add(payload.id)
            continue
        if payload.kind == gor.REPLAYED_RESPONSE:
            info.replayed_responses += 1
            continue
        info.requests += 1
        request_ids.add(payload.id)
        info.first = payload.timestamp if info.first is None else min(info.first, payload.timestamp)
        info.last = payload.timestamp if info.last is None else max(info.last, payload.timestamp)
        size = len(payload.message)
        info.request_bytes += size
        info.largest_request = max(info.largest_request, size)
        try:
            request = parse_request(payload.message)
        except BadMessage as problem:
            info.bad_requests += 1
            error(gor.FormatError(payload.source, payload.offset, f"bad request: {problem}"))
            continue
        info.methods[request.method] += 1
        info.endpoints[f"{request.method} {urlsplit(request.path).path}"] += 1
        info.body_bytes += len(request.body)
    info.paired = len(request_ids & response_ids)
    return info


def format_info(info: CaptureInfo) -> str:
    from datetime import UTC, datetime

    def when(ns: int | None) -> str:
        return "-" if ns is None else datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="milliseconds")

    lines = [
        f"files: {len(info.files)}",
        f"requests: {info.requests} ({info.request_bytes} bytes, largest {info.largest_request}, "
        f"bodies {info.body_bytes} bytes)",
        f"time span: {when(info.first)} to {when(info.last)} ({info.span:.3f} s)",
        "methods: " + (", ".join(f"{m} {n}" for m, n in info.methods.most_common()) or "none"),
        f"endpoints: {len(info.endpoints)} distinct; top:",
        *(f"  {n:8d}  {endpoint}" for endpoint, n in info.endpoints.most_common(TOP_ENDPOINTS)),
        f"responses: {info.responses} recorded, {info.paired} requests paired with one"
        + ("" if info.responses else " (no primary responses: replay --compare has nothing to compare)"),
    ]
    if info.replayed_responses:
        lines.append(f"replayed responses: {info.replayed_responses}")
    if info.bad_requests or info.errors:
        lines.append(f"damaged: {len(info.errors)} errors (each printed above)")
    return "\n".join(lines)

"""A target's `capture:` block: where and how its requests are written instead of sent.

    targets:
      - name: recorder
        capture:
          directory: /var/lib/spoa-mirror/capture
          max_file_size: 64MiB      # rotate past this size...
          max_file_age: 10m         # ...or this age, whichever comes first
          max_total_size: 1GiB      # the oldest finished files are removed past this
          compress: true            # gzip each file as it is rotated
          responses: false          # also record the primary's response to each captured request

Everything else a shadow target has (filters, sampling, redaction, rate_limit, queue_size,
memory_budget, max_queue_age) applies as it does to a shadow; `concurrency` is the number of
requests handed to the writer thread at once.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, StringConstraints, model_validator

from ..config_types import (
    Bool,
    MiB,
    Section,
    Str,
    bounded_duration,
    bounded_size,
    format_duration,
    format_size,
    problem,
)


class CaptureSettings(Section):
    """Where and how a capture target writes its requests instead of sending them."""

    directory: Annotated[Str, StringConstraints(min_length=1)] = Field(
        description="directory the GoReplay files are written to (created 0700 if missing)"
    )
    prefix: Annotated[Str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] = Field(
        "capture", description="file names are PREFIX-<UTC time>-<pid>.gor"
    )
    max_file_size: bounded_size(minimum=4096) = Field(
        64 * MiB, description="a file is rotated past this size"
    )
    max_file_age: bounded_duration(low=1, high=7 * 86400) = Field(
        600.0, description="...or this age, whichever comes first"
    )
    max_total_size: bounded_size(minimum=4096) = Field(
        1024 * MiB, description="the oldest finished files are removed past this total (counted)"
    )
    compress: Bool = Field(True, description="gzip each file as it is rotated")
    # The primary's response beside its request (a type 2 payload with the request's id), from
    # HAProxy's response message (haproxy/mirror.spoe.conf's mirror-response group, paired by
    # unique-id); the ACK asks HAProxy for it only while a target records responses (or compares).
    responses: Bool = Field(
        False,
        description="also record the primary's response to each captured request (paired by unique-id)",
    )
    response_message: Annotated[Str, StringConstraints(min_length=1)] = Field(
        "mirror-response", description="SPOE message carrying the primary's response"
    )

    @model_validator(mode="after")
    def _cap_holds_a_file(self) -> CaptureSettings:
        if self.max_total_size < self.max_file_size:
            raise problem(
                f"max_total_size ({self.max_total_size}) must be at least max_file_size "
                f"({self.max_file_size}): the file being written counts against it"
            )
        return self


def describe_capture(target: Any) -> list[str]:
    """`check-config`'s lines for a capture target (config.describe)."""
    capture: CaptureSettings = target.capture
    methods = ", ".join(sorted(target.methods)) if target.methods else "all methods"
    filters = f"; filters {target.filters}" if target.filters else ""
    files = f"{capture.directory}/{capture.prefix}-*.gor" + (".gz once rotated" if capture.compress else "")
    return [
        f"  {target.name} -> captured to files (GoReplay format), not sent",
        f"    captures {target.sample_percentage:g}% of requests; {methods}{filters}",
        f"    files {files}, 0600; rotated at {format_size(capture.max_file_size)} or "
        f"{format_duration(capture.max_file_age)}; oldest removed past {format_size(capture.max_total_size)}",
        f"    holds at most {format_size(target.memory_budget)} of requests, {target.queue_size} queued, "
        f"{target.concurrency} handed to the writer at once",
        "    records the primary's responses too (" + capture.response_message + " message)"
        if capture.responses
        else "    records requests only",
    ]

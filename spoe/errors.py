"""SPOP errors. Each class carries the spec's status code (SPOE.txt section 3.5), so turning an
error into the AGENT-DISCONNECT frame happens in exactly one place: `Connection`."""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    NORMAL = 0
    IO_ERROR = 1
    TIMEOUT = 2
    FRAME_TOO_BIG = 3
    INVALID_FRAME = 4
    NO_VERSION = 5
    NO_MAX_FRAME_SIZE = 6
    NO_CAPABILITIES = 7
    UNSUPPORTED_VERSION = 8
    BAD_MAX_FRAME_SIZE = 9
    FRAGMENTATION_NOT_SUPPORTED = 10
    INTERLACED_FRAMES = 11
    FRAME_ID_NOT_FOUND = 12
    RESOURCE_ALLOCATION = 13
    UNKNOWN = 99


class SpopError(Exception):
    """A protocol violation by the peer; `status` is what the AGENT-DISCONNECT frame carries."""

    status: Status = Status.UNKNOWN

    def __init__(self, message: str, status: Status | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status

    @property
    def message(self) -> str:
        return str(self)


class FrameTooBig(SpopError):
    status = Status.FRAME_TOO_BIG


class InvalidFrame(SpopError):
    """Malformed bytes: truncated data, a bad type, a bad length, an impossible varint."""

    status = Status.INVALID_FRAME


class HelloError(SpopError):
    """A HAPROXY-HELLO we cannot accept; the status is set per case (5, 6, 7, 8 or 9)."""


class FragmentationNotSupported(SpopError):
    status = Status.FRAGMENTATION_NOT_SUPPORTED


class InterlacedFrames(SpopError):
    status = Status.INTERLACED_FRAMES


class FrameIdNotFound(SpopError):
    status = Status.FRAME_ID_NOT_FOUND


class ResourceExhausted(SpopError):
    """The peer asked us to hold more than our caps allow (reassembly bytes, in-flight frames)."""

    status = Status.RESOURCE_ALLOCATION


class LocalProtocolError(Exception):
    """The application used the engine wrongly (for example an ACK for a frame never received).
    This is our bug, not the peer's, so it is not an `SpopError`."""

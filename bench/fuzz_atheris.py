"""Coverage-guided fuzzing of the sans-IO SPOP engine (`spoe.Connection`) with atheris/libFuzzer.

The same properties as tests/test_fuzz_spop.py, checked by the same `FuzzedConnection`: `next_event`
never raises, one chunk yields a bounded number of events, the output is whole frames and any
AGENT-DISCONNECT carries a status of SPOE.txt 3.5, nothing follows Closed, and the engine's buffers
stay under max-frame-size + 4 + 64 KiB and the reassembly cap. The test suite runs a fixed budget
from a seeded generator; this runs as long as you like, steered by coverage of `spoe` itself.

Optional, not part of the test suite:

    .venv/bin/pip install atheris
    .venv/bin/python bench/fuzz_atheris.py -max_total_time=600 [-timeout=10] [CORPUS_DIR ...]

Without a corpus directory it starts from seeds written to a temporary one (valid streams after a
2.x and a 3.x HELLO: NOTIFYs, fragments, an ABORT, an unknown frame, a DISCONNECT). A failure is an
uncaught exception: libFuzzer prints it and writes the input to ./crash-<sha1>; replay it with
`.venv/bin/python bench/fuzz_atheris.py ./crash-<sha1>`.

An input is a 4-byte header then the bytes HAProxy would send:
    byte 0: bits 0-1 max_frame_size, bits 2-3 max_reassembly, bit 4 fragmentation off,
            bits 5-6 how it ends (nothing, EOF, a local close)
    byte 1: which HELLO goes first (none, 2.x, 3.x, 2.x with max-frame-size 256, a health check)
    bytes 2-3: read size, big-endian (0: the whole input in one read)
"""

from __future__ import annotations

import random
import struct
import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports(include=["spoe"]):
    import spoe  # noqa: F401  (instrumented here; the imports below reuse these modules)

from spoe import Message, Status
from spoe.frames import FLAG_FIN, FrameType, encode_frame
from tests.support.fuzzing import MESSAGES, Config, FuzzedConnection
from tests.support.spop_peer import (
    abort,
    haproxy_disconnect,
    healthcheck_hello,
    hello_2x,
    hello_3x,
    notify,
    notify_fragments,
)

FRAME_SIZES = (256, 1024, 16384, 16384)
REASSEMBLY_CAPS = (0, 300, 4096, 65_536)
PRELUDES = (b"", hello_2x(), hello_3x(), hello_2x(max_frame_size=256), healthcheck_hello())
HEADER = struct.Struct(">BBH")


def one_input(data: bytes) -> None:
    if len(data) < HEADER.size:
        return
    flags, prelude, read_size = HEADER.unpack_from(data)
    config = Config(
        max_frame_size=FRAME_SIZES[flags & 3],
        max_reassembly=REASSEMBLY_CAPS[(flags >> 2) & 3],
        fragmentation=not flags & 0x10,
    )
    stream = PRELUDES[prelude % len(PRELUDES)] + data[HEADER.size :]
    # The ACK order and delays are drawn from the input, so a crash replays exactly.
    fuzzed = FuzzedConnection(config, random.Random(data))
    read_size = read_size or len(stream) or 1
    for start in range(0, len(stream), read_size):
        fuzzed.feed(stream[start : start + read_size])
        if fuzzed.closed is not None:
            break
    ending = (flags >> 5) & 3
    if fuzzed.closed is None and ending == 1:
        fuzzed.feed(b"")
    elif fuzzed.closed is None and ending == 2:
        fuzzed.close_locally(Status.TIMEOUT)
    if fuzzed.closed is not None:
        fuzzed.check_silent_after_close()


def seed_corpus() -> str:
    """Inputs that already get past the handshake, so mutation starts deep in the state machine."""
    fragments = notify_fragments(2, 1, MESSAGES, [3, 40])
    streams = [
        notify(1, 1, MESSAGES),
        b"".join(fragments),
        fragments[0] + abort(2, 1) + notify(3, 1, [Message("m", {})]),
        encode_frame(42, FLAG_FIN, 0, 0, b"skip me") + notify(4, 9, MESSAGES),
        notify(5, 1, MESSAGES) * 20 + haproxy_disconnect(),
        encode_frame(FrameType.NOTIFY, 0, 6, 1, b"\x05check") + encode_frame(0, 0, 6, 1, b"") * 30,
    ]
    directory = Path(tempfile.mkdtemp(prefix="spop-fuzz-corpus-"))
    for n, stream in enumerate(streams):
        for prelude, read_size in ((1, 0), (2, 0), (1, 7)):
            flags = 0x20 * (n % 3)
            (directory / f"seed-{n}-{prelude}-{read_size}").write_bytes(
                HEADER.pack(flags, prelude, read_size) + stream
            )
    return str(directory)


def main() -> None:
    argv = list(sys.argv)
    if not any(Path(arg).exists() for arg in argv[1:] if not arg.startswith("-")):
        argv.append(seed_corpus())
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

"""Record and replay: a capture target writes mirrored requests to GoReplay files (writer.py), and
`spoa-mirror replay` / `capture-info` read them back (replay.py, info.py); gor.py is the format."""

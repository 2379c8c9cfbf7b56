"""ACK latency of small NOTIFYs on one SPOP connection while another connection sends large JSON
bodies that the default redaction must read: whether redacting a big body holds up other requests'
ACKs (HAProxy's `timeout processing` is typically 100-500 ms).

The agent runs as a subprocess (`spoa-mirror --config`, the default redaction, frames up to 16 MiB so
a 1.2 MB body fits one NOTIFY) mirroring to an nginx shadow (a separate process: a shadow in this
process would compete with the probe for the GIL). A "big" peer sends one 1.2 MB JSON
body (a password in it, so it really is redacted) every `--big-interval` seconds; a "probe" peer
sends one small GET NOTIFY at a time and times each until its ACK. Printed: probe ACK p50/p99/max,
how many big bodies went through, and the agent's outcomes.

    .venv/bin/python bench/redaction_ack_bench.py                 # 10 s
    .venv/bin/python bench/redaction_ack_bench.py --duration 3    # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spoe import Message  # noqa: E402
from spoe.frames import FrameType  # noqa: E402
from tests.support.procs import free_port, run_process  # noqa: E402
from tests.support.shadow import NginxServer  # noqa: E402
from tests.support.spop_peer import TcpPeer, hello_2x, notify  # noqa: E402

FRAME = 16 * 1024 * 1024


def big_body(size: int) -> bytes:
    """A JSON document of about `size` bytes: many small records, one with a password."""
    count = size // 107
    records = [{"id": i, "name": f"user-{i}", "tags": ["a", "b"], "note": "x" * 40} for i in range(count)]
    records[len(records) // 2]["password"] = "hunter2"
    return json.dumps({"records": records}).encode()


def message(path: str, body: bytes = b"") -> Message:
    headers = "Host: app.test\r\nContent-Type: application/json\r\n\r\n"
    args = {"arg_method": "POST" if body else "GET", "arg_path": path, "arg_ver": "1.1", "arg_hdrs": headers}
    if body:
        args |= {"arg_body": body, "body_len": len(body)}
    return Message("mirror", args)


async def big_sender(port: int, body: bytes, interval: float, stop: float) -> int:
    peer = await TcpPeer.connect(("127.0.0.1", port))
    await peer.handshake(hello_2x(max_frame_size=FRAME))
    frame = notify(1, 1, [message("/big", body)])
    sent = 0
    while time.monotonic() < stop:
        await peer.send(frame)
        reply = await peer.recv_frame(timeout=10)
        assert reply.type == FrameType.ACK
        sent += 1
        await asyncio.sleep(interval)
    peer.close()
    return sent


async def prober(port: int, stop: float) -> list[float]:
    peer = await TcpPeer.connect(("127.0.0.1", port))
    await peer.handshake(hello_2x(max_frame_size=FRAME))
    latencies = []
    frame_id = 0
    while time.monotonic() < stop:
        frame_id += 1
        started = time.perf_counter()
        await peer.send(notify(frame_id, 1, [message(f"/probe/{frame_id}")]))
        reply = await peer.recv_frame(timeout=10)
        latencies.append(time.perf_counter() - started)
        assert reply.type == FrameType.ACK
        await asyncio.sleep(0.002)
    peer.close()
    return latencies


async def measure(port: int, body: bytes, duration: float, interval: float) -> tuple[int, list[float]]:
    stop = time.monotonic() + duration
    big, latencies = await asyncio.gather(big_sender(port, body, interval, stop), prober(port, stop))
    return big, latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--body-size", type=int, default=1_200_000)
    parser.add_argument("--big-interval", type=float, default=0.05, help="pause between big bodies (s)")
    args = parser.parse_args()

    body = big_body(args.body_size)
    with (
        tempfile.TemporaryDirectory(prefix="spoa-mirror-ack-") as workdir,
        NginxServer(str(Path(workdir) / "nginx")) as shadow,
    ):
        spop_port, admin_port = free_port(), free_port()
        config = {
            "listen": {"port": spop_port, "max_frame_size": FRAME},
            "admin": {"port": admin_port},
            # The example config's block, so the agent before the defaults also parses the JSON.
            "redact": yaml.safe_load((ROOT / "examples" / "config.yaml").read_text())["redact"],
            "targets": [
                {"name": "shadow", "url": f"http://{shadow.host}:{shadow.port}", "max_body_size": "4MiB"}
            ],
        }
        path = Path(workdir) / "agent.yaml"
        path.write_text(yaml.safe_dump(config))
        argv = [str(ROOT / ".venv" / "bin" / "spoa-mirror"), "--config", str(path)]
        with run_process(argv, ready_port=admin_port, name="spoa-mirror", log_dir=Path(workdir), cwd=ROOT):
            big, latencies = asyncio.run(measure(spop_port, body, args.duration, args.big_interval))
            time.sleep(1)
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as response:
                metrics = response.read().decode()
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    outcomes = [line for line in metrics.splitlines() if line.startswith("spoa_mirror_requests_total{")]
    print(
        f"{len(body):,}-byte JSON bodies redacted: {big}; probe ACKs: {len(latencies):,}; "
        f"ACK p50 {statistics.median(latencies) * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms, "
        f"max {latencies[-1] * 1000:.2f} ms"
    )
    for line in outcomes:
        if not line.endswith(" 0.0"):
            print(" ", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

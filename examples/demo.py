"""The local demo: HAProxy (Debian's) with `filter spoe` in front of a primary, the agent mirroring
to two shadows, some traffic carrying secrets, then a summary of what the shadows received, what was
redacted and what was dropped. Everything on loopback; everything stopped at the end.

Run it with `bash scripts/demo.sh` (which installs what is missing first)."""

from __future__ import annotations

import http.server
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HAPROXY_CFG = """\
global
    tune.bufsize 131072
defaults
    mode http
    timeout connect 1s
    timeout client 10s
    timeout server 10s
frontend web
    bind 127.0.0.1:{web}
    option http-buffer-request
    filter spoe engine mirror config {spoe_conf}
    default_backend primary
backend primary
    server primary 127.0.0.1:{primary}
backend spoe-mirror
    mode tcp
    timeout connect 1s
    timeout server 30s
    server agent 127.0.0.1:{spop} check
    option spop-check
"""

SPOE_CONF = """\
[mirror]
spoe-agent mirror_agent
    messages mirror
    use-backend spoe-mirror
    timeout hello 2s
    timeout idle 20s
    timeout processing 100ms
    option async
    option pipelining
spoe-message mirror
    args arg_method=method arg_path=url arg_ver=req.ver arg_hdrs=req.hdrs arg_body=req.body \
         body_len=req.body_size src=src
    event on-frontend-http-request
"""

AGENT_CFG = """\
listen: {{port: {spop}}}
admin: {{port: {admin}}}
redact:
  query: {{token: mask}}
  json_fields: {{password: mask, card.number: mask}}
targets:
  - name: shadow-v2
    url: http://127.0.0.1:{shadow}/
    headers: {{X-Mirror: "true"}}
  - name: canary
    url: http://127.0.0.1:{canary}/
    sample_percentage: 30
    sample_key: {{header: X-User}}
    methods: [GET, HEAD]
"""


# Every secret the traffic carries. The demo's "secrets found" counts each of them in what the
# shadows received, and checks the primary did get them all (so each was really planted).
BEARER_TOKEN = "s3cr3t-token"
SESSION_COOKIE = "abc123"
QUERY_TOKEN = "tok-{i}"
PASSWORD = "hunter2"
CARD_NUMBER = "4111111111111111"
PLANTED_SECRETS = {
    "bearer token": re.compile(re.escape(BEARER_TOKEN)),
    "session cookie": re.compile(re.escape(SESSION_COOKIE)),
    "query token": re.compile(re.escape(QUERY_TOKEN).replace(r"\{i\}", r"\d+")),
    "JSON password": re.compile(re.escape(PASSWORD)),
    "card number": re.compile(re.escape(CARD_NUMBER)),
}


def secrets_found(requests: list[dict]) -> dict[str, int]:
    """How many of `requests` carry each planted secret anywhere: path, headers or body."""
    found = dict.fromkeys(PLANTED_SECRETS, 0)
    for request in requests:
        text = json.dumps(request)
        for name, pattern in PLANTED_SECRETS.items():
            found[name] += bool(pattern.search(text))
    return found


class Recorder(http.server.BaseHTTPRequestHandler):
    """A shadow (or the primary) that answers 200 and remembers what it received."""

    protocol_version = "HTTP/1.1"
    received: list[dict]

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        self.received.append(
            {
                "method": self.command,
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": body.decode("utf-8", "replace"),
            }
        )
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")

    do_GET = do_POST = do_PUT = do_HEAD = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


class QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """HAProxy closing an idle keep-alive connection is not worth a traceback."""


def serve(port: int) -> list[dict]:
    handler = type("Handler", (Recorder,), {"received": []})
    server = QuietServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return handler.received


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port} after {timeout}s")


def traffic(web: int, count: int) -> int:
    ok = 0
    for i in range(count):
        user = f"user-{random.randrange(50)}"
        headers = {
            "X-User": user,
            "Authorization": f"Bearer {BEARER_TOKEN}",
            "Cookie": f"session={SESSION_COOKIE}",
        }
        if i % 3 == 0:
            data = json.dumps({"user": user, "password": PASSWORD, "card": {"number": CARD_NUMBER}})
            request = urllib.request.Request(
                f"http://127.0.0.1:{web}/orders",
                data=data.encode(),
                headers={**headers, "Content-Type": "application/json"},
            )
        else:
            request = urllib.request.Request(
                f"http://127.0.0.1:{web}/items/{i}?token={QUERY_TOKEN.format(i=i)}&page=2", headers=headers
            )
        with urllib.request.urlopen(request, timeout=5) as response:
            ok += response.status == 200
    return ok


def metrics_page(admin: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5).read().decode()


def metrics(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def main() -> int:
    # Debian's by default; SPOA_MIRROR_HAPROXY=scripts/haproxy-sid runs the demo on HAProxy 3.2.
    haproxy = os.environ.get("SPOA_MIRROR_HAPROXY") or shutil.which("haproxy") or "/usr/sbin/haproxy"
    ports = {name: free_port() for name in ("web", "primary", "shadow", "canary", "spop", "admin")}
    primary, shadow, canary = serve(ports["primary"]), serve(ports["shadow"]), serve(ports["canary"])
    workdir = Path(tempfile.mkdtemp(prefix="spoa-mirror-demo-"))
    try:
        return run(haproxy, ports, primary, shadow, canary, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run(haproxy: str, ports: dict[str, int], primary: list, shadow: list, canary: list, workdir: Path) -> int:
    spoe_conf = workdir / "mirror.spoe.conf"
    spoe_conf.write_text(SPOE_CONF)
    (workdir / "haproxy.cfg").write_text(HAPROXY_CFG.format(spoe_conf=spoe_conf, **ports))
    (workdir / "agent.yaml").write_text(AGENT_CFG.format(**ports))
    agent_cmd = [sys.executable, "-m", "spoa_mirror", "--config", str(workdir / "agent.yaml")]
    with open(workdir / "agent.log", "w") as agent_log, open(workdir / "haproxy.log", "w") as proxy_log:
        agent = subprocess.Popen([*agent_cmd, "--log-format", "json"], stderr=agent_log)
        wait_for(ports["spop"])  # before HAProxy, whose first health check would otherwise fail
        proxy = subprocess.Popen([haproxy, "-db", "-f", str(workdir / "haproxy.cfg")], stderr=proxy_log)
        try:
            wait_for(ports["web"])
            time.sleep(1.0)  # HAProxy opens its SPOP connections on the first requests
            served = traffic(ports["web"], 300)
            time.sleep(1.0)
            page = metrics_page(ports["admin"])
            m = metrics(page)
        finally:
            proxy.terminate()
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=10)
            proxy.wait(timeout=10)
    leaked = report(served, primary, shadow, canary, m, workdir)
    show_metrics(page)
    explain(served, primary, shadow, canary, m)
    return 1 if leaked else 0


def report(served: int, primary: list, shadow: list, canary: list, m: dict, workdir: Path) -> int:
    """Prints the summary; returns how many secrets reached a shadow, or were never planted."""
    print(f"\nprimary served {served} requests ({len(primary)} reached the primary server)")
    for name, received in (("shadow-v2", shadow), ("canary", canary)):
        sent = sum(
            v
            for k, v in m.items()
            if k.startswith('spoa_mirror_requests_total{outcome="sent_') and f'target="{name}"' in k
        )
        print(f"\n{name}: received {len(received)} mirrored requests (agent counted {sent:.0f} sent)")
        dropped = {
            k.split('outcome="')[1].split('"')[0]: v
            for k, v in m.items()
            if k.startswith("spoa_mirror_requests_total")
            and f'target="{name}"' in k
            and v
            and "sent_" not in k
        }
        print("  dropped by reason: " + (", ".join(f"{k}={v:.0f}" for k, v in dropped.items()) or "none"))
    redactions = {
        k.split('rule="')[1].split('"')[0]: v
        for k, v in m.items()
        if k.startswith("spoa_mirror_redactions_total") and 'target="shadow-v2"' in k
    }
    print("\nredacted for shadow-v2: " + ", ".join(f"{k}={v:.0f}" for k, v in sorted(redactions.items())))
    post = next((r for r in shadow if r["method"] == "POST"), None)
    get = next((r for r in shadow if r["method"] == "GET"), None)
    for sample in (get, post):
        if sample:
            print(f"\nwhat shadow-v2 saw: {sample['method']} {sample['path']}")
            for key in ("Authorization", "Cookie", "X-Mirror", "X-Spoa-Mirror", "X-Forwarded-For"):
                print(f"  {key}: {sample['headers'].get(key.lower())}")
            if sample["body"]:
                print(f"  body: {sample['body']}")
    planted = secrets_found(primary)
    leaked = secrets_found([*shadow, *canary])
    print(f"\nsecrets found in any shadow request: {sum(leaked.values())}")
    for name in PLANTED_SECRETS:
        print(f"  {name}: in {planted[name]} primary requests, {leaked[name]} shadow requests")
    return sum(leaked.values()) + sum(1 for count in planted.values() if not count)


METRICS_SHOWN = (
    "spoa_mirror_requests_received_total",
    'spoa_mirror_requests_total{outcome="sent_2xx"',
    'spoa_mirror_requests_total{outcome="filtered"',
    'spoa_mirror_requests_total{outcome="sampled_out"',
    "spoa_mirror_sent_bytes_total",
    "spoa_mirror_in_flight",
    'spoa_mirror_circuit_breaker_state{state="closed"',
)


def show_metrics(page: str) -> None:
    """A few lines of the agent's /metrics, as Prometheus would scrape them (zero counts left out)."""
    print("\nan excerpt of the agent's /metrics:")
    for line in page.splitlines():
        if line.startswith(METRICS_SHOWN) and (not line.endswith(" 0.0") or "in_flight" in line):
            print(f"  {line}")
    print("  (received = sum of outcomes + in flight, for every target)")


def explain(served: int, primary: list, shadow: list, canary: list, m: dict) -> None:
    """Why each shadow received what it did, from the demo's own traffic and the agent's counters."""
    posts = sum(1 for request in primary if request["method"] == "POST")
    gets = len(primary) - posts
    users = {request["headers"].get("x-user") for request in primary}
    sampled = {request["headers"].get("x-user") for request in canary}
    counted = lambda outcome: m.get(  # noqa: E731
        f'spoa_mirror_requests_total{{outcome="{outcome}",target="canary"}}', 0.0
    )
    print("\nwhy these numbers:")
    print(f"  shadow-v2 mirrors every request: {len(shadow)} of the {served} sent.")
    print(
        f"  canary takes GET and HEAD only: the {posts} POSTs (every third request) were filtered "
        f"(agent: filtered={counted('filtered'):.0f})."
    )
    share = 100 * len(sampled) / max(len(users), 1)
    print(
        f"  canary samples 30% of users by X-User, the same users every time: {len(sampled)} of the "
        f"{len(users)} users in the traffic fell in the sample ({share:.0f}%)."
    )
    print(
        f"  so it received their GETs, {len(canary)} of the {gets} GETs; the other users' "
        f"{gets - len(canary)} were sampled out (agent: sampled_out={counted('sampled_out'):.0f})."
    )
    print("  the demo's temporary files (configs, logs) are removed.")


if __name__ == "__main__":
    os.chdir(Path(__file__).resolve().parent.parent)
    sys.exit(main())

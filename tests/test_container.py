"""The Dockerfile built and run for real on Debian's Docker engine (docker.io): from a local base
image (scripts/container-base.sh: debootstrapped bookworm with Python, `docker import`ed, since no
registry may be reachable) and the project's wheels built on the host, so the build is offline;
with BuildKit and with the legacy builder. The image then runs read-only, as its non-root user, with
every capability dropped, behind the real HAProxy 2.6, mirrors a request to a shadow, reports
healthy through its own HEALTHCHECK, and stops cleanly within the grace period.

The engine is started by scripts/dockerd.sh (setup.sh runs it too). When it cannot start on a
machine (no root, no kernel support), these tests are skipped with the engine's own words as the
reason, which `pytest -ra` prints in the summary; on this project's CI machines it starts.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.support.mirror_stack import write_haproxy_config
from tests.support.procs import free_port, run_haproxy
from tests.support.shadow import ShadowServer

ROOT = Path(__file__).resolve().parent.parent
DOCKER = "/usr/bin/docker"  # Debian's CLI, the release of its dockerd (BuildKit built in)
BASE_IMAGE = "spoa-mirror-base:bookworm"
CONTEXT_FILES = (
    "Dockerfile",
    ".dockerignore",
    "pyproject.toml",
    "README.md",
    "LICENSE",
    "spoe",
    "spoa_mirror",
)
STOP_GRACE = 15  # seconds, as compose.yaml's stop_grace_period


def docker(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> str:
    result = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"docker {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def engine() -> None:
    started = subprocess.run(
        ["bash", str(ROOT / "scripts" / "dockerd.sh")], capture_output=True, text=True, timeout=120
    )
    if started.returncode != 0:
        pytest.skip(
            f"NO DOCKER ENGINE: it cannot start on this machine, container tests not run: {started.stderr}"
        )


@pytest.fixture(scope="module")
def base_image(engine: None) -> str:
    made = subprocess.run(
        ["bash", str(ROOT / "scripts" / "container-base.sh")], capture_output=True, text=True, timeout=900
    )
    assert made.returncode == 0, made.stderr
    return BASE_IMAGE


@pytest.fixture(scope="module")
def build_context(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path) -> Path:
    """What `docker build .` would send from a checkout, plus wheelhouse/ with the host's wheels."""
    context = tmp_path_factory.mktemp("context")
    for name in CONTEXT_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, context / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, context / name)
    (context / "deploy" / "docker").mkdir(parents=True)
    shutil.copy(ROOT / "deploy" / "docker" / "config.yaml", context / "deploy" / "docker" / "config.yaml")
    shutil.copytree(wheelhouse, context / "wheelhouse")
    return context


def build(context: Path, base: str, buildkit: bool) -> str:
    tag = f"spoa-mirror-test:{'buildkit' if buildkit else 'legacy'}-{uuid.uuid4().hex[:8]}"
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "DOCKER_BUILDKIT": "1" if buildkit else "0"}
    docker(
        "build",
        "--network",
        "none",
        "--build-arg",
        f"BASE={base}",
        "-t",
        tag,
        str(context),
        timeout=900,
        env=env,
    )
    return tag


@pytest.fixture(scope="module")
def image(build_context: Path, base_image: str) -> Iterator[str]:
    """Built by the legacy builder, offline (`--network none`): no registry, no package index."""
    tag = build(build_context, base_image, buildkit=False)
    yield tag
    subprocess.run([DOCKER, "rmi", "-f", tag], capture_output=True, timeout=120)


def test_buildkit_builds_the_same_dockerfile(build_context: Path, base_image: str) -> None:
    tag = build(build_context, base_image, buildkit=True)
    try:
        checked = docker(
            "run", "--rm", "--read-only", "--cap-drop", "ALL", tag,
            "check-config", "/etc/spoa-mirror/config.yaml", "-u", "http://x:1",
        )  # fmt: skip
    finally:
        subprocess.run([DOCKER, "rmi", "-f", tag], capture_output=True, timeout=120)
    assert "x:1" in checked


def test_image_config_and_user(image: str) -> None:
    [inspect] = json.loads(docker("image", "inspect", image))
    config = inspect["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["spoa-mirror"]
    assert config["Healthcheck"]["Test"][0] == "CMD"
    assert set(config["ExposedPorts"]) == {"12345/tcp", "9180/tcp"}
    checked = docker("run", "--rm", image, "check-config", "/etc/spoa-mirror/config.yaml", "-u", "http://x:1")
    assert "x:1" in checked


def wait_health(container: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        state = json.loads(docker("inspect", "--format", "{{json .State.Health}}", container))["Status"]
        if state != "starting" or time.monotonic() > deadline:
            return state
        time.sleep(1)


@pytest.mark.haproxy
def test_container_mirrors_behind_haproxy_read_only_unprivileged(image: str, tmp_path: Path) -> None:
    # The host's network namespace: every address in play is loopback (this workplace's rule for
    # test traffic), and HAProxy reaches the agent the way a sidecar deployment does.
    with ShadowServer() as shadow:
        config = tmp_path / "config.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "listen": {"address": "127.0.0.1", "port": 12345, "max_frame_size": 16384},
                    "admin": {"address": "127.0.0.1", "port": 9180},
                    "log": {"format": "json"},
                    "drain_timeout": 2,
                    "targets": [{"name": "shadow", "url": shadow.url}],
                }
            )
        )
        config.chmod(0o644)
        name = f"spoa-mirror-test-{uuid.uuid4().hex[:8]}"
        docker(
            "run", "-d", "--name", name, "--network", "host", "--read-only", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges:true", "--memory", "256m", "--pids-limit", "64",
            "-v", f"{config}:/etc/spoa-mirror/config.yaml:ro", image,
        )  # fmt: skip
        try:
            [state] = [json.loads(docker("inspect", "--format", "{{json .}}", name))]
            assert state["Config"]["User"] == "10001:10001" and state["HostConfig"]["ReadonlyRootfs"] is True
            assert state["HostConfig"]["CapDrop"] == ["ALL"]
            health = wait_health(name)
            assert health == "healthy", docker("logs", name)
            http_port = free_port()
            haproxy_config = write_haproxy_config(tmp_path, 12345, http_port)
            with run_haproxy(haproxy_config, tmp_path):
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{http_port}/from-haproxy?x=1", timeout=10
                ) as r:
                    assert r.status == 200 and r.headers.get("X-Spoe-Error", "") == ""
                [mirrored] = shadow.wait_for(1, timeout=10)
            assert mirrored.target == "/from-haproxy?x=1"
            started = time.monotonic()
            docker("stop", "-t", str(STOP_GRACE), name, timeout=STOP_GRACE + 30)
            stopped_in = time.monotonic() - started
            [exit_state] = [json.loads(docker("inspect", "--format", "{{json .State}}", name))]
            logs = subprocess.run([DOCKER, "logs", name], capture_output=True, text=True, timeout=30)
            print(f"docker stop took {stopped_in:.1f} s, exit code {exit_state['ExitCode']}")
            assert exit_state["ExitCode"] == 0, logs.stderr
            assert stopped_in < STOP_GRACE
            assert '"agent.stopped"' in logs.stderr + logs.stdout
        finally:
            subprocess.run([DOCKER, "rm", "-f", name], capture_output=True, timeout=60)

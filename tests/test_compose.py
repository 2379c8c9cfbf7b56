"""compose.yaml, the Dockerfile and the files they use, checked statically: every file they name
exists and would reach the build or the container, the names and ports agree with each other,
HAProxy 2.6 accepts the HAProxy config as mounted (with its one 3.x-only line
switched back), the agents' config passes `spoa-mirror check-config`, and nginx accepts its own.

tests/test_container.py builds the image (both builders) and runs it behind HAProxy; compose.yaml
is read by Debian's docker-compose (`config`), but not brought up: its images (haproxy, nginx) come
from Docker Hub, which cannot be reached here.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from tests.support.procs import NGINX, HAProxyRelease
from tests.support.shipped_configs import (
    DOCKERFILE,
    assert_check_config,
    bufsize,
    dockerfile_instructions,
    section,
    to_mode_tcp,
)

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
DOCKERIGNORE = ROOT / ".dockerignore"
IMAGE_CONFIG = ROOT / "deploy" / "docker" / "config.yaml"
HAPROXY_CONFIG_PATH = "/usr/local/etc/haproxy/haproxy.cfg"  # where the official image reads it
AGENT_CONFIG_PATH = "/etc/spoa-mirror/config.yaml"  # the image's CMD
NONROOT_UID = "10001"


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> local file, for the short-syntax bind mounts (./local:/container[:ro])."""
    mounts = {}
    for volume in service.get("volumes", []):
        local, container = volume.split(":")[:2]
        assert local.startswith("./"), f"{volume}: only bind mounts of repository files are expected"
        mounts[container] = ROOT / local
    return mounts


def built_from_dockerfile(service: dict[str, Any]) -> bool:
    build = service.get("build")
    return (
        build is not None and (ROOT / build["context"] / build.get("dockerfile", "Dockerfile")) == DOCKERFILE
    )


def agent_services() -> dict[str, dict[str, Any]]:
    return {name: service for name, service in services().items() if built_from_dockerfile(service)}


def haproxy_service() -> dict[str, Any]:
    [service] = [s for s in services().values() if s.get("image", "").startswith("haproxy:")]
    return service


def haproxy_config_text() -> str:
    return bind_mounts(haproxy_service())[HAPROXY_CONFIG_PATH].read_text()


def mounted_agent_config() -> Path:
    configs = {bind_mounts(service)[AGENT_CONFIG_PATH] for service in agent_services().values()}
    [config] = configs  # every replica runs the same config
    return config


# --- Dockerfile -------------------------------------------------------------------------------------


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern matching the path, or one of its parent directories, decides;
    `!` re-includes; `*` stays within one path segment, `**` spans any number of them."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for raw in DOCKERIGNORE.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def test_dockerfile_builds_on_python_slim_pinned_by_digest_and_runs_unprivileged() -> None:
    """Every stage FROM the BASE build argument (tests/test_container.py passes a local image), whose
    default is python:3.11-slim pinned by digest, so a rebuild cannot pick up a moved tag."""
    instructions = dockerfile_instructions()
    [base_arg] = [
        arguments for keyword, arguments in instructions if keyword == "ARG" and arguments.startswith("BASE=")
    ]
    assert re.fullmatch(r"BASE=python:3\.11-slim@sha256:[0-9a-f]{64}", base_arg), base_arg
    bases = [arguments.split()[0] for keyword, arguments in instructions if keyword == "FROM"]
    assert bases and all(base == "${BASE}" for base in bases), bases
    assert not any("--mount" in arguments for keyword, arguments in instructions if keyword == "RUN"), (
        "RUN --mount is BuildKit-only: the legacy builder rejects it"
    )
    final = final_stage()
    [user] = [arguments for keyword, arguments in final if keyword == "USER"]
    assert user.split(":")[0] == NONROOT_UID
    assert final[-2:] == [
        ("ENTRYPOINT", '["spoa-mirror"]'),
        ("CMD", f'["--config", "{AGENT_CONFIG_PATH}"]'),
    ]
    [expose] = [arguments for keyword, arguments in final if keyword == "EXPOSE"]
    assert expose.split() == ["12345", "9180"]
    installs = [arguments for keyword, arguments in instructions if "pip " in arguments and keyword == "RUN"]
    assert installs and all("--no-cache-dir" in arguments for arguments in installs)


def test_dockerfile_healthcheck_asks_the_admin_listener_with_urllib() -> None:
    [healthcheck] = [arguments for keyword, arguments in final_stage() if keyword == "HEALTHCHECK"]
    command = json.loads(healthcheck[healthcheck.index("CMD") + len("CMD") :])
    assert command[:2] == ["python", "-c"] and "urllib.request.urlopen" in command[2]
    [url] = re.findall(r"'(http://[^']+)'", command[2])
    config = yaml.safe_load(IMAGE_CONFIG.read_text())
    assert url == f"http://127.0.0.1:{config['admin']['port']}/healthz"


def test_every_file_the_dockerfile_copies_exists_and_is_in_the_build_context() -> None:
    copied = []
    for keyword, arguments in dockerfile_instructions():
        if keyword in ("COPY", "ADD") and "--from=" not in arguments:
            # A glob (wheelhouse*) may match nothing: the offline wheels are optional.
            copied += [
                source
                for source in shlex.split(arguments)[:-1]
                if not source.startswith("--") and "*" not in source
            ]
    assert copied
    for source in copied:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: no such file"
        files = [path] if path.is_file() else [p for p in path.rglob("*.py") if "__pycache__" not in p.parts]
        assert files, f"COPY {source}: nothing to copy"
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            assert not dockerignore_excludes(relative), f"COPY {source}: .dockerignore leaves out {relative}"
    for unwanted in (".venv/bin/python", ".git/HEAD", "tests/test_compose.py", "spoe/__pycache__/x.pyc"):
        assert dockerignore_excludes(unwanted), unwanted


def test_image_config_listens_on_all_interfaces_and_runs_once_given_a_target() -> None:
    config = yaml.safe_load(IMAGE_CONFIG.read_text())
    assert config["listen"]["address"] == config["admin"]["address"] == "0.0.0.0"
    assert_check_config(IMAGE_CONFIG, "-u", "http://shadow:8080")


# --- compose.yaml -----------------------------------------------------------------------------------


def test_docker_compose_reads_the_file_as_the_tests_do() -> None:
    """The real compose tool (Debian's docker-compose, file format 2.4, which `docker compose` reads
    too) accepts compose.yaml, and what it resolves keeps the agents' hardening."""
    done = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)["services"]
    assert set(resolved) == set(services())
    for name in agent_services():
        agent = resolved[name]
        assert agent["read_only"] is True and agent["cap_drop"] == ["ALL"], agent
        assert agent["depends_on"]["shadow"]["condition"] == "service_healthy"


def test_compose_has_haproxy_two_agents_a_primary_and_a_shadow() -> None:
    assert len(agent_services()) == 2
    assert haproxy_service()["image"].startswith("haproxy:3.")
    assert {"primary", "shadow"} <= set(services())


def test_every_local_file_compose_uses_exists() -> None:
    for name, service in services().items():
        if "build" in service:
            assert (ROOT / service["build"]["context"]).is_dir(), name
            assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).is_file(), name
        for container_path, local in bind_mounts(service).items():
            assert local.is_file(), f"{name}: {local} (mounted at {container_path}) does not exist"


def test_every_service_has_a_healthcheck_and_depends_only_on_services_that_exist() -> None:
    for name, service in services().items():
        inherited = built_from_dockerfile(service) and any(k == "HEALTHCHECK" for k, _ in final_stage())
        assert "healthcheck" in service or inherited, f"{name} has no healthcheck"
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services(), f"{name} depends on unknown service {dependency}"
            assert condition["condition"] in ("service_started", "service_healthy")


def test_haproxy_does_not_wait_for_agents_to_be_healthy() -> None:
    """HAProxy must start, and serve, with the agents down."""
    depends = haproxy_service()["depends_on"]
    for agent in agent_services():
        assert depends.get(agent, {"condition": "service_started"})["condition"] == "service_started"


def test_haproxy_servers_name_compose_services_on_the_ports_they_listen_on() -> None:
    servers = re.findall(r"^\s*server \S+ ([\w.-]+):(\d+)", haproxy_config_text(), flags=re.MULTILINE)
    agent_config = yaml.safe_load(mounted_agent_config().read_text())
    nginx_port = re.search(r"listen (\d+);", (ROOT / "deploy/compose/nginx.conf").read_text())[1]
    expected_ports = {name: str(agent_config["listen"]["port"]) for name in agent_services()}
    expected_ports |= {"primary": nginx_port, "shadow": nginx_port}
    assert {host for host, _ in servers} == set(agent_services()) | {"primary"}
    for host, port in servers:
        assert port == expected_ports[host], f"{host}:{port}"
    [target] = agent_config["targets"]
    assert target["url"] == f"http://shadow:{nginx_port}"


@pytest.mark.haproxy
def test_mounted_haproxy_config_passes_haproxy_check(tmp_path: Path, haproxy_release: HAProxyRelease) -> None:
    """The container's files laid out under tmp_path as compose mounts them, so the config's
    relative SPOE path is checked too; 2.6 checks it with the agents' backend in `mode tcp`. The
    compose names do not resolve here: the only warnings must be about those, servers HAProxy then
    starts without an address (init-addr none)."""
    for container_path, local in bind_mounts(haproxy_service()).items():
        target = tmp_path / container_path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        text = local.read_text()
        if container_path == HAPROXY_CONFIG_PATH and not haproxy_release.at_least_3_1:
            text = to_mode_tcp(text)
        target.write_text(text)
    result = subprocess.run(
        [haproxy_release.binary, "-c", "-f", str(tmp_path / HAPROXY_CONFIG_PATH.lstrip("/"))],
        capture_output=True,
        text=True,
        timeout=30,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    warnings = [line for line in output.splitlines() if "[WARNING]" in line]
    unresolved = {re.search(r"could not resolve address '([^']+)'", line)[1] for line in warnings}
    assert unresolved <= set(services()), output


def test_haproxy_environment_sets_the_sampling_the_spoe_file_reads() -> None:
    service = haproxy_service()
    spoe = bind_mounts(service)["/usr/local/etc/haproxy/mirror.spoe.conf"].read_text()
    assert '"${MIRROR_SAMPLE_PERCENT-10}"' in spoe
    assert service["environment"]["MIRROR_SAMPLE_PERCENT"] == "100"


def test_mounted_agent_config_passes_check_config() -> None:
    assert_check_config(mounted_agent_config())


def test_agent_frames_match_haproxy_buffers() -> None:
    """HAProxy's frames are at most tune.bufsize - 4 bytes; an agent announcing less would force
    fragmentation (2.x) or lose the larger messages (3.1+)."""
    for config in (mounted_agent_config(), IMAGE_CONFIG):
        assert yaml.safe_load(config.read_text())["listen"]["max_frame_size"] == bufsize(
            haproxy_config_text()
        )


def test_nginx_accepts_the_primary_and_shadow_config(tmp_path: Path) -> None:
    """nginx's image includes conf.d/*.conf inside its http block; the same here around the file."""
    [mount] = {
        bind_mounts(services()[name])["/etc/nginx/conf.d/default.conf"] for name in ("primary", "shadow")
    }
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log stderr;\nevents {{}}\nhttp {{ include {mount}; }}\n"
    )
    result = subprocess.run(
        [NGINX, "-t", "-p", str(tmp_path), "-e", "stderr", "-c", str(main)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", ["primary", "shadow"])
def test_web_healthcheck_asks_the_port_nginx_listens_on(name: str) -> None:
    nginx_port = re.search(r"listen (\d+);", (ROOT / "deploy/compose/nginx.conf").read_text())[1]
    test = services()[name]["healthcheck"]["test"]
    assert f"http://127.0.0.1:{nginx_port}/healthz" in test


def test_compose_haproxy_mirrors_like_the_production_3x_config() -> None:
    """Only addresses and name resolution may differ from haproxy/haproxy-3.x.cfg where mirroring is
    concerned: the agents' backend and the mirroring lines of the frontend and the primary backend."""
    production = (ROOT / "haproxy" / "haproxy-3.x.cfg").read_text()
    demo = haproxy_config_text()

    def agents_backend(text: str) -> list[str]:
        return [line for line in section(text, "backend mirror-agents") if not line.startswith("server ")]

    # The one deliberate difference: replicas share the load (README, Compare).
    expected = [
        "balance roundrobin" if line == "balance first" else line for line in agents_backend(production)
    ]
    assert "balance first" in agents_backend(production)
    assert agents_backend(demo) == expected
    for header in ("frontend www", "backend app"):
        mirroring = [
            line for line in section(production, header) if not line.startswith(("bind ", "server "))
        ]
        assert [line for line in section(demo, header) if line in mirroring] == mirroring, header
    assert bufsize(demo) == bufsize(production)
